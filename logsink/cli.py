"""The ``logsink`` command: ``serve`` runs the daemon, ``status`` asks it how it is doing, ``bench`` measures it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import struct
import sys
import time
from typing import Any

import structlog

from logsink import protocol
from logsink._version import __version__
from logsink.config import ENGINES, ConfigError, default_socket_path, load
from logsink.errors import exception_for_code

SERVE_HELP = """\
Run the logsink daemon. Producers connect to the control socket (or over TCP, with --listen)
and hand over batches of log lines; stream NAME is written to DIR/NAME.log as plain text and
can also be forwarded to collectors (--forward, docs/forwarding.md).

Settings come from the embedded defaults, then --config FILE (TOML, keys as the long flags
with '_' for '-', e.g. dir = "/var/log/logsink", shutdown_grace = 5), then the flags.
SIGTERM/SIGINT: stop accepting, let producers hand over what they hold, drain every pipe,
exit 0. SIGHUP: reopen files that logrotate moved away.

Files and directories the daemon creates get file_mode (0640) and dir_mode (0750), the control
socket socket_mode (0660) and socket_group, never the umask's. One daemon per DIR (it holds
DIR/.logsink.lock). A --listen address that is not loopback needs auth_token in the config, or
--allow-unauthenticated. See docs/security.md.
"""

STATUS_HELP = """Ask a running daemon for its engine, streams, producers and error counters.

Exit status: 0 the daemon answered; 1 no daemon at the socket (or it refused); 3 a daemon is
there but busy: its listen backlog stayed full, or it did not answer, for --timeout seconds.
"""
# `logsink status` exit codes (documented in STATUS_HELP).
EXIT_NO_DAEMON = 1
EXIT_BUSY = 3


class DaemonBusy(ConnectionError):
    """A daemon is at the socket but did not take or answer the connection in time."""


def _configure_logging() -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="logsink", description="A zero-copy logging sink daemon for Linux.")
    ap.add_argument("--version", action="version", version=f"logsink {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("serve", help="run the daemon", description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--dir", help="output directory; stream NAME goes to DIR/NAME.log (default: ./logs)")
    sp.add_argument("--socket", help=f"control socket path (default: $LOGSINK_SOCKET or {default_socket_path()})")
    sp.add_argument("--engine", choices=ENGINES, help="data engine; auto tries io_uring, then splice, then readwrite (default: auto)")
    sp.add_argument("--config", metavar="FILE", help="TOML config file")
    sp.add_argument("--listen", action="append", metavar="tcp://HOST:PORT", help="also accept producers over TCP here (repeatable; off by default; no host = 127.0.0.1; port 0 = any free port, shown in the log and status). Set auth_token in the config to require a token")
    sp.add_argument("--forward", action="append", dest="forward_cli", metavar="STREAM=tcp://HOST:PORT[,file]",
                    help="also send stream STREAM to a collector (repeatable). Without ',file' the stream is forward-only and "
                    "spools under --state-dir while the collector is down. More options: ,relp ,window=N ,policy=block|drop-oldest ,spool_max=256M")
    sp.add_argument("--framing", choices=("newline", "octet-counted", "relp"), help="framing of --forward collectors (default: newline; "
                    "octet-counted = RFC 6587, for rsyslog imtcp / syslog-ng network(transport(framed)); "
                    "relp = RELP, for rsyslog imrelp: nothing lost when the collector dies)")
    sp.add_argument("--state-dir", dest="state_dir", help="forward cursors and spools (default: DIR/.state)")
    sp.add_argument("--shutdown-grace", type=float, dest="shutdown_grace", metavar="SECONDS", help="on SIGTERM, how long producers get to hand over what they hold (default: 5)")
    sp.add_argument("--fsync", choices=("never", "batch", "interval"), default=None,
                    help="durability of every stream (a [stream.NAME] table may override): never = a flush() returns once the "
                         "records are in the page cache (default); batch = once an fdatasync covered them (on disk); "
                         "interval = fdatasync every --fsync-interval seconds")
    sp.add_argument("--fsync-interval", type=float, default=None, dest="fsync_interval", metavar="SECONDS",
                    help="the period of --fsync interval (default: 1)")
    sp.add_argument("--metrics", metavar="tcp://HOST:PORT",
                    help="serve Prometheus metrics (GET /metrics) here: per-stream bytes, records, rates and file sizes, engine "
                    "bytes by path, producers, pinned segments, pipe sizes, errors by code, forwarding lag (off by default; "
                    "no host = 127.0.0.1; port 0 = any free port, shown in the log and status)")
    sp.add_argument("--allow-unauthenticated", action="store_true", default=None, dest="allow_unauthenticated",
                    help="accept TCP producers without a token on a non-loopback --listen address (only on a trusted network)")

    st = sub.add_parser("status", help="show engine, streams, producers and error counters of a running daemon",
                        description=STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("--socket", help=f"control socket path (default: $LOGSINK_SOCKET or {default_socket_path()})")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                    help="refresh every SECONDS (default 2) until interrupted: rates per stream show a stall at a glance")
    st.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                    help="how long to keep trying a busy daemon (full backlog, slow answer) before reporting it busy (default: 10)")
    st.add_argument("--expected-uid", type=int, dest="expected_uid", metavar="UID",
                    help="the uid the daemon runs as, if neither yours nor root (default: refuse any other: the socket may be squatted)")

    pp = sub.add_parser("pipe", help="relay records from stdin into a stream (splice when stdin is a pipe)",
                        description="Read log lines from stdin and hand them to the daemon as stream STREAM. When stdin is a pipe "
                        "the bytes move with splice(2), cut into batches only at newlines; a last line without a newline is "
                        "terminated, not lost. Example: journalctl -f | logsink pipe journal")
    pp.add_argument("stream", metavar="STREAM")
    pp.add_argument("--socket", help=f"control socket path (default: $LOGSINK_SOCKET or {default_socket_path()})")
    pp.add_argument("--transport", choices=protocol.LOCAL_TRANSPORTS, default="copy",
                    help="how copied lines reach the daemon; shm: through a shared memfd arena, and what a pipe on stdin "
                    "holds is read into it instead of spliced (default: copy)")

    bp = sub.add_parser("bench", help="measure engines and transports side by side (see benchmarks/README.md)", add_help=False)
    bp.add_argument("args", nargs=argparse.REMAINDER)
    return ap


def _check_daemon_uid(sock: socket.socket, path: str, expected_uid: int | None) -> None:
    """Refuse a daemon that runs as neither ``expected_uid`` (default: ours) nor root, as the clients do
    (native/ls_producer_conn.c): whoever squats a socket path in /tmp could feed us a forged status."""
    want = os.geteuid() if expected_uid is None else expected_uid
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid not in (0, want):
        raise PermissionError(f"the daemon at {path} (pid {pid}) runs as uid {uid}, not uid {want} or root: another user may have "
                              f"taken over the socket path; pass --expected-uid {uid} if that is intended")


def _connect(path: str, deadline: float) -> socket.socket:
    """Connect to the control socket; EAGAIN (the daemon's backlog is full) is retried with backoff until ``deadline``."""
    delay = 0.01
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)  # a blocking connect on a full backlog would wait without a bound
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonBusy(f"the logsink daemon at {path} is busy: its listen backlog stayed full (try again, "
                                 "or raise --timeout)") from None
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.5)
        except OSError as exc:
            sock.close()
            raise ConnectionError(f"no logsink daemon at {path}: {exc.strerror or exc} (start one with `logsink serve`, or pass --socket)") from None


def _query_status(path: str, timeout: float = 10.0, expected_uid: int | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    sock = _connect(path, deadline)
    with sock:
        _check_daemon_uid(sock, path, expected_uid)
        sock.settimeout(max(deadline - time.monotonic(), 0.1))
        try:
            sock.sendall(protocol.encode({"t": protocol.STATUS}))
        except TimeoutError:
            raise DaemonBusy(f"the logsink daemon at {path} is busy: it did not take the request within {timeout:g}s") from None
        dec = protocol.ControlDecoder()
        while True:
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                raise DaemonBusy(f"the logsink daemon at {path} is busy: it did not answer within {timeout:g}s (try again, "
                                 "or raise --timeout)") from None
            if not data:
                raise ConnectionError("the daemon closed the connection without answering")
            for msg in dec.feed(data):
                if msg["t"] == protocol.STATUS:
                    return msg["status"]
                if msg["t"] == protocol.ERROR:
                    code, reason = msg["code"], msg["reason"]
                    text = (f"the daemon at {path} refused status (forbidden): {reason}" if code == protocol.E_FORBIDDEN
                            else f"the daemon refused: {code}: {reason}")
                    raise exception_for_code(code, text)


def _human(rate: float) -> str:
    """1234567.0 -> '1.2M' (bytes per second, over the daemon's last 5 s)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if rate >= size:
            return f"{rate / size:.1f}{unit}"
    return f"{rate:.0f}"


def _print_status(st: dict[str, Any]) -> None:
    t = st["totals"]
    eng = st["engine"] + (f" (fell back: {st['fallback_reason']})" if st.get("fallback_reason") and not st.get("engine_failed") else "")
    if st.get("engine_failed"):
        eng += f" FAILED: {st['engine_failed']} (nothing moves: restart the daemon)"
    print(f"logsink {st['version']}  pid {st['pid']}  engine {eng}  up {st['uptime']:.0f}s")
    print(f"dir {st['dir']}  socket {st['socket']}")
    print(f"totals: {t['bytes']} bytes, {t['records']} records, {t['batches']} batches; spliced {t['bytes_spliced']}, "
          f"copied {t['bytes_copied']}, shared {t.get('bytes_shared', 0)}")
    if t.get("bytes_shared") or any(p["transport"] == "shm" for p in st["producers"]):
        print(f"shm batches: {st.get('shm_path', '?')}")
    print(f"\n{'STREAM':<24} {'BYTES':>14} {'RECORDS':>12} {'BYTES/S':>10} {'REC/S':>9} {'PROD':>5} {'ERR':>5}  FILE")
    for name, s in sorted(st["streams"].items()):
        print(f"{name:<24} {s['bytes']:>14} {s['records']:>12} {_human(s.get('bytes_per_s', 0)):>10} "
              f"{s.get('records_per_s', 0):>9.0f} {s['producers']:>5} {s['errors']:>5}  {s['file']}")
    print(f"\n{'PRODUCER':>8} {'STREAM':<20} {'PID':>8} {'UID':>6} {'TRANSPORT':<9} {'BATCHES':>9} {'RELEASED':>9} {'PINNED':>6}")
    for p in st["producers"]:
        print(f"{p['id']:>8} {p['stream']:<20} {p['pid']:>8} {p['uid']:>6} {p['transport']:<9} {p['batches']:>9} {p['released']:>9} {p['pinned_segments']:>6}")
    errs = {k: v for k, v in st["errors"].items() if v}
    print("\nerrors: " + (", ".join(f"{k} {v}" for k, v in sorted(errs.items())) if errs else "none"))


def _watch_status(args: argparse.Namespace) -> int:
    """`logsink status --watch`: the table again every args.watch seconds (a lost daemon is said, not fatal)."""
    if args.watch <= 0:
        print("logsink status: --watch needs a period > 0 seconds", file=sys.stderr)
        return 2
    try:
        while True:
            try:
                st = _query_status(args.socket or default_socket_path(), args.timeout, expected_uid=args.expected_uid)
                out = json.dumps(st, sort_keys=True) if args.json else None
            except (DaemonBusy, ConnectionError, OSError, protocol.ProtocolError) as exc:
                st, out = None, f"logsink status: {exc}"
            if not args.json:
                print("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S") + f"  (every {args.watch:g}s, Ctrl-C stops)", end="\n")
            if st is not None and out is None:
                _print_status(st)
            else:
                print(out)
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from logsink import bench

        return bench.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "serve":
        _configure_logging()
        try:
            cfg = load(args.config, {"dir": args.dir, "socket": args.socket, "engine": args.engine, "shutdown_grace": args.shutdown_grace, "listen": args.listen,
                                     "forward_cli": args.forward_cli, "framing": args.framing, "state_dir": args.state_dir,
                                     "allow_unauthenticated": args.allow_unauthenticated, "metrics": args.metrics,
                                     "fsync": args.fsync, "fsync_interval": args.fsync_interval})
        except ConfigError as exc:
            print(f"logsink serve: {exc}", file=sys.stderr)
            return 2
        from logsink.daemon import serve

        try:
            return serve(cfg)
        except ConfigError as exc:  # found at startup (e.g. a socket systemd passed that we cannot use)
            structlog.get_logger("logsink").error("startup_failed", error=str(exc))
            print(f"logsink serve: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            structlog.get_logger("logsink").error("startup_failed", error=str(exc))
            print(f"logsink serve: {exc}", file=sys.stderr)
            return 1
    if args.command == "pipe":
        from logsink import pipe

        try:
            return pipe.run(args.stream, args.socket, args.transport)
        except (ConnectionError, OSError, ValueError) as exc:
            print(f"logsink pipe: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    if args.command == "status":
        if args.watch is not None:
            return _watch_status(args)
        try:
            st = _query_status(args.socket or default_socket_path(), args.timeout, expected_uid=args.expected_uid)
        except DaemonBusy as exc:
            print(f"logsink status: {exc}", file=sys.stderr)
            return EXIT_BUSY
        except (ConnectionError, OSError, protocol.ProtocolError) as exc:
            print(f"logsink status: {exc}", file=sys.stderr)
            return EXIT_NO_DAEMON
        try:
            if args.json:
                print(json.dumps(st, sort_keys=True))
            else:
                _print_status(st)
            sys.stdout.flush()
        except BrokenPipeError:  # `logsink status | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2
