"""logsink.AsyncClient: writes and flushes that wait through the event loop, never blocking it."""

from __future__ import annotations

import asyncio
import time

import pytest

import logsink
from lsk_helpers import assert_file, make_records


class TestAsyncClient:
    async def test_records_land_byte_exact_with_a_small_arena(self, daemon):
        """50k records through 4 segments of 4 KiB (so writes wait for releases) land whole and in order."""
        d = daemon("io_uring")
        recs = make_records("aio", 50_000)
        async with logsink.AsyncClient("aio", socket=d.sock, segments=4, segment_size=4096) as c:
            for r in recs:
                await c.write(r)
            await c.flush()
            st = c.stats()
        assert st["batches"] > 4 and st["waits_for_release"] == 0  # waits go through the loop, not the C wait
        assert_file(d.log("aio"), {"aio": recs})

    async def test_event_loop_keeps_running_while_segments_are_pinned(self, daemon):
        """With the daemon stopped, a write that needs a release waits without blocking the loop: a ticker keeps ticking."""
        d = daemon("io_uring")
        c = await logsink.AsyncClient.open("tick", socket=d.sock, segments=2, segment_size=4096)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())

        async def four_writes():
            for ch in b"wxyz":  # 3000-byte records: one per 4 KiB segment, so the third needs a release
                await c.write(bytes([ch]) * 3000 + b"\n")

        d.sigstop()
        try:
            writer = asyncio.create_task(four_writes())
            await asyncio.sleep(0.3)
            assert ticks >= 10, f"the event loop was blocked (ticks={ticks})"
            assert not writer.done(), "the writer should be waiting for a release"
        finally:
            d.sigcont()
        await asyncio.wait_for(writer, 20)
        await asyncio.wait_for(c.flush(), 20)
        t.cancel()
        await c.close()
        data = d.log("tick").read_bytes()
        assert data.count(b"\n") == 4

    async def test_flush_timeout_raises_timeout_error(self, daemon):
        """flush(timeout) on a stopped daemon raises TimeoutError after about the timeout."""
        d = daemon("io_uring")
        c = await logsink.AsyncClient.open("to", socket=d.sock)
        await c.write(b"one\n")
        d.sigstop()
        try:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await c.flush(timeout=0.3)
            assert 0.25 < time.monotonic() - t0 < 5
        finally:
            d.sigcont()
        await c.flush(10)
        await c.close()

    async def test_partial_record_is_a_value_error(self, daemon):
        """A write not ending in a newline raises ValueError, as with Client."""
        d = daemon("io_uring")
        async with logsink.AsyncClient("pv", socket=d.sock) as c:
            with pytest.raises(ValueError):
                await c.write(b"no newline")
