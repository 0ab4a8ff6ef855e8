#!/usr/bin/env python3
"""Producer-side cost of logging through logsink against the usual sinks, for structlog and stdlib logging.

    python benchmarks/bench_producers.py [--records N] [--runs 3] [--variants a,b,c,d,e] [--json]

Variants (each run in its own subprocess, interleaved a b c d e a b c d e ...; medians over runs):

  (a) structlog -> logsink            ``logsink.structlog.configure()``, default processors (the
                   fused native stage, logsink._fastlog)
  (s) structlog -> logsink            the same processors run by structlog in Python (what (a) was
                   before the native stage: ``configure(processors=<the default list>)``)
  (b) structlog -> structlog.BytesLogger on a local file, the same processors and renderer (orjson
                   when installed: ``pip install -e '.[bench]'``)
  (c) logging   -> ``logsink.logging.LogsinkHandler`` (default ``JsonFormatter``; its default
                   ``fast_loggers=True`` makes the logger a ``FastLogger``: no LogRecord is made)
  (h) logging   -> ``LogsinkHandler(fast_loggers=False)``: the handler's C path alone, from the
                   LogRecord the stdlib Logger makes
  (d) logging   -> ``logging.FileHandler`` with the same ``JsonFormatter``
  (p) picologging -> ``picologging.FileHandler`` with the same ``JsonFormatter`` (an anchor: the C
                   rewrite of logging; skipped with a note when picologging is not installed)
  (q) picologging -> ``picologging.FileHandler`` with picologging's own C ``Formatter`` and a
                   JSON-like format string (its best case; no JSON escaping, so not the same bytes)
  (e) logging   -> ``logging.handlers.SysLogHandler`` with the same formatter, into a private
                   rsyslogd (imuxsock on a unix socket -> omfile)
  (x), (y)         with --null: structlog / logging with the same processors / formatter and the
                   output dropped, i.e. the front end's cost that every sink pays alike

The measured time runs from the first record to the records being in the file: flush + close for
logsink, the file's close for (b)/(d), the last record seen in rsyslog's output file for (e).
See benchmarks/README.md ("Producer integrations").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from logsink_bench.harness import process_cpu_seconds, warm_page_cache

VARIANTS = {
    "a": "structlog -> logsink (native stage)",
    "s": "structlog -> logsink (Python processors)",
    "b": "structlog -> BytesLogger file",
    "c": "logging -> LogsinkHandler",
    "h": "logging -> LogsinkHandler, fast_loggers=False",
    "d": "logging -> FileHandler",
    "p": "picologging -> FileHandler (JsonFormatter)",
    "q": "picologging -> FileHandler (C Formatter)",
    "e": "logging -> SysLogHandler -> rsyslog",
    # --null: the front end alone (same processors / formatter, output dropped), to see the sinks' share
    "x": "structlog -> discard (front end only)",
    "y": "logging -> discard (front end only)",
}
DEFAULT_VARIANTS = "a,s,b,c,h,d,p,q,e"
PICOLOGGING = ("p", "q")
# picologging's own Formatter: JSON-like, unescaped (the closest its C formatter gets to JsonFormatter); the
# timestamp is %(created)f, since picologging 0.9.3 renders %(asctime)s in this format as garbage bytes.
PICO_FORMAT = '{"timestamp":%(created)f,"level":"%(levelname)s","logger":"%(name)s","message":"%(message)s"}'
NULL_VARIANTS = ("x", "y")
# Each variant's baseline for the "vs" column: the same front end with a plain file as the sink.
BASELINE = {"a": "b", "s": "b", "b": "b", "c": "d", "h": "d", "d": "d", "p": "d", "q": "d", "e": "d", "x": "b", "y": "d"}
# Each sink variant's front end alone (--null): wall minus its wall is what the sink costs.
FRONT_END = {"a": "x", "s": "x", "b": "x", "c": "y", "h": "y", "d": "y", "e": "y"}
STREAM = "bench"
END_MARKER = "bench-end-marker"
START_TIMEOUT = 20.0
RUN_TIMEOUT = 900.0


# -- the records ----------------------------------------------------------------------------------
# About 200 bytes once rendered (timestamp, level, logger/event and these fields), every record the
# same length so that each variant writes about the same bytes.
def structlog_fields(i: int) -> dict[str, Any]:
    return {
        "method": "GET", "path": f"/api/v1/items/{i:08d}", "status": 200,
        "user": f"user-{i % 10000:05d}", "request_id": f"{i:016x}",
    }


STDLIB_FORMAT = "request handled method=GET path=/api/v1/items/%08d status=200 user=user-%05d request_id=%016x"


# -- helpers --------------------------------------------------------------------------------------
def self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the child: one variant, one run --------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    variant, n, out = args.child, args.records, Path(args.out)
    run = child_structlog if variant in ("a", "s", "b", "x") else child_picologging if variant in PICOLOGGING else child_logging
    print(json.dumps(run(variant, n, out, args)), flush=True)


def child_structlog(variant: str, n: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import structlog

    import logsink.structlog

    # configure() builds the default chain either way; its Client is only made on first use.
    factory = logsink.structlog.configure(STREAM, socket=args.socket)
    processors = list(structlog.get_config()["processors"])
    f = None
    if variant == "s":  # the same chain, run by structlog itself: configure() fuses only its own default list
        factory = logsink.structlog.configure(STREAM, socket=args.socket, processors=processors)
    if variant in ("a", "s"):
        client = factory.client  # connect now, outside the measurement
    else:
        if not isinstance(logsink.structlog.json_serializer()({}), bytes):
            # stdlib json renders str: LogsinkLogger.msg encodes it, so BytesLogger gets the same encode here.
            processors.append(lambda _logger, _name, rendered: rendered.encode())
        if variant == "b":
            f = open(out, "wb")
            logger_factory: Any = structlog.BytesLoggerFactory(f)
        else:
            logger_factory = structlog.ReturnLoggerFactory()
        structlog.configure(
            processors=processors,
            wrapper_class=structlog.make_filtering_bound_logger(0),
            logger_factory=logger_factory,
            cache_logger_on_first_use=True,
        )
    logger = structlog.get_logger()
    warm_page_cache(out.parent / "scratch.warm", n * args.record_size)
    fields = structlog_fields

    cpu0, t0 = self_cpu_seconds(), time.perf_counter_ns()
    for i in range(n):
        logger.info("request handled", **fields(i))
    if variant in ("a", "s"):
        client.close()  # flush: returns once every record is in the file
    elif f is not None:
        f.close()
    t1, cpu1 = time.perf_counter_ns(), self_cpu_seconds()
    return {"ns": t1 - t0, "cpu_s": cpu1 - cpu0}


def child_logging(variant: str, n: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import logging
    import logging.handlers

    from logsink.logging import JsonFormatter, LogsinkHandler

    if variant in ("c", "h"):
        handler: logging.Handler = LogsinkHandler(STREAM, socket=args.socket, fast_loggers=variant == "c")  # connects now
    elif variant == "d":
        handler = logging.FileHandler(out, mode="w", encoding="utf-8")
        handler.setFormatter(JsonFormatter())
    elif variant == "y":
        handler = _format_only_handler()
        handler.setFormatter(JsonFormatter())
    else:
        handler = logging.handlers.SysLogHandler(address=args.syslog_socket)
        handler.ident = "bench: "  # a TAG, so rsyslog's parser leaves the JSON whole as MSG
        handler.append_nul = False
        handler.setFormatter(JsonFormatter())
    return _timed_logger_run(logging.getLogger("bench.producer"), logging.INFO, handler, n, out, args, end_marker=variant == "e")


def _timed_logger_run(logger: Any, level: int, handler: Any, n: int, out: Path, args: argparse.Namespace,
                      end_marker: bool = False) -> dict[str, Any]:
    """The measured part of a stdlib-style logging row (logging or picologging): ``handler`` alone on
    a non-propagating ``logger``, n records of STDLIB_FORMAT, then the handler's close (logsink: flush
    + close; FileHandler: the file's close; syslog: the socket's), and with ``end_marker`` the wait
    until the syslog daemon wrote the last record."""
    logger.propagate = False
    logger.setLevel(level)
    logger.addHandler(handler)
    warm_page_cache(out.parent / "scratch.warm", n * args.record_size)
    fmt = STDLIB_FORMAT

    cpu0, t0 = self_cpu_seconds(), time.perf_counter_ns()
    for i in range(n):
        logger.info(fmt, i, i % 10000, i)
    if end_marker:
        logger.info(END_MARKER)
    handler.close()
    if end_marker:
        wait_for_marker(out)
    t1, cpu1 = time.perf_counter_ns(), self_cpu_seconds()
    logger.removeHandler(handler)
    return {"ns": t1 - t0, "cpu_s": cpu1 - cpu0}


def child_picologging(variant: str, n: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import picologging  # type: ignore[import-not-found]

    from logsink.logging import JsonFormatter

    handler = picologging.FileHandler(str(out), mode="w", encoding="utf-8")
    handler.setFormatter(JsonFormatter() if variant == "p" else picologging.Formatter(PICO_FORMAT))
    return _timed_logger_run(picologging.getLogger("bench.producer"), picologging.INFO, handler, n, out, args)


def _format_only_handler():
    import logging

    class FormatOnly(logging.Handler):
        """Renders each record as the other handlers do (formatter, UTF-8) and drops it."""

        def emit(self, record: logging.LogRecord) -> None:
            self.format(record).encode("utf-8", "backslashreplace")

    return FormatOnly()


def wait_for_marker(path: Path, timeout: float = RUN_TIMEOUT) -> None:
    """Poll rsyslog's output until the end marker (sent last, over an ordered socket) is in it."""
    marker = END_MARKER.encode()
    deadline = time.monotonic() + timeout
    size = -1
    while time.monotonic() < deadline:
        try:
            now = path.stat().st_size
        except FileNotFoundError:
            now = 0
        if now != size:
            size = now
            with open(path, "rb") as f:
                f.seek(max(0, size - 512))
                if marker in f.read():
                    return
        time.sleep(0.0005)
    raise TimeoutError(f"rsyslog did not write the end marker to {path} within {timeout} s")


# -- sinks the parent runs ------------------------------------------------------------------------
class LogsinkDaemon:
    def __init__(self, root: Path):
        self.dir = root / "logsink"
        self.dir.mkdir()
        self.sock = str(root / "logsink.sock")
        self.err = open(root / "logsink.stderr", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "logsink", "serve", "--dir", str(self.dir), "--socket", self.sock],
            stdin=subprocess.DEVNULL, stdout=self.err, stderr=self.err,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._accepts():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"logsink serve did not start: {(root / 'logsink.stderr').read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        self.output = self.dir / f"{STREAM}.log"
        self.pid = self.proc.pid

    def _accepts(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.sock)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


RSYSLOG_CONF = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imuxsock" SysSock.Use="off")
# RateLimit.Interval=0: imuxsock would otherwise drop most of a burst from one pid.
input(type="imuxsock" Socket="{sock}" RateLimit.Interval="0")
# MSG is " <json>" after the TAG "bench:"; drop the leading space.
template(name="bench_raw" type="string" string="%msg:2:$%\\n")
action(type="omfile" file="{out}" template="bench_raw" ioBufferSize="256k")
"""


def find_rsyslogd() -> str | None:
    return shutil.which("rsyslogd") or next((p for p in ("/usr/sbin/rsyslogd", "/sbin/rsyslogd") if os.access(p, os.X_OK)), None)


def ensure_rsyslog(install: bool) -> tuple[str | None, str]:
    """The rsyslogd binary, installing the Debian package if allowed; or None and why not."""
    path = find_rsyslogd()
    if path:
        return path, ""
    if not install:
        return None, "rsyslogd is not installed (and --no-install was given)"
    if not shutil.which("apt-get"):
        return None, "rsyslogd is not installed and there is no apt-get to install it"
    if os.geteuid() != 0:
        return None, "rsyslogd is not installed and installing it needs root (apt-get install -y rsyslog)"
    log("rsyslogd not found: running apt-get install -y rsyslog")
    res = subprocess.run(["apt-get", "install", "-y", "rsyslog"], capture_output=True, text=True,
                         env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    path = find_rsyslogd()
    if not path:
        return None, f"apt-get install -y rsyslog failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()[-500:]}"
    return path, ""


class Rsyslogd:
    """A private rsyslogd: its own config, pid file, work directory, socket and output file."""

    def __init__(self, binary: str, root: Path):
        self.root = root / "rsyslog"
        self.root.mkdir()
        (self.root / "work").mkdir()
        self.sock = str(self.root / "log.sock")
        self.output = self.root / "out.log"
        conf = self.root / "rsyslog.conf"
        conf.write_text(RSYSLOG_CONF.format(work=self.root / "work", sock=self.sock, out=self.output))
        self.pidfile = self.root / "rsyslogd.pid"
        self.err = open(self.root / "stderr", "wb")
        self.proc = subprocess.Popen([binary, "-n", "-f", str(conf), "-i", str(self.pidfile)],
                                     stdin=subprocess.DEVNULL, stdout=self.err, stderr=self.err)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rsyslogd did not start: {(self.root / 'stderr').read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


# -- the parent -----------------------------------------------------------------------------------
def check_output(path: Path, want_lines: int) -> tuple[int, str | None]:
    """(bytes, problem): the file must hold exactly ``want_lines`` whole lines, no NUL, JSON at both ends."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, f"{path.name} was not written"
    lines = data.count(b"\n")
    if lines != want_lines:
        return len(data), f"{path.name} has {lines} lines, expected {want_lines}"
    if not data.endswith(b"\n") or b"\0" in data:
        return len(data), f"{path.name} has a torn last line or a NUL byte"
    for line in (data[: data.index(b"\n")], data[data.rindex(b"\n", 0, len(data) - 1) + 1 : -1] if want_lines > 1 else b"{}"):
        try:
            json.loads(line)
        except ValueError:
            return len(data), f"{path.name} holds a line that is not JSON: {line[:200]!r}"
    return len(data), None


def run_one(variant: str, args: argparse.Namespace, root: Path, rsyslogd: str | None) -> dict[str, Any]:
    """One variant, one run: start its sink, run the producer subprocess, stop the sink, check the file."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{variant}-", dir=root))
    sink: LogsinkDaemon | Rsyslogd | None = None
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--records", str(args.records),
           "--record-size", str(args.record_size)]
    try:
        if variant in ("a", "s", "c", "h"):
            sink = LogsinkDaemon(run_dir)
            output = sink.output
            cmd += ["--out", str(run_dir / "unused"), "--socket", sink.sock]
        elif variant == "e":
            sink = Rsyslogd(rsyslogd, run_dir)
            output = sink.output
            cmd += ["--out", str(output), "--syslog-socket", sink.sock]
        else:
            output = run_dir / "out.log"
            cmd += ["--out", str(output)]
        sink_cpu0 = process_cpu_seconds(sink.pid) if sink else 0.0
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        sink_cpu1 = process_cpu_seconds(sink.pid) if sink else 0.0
        if res.returncode != 0:
            return {"variant": variant, "error": f"producer exited {res.returncode}: {res.stderr.strip()[-1500:]}"}
        sample = json.loads(res.stdout.strip().splitlines()[-1])
        if sink:
            sink.stop()
            sink = None
        nbytes, problem = (None, None) if variant in NULL_VARIANTS else check_output(output, args.records + (1 if variant == "e" else 0))
        if problem:
            return {"variant": variant, "error": problem}
        n = args.records
        return {
            "variant": variant,
            "wall_ns_per_record": sample["ns"] / n,
            "producer_cpu_ns_per_record": sample["cpu_s"] * 1e9 / n,
            "sink_cpu_ns_per_record": (sink_cpu1 - sink_cpu0) * 1e9 / n if variant in ("a", "s", "c", "h", "e") else None,
            "bytes_per_record": None if nbytes is None else nbytes / (n + (1 if variant == "e" else 0)),
        }
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        return {"variant": variant, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if sink:
            sink.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def median_of(samples: list[dict[str, Any]], key: str) -> float | None:
    vals = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(variants: list[str], samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        ok = [s for s in samples if s["variant"] == v and "error" not in s]
        errors = [s["error"] for s in samples if s["variant"] == v and "error" in s]
        row: dict[str, Any] = {"label": VARIANTS[v], "runs_ok": len(ok), "errors": errors}
        for key in ("wall_ns_per_record", "producer_cpu_ns_per_record", "sink_cpu_ns_per_record", "bytes_per_record"):
            row[key] = median_of(ok, key)
        walls = [s["wall_ns_per_record"] for s in ok]
        row["spread"] = (max(walls) - min(walls)) / statistics.median(walls) if len(walls) > 1 else None
        out[v] = row
    for v, row in out.items():
        base = out.get(BASELINE[v])
        row["vs_baseline"] = (row["wall_ns_per_record"] / base["wall_ns_per_record"]
                              if base and row["wall_ns_per_record"] and base["wall_ns_per_record"] else None)
        row["baseline"] = BASELINE[v]
        front = out.get(FRONT_END.get(v, ""))
        row["sink_wall_ns_per_record"] = (row["wall_ns_per_record"] - front["wall_ns_per_record"]
                                          if front and row["wall_ns_per_record"] and front["wall_ns_per_record"] else None)
    return out


def target_checks(medians: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def wall(v: str) -> float | None:
        return medians[v]["wall_ns_per_record"] if v in medians else None

    checks = []

    def check(target: str, num: str, den: str, limit: float, faster: bool) -> None:
        x, y = wall(num), wall(den)
        if not (x and y):
            checks.append({"target": target, "value": None, "result": "SKIP", "detail": f"({num}) or ({den}) not measured"})
            return
        value = y / x if faster else x / y
        ok = value >= limit if faster else value <= limit
        detail = (f"({den})/({num}) = {value:.2f}x" if faster else f"({num})/({den}) = {value:.2f}x") + f" ({x:.0f} vs {y:.0f} ns/record)"
        checks.append({"target": target, "value": value, "result": "PASS" if ok else "MISS", "detail": detail})

    # Issue 12's targets: structlog's native stage at most half of BytesLogger with orjson; the
    # handler 2x a FileHandler and 1.3x picologging's, the same JsonFormatter on each.
    check("(a) <= 0.5x (b)", "a", "b", 0.5, faster=False)
    check("(c) >= 2x faster than (d)", "c", "d", 2.0, faster=True)
    check("(h) >= 2x faster than (d) (the handler alone, no FastLogger)", "h", "d", 2.0, faster=True)
    check("(c) >= 1.3x faster than (p)", "c", "p", 1.3, faster=True)
    check("(c) >= 1.3x faster than (q)", "c", "q", 1.3, faster=True)
    return checks


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(args: argparse.Namespace, medians: dict[str, dict[str, Any]], checks: list[dict[str, Any]], notes: list[str]) -> None:
    print(f"{args.records} records of ~{args.record_size} bytes per run, {args.runs} interleaved run(s), medians; "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    head = f"{'variant':<48}{'wall ns/rec':>12}{'spread':>8}{'prod CPU':>10}{'sink CPU':>10}{'B/rec':>7}{'vs base':>14}"
    print(head)
    print("-" * len(head))
    for v, row in medians.items():
        vs = "-" if row["vs_baseline"] is None else ("1.00x (base)" if row["baseline"] == v else f"{row['vs_baseline']:.2f}x ({row['baseline']})")
        name = f"({v}) {row['label']}"
        if row["runs_ok"] < args.runs:
            name += f" [{row['runs_ok']}/{args.runs} ok]"
        print(f"{name:<48}{fmt(row['wall_ns_per_record'], '.0f'):>12}{fmt(None if row['spread'] is None else 100 * row['spread'], '.0f') + ('%' if row['spread'] is not None else ''):>8}"
              f"{fmt(row['producer_cpu_ns_per_record'], '.0f'):>10}{fmt(row['sink_cpu_ns_per_record'], '.0f'):>10}"
              f"{fmt(row['bytes_per_record'], '.0f'):>7}{vs:>14}")
    print("wall: first record to records in the file; prod/sink CPU: user+system ns per record of the producer"
          " process (all threads) and of the logsink daemon or rsyslogd; vs base: wall / wall of (b) for structlog, of (d) for logging")
    sink_rows = [(v, row) for v, row in medians.items() if row.get("sink_wall_ns_per_record") is not None]
    if sink_rows:
        print("the sink's share of the wall time (wall minus the front end alone, (x)/(y)), ns per record: "
              + ", ".join(f"({v}) {row['sink_wall_ns_per_record']:.0f}" for v, row in sink_rows))
    for v, row in medians.items():
        for err in row["errors"]:
            print(f"FAILED ({v}): {err}")
    for note in notes:
        print(note)
    for chk in checks:
        print(f"{chk['result']} {chk['target']}: {chk['detail']}")


def parent(args: argparse.Namespace) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.null:
        variants += [v for v in NULL_VARIANTS if v not in variants]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        print(f"--variants takes letters from {','.join(VARIANTS)}; got {args.variants!r}", file=sys.stderr)
        return 2
    notes: list[str] = []
    rsyslogd = None
    if any(v in PICOLOGGING for v in variants):
        try:
            import picologging  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            note = "SKIP (p), (q): picologging is not installed (pip install -e '.[bench]' or pip install picologging)"
            notes.append(note)
            log(note)
            variants = [v for v in variants if v not in PICOLOGGING]
    if "b" in variants and not isinstance(__import__("logsink.structlog").structlog.json_serializer()({}), bytes):
        notes.append("NOTE (b): orjson is not installed: both sides render with stdlib json (pip install -e '.[bench]')")
    if "e" in variants:
        rsyslogd, why = ensure_rsyslog(not args.no_install)
        if not rsyslogd:
            notes.append(f"SKIP (e): {why}")
            log(f"SKIP (e): {why}")
            variants.remove("e")
    root = Path(tempfile.mkdtemp(prefix="lsk-bench-producers-", dir=args.dir))
    samples: list[dict[str, Any]] = []
    try:
        for r in range(args.runs):
            for v in variants:
                s = run_one(v, args, root, rsyslogd)
                s["run"] = r
                samples.append(s)
                if "error" in s:
                    log(f"run {r + 1}/{args.runs} ({v}) {VARIANTS[v]}: FAILED: {s['error']}")
                else:
                    log(f"run {r + 1}/{args.runs} ({v}) {VARIANTS[v]}: {s['wall_ns_per_record']:.0f} ns/record")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = summarize(variants, samples)
    checks = target_checks(medians)
    if args.json:
        print(json.dumps({
            "workload": {"records": args.records, "record_size": args.record_size, "runs": args.runs,
                         "variants": {v: VARIANTS[v] for v in variants}, "python": sys.version.split()[0],
                         "cpus": os.cpu_count()},
            "samples": samples, "medians": medians, "checks": checks, "notes": notes,
        }, indent=2))
    else:
        print_table(args, medians, checks, notes)
    return 1 if any("error" in s for s in samples) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000, help="records per run (default 1000000)")
    p.add_argument("--runs", type=int, default=3, help="interleaved rounds; numbers are medians (default 3)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"which of {','.join(VARIANTS)} to run (default {DEFAULT_VARIANTS})")
    p.add_argument("--null", action="store_true", help="also run (x) and (y): the front ends with the output dropped")
    p.add_argument("--dir", default=None, help="where the temporary directory for outputs is made (default $TMPDIR)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install rsyslog when it is missing")
    p.add_argument("--record-size", type=int, default=200, help=argparse.SUPPRESS)  # sizes the page warm-up
    p.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--socket", help=argparse.SUPPRESS)
    p.add_argument("--syslog-socket", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.records < 1 or args.runs < 1:
        p.error("--records and --runs must be >= 1")
    if args.child:
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
