"""The daemon's control plane (asyncio): accepts producers, routes streams, relays the engine's releases, answers status.

Payload bytes never enter this module: producers' pipes go straight to the native engine
(logsink._native), which moves batches into the stream files and reports events; this module
turns those events into RELEASE messages and counters.
"""

from __future__ import annotations

import array
import asyncio
import errno
import hmac
import os
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from logsink import __version__, access, protocol
from logsink._native import ENGINE_KINDS, ENGINE_NAMES, check, ffi, lib
from logsink.config import Config, resolve_group
from logsink.files import DirLock, FileRefused, dir_beneath, make_dirs, open_beneath, open_dir
from logsink.forward import ForwardManager

log = structlog.get_logger("logsink.daemon")

# Events drained per call into the engine; a full buffer just means another call.
EVENT_BATCH = 512
# After the grace period, producers still connected get their pipes drained; this bounds that.
DRAIN_TIMEOUT = 10.0
# Most fds a single control-socket read may carry (HELLO carries one; more is an error we report).
# Past this the kernel sets MSG_CTRUNC and closes nothing for us: we close what arrived.
MAX_FDS_PER_READ = 16
MAX_CLIENT_MESSAGE = protocol.MAX_CLIENT_MESSAGE
# An fd that came with the first part of a HELLO is held this long for the rest; then it is closed
# and the connection refused. (A connection may pass its own socket: held, it would never see EOF.)
HELLO_FD_TIMEOUT = 2.0
# At the fd limit (EMFILE/ENFILE on accept): stop reading the listener this long, doubling to the
# max while it lasts, so the daemon waits for fds to free up instead of spinning on accept.
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 2.0
# One accept_failed log line per this many seconds; the next one says how many were suppressed.
ACCEPT_LOG_PERIOD = 10.0

E_TOO_MANY_FDS, E_FD_LIMIT, E_FILE_REFUSED = protocol.E_TOO_MANY_FDS, protocol.E_FD_LIMIT, protocol.E_FILE_REFUSED

FRAME_ERRORS = {
    lib.LS_EFRAME_MAGIC: "bad magic (expected b'LSK1'): the pipe does not carry logsink frames",
    lib.LS_EFRAME_VERSION: "unsupported frame version or header length",
    lib.LS_EFRAME_LENGTH: "payload length is 0 or larger than the daemon's max_batch",
    lib.LS_EFRAME_RECORDS: "record count is 0 or larger than the payload length",
    lib.LS_EBATCH_TOO_BIG: "payload length is larger than the data pipe holds whole (header + payload must fit the "
                           "pipe's F_GETPIPE_SZ; over TCP, WELCOME's max_batch): send smaller batches",
    lib.LS_EBATCH_NO_NEWLINE: "the batch does not end in a newline: every batch must be whole records, each ending "
                              "in \\n; the batch was cut back off the file",
    lib.LS_EBATCH_VANISHED: "the batch's bytes left the data pipe before the daemon took them (another reader of "
                            "the pipe?); what landed was cut back off the file",
}

ERROR_CODES = (
    protocol.E_BAD_MESSAGE,
    protocol.E_BAD_VERSION,
    protocol.E_BAD_STREAM,
    protocol.E_BAD_FD,
    protocol.E_BAD_FRAME,
    protocol.E_PRODUCER_DIED,
    protocol.E_WRITE_FAILED,
    protocol.E_SHUTTING_DOWN,
    protocol.E_TOO_MANY,
    "pipe-error",
    protocol.E_INTERNAL,
    protocol.E_AUTH,
    E_TOO_MANY_FDS,
    E_FD_LIMIT,
    E_FILE_REFUSED,
    protocol.E_FORBIDDEN,
)


@dataclass
class Stream:
    id: int
    name: str
    path: str
    fd: int
    inode: tuple[int, int]
    producers: int = 0
    dirfd: int = -1      # the directory the file is opened beneath (the daemon's, or the spool dir)
    filename: str = ""   # its name there (one component: stream names cannot contain '/')
    fsync: str = "never"  # never / batch (the engine syncs each batch) / interval (a timer here)
    fsync_interval: float = 1.0
    synced_bytes: int = 0  # interval: the stream's byte counter at the last fdatasync
    interval_syncs: int = 0
    sync_timer: asyncio.TimerHandle | None = None


@dataclass
class Producer:
    id: int
    stream: Stream
    conn: "Conn | None"
    pid: int
    uid: int
    transport: str
    segment_size: int
    released: int = 0
    failed: list[list[Any]] = field(default_factory=list)
    dirty: bool = False
    removing: bool = False


class Conn:
    """One control connection: framing in, buffered writes out. At most one producer per connection."""

    def __init__(self, daemon: "Daemon", sock: socket.socket, peer: str | None = None):
        self.daemon = daemon
        self.sock = sock
        self.decoder = protocol.ControlDecoder(MAX_CLIENT_MESSAGE)
        self.fds: list[int] = []  # at most one: the fd of a HELLO still being decoded
        self.fd_timer: asyncio.TimerHandle | None = None  # bounds how long that fd is held
        self.out = bytearray()
        self.producer: Producer | None = None
        self.closed = False
        self.reading = True
        self.tcp = peer is not None
        self.peer = peer or "local"
        if self.tcp:  # no credentials over TCP: the token (if configured) is the identity
            self.pid, self.uid, self.gid = 0, -1, -1
        else:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            self.pid, self.uid, self.gid = struct.unpack("3i", creds)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self.on_readable)

    def stop_reading(self) -> None:
        """The engine owns the inbound side from now on (TCP producers after WELCOME)."""
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())

    def on_readable(self) -> None:
        fds = array.array("i")
        try:
            # CLOEXEC: a passed fd must never leak into a child the daemon might start.
            data, anc, flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS_PER_READ * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.daemon.on_conn_lost(self, f"control socket error: {exc}")
            return
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        if fds and not self._take_fds(list(fds), flags):
            return
        if not data:
            self.daemon.on_conn_lost(self, "closed" if not self.decoder.buffered else "closed mid-message")
            return
        try:
            # A TCP connection switches to batches after HELLO: decode nothing past it here.
            for msg in self.decoder.feed(data, limit=1 if self.tcp else None):
                self.daemon.on_message(self, msg)
                if self.closed:
                    return
        except protocol.ProtocolError as exc:
            self.daemon.reject(self, exc.code, exc.reason)
            return
        if self.fds and not self.decoder.buffered:
            # Every complete message is handled and none took the fd: it came with something else.
            self.daemon.reject(self, protocol.E_BAD_FD, "an fd came with a message that is not HELLO: only HELLO carries one (the data pipe's read end)")

    def _take_fds(self, fds: list[int], flags: int) -> bool:
        """Keep at most one fd, for the HELLO being decoded; close the rest now and refuse the connection.

        The kernel hands fds over with the bytes of the sendmsg that carried them; a connection that
        sends more, or sends them when no HELLO can claim them, would otherwise make the daemon hold
        them (16 a message) until it hits its fd limit. Returns False if the connection was refused."""
        why = None
        if flags & socket.MSG_CTRUNC:
            code, why = E_TOO_MANY_FDS, f"more than {MAX_FDS_PER_READ} fds in one message: HELLO carries exactly one"
        elif len(fds) > 1:
            code, why = protocol.E_BAD_FD, f"HELLO must carry exactly one fd (the data pipe's read end) with SCM_RIGHTS, got {len(fds)}"
        elif self.fds:
            code, why = E_TOO_MANY_FDS, "a second fd before the first HELLO was complete: HELLO carries exactly one"
        elif self.producer is not None or self.tcp:
            code, why = E_TOO_MANY_FDS, "an fd after HELLO: only HELLO carries one"
        if why is None:
            self.fds = fds
            self.fd_timer = self.loop.call_later(HELLO_FD_TIMEOUT, self._fd_expired)
            return True
        for fd in fds:
            os.close(fd)
        self.daemon.reject(self, code, why)
        return False

    def send(self, msg: dict[str, Any]) -> None:
        if self.closed:
            return
        self.out += protocol.encode(msg)
        self._flush()

    def _flush(self) -> None:
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.out.clear()
            return
        del self.out[:n]
        if self.out:
            self.loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        self.loop.remove_writer(self.sock.fileno())
        if not self.closed:
            self._flush()

    def claim_fds(self) -> list[int]:
        """The fd(s) that came with the HELLO being handled: theirs now, no longer held by this connection."""
        if self.fd_timer is not None:
            self.fd_timer.cancel()
            self.fd_timer = None
        fds, self.fds = self.fds, []
        return fds

    def _fd_expired(self) -> None:
        self.fd_timer = None
        if self.fds and not self.closed:
            self.daemon.reject(self, E_TOO_MANY_FDS, f"an fd was held {HELLO_FD_TIMEOUT:g}s without the rest of its HELLO: "
                                                     "send HELLO and its fd in one sendmsg")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.fd_timer is not None:
            self.fd_timer.cancel()
            self.fd_timer = None
        self.stop_reading()
        self.loop.remove_writer(self.sock.fileno())
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        if self.out:  # best effort: the last ERROR/RELEASE
            try:
                self.sock.setblocking(True)
                self.sock.settimeout(0.5)
                self.sock.sendall(self.out)
            except OSError:
                pass
        self.sock.close()


class AcceptGate:
    """What the listeners do when accept() fails: a reserve fd to shed with, a growing pause, a quiet log."""

    def __init__(self) -> None:
        self.reserve = self._open_reserve()
        self.delay = ACCEPT_BACKOFF_MIN
        self.last_log = -ACCEPT_LOG_PERIOD
        self.suppressed = 0
        self.shed_total = 0

    @staticmethod
    def _open_reserve() -> int:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1

    def shed(self, srv: socket.socket) -> bool:
        """Close the reserve fd, accept and close the newest connection, take the reserve back."""
        if self.reserve >= 0:
            os.close(self.reserve)
            self.reserve = -1
        shed = False
        try:
            sock, _ = srv.accept()
            sock.close()
            shed = True
            self.shed_total += 1
        except OSError:
            pass
        self.reserve = self._open_reserve()
        return shed

    def next_delay(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, ACCEPT_BACKOFF_MAX)
        return delay

    def succeeded(self) -> None:
        self.delay = ACCEPT_BACKOFF_MIN
        if self.reserve < 0:
            self.reserve = self._open_reserve()

    def log_failure(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self.last_log < ACCEPT_LOG_PERIOD:
            self.suppressed += 1
            return
        extra = {}
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            extra["hint"] = "raise the daemon's fd limit (LimitNOFILE=) or find who holds its connections open"
        log.error("accept_failed", error=str(exc), suppressed=self.suppressed, connections_shed=self.shed_total,
                  backoff=self.delay, **extra)
        self.last_log, self.suppressed = now, 0

    def close(self) -> None:
        if self.reserve >= 0:
            os.close(self.reserve)
            self.reserve = -1


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.socket_path = cfg.resolved_socket()
        self.dir = os.path.abspath(cfg.dir)
        self.streams: dict[str, Stream] = {}
        self.streams_by_id: dict[int, Stream] = {}
        self.producers: dict[int, Producer] = {}
        self.free_ids = list(range(cfg.max_producers - 1, -1, -1))
        self.conns: set[Conn] = set()
        self.errors = {code: 0 for code in ERROR_CODES}
        self.shutting_down = False
        self.started = time.time()
        self.engine = ffi.NULL
        self._evbuf = ffi.new("struct ls_event[]", EVENT_BATCH)
        self._all_gone: asyncio.Event | None = None
        self.accept_gate = AcceptGate()
        self.engine_failed = ""  # why the engine thread ended, once it has
        self.socket_identity: tuple[int, int] | None = None
        self.dirfd = -1
        self.lock: DirLock | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start_engine(self) -> None:
        out = ffi.new("struct ls_engine **")
        check(
            lib.ls_engine_new(ENGINE_KINDS[self.cfg.engine], self.cfg.max_streams, self.cfg.max_producers, self.cfg.max_batch, out),
            f"starting the {self.cfg.engine} engine",
        )
        self.engine = out[0]
        self.engine_name = ENGINE_NAMES[lib.ls_engine_kind(self.engine)]
        self.fallback_reason = ffi.string(lib.ls_engine_fallback_reason(self.engine)).decode()
        self.forward = ForwardManager(self.cfg.forwards, self._state_dir(), self.engine, self.cfg.file_mode, self.cfg.dir_mode)

    def _state_dir(self) -> tuple[str, int]:
        """The forward state dir (path, fd): <dir>/.state beneath the dir fd, or the configured one. -1 = none needed."""
        if not self.cfg.forwards:
            return self.cfg.state_dir or os.path.join(self.dir, ".state"), -1
        if not self.cfg.state_dir:
            path = os.path.join(self.dir, ".state")
            return path, dir_beneath(self.dirfd, ".state", self.cfg.dir_mode, path)
        path = os.path.abspath(self.cfg.state_dir)
        make_dirs(path, self.cfg.dir_mode)
        return path, open_dir(path)

    def open_directory(self) -> None:
        """Create --dir (with dir_mode), hold an fd on it, and take its lock: one daemon per directory."""
        make_dirs(self.dir, self.cfg.dir_mode)
        self.dirfd = open_dir(self.dir)
        self.lock = DirLock(self.dirfd, self.dir, self.cfg.file_mode)

    def open_listener(self) -> socket.socket:
        path = self.socket_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "a regular file" if stat.S_ISREG(st.st_mode) else "not a socket"
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket ({kind}): logsink removes only a stale socket "
                                            "of its own; remove it yourself or pass another --socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(2.0)  # a full backlog would otherwise block the connect
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # a socket nobody listens on: a daemon that is gone
            except OSError as exc:  # busy (EAGAIN, timeout) or unreachable: someone may be there; leave it
                raise OSError(errno.EADDRINUSE, f"{path} is a socket that did not refuse a connection ({exc}): another daemon may be "
                                                "listening there; stop it or pass another --socket") from None
            else:
                raise OSError(errno.EADDRINUSE, f"another logsink daemon is listening on {path}; stop it or pass --socket")
            finally:
                probe.close()
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            make_dirs(parent, self.cfg.dir_mode)
        gid = resolve_group(self.cfg.socket_group)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # bind creates the socket file with the umask's mode: make that private, then set ours.
        old = os.umask(0o177)
        try:
            srv.bind(path)
        finally:
            os.umask(old)
        try:
            if gid >= 0:
                os.chown(path, -1, gid)
            os.chmod(path, self.cfg.socket_mode)
            st = os.lstat(path)
            self.socket_identity = (st.st_dev, st.st_ino)
        except OSError:
            srv.close()
            os.unlink(path)
            raise
        srv.listen(512)
        srv.setblocking(False)
        return srv

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.open_directory()
        self.start_engine()
        if self.fallback_reason and self.cfg.engine == "auto":
            log.warning("engine_fallback", engine=self.engine_name, reason=self.fallback_reason)
        srv = self.open_listener()
        self.listener = srv
        self.tcp_listeners = [self.open_tcp_listener(addr) for addr in self.cfg.listen]
        stop = asyncio.Event()
        loop.add_reader(srv.fileno(), self._accept)
        for tl in self.tcp_listeners:
            loop.add_reader(tl.fileno(), self._accept_tcp, tl)
        loop.add_reader(lib.ls_engine_notify_fd(self.engine), self._on_engine_events)
        for name in self.forward.stream_names():  # replay spools left by the last run without waiting for a producer
            try:
                self._stream(name)
            except protocol.ProtocolError as exc:
                self.errors[exc.code] = self.errors.get(exc.code, 0) + 1
                log.error("stream_refused", stream=name, code=exc.code, reason=exc.reason)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reopen_files)
        self._log_access_policy()
        log.info("listening", socket=self.socket_path, dir=self.dir, engine=self.engine_name, version=__version__, pid=os.getpid(),
                 tcp=[f"tcp://{t.getsockname()[0]}:{t.getsockname()[1]}" for t in self.tcp_listeners])
        await stop.wait()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        self.shutting_down = True
        self.forward.stop_blocking()
        loop.remove_reader(self.listener.fileno())
        self.listener.close()
        for tl in self.tcp_listeners:
            loop.remove_reader(tl.fileno())
            tl.close()
        try:
            st = os.lstat(self.socket_path)
            if (st.st_dev, st.st_ino) == self.socket_identity:  # ours, not something put there since
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        log.info("shutting_down", producers=len(self.producers), grace=self.cfg.shutdown_grace)
        for p in self.producers.values():
            if p.conn:
                p.conn.send({"t": protocol.SHUTDOWN})
        await self._wait_producers_gone(self.cfg.shutdown_grace)
        for p in list(self.producers.values()):
            self._remove(p, drain=True)
        if not await self._wait_producers_gone(DRAIN_TIMEOUT):
            log.error("drain_timeout", producers=len(self.producers))
        await self.forward.close()
        for conn in list(self.conns):
            conn.close()
        loop.remove_reader(lib.ls_engine_notify_fd(self.engine))
        totals = self.counters_total()
        lib.ls_engine_free(self.engine)
        self.engine = ffi.NULL
        for s in self.streams.values():
            if s.sync_timer is not None:
                s.sync_timer.cancel()
            if s.fsync != "never":  # what the last interval (or a failed batch sync) left unsynced
                try:
                    os.fdatasync(s.fd)
                except OSError as exc:
                    log.error("fsync_failed", stream=s.name, file=s.path, error=str(exc))
            os.close(s.fd)
        self.accept_gate.close()
        if self.lock is not None:
            self.lock.close()
        os.close(self.dirfd)
        log.info("stopped", **totals)

    async def _wait_producers_gone(self, timeout: float) -> bool:
        if not self.producers:
            return True
        self._all_gone = asyncio.Event()
        try:
            await asyncio.wait_for(self._all_gone.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._all_gone = None

    # -- connections ------------------------------------------------------------------------------
    def open_tcp_listener(self, address: str) -> socket.socket:
        host, port = parse_tcp_address(address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind((host, port))
        except OSError as exc:
            srv.close()
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
        srv.listen(512)
        srv.setblocking(False)
        return srv

    def _accept_tcp(self, srv: socket.socket) -> None:
        try:
            sock, addr = srv.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._accept_failed(srv, exc, lambda: self._accept_tcp(srv))
            return
        self.accept_gate.succeeded()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conns.add(Conn(self, sock, peer=f"{addr[0]}:{addr[1]}"))

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._accept_failed(self.listener, exc, self._accept)
            return
        self.accept_gate.succeeded()
        sock.setblocking(False)
        self.conns.add(Conn(self, sock))

    def _accept_failed(self, srv: socket.socket, exc: OSError, callback: Any) -> None:
        """accept() failed with the connection still queued: never retry at once (that is a busy loop).

        Out of fds (EMFILE/ENFILE): spend the reserve fd to accept the newest connection and close
        it (its client sees EOF instead of hanging), then stop reading this listener for a while."""
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            self.errors[E_FD_LIMIT] += 1
            self.accept_gate.shed(srv)
        self.accept_gate.log_failure(exc)
        if self.shutting_down:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(srv.fileno())
        loop.call_later(self.accept_gate.next_delay(), self._resume_accept, srv, callback)

    def _resume_accept(self, srv: socket.socket, callback: Any) -> None:
        if not self.shutting_down and srv.fileno() >= 0:
            asyncio.get_running_loop().add_reader(srv.fileno(), callback)

    def reject(self, conn: Conn, code: str, reason: str, **fields: Any) -> None:
        """Count, log and answer a protocol violation, then close the offending connection only."""
        self.errors[code] = self.errors.get(code, 0) + 1
        log.warning("producer_rejected", code=code, reason=reason, pid=conn.pid, uid=conn.uid, peer=conn.peer, **fields)
        conn.send(protocol.error(code, reason))
        self._drop_conn(conn, drain=False)

    def on_conn_lost(self, conn: Conn, why: str) -> None:
        if why != "closed":
            log.info("connection_lost", pid=conn.pid, why=why)
        self._drop_conn(conn, drain=True)

    def _drop_conn(self, conn: Conn, drain: bool) -> None:
        p = conn.producer
        if p is not None:
            p.conn = None
            self._remove(p, drain)
        conn.close()
        self.conns.discard(conn)

    def _remove(self, p: Producer, drain: bool) -> None:
        if not p.removing:
            p.removing = True
            lib.ls_engine_remove_producer(self.engine, p.id, 1 if drain else 0)

    def on_message(self, conn: Conn, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == protocol.HELLO:
            self._hello(conn, msg)
        elif kind == protocol.STATUS:
            why = self._status_refusal(conn)
            if why:
                self.reject(conn, protocol.E_FORBIDDEN, why, request="status", gid=conn.gid)
            else:
                conn.send({"t": protocol.STATUS, "status": self.status()})
        else:
            self.reject(conn, protocol.E_BAD_MESSAGE, f"{kind!r} is not a message a client may send")

    def _hello(self, conn: Conn, msg: dict[str, Any]) -> None:
        fds = conn.claim_fds()
        try:
            if conn.producer is not None:
                raise protocol.ProtocolError(protocol.E_BAD_MESSAGE, "HELLO sent twice on one connection")
            if self.shutting_down:
                raise protocol.ProtocolError(protocol.E_SHUTTING_DOWN, "the daemon is shutting down and takes no new producers")
            if self.engine_failed:
                raise protocol.ProtocolError(protocol.E_INTERNAL, f"the daemon's engine failed ({self.engine_failed}): it takes no producers")
            if conn.tcp:
                self._check_tcp_hello(conn, msg)
            else:
                if msg["transport"] not in protocol.LOCAL_TRANSPORTS:
                    raise protocol.ProtocolError(protocol.E_BAD_MESSAGE, f"transport {msg['transport']!r} is for TCP; on the local socket use one of {protocol.LOCAL_TRANSPORTS}")
                if len(fds) != 1:
                    raise protocol.ProtocolError(protocol.E_BAD_FD, f"HELLO must carry exactly one fd (the data pipe's read end) with SCM_RIGHTS, got {len(fds)}")
            why = self._write_refusal(conn, msg["stream"])
            if why:
                raise protocol.ProtocolError(protocol.E_FORBIDDEN, why)
            if not self.free_ids:
                raise protocol.ProtocolError(protocol.E_TOO_MANY, f"all {self.cfg.max_producers} producer slots are in use")
            stream = self._stream(msg["stream"])
            pid = self.free_ids.pop()
            if conn.tcp:
                fds = [os.dup(conn.sock.fileno())]  # the engine reads (and closes) this one; we write on ours
                ret = lib.ls_engine_add_socket_producer(self.engine, pid, stream.id, fds[0])
            else:
                ret = lib.ls_engine_add_producer(self.engine, pid, stream.id, fds[0])
            if ret < 0:
                self.free_ids.append(pid)
                if -ret == errno.ENOTTY:
                    raise protocol.ProtocolError(protocol.E_BAD_FD, "the fd sent with HELLO is not a pipe: send the read end of the data pipe")
                if -ret == errno.EBADF:
                    raise protocol.ProtocolError(protocol.E_BAD_FD, "the fd sent with HELLO is a pipe's write end: send its read end")
                check(ret, "adding producer")
            fds.pop()  # the engine owns it now
        except protocol.ProtocolError as exc:
            for fd in fds:
                os.close(fd)
            self.reject(conn, exc.code, exc.reason, stream=msg["stream"], gid=conn.gid)
            return
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            self.errors[protocol.E_INTERNAL] += 1
            log.error("hello_failed", stream=msg.get("stream"), error=str(exc))
            conn.send(protocol.error(protocol.E_INTERNAL, str(exc)))
            self._drop_conn(conn, drain=False)
            return
        seg = msg.get("segment_size")
        p = Producer(
            id=pid, stream=stream, conn=conn, pid=conn.pid, uid=conn.uid, transport=msg["transport"],
            segment_size=seg if isinstance(seg, int) and seg > 0 else 0,
        )
        self.producers[pid] = p
        stream.producers += 1
        conn.producer = p
        if conn.tcp:
            conn.stop_reading()
        # Batches are written only once whole in the pipe (or TCP stage): tell the producer the most it
        # may send. A local client also sizes batches to its own pipe.
        max_batch = lib.ls_engine_producer_max_batch(self.engine, pid)
        conn.send(protocol.welcome(pid, self.engine_name, max_batch=max_batch if max_batch > 0 else self.cfg.max_batch))
        log.info("producer_joined", producer=pid, stream=stream.name, pid=conn.pid, uid=conn.uid, transport=p.transport, peer=conn.peer)

    # -- access control (logsink/access.py; docs/security.md "Who may write where") ----------------
    def _write_refusal(self, conn: Conn, stream: str) -> str | None:
        """Why this peer may not write ``stream``, or None."""
        rules = self.cfg.access_rules
        if conn.tcp:
            return access.admit_tcp(rules, stream)
        if rules.trusted(conn.uid) or not rules.write_rules:
            return None  # admitted whatever its groups: spare the group database lookup
        return access.admit(rules, stream, conn.uid, access.peer_gids(conn.uid, conn.gid))

    def _status_refusal(self, conn: Conn) -> str | None:
        """Why this peer may not read status, or None."""
        rules = self.cfg.access_rules
        if conn.tcp or rules.trusted(conn.uid):
            return access.may_read_status(rules, None if conn.tcp else conn.uid, frozenset())
        return access.may_read_status(rules, conn.uid, access.peer_gids(conn.uid, conn.gid))

    def _log_access_policy(self) -> None:
        rules = self.cfg.access_rules
        if not rules.write_rules:
            log.info("access_open", detail="no write rules: every local uid that can connect to the socket may write every stream")
        else:
            log.info("access_rules", stream_tables=sorted(rules.streams), default_table=rules.default is not None,
                     uid_grants=len(rules.uid_streams), gid_grants=len(rules.gid_streams), trust_root=rules.trust_root)

    def _check_tcp_hello(self, conn: Conn, msg: dict[str, Any]) -> None:
        if msg["transport"] not in protocol.TCP_TRANSPORTS:
            raise protocol.ProtocolError(protocol.E_BAD_MESSAGE, f"transport {msg['transport']!r} is local-only; over TCP use one of {protocol.TCP_TRANSPORTS}")
        token = self.cfg.auth_token
        if token:
            given = msg.get("token")
            # compare_digest: the time taken does not tell how much of a guess was right.
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode()):
                raise protocol.ProtocolError(protocol.E_AUTH, "missing or wrong token (set LOGSINK_TOKEN to the daemon's auth_token)")
        if conn.decoder.buffered:
            raise protocol.ProtocolError(protocol.E_BAD_MESSAGE, "data sent before WELCOME: wait for WELCOME, then send frames")
        conn.pid = msg["pid"]

    # -- streams and files ------------------------------------------------------------------------
    def _open_output(self, dirfd: int, name: str, path: str) -> tuple[int, int, tuple[int, int]]:
        """Open (create) an output file without O_APPEND (splice refuses it), repair a torn tail.

        Opened beneath ``dirfd`` with no link followed and only if it is a regular file with one
        link (logsink/files.py): a planted symlink, FIFO or hard link raises FileRefused before
        anything is written or cut."""
        fd = open_beneath(dirfd, name, os.O_RDWR | os.O_CREAT, self.cfg.file_mode, where=path)  # RDWR: the tail check reads
        size = ffi.new("uint64_t *")
        try:
            cut = check(lib.ls_repair_tail(fd, size), "checking the tail", path)
        except OSError:
            os.close(fd)
            raise
        if cut:
            log.warning("torn_tail_repaired", file=path, bytes_cut=cut)
        st = os.fstat(fd)
        return fd, size[0], (st.st_dev, st.st_ino)

    def _stream(self, name: str) -> Stream:
        s = self.streams.get(name)
        if s is not None:
            return s
        if len(self.streams) >= self.cfg.max_streams:
            raise protocol.ProtocolError(protocol.E_TOO_MANY, f"all {self.cfg.max_streams} stream slots are in use")
        filename = protocol.validate_stream_name(name) + ".log"
        dirfd, filename, path = self.forward.output_location(name, (self.dirfd, filename, os.path.join(self.dir, filename)))
        try:
            fd, size, inode = self._open_output(dirfd, filename, path)
        except FileRefused as exc:
            raise protocol.ProtocolError(E_FILE_REFUSED, f"stream {name!r} cannot be written: {exc.strerror}") from None
        sid = len(self.streams)
        check(lib.ls_engine_set_stream(self.engine, sid, fd, size), "registering the stream")
        policy, interval = self.cfg.stream_fsync(name)
        s = Stream(id=sid, name=name, path=path, fd=fd, inode=inode, dirfd=dirfd, filename=filename, fsync=policy,
                   fsync_interval=interval, synced_bytes=0)
        if policy == "batch":
            check(lib.ls_engine_set_stream_sync(self.engine, sid, lib.LS_SYNC_BATCH), "setting fsync=batch")
        elif policy == "interval":
            s.sync_timer = asyncio.get_running_loop().call_later(interval, self._sync_tick, s)
        self.streams[name] = s
        self.streams_by_id[sid] = s
        self.forward.stream_opened(name, sid, fd, size)
        log.info("stream_opened", stream=name, file=path, offset=size)
        return s

    def reopen_files(self) -> None:
        """SIGHUP: after logrotate moved a file away, start a new one at the configured path."""
        if self.engine_failed:
            log.error("reopen_skipped", reason=f"the engine failed ({self.engine_failed}): restart the daemon")
            return
        for s in self.streams.values():
            try:
                st = os.stat(s.filename, dir_fd=s.dirfd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == s.inode:
                    continue
            except FileNotFoundError:
                pass
            try:
                fd, size, inode = self._open_output(s.dirfd, s.filename, s.path)
            except OSError as exc:
                log.error("reopen_failed", stream=s.name, file=s.path, error=str(exc))
                continue
            check(lib.ls_engine_set_stream(self.engine, s.id, fd, size), "switching the stream's file")
            self.forward.stream_reopened(s.id, fd, size)
            os.close(s.fd)
            s.fd, s.inode = fd, inode
            log.info("stream_reopened", stream=s.name, file=s.path)

    def _sync_tick(self, s: Stream) -> None:
        """fsync=interval: fdatasync the stream's file (in a worker thread) if it grew since the last one."""
        s.sync_timer = None
        if self.shutting_down or self.engine == ffi.NULL:
            return
        written = self._counters(lib.ls_engine_stream_counters, s.id)["bytes"]
        loop = asyncio.get_running_loop()
        if written == s.synced_bytes:
            s.sync_timer = loop.call_later(s.fsync_interval, self._sync_tick, s)
            return
        fd = os.dup(s.fd)  # rotation may close s.fd while the thread syncs

        def done(fut: asyncio.Future) -> None:
            os.close(fd)
            exc = fut.exception()
            if exc is not None:
                log.error("fsync_failed", stream=s.name, file=s.path, error=str(exc))
            else:
                s.synced_bytes = written
                s.interval_syncs += 1
            if not self.shutting_down:
                s.sync_timer = loop.call_later(s.fsync_interval, self._sync_tick, s)

        loop.run_in_executor(None, os.fdatasync, fd).add_done_callback(done)

    # -- engine events ----------------------------------------------------------------------------
    def _on_engine_events(self) -> None:
        touched: list[Producer] = []
        while True:
            n = lib.ls_engine_poll_events(self.engine, self._evbuf, EVENT_BATCH)
            for i in range(n):
                ev = self._evbuf[i]
                kind = ev.kind
                if kind == lib.LS_EV_ENGINE_FAILED:
                    self._engine_failed(ev.err)
                    continue
                p = self.producers.get(ev.producer_id)
                if p is None:
                    continue
                if kind == lib.LS_EV_STREAM_COPY:
                    log.warning("stream_copy_mode", stream=p.stream.name, file=p.stream.path, error=os.strerror(-ev.err),
                                detail="the file refuses splice (its filesystem has no splice_write): batches move by read + pwrite")
                    continue
                if kind == lib.LS_EV_HOLE_CLOSED:
                    log.warning("file_truncated_under_batch", stream=p.stream.name, file=p.stream.path, seq=ev.seq,
                                hole_bytes=ev.bytes, detail="the batch was moved down to the file's new end (copytruncate?)")
                    continue
                if kind == lib.LS_EV_BATCH_DONE:
                    p.released = ev.seq
                elif kind == lib.LS_EV_BATCH_FAILED:
                    reason = os.strerror(-ev.err) if ev.err < 0 else "write failed"
                    p.failed.append([ev.seq, protocol.E_WRITE_FAILED, reason])
                    p.released = ev.seq
                    self.errors[protocol.E_WRITE_FAILED] += 1
                    log.error("batch_write_failed", stream=p.stream.name, file=p.stream.path, seq=ev.seq, producer=p.id, error=reason, bytes=ev.bytes)
                else:
                    self._producer_ended(p, ev)
                    continue
                if not p.dirty:
                    p.dirty = True
                    touched.append(p)
            if n < EVENT_BATCH:
                break
        if lib.ls_engine_events_lost(self.engine):
            touched += self._reconcile_lost_events()
        for p in touched:
            p.dirty = False
            if p.conn:
                p.conn.send(protocol.release(p.released, p.failed))
            p.failed = []
        self.forward.poll()

    def _reconcile_lost_events(self) -> list[Producer]:
        """The engine could not queue some events (out of memory): rebuild from its counters, so no
        producer waits forever for a RELEASE or for the end of its connection."""
        log.error("engine_events_lost", detail="out of memory in the engine; releases rebuilt from its counters")
        self.errors[protocol.E_INTERNAL] += 1
        touched = []
        c = ffi.new("struct ls_counters *")
        for p in list(self.producers.values()):
            ended = lib.ls_engine_producer_counters(self.engine, p.id, c) == -errno.ENOENT
            if ended:  # its end was among the lost events: release what landed, then end it
                p.released = max(p.released, c.last_seq)
                ev = ffi.new("struct ls_event *", {"kind": lib.LS_EV_PRODUCER_EOF, "producer_id": p.id})
                self._producer_ended(p, ev)
                continue
            if c.last_seq > p.released:
                p.released = c.last_seq
                if not p.dirty:
                    p.dirty = True
                    touched.append(p)
        return touched

    def _engine_failed(self, err: int) -> None:
        """The engine thread ended on an error: nothing moves any more. Say so loudly, refuse new
        producers, and end every producer with a clear ERROR instead of leaving it waiting."""
        reason = ffi.string(lib.ls_engine_fallback_reason(self.engine)).decode() or os.strerror(-err)
        self.engine_failed = reason
        self.errors[protocol.E_INTERNAL] += 1
        log.critical("engine_failed", engine=self.engine_name, reason=reason,
                     detail="no batch moves any more: restart the daemon (producers reconnect and resend)")
        for p in list(self.producers.values()):
            conn = p.conn
            if conn is not None:
                conn.send(protocol.release(p.released, p.failed))
                conn.send(protocol.error(protocol.E_INTERNAL, f"the daemon's {self.engine_name} engine failed ({reason}); "
                                                              "your unreleased batches were not written"))
                p.conn, conn.producer = None, None
                conn.close()
                self.conns.discard(conn)
            # No engine event will ever end it: forget it here (ls_engine_free closes its pipe).
            p.stream.producers -= 1
            del self.producers[p.id]
        if self._all_gone is not None:
            self._all_gone.set()
    def _producer_ended(self, p: Producer, ev: Any) -> None:
        kind = ev.kind
        conn = p.conn
        if kind == lib.LS_EV_PRODUCER_DIED:
            self.errors[protocol.E_PRODUCER_DIED] += 1
            log.warning("producer_died_mid_batch", producer=p.id, pid=p.pid, stream=p.stream.name, discarded_bytes=ev.bytes)
            if conn:
                conn.send(protocol.error(protocol.E_PRODUCER_DIED, f"the pipe closed mid-batch; {ev.bytes} bytes of a partial batch were discarded"))
        elif kind == lib.LS_EV_BAD_FRAME:
            reason = FRAME_ERRORS.get(ev.err, f"invalid frame header ({ev.err})")
            self.errors[protocol.E_BAD_FRAME] += 1
            log.warning("producer_rejected", code=protocol.E_BAD_FRAME, reason=reason, producer=p.id, pid=p.pid, stream=p.stream.name)
            if conn:
                conn.send(protocol.error(protocol.E_BAD_FRAME, f"frame header rejected: {reason}"))
        elif kind == lib.LS_EV_PRODUCER_ERROR:
            self.errors["pipe-error"] += 1
            log.error("producer_pipe_error", producer=p.id, pid=p.pid, error=os.strerror(-ev.err))
        if conn:
            conn.send(protocol.release(p.released, p.failed))
            p.failed, p.dirty, p.conn = [], False, None  # said once: the touched loop must not repeat it
            conn.producer = None
            # A TCP connection is its producer's data stream: when that ends, so does the connection.
            if conn.tcp or kind != lib.LS_EV_PRODUCER_EOF and kind != lib.LS_EV_PRODUCER_REMOVED:
                conn.close()
                self.conns.discard(conn)
        p.stream.producers -= 1
        del self.producers[p.id]
        self.free_ids.append(p.id)
        if not self.producers and self._all_gone is not None:
            self._all_gone.set()

    # -- status -----------------------------------------------------------------------------------
    def _counters(self, fn: Any, ident: int | None = None) -> dict[str, int]:
        c = ffi.new("struct ls_counters *")
        if ident is None:
            fn(self.engine, c)
        else:
            fn(self.engine, ident, c)
        return {k: getattr(c, k) for k in ("bytes", "records", "batches", "bytes_spliced", "bytes_copied", "header_bytes", "errors", "offset",
                                           "last_seq", "holes_closed", "syncs")}

    def counters_total(self) -> dict[str, int]:
        c = self._counters(lib.ls_engine_total_counters)
        del c["offset"], c["last_seq"], c["holes_closed"], c["syncs"]
        return c

    def status(self) -> dict[str, Any]:
        streams = {}
        for s in self.streams.values():
            c = self._counters(lib.ls_engine_stream_counters, s.id)
            streams[s.name] = {
                "file": s.path, "bytes": c["bytes"], "records": c["records"], "batches": c["batches"],
                "producers": s.producers, "bytes_spliced": c["bytes_spliced"], "bytes_copied": c["bytes_copied"],
                "errors": c["errors"], "size": c["offset"], "holes_closed": c["holes_closed"],
                "fsync": s.fsync, "syncs": c["syncs"] + s.interval_syncs,
            }
        producers = []
        for p in self.producers.values():
            c = self._counters(lib.ls_engine_producer_counters, p.id)
            queued = c["offset"]
            pinned = -(-queued // p.segment_size) if p.segment_size and p.transport == "vmsplice" else 0
            producers.append({
                "id": p.id, "stream": p.stream.name, "pid": p.pid, "uid": p.uid, "transport": p.transport,
                "batches": c["batches"], "bytes": c["bytes"], "records": c["records"], "released": p.released,
                "pipe_bytes": queued, "pinned_segments": pinned,
            })
        return {
            "version": __version__, "engine": self.engine_name, "fallback_reason": self.fallback_reason,
            "engine_failed": self.engine_failed,
            "pid": os.getpid(), "uptime": round(time.time() - self.started, 3), "dir": self.dir,
            "socket": self.socket_path, "totals": self.counters_total(), "errors": dict(self.errors),
            "streams": streams, "producers": producers,
            "forwards": self.forward.status(),
        }


def parse_tcp_address(address: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` (``[v6]:PORT`` for IPv6; no host = loopback) -> (host, port)."""
    if not address.startswith("tcp://"):
        raise ValueError(f"address {address!r} must look like tcp://HOST:PORT")
    rest = address[len("tcp://"):]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} must look like tcp://HOST:PORT with a port in 1..65535")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def serve(cfg: Config) -> int:
    return asyncio.run(Daemon(cfg).run())
