"""One forwarder: one stream's records to one downstream collector, from the daemon's own file.

Bytes go from the stream's file -- or, for a forward-only stream, its spool file under the state
directory -- to the socket in C (native/ls_forward.c): newline framing through the forwarder's own
io_uring where the kernel allows it (native/ls_forward_uring.c), else sendfile; this module connects,
reconnects with backoff, applies the spool bound, and saves its cursor. Python never sees payload.
With RELP framing it also does the session's open handshake and close (logsink/forward/relp.py);
the per-record commands and the collector's responses are C's.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import structlog

from logsink._native import check, ffi, lib
from logsink.config import FRAMINGS, RELP_WINDOW_DEFAULT, RELP_WINDOW_MAX, ForwardSpec
from logsink.forward.relp import RELP_CLOSE_TIMEOUT, RELP_HANDSHAKE_TIMEOUT, relp_open

if TYPE_CHECKING:  # annotations only: the manager imports this module
    from logsink.forward.manager import _StreamGroup

log = structlog.get_logger("logsink.forward")

# The framings by name (logsink.config) as the C core numbers them.
FRAMING_CODES = {"newline": lib.LS_FWD_NEWLINE, "octet-counted": lib.LS_FWD_OCTET, "relp": lib.LS_FWD_RELP}
assert set(FRAMING_CODES) == set(FRAMINGS)
if (RELP_WINDOW_DEFAULT, RELP_WINDOW_MAX) != (lib.LS_RELP_WINDOW_DEFAULT, lib.LS_RELP_WINDOW_MAX):  # pragma: no cover
    raise ImportError("logsink.config's RELP window limits differ from native/ls_forward.h's: rebuild or fix one of them")
# The forwarding paths by the C core's numbers (LS_FWD_PATH_*), as status and the log name them.
PATH_NAMES = {lib.LS_FWD_PATH_SENDFILE: "sendfile", lib.LS_FWD_PATH_URING_SEND: "io_uring-send",
              lib.LS_FWD_PATH_URING_ZC: "io_uring-send-zc"}
# Reconnect backoff: first retry after 0.1 s, doubling to 30 s; reset by a connection that lasted.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = 5.0
# A connection that lasted this long resets the backoff.
STABLE_CONNECTION = 1.0
# A downstream that stops ACKing for this long is declared dead (TCP_USER_TIMEOUT), so its data
# goes to the spool instead of sitting in a send queue forever.
USER_TIMEOUT_MS = 30_000
# Cursor files are rewritten at most this often (and on close).
SAVE_INTERVAL = 0.1
# close(): how long pending data gets to reach the downstream (and be ACKed) before we stop.
CLOSE_TIMEOUT = 5.0
# -- one downstream -------------------------------------------------------------------------------
class Forwarder:
    """One (stream, downstream): a C forwarder (native/ls_forward.c) plus its connection and cursor file.

    ``on_advance(end)`` after records up to ``end`` landed; the rest runs on the event loop: a
    connector task with backoff, writability and EOF callbacks on the socket, a cursor save timer.
    """

    def __init__(self, spec: ForwardSpec, group: _StreamGroup, cursor: int):
        self.spec = spec
        self.group = group
        self.cursor_path = group.mgr.cursors.path(spec)
        self.identity = group.identity  # the file this forwarder reads (it moves to a rotated file on its own)
        # The cursor the file on disk holds, with its file: the spool is never punched past it, so a
        # restart after a crash never resumes inside the punched prefix. ``cursor`` came from there.
        self.durable = (cursor, group.identity)
        self._skipped = 0
        self.address = f"tcp://{spec.host}:{spec.port}"
        out = ffi.new("struct ls_forward **")
        check(lib.ls_forward_new(group.fd, cursor, FRAMING_CODES[spec.framing], out), f"starting the forwarder to {self.address}")
        self.f = ffi.gc(out[0], lib.ls_forward_free)
        self.relp = spec.framing == "relp"
        if self.relp:
            check(lib.ls_forward_relp_window(self.f, spec.window), "setting the RELP window")
        # How newline windows leave: the forwarder's own io_uring where the kernel allows it, else
        # sendfile (C decides and says why; LOGSINK_FORWARD_PATH overrides, see docs/forwarding.md).
        self.path = PATH_NAMES[check(lib.ls_forward_use_path(self.f, lib.LS_FWD_PATH_AUTO), "choosing the forwarding path")]
        buf = ffi.new("char[256]")
        lib.ls_forward_path_reason(self.f, buf, 256)
        self.path_reason = ffi.string(buf).decode(errors="replace")
        self._ring_fd = lib.ls_forward_ring_fd(self.f)
        self._counters = ffi.new("struct ls_forward_counters *")
        self._last_cursor = cursor  # the cursor at the last counters(): lag checks between them
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self.state = "down"
        self.last_error = ""
        self.wants_pause = False
        self.closing = False
        self._writer = False
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._saved: tuple[int, tuple[int, int]] | None = None  # (offset, file identity) last written
        self._save_handle: asyncio.TimerHandle | None = None
        self._pending_switch: tuple[int, int, tuple[int, int]] | None = None  # new fd, its offset, its identity
        self._switch_timer = False
        self._connector = self.loop.create_task(self._connect_loop(), name=f"forward {spec.key}")
        if self._ring_fd >= 0:  # send completions (and SEND_ZC notifications) arrive on the ring
            self.loop.add_reader(self._ring_fd, self._on_ring)
        log.info("forward_path", stream=spec.stream, downstream=self.address, framing=spec.framing, path=self.path,
                 reason=self.path_reason)

    # -- progress ---------------------------------------------------------------------------------
    def counters(self) -> Any:
        lib.ls_forward_counters(self.f, self._counters)
        self._last_cursor = self._counters.cursor
        return self._counters

    def on_advance(self, end: int) -> None:
        """Records up to ``end`` are complete in the file: send them (or spool them)."""
        if self._pending_switch is not None:
            return  # still finishing the rotated-away file; the new one's offsets wait
        ret = lib.ls_forward_advance(self.f, end)
        if ret == -errno.ERANGE:  # the file shrank under us: copytruncate, or an admin's `: > file`
            lost = self.counters().end - self.counters().cursor
            log.error("forward_source_truncated", stream=self.spec.stream, downstream=self.address, unsent_bytes_lost=lost)
            check(lib.ls_forward_reset(self.f, -1, 0), "restarting the forwarder")
            self.group.update_bound(force=True)  # the engine holds a truncated bounded stream until it hears again
            ret = lib.ls_forward_advance(self.f, end)
        check(ret, "advancing the forwarder")
        if self._ring_fd >= 0 and lib.ls_forward_ring_busy(self.f) and not self.wants_pause:
            # A ring send is in flight: its completion pumps on to the new end. Only the spool bound
            # needs a look, and only when the lag may have passed it (no SIOCOUTQ per batch).
            if end - self._last_cursor > self.spec.spool_max:
                self._apply_policy()
            return
        self._apply_policy()
        self.pump()

    def pump(self) -> None:
        if self.sock is None:
            return
        r = lib.ls_forward_pump(self.f)
        if r == -errno.EAGAIN:
            if not self._writer:
                self.loop.add_writer(self.sock.fileno(), self.pump)
                self._writer = True
        elif r >= 0 or r in (-errno.ENODATA, -errno.ENOBUFS, -errno.EINPROGRESS):
            # ENOBUFS: RELP window full, responses resume it; EINPROGRESS: a ring send in flight, its completion resumes it
            if self._writer:
                self.loop.remove_writer(self.sock.fileno())
                self._writer = False
            if r == -errno.ENODATA:
                if self._source_truncated():
                    self.loop.call_soon(self.pump)  # what the file holds now
                else:
                    log.error("forward_source_short", stream=self.spec.stream, downstream=self.address,
                              reason="the file ended before the offsets the engine reported; waiting for the next batch")
        elif r != -errno.ENOTCONN:
            self._connection_lost(f"send failed: {os.strerror(-r)}", detached=True)
        self._progress()

    def _source_truncated(self) -> bool:
        """The file is shorter than the end the engine reported: truncated under us (copytruncate)
        while the engine had nothing to write (a stream held at its spool bound lands no batch that
        would tell us). Start over with what it holds now: its unsent bytes are lost, and said so."""
        if self._pending_switch is not None:
            return False
        size = os.fstat(self.group.fd).st_size
        c = self.counters()
        if size >= c.end:
            return False
        log.error("forward_source_truncated", stream=self.spec.stream, downstream=self.address, unsent_bytes_lost=c.end - c.cursor)
        check(lib.ls_forward_reset(self.f, -1, 0), "restarting the forwarder")
        check(lib.ls_forward_advance(self.f, size), "advancing the forwarder")
        self.group.update_bound(force=True)  # (the engine may hold the stream since it saw the file shrink)
        return True

    def _on_ring(self) -> None:
        """Completions on the forwarder's ring: apply them (with or without a socket), then send on."""
        lib.ls_forward_ring_reap(self.f)
        if self.sock is not None:
            self.pump()

    def allowed_end(self) -> int:
        """The offset in the stream's current file up to which its batches may start: spool_max past
        what this downstream has been sent (while it finishes a rotated-away file, that file's lag counts)."""
        c = self.counters()
        if self._pending_switch is None:
            return c.cursor + self.spec.spool_max
        return self._pending_switch[1] + max(0, self.spec.spool_max - (c.end - c.cursor))

    def _progress(self) -> None:
        self._note_skipped()
        if self.wants_pause:
            c = self.counters()
            if c.end - c.cursor < self.spec.spool_max // 2:
                self.wants_pause = False
                self.group.update_pause()
        self._maybe_switch()
        self._schedule_save()
        self.group.update_bound()

    def skip_zeros(self) -> None:
        """Validate a resumed cursor: off any hole or NUL bytes (a cursor file lost, or left inside the
        punched prefix by an older version), onto the next whole record."""
        check(lib.ls_forward_skip_zeros(self.f), "checking the spool at the cursor")
        if self._note_skipped():
            self._schedule_save()

    def _note_skipped(self) -> bool:
        """Log bytes the C forwarder skipped instead of sending zeros; True if there were any."""
        c = self.counters()
        if c.skipped_bytes == self._skipped:
            return False
        log.warning("forward_skipped_hole", stream=self.spec.stream, downstream=self.address, file=self.group.path,
                    bytes=c.skipped_bytes - self._skipped, resume_at=c.cursor,
                    reason="the file reads as zeros there (a punched spool prefix or a hole); zeros are never sent")
        self._skipped = c.skipped_bytes
        return True

    def _apply_policy(self) -> None:
        c = self.counters()
        lag = c.end - c.cursor
        if lag <= self.spec.spool_max:
            return
        if self.spec.policy == "block":
            if not self.wants_pause:
                self.wants_pause = True
                log.warning("forward_spool_full", stream=self.spec.stream, downstream=self.address, lag_bytes=lag,
                            spool_max=self.spec.spool_max, policy="block", action="pausing the stream; producers block")
                self.group.update_pause()
        else:
            before = (c.dropped_bytes, c.dropped_records)
            lib.ls_forward_drop(self.f, c.end - self.spec.spool_max)
            c = self.counters()
            if c.dropped_bytes != before[0]:
                log.warning("forward_spool_dropped", stream=self.spec.stream, downstream=self.address,
                            bytes=c.dropped_bytes - before[0], records=c.dropped_records - before[1],
                            total_dropped_records=c.dropped_records, spool_max=self.spec.spool_max)

    # -- connection -------------------------------------------------------------------------------
    async def _connect_loop(self) -> None:
        delay = BACKOFF_FIRST
        while not self.closing:
            try:
                sock = await self._connect()
            except (TimeoutError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                if reason != self.last_error:
                    log.warning("forward_connect_failed", stream=self.spec.stream, downstream=self.address, error=reason, retry_in=delay)
                self.last_error = reason
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self._attach(sock)
            since = time.monotonic()
            await self._lost.wait()
            self._lost.clear()
            # A collector that accepts and drops us at once must not make us spin: the backoff
            # starts over only after a connection that lasted.
            if time.monotonic() - since >= STABLE_CONNECTION:
                delay = BACKOFF_FIRST
            if not self.closing:
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _connect(self) -> socket.socket:
        infos = await self.loop.getaddrinfo(self.spec.host, self.spec.port, type=socket.SOCK_STREAM)
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(self.loop.sock_connect(sock, addr), CONNECT_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # MSG_MORE does the batching
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
        if self.relp:
            try:
                await asyncio.wait_for(relp_open(self.loop, sock), RELP_HANDSHAKE_TIMEOUT)
            except BaseException:
                sock.close()
                raise
        return sock

    def _attach(self, sock: socket.socket) -> None:
        self.sock = sock
        if self.relp:  # open took txnr 1
            check(lib.ls_forward_relp_attach(self.f, sock.fileno(), 2), "attaching the RELP session")
        else:
            check(lib.ls_forward_set_socket(self.f, sock.fileno()), "attaching the downstream socket")
        self.state = "up"
        self.last_error = ""
        c = self.counters()
        log.info("forward_up", stream=self.spec.stream, downstream=self.address, framing=self.spec.framing,
                 cursor=c.cursor, backlog_bytes=c.end - c.cursor)
        self.loop.add_reader(sock.fileno(), self._on_readable)
        self._up.set()
        self.pump()

    def _on_readable(self) -> None:
        """Plain TCP collectors send nothing: readable means EOF or an error (the peer went away).
        A RELP collector sends responses: C applies them, and the window has room again."""
        if self.relp:
            r = lib.ls_forward_relp_read(self.f)
            if r > 0:
                self.pump()
            elif r < 0:
                self._connection_lost(self._relp_end(r), detached=True)
            return
        assert self.sock is not None  # a reader is only registered while connected
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._connection_lost(f"connection error: {exc.strerror or exc}")
            return
        if not data:
            self._connection_lost("the downstream closed the connection")

    def _relp_end(self, r: int) -> str:
        """Why a RELP session ended, from ls_forward_relp_read's code."""
        buf = ffi.new("char[160]")
        lib.ls_forward_relp_error(self.f, buf, 160)
        text = ffi.string(buf).decode(errors="replace")
        return {
            -errno.ECONNABORTED: "the collector closed the RELP session (serverclose)",
            -errno.EPIPE: "the collector closed the connection",
            -errno.ESHUTDOWN: "the RELP session was closed",
            -errno.EREMOTEIO: f"the collector refused a record: rsp {text}; sending it again on the next session",
            -errno.EPROTO: f"RELP protocol error from the collector: {text}",
        }.get(r, f"connection error: {os.strerror(-r)}")

    def _connection_lost(self, why: str, detached: bool = False) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        self.loop.remove_reader(sock.fileno())
        if self._writer:
            self.loop.remove_writer(sock.fileno())
            self._writer = False
        if not detached:
            lib.ls_forward_set_socket(self.f, -1)  # rewinds to what the peer ACKed; needs the fd open
        # Abortive close: the kernel must not deliver, behind our back, bytes we rewound to resend.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        self.state = "down"
        self.last_error = why
        self._up.clear()
        c = self.counters()
        log.warning("forward_down", stream=self.spec.stream, downstream=self.address, reason=why,
                    resume_at=c.cursor, rewound_bytes=c.rewound_bytes)
        self._lost.set()
        self._schedule_save()
        self.group.update_bound()  # the cursor went back to what the peer ACKed: so does the bound

    # -- rotation -------------------------------------------------------------------------------
    def switch_file(self, old_end: int, new_fd: int, new_offset: int, identity: tuple[int, int]) -> None:
        """The stream moved to a new file (SIGHUP after logrotate): finish the old one, then switch."""
        lib.ls_forward_advance(self.f, old_end)
        self._pending_switch = (os.dup(new_fd), new_offset, identity)
        self.pump()
        self._maybe_switch()

    def _switch_retry(self) -> None:
        self._switch_timer = False
        self._maybe_switch()

    def _maybe_switch(self) -> None:
        if self._pending_switch is None:
            return
        c = self.counters()
        if c.cursor < c.end or (self.sock is not None and c.unacked_bytes):
            if self.sock is not None and c.cursor == c.end and not self._switch_timer:
                self._switch_timer = True  # waiting for the peer's ACKs: rewinds must still reach the old file
                self.loop.call_later(0.05, self._switch_retry)
            return
        fd, offset, identity = self._pending_switch
        self._pending_switch = None
        check(lib.ls_forward_reset(self.f, fd, offset), "switching the forwarder to the new file")
        os.close(fd)
        self.identity = self.group.identity = identity
        self._saved = None
        self._schedule_save()
        self.group.update_bound()
        self.on_advance(self.group.end())

    # -- cursor file ----------------------------------------------------------------------------
    def _schedule_save(self) -> None:
        if self._save_handle is None and not self.closing:
            self._save_handle = self.loop.call_later(SAVE_INTERVAL, self._save_tick)

    def _save_tick(self) -> None:
        self._save_handle = None
        c = self.counters()
        self.save(c.acked_cursor)
        self.group.punch()  # behind the saved cursors only: ACKs that came in since wait for the next save
        if c.acked_cursor < c.cursor:  # ACKs may still come in while we are idle: look again
            self._schedule_save()

    def save(self, offset: int) -> None:
        """Persist ``offset`` (fsynced, atomically replaced); on success it becomes ``durable``."""
        state = (offset, self.identity)
        if state == self._saved:
            return
        try:
            self.group.mgr.cursors.write(self.spec, offset, self.identity, self.group.path)
        except OSError as exc:  # the next save tries again; a restart then replays from the last saved cursor
            log.error("forward_cursor_save_failed", file=self.cursor_path, error=str(exc))
            return
        self._saved = state
        self.durable = state

    async def _relp_close(self, timeout: float) -> None:
        """RELP's close, when every command was answered: send it, wait for its rsp (or serverclose/EOF)."""
        assert self.sock is not None
        self.loop.remove_reader(self.sock.fileno())
        r = lib.ls_forward_relp_close(self.f)
        if r < 0:
            return  # commands still unanswered (EBUSY) or the socket is full: the socket is just closed
        end = time.monotonic() + timeout
        while (r := lib.ls_forward_relp_read(self.f)) >= 0 and time.monotonic() < end:
            await asyncio.sleep(0.005)
        if r != -errno.ESHUTDOWN:
            log.warning("forward_relp_close_unanswered", stream=self.spec.stream, downstream=self.address,
                        reason=self._relp_end(r) if r < 0 else f"no rsp to close within {timeout:.1f}s")

    # -- status and close -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        c = self.counters()
        out = {
            "stream": self.spec.stream, "address": self.address, "framing": self.spec.framing, "state": self.state,
            "file": self.group.path, "spool": self.group.spool, "policy": self.spec.policy, "spool_max": self.spec.spool_max,
            "cursor": c.cursor, "end": c.end, "lag_bytes": c.end - c.cursor, "acked_cursor": c.acked_cursor,
            "paused": self.wants_pause, "last_error": self.last_error, "path": self.path, "path_reason": self.path_reason,
        }
        out["saved_cursor"] = self.durable[0] if self.durable[1] == self.identity else None
        for key in ("unacked_bytes", "bytes_sent", "payload_sent", "records_sent", "bytes_sendfile", "bytes_copied",
                    "framing_bytes", "connects", "disconnects", "rewound_bytes", "dropped_bytes", "dropped_records",
                    "skipped_bytes", "bytes_uring", "uring_sends", "zc_notifs", "zc_copied"):
            out[key] = getattr(c, key)
        out["reconnects"] = max(c.connects - 1, 0)
        if self.relp:
            out.update(window=self.spec.window, relp_acked=c.relp_acked, relp_inflight=c.relp_inflight, relp_refused=c.relp_refused)
        if self.spec.framing == "newline":
            out["records_sent"] = None  # newline framing never looks at records
        return out

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Send what is pending (up to ``timeout`` seconds, until the peer ACKed it), save the cursor, disconnect.

        A downstream that is down is not waited for: the file or spool keeps the rest for the next run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock is not None:
                self.pump()
                c = self.counters()
                if c.cursor == c.end and c.unacked_bytes == 0 and self._pending_switch is None:
                    break
            else:
                break  # down: what is pending stays in the file/spool for the next run
            await asyncio.sleep(0.02)
        self.closing = True
        self._connector.cancel()
        try:
            await self._connector
        except (asyncio.CancelledError, Exception):
            pass
        if self.relp and self.sock is not None:
            await self._relp_close(min(RELP_CLOSE_TIMEOUT, max(deadline - time.monotonic(), 0.1)))
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        exact = lib.ls_forward_sync_acked(self.f)
        if self.sock is not None:
            sock, self.sock = self.sock, None
            self.loop.remove_reader(sock.fileno())
            if self._writer:
                self.loop.remove_writer(sock.fileno())
            clean = self.counters().unacked_bytes == 0
            lib.ls_forward_set_socket(self.f, -1)
            if not clean:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
        if self._ring_fd >= 0:
            self.loop.remove_reader(self._ring_fd)
            self._ring_fd = -1
        c = self.counters()
        self.save(c.acked_cursor if exact < 0 else min(exact, c.cursor))
        if self._pending_switch is not None:
            os.close(self._pending_switch[0])
        log.info("forward_closed", stream=self.spec.stream, downstream=self.address, cursor=c.cursor, end=c.end,
                 unsent_bytes=c.end - c.cursor)


