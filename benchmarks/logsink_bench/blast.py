"""The C producer, clients/c/examples/logsink-blast.c, as a benchmark driver, and the output check the
issue-10 benchmarks share.

`logsink_bench.producer_cpu` runs it with -P (one pre-built record per logsink_write call) and
`logsink_bench.scaling` with -C (one pre-built 64 KiB chunk, written again and again) and up to
1000 forked producers: C producers cost what the library costs, not what Python costs, and 1000 of
them fit in memory (1000 Python interpreters would not).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logsink_bench.harness import BenchError, NotAvailable

CLIENTS_C = Path(__file__).resolve().parent.parent.parent / "clients" / "c"
BLAST = CLIENTS_C / "build" / "logsink-blast"
# logsink-blast exits 2 for bad arguments: a transport name it does not know yet is that case.
BAD_ARGS = 2
MODES = {"record": "-P", "chunk": "-C", "format": None}  # None: the original snprintf-per-record mode


def build_blast() -> Path:
    """`make` the C client and logsink-blast (incremental); NotAvailable if it cannot be built."""
    if not (CLIENTS_C / "Makefile").is_file():
        raise NotAvailable(f"no C client at {CLIENTS_C} (run from a source checkout)")
    res = subprocess.run(["make", "-s", "-C", str(CLIENTS_C), "build/logsink-blast"], capture_output=True, text=True)
    if res.returncode != 0 or not BLAST.is_file():
        raise NotAvailable(f"building {BLAST} failed: {(res.stderr or res.stdout).strip()[-300:]}")
    return BLAST


@dataclass
class BlastRun:
    """One logsink-blast invocation: the producers' own reports and the summary line."""

    producers: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        """First producer's first write to the last producer's flush returning (after the start barrier)."""
        return max(p["t_end"] for p in self.producers) - min(p["t_start"] for p in self.producers)

    @property
    def cpu_s(self) -> float:
        """The producers' CPU over their writes and flush (every thread of each)."""
        return sum(p["cpu_seconds"] for p in self.producers)

    @property
    def startup_s(self) -> float:
        """Fork of the first producer to every producer at the start barrier (connected, and warm with -W)."""
        return float(self.summary.get("startup_seconds", 0.0))

    @property
    def teardown_s(self) -> float:
        """With hold: the end barrier (every producer flushed) to every producer gone (close, exit)."""
        return float(self.summary.get("teardown_seconds", 0.0))

    @property
    def daemon_cpu_s(self) -> float | None:
        """With daemon_pid: the daemon's CPU from the start barrier to the end barrier (hold) or the last exit."""
        v = self.summary.get("daemon_cpu_seconds", -1)
        return None if v is None or v < 0 else float(v)

    @property
    def min_pipe_size(self) -> int:
        return min((p.get("pipe_size", 0) for p in self.producers), default=0)


def run_blast(sock: str, *, transport: str, records: int, producers: int = 1, mode: str = "record",
              record_size: int = 200, chunk_size: int = 65536, segment_size: int | None = None,
              segments: int | None = None, stream: str = "bench", timeout: float = 600.0,
              user: str | None = None, warm: bool = False, hold: bool = False,
              daemon_pid: int | None = None, before_start: Callable[[], None] | None = None) -> BlastRun:
    """Run logsink-blast against the daemon at `sock` (as `user` if given: root is exempt from the
    per-user pipe budget, other users are not); NotAvailable if it does not know `transport`,
    BenchError if a producer failed. warm: the producers fault in their buffers before the start
    barrier (-W); hold: they stay connected until all have flushed (-E); daemon_pid: its CPU over
    the writes (-D); before_start: called once every producer is at the start barrier, before they
    start (-R): e.g. warming the page cache after the producers took their memory."""
    cmd = [str(BLAST), "-s", stream, "-S", sock, "-t", transport, "-n", str(records), "-p", str(producers),
           "-r", str(record_size), "-c", str(chunk_size)]
    if MODES[mode]:
        cmd.append(MODES[mode])
    if segment_size:
        cmd += ["-z", str(segment_size)]
    if segments:
        cmd += ["-m", str(segments)]
    cmd += ["-W"] * warm + ["-E"] * hold + (["-D", str(daemon_pid)] if daemon_pid else [])
    if before_start is None:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, user=user, group=_group_of(user))
        except subprocess.TimeoutExpired:
            raise BenchError(f"logsink-blast did not finish within {timeout:.0f} s") from None
    else:
        res = _run_released(cmd + ["-R"], before_start, timeout, user)
    if res.returncode == BAD_ARGS:
        raise NotAvailable(f"logsink-blast -t {transport}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'refused'}")
    run = BlastRun()
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if doc.get("summary"):
                run.summary = doc
            else:
                run.producers.append(doc)
    if res.returncode != 0 or len(run.producers) != producers:
        errors = sorted(set(res.stderr.strip().splitlines()))
        # A client library that does not implement the transport yet: a row that says so.
        if errors and all("not implemented" in e.lower() or "not supported" in e.lower() for e in errors):
            raise NotAvailable(f"logsink-blast -t {transport}: {errors[0]}")
        raise BenchError(f"logsink-blast: {producers - len(run.producers)} of {producers} producer(s) failed "
                         f"(exit {res.returncode})", "\n".join("    " + e for e in errors[:20]))
    return run


# -- the output check -----------------------------------------------------------------------------
def check_output(out_dir: Path, records: int, record_size: int, chunk: int = 1 << 24) -> None:
    """Every record whole and none lost or doubled: the stream files hold records * record_size bytes,
    exactly `records` newlines, and one at the end of every record_size-byte slot (batches are whole
    fixed-size records, so a torn or interleaved record moves a newline off its slot)."""
    files = sorted(p for p in out_dir.iterdir() if p.is_file() and p.suffix == ".log")
    size = sum(p.stat().st_size for p in files)
    if size != records * record_size:
        raise BenchError(f"the output holds {size} bytes, expected {records * record_size} ({records} records)")
    newlines = on_slot = 0
    for path in files:
        with open(path, "rb") as f:
            # Blocks are whole slots, so each block's slots start at its first byte.
            while block := f.read(chunk - chunk % record_size):
                newlines += block.count(b"\n")
                on_slot += block[record_size - 1::record_size].count(b"\n")
    if newlines != records or on_slot != records:
        raise BenchError(f"the output is not {records} whole records: {newlines} newlines, {on_slot} of them at "
                         f"the end of a {record_size}-byte record")


def _run_released(cmd: list[str], before_start: Callable[[], None], timeout: float,
                  user: str | None) -> subprocess.CompletedProcess:
    """logsink-blast -R: wait for its "ready" line on stderr, call before_start, then start the producers."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            user=user, group=_group_of(user))
    early = []
    try:
        # Nothing comes on stdout before the release; stderr may carry failed producers' lines first.
        for line in proc.stderr:
            if line.strip() == "logsink-blast: ready":
                break
            early.append(line)
        else:  # exited without getting there (bad arguments, every producer failed)
            out, err = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(cmd, proc.returncode, out, "".join(early) + err)
        before_start()
        out, err = proc.communicate(input="go", timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"logsink-blast did not finish within {timeout:.0f} s") from None
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "".join(early) + err)


def _group_of(user: str | None) -> int | None:
    if user is None:
        return None
    import pwd

    return pwd.getpwnam(user).pw_gid
