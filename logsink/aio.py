"""asyncio producer: ``logsink.AsyncClient``; every call that can wait for the daemon runs on its own thread, never on the loop."""

from __future__ import annotations

import asyncio
import atexit
import collections
import errno
import os
import threading
import weakref
from typing import Any

from logsink import protocol
from logsink.client import DEFAULT_SEGMENT_SIZE, EXIT_FLUSH_TIMEOUT, Client
from logsink.errors import error_for

# Live clients: their queues are drained at interpreter exit (before client.py closes the Clients:
# atexit runs this module's hook first), and reset in a forked child.
_live: weakref.WeakSet[AsyncClient] = weakref.WeakSet()


class _Request:
    """A flush or close queued behind the writes before it; the writer thread resolves ``future``."""

    def __init__(self, kind: str, loop: asyncio.AbstractEventLoop, timeout: float | None):
        self.kind = kind
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.deadline = None if timeout is None else loop.time() + timeout

    def left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - self.loop.time())

    def resolve(self, exc: BaseException | None) -> None:
        def settle() -> None:
            if not self.future.done():
                if exc is None:
                    self.future.set_result(None)
                else:
                    self.future.set_exception(exc)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more


class AsyncClient:
    """The asyncio face of :class:`logsink.Client` (same options, same arena and C producer).

    ``await write(data)`` queues whole records and returns at once while the queue holds less than
    one segment (``segment_size``); past that it waits, through the loop, until the writer thread
    has moved them into the arena. ``await flush()`` returns once everything written before it is
    in the file; ``await close()`` flushes and disconnects. Any number of tasks may share one
    client: each task's records stay in its order.

    Why a thread: with the daemon slow or stopped, the producer waits for a release, for pipe
    space, or for the lock its background thread holds while handing a segment over. Those waits
    happen on the writer thread; the loop only ever touches the queue. Errors of the queued writes
    (the daemon gone, a ``timeout``) are raised by the next ``write`` or ``flush``.
    Use ``async with AsyncClient(...) as c`` or ``c = await AsyncClient.open(...)``.
    """

    def __init__(self, stream: str, **client_options: Any):
        self.stream = stream
        self._options = client_options
        self._client: Client | None = None
        seg = client_options.get("segment_size") or DEFAULT_SEGMENT_SIZE
        self._limit = seg  # bytes queued (or being written) before write() waits
        self._capacity = seg - protocol.FRAME_HEADER_SIZE  # the longest record the producer takes
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        """Fresh queue state (also in a forked child: the parent's queue and thread stay the parent's)."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: collections.deque[bytes | _Request] = collections.deque()
        self._queued = 0  # bytes queued or being written by the thread
        self._idle = False  # the thread waits for work
        self._error: BaseException | None = None  # from a queued write; raised by the next call
        self._room: list[asyncio.Future[None]] = []  # write()s waiting for the queue to shrink
        self._wake_pending = False
        self._kick_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False

    @classmethod
    async def open(cls, stream: str, **client_options: Any) -> AsyncClient:
        self = cls(stream, **client_options)
        await self._connect()
        return self

    async def _connect(self) -> None:
        if self._client is None:
            loop = asyncio.get_running_loop()
            self._client = await loop.run_in_executor(None, lambda: Client(self.stream, **self._options))

    async def __aenter__(self) -> AsyncClient:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("AsyncClient is not connected: use `async with` or `await AsyncClient.open(...)`")
        return self._client

    # -- the loop's side ---------------------------------------------------------------------------
    def _raise_pending_error(self) -> None:
        """Lock held. A queued write failed: say so once, to whoever calls next."""
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _start_locked(self) -> None:
        self._loop = asyncio.get_running_loop()  # where waiting write()s are woken
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"logsink-aio-{self.stream}", daemon=True)
            self._thread.start()

    def _enqueue_locked(self, item: bytes | _Request, size: int) -> None:
        self._start_locked()
        self._queue.append(item)
        self._queued += size
        if not self._idle:
            return
        # Wake the thread once per loop iteration (a task writing record after record fills the
        # queue first), or at once for a request or a half-full queue: one wakeup per batch.
        if size == 0 or self._queued >= self._limit // 2:
            self._work.notify()
        elif not self._kick_pending and self._loop is not None:
            self._kick_pending = True
            self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        with self._lock:
            self._kick_pending = False
            if self._idle and self._queue:
                self._work.notify()

    async def write(self, data: bytes) -> None:
        """Append one or more whole records (each ending in ``\\n``)."""
        c = self.client
        if self._closing or c._closed:
            raise ValueError(f"I/O on a closed logsink.AsyncClient (stream {self.stream!r})")
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse its buffer once we return
        n = len(data)
        if not n or data[-1] != 0x0A:
            raise ValueError("write takes whole records: the data must be non-empty and end with '\\n' "
                             "(a partial record would tear a line)")
        if n > self._capacity and max(map(len, data.split(b"\n"))) >= self._capacity:
            raise ValueError(f"a record longer than the segment payload ({self._capacity} bytes) cannot be sent: "
                             "raise segment_size")
        loop = asyncio.get_running_loop()
        deadline = None if c.timeout is None else loop.time() + c.timeout
        while True:
            with self._lock:
                self._raise_pending_error()
                if not self._queued or self._queued + n <= self._limit:
                    self._enqueue_locked(data, n)
                    return
                room = loop.create_future()
                self._room.append(room)
            left = None if deadline is None else deadline - loop.time()
            try:
                await asyncio.wait_for(room, left)
            except TimeoutError:
                raise error_for(errno.ETIMEDOUT, "write", f"stream {self.stream!r}: the daemon took no records for {c.timeout} s") from None

    def _wake_room(self) -> None:
        """On the loop: every waiting write() looks again (one wakeup per drained batch, for all of them)."""
        with self._lock:
            waiters, self._room = self._room, []
            self._wake_pending = False
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _request(self, kind: str, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        req = _Request(kind, loop, timeout)
        with self._lock:
            if kind == "flush":
                self._raise_pending_error()
            self._enqueue_locked(req, 0)
        try:
            await asyncio.wait_for(asyncio.shield(req.future), timeout)
        except TimeoutError:
            raise error_for(errno.ETIMEDOUT, kind, f"{kind} of stream {self.stream!r} not confirmed within {timeout} s") from None

    async def flush(self, timeout: float | None = None) -> None:
        """Return once every record written before this call is in the stream's file."""
        _ = self.client  # connected?
        if self._closing:
            return
        await self._request("flush", timeout)

    async def close(self) -> None:
        """Flush through the writer thread, then close the connection. Idempotent. Raises what a
        queued write ran into (the daemon gone, ...) after closing: those records were not taken."""
        if self._client is None or self._closing or self._client._closed:
            return
        try:
            await self._request("close", None)  # behind every queued write; the thread then ends
        finally:
            self._closing = True
        with self._lock:
            self._raise_pending_error()

    def stats(self) -> dict[str, Any]:
        return self.client.stats()

    # -- the writer thread -------------------------------------------------------------------------
    def _run(self) -> None:
        client = self.client
        while True:
            with self._lock:
                while not self._queue:
                    self._idle = True
                    self._work.wait()
                self._idle = False
                item = self._queue.popleft()
                batch: list[bytes] = [item] if isinstance(item, bytes) else []
                size = len(batch[0]) if batch else 0
                while batch and self._queue and isinstance(self._queue[0], bytes):
                    nxt = self._queue.popleft()
                    assert isinstance(nxt, bytes)
                    size += len(nxt)
                    batch.append(nxt)
            if batch:
                try:
                    client.write(b"".join(batch) if len(batch) > 1 else batch[0])
                except Exception as exc:  # the daemon gone, a timeout: the next call says so
                    with self._lock:
                        self._error = exc
                self._drained(size)
                continue
            assert isinstance(item, _Request)
            try:
                if item.kind == "flush":
                    client.flush(item.left())
                else:
                    client.close()
                item.resolve(None)
            except Exception as exc:
                item.resolve(exc)
            if item.kind == "close":
                return

    def _drained(self, size: int) -> None:
        with self._lock:
            self._queued -= size
            wake = bool(self._room) and not self._wake_pending
            self._wake_pending |= wake
        if wake and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake_room)
            except RuntimeError:
                pass  # the loop is closed

    def _drain_at_exit(self, timeout: float) -> None:
        """Interpreter exit: let the thread move what is queued into the arena (client.py flushes it)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                return
            done = threading.Event()
            self._queue.append(_ExitMarker(done))
            if self._idle:
                self._work.notify()
        done.wait(timeout)


class _ExitMarker(_Request):
    """Queued at interpreter exit, when no loop runs any more: resolving it just sets an Event."""

    def __init__(self, done: threading.Event):
        self.kind = "flush"
        self.done = done

    def left(self) -> float | None:
        return 0.0  # hand the last segment over; client.py's exit hook waits for the release

    def resolve(self, exc: BaseException | None) -> None:
        self.done.set()


def _drain_all_at_exit() -> None:
    for ac in list(_live):
        try:
            ac._drain_at_exit(EXIT_FLUSH_TIMEOUT)
        except Exception:
            pass


def _reset_all_in_child() -> None:
    for ac in list(_live):
        ac._reset()


atexit.register(_drain_all_at_exit)
os.register_at_fork(after_in_child=_reset_all_in_child)
