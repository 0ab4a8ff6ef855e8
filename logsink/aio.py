"""asyncio producer: ``logsink.AsyncClient`` waits for releases through the event loop, never in a blocking call."""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

from logsink._native import ffi, lib
from logsink.client import Client


class AsyncClient:
    """The asyncio face of :class:`logsink.Client` (same options, same arena and C producer).

    ``await write(data)`` appends whole records; when every segment is pinned it waits for the
    daemon's release on the producer's eventfd through the loop. ``await flush()`` returns once
    everything written before it is in the file. Use ``async with AsyncClient(...) as c`` or
    ``c = await AsyncClient.open(...)``. Connecting runs in the loop's executor.

    One wait can still happen inside a write: handing a full segment to the data pipe waits for
    the daemon to drain the pipe (not for a release), which is bounded by the daemon's write speed.
    """

    def __init__(self, stream: str, **client_options: Any):
        self.stream = stream
        self._options = client_options
        self._client: Client | None = None

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

    async def _wait_event(self, timeout: float | None = None) -> None:
        """Wait until the producer's eventfd says something changed (a release, an error)."""
        c = self.client
        fd = lib.ls_producer_event_fd(c._p)
        if fd < 0:
            raise c._error(fd, "waiting for a release")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            loop.remove_reader(fd)
        try:
            os.read(fd, 8)  # reset; a release after this increments it again, so none is missed
        except BlockingIOError:
            pass

    async def write(self, data: bytes) -> None:
        """Append one or more whole records (each ending in ``\\n``)."""
        c = self.client
        view = memoryview(data)
        deadline = None if c.timeout is None else asyncio.get_running_loop().time() + c.timeout
        while view.nbytes:
            p = c._handle()
            ret = lib.ls_producer_try_write(p, ffi.from_buffer(view), view.nbytes)
            if ret == view.nbytes:
                return
            if ret > 0:  # whole records of a split write were taken: go on with the rest
                view = view[ret:]
                continue
            if ret == -errno.EAGAIN:
                left = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if left is not None and left <= 0:
                    raise TimeoutError(f"all segments of stream {self.stream!r} are still pinned after {c.timeout} s")
                try:
                    await self._wait_event(left)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"all segments of stream {self.stream!r} are still pinned after {c.timeout} s") from None
                continue
            if ret == -errno.ECHILD:
                c._reopen_after_fork()
                continue
            raise c._error(ret, "write")

    async def flush(self, timeout: float | None = None) -> None:
        """Return once every record written before this call is in the stream's file."""
        c = self.client
        target = ffi.new("uint64_t *")
        ret = lib.ls_producer_flush_start(c._handle(), target)
        if ret == -errno.ECHILD:
            return
        if ret < 0:
            raise c._error(ret, "flush")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            ret = lib.ls_producer_flush_check(c._p, target[0])
            if ret == 0:
                return
            if ret == -errno.EIO:
                why = ffi.string(lib.ls_producer_last_error(c._p)).decode(errors="replace")
                raise OSError(errno.EIO, f"the logsink daemon could not write part of stream {self.stream!r}: {why}")
            if ret != -errno.EAGAIN:
                raise c._error(ret, "flush")
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError(f"flush of stream {self.stream!r} not confirmed within {timeout} s")
            try:
                await self._wait_event(left)
            except asyncio.TimeoutError:
                raise TimeoutError(f"flush of stream {self.stream!r} not confirmed within {timeout} s") from None

    async def close(self) -> None:
        """Flush through the loop, then close the connection. Idempotent."""
        if self._client is None or self._client._closed:
            return
        try:
            if self._client.connected:
                await self.flush()
        finally:
            self._client.close(timeout=0)  # nothing left to wait for: never blocks the loop

    def stats(self) -> dict[str, Any]:
        return self.client.stats()
