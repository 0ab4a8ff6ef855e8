"""Network benchmark: TCP producers (MSG_ZEROCOPY, copy) next to a local vmsplice producer, daemon forwarding next
to a plain relay, and a real rsyslog imtcp next to logsink - interleaved runs, medians, ratios.

    python benchmarks/bench_network.py [--bytes 512M] [--runs 3] [--json]

Variants (one producer, 200-byte records in 64 KiB writes, io_uring engine):

  a  TCP zerocopy  logsink.Client(address=tcp://..., transport="zerocopy") -> daemon -> file
  b  TCP copy      the same with transport="copy"
  c  local         logsink.Client(socket=..., transport="vmsplice") -> the same kind of daemon -> file
  d1 forward       local vmsplice producer -> daemon --forward app=tcp://SINK (newline, forward-only:
                   spool + sendfile, LOGSINK_FORWARD_PATH=sendfile) -> a loopback sink that reads and discards
  d2 relay         a sender -> TCP -> a Python read/write relay -> TCP -> the same sink
  d3 fwd octet     d1 with octet-counted framing ("LEN " before each record; plain TCP, per-record framing)
  d4 fwd RELP      d1 with RELP framing (one syslog command per record, window 1024) -> a loopback RELP
                   sink that answers "rsp 200 OK" for every command (frames counted by their LF trailer)
  d5 fwd+file sendfile   d1 with the file kept (--forward 'app=tcp://SINK,file': app.log AND the sink),
                   today's sendfile path (LOGSINK_FORWARD_PATH=sendfile)
  d6 fwd+file uring      d5 through the forwarder's io_uring: SEND from a mapping of the file (the default)
  d7 fwd+file uring-zc   d5 through the forwarder's io_uring: SEND_ZC from that mapping (F_NOTIF tracked)
  e  rsyslog       a sender -> TCP (newline framing, "<14>"-prefixed records) -> rsyslogd imtcp -> omfile

Throughput is bytes (records) / wall time from the producer's first write until the last byte is
where the variant puts it: in the file after flush()+close() for a-c, received by the sink for d
(GB/s counts record bytes, not framing),
in rsyslog's output file (polled) for e. "server CPU" is the CPU (user+system, all threads) of the
process in the middle: the daemon, the relay, or rsyslogd.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from logsink_bench.harness import (
    GB,
    START_TIMEOUT,
    BenchError,
    Daemon,
    Server,
    VariantResult,
    check_space,
    clear_dir,
    filesystem_of,
    make_record,
    make_workdir,
    now_ns,
    parse_size,
    process_cpu_seconds,
    run_rounds,
    tcp_accepts,
    warm_page_cache,
)

DEFAULT_BYTES = 512 << 20
DEFAULT_RUNS = 3
RECORD_SIZE = 200
CHUNK_SIZE = 64 << 10
STREAM = "app"
# A syslog PRI (facility user, severity info) in front of each rsyslog record, inside its 200 bytes.
SYSLOG_PRI = b"<14>"

RUN_TIMEOUT = 600.0        # 512 MiB at a pathological 1 MB/s still finishes
POLL_INTERVAL = 0.002      # polling rsyslog's output file for its final size
RELAY_BUFFER = 256 << 10   # the relay's read size: what a careful textbook relay would use
SINK_BUFFER = 1 << 20

VARIANTS = {
    "a": "TCP zerocopy -> daemon -> file",
    "b": "TCP copy -> daemon -> file",
    "c": "local vmsplice -> daemon -> file",
    "d1": "daemon forward -> sink",
    "d2": "read/write relay -> sink",
    "d3": "daemon forward octet -> sink",
    "d4": "daemon forward RELP -> RELP sink",
    "d5": "forward+file sendfile -> sink",
    "d6": "forward+file io_uring SEND -> sink",
    "d7": "forward+file io_uring SEND_ZC -> sink",
    "e": "TCP -> rsyslog imtcp -> file",
}
# The forwarding path each forwarding variant asks for (LOGSINK_FORWARD_PATH), as status names it.
FORWARD_PATHS = {"d1": ("sendfile", "sendfile"), "d3": ("auto", None), "d4": ("auto", None),
                 "d5": ("sendfile", "sendfile"), "d6": ("uring-send", "io_uring-send"), "d7": ("uring-zc", "io_uring-send-zc")}


# -- workload -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    chunks: int
    records_per_chunk: int = CHUNK_SIZE // RECORD_SIZE

    @property
    def chunk_bytes(self) -> int:
        return self.records_per_chunk * RECORD_SIZE

    @property
    def total_bytes(self) -> int:
        return self.chunks * self.chunk_bytes

    @property
    def total_records(self) -> int:
        return self.chunks * self.records_per_chunk


def make_chunk(workload: Workload, syslog: bool = False) -> bytes:
    """One write's worth of whole 200-byte records; for rsyslog each starts with a syslog PRI."""
    if not syslog:
        return b"".join(make_record(RECORD_SIZE, 0, i) for i in range(workload.records_per_chunk))
    return b"".join(SYSLOG_PRI + make_record(RECORD_SIZE - len(SYSLOG_PRI), 0, i) for i in range(workload.records_per_chunk))


def free_port() -> int:
    """A free loopback port for a server's command line or config (bound and closed here, then the
    server binds it: a small race, as neither `logsink serve --listen` nor rsyslog's imtcp takes port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- helper processes (spawned) -------------------------------------------------------------------
def _client_producer(conn, address: str | None, sock: str | None, transport: str, workload: Workload) -> None:
    """Connect a logsink.Client, report ready, wait for go, write, flush, close, report times + stats."""
    try:
        import logsink

        chunk = make_chunk(workload)
        if address:
            client = logsink.Client(STREAM, address=address, transport=transport)
        else:
            client = logsink.Client(STREAM, socket=sock, transport=transport)
        conn.send(("ready", None))
        conn.recv()
        t0, cpu0 = now_ns(), time.process_time_ns()
        write = client.write
        for _ in range(workload.chunks):
            write(chunk)
        client.flush(timeout=RUN_TIMEOUT)
        stats = client.stats()
        client.close()
        t1, cpu1 = now_ns(), time.process_time_ns()
        conn.send(("done", {"start_ns": t0, "end_ns": t1, "cpu_ns": cpu1 - cpu0, "stats": stats}))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _socket_sender(conn, port: int, workload: Workload, syslog: bool) -> None:
    """Send the chunks over one TCP connection with sendall (the cheapest possible producer), then close."""
    try:
        chunk = make_chunk(workload, syslog)
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.send(("ready", None))
        conn.recv()
        t0, cpu0 = now_ns(), time.process_time_ns()
        for _ in range(workload.chunks):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the peer closes after reading everything (the relay), or never sends (rsyslog: EOF on close)
        t1, cpu1 = now_ns(), time.process_time_ns()
        s.close()
        conn.send(("done", {"start_ns": t0, "end_ns": t1, "cpu_ns": cpu1 - cpu0, "stats": {}}))
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    return srv


def _discard_sink(conn, expected: int) -> None:
    """Listen on a free loopback port (reported with "ready"), accept one connection, read and discard
    until `expected` bytes came."""
    try:
        srv = _listener()
        conn.send(("ready", srv.getsockname()[1]))
        c, _ = srv.accept()
        buf = bytearray(SINK_BUFFER)
        got, first = 0, 0
        while got < expected:
            n = c.recv_into(buf)
            if not n:
                break
            if not first:
                first = now_ns()
            got += n
        done = now_ns()
        conn.send(("done", {"bytes": got, "first_ns": first, "end_ns": done}))
        c.close()
        srv.close()
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


# What a RELP collector offers back to open (librelp's answer, minus its version).
RELP_OPEN_RSP = b"200 OK\nrelp_version=0\nrelp_software=bench\ncommands=syslog"


def _relp_sink(conn, records: int) -> None:
    """A RELP collector that keeps up: answer open, then "rsp 200 OK" for every syslog command, until
    `records` commands came. Commands are counted by their LF trailer (the records hold no other LF),
    so the sink costs a count and one formatted line per record."""
    try:
        srv = _listener()
        conn.send(("ready", srv.getsockname()[1]))
        c, _ = srv.accept()
        buf = b""
        while True:  # "1 open LEN DATA\n": DATA holds LFs, so parse its length
            head = buf.split(b" ", 3)
            if len(head) == 4 and len(buf) >= len(b" ".join(head[:3])) + 2 + int(head[2]):
                break
            data = c.recv(4096)
            if not data:
                raise BenchError("the forwarder closed before RELP open")
            buf += data
        end = len(b" ".join(buf.split(b" ", 3)[:3])) + 2 + int(buf.split(b" ", 3)[2])
        c.sendall(b"1 rsp %d %s\n" % (len(RELP_OPEN_RSP), RELP_OPEN_RSP))
        data, txnr, got, nbytes, first = buf[end:], 2, 0, 0, 0
        while got < records:
            if not data:
                data = c.recv(SINK_BUFFER)
                if not data:
                    break
            if not first:
                first = now_ns()
            n = data.count(b"\n")
            if n:
                c.sendall(b"".join([b"%d rsp 6 200 OK\n" % t for t in range(txnr, txnr + n)]))
                txnr += n
                got += n
            nbytes += len(data)
            data = b""
        done = now_ns()
        conn.send(("done", {"bytes": nbytes, "records": got, "first_ns": first, "end_ns": done}))
        c.close()
        srv.close()
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _relay(conn, sink_port: int) -> None:
    """The textbook relay: listen (port reported with "ready"), accept one connection, recv_into a
    buffer and sendall it to the sink, until EOF."""
    try:
        srv = _listener()
        out = socket.create_connection(("127.0.0.1", sink_port))
        conn.send(("ready", srv.getsockname()[1]))
        src, _ = srv.accept()
        buf = bytearray(RELAY_BUFFER)
        view = memoryview(buf)
        moved = 0
        while True:
            n = src.recv_into(buf)
            if not n:
                break
            out.sendall(view[:n])
            moved += n
        out.close()
        src.close()
        srv.close()
        conn.send(("done", {"bytes": moved}))
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Helper:
    """A spawned helper process speaking (tag, payload) over a pipe."""

    ctx = multiprocessing.get_context("spawn")

    def __init__(self, target, *args: Any):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()
        self.name = target.__name__.strip("_")

    def expect(self, tag: str, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise BenchError(f"{self.name} did not report {tag!r} within {timeout:.0f} s (exit code {self.proc.exitcode})")
        try:
            got, payload = self.conn.recv()
        except EOFError:
            raise BenchError(f"{self.name} died (exit code {self.proc.exitcode})") from None
        if got == "error":
            raise BenchError(f"{self.name} failed: {payload}")
        if got != tag:
            raise BenchError(f"{self.name} sent {got!r}, expected {tag!r}")
        return payload

    def go(self) -> None:
        self.conn.send("go")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()
        self.conn.close()


# -- servers --------------------------------------------------------------------------------------
def start_daemon(work: Path, run: str, *extra: str, forward_path: str | None = None) -> tuple[Daemon, str, int]:
    """An io_uring daemon on work/d.sock and a loopback port; returns it, the socket and the port.
    forward_path: the daemon's LOGSINK_FORWARD_PATH (how its forwarders send; None: unset)."""
    port = free_port()
    saved = os.environ.pop("LOGSINK_FORWARD_PATH", None)
    if forward_path is not None:
        os.environ["LOGSINK_FORWARD_PATH"] = forward_path  # the daemon inherits it at spawn
    try:
        d = Daemon(work / "out", str(work / "d.sock"), work / f"daemon-{run}.log", "io_uring",
                   "--state-dir", str(work / "state"), *extra, tcp_port=port)
    finally:
        os.environ.pop("LOGSINK_FORWARD_PATH", None)
        if saved is not None:
            os.environ["LOGSINK_FORWARD_PATH"] = saved
    return d, d.sock, port


RSYSLOG_CONF = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="bench" queue.type="FixedArray" queue.size="500000" queue.dequeueBatchSize="8192") {{
  action(type="omfile" file="{out}" template="raw" ioBufferSize="1m" flushOnTXEnd="on")
}}
input(type="imtcp" port="{port}" address="127.0.0.1" ruleset="bench")
"""


def start_rsyslog(work: Path, run: str) -> tuple[Server, Path, int]:
    exe = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
    if not os.access(exe, os.X_OK):
        raise BenchError(f"rsyslogd not found ({exe}): install rsyslog (apt-get install rsyslog)")
    rdir = work / "rsyslog"
    rdir.mkdir(exist_ok=True)
    port, out = free_port(), work / "out" / "rsyslog.log"
    conf = rdir / "rsyslog.conf"
    conf.write_text(RSYSLOG_CONF.format(work=rdir, out=out, port=port))
    pidfile = rdir / "rsyslogd.pid"
    if pidfile.exists():
        pidfile.unlink()
    cmd = [exe, "-n", "-f", str(conf), "-i", str(pidfile)]
    return Server(cmd, work / f"rsyslog-{run}.log", lambda: tcp_accepts(port), "rsyslogd imtcp"), out, port


# -- one measurement ------------------------------------------------------------------------------
@dataclass
class Sample:
    wall_s: float
    bytes: int
    records: int
    server_cpu_s: float
    producer_cpu_s: float
    notes: list[str] = field(default_factory=list)
    client_stats: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {
            "gb_per_s": self.bytes / GB / self.wall_s,
            "mrec_per_s": self.records / 1e6 / self.wall_s,
            "server_cpu_s_per_gb": self.server_cpu_s / (self.bytes / GB),
            "producer_cpu_s_per_gb": self.producer_cpu_s / (self.bytes / GB),
        }


def measure(key: str, workload: Workload, work: Path, run: str) -> Sample:
    clear_dir(work / "out")
    clear_dir(work / "state")
    servers: list[Server] = []
    helpers: list[Helper] = []
    try:
        if key in ("a", "b", "c"):
            d, sock, port = start_daemon(work, f"{key}-{run}")
            servers.append(d)
            transport = {"a": "zerocopy", "b": "copy", "c": "vmsplice"}[key]
            prod = Helper(_client_producer, f"tcp://127.0.0.1:{port}" if key != "c" else None, sock, transport, workload)
            helpers.append(prod)
            prod.expect("ready", START_TIMEOUT)
            warm_page_cache(work / "warm.scratch", workload.total_bytes)
            cpu0 = d.cpu_seconds()
            prod.go()
            res = prod.expect("done", RUN_TIMEOUT)
            cpu = d.cpu_seconds() - cpu0
            size = (work / "out" / f"{STREAM}.log").stat().st_size
            if size != workload.total_bytes:
                raise BenchError(f"the file holds {size} bytes after flush(), expected {workload.total_bytes}")
            s = Sample((res["end_ns"] - res["start_ns"]) / 1e9, size, workload.total_records, cpu, res["cpu_ns"] / 1e9,
                       client_stats=res["stats"])
            if d.engine() != "io_uring":
                s.notes.append(f"the daemon ran {d.engine()!r}, not io_uring")
            if res["stats"].get("transport") != transport:
                s.notes.append(f"the client used {res['stats'].get('transport')!r}, not {transport!r}")
            return s
        if key in ("d1", "d2", "d3", "d4", "d5", "d6", "d7"):
            # the wire bytes: records, plus "200 " before each for octet counting (RELP's sink counts commands)
            wire = workload.total_bytes + (len(b"%d " % RECORD_SIZE) * workload.total_records if key == "d3" else 0)
            sink = Helper(_relp_sink, workload.total_records) if key == "d4" else Helper(_discard_sink, wire)
            helpers.append(sink)
            sink_port = sink.expect("ready", START_TIMEOUT)
            if key != "d2":
                framing = {"d3": "octet-counted", "d4": "relp"}.get(key, "newline")
                target = f"{STREAM}=tcp://127.0.0.1:{sink_port}" + (",file" if key in ("d5", "d6", "d7") else "")
                d, sock, _ = start_daemon(work, f"{key}-{run}", "--forward", target, "--framing", framing,
                                          forward_path=FORWARD_PATHS[key][0])
                servers.append(d)
                middle_pid = d.pid
                prod = Helper(_client_producer, None, sock, "vmsplice", workload)
            else:
                relay = Helper(_relay, sink_port)
                helpers.append(relay)
                relay_port = relay.expect("ready", START_TIMEOUT)
                middle_pid = relay.pid
                prod = Helper(_socket_sender, relay_port, workload, False)
            helpers.append(prod)
            prod.expect("ready", START_TIMEOUT)
            warm_page_cache(work / "warm.scratch", workload.total_bytes)
            cpu0 = process_cpu_seconds(middle_pid)
            prod.go()
            res = prod.expect("done", RUN_TIMEOUT)
            got = sink.expect("done", RUN_TIMEOUT)
            cpu = process_cpu_seconds(middle_pid) - cpu0
            if key == "d4" and got["records"] != workload.total_records:
                raise BenchError(f"the RELP sink received {got['records']} commands, expected {workload.total_records}")
            if key != "d4" and got["bytes"] != wire:
                raise BenchError(f"the sink received {got['bytes']} bytes, expected {wire}")
            if key == "d2":
                relay.expect("done", RUN_TIMEOUT)
            s = Sample((got["end_ns"] - res["start_ns"]) / 1e9, workload.total_bytes, workload.total_records, cpu,
                       res["cpu_ns"] / 1e9, client_stats=res["stats"])
            if key == "d4":
                s.notes.append("RELP sink: a Python loop answering every command; GB/s counts record bytes")
            if key != "d2":
                want = FORWARD_PATHS[key][1]
                ran = d.log_event("forward_path").get("path")
                if want and ran != want:
                    s.notes.append(f"the forwarder ran {ran!r}, not {want!r}: {d.log_event('forward_path').get('reason')}")
                if key in ("d5", "d6", "d7") and (work / "out" / f"{STREAM}.log").stat().st_size != workload.total_bytes:
                    raise BenchError(f"{STREAM}.log does not hold every byte with the file kept")
            return s
        if key == "e":
            r, out, port = start_rsyslog(work, run)
            servers.append(r)
            prod = Helper(_socket_sender, port, workload, True)
            helpers.append(prod)
            prod.expect("ready", START_TIMEOUT)
            warm_page_cache(work / "warm.scratch", workload.total_bytes)
            cpu0 = r.cpu_seconds()
            prod.go()
            start = None
            deadline = time.monotonic() + RUN_TIMEOUT
            # The sender's "done" means rsyslog read everything; the file is complete a little later.
            while True:
                try:
                    size = out.stat().st_size
                except FileNotFoundError:
                    size = 0
                if size >= workload.total_bytes:
                    end_ns = now_ns()
                    break
                if r.proc.poll() is not None:
                    raise BenchError(f"rsyslogd exited with {r.proc.returncode}")
                if time.monotonic() > deadline:
                    raise BenchError(f"rsyslog's file holds {size} of {workload.total_bytes} bytes after {RUN_TIMEOUT:.0f} s")
                time.sleep(POLL_INTERVAL)
            cpu = r.cpu_seconds() - cpu0
            res = prod.expect("done", RUN_TIMEOUT)
            start = res["start_ns"]
            if size != workload.total_bytes:
                raise BenchError(f"rsyslog's file holds {size} bytes, expected {workload.total_bytes}")
            with open(out, "rb") as f:
                head = f.read(RECORD_SIZE)
            if head != make_chunk(workload, True)[:RECORD_SIZE]:
                raise BenchError(f"rsyslog's file does not start with the first record: {head[:80]!r}")
            return Sample((end_ns - start) / 1e9, size, workload.total_records, cpu, res["cpu_ns"] / 1e9)
        raise BenchError(f"unknown variant {key}")
    finally:
        for h in helpers:
            h.close()
        for s in servers:
            s.stop()


# -- rounds, medians, report ----------------------------------------------------------------------
def run(keys: list[str], workload: Workload, runs: int, work: Path) -> dict[str, VariantResult]:
    def progress(s: Sample) -> str:
        m = s.metrics()
        return f"{m['gb_per_s']:6.2f} GB/s {m['mrec_per_s']:6.2f} Mrec/s  server {m['server_cpu_s_per_gb']:.3f} CPU s/GB"

    results = run_rounds(keys, runs, lambda key, run_no: measure(key, workload, work, str(run_no)),
                         lambda key: f"{key:<2} {VARIANTS[key]:<34}", progress)
    return {r.variant: r for r in results}


def ratio(results: dict[str, VariantResult], a: str, b: str, metric: str = "gb_per_s") -> float | None:
    x = results[a].median(metric) if a in results else None
    y = results[b].median(metric) if b in results else None
    return x / y if x and y else None


def marginal(results: dict[str, VariantResult], a: str, base: str, ref: str, metric: str = "server_cpu_s_per_gb") -> float | None:
    """(a - base) / ref of the medians: what a adds on top of base, next to ref."""
    if not all(k in results and results[k].samples for k in (a, base, ref)):
        return None
    return (results[a].median(metric) - results[base].median(metric)) / results[ref].median(metric)


def comparisons(results: dict[str, VariantResult]) -> list[tuple[str, float | None]]:
    """The issue's comparison lines: (text, ratio)."""
    return [
        ("(a) TCP zerocopy vs (b) TCP copy, throughput", ratio(results, "a", "b")),
        ("(a) TCP zerocopy vs (b) TCP copy, daemon CPU per GB", ratio(results, "a", "b", "server_cpu_s_per_gb")),
        ("(a) TCP zerocopy vs (c) local vmsplice, throughput", ratio(results, "a", "c")),
        ("(a) TCP zerocopy vs (c) local vmsplice, daemon CPU per GB", ratio(results, "a", "c", "server_cpu_s_per_gb")),
        ("(d) daemon forwarding vs plain read/write relay, bytes/s at the sink", ratio(results, "d1", "d2")),
        ("(d) daemon forwarding vs plain read/write relay, CPU per GB of the middle process", ratio(results, "d1", "d2", "server_cpu_s_per_gb")),
        ("(d) forward+file io_uring SEND vs relay, bytes/s at the sink", ratio(results, "d6", "d2")),
        ("(d) forward+file io_uring SEND vs relay, CPU per GB of the middle process", ratio(results, "d6", "d2", "server_cpu_s_per_gb")),
        ("(d) forward+file io_uring SEND_ZC vs relay, bytes/s at the sink", ratio(results, "d7", "d2")),
        ("(d) forward+file io_uring SEND_ZC vs relay, CPU per GB of the middle process", ratio(results, "d7", "d2", "server_cpu_s_per_gb")),
        ("(d) forward+file sendfile vs relay, bytes/s at the sink", ratio(results, "d5", "d2")),
        ("(d) forward+file sendfile vs relay, CPU per GB of the middle process", ratio(results, "d5", "d2", "server_cpu_s_per_gb")),
        ("(d) forward+file io_uring SEND vs sendfile, bytes/s at the sink", ratio(results, "d6", "d5")),
        ("(d) forward+file io_uring SEND vs sendfile, CPU per GB of the daemon", ratio(results, "d6", "d5", "server_cpu_s_per_gb")),
        ("(d) what forwarding adds to a daemon writing the file (d6 - c) vs relay, CPU per GB", marginal(results, "d6", "c", "d2")),
        ("(d) forwarding RELP vs octet-counted plain TCP, records/s", ratio(results, "d4", "d3", "mrec_per_s")),
        ("(d) forwarding RELP vs octet-counted plain TCP, daemon CPU per GB", ratio(results, "d4", "d3", "server_cpu_s_per_gb")),
        ("(d) forwarding RELP vs newline plain TCP, records/s", ratio(results, "d4", "d1", "mrec_per_s")),
        ("(a) logsink TCP zerocopy vs (e) rsyslog imtcp -> file, records/s", ratio(results, "a", "e", "mrec_per_s")),
        ("(a) logsink daemon vs (e) rsyslogd, server CPU per GB", ratio(results, "a", "e", "server_cpu_s_per_gb")),
    ]


def print_report(results: dict[str, VariantResult], workload: Workload, runs: int, work: Path) -> None:
    print(f"bench_network: {workload.total_bytes / GB:.2f} GB per run ({workload.total_records} records of {RECORD_SIZE} bytes), "
          f"1 producer, {workload.chunk_bytes}-byte writes, io_uring engine, medians of {runs} interleaved run(s)")
    print(f"Linux {platform.release()}, {os.cpu_count()} CPUs, outputs in {work} ({filesystem_of(work)}, page cache)")
    print()
    head = f"{'':<3}{'variant':<36}{'GB/s':>7}{'spread':>8}{'Mrec/s':>8}{'server s/GB':>13}{'prod s/GB':>11}{'vs (a)':>8}"
    print(head)
    a_gbps = results["a"].median("gb_per_s") if "a" in results else None
    for key, res in results.items():
        if not res.samples:
            print(f"{key:<3}{VARIANTS[key]:<36}FAILED in every run (see below)")
            continue
        g = res.median("gb_per_s")
        vs = f"{g / a_gbps:.2f}x" if a_gbps else "-"
        print(f"{key:<3}{VARIANTS[key]:<36}{g:>7.2f}{res.spread():>8.0%}{res.median('mrec_per_s'):>8.2f}"
              f"{res.median('server_cpu_s_per_gb'):>13.3f}{res.median('producer_cpu_s_per_gb'):>11.3f}{vs:>8}")
    print()
    print("server s/GB: CPU of the process in the middle (daemon; relay for d2; rsyslogd for e); 1 s/GB is 200 ns per")
    print("200-byte record. prod s/GB: the producer's")
    print("own CPU (logsink.Client, or a plain sendall loop for d2 and e). Throughput ends when the last byte is in the file")
    print("(a-c: flush()+close() returned; e: rsyslog's file reached its size) or at the sink (d).")
    zc = [s.client_stats for s in results.get("a", VariantResult("a")).samples if s.client_stats]
    if zc:
        st = zc[-1]
        print(f"(a) client: {st.get('batches')} batches, zc_sends {st.get('zc_sends')}, zc_completed {st.get('zc_completed')}, "
              f"zc_copied {st.get('zc_copied')}, copied_sends {st.get('copied_sends')}, zc_switched_to_copy {st.get('zc_switched_to_copy')}")
    for key, res in results.items():
        for note in sorted({n for s in res.samples for n in s.notes}) + res.failures:
            print(f"  {key}: {note}")
    print()
    for text, r in comparisons(results):
        print(f"{text}: " + (f"{r:.2f}x" if r else "not measured"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_network.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bytes", type=parse_size, default=DEFAULT_BYTES, help="bytes per run (default 512M; K/M/G are 1024-based)")
    ap.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="interleaved rounds; medians are reported (default 3)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--dir", type=Path, default=None, help="where outputs go (a temporary directory is made inside; default: cwd)")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    if not keys or any(k not in VARIANTS for k in keys) or args.runs < 1:
        ap.error(f"--variants takes a comma-separated subset of {','.join(VARIANTS)}; --runs must be >= 1")
    probe = Workload(1)
    workload = Workload(max(1, round(args.bytes / probe.chunk_bytes)))
    work = make_workdir(args.dir, ".lsk-net-", ("out", "state"))
    try:
        try:
            check_space(work, workload.total_bytes)
        except BenchError as exc:
            print(f"bench_network: {exc}", file=sys.stderr)
            return 2
        results = run(keys, workload, args.runs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps({
            "workload": {"bytes": workload.total_bytes, "records": workload.total_records, "record_size": RECORD_SIZE,
                         "chunk_bytes": workload.chunk_bytes, "runs": args.runs},
            "system": {"kernel": platform.release(), "cpus": os.cpu_count(), "filesystem": filesystem_of(work.parent)},
            "variants": {k: {"name": VARIANTS[k], "median": {m: r.median(m) for m in ("gb_per_s", "mrec_per_s", "server_cpu_s_per_gb", "producer_cpu_s_per_gb")} if r.samples else None,
                             "spread": r.spread(), "samples": [{**asdict(s), **s.metrics()} for s in r.samples], "failures": r.failures}
                         for k, r in results.items()},
            "comparisons": [{"text": t, "ratio": r} for t, r in comparisons(results)],
        }, indent=2))
    else:
        print_report(results, workload, args.runs, work.parent)
    return 1 if any(r.failures for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
