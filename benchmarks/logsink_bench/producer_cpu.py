"""`logsink bench cpu`: what a producer pays per record, per client transport.

Two rows per transport, interleaved with each other and over the rounds, medians:
- C: logsink-blast -P, one pre-built record per `logsink_write` call (no formatting): the library's
  own cost per record, CPU from CLOCK_PROCESS_CPUTIME_ID of the producer (all its threads) over its
  writes and the final flush;
- Python: `Client.write` of 64 KiB chunks of 200-byte records (the `logsink bench` producer),
  CPU from process_time of the producer process over its writes, flush and close.
Issue 10's targets: shm <= 25 ns/record (Python chunks), C single records <= 20 ns.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from logsink_bench import engines
from logsink_bench.blast import build_blast, check_output, run_blast
from logsink_bench.harness import (
    GB,
    BenchError,
    Daemon,
    NotAvailable,
    VariantResult,
    check_space,
    clear_dir,
    filesystem_of,
    make_workdir,
    parse_list,
    run_rounds,
    target_check,
    warm_page_cache,
)

TRANSPORTS = engines.TRANSPORTS
DEFAULT_RECORDS = 5_000_000  # 1 GB of 200-byte records: CPU well above the clock's resolution
TARGET_C_NS = 20.0           # C logsink_write of single pre-built records, amortized
TARGET_PY_SHM_NS = 25.0      # Python Client.write of 64 KiB chunks on shm
KINDS = {"c": "C logsink_write, 1 record/call", "py": "Python Client.write, 64 KiB"}


@dataclass(frozen=True)
class CpuVariant:
    kind: str        # "c" or "py"
    transport: str

    @property
    def name(self) -> str:
        return f"{KINDS[self.kind]} ({self.transport})"


@dataclass
class CpuSample:
    records: int
    bytes: int
    wall_s: float
    producer_cpu_s: float
    daemon_cpu_s: float

    def metrics(self) -> dict[str, float]:
        return {
            "gb_per_s": self.bytes / GB / self.wall_s,
            "cpu_ns_per_record": self.producer_cpu_s * 1e9 / self.records,
            "daemon_s_per_gb": self.daemon_cpu_s / (self.bytes / GB),
        }


def measure_c(transport: str, records: int, record_size: int, engine: str, work: Path, sock: str, run_no: int) -> CpuSample:
    out = work / "out"
    clear_dir(out)
    daemon = Daemon(out, sock, work / f"daemon-cpu-c-{transport}-{run_no}.log", engine)
    try:
        warm_page_cache(work / "warm.scratch", records * record_size)
        cpu0 = daemon.cpu_seconds()
        run = run_blast(sock, transport=transport, records=records, mode="record", record_size=record_size)
        daemon_cpu = daemon.cpu_seconds() - cpu0
    finally:
        daemon.stop()
    check_output(out, records, record_size)
    clear_dir(out)
    return CpuSample(records, records * record_size, run.wall_s, run.cpu_s, daemon_cpu)


def measure_py(transport: str, records: int, record_size: int, engine: str, work: Path, sock: str, run_no: int) -> CpuSample:
    one = engines.Workload(record_size, engines.DEFAULT_CHUNK_SIZE, 1, 1, None, None)
    workload = replace(one, chunks_per_producer=max(1, round(records / one.records_per_chunk)))
    s = engines.measure(engines.Variant(engine, transport), workload, work, sock, run_no)
    return CpuSample(s.records, s.bytes, s.wall_s, s.producer_cpu_s, s.cpu_s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="logsink bench cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--transports", type=parse_list(TRANSPORTS), default=list(TRANSPORTS),
                   help="comma-separated client transports (default vmsplice,copy,shm; one not implemented yet "
                   "gives a 'not available' row)")
    p.add_argument("--kinds", type=parse_list(tuple(KINDS)), default=list(KINDS), help="c, py or both (default)")
    p.add_argument("--records", type=int, default=DEFAULT_RECORDS, help=f"records per run (default {DEFAULT_RECORDS})")
    p.add_argument("--record-size", type=int, default=200, help="bytes per record with its \\n (default 200)")
    p.add_argument("--runs", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument("--engine", choices=engines.ENGINES, default="io_uring", help="the daemon's engine (default io_uring)")
    p.add_argument("--dir", type=Path, default=None, help="where outputs go (default: the current directory)")
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of the table")
    return p


def report(results: list[VariantResult], args: argparse.Namespace, work: Path) -> list[str]:
    lines = [f"logsink bench cpu: {args.records} records of {args.record_size} bytes per run, engine {args.engine}, "
             f"medians of {args.runs} interleaved run(s); outputs on {filesystem_of(work)} (page cache)", "",
             f"{'producer':<46}{'CPU ns/rec':>11}{'spread':>8}{'GB/s':>7}{'daemon s/GB':>12}{'vs vmsplice':>12}"]
    ref = {r.variant.kind: r for r in results if r.variant.transport == "vmsplice" and r.samples}
    for r in results:
        if r.unavailable:
            lines.append(f"{r.variant.name:<46}not available: {r.unavailable}")
            continue
        if not r.samples:
            lines.append(f"{r.variant.name:<46}FAILED: {'; '.join(r.failures)}")
            continue
        ns = [s.metrics()["cpu_ns_per_record"] for s in r.samples]
        med = statistics.median(ns)
        base = ref.get(r.variant.kind)
        vs = f"{med / base.median('cpu_ns_per_record'):.2f}x" if base else "-"
        lines.append(f"{r.variant.name:<46}{med:>11.1f}{(max(ns) - min(ns)) / med:>8.0%}{r.median('gb_per_s'):>7.2f}"
                     f"{r.median('daemon_s_per_gb'):>12.3f}{vs:>12}")
    lines.append("")
    lines += checks(results)
    return lines


def checks(results: list[VariantResult]) -> list[str]:
    out = []
    for kind, transport, target in (("c", "vmsplice", TARGET_C_NS), ("c", "shm", TARGET_C_NS), ("py", "shm", TARGET_PY_SHM_NS)):
        r = next((r for r in results if r.variant == CpuVariant(kind, transport)), None)
        out.append(target_check(f"{CpuVariant(kind, transport).name} CPU per record <= {target:.0f} ns", r,
                                "cpu_ns_per_record", lambda v, t=target: v <= t, "{:.1f} ns"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    variants = [CpuVariant(k, t) for t in args.transports for k in args.kinds]
    work = make_workdir(args.dir, ".logsink-bench-cpu-")
    sock_dir = tempfile.mkdtemp(prefix="lsb-")
    sock = os.path.join(sock_dir, "bench.sock")
    try:
        check_space(work, args.records * args.record_size)
        blast_missing = ""
        if "c" in args.kinds:
            try:
                build_blast()
            except BenchError as exc:
                blast_missing = str(exc)

        def measure(v: CpuVariant, run_no: int) -> CpuSample:
            if v.kind == "c":
                if blast_missing:
                    raise NotAvailable(blast_missing)
                return measure_c(v.transport, args.records, args.record_size, args.engine, work, sock, run_no)
            return measure_py(v.transport, args.records, args.record_size, args.engine, work, sock, run_no)

        results = run_rounds(variants, args.runs, measure, lambda v: f"{v.name:<46}",
                             lambda s: f"{s.metrics()['cpu_ns_per_record']:7.1f} ns/rec  {s.metrics()['gb_per_s']:.2f} GB/s")
    except BenchError as exc:
        print(f"logsink bench cpu: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
    if args.json:
        print(json.dumps({"variants": [{"name": r.variant.name, **asdict(r.variant),
                                        "median": {k: r.median(k) for k in ("cpu_ns_per_record", "gb_per_s", "daemon_s_per_gb")}
                                        if r.samples else None,
                                        "samples": [{**asdict(s), **s.metrics()} for s in r.samples],
                                        "failures": r.failures, "unavailable": r.unavailable or None} for r in results],
                          "checks": checks(results)}, indent=2))
    else:
        print("\n".join(report(results, args, work.parent)))
    return 1 if any(r.failures for r in results) else 0
