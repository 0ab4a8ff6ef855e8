"""The engine driven directly (logsink._native), for cases a daemon cannot easily set up."""

from __future__ import annotations

import os
import resource
import time

import pytest
from lsk_helpers import ENGINES, protocol, wait_for

KINDS = {"io_uring": 1, "splice": 2, "readwrite": 3}


@pytest.fixture
def native():
    from logsink._native import ffi, lib

    return ffi, lib


class Engine:
    """One engine with one stream (fd) and pipe producers; events collected as (name, producer, seq)."""

    def __init__(self, native, kind: str, fd: int):
        self.ffi, self.lib = native
        out = self.ffi.new("struct ls_engine **")
        assert self.lib.ls_engine_new(KINDS[kind], 4, 4, 1 << 20, out) == 0
        self.e = out[0]
        assert self.lib.ls_engine_set_stream(self.e, 0, fd, os.fstat(fd).st_size) == 0
        self.names = {getattr(self.lib, n): n for n in dir(self.lib) if n.startswith("LS_EV_")}
        self.buf = self.ffi.new("struct ls_event[64]")
        self.seen: list[tuple[str, int, int]] = []

    def add(self, pid: int) -> int:
        r, w = os.pipe()
        assert self.lib.ls_engine_add_producer(self.e, pid, 0, r) == 0
        return w

    def poll(self) -> list[tuple[str, int, int]]:
        n = self.lib.ls_engine_poll_events(self.e, self.buf, 64)
        self.seen += [(self.names.get(v.kind, str(v.kind)), v.producer_id, v.seq) for v in self.buf[0:n]]
        return self.seen

    def wait(self, event: tuple[str, int, int], what: str) -> None:
        wait_for(lambda: event in self.poll(), 10, what)

    def close(self) -> None:
        self.lib.ls_engine_free(self.e)


def batch(seq: int, recs: list[bytes]) -> bytes:
    payload = b"".join(recs)
    return protocol.pack_frame_header(len(payload), len(recs), seq) + payload


class TestCopyModeKeepsGoing:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_stream_in_copy_mode_takes_every_batch(self, native, tmp_path, engine):
        """After a file refuses splice (O_APPEND makes splice fail with EINVAL), every later batch still lands, on every engine."""
        path = tmp_path / "app.log"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        eng = Engine(native, engine, fd)
        try:
            w = eng.add(0)
            for seq in range(1, 6):
                os.write(w, batch(seq, [b"rec %d\n" % seq]))
                eng.wait(("LS_EV_BATCH_DONE", 0, seq), f"batch {seq} to land")
            os.close(w)
            assert path.read_bytes() == b"".join(b"rec %d\n" % s for s in range(1, 6))
            if engine != "readwrite":
                assert sum(1 for ev in eng.seen if ev[0] == "LS_EV_STREAM_COPY") == 1
        finally:
            eng.close()
            os.close(fd)


class TestWaitingProducerDoesNotSpin:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_hung_up_producer_waiting_for_a_paused_stream_costs_no_cpu(self, native, tmp_path, engine):
        """A producer whose client exited while it waits for its (paused) stream does not spin the engine thread."""
        fd = os.open(tmp_path / "app.log", os.O_RDWR | os.O_CREAT, 0o640)
        eng = Engine(native, engine, fd)
        try:
            assert eng.lib.ls_engine_pause_stream(eng.e, 0, 1) == 0
            w = eng.add(0)
            os.write(w, batch(1, [b"one\n"]))
            os.close(w)  # the client flushed and exited
            time.sleep(0.2)  # let the engine reach WAIT_STREAM
            t0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            time.sleep(1.0)
            t1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            cpu = (t1.ru_utime + t1.ru_stime) - (t0.ru_utime + t0.ru_stime)
            assert cpu < 0.25 * (w1 - w0), f"{cpu:.2f}s CPU in {w1 - w0:.2f}s while idle"
            assert eng.lib.ls_engine_pause_stream(eng.e, 0, 0) == 0
            eng.wait(("LS_EV_BATCH_DONE", 0, 1), "the batch to land once resumed")
        finally:
            eng.close()
            os.close(fd)


class TestStreamBound:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_bound_stops_new_batches_and_keeps_its_allowance_across_a_new_file(self, native, tmp_path, engine):
        """No batch starts at or past the bound; raising it serves the waiter; a new file (rotation)
        keeps the allowance that was left, in the new file's offsets; 0 lifts it."""
        fd = os.open(tmp_path / "app.log", os.O_RDWR | os.O_CREAT, 0o640)
        eng = Engine(native, engine, fd)
        try:
            assert eng.lib.ls_engine_bound_stream(eng.e, 0, 10) == 0
            w = eng.add(0)
            os.write(w, batch(1, [b"0123456789ab\n"]))  # starts below the bound: lands whole (13 bytes)
            eng.wait(("LS_EV_BATCH_DONE", 0, 1), "the first batch")
            os.write(w, batch(2, [b"two\n"]))
            os.write(w, batch(3, [b"three\n"]))
            time.sleep(0.3)  # room for a batch that should not start
            assert ("LS_EV_BATCH_DONE", 0, 2) not in eng.poll() and os.fstat(fd).st_size == 13
            assert eng.lib.ls_engine_bound_stream(eng.e, 0, 15) == 0  # room for one more start
            eng.wait(("LS_EV_BATCH_DONE", 0, 2), "the batch the raised bound lets start")
            time.sleep(0.3)
            assert ("LS_EV_BATCH_DONE", 0, 3) not in eng.poll() and os.fstat(fd).st_size == 17
            fd2 = os.open(tmp_path / "app.log.new", os.O_RDWR | os.O_CREAT, 0o640)
            os.write(fd2, b"x" * 100)
            assert eng.lib.ls_engine_pause_stream(eng.e, 0, 1) == 0  # (so the raise alone starts nothing)
            assert eng.lib.ls_engine_bound_stream(eng.e, 0, 20) == 0  # 3 bytes of allowance left at 17
            assert eng.lib.ls_engine_set_stream(eng.e, 0, fd2, 100) == 0  # ... so 103 in the new file
            assert eng.lib.ls_engine_pause_stream(eng.e, 0, 0) == 0
            eng.wait(("LS_EV_BATCH_DONE", 0, 3), "the batch within the carried allowance")
            os.write(w, batch(4, [b"four\n"]))
            time.sleep(0.3)
            assert ("LS_EV_BATCH_DONE", 0, 4) not in eng.poll() and os.fstat(fd2).st_size == 106
            assert eng.lib.ls_engine_bound_stream(eng.e, 0, 0) == 0
            eng.wait(("LS_EV_BATCH_DONE", 0, 4), "the batch once the bound is lifted")
            assert os.pread(fd2, 100, 0) == b"x" * 100 and os.pread(fd2, 100, 100) == b"three\nfour\n"
            os.close(w)
            os.close(fd2)
        finally:
            eng.close()
            os.close(fd)


class TestRemoval:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_remove_without_drain_ends_a_producer_stopped_mid_header(self, native, tmp_path, engine):
        """remove(drain=0) of a producer that wrote part of a header and keeps its pipe open frees its slot."""
        fd = os.open(tmp_path / "app.log", os.O_RDWR | os.O_CREAT, 0o640)
        eng = Engine(native, engine, fd)
        try:
            w = eng.add(0)
            os.write(w, batch(1, [b"one\n"])[:10])
            time.sleep(0.1)  # let the engine read the partial header
            assert eng.lib.ls_engine_remove_producer(eng.e, 0, 0) == 0
            eng.wait(("LS_EV_PRODUCER_REMOVED", 0, 0), "the producer to be removed")
            os.close(w)
        finally:
            eng.close()
            os.close(fd)
