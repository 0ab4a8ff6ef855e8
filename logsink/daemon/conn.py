"""A control connection's transport: framing in, buffered writes out, the fd a HELLO carries; and the accept gate.

What a connection may do next is the table in ``logsink.protocol`` (``CONN_TRANSITIONS``): a
:class:`Conn` holds its :class:`~logsink.protocol.ConnState` and moves it only through
:meth:`Conn.step`. What its messages mean is the daemon's (logsink/daemon/server.py), reached through
the three calls of :class:`ConnOwner`.
"""

from __future__ import annotations

import array
import asyncio
import errno
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from logsink import protocol
from logsink.daemon.admission import ConnFacts
from logsink.daemon.streams import Stream
from logsink.protocol import ConnEvent, ConnState

log = structlog.get_logger("logsink.daemon")

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

E_TOO_MANY_FDS = protocol.E_TOO_MANY_FDS


class ConnOwner(Protocol):
    """What a connection calls on the daemon."""

    def on_message(self, conn: Conn, msg: dict[str, Any]) -> None: ...

    def on_conn_lost(self, conn: Conn, why: str) -> None: ...

    def reject(self, conn: Conn, code: str, reason: str, **fields: Any) -> None: ...


@dataclass
class Producer:
    """A connection's producer, from WELCOME until the engine ends it."""

    id: int
    stream: Stream
    conn: Conn | None
    pid: int
    uid: int
    transport: str
    segment_size: int
    pipe_size: int = 0  # F_GETPIPE_SZ of its data pipe at HELLO (0: TCP)
    released: int = 0
    failed: list[list[Any]] = field(default_factory=list)
    suppressed: list[list[int]] = field(default_factory=list)  # [[seq, records]] dropped over a rate limit, unsaid
    dirty: bool = False
    removing: bool = False


class Conn:
    """One control connection: framing in, buffered writes out. At most one producer per connection, ever."""

    def __init__(self, daemon: ConnOwner, sock: socket.socket, peer: str | None = None):
        self.daemon = daemon
        self.state = ConnState.AWAIT_HELLO
        self.sock = sock
        self.decoder = protocol.ControlDecoder(MAX_CLIENT_MESSAGE)
        self.fds: list[int] = []  # the fds of a HELLO still being decoded (the pipe; shm: + the arena)
        self.fd_timer: asyncio.TimerHandle | None = None  # bounds how long that fd is held
        self.out = bytearray()
        # Set while the engine answers this producer's batches itself (ls_engine_set_release_fd): sends
        # the bytes it can and returns how many (BlockingIOError: none), or None once the engine let go.
        self.sender: Callable[[bytearray], int | None] | None = None
        self.detach: Callable[[], None] | None = None  # takes the socket back from the engine (teardown)
        self.producer: Producer | None = None
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

    @property
    def closed(self) -> bool:
        return self.state is ConnState.CLOSED

    def step(self, event: ConnEvent, kind: str = "") -> ConnState:
        """Move through ``protocol.CONN_TRANSITIONS``; ProtocolError (state unchanged) if ``event`` is illegal now.

        Entering FRAMES hands the inbound side to the engine; entering CLOSED closes the socket."""
        old = self.state
        self.state = protocol.conn_step(old, event, kind)
        if self.state is ConnState.FRAMES:
            self.stop_reading()
        elif self.state is ConnState.CLOSED and old is not ConnState.CLOSED:
            self._teardown()
        return self.state

    def facts(self, fds: int = 0) -> ConnFacts:
        """What admission (logsink/daemon/admission.py) needs to know of this connection."""
        return ConnFacts(tcp=self.tcp, uid=self.uid, gid=self.gid, fds=fds, early_bytes=self.decoder.buffered)

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
        except ConnectionResetError:
            # A client that closes with a RELEASE still unread makes its kernel send RST: an ordinary
            # close, unless it cut a message short.
            self.daemon.on_conn_lost(self, "closed mid-message" if self.decoder.buffered else "closed")
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
        elif len(fds) > protocol.HELLO_FDS_SHM:
            code, why = protocol.E_BAD_FD, ("HELLO carries one fd (the data pipe's read end), or two with transport shm (then the "
                                            f"arena memfd), with SCM_RIGHTS; got {len(fds)}")
        elif self.fds:
            code, why = E_TOO_MANY_FDS, "more fds before the first HELLO was complete: HELLO's fds come in its one sendmsg"
        else:
            try:
                self.step(ConnEvent.FD)
            except protocol.ProtocolError as exc:  # after HELLO
                code, why = exc.code, exc.reason
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

    def _send(self, data: bytearray) -> int:
        """Send what we can of ``data``: through ``sender`` while the engine answers this producer's batches
        on the same socket (frames must not interleave), else on the socket."""
        if self.sender is not None:
            n = self.sender(data)
            if n is not None:
                return n
            self.sender = None  # the engine let go of the socket (its producer ended): ours alone again
        return self.sock.send(data)

    def _flush(self) -> None:
        try:
            n = self._send(self.out)
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
        self.step(ConnEvent.CLOSE)

    def _teardown(self) -> None:
        if self.fd_timer is not None:
            self.fd_timer.cancel()
            self.fd_timer = None
        self.stop_reading()
        self.loop.remove_writer(self.sock.fileno())
        if self.detach is not None:  # the engine's copy of the socket goes: no RELEASE after our last word, and EOF
            self.detach()
        self.detach = self.sender = None
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
