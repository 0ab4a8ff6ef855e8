"""The producer: ``logsink.Client`` appends records into a pinned-page arena and hands whole segments to the daemon."""

from __future__ import annotations

import atexit
import os
import select
import socket as _socket
import threading
import time
import weakref
from typing import Any

from logsink import protocol
from logsink._native import check, ffi, lib
from logsink.config import default_socket_path

# 1 MiB segments, 4 of them (two huge pages): the benchmark's best (docs/architecture.md, "Segment
# size"). Each batch costs the daemon a header read and an io-wq hand-off, so fewer, bigger batches
# halve its CPU per GB against 256 KiB ones; a segment fills the 1 MiB pipe (256 slots) exactly.
DEFAULT_SEGMENT_SIZE = 1 << 20
DEFAULT_SEGMENTS = 4
# The largest pipe an unprivileged process gets (/proc/sys/fs/pipe-max-size); if the uid is past
# pipe-user-pages-soft the kernel keeps the pipe small and batches move through it in pieces.
DEFAULT_PIPE_SIZE = 1 << 20
# Records do not sit in a half-full segment longer than this before the background thread hands
# them over: a service that logs one line a minute still sees it in `tail -F` at once.
DEFAULT_FLUSH_INTERVAL = 0.2
# How long connect + HELLO may take before we call the daemon unreachable.
CONNECT_TIMEOUT = 10.0
PAGE = 4096

_TRANSPORT_IDS = {"vmsplice": lib.LS_TRANSPORT_VMSPLICE, "copy": lib.LS_TRANSPORT_COPY}


# Every open Client: closed (flushed) at interpreter exit, reconnected lazily in a forked child.
_live: "weakref.WeakSet[Client]" = weakref.WeakSet()
# At exit, a stopped daemon must not hang the interpreter: flush at most this long per client.
EXIT_FLUSH_TIMEOUT = 5.0


def _close_all_at_exit() -> None:
    for client in list(_live):
        try:
            client.close(timeout=EXIT_FLUSH_TIMEOUT)
        except Exception:
            pass


def _after_fork_in_child() -> None:
    for client in list(_live):
        client._forked = True


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)


class Client:
    """A producer for one stream. Thread-safe; use as a context manager or call ``close()``.

    ``write(data)`` takes one or more whole records (each ending in ``\\n``) and returns once they
    are in the arena; ``flush()`` returns once every byte written before it is in the stream's file.
    """

    def __init__(
        self,
        stream: str,
        *,
        socket: str | None = None,
        transport: str = "auto",
        segment_size: int | None = None,
        segments: int | None = None,
        on_full: str = "block",
        timeout: float | None = None,
        flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
    ):
        try:
            protocol.validate_stream_name(stream)
        except protocol.ProtocolError as exc:
            raise ValueError(exc.reason) from None
        if transport == "auto":
            transport = "vmsplice"
        if transport not in _TRANSPORT_IDS:
            raise ValueError(f"transport {transport!r} is not one of 'auto', 'vmsplice', 'copy'")
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full {on_full!r} is not 'block' or 'drop'")
        seg = DEFAULT_SEGMENT_SIZE if segment_size is None else segment_size
        nseg = DEFAULT_SEGMENTS if segments is None else segments
        if seg < PAGE or seg % PAGE or seg > protocol.MAX_BATCH_PAYLOAD:
            raise ValueError(f"segment_size {seg} must be a multiple of {PAGE} between {PAGE} and {protocol.MAX_BATCH_PAYLOAD}")
        if nseg < 1:
            raise ValueError(f"segments must be >= 1, got {nseg}")

        self.stream = stream
        self.transport = transport
        self.segment_size = seg
        self.segments = nseg
        self.on_full = on_full
        self.timeout = timeout
        self.flush_interval = flush_interval
        self._path = socket or default_socket_path()
        self._tid = _TRANSPORT_IDS[transport]
        self._capacity = seg - protocol.FRAME_HEADER_SIZE  # payload bytes a segment holds
        self._forked = False
        self._reset_state()
        self._start()
        _live.add(self)

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._seg_seq = [0] * self.segments  # seq a segment was handed over as; 0 = free
        self._cur = -1                   # last segment taken (the ring's position)
        self._active = False             # _cur is being filled (not yet handed over)
        self._pos = 0                    # payload bytes in the current segment
        self._nrec = 0                   # records in the current segment
        self._filled_at = 0.0            # when the current segment got its first record
        self._seq = 0                    # last seq handed over
        self._released = 0               # daemon: every seq <= this is in the file
        self._failed: list[list[Any]] = []
        self._broken: str | None = None  # why the connection is unusable
        self._closed = False
        self._stopping = False           # daemon said SHUTDOWN
        self._stats = {"batches": 0, "records": 0, "bytes": 0, "dropped_records": 0, "failed_batches": 0, "waits_for_release": 0}
        self._arena = ffi.NULL
        self._pipe_w = -1
        self._sock: _socket.socket | None = None

    def _start(self) -> None:
        self._connect()
        self._thread = threading.Thread(target=self._background, name=f"logsink-client-{self.stream}", daemon=True)
        self._thread.start()

    def _reconnect_after_fork(self) -> None:
        """In a forked child: drop the parent's connection (our copies of its fds; its arena is
        not mapped here, MADV_DONTFORK) and connect anew. The parent's unsent records stay the
        parent's: the child never writes into the parent's arena or pipe."""
        for fd in (self._pipe_w, self._sock.detach() if self._sock is not None else -1):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._forked = False
        self._reset_state()
        self._start()

    # -- connection -------------------------------------------------------------------------------
    def _connect(self) -> None:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(self._path)
        except OSError as exc:
            sock.close()
            raise ConnectionError(
                f"cannot reach the logsink daemon at {self._path}: {exc.strerror or exc}; "
                "start it with `logsink serve` or point LOGSINK_SOCKET at its socket"
            ) from None
        rfd, wfd, got = ffi.new("int *"), ffi.new("int *"), ffi.new("int *")
        check(lib.ls_pipe_create(DEFAULT_PIPE_SIZE, rfd, wfd, got), "creating the data pipe")
        try:
            hello = protocol.hello(self.stream, os.getpid(), self.transport, segment_size=self.segment_size, pipe_size=got[0])
            _socket.send_fds(sock, [protocol.encode(hello)], [rfd[0]])
        except OSError as exc:
            os.close(rfd[0])
            os.close(wfd[0])
            sock.close()
            raise ConnectionError(f"logsink daemon at {self._path} dropped the connection during HELLO: {exc}") from None
        os.close(rfd[0])  # the daemon holds the read end now
        self._decoder = protocol.ControlDecoder()
        try:
            msg = self._recv_one(sock)
        except (OSError, protocol.ProtocolError) as exc:
            os.close(wfd[0])
            sock.close()
            raise ConnectionError(f"logsink daemon at {self._path} did not answer HELLO: {exc}") from None
        if msg["t"] != protocol.WELCOME:
            os.close(wfd[0])
            sock.close()
            reason = msg.get("reason", msg) if msg["t"] == protocol.ERROR else f"unexpected {msg['t']!r}"
            raise ConnectionError(f"logsink daemon refused stream {self.stream!r}: {reason}")
        self.producer_id = msg["producer"]
        self.engine = msg["engine"]
        self.pipe_size = got[0]
        sock.setblocking(False)
        self._sock = sock
        self._pipe_w = wfd[0]
        arena = ffi.new("void **")
        check(lib.ls_arena_map(self.segment_size * self.segments, arena), "mapping the segment arena")
        self._arena = arena[0]
        self._base = ffi.cast("char *", self._arena)

    def _recv_one(self, sock: _socket.socket) -> dict[str, Any]:
        pending: list[dict[str, Any]] = []
        while not pending:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed")
            pending = self._decoder.feed(data)
        self._early = pending[1:]
        return pending[0]

    # -- background: releases, shutdown notices, timed flushes ------------------------------------
    def _background(self) -> None:
        for msg in getattr(self, "_early", []):
            self._on_message(msg)
        interval = self.flush_interval
        sock = self._sock
        assert sock is not None
        while True:
            with self._lock:
                if self._closed or self._broken:
                    return
                if interval and self._pos and time.monotonic() - self._filled_at >= interval:
                    self._handover_current()
            try:
                ready, _, _ = select.select([sock], [], [], interval if interval else None)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                self._fail(f"control socket error: {exc}")
                return
            if not data:
                self._fail("the logsink daemon closed the connection")
                return
            try:
                for msg in self._decoder.feed(data):
                    self._on_message(msg)
            except protocol.ProtocolError as exc:
                self._fail(f"the daemon sent a bad control message: {exc}")
                return

    def _on_message(self, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        with self._lock:
            if kind == protocol.RELEASE:
                if msg["through"] > self._released:
                    self._released = msg["through"]
                failed = msg.get("failed") or []
                if failed:
                    self._failed.extend(failed)
                    self._stats["failed_batches"] += len(failed)
                self._cond.notify_all()
            elif kind == protocol.SHUTDOWN:
                # Hand over what we hold and end the pipe: the daemon drains it before it exits.
                self._stopping = True
                if self._pos and not self._broken:
                    self._handover_current()
                self._close_pipe()
                self._cond.notify_all()
            elif kind == protocol.ERROR:
                self._broken = f"the logsink daemon closed this producer: {msg['code']}: {msg['reason']}"
                self._cond.notify_all()

    def _fail(self, why: str) -> None:
        with self._lock:
            if not self._broken and not self._closed:
                self._broken = why if not self._stopping else "the logsink daemon shut down"
            self._cond.notify_all()

    def _close_pipe(self) -> None:
        if self._pipe_w >= 0:
            os.close(self._pipe_w)
            self._pipe_w = -1

    # -- segments (call with the lock held) -------------------------------------------------------
    def _usable_or_raise(self) -> None:
        if self._closed:
            raise ValueError("write to a closed logsink.Client")
        if self._stopping:
            raise ConnectionError(f"the logsink daemon is shutting down; stream {self.stream!r} takes no more records")
        if self._broken:
            raise ConnectionError(self._broken)

    def _is_free(self, i: int) -> bool:
        return self._seg_seq[i] <= self._released

    def _wait_for_segment(self, deadline: float | None) -> bool:
        """Make the next segment in ring order current, waiting for its release; False = dropped.

        Call in a loop that re-checks its condition: while we waited another thread may already
        have taken a segment with room for us.
        """
        nxt = (self._cur + 1) % self.segments
        if self._is_free(nxt):
            self._cur = nxt
            self._seg_seq[nxt] = 0
            self._active = True
            self._pos = 0
            self._nrec = 0
            return True
        if self.on_full == "drop":
            return False
        self._stats["waits_for_release"] += 1
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(
                f"all {self.segments} segments of stream {self.stream!r} are still pinned after {self.timeout} s: "
                "the daemon has not released them (is it overloaded or stopped?)"
            )
        self._cond.wait(remaining)
        return True

    def _handover_current(self) -> None:
        if not self._active or not self._pos:
            return
        if self._pipe_w < 0:
            raise ConnectionError(self._broken or "the data pipe is closed")
        seq = self._seq + 1
        base = ffi.cast("char *", self._arena) + self._cur * self.segment_size
        tmo = -1 if self.timeout is None else int(self.timeout * 1000)
        ret = lib.ls_handover(self._pipe_w, base, self._pos, self._nrec, seq, self._tid, tmo)
        if ret < 0:
            # A partial batch may be in the pipe: the stream is out of sync, so end it (the daemon
            # discards the partial batch) and make every later call fail loudly.
            self._close_pipe()
            err = -ret
            self._broken = f"handing a batch to the daemon failed: {os.strerror(err)}"
            self._cond.notify_all()
            if err == 110:  # ETIMEDOUT
                raise TimeoutError(f"the daemon did not drain the pipe within {self.timeout} s")
            raise ConnectionError(self._broken)
        self._seq = seq
        # vmsplice: the pipe references the pages until the daemon releases seq. copy: free now.
        self._seg_seq[self._cur] = seq if self._tid == lib.LS_TRANSPORT_VMSPLICE else 0
        self._stats["batches"] += 1
        self._stats["records"] += self._nrec
        self._stats["bytes"] += self._pos
        self._active = False
        self._pos = 0
        self._nrec = 0

    def splice_from(self, fd: int, nbytes: int, records: int) -> None:
        """Move ``nbytes`` (whole records, ``records`` of them) from the pipe ``fd`` to the daemon
        with splice(2): no copy through user space. Used by ``logsink pipe``."""
        with self._lock:
            self._usable_or_raise()
            self._handover_current()  # what write() took before goes first
            seq = self._seq + 1
            tmo = -1 if self.timeout is None else int(self.timeout * 1000)
            ret = lib.ls_splice_batch(self._pipe_w, fd, nbytes, records, seq, tmo)
            if ret < 0:
                self._close_pipe()
                self._broken = f"splicing a batch to the daemon failed: {os.strerror(-ret)}"
                self._cond.notify_all()
                raise ConnectionError(self._broken)
            self._seq = seq
            self._stats["batches"] += 1
            self._stats["records"] += records
            self._stats["bytes"] += nbytes

    # -- public API -------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Append one or more whole records (each ending in ``\\n``). Blocks or drops per ``on_full``."""
        n = len(data)
        if not n:
            return
        if data[-1] != 10:
            raise ValueError("write() takes whole records: the data must end with b'\\n' (a partial record would tear a line)")
        if n > self._capacity:
            self._write_large(data)
            return
        if self._forked:
            self._reconnect_after_fork()
        with self._lock:
            if self._broken or self._stopping or self._closed:
                self._usable_or_raise()
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            while not self._active or self._pos + n > self._capacity:
                self._usable_or_raise()
                self._handover_current()
                if not self._wait_for_segment(deadline):
                    self._stats["dropped_records"] += data.count(b"\n")
                    return
            if not self._pos:
                self._filled_at = time.monotonic()
            dst = self._base + (self._cur * self.segment_size + protocol.FRAME_HEADER_SIZE + self._pos)
            self._nrec += lib.ls_copy_records(dst, data if type(data) is bytes else ffi.from_buffer(data), n)
            self._pos += n

    def _write_large(self, data: bytes) -> None:
        """Split a write bigger than a segment at record boundaries."""
        view = memoryview(data)
        start, n, cap = 0, len(data), self._capacity
        while start < n:
            end = start + cap
            if end >= n:
                self.write(bytes(view[start:]))
                return
            cut = data.rfind(b"\n", start, end)
            if cut < start:
                raise ValueError(f"a record longer than the segment payload ({cap} bytes) cannot be sent: raise segment_size")
            self.write(bytes(view[start : cut + 1]))
            start = cut + 1

    def flush(self, timeout: float | None = None) -> None:
        """Return once every record written before this call is in the stream's file.

        Raises TimeoutError after ``timeout`` seconds, ConnectionError if the daemon went away, and
        OSError if the daemon reported batches it could not write (e.g. disk full).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._forked:
            return  # nothing written in this process yet
        with self._lock:
            if self._closed:
                return
            if self._broken:
                raise ConnectionError(self._broken)
            self._handover_current()
            target = self._seq
            while self._released < target:
                if self._broken:
                    raise ConnectionError(self._broken)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"flush of stream {self.stream!r} not confirmed within {timeout} s")
                self._cond.wait(remaining)
            failed, self._failed = self._failed, []
        if failed:
            seq, code, reason = failed[0]
            raise OSError(f"the logsink daemon could not write {len(failed)} batch(es) of stream {self.stream!r} (first: seq {seq}: {code}: {reason})")

    def close(self, timeout: float | None = None) -> None:
        """Flush (waiting up to ``timeout`` seconds), then end the connection. Idempotent."""
        if self._closed:
            return
        if self._forked:  # a child that never wrote: the connection is the parent's
            self._closed = True
            return
        try:
            if not self._broken and not self._stopping:
                self.flush(timeout)
        finally:
            with self._lock:
                self._closed = True
                self._close_pipe()
                self._cond.notify_all()
            if self._sock is not None:
                try:
                    self._sock.shutdown(_socket.SHUT_RDWR)  # wakes the background thread's select
                except OSError:
                    pass
            if threading.current_thread() is not self._thread:
                self._thread.join()
            if self._sock is not None:
                self._sock.close()
            if self._arena != ffi.NULL:
                lib.ls_arena_unmap(self._arena, self.segment_size * self.segments)
                self._arena = ffi.NULL

    def stats(self) -> dict[str, Any]:
        with self._lock:
            pinned = sum(1 for s in self._seg_seq if s > self._released)
            return {
                "stream": self.stream,
                "transport": self.transport,
                "segment_size": self.segment_size,
                "segments": self.segments,
                "pipe_size": self.pipe_size,
                "released_through": self._released,
                "handed_over_through": self._seq,
                "pinned_segments": pinned,
                **self._stats,
            }

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            if not self._closed and self._arena != ffi.NULL:
                self.close()
        except Exception:
            pass
