"""`logsink bench`: end-to-end throughput and CPU of each engine and client transport, side by side with a direct write().

Run as `logsink bench` (logsink/bench.py finds this package) or `python -m logsink.bench`; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from logsink_bench.harness import (
    CLOCK_TICKS,
    GB,
    BenchError,
    Daemon,
    NotAvailable,
    VariantResult,
    check_space,
    clear_dir,
    filesystem_of,
    make_record,
    make_workdir,
    parse_list,
    parse_size,
    run_rounds,
    warm_page_cache,
)

# -- defaults (the workload) --------------------------------------------------------------
# 1 GiB per run: long enough that daemon CPU read in clock ticks (10 ms) and process start-up noise
# are a few percent at most, short enough for 7 variants x 3 runs in a few minutes.
DEFAULT_BYTES = 1 << 30
# A typical JSON log line.
DEFAULT_RECORD_SIZE = 200
# What a buffering logger hands over per write: 64 KiB is 327 whole 200-byte records.
DEFAULT_CHUNK_SIZE = 64 << 10
# Medians of at least 3 interleaved runs: single runs on these VMs vary by tens of percent.
DEFAULT_RUNS = 3
DEFAULT_PRODUCERS = 1

ENGINES = ("io_uring", "splice", "readwrite")
# The local transports of logsink.protocol.LOCAL_TRANSPORTS. "shm" rows say "not available" until the
# client implements it (Client(transport="shm") raises NotImplementedError), then measure it.
TRANSPORTS = ("vmsplice", "copy", "shm")
STREAM = "bench"

# -- the targets, all for io_uring + vmsplice ---------------------------------------------
TARGET_VS_READWRITE = 1.5   # throughput >= 1.5x the readwrite engine with the copy transport
TARGET_VS_DIRECT = 0.8      # throughput >= 0.8x the producer writing the file itself
TARGET_CPU_VS_DIRECT = 1.2  # daemon CPU per GB <= 1.2x the direct writer's CPU per GB
BEST = ("io_uring", "vmsplice")
BASELINE = ("readwrite", "copy")
# -- issue 10's targets for the shared-memory transport (checks 4-6: SKIP until shm runs) ----------
SHM = ("io_uring", "shm")
TARGET_SHM_VS_READWRITE = 2.0   # io_uring + shm >= 2.0x readwrite + copy
TARGET_SHM_VS_VMSPLICE = 1.5    # io_uring + shm >= 1.5x io_uring + vmsplice
TARGET_SHM_CPU_VS_DIRECT = 0.5  # daemon CPU per GB <= 0.5x the direct writer's

# -- timeouts -------------------------------------------------------------------------------------
# A spawned producer imports logsink and connects before the start barrier.
PRODUCER_READY_TIMEOUT = 60.0
# 1 GiB at a pathological 5 MB/s still finishes; anything slower is a hang worth reporting.
PRODUCER_RUN_TIMEOUT = 600.0

# How often the parent looks for producers that died without a word (a crash in C code).
QUEUE_POLL_INTERVAL = 0.5

# Below this many ticks of daemon CPU per run, one tick more or less moves s/GB by over 5%.
MIN_CPU_TICKS = 20


# -- configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    record_size: int
    chunk_size: int
    producers: int
    chunks_per_producer: int
    segment_size: int | None
    segments: int | None

    @property
    def records_per_chunk(self) -> int:
        return self.chunk_size // self.record_size

    @property
    def chunk_bytes(self) -> int:
        """Bytes per write(): whole records only, so a chunk of 64 KiB carries 65400 bytes."""
        return self.records_per_chunk * self.record_size

    @property
    def total_bytes(self) -> int:
        return self.chunk_bytes * self.chunks_per_producer * self.producers

    @property
    def total_records(self) -> int:
        return self.records_per_chunk * self.chunks_per_producer * self.producers


@dataclass(frozen=True)
class Variant:
    engine: str | None      # None: the direct-write baseline, no daemon
    transport: str | None
    fsync: str = "never"    # the daemon's --fsync policy (rows other than "never" are named for it)

    @property
    def name(self) -> str:
        if self.engine is None:
            return "direct write (limit)"
        return f"{self.engine} + {self.transport}" + ("" if self.fsync == "never" else f", fsync={self.fsync}")


DIRECT = Variant(None, None)

# `logsink bench NAME ...`: the other measurements (each module has main(argv) and its own --help).
SUBCOMMANDS = {
    "cpu": "logsink_bench.producer_cpu",      # producer CPU per record: C pre-built records, Python 64 KiB chunks
    "scaling": "logsink_bench.scaling",       # 1..64 (and 1000) producers into one stream, exact outputs
    "flush": "logsink_bench.flush_latency",   # flush() latency at 100k records/s, p50/p99/max
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="logsink bench",
        description="Run the daemon with each engine and client transport, and a direct write() of the "
        "same bytes, interleaved; print medians and the issue's target checks.",
        epilog="More measurements: logsink bench cpu (producer CPU per record), logsink bench scaling (1..64 and 1000 "
        "producers), logsink bench flush (flush() latency); each takes --help.",
    )
    p.add_argument("--bytes", type=parse_size, default=DEFAULT_BYTES,
                   help="bytes per run, all producers together (default 1G; K/M/G suffixes are 1024-based)")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument("--engines", type=parse_list(ENGINES), default=list(ENGINES),
                   help="comma-separated daemon engines (default io_uring,splice,readwrite)")
    p.add_argument("--transports", type=parse_list(TRANSPORTS), default=list(TRANSPORTS),
                   help="comma-separated client transports (default vmsplice,copy,shm; a transport the client "
                   "does not implement yet gives a 'not available' row)")
    p.add_argument("--fsync", type=parse_list(("never", "batch", "interval")), default=["never"],
                   help="comma-separated daemon fsync policies, one row each (default never)")
    p.add_argument("--producers", type=int, default=DEFAULT_PRODUCERS, help="producer processes (default 1)")
    p.add_argument("--record-size", type=int, default=DEFAULT_RECORD_SIZE, help="bytes per record, with its \\n (default 200)")
    p.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE,
                   help="bytes per client.write(), cut down to whole records (default 64K)")
    p.add_argument("--segment-size", type=parse_size, default=None, help="client arena segment size (default: the client's)")
    p.add_argument("--segments", type=int, default=None, help="client arena segments (default: the client's)")
    p.add_argument("--dir", type=Path, default=None,
                   help="where output files go; a temporary directory is made inside it and removed afterwards "
                   "(default: the current directory, so outputs land in the page cache of its filesystem)")
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of the table")
    return p


def workload_from_args(args: argparse.Namespace) -> Workload:
    if args.record_size < 2:
        raise BenchError("--record-size must be at least 2 (one byte and the newline)")
    if args.chunk_size < args.record_size:
        raise BenchError(f"--chunk-size {args.chunk_size} is smaller than one record ({args.record_size} bytes)")
    if args.producers < 1 or args.runs < 1:
        raise BenchError("--producers and --runs must be at least 1")
    one_chunk = Workload(args.record_size, args.chunk_size, args.producers, 1, args.segment_size, args.segments)
    return replace(one_chunk, chunks_per_producer=max(1, round(args.bytes / args.producers / one_chunk.chunk_bytes)))


# -- records --------------------------------------------------------------------------------------
def make_chunk(workload: Workload, producer: int) -> bytes:
    return b"".join(make_record(workload.record_size, producer, i) for i in range(workload.records_per_chunk))


# -- producers (run in spawned processes) ---------------------------------------------------------
@dataclass
class ProducerResult:
    index: int
    start_ns: int   # CLOCK_MONOTONIC: system-wide, so comparable across processes
    end_ns: int
    cpu_ns: int     # this process's user+system CPU (all its threads) over the run
    bytes: int
    records: int
    stats: dict[str, Any] = field(default_factory=dict)  # Client.stats() before close


class _ClientSink:
    """Writes chunks through logsink.Client; finish() returns once every byte is in the file."""

    def __init__(self, variant: Variant, sock: str, workload: Workload):
        from logsink import Client  # imported here: the direct-write producer must not pay for it

        self.client = Client(STREAM, socket=sock, transport=variant.transport,
                             segment_size=workload.segment_size, segments=workload.segments)
        self.stats: dict[str, Any] = {}

    def write_chunks(self, chunk: bytes, count: int) -> None:
        write = self.client.write
        for _ in range(count):
            write(chunk)

    def finish(self) -> None:
        self.client.flush(timeout=PRODUCER_RUN_TIMEOUT)
        self.stats = self.client.stats()
        self.client.close()


class _FileSink:
    """Writes the same chunks with os.write into a file of its own: the one-copy limit."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.stats: dict[str, Any] = {}

    def write_chunks(self, chunk: bytes, count: int) -> None:
        write, fd, n = os.write, self.fd, len(chunk)
        for _ in range(count):
            if write(fd, chunk) != n:
                raise BenchError("short write to the direct-write file (disk full?)")

    def finish(self) -> None:
        os.close(self.fd)


def _producer_main(index: int, variant: Variant, sock: str, out_dir: str, workload: Workload,
                   barrier, results) -> None:
    """A producer process: connect, report ready, wait at the barrier, write, flush, report."""
    try:
        if variant.engine is None:
            sink = _FileSink(os.path.join(out_dir, f"direct-{index}.log"))
        else:
            sink = _ClientSink(variant, sock, workload)
        chunk = make_chunk(workload, index)
    except NotImplementedError as exc:  # a transport this build does not have yet: a row, not a failure
        results.put(("unavailable", index, str(exc)))
        return
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which names the variant
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", index, None))
    try:
        barrier.wait(timeout=PRODUCER_READY_TIMEOUT)
    except Exception:  # the parent aborted the run
        return
    try:
        cpu0, t0 = time.process_time_ns(), time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        sink.write_chunks(chunk, workload.chunks_per_producer)
        sink.finish()
        t1, cpu1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC), time.process_time_ns()
    except BaseException as exc:  # noqa: BLE001
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
        return
    n = workload.chunks_per_producer
    results.put(("done", index, ProducerResult(index, t0, t1, cpu1 - cpu0, n * len(chunk),
                                               n * workload.records_per_chunk, sink.stats)))


class ProducerGroup:
    """N producer processes behind one start barrier, so the daemon's CPU is measured apart from theirs."""

    def __init__(self, variant: Variant, sock: str, out_dir: str, workload: Workload):
        ctx = multiprocessing.get_context("spawn")  # fresh processes, like real applications
        self.n = workload.producers
        self.barrier = ctx.Barrier(self.n + 1)
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(target=_producer_main, args=(i, variant, sock, out_dir, workload, self.barrier, self.results),
                        name=f"bench-producer-{i}", daemon=True)
            for i in range(self.n)
        ]
        for p in self.procs:
            p.start()

    def _collect(self, kind: str, timeout: float) -> list[Any]:
        """One `kind` report from every producer; raise on an error report, a death or the timeout."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.n:
            try:
                tag, index, payload = self.results.get(timeout=QUEUE_POLL_INTERVAL)
            except queue.Empty:
                self._check_alive(got)
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.n - len(got)} producer(s) did not report {kind!r} within {timeout:.0f} s") from None
                continue
            if tag == "error":
                raise BenchError(f"producer {index} failed: {payload}")
            if tag == "unavailable":
                raise NotAvailable(payload)
            got[index] = payload
        return list(got.values())

    def _check_alive(self, reported: dict[int, Any]) -> None:
        for i, p in enumerate(self.procs):
            if i not in reported and p.exitcode is not None:
                raise BenchError(f"producer {i} died with exit code {p.exitcode} without reporting")

    def wait_ready(self) -> None:
        self._collect("ready", PRODUCER_READY_TIMEOUT)

    def run(self) -> list[ProducerResult]:
        """Release the barrier and wait for every producer's result."""
        self.barrier.wait(timeout=PRODUCER_READY_TIMEOUT)
        return self._collect("done", PRODUCER_RUN_TIMEOUT)

    def close(self) -> None:
        self.barrier.abort()  # frees producers still waiting if the run failed before the start
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()
        self.results.close()


# -- one measurement ------------------------------------------------------------------------------
@dataclass
class Sample:
    """One run of one variant; every derived number comes from these fields."""

    wall_s: float            # first producer's first write -> last producer's flush+close returned
    bytes: int
    records: int
    cpu_s: float             # the daemon's CPU (direct write: the writers' own CPU)
    producer_cpu_s: float    # all producers together
    producer_wall_s: float   # mean over producers
    producers: int
    engine: str = ""         # as the daemon reported it
    client_transports: list[str] = field(default_factory=list)
    status_totals: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        gb = self.bytes / GB
        return {
            "gb_per_s": gb / self.wall_s,
            "mrec_per_s": self.records / self.wall_s / 1e6,
            "cpu_s_per_gb": self.cpu_s / gb,
            "producer_cpu_ns_per_record": self.producer_cpu_s * 1e9 / self.records,
            "producer_wall_ns_per_record": self.producer_wall_s * 1e9 / (self.records / self.producers),
        }


def output_size(out_dir: Path) -> int:
    """Bytes in the stream files (*.log; not the daemon's lock file)."""
    return sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file() and p.suffix == ".log")


def measure(variant: Variant, workload: Workload, work: Path, sock: str, run_no: int) -> Sample:
    """Start the daemon (unless direct), the producers, warm pages, release the barrier, stop, check."""
    out_dir = work / "out"
    clear_dir(out_dir)
    daemon = producers = None
    try:
        if variant.engine is not None:
            daemon = Daemon(out_dir, sock, work / f"daemon-{variant.engine}-{variant.transport}-{variant.fsync}-{run_no}.log",
                            variant.engine, "--fsync", variant.fsync)
        producers = ProducerGroup(variant, sock, str(out_dir), workload)
        producers.wait_ready()
        warm_page_cache(work / "warm.scratch", workload.total_bytes)
        cpu0 = daemon.cpu_seconds() if daemon else 0.0
        results = producers.run()
        sample = _sample_from(results, daemon.cpu_seconds() - cpu0 if daemon else None)
        if daemon:
            status = daemon.status() or {}
            sample.status_totals = status.get("totals", {})
            sample.engine = status.get("engine") or daemon.engine()
    except BenchError as exc:
        if daemon and not exc.detail:
            exc.detail = daemon.log_tail()
        raise
    finally:
        if producers:
            producers.close()
        stop_warning = daemon.stop() if daemon else ""
    written = output_size(out_dir)
    clear_dir(out_dir)
    if written != workload.total_bytes:
        raise BenchError(f"the output holds {written} bytes after flush(), expected {workload.total_bytes}")
    sample.warnings = [w for w in (stop_warning, *_mismatches(variant, sample)) if w]
    return sample


def _mismatches(variant: Variant, sample: Sample) -> list[str]:
    """Ways the run did not measure what the variant's name says (an engine or transport fallback)."""
    out = []
    if variant.engine and sample.engine and sample.engine != variant.engine:
        out.append(f"asked for engine {variant.engine}, the daemon ran {sample.engine}")
    if variant.transport and any(t != variant.transport for t in sample.client_transports):
        out.append(f"asked for transport {variant.transport}, the client used {sample.client_transports}")
    return out


def _sample_from(results: list[ProducerResult], daemon_cpu_s: float | None) -> Sample:
    start = min(r.start_ns for r in results)
    end = max(r.end_ns for r in results)
    producer_cpu_s = sum(r.cpu_ns for r in results) / 1e9
    return Sample(
        wall_s=(end - start) / 1e9,
        bytes=sum(r.bytes for r in results),
        records=sum(r.records for r in results),
        cpu_s=producer_cpu_s if daemon_cpu_s is None else daemon_cpu_s,
        producer_cpu_s=producer_cpu_s,
        producer_wall_s=statistics.fmean((r.end_ns - r.start_ns) / 1e9 for r in results),
        producers=len(results),
        client_transports=[r.stats.get("transport", "") for r in results if r.stats],
    )


# -- target checks --------------------------------------------------------------------------------
@dataclass
class Check:
    number: int
    passed: bool | None  # None: a variant it needs was not measured
    ratio: float | None
    target: str
    text: str


def _progress(sample: Sample) -> str:
    m = sample.metrics()
    return f"{m['gb_per_s']:6.2f} GB/s  {m['cpu_s_per_gb']:.3f} CPU s/GB" + "".join(f"  ({w})" for w in sample.warnings)


def _find(results: list[VariantResult], variant: Variant) -> VariantResult | None:
    return next((r for r in results if r.variant == variant and r.samples), None)


def target_checks(results: list[VariantResult]) -> list[Check]:
    best, base, direct = _find(results, Variant(*BEST)), _find(results, Variant(*BASELINE)), _find(results, DIRECT)
    name = Variant(*BEST).name
    specs = [
        (1, base, "gb_per_s", TARGET_VS_READWRITE, ">=", "throughput", "GB/s", Variant(*BASELINE).name),
        (2, direct, "gb_per_s", TARGET_VS_DIRECT, ">=", "throughput", "GB/s", DIRECT.name),
        (3, direct, "cpu_s_per_gb", TARGET_CPU_VS_DIRECT, "<=", "daemon CPU", "s/GB", "the direct writer's CPU"),
    ]
    shm = _find(results, Variant(*SHM))
    shm_specs = [
        (4, base, "gb_per_s", TARGET_SHM_VS_READWRITE, ">=", "throughput", "GB/s", Variant(*BASELINE).name),
        (5, best, "gb_per_s", TARGET_SHM_VS_VMSPLICE, ">=", "throughput", "GB/s", Variant(*BEST).name),
        (6, direct, "cpu_s_per_gb", TARGET_SHM_CPU_VS_DIRECT, "<=", "daemon CPU", "s/GB", "the direct writer's CPU"),
    ]
    return _checks(best, name, specs) + _checks(shm, Variant(*SHM).name, shm_specs)


def _checks(best: VariantResult | None, name: str, specs: list) -> list[Check]:
    checks = []
    for number, ref, key, target, op, what, unit, ref_name in specs:
        goal = f"{op} {target}x"
        if best is None or ref is None:
            missing = name if best is None else ref_name
            checks.append(Check(number, None, None, goal, f"SKIP ({number}) {name} {what} {goal} {ref_name}: {missing} was not measured"))
            continue
        mine, theirs = best.median(key), ref.median(key)
        ratio = mine / theirs if theirs else float("inf")
        passed = ratio >= target if op == ">=" else ratio <= target
        fmt = "{:.2f}" if unit == "GB/s" else "{:.3f}"
        checks.append(Check(number, passed, ratio, goal,
                            f"{'PASS' if passed else 'MISS'} ({number}) {name} {what} {fmt.format(mine)} {unit} = "
                            f"{ratio:.2f}x {ref_name} {fmt.format(theirs)} {unit} (target {goal})"))
    return checks


# -- output ---------------------------------------------------------------------------------------
# (header, width, metric key or special, format)
COLUMNS = [
    ("variant", 22, None, "{}"),
    ("GB/s", 7, "gb_per_s", "{:.2f}"),
    ("spread", 7, "spread", "{:.0%}"),
    ("Mrec/s", 7, "mrec_per_s", "{:.2f}"),
    ("daemon s/GB", 12, "cpu_s_per_gb", "{:.3f}"),
    ("prod ns/rec", 12, "producer_cpu_ns_per_record", "{:.0f}"),
    ("prod wall ns/rec", 17, "producer_wall_ns_per_record", "{:.0f}"),
    ("vs readwrite+copy", 18, "vs_baseline", "{:.2f}x"),
    ("vs direct write", 16, "vs_direct", "{:.2f}x"),
]


def row_values(res: VariantResult, baseline: VariantResult | None, direct: VariantResult | None) -> dict[str, Any]:
    values: dict[str, Any] = dict(res.medians())
    values["spread"] = res.spread()
    gbps = values.get("gb_per_s")
    for key, ref in (("vs_baseline", baseline), ("vs_direct", direct)):
        ref_gbps = ref.median("gb_per_s") if ref else None
        values[key] = gbps / ref_gbps if gbps and ref_gbps else None
    return values


def format_table(results: list[VariantResult]) -> list[str]:
    baseline, direct = _find(results, Variant(*BASELINE)), _find(results, DIRECT)
    lines = ["".join(h.ljust(w) if key is None else h.rjust(w) for h, w, key, _ in COLUMNS)]
    for res in results:
        if res.unavailable:
            lines.append(res.variant.name.ljust(COLUMNS[0][1]) + "not available (see below)")
            continue
        if not res.samples:
            lines.append(res.variant.name.ljust(COLUMNS[0][1]) + "FAILED in every run (see below)")
            continue
        values = row_values(res, baseline, direct)
        cells = []
        for _header, width, key, fmt in COLUMNS:
            if key is None:
                cells.append(res.variant.name.ljust(width))
                continue
            val = values.get(key)
            text = "-" if val is None else fmt.format(val)
            if key == "cpu_s_per_gb" and res.variant == DIRECT:
                text += "*"
            cells.append(text.rjust(width))
        lines.append("".join(cells).rstrip())
    return lines


def describe(workload: Workload, runs: int) -> str:
    return (f"{workload.total_bytes / GB:.2f} GB per run ({workload.total_records} records of {workload.record_size} bytes), "
            f"{workload.producers} producer(s), {workload.chunk_bytes}-byte writes ({workload.records_per_chunk} records), "
            f"medians of {runs} interleaved run(s)")


def print_report(results: list[VariantResult], checks: list[Check], workload: Workload, runs: int, work: Path) -> None:
    print(f"logsink bench: {describe(workload, runs)}")
    print(f"Linux {platform.release()}, {os.cpu_count()} CPUs, outputs in {work} ({filesystem_of(work)}, page cache)")
    print()
    for line in format_table(results):
        print(line)
    print()
    print("* direct write: the writer's own CPU s/GB (there is no daemon); prod ns/rec is producer CPU per record.")
    if any(r.variant != DIRECT and s.cpu_s * CLOCK_TICKS < MIN_CPU_TICKS for r in results for s in r.samples):
        print(f"  daemon s/GB is counted in clock ticks ({1 / CLOCK_TICKS * 1000:.0f} ms) and some runs took fewer than "
              f"{MIN_CPU_TICKS}: use a larger --bytes to compare it.")
    for res in results:
        notes = sorted({w for s in res.samples for w in s.warnings}) + res.failures
        if res.unavailable:
            notes.append(f"not available: {res.unavailable}")
        for note in notes:
            print(f"  {res.variant.name}: {note}")
    print()
    for check in checks:
        print(check.text)


def results_json(results: list[VariantResult], checks: list[Check], workload: Workload, runs: int, work: Path) -> dict[str, Any]:
    baseline, direct = _find(results, Variant(*BASELINE)), _find(results, DIRECT)
    return {
        "workload": {**asdict(workload), "chunk_bytes": workload.chunk_bytes, "total_bytes": workload.total_bytes,
                     "total_records": workload.total_records, "runs": runs},
        "system": {"kernel": platform.release(), "cpus": os.cpu_count(), "filesystem": filesystem_of(work)},
        "variants": [
            {"name": r.variant.name, "engine": r.variant.engine, "transport": r.variant.transport, "fsync": r.variant.fsync,
             "median": row_values(r, baseline, direct) if r.samples else None,
             "samples": [{**asdict(s), **s.metrics()} for s in r.samples], "failures": r.failures,
             "unavailable": r.unavailable or None}
            for r in results
        ],
        "checks": [asdict(c) for c in checks],
    }


# -- entry point ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        import importlib

        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        workload = workload_from_args(args)
    except BenchError as exc:
        print(f"logsink bench: {exc}", file=sys.stderr)
        return 2
    variants = [DIRECT] + [Variant(e, t, f) for e in args.engines for t in args.transports for f in args.fsync]
    work = make_workdir(args.dir, ".logsink-bench-")
    sock_dir = tempfile.mkdtemp(prefix="lsb-")  # AF_UNIX paths are limited to 108 bytes: keep it short
    try:
        check_space(work, workload.total_bytes)
        print(f"logsink bench: {describe(workload, args.runs)}", file=sys.stderr, flush=True)
        sock = os.path.join(sock_dir, "bench.sock")
        results = run_rounds(variants, args.runs, lambda v, run_no: measure(v, workload, work, sock, run_no),
                             lambda v: f"{v.name:<22}", _progress)
    except BenchError as exc:
        print(f"logsink bench: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
    checks = target_checks(results)
    if args.json:
        print(json.dumps(results_json(results, checks, workload, args.runs, work.parent), indent=2))
    else:
        print_report(results, checks, workload, args.runs, work.parent)
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
