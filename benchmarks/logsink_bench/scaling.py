"""`logsink bench scaling`: N producer processes writing one stream, per client transport.

For each transport and each N (default 1, 4, 16, 64, and a 1000-producer row), logsink-blast forks
N C producers; each connects, builds one 64 KiB chunk of 200-byte records, faults in its buffers
(logsink_prefault: a long-running producer's are warm) and waits at a start barrier. Then all write
their share of the run as that chunk again and again (-C), flush, and stay connected until every
producer has flushed (an end barrier: no producer's exit runs while others still write). Aggregate
GB/s = bytes in the file / (first producer's first write -> last producer's flush returning); the
daemon's CPU is read over the same span. What a short-lived producer pays besides is reported next
to it, not hidden: "start s" (fork to every producer connected and warm at the start barrier) and
"end s" (the end barrier to every producer closed and gone, the daemon unmapping their arenas).
--cold measures as before: no prefault, each producer exits as soon as it has flushed, and the
daemon's CPU over the whole run. Every output is checked exact: the byte count, the record count,
and a newline at the end of every 200-byte slot (no record lost, doubled, torn or interleaved).
Rows are interleaved over the rounds; medians; the ratio is to the same transport's single producer.

C producers (not Python) so that 1000 of them fit in memory and the producers' own cost is the
library's, not the interpreter's. A transport the client does not implement yet ("shm" until it
lands) gives "not available" rows; a row whose runs fail (e.g. vmsplice producers refused pipes
past the per-user pipe budget) is reported with the reason and does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from logsink_bench import engines
from logsink_bench.blast import build_blast, check_output, run_blast
from logsink_bench.harness import (
    GB,
    BenchError,
    Daemon,
    VariantResult,
    check_space,
    clear_dir,
    filesystem_of,
    make_workdir,
    parse_list,
    parse_size,
    run_rounds,
    warm_page_cache,
)

DEFAULT_COUNTS = "1,4,16,64"
DEFAULT_MANY = 1000
TARGET_16_SHM = 0.9     # 16 producers on shm >= 0.9x one producer
TARGET_MANY_SHM = 0.8   # 1000 producers on shm: exact and >= 0.8x one producer


@dataclass(frozen=True)
class ScaleVariant:
    transport: str
    producers: int

    @property
    def name(self) -> str:
        return f"{self.transport:<8} x {self.producers:>4}"


@dataclass
class ScaleSample:
    bytes: int
    records: int
    wall_s: float
    daemon_cpu_s: float
    producer_cpu_s: float
    min_pipe_size: int
    startup_s: float = 0.0   # fork to every producer at the start barrier (connected; warm unless --cold)
    teardown_s: float = 0.0  # the end barrier to every producer gone (0 with --cold: inside the window)

    def metrics(self) -> dict[str, float]:
        return {
            "gb_per_s": self.bytes / GB / self.wall_s,
            "daemon_s_per_gb": self.daemon_cpu_s / (self.bytes / GB),
            "producer_ns_per_record": self.producer_cpu_s * 1e9 / self.records,
            "min_pipe_size": float(self.min_pipe_size),
            "startup_s": self.startup_s,
            "teardown_s": self.teardown_s,
        }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="logsink bench scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--transports", type=parse_list(engines.TRANSPORTS), default=list(engines.TRANSPORTS),
                   help="comma-separated client transports (default vmsplice,copy,shm)")
    p.add_argument("--producers", default=DEFAULT_COUNTS, help=f"comma-separated producer counts (default {DEFAULT_COUNTS})")
    p.add_argument("--many", type=int, default=DEFAULT_MANY,
                   help=f"the many-producers row (default {DEFAULT_MANY}; 0: none)")
    p.add_argument("--bytes", type=parse_size, default=1 << 30, help="bytes per run, all producers together (default 1G)")
    p.add_argument("--record-size", type=int, default=200, help="bytes per record with its \\n (default 200)")
    p.add_argument("--chunk-size", type=parse_size, default=64 << 10, help="bytes per logsink_write (default 64K)")
    p.add_argument("--segment-size", type=parse_size, default=None, help="client segment size (default: the client's)")
    p.add_argument("--segments", type=int, default=None, help="client segments (default: the client's)")
    p.add_argument("--runs", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument("--engine", choices=engines.ENGINES, default="io_uring", help="the daemon's engine (default io_uring)")
    p.add_argument("--dir", type=Path, default=None, help="where outputs go (default: the current directory)")
    p.add_argument("--user", default=None,
                   help="run the producers as this user (root only): root is exempt from the per-user pipe budget "
                   "(fs.pipe-user-pages-soft), other users get 2-page pipes past it (default: as yourself)")
    p.add_argument("--cold", action="store_true",
                   help="the method before the warm start: producers do not prefault their buffers, each closes and "
                   "exits as soon as it has flushed (inside the window), daemon CPU over the whole run")
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of the table")
    return p


def measure(v: ScaleVariant, args: argparse.Namespace, work: Path, sock: str, run_no: int) -> ScaleSample:
    per = max(1, args.bytes // args.record_size // v.producers)
    records = per * v.producers
    out = work / "out"
    clear_dir(out)
    extra = ("--config", str(work / "socket.toml")) if args.user else ()
    daemon = Daemon(out, sock, work / f"daemon-scale-{v.transport}-{v.producers}-{run_no}.log", args.engine, *extra)
    try:
        cpu0 = daemon.cpu_seconds()
        # The page cache is warmed last, once the producers hold their memory (they took the warmed
        # pages for their arenas otherwise, and the file went into memory the VM had handed back).
        warm = lambda: warm_page_cache(work / "warm.scratch", records * args.record_size)  # noqa: E731
        try:
            run = run_blast(sock, transport=v.transport, records=per, producers=v.producers, mode="chunk",
                            record_size=args.record_size, chunk_size=args.chunk_size,
                            segment_size=args.segment_size, segments=args.segments, user=args.user,
                            warm=not args.cold, hold=not args.cold, daemon_pid=daemon.pid, before_start=warm)
        except BenchError as exc:
            if not exc.detail:
                exc.detail = daemon.log_tail()
            raise
        daemon_cpu = daemon.cpu_seconds() - cpu0
        if not args.cold and run.daemon_cpu_s is not None:
            daemon_cpu = run.daemon_cpu_s  # over the writes only: start-up and teardown are their own columns
    finally:
        daemon.stop()
    check_output(out, records, args.record_size)
    clear_dir(out)
    return ScaleSample(records * args.record_size, records, run.wall_s, daemon_cpu, run.cpu_s, run.min_pipe_size,
                       run.startup_s, run.teardown_s)


def table(results: list[VariantResult], args: argparse.Namespace, work: Path) -> list[str]:
    lines = [f"logsink bench scaling: {args.bytes / GB:.2f} GB per run into one stream, {args.record_size}-byte records in "
             f"{args.chunk_size}-byte writes, C producers, engine {args.engine}, medians of {args.runs} interleaved "
             f"run(s); outputs on {filesystem_of(work)} (page cache)"
             + (f"; producers run as {args.user}" if args.user else "; producers run as uid " + str(os.getuid()))
             + ("; cold: no prefault, producers exit inside the window" if args.cold
                else "; warm: producers prefault their buffers, an end barrier holds them until all flushed"), "",
             f"{'transport x producers':<22}{'GB/s':>7}{'spread':>8}{'vs 1':>7}{'daemon s/GB':>12}{'prod ns/rec':>12}"
             f"{'min pipe':>10}{'start s':>9}{'end s':>7}  exact"]
    single = {r.variant.transport: r for r in results if r.variant.producers == 1 and r.samples}
    for r in results:
        if r.unavailable:
            lines.append(f"{r.variant.name:<22}not available: {r.unavailable}")
            continue
        runs = f"{len(r.samples)}/{len(r.samples) + len(r.failures)}"
        if not r.samples:
            lines.append(f"{r.variant.name:<22}FAILED in every run: {r.failures[0] if r.failures else ''}")
            continue
        one = single.get(r.variant.transport)
        vs = f"{r.median('gb_per_s') / one.median('gb_per_s'):.2f}x" if one else "-"
        pipe = r.median("min_pipe_size")
        end = "-" if args.cold else f"{r.median('teardown_s'):.2f}"
        lines.append(f"{r.variant.name:<22}{r.median('gb_per_s'):>7.2f}{r.spread():>8.0%}{vs:>7}"
                     f"{r.median('daemon_s_per_gb'):>12.3f}{r.median('producer_ns_per_record'):>12.0f}"
                     f"{(f'{pipe / 1024:.0f}K' if pipe else '-'):>10}{r.median('startup_s'):>9.2f}"
                     f"{end:>7}  {runs} runs")
        lines += [f"    {f}" for f in r.failures]
    lines.append("")
    lines.append("exact: runs whose output held every record whole (bytes, newlines, and one newline per record slot).")
    lines.append("min pipe: the smallest data pipe a producer got (F_GETPIPE_SZ; '-' for transports without one).")
    lines.append("start s: fork to every producer at the start barrier (connected" + ("" if args.cold else ", buffers faulted in")
                 + "); end s: the end barrier to every producer gone (close, exit, the daemon's teardown). Outside GB/s.")
    if not args.cold:
        lines.append("GB/s and daemon s/GB cover the writes: first write to last flush. --cold puts each producer's exit inside.")
    lines += checks(results, args)
    return lines


def checks(results: list[VariantResult], args: argparse.Namespace) -> list[str]:
    def find(t: str, n: int) -> VariantResult | None:
        return next((r for r in results if r.variant == ScaleVariant(t, n)), None)

    out = []
    for n, target in ((16, TARGET_16_SHM), (args.many, TARGET_MANY_SHM)):
        one, many = find("shm", 1), find("shm", n)
        what = f"shm x {n} >= {target}x shm x 1, exact"
        if not (one and one.samples and many and many.samples) or many.failures:
            why = "not available" if (many and many.unavailable) else ("failed" if many and many.failures else "not measured")
            out.append(f"SKIP {what}: {why}" if why != "failed" else f"MISS {what}: {many.failures[0]}")
            continue
        ratio = many.median("gb_per_s") / one.median("gb_per_s")
        out.append(f"{'PASS' if ratio >= target else 'MISS'} {what}: {ratio:.2f}x")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        counts = [int(n) for n in args.producers.split(",") if n.strip()]
    except ValueError:
        print(f"logsink bench scaling: --producers {args.producers!r} is not a comma-separated list of numbers", file=sys.stderr)
        return 2
    if args.many:
        counts.append(args.many)
    if not counts or min(counts) < 1:
        print("logsink bench scaling: producer counts must be >= 1", file=sys.stderr)
        return 2
    variants = [ScaleVariant(t, n) for t in args.transports for n in counts]
    work = make_workdir(args.dir, ".logsink-bench-scaling-")
    sock_dir = tempfile.mkdtemp(prefix="lsb-")
    sock = os.path.join(sock_dir, "bench.sock")
    try:
        check_space(work, args.bytes)
        build_blast()
        if args.user:  # another uid must reach the socket: a world-connectable socket in a traversable directory
            (work / "socket.toml").write_text('socket_mode = "0666"\n')
            os.chmod(sock_dir, 0o711)
        results = run_rounds(variants, args.runs, lambda v, n: measure(v, args, work, sock, n), lambda v: v.name,
                             lambda s: f"{s.metrics()['gb_per_s']:6.2f} GB/s  exact")
    except BenchError as exc:
        print(f"logsink bench scaling: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
    if args.json:
        print(json.dumps({"variants": [{"name": r.variant.name, **asdict(r.variant),
                                        "median": r.medians() if r.samples else None, "spread": r.spread(),
                                        "samples": [{**asdict(s), **s.metrics()} for s in r.samples],
                                        "failures": r.failures, "unavailable": r.unavailable or None} for r in results],
                          "checks": checks(results, args)}, indent=2))
    else:
        print("\n".join(table(results, args, work.parent)))
    # The many-producers row may fail (vmsplice: the per-user pipe budget): a finding, in the table.
    return 1 if any(r.failures for r in results if r.variant.producers != args.many) else 0
