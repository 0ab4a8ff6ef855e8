"""The daemon's control plane (asyncio): accepts producers, routes streams, relays the engine's releases, answers status.

Payload bytes never enter this package: producers' pipes go straight to the native engine
(logsink._native), which moves batches into the stream files and reports events; this module
turns those events into RELEASE messages and counters. Its parts: ``conn`` (a connection's
transport and its place in ``protocol.CONN_TRANSITIONS``), ``admission`` (HELLO, a pure function),
``streams`` (files), ``status``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import signal
import socket
import stat
import time
from typing import Any

import structlog

from logsink import protocol
from logsink._native import ENGINE_KINDS, ENGINE_NAMES, check, ffi, lib
from logsink._version import __version__
from logsink.config import SHM_WRITES, Config, resolve_group
from logsink.daemon import activation
from logsink.daemon import status as status_report
from logsink.daemon.admission import DaemonFacts, admit_hello, status_refusal
from logsink.daemon.conn import AcceptGate, Conn, Producer
from logsink.daemon.limits import RateLimiter
from logsink.daemon.notify import SystemdNotifier
from logsink.daemon.refusals import FRAME_ERRORS, pipe_size_of, raise_add_refusal
from logsink.daemon.streams import StreamTable
from logsink.files import DirLock, dir_beneath, make_dirs, open_dir
from logsink.forward import ForwardManager
from logsink.protocol import ConnEvent, ConnState, parse_tcp_address

log = structlog.get_logger("logsink.daemon")

# Events drained per call into the engine; a full buffer just means another call.
EVENT_BATCH = 512
# After the grace period, producers still connected get their pipes drained; this bounds that.
DRAIN_TIMEOUT = 10.0
E_TOO_MANY_FDS, E_FD_LIMIT, E_FILE_REFUSED = protocol.E_TOO_MANY_FDS, protocol.E_FD_LIMIT, protocol.E_FILE_REFUSED

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


class Daemon:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.socket_path = cfg.resolved_socket()
        self.dir = os.path.abspath(cfg.dir)
        self.streams: StreamTable  # set by start_engine
        self.producers: dict[int, Producer] = {}
        self.free_ids = list(range(cfg.max_producers - 1, -1, -1))
        self.conns: set[Conn] = set()
        self.errors = {code: 0 for code in ERROR_CODES}
        self.small_pipes = 0  # pipe producers admitted with a pipe smaller than their segment
        self.releases_by_engine = self.releases_by_daemon = 0  # who sent each RELEASE (status)
        self.rates = status_report.Rates()
        self.metrics: Any = None  # MetricsServer with --metrics
        self.small_pipe_uids: set[int] = set()
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
        self.notify = SystemdNotifier()  # reads (and unsets) $NOTIFY_SOCKET: a no-op outside systemd

    # -- lifecycle --------------------------------------------------------------------------------
    def start_engine(self) -> None:
        out = ffi.new("struct ls_engine **")
        check(
            lib.ls_engine_new(ENGINE_KINDS[self.cfg.engine], self.cfg.max_streams, self.cfg.max_producers, self.cfg.max_batch, out),
            f"starting the {self.cfg.engine} engine",
        )
        self.engine = out[0]
        check(lib.ls_engine_set_shm_write(self.engine, SHM_WRITES.index(self.cfg.shm_write)), "shm_write")
        self.engine_name = ENGINE_NAMES[lib.ls_engine_kind(self.engine)]
        self.fallback_reason = ffi.string(lib.ls_engine_fallback_reason(self.engine)).decode()
        self.forward = ForwardManager(self.cfg.forwards, self._state_dir(), self.engine, self.cfg.file_mode, self.cfg.dir_mode)
        self.streams = StreamTable(self.cfg, self.engine, self.dirfd, self.dir, self.forward)
        self.limits = RateLimiter(self.engine, self.cfg, self.free_ids)

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
        if self.cfg.metrics:  # before the control socket: a metrics address that cannot be bound fails the start
            from logsink.daemon.metrics import MetricsServer  # prometheus-client only when asked for

            self.metrics = MetricsServer(self.status)
            await self.metrics.start(self.cfg.metrics)
        activated = activation.take()  # systemd's sockets (logsink.socket), if it passed any
        if activated.control is not None:
            srv = activated.control
            name = srv.getsockname()  # systemd owns the file: we neither chmod nor unlink it
            self.socket_path = name if isinstance(name, str) else "@" + name[1:].decode(errors="replace")  # abstract
        else:
            srv = self.open_listener()
        self.listener = srv
        self.tcp_listeners = activated.tcp + [self.open_tcp_listener(addr) for addr in self.cfg.listen]
        if activated.any:
            log.info("socket_activation", control=self.socket_path if activated.control is not None else None,
                     tcp=[f"tcp://{t.getsockname()[0]}:{t.getsockname()[1]}" for t in activated.tcp], names=activated.names)
        stop = asyncio.Event()
        loop.add_reader(srv.fileno(), self._accept)
        for tl in self.tcp_listeners:
            loop.add_reader(tl.fileno(), self._accept_tcp, tl)
        loop.add_reader(lib.ls_engine_notify_fd(self.engine), self._on_engine_events)
        for name in self.forward.stream_names():  # replay spools left by the last run without waiting for a producer
            try:
                self.streams.get(name)
            except protocol.ProtocolError as exc:
                self.errors[exc.code] = self.errors.get(exc.code, 0) + 1
                log.error("stream_refused", stream=name, code=exc.code, reason=exc.reason)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reopen_files)
        self._log_access_policy()
        log.info("listening", socket=self.socket_path, dir=self.dir, engine=self.engine_name, version=__version__, pid=os.getpid(),
                 tcp=[f"tcp://{t.getsockname()[0]}:{t.getsockname()[1]}" for t in self.tcp_listeners])
        self.notify.start(loop, self._notify_status, self._engine_alive)  # READY=1: the socket accepts
        self._sample_rates()
        await stop.wait()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        self.notify.stopping()
        self.shutting_down = self.streams.stopping = True
        self.forward.stop_blocking()
        loop.remove_reader(self.listener.fileno())
        self.listener.close()
        for tl in self.tcp_listeners:
            loop.remove_reader(tl.fileno())
            tl.close()
        try:
            if self.socket_identity is not None:  # a socket systemd passed (maybe abstract) is not ours to remove
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
        await self.limits.close(self.streams)  # the last window's suppressed lines land before the engine goes
        await self.forward.close()
        if self.metrics is not None:
            await self.metrics.close()  # before the engine goes: a scrape reads its counters
        for conn in list(self.conns):
            conn.close()
        loop.remove_reader(lib.ls_engine_notify_fd(self.engine))
        totals = self.counters_total()
        self.notify.close()
        lib.ls_engine_free(self.engine)
        self.engine = ffi.NULL
        self.streams.close()
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
        host, port = parse_tcp_address(address, listen=True)
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
            return
        try:
            conn.step(ConnEvent.STATUS if kind == protocol.STATUS else ConnEvent.OTHER, kind)
        except protocol.ProtocolError as exc:
            self.reject(conn, exc.code, exc.reason)
            return
        why = status_refusal(self.cfg.access_rules, conn.facts())
        if why:
            self.reject(conn, protocol.E_FORBIDDEN, why, request="status", gid=conn.gid)
        else:
            conn.send({"t": protocol.STATUS, "status": self.status()})

    def _hello(self, conn: Conn, msg: dict[str, Any]) -> None:
        fds = conn.claim_fds()
        try:
            conn.step(ConnEvent.HELLO)  # HELLO once
            facts = DaemonFacts(rules=self.cfg.access_rules, free_slots=len(self.free_ids), max_producers=self.cfg.max_producers,
                                auth_token=self.cfg.auth_token, shutting_down=self.shutting_down, engine_failed=self.engine_failed)
            admitted = admit_hello(msg, conn.facts(len(fds)), facts)
            if conn.tcp:
                conn.pid = admitted.pid  # no SO_PEERCRED over TCP: the pid it reports
            stream = self.streams.get(admitted.stream)
            pid = self.free_ids.pop()
            pipe_size = 0 if conn.tcp else pipe_size_of(fds[0])
            if conn.tcp:
                fds = [os.dup(conn.sock.fileno())]  # the engine reads (and closes) this one; we write on ours
                ret = lib.ls_engine_add_socket_producer(self.engine, pid, stream.id, fds[0])
            elif admitted.transport == "shm":  # the engine maps the arena; we close our fd of it below
                ret = lib.ls_engine_add_shm_producer(self.engine, pid, stream.id, fds[0], fds[1], self.cfg.max_arena)
            else:
                ret = lib.ls_engine_add_producer(self.engine, pid, stream.id, fds[0])
            if ret < 0:
                self.free_ids.append(pid)
                raise_add_refusal(ret, self.cfg.max_arena)
            fds.pop(0)  # the engine owns the pipe now (an arena fd left in fds is closed below)
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
        for fd in fds:
            os.close(fd)  # shm: the arena stays mapped by the engine
        p = Producer(id=pid, stream=stream, conn=conn, pid=conn.pid, uid=conn.uid, transport=admitted.transport,
                     segment_size=admitted.segment_size, pipe_size=pipe_size)
        self._check_pipe_size(p)
        self.producers[pid] = p
        try:
            self.limits.attach(p)  # before WELCOME: no batch of it can come earlier
        except OSError as exc:
            log.error("rate_limit_not_applied", producer=pid, stream=stream.name, error=str(exc))
        stream.producers += 1
        conn.producer = p
        conn.step(ConnEvent.WELCOME_TCP if conn.tcp else ConnEvent.WELCOME)  # TCP: the engine reads frames from here on
        # Batches are written only once whole in the pipe (or TCP stage): tell the producer the most it
        # may send. A local client also sizes batches to its own pipe.
        max_batch = lib.ls_engine_producer_max_batch(self.engine, pid)
        if not conn.tcp:
            self._engine_answers(p, conn)  # held until WELCOME is out: no RELEASE may overtake it
        conn.send(protocol.welcome(pid, self.engine_name, max_batch=max_batch if max_batch > 0 else self.cfg.max_batch))
        log.info("producer_joined", producer=pid, stream=stream.name, pid=conn.pid, uid=conn.uid, transport=p.transport, peer=conn.peer)

    def _engine_answers(self, p: Producer, conn: Conn) -> None:
        """Let the engine send RELEASE for p's landed batches itself, from its thread: a flush() then waits
        for no asyncio turn. Our own messages to p go through the engine from now on (conn.sender), so
        frames never interleave. Local producers only: an AF_UNIX send of a RELEASE is whole or nothing."""
        ctl = os.dup(conn.sock.fileno())
        if lib.ls_engine_set_release_fd(self.engine, p.id, ctl, 1) < 0:  # held: our next send (WELCOME) unholds it
            os.close(ctl)  # it ended already: we answer, as before
            return
        pid = p.id

        def send(data: bytearray) -> int | None:
            if self.engine == ffi.NULL:
                return None
            n = lib.ls_engine_ctl_send(self.engine, pid, ffi.from_buffer(data), len(data))
            if n == -errno.ENOENT:
                return None
            if n == -errno.EAGAIN:
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            if n < 0:
                raise OSError(-n, os.strerror(-n))
            return n

        conn.sender = send

        def detach() -> None:
            if self.engine != ffi.NULL:
                lib.ls_engine_set_release_fd(self.engine, pid, -1, 0)

        conn.detach = detach

    def _check_pipe_size(self, p: Producer) -> None:
        """A pipe producer whose pipe cannot hold its segment sends smaller batches than it asked for: the
        uid's pipe budget (fs.pipe-user-pages-soft) is spent. Count it, and say so once per uid."""
        if p.transport == "shm" or not p.pipe_size or not p.segment_size or p.pipe_size >= p.segment_size:
            return
        self.small_pipes += 1
        if p.uid not in self.small_pipe_uids:
            self.small_pipe_uids.add(p.uid)
            log.warning("small_pipe", producer=p.id, uid=p.uid, pid=p.pid, pipe_size=p.pipe_size, segment_size=p.segment_size,
                        detail="this uid's pipe budget (fs.pipe-user-pages-soft) is spent: its new producers get small pipes and "
                               "small batches; raise the sysctl or use transport shm (said once per uid)")

    # -- access control (logsink/access.py; docs/security.md "Who may write where") ----------------
    def _log_access_policy(self) -> None:
        rules = self.cfg.access_rules
        if not rules.write_rules:
            log.info("access_open", detail="no write rules: every local uid that can connect to the socket may write every stream")
        else:
            log.info("access_rules", stream_tables=sorted(rules.streams), default_table=rules.default is not None,
                     uid_grants=len(rules.uid_streams), gid_grants=len(rules.gid_streams), trust_root=rules.trust_root)

    # -- streams and files (logsink/daemon/streams.py) -----------------------------------------------
    def reopen_files(self) -> None:
        """SIGHUP: after logrotate moved a file away, start a new one at the configured path."""
        if self.engine_failed:
            log.error("reopen_skipped", reason=f"the engine failed ({self.engine_failed}): restart the daemon")
            return
        self.notify.reloading()
        try:
            self.streams.reopen()
        finally:
            self.notify.ready()

    # -- systemd (logsink/daemon/notify.py) --------------------------------------------------------
    def _engine_alive(self) -> bool:
        """The watchdog's question: is the engine thread still running (not failed, not freed)?"""
        return not self.engine_failed and self.engine != ffi.NULL and lib.ls_engine_failed(self.engine) == 0

    def _notify_status(self) -> str:
        if self.engine_failed:
            return f"engine {self.engine_name} FAILED ({self.engine_failed}): restart the daemon"
        state = "stopping, " if self.shutting_down else ""
        return f"{state}producers {len(self.producers)}, streams {len(self.streams)}, engine {self.engine_name}"

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
                    if kind == lib.LS_EV_BATCH_FAILED and self.limits.is_internal(ev.producer_id):
                        log.error("suppressed_line_failed", error=os.strerror(-ev.err) if ev.err < 0 else "write failed",
                                  detail="the daemon's own line about suppressed records could not be written")
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
                    if ev.err == 1:  # the engine sent this RELEASE itself
                        self.releases_by_engine += 1
                        continue
                elif kind == lib.LS_EV_BATCH_SUPPRESSED:  # over its rate limit: dropped, and said so
                    p.released = ev.seq
                    p.suppressed.append([ev.seq, ev.records])
                    self.limits.suppressed(p, ev.records, ev.bytes)
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
                p.conn.send(protocol.release(p.released, p.failed, p.suppressed))
                self.releases_by_daemon += 1
                if p.failed or p.suppressed:  # said: the engine may answer this producer's batches again
                    lib.ls_engine_release_resume(self.engine, p.id)
            p.failed, p.suppressed = [], []
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
        self.notify.status_now()

    def _producer_ended(self, p: Producer, ev: Any) -> None:
        kind = ev.kind
        conn = p.conn
        if conn is not None:
            conn.sender = conn.detach = None  # the engine closed its copy of the socket: ours alone (before its id is reused)
        self.limits.detach(p)
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
            conn.send(protocol.release(p.released, p.failed, p.suppressed))
            p.failed, p.suppressed, p.dirty, p.conn = [], [], False, None  # said once: the touched loop must not repeat it
            conn.producer = None
            # The table closes a TCP connection with its producer (it is the data stream); a local one
            # stays open for STATUS unless its producer ended on an error.
            if conn.step(ConnEvent.PRODUCER_END) is ConnState.CLOSED or kind not in (lib.LS_EV_PRODUCER_EOF, lib.LS_EV_PRODUCER_REMOVED):
                conn.close()
                self.conns.discard(conn)
        p.stream.producers -= 1
        del self.producers[p.id]
        self.free_ids.append(p.id)
        if not self.producers and self._all_gone is not None:
            self._all_gone.set()

    # -- status (logsink/daemon/status.py) -------------------------------------------------------------
    def _sample_rates(self) -> None:
        """Once a second: the streams' counters, for the rates status shows."""
        if self.engine == ffi.NULL or self.shutting_down:
            return
        self.rates.sample(time.monotonic(), status_report.stream_counts(self))
        self.limits.tick(self.streams)
        asyncio.get_running_loop().call_later(1.0, self._sample_rates)

    def counters_total(self) -> dict[str, int]:
        return status_report.totals(self.engine)

    def status(self) -> dict[str, Any]:
        return status_report.report(self)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one: every producer holds a socket and a pipe here, and a
    shell's or systemd's soft 1024 would cap a host at ~500 producers. Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("fd_limit_kept", soft=soft, hard=hard, error=str(exc))
            return soft, soft
    return soft, hard


def serve(cfg: Config) -> int:
    raise_fd_limit()
    return asyncio.run(Daemon(cfg).run())
