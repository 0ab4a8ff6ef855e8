"""logsink.AsyncClient: writes and flushes that wait through the event loop, never blocking it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from lsk_helpers import assert_file, make_records, proc_state, record, wait_for

import logsink

# How long a stopped daemon stalls the writers in the heartbeat test, and the longest gap between two
# 10 ms heartbeats of the loop that still counts as "not blocked" (scheduling noise on 2 shared cores).
STALL = 1.5
MAX_HEARTBEAT_GAP = 0.2


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
        assert st["batches"] > 4
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
        c = await logsink.AsyncClient.open("to", socket=d.sock, flush_interval=None)
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


class TestSharedAsyncClient:
    @pytest.mark.parametrize("tasks", [8, 64])
    async def test_tasks_sharing_one_client_all_land_byte_exact(self, daemon, tasks):
        """Many tasks writing through one AsyncClient with a small arena all finish, and every record lands once, in order per task."""
        d = daemon("io_uring")
        per_task = 24_000 // tasks
        recs = {f"t{i}": make_records(f"t{i}", per_task) for i in range(tasks)}
        async with logsink.AsyncClient("shared", socket=d.sock, segments=4, segment_size=4096) as c:

            async def writer(tag):
                for r in recs[tag]:
                    await c.write(r)

            await asyncio.wait_for(asyncio.gather(*(writer(t) for t in recs)), 60)
            await asyncio.wait_for(c.flush(), 30)
        assert_file(d.log("shared"), recs)

    @pytest.mark.parametrize("transport", ["copy", "vmsplice"])
    async def test_loop_keeps_ticking_while_a_stopped_daemon_stalls_the_writers(self, daemon, transport):
        """With the daemon stopped for 1.5 s under 4 busy writers, a 10 ms heartbeat task never misses more than 0.2 s."""
        d = daemon("io_uring")
        c = await logsink.AsyncClient.open("hb", socket=d.sock, transport=transport)
        tags = [f"w{i}" for i in range(4)]
        written: dict[str, int] = {}
        gaps: list[float] = []
        stalled, done = asyncio.Event(), asyncio.Event()

        async def heartbeat():
            last = time.monotonic()
            while True:
                armed = stalled.is_set()  # gaps count only from a beat taken while stalled
                await asyncio.sleep(0.01)
                now = time.monotonic()
                if armed and stalled.is_set():
                    gaps.append(now - last)
                last = now

        async def writer(tag):
            i = 0
            while not done.is_set():
                await c.write(record(tag, i))
                i += 1
                if i % 64 == 0:
                    await asyncio.sleep(0)  # a well-behaved busy task: lets the others run
            written[tag] = i

        hb = asyncio.create_task(heartbeat())
        writers = [asyncio.create_task(writer(t)) for t in tags]
        await asyncio.sleep(0.2)
        d.sigstop()
        wait_for(lambda: proc_state(d.pid) == "T", 10, "the daemon to be stopped")
        # The resume comes from a thread: a blocked loop would otherwise never run it.
        resume = threading.Timer(STALL, d.sigcont)
        resume.start()
        stalled.set()
        try:
            await asyncio.sleep(STALL)
        finally:
            resume.join()
        stalled.clear()
        done.set()
        await asyncio.wait_for(asyncio.gather(*writers), 120)
        await asyncio.wait_for(c.flush(), 60)
        hb.cancel()
        await c.close()
        assert len(gaps) > 20, f"the loop barely ran while the daemon was stopped ({len(gaps)} heartbeats)"
        assert max(gaps) < MAX_HEARTBEAT_GAP, f"the event loop was blocked {max(gaps):.3f} s while the daemon was stopped"
        assert min(written.values()) > 1000, written
        assert_file(d.log("hb"), {t: make_records(t, n) for t, n in written.items()})
