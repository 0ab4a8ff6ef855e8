"""`logsink bench flush`: how long `Client.flush()` takes at a steady 100k records/s, per transport.

Every 10 ms (on an absolute schedule) the producer writes 1000 records of 200 bytes with
`Client.write` (64 KiB writes), then calls `flush()`, which returns once the daemon has written
them to the file and released them. Each flush's wall time is one sample; a run lasts --seconds
(after a short warm-up that is not counted). Reported per transport: p50, p99, p99.9 and max in
ms (medians over the interleaved runs), and issue 10's target, p99 <= 0.25 ms.

The path one flush waits for (vmsplice): producer vmsplice -> the daemon's engine thread splices
the batch into the file (small batches inline) -> it sends RELEASE on the control socket itself ->
the flushing thread, polling that socket, reads it and returns. docs/performance.md has the
measured hop-by-hop breakdown. --compare-bg-thread adds a "<transport> (bg thread)" row per
transport, run interleaved with the others: the producer opened with LOGSINK_FLUSH_WAITS_ON_SOCKET=0,
so its background thread reads RELEASE and wakes the flushing thread (the path before).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from logsink_bench import engines
from logsink_bench.harness import (
    BenchError,
    Daemon,
    NotAvailable,
    VariantResult,
    clear_dir,
    filesystem_of,
    make_record,
    make_workdir,
    parse_list,
    percentile,
    run_rounds,
    target_check,
    warm_page_cache,
)

DEFAULT_SECONDS = 5.0
DEFAULT_RATE = 100_000       # records per second
DEFAULT_BATCH = 1000         # records between flushes: 10 ms at the default rate
WARMUP_ROUNDS = 50           # flushes not counted: connection set-up, first page faults
TARGET_P99_MS = 0.25
CHUNK_BYTES = 64 << 10
STREAM = "bench"
BG_SUFFIX = " (bg thread)"  # a --compare-bg-thread variant


@dataclass
class FlushSample:
    latencies_ms: list[float] = field(default_factory=list)
    write_ms: list[float] = field(default_factory=list)  # the writes of one batch, for context
    late_ticks: int = 0                                   # ticks that started behind schedule

    def metrics(self) -> dict[str, float]:
        lat = self.latencies_ms
        return {
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "p999_ms": percentile(lat, 99.9),
            "max_ms": max(lat), "mean_ms": statistics.fmean(lat), "write_p50_ms": percentile(self.write_ms, 50),
            "flushes": float(len(lat)), "late_ticks": float(self.late_ticks),
        }


def batch_chunks(batch: int, record_size: int) -> list[bytes]:
    """`batch` records as 64 KiB writes (whole records)."""
    per = max(1, CHUNK_BYTES // record_size)
    records = [make_record(record_size, 0, i) for i in range(batch)]
    return [b"".join(records[i:i + per]) for i in range(0, batch, per)]


def open_client(sock: str, variant: str):
    """A Client for `variant` ("shm", or "shm (bg thread)": flushes left to the background thread, as
    LOGSINK_FLUSH_WAITS_ON_SOCKET=0 at open says). NotAvailable if the client lacks the transport."""
    from logsink import Client

    transport, bg = variant.removesuffix(BG_SUFFIX), variant.endswith(BG_SUFFIX)
    saved = os.environ.get("LOGSINK_FLUSH_WAITS_ON_SOCKET")
    if bg:
        os.environ["LOGSINK_FLUSH_WAITS_ON_SOCKET"] = "0"  # read once, at open
    try:
        return Client(STREAM, socket=sock, transport=transport)
    except NotImplementedError as exc:
        raise NotAvailable(str(exc)) from None
    finally:
        if bg:
            if saved is None:
                os.environ.pop("LOGSINK_FLUSH_WAITS_ON_SOCKET", None)
            else:
                os.environ["LOGSINK_FLUSH_WAITS_ON_SOCKET"] = saved


def run_producer(sock: str, transport: str, seconds: float, rate: int, batch: int, record_size: int) -> FlushSample:
    """The timed loop, in this process. NotAvailable if the client does not implement `transport`."""
    client = open_client(sock, transport)
    chunks = batch_chunks(batch, record_size)
    period_ns = int(batch / rate * 1e9)
    ticks = WARMUP_ROUNDS + max(1, int(seconds * 1e9 // period_ns))
    sample = FlushSample()
    clock = time.perf_counter_ns
    try:
        start = clock()
        for tick in range(ticks):
            due = start + tick * period_ns
            wait = due - clock()
            if wait > 0:
                time.sleep(wait / 1e9)
            elif tick >= WARMUP_ROUNDS and wait < -period_ns // 10:
                sample.late_ticks += 1
            t0 = clock()
            for chunk in chunks:
                client.write(chunk)
            t1 = clock()
            client.flush(timeout=10)
            t2 = clock()
            if tick >= WARMUP_ROUNDS:
                sample.write_ms.append((t1 - t0) / 1e6)
                sample.latencies_ms.append((t2 - t1) / 1e6)
    finally:
        client.close()
    return sample


def measure(transport: str, args: argparse.Namespace, work: Path, sock: str, run_no: int) -> FlushSample:
    out = work / "out"
    clear_dir(out)
    daemon = Daemon(out, sock, work / f"daemon-flush-{transport.replace(' ', '_')}-{run_no}.log", args.engine)
    try:
        total = int((args.seconds + WARMUP_ROUNDS * args.batch / args.rate) * args.rate * args.record_size)
        warm_page_cache(work / "warm.scratch", total)
        sample = run_producer(sock, transport, args.seconds, args.rate, args.batch, args.record_size)
    finally:
        daemon.stop()
    expected = (WARMUP_ROUNDS + len(sample.latencies_ms)) * args.batch * args.record_size
    written = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".log")
    clear_dir(out)
    if written != expected:
        raise BenchError(f"the output holds {written} bytes, expected {expected}")
    return sample


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="logsink bench flush", description=__doc__.split("\n\n")[0])
    p.add_argument("--transports", type=parse_list(engines.TRANSPORTS), default=list(engines.TRANSPORTS),
                   help="comma-separated client transports (default vmsplice,copy,shm)")
    p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help=f"measured seconds per run (default {DEFAULT_SECONDS:g})")
    p.add_argument("--rate", type=int, default=DEFAULT_RATE, help=f"records per second (default {DEFAULT_RATE})")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"records between flushes (default {DEFAULT_BATCH})")
    p.add_argument("--record-size", type=int, default=200, help="bytes per record with its \\n (default 200)")
    p.add_argument("--runs", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument("--engine", choices=engines.ENGINES, default="io_uring", help="the daemon's engine (default io_uring)")
    p.add_argument("--dir", type=Path, default=None, help="where outputs go (default: the current directory)")
    p.add_argument("--compare-bg-thread", action="store_true",
                   help="also run each transport with flushes left to the producer's background thread "
                        "(LOGSINK_FLUSH_WAITS_ON_SOCKET=0), interleaved: rows '<transport> (bg thread)'")
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of the table")
    return p


KEYS = ("p50_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms", "write_p50_ms")


def table(results: list[VariantResult], args: argparse.Namespace, work: Path) -> list[str]:
    W = max(10, *(len(r.variant) + 2 for r in results))  # noqa: N806 - the first column's width
    lines = [f"logsink bench flush: {args.batch} records of {args.record_size} bytes then flush(), every "
             f"{args.batch / args.rate * 1000:g} ms ({args.rate} records/s) for {args.seconds:g} s, engine {args.engine}, "
             f"medians of {args.runs} interleaved run(s); outputs on {filesystem_of(work)} (page cache)",
             "load average at the end: {:.2f} {:.2f} {:.2f} on {} CPUs (tails grow with other work on the machine)".format(
                 *os.getloadavg(), os.cpu_count()), "",
             f"{'transport':<{W}}" + "".join(f"{h:>10}" for h in ("p50 ms", "p99 ms", "p99.9 ms", "max ms", "mean ms",
                                                               "write ms", "flushes", "late"))]
    for r in results:
        if r.unavailable:
            lines.append(f"{r.variant:<{W}}not available: {r.unavailable}")
            continue
        if not r.samples:
            lines.append(f"{r.variant:<{W}}FAILED: {'; '.join(r.failures)}")
            continue
        cells = [f"{r.median(k):>10.3f}" for k in KEYS]
        cells += [f"{sum(len(s.latencies_ms) for s in r.samples):>10}", f"{sum(s.late_ticks for s in r.samples):>10}"]
        lines.append(f"{r.variant:<{W}}" + "".join(cells))
    lines += ["", "write ms: the writes of one batch (p50), before flush() is called; late: ticks that started "
              "over 10% of a period behind schedule (the producer could not keep the rate).", *checks(results)]
    return lines


def checks(results: list[VariantResult]) -> list[str]:
    return [target_check(f"{t} flush() p99 <= {TARGET_P99_MS} ms", next((r for r in results if r.variant == t), None),
                         "p99_ms", lambda v: v <= TARGET_P99_MS, "{:.3f} ms") for t in ("vmsplice", "shm")]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rate < 1 or args.batch < 1 or args.seconds <= 0 or args.runs < 1:
        print("logsink bench flush: --rate, --batch, --runs must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    work = make_workdir(args.dir, ".logsink-bench-flush-")
    sock_dir = tempfile.mkdtemp(prefix="lsb-")
    sock = os.path.join(sock_dir, "bench.sock")
    try:
        variants = [v for t in args.transports for v in ((t, t + BG_SUFFIX) if args.compare_bg_thread else (t,))]
        results = run_rounds(variants, args.runs, lambda t, n: measure(t, args, work, sock, n), lambda t: f"{t:<22}",
                             lambda s: "p50 {p50_ms:.3f} ms  p99 {p99_ms:.3f} ms  max {max_ms:.3f} ms".format(**s.metrics()))
    except BenchError as exc:
        print(f"logsink bench flush: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
    if args.json:
        print(json.dumps({"variants": [{"transport": r.variant, "median": {k: r.median(k) for k in KEYS} if r.samples else None,
                                        "samples": [{**s.metrics(), "latencies_ms": s.latencies_ms} for s in r.samples],
                                        "failures": r.failures, "unavailable": r.unavailable or None} for r in results],
                          "checks": checks(results)}, indent=2))
    else:
        print("\n".join(table(results, args, work.parent)))
    return 1 if any(r.failures for r in results) else 0
