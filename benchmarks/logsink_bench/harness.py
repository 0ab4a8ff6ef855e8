"""The shared benchmark harness: what every logsink benchmark needs to measure the same way.

- servers in subprocesses (`Server`, `start_daemon`): started, ready when a check passes, CPU read
  from /proc, stopped with SIGTERM, their log kept for the report;
- the measurement hygiene of design.md ("Measuring on these machines"): warm pages before each run
  (`warm_page_cache`), interleaved rounds with medians and spread (`run_rounds`, `VariantResult`);
- small shared pieces: sizes, records, work directories, filesystem names.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

GB = 1e9  # results are in decimal GB, as disk and network rates usually are
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # unit of utime/stime in /proc/<pid>/stat
# The warm-up scratch file is written in 1 MiB writes: few syscalls, no big buffer.
WARM_WRITE_SIZE = 1 << 20
# A cold daemon start imports Python modules and sets up the engine: seconds on a slow VM, never 30.
START_TIMEOUT = 30.0
# SIGTERM drains what producers left in pipes; a finished run leaves nothing, so this is generous.
STOP_TIMEOUT = 30.0
READY_POLL_INTERVAL = 0.02


class BenchError(RuntimeError):
    """A run could not complete (a server refused to start, a producer failed, the output is short).

    ``str(exc)`` is one line for the table; ``detail`` (e.g. the server's last log lines) goes to stderr.
    """

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


class NotAvailable(BenchError):
    """This build cannot run the variant yet (the client raised NotImplementedError, a tool refused the
    transport's name): its row says "not available" and why, and the bench does not fail."""


# -- arguments ------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'1G', '256M', '64MiB', '4096' -> bytes (K/M/G are binary: 1024-based)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a number with an optional K, M or G suffix")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def parse_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names out of `allowed`."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated list of {', '.join(allowed)}")
        return names
    return parse


# -- records --------------------------------------------------------------------------------------
def make_record(size: int, producer: int, seq: int) -> bytes:
    """One JSON-ish log line of exactly `size` bytes ending in \\n."""
    head = f'{{"ts":"2024-05-01T12:00:00.{seq % 1000000:06d}Z","level":"info","logger":"bench","producer":{producer},"seq":{seq},"msg":"'
    tail = '"}\n'
    pad = size - len(head) - len(tail)
    if pad < 0:  # too small for the JSON shape: plain filler
        return b"x" * (size - 1) + b"\n"
    return (head + "x" * pad + tail).encode()


# -- measuring ------------------------------------------------------------------------------------
def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # system-wide: comparable across processes


def process_cpu_seconds(pid: int) -> float:
    """utime+stime of a whole process (every thread, io_uring workers included) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()  # after "pid (comm) "; fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, nearest rank: a value that was measured."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def warm_page_cache(path: Path, size: int) -> None:
    """Write and delete `size` bytes: the VM gives freed memory back to the host, and writing into
    such memory again ran at a quarter of the speed (about 1 GB/s instead of 4.3 GB/s)."""
    block = memoryview(bytes(WARM_WRITE_SIZE))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, block[: min(left, WARM_WRITE_SIZE)])
    finally:
        os.close(fd)
        os.unlink(path)


# -- work directories -----------------------------------------------------------------------------
def make_workdir(parent: Path | None, prefix: str, subdirs: tuple[str, ...] = ("out",)) -> Path:
    """A fresh directory in `parent` (default: the current directory, so outputs land in its filesystem)."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent or Path.cwd())).resolve()
    for sub in subdirs:
        (work / sub).mkdir()
    return work


def clear_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def check_space(work: Path, total_bytes: int) -> None:
    free = shutil.disk_usage(work).free
    if free < 2 * total_bytes:  # the output plus slack for the servers' logs and the fs
        raise BenchError(f"{work} has {free / GB:.1f} GB free; a run needs about {2 * total_bytes / GB:.1f} GB "
                         "(use --bytes or --dir)")


def filesystem_of(path: Path) -> str:
    """The type and device of the filesystem holding `path` (from /proc/mounts), e.g. 'ext4 on /dev/vda'."""
    best, found = "", "unknown filesystem"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                    best, found = mnt, f"{fstype} on {dev}"
    except OSError:
        pass
    return found


# -- servers --------------------------------------------------------------------------------------
def unix_accepts(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Server:
    """A server subprocess (logsink daemon, rsyslogd, ...) with stdout+stderr in a log file, ready
    once `ready()` is true. Stop it with stop(); its CPU is read from /proc."""

    def __init__(self, cmd: list[str], log_path: Path, ready: Callable[[], bool], what: str,
                 start_timeout: float = START_TIMEOUT):
        self.log_path, self.what = log_path, what
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout
            while not ready():
                if self.proc.poll() is not None:
                    raise BenchError(f"{what}: the process exited with {self.proc.returncode} before it was ready", self.log_tail())
                if time.monotonic() > deadline:
                    raise BenchError(f"{what}: not ready within {start_timeout:.0f} s", self.log_tail())
                time.sleep(READY_POLL_INTERVAL)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def stop(self) -> str:
        """SIGTERM and wait; returns a warning ("" if it exited 0 in time)."""
        warning = ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                warning = f"{self.what} ignored SIGTERM for {STOP_TIMEOUT:.0f} s and was killed"
        if not warning and self.proc.returncode != 0:
            warning = f"{self.what} exited with {self.proc.returncode} on SIGTERM"
        self.log.close()
        return warning

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])

    def log_event(self, event: str) -> dict[str, Any]:
        """The first structlog JSON line whose "event" is `event` ({} if none)."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and ev.get("event") == event:
                return ev
        return {}


class Daemon(Server):
    """`logsink serve` on an AF_UNIX socket and, with tcp_port, on that loopback port too."""

    def __init__(self, out_dir: Path, sock: str, log_path: Path, engine: str, *extra: str, tcp_port: int | None = None):
        if os.path.exists(sock):  # left by a daemon that was killed: it would look like ours accepting
            os.unlink(sock)
        self.sock, self.tcp_port = sock, tcp_port
        cmd = [sys.executable, "-m", "logsink", "serve", "--dir", str(out_dir), "--socket", sock, "--engine", engine, *extra]
        if tcp_port is not None:
            cmd += ["--listen", f"tcp://127.0.0.1:{tcp_port}"]
        super().__init__(cmd, log_path, lambda: unix_accepts(sock) and (tcp_port is None or tcp_accepts(tcp_port)),
                         "the logsink daemon")

    def listening_event(self) -> dict[str, Any]:
        """The structlog "listening" event: it names the engine actually running."""
        return self.log_event("listening")

    def engine(self) -> str:
        return self.listening_event().get("engine", "")

    def status(self) -> dict[str, Any] | None:
        """`logsink status --json`, or None if it fails (it is informative, not required)."""
        try:
            out = subprocess.run([sys.executable, "-m", "logsink", "status", "--socket", self.sock, "--json"],
                                 capture_output=True, timeout=30, check=True).stdout
            return json.loads(out)
        except (subprocess.SubprocessError, ValueError, OSError):
            return None


# -- rounds and medians ---------------------------------------------------------------------------
class HasMetrics(Protocol):
    def metrics(self) -> dict[str, float]: ...


S = TypeVar("S", bound=HasMetrics)
K = TypeVar("K")


@dataclass
class VariantResult(Generic[K, S]):
    """Every sample of one variant over the rounds, and the runs that failed."""

    variant: K
    samples: list[S] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    unavailable: str = ""  # why this build cannot run the variant (NotAvailable): not tried again

    def median(self, key: str) -> float | None:
        values = [s.metrics()[key] for s in self.samples]
        return statistics.median(values) if values else None

    def spread(self) -> float | None:
        """(max - min) / median of GB/s over the runs: how far to trust the medians."""
        values = [s.metrics()["gb_per_s"] for s in self.samples]
        return (max(values) - min(values)) / statistics.median(values) if values else None

    def medians(self) -> dict[str, float | None]:
        keys = self.samples[0].metrics() if self.samples else {}
        return {k: self.median(k) for k in keys}


def target_check(what: str, result: VariantResult | None, metric: str, met: Callable[[float], bool], shown: str) -> str:
    """One line of an issue's target: PASS/MISS with the median of ``metric`` (formatted by ``shown``,
    e.g. "{:.1f} ns"), or SKIP when the variant was not available or not measured."""
    value = result.median(metric) if result is not None else None
    if value is None:
        return f"SKIP {what}: {'not available' if result is not None and result.unavailable else 'not measured'}"
    return f"{'PASS' if met(value) else 'MISS'} {what}: {shown.format(value)}"


def run_rounds(variants: list[K], runs: int, measure: Callable[[K, int], S], label: Callable[[K], str],
               progress: Callable[[S], str]) -> list[VariantResult[K, S]]:
    """Interleave the variants (A B C A B C ...) so slow drift of the machine hits each alike; one
    progress line per run on stderr. A BenchError fails that run only; NotAvailable marks the variant
    unavailable (a row that says so) and it is not tried again."""
    results: list[VariantResult[K, S]] = [VariantResult(v) for v in variants]
    for run_no in range(1, runs + 1):
        for res in results:
            if res.unavailable:
                continue
            head = f"[run {run_no}/{runs}] {label(res.variant)}"
            try:
                sample = measure(res.variant, run_no)
            except NotAvailable as exc:
                res.unavailable = str(exc)
                print(f"{head} not available: {exc}", file=sys.stderr, flush=True)
                continue
            except BenchError as exc:
                res.failures.append(f"run {run_no}: {exc}")
                print(f"{head} FAILED: {exc}", file=sys.stderr, flush=True)
                if exc.detail:
                    print(exc.detail, file=sys.stderr, flush=True)
                continue
            res.samples.append(sample)
            print(f"{head} {progress(sample)}", file=sys.stderr, flush=True)
    return results
