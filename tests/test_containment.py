"""Containment: a broken or hostile producer can only hurt its own records, never a stream's other producers."""

from __future__ import annotations

import fcntl
import os
import time

import pytest
from lsk_helpers import ENGINES, RawProducer, assert_file, make_records, protocol, wait_for

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _good_round(d, tag: str, n: int, start: int = 0, flush_timeout: float = 5.0) -> float:
    """A well-behaved Client writes ``n`` records to "app" and flushes; returns the flush's seconds."""
    import logsink

    with logsink.Client("app", socket=d.sock) as c:
        for rec in make_records(tag, n, start=start):
            c.write(rec)
        t0 = time.monotonic()
        c.flush(timeout=flush_timeout)
        return time.monotonic() - t0


class TestBatchMustEndInNewline:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_partial_line_is_cut_back_and_never_glued_to_the_next_producer(self, daemon, engine):
        """A batch whose payload does not end in \\n is cut back and refused; the next record lands whole."""
        d = daemon(engine)
        bad = RawProducer(d.sock)
        bad.hello("app")
        bad.expect_welcome()
        payload = b"partial line, no newline"
        bad.write_pipe(protocol.pack_frame_header(len(payload), 1, 1) + payload)
        msg = bad.expect_error(protocol.E_BAD_FRAME)
        assert "newline" in msg["reason"]
        assert bad.released == 0, "a batch that was cut back must not be released as landed"
        bad.close()
        _good_round(d, "g", 50)
        assert_file(d.log("app"), {"g": make_records("g", 50)})
        st = d.status()
        assert st["errors"]["bad-frame"] == 1
        assert st["streams"]["app"]["bytes"] == sum(len(r) for r in make_records("g", 50))

    @pytest.mark.parametrize("engine", ENGINES)
    def test_whole_batches_before_the_bad_one_stay(self, daemon, engine):
        """Only the offending batch is cut: the producer's earlier whole batches stay in the file."""
        d = daemon(engine)
        bad = RawProducer(d.sock)
        bad.hello("app")
        bad.expect_welcome()
        good = make_records("b", 10)
        bad.send_batch(good, 1)
        bad.wait_release(1)
        tail = b"b:no newline at the end"
        bad.write_pipe(protocol.pack_frame_header(len(good[0]) + len(tail), 2, 2) + good[0] + tail)
        bad.expect_error(protocol.E_BAD_FRAME)
        bad.close()
        _good_round(d, "g", 20)
        assert_file(d.log("app"), {"b": good, "g": make_records("g", 20)})


class TestStalledProducerDoesNotHoldTheStream:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_others_flush_while_a_producer_stalls_mid_batch(self, daemon, engine):
        """A producer that sends half a batch and stops never blocks other producers of its stream."""
        d = daemon(engine)
        stall = RawProducer(d.sock)
        stall.hello("app")
        stall.expect_welcome()
        recs = make_records("s", 40)
        payload = b"".join(recs)
        stall.write_pipe(protocol.pack_frame_header(len(payload), len(recs), 1) + payload[: len(payload) // 2])
        wait_for(lambda: d.status()["producers"][0]["pipe_bytes"] == len(payload) - len(payload) // 2 or
                 d.status()["producers"][0]["pipe_bytes"] == len(payload) // 2, 10, "the half batch to sit in the pipe")
        for round_ in range(3):
            secs = _good_round(d, f"g{round_}", 200, flush_timeout=5.0)
            assert secs < 5.0
        # The stalled producer finishes its batch late: it lands whole, after the others.
        stall.write_pipe(payload[len(payload) // 2 :])
        stall.wait_release(1)
        stall.close()
        assert_file(d.log("app"), {"s": recs, **{f"g{i}": make_records(f"g{i}", 200) for i in range(3)}})

    @pytest.mark.parametrize("engine", ENGINES)
    def test_producer_dying_with_half_a_batch_leaves_nothing_behind(self, daemon, engine):
        """A producer that dies mid-batch is reported as died and none of its partial bytes reach the file."""
        d = daemon(engine)
        bad = RawProducer(d.sock)
        bad.hello("app")
        bad.expect_welcome()
        payload = b"".join(make_records("x", 30))
        bad.write_pipe(protocol.pack_frame_header(len(payload), 30, 1) + payload[:100])
        _good_round(d, "g", 10)
        bad.close_pipe()
        bad.expect_error(protocol.E_PRODUCER_DIED)
        bad.close()
        _good_round(d, "h", 10)
        assert_file(d.log("app"), {"g": make_records("g", 10), "h": make_records("h", 10)})

    @pytest.mark.parametrize("engine", ENGINES)
    def test_batch_larger_than_its_pipe_is_refused(self, daemon, engine):
        """A header announcing more payload than the producer's pipe can hold is a bad frame (it could only stall)."""
        d = daemon(engine)
        bad = RawProducer(d.sock)
        bad.hello("app")
        fcntl.fcntl(bad.w, F_SETPIPE_SZ, 4096)
        bad.expect_welcome()
        bad.write_pipe(protocol.pack_frame_header(1 << 20, 1, 1) + b"y" * 1000)
        msg = bad.expect_error(protocol.E_BAD_FRAME)
        assert "pipe" in msg["reason"]
        bad.close()
        secs = _good_round(d, "g", 100)
        assert secs < 5.0
        assert_file(d.log("app"), {"g": make_records("g", 100)})

    @pytest.mark.parametrize("engine", ENGINES)
    def test_bytes_stolen_from_the_pipe_mid_batch_hurt_only_that_producer(self, daemon, engine):
        """A producer that reads its own batches back out of the pipe cannot hold the stream or glue lines."""
        d = daemon(engine)
        bad = RawProducer(d.sock)
        bad.pipe()
        thief = os.dup(bad.r)  # the producer keeps a read end of its own data pipe
        bad.hello("app", fds=[bad.r])  # closes our copy of the read end it sent
        bad.expect_welcome()
        os.set_blocking(thief, False)
        recs = make_records("t", 300)
        payload = b"".join(recs)
        for seq in range(1, 21):  # each batch races the engine: it lands whole, or not at all
            try:
                bad.write_pipe(protocol.pack_frame_header(len(payload), len(recs), seq) + payload)
                while os.read(thief, 1 << 16):
                    pass
            except (BlockingIOError, BrokenPipeError):
                pass
        os.close(thief)
        secs = _good_round(d, "g", 100)
        assert secs < 5.0
        bad.close()
        data = d.log("app").read_bytes()
        assert data.endswith(b"\n") and b"\0" not in data
        lines = data.splitlines(keepends=True)
        assert [ln for ln in lines if ln.startswith(b"g:")] == make_records("g", 100)
        for ln in lines:  # nothing was glued onto a good record
            if not ln.startswith(b"g:"):
                assert b"g:000" not in ln, f"a good record was glued into {ln[:120]!r}"


class TestStoppedClient:
    @pytest.mark.parametrize("engine", ("io_uring", "splice"))
    def test_sigstopped_client_never_freezes_its_stream(self, daemon, producers, engine):
        """A real Client stopped (SIGSTOP) at arbitrary points of its hand-overs never delays another producer's flush."""
        import signal
        import subprocess

        from conftest import finish_producer
        from lsk_helpers import read_line, record

        d = daemon(engine)
        busy = producers({"socket": d.sock, "stream": "app", "tag": "busy", "mode": "until-stdin",
                          "client": {"segment_size": 1 << 20, "segments": 4}}, stdin=subprocess.PIPE)
        assert read_line(busy, 30, "ready") == "ready"
        for round_ in range(12):
            time.sleep(0.01 * (round_ % 4))  # stop it at different points of its write/hand-over cycle
            os.kill(busy.pid, signal.SIGSTOP)
            try:
                secs = _good_round(d, f"g{round_}", 100, flush_timeout=5.0)
            finally:
                os.kill(busy.pid, signal.SIGCONT)
            assert secs < 5.0
        out = finish_producer(busy, input=b"")
        assert_file(d.log("app"), {**{f"g{i}": make_records(f"g{i}", 100) for i in range(12)}},
                    prefix_of={"busy": lambda i: record("busy", i)})
        assert out["count"] > 0


class TestDeepPipe:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_a_pipe_full_of_tiny_batches_never_overflows_the_engine_stack(self, daemon, engine):
        """200 000 one-record batches written back to back: the engine lands them all in order (it once recursed a frame per batch, 68 773 deep, and crashed with SIGSEGV)."""
        import threading

        d = daemon(engine)
        p = RawProducer(d.sock, timeout=60)
        p.hello("deep")
        p.expect_welcome()
        n = 200000
        frames = [protocol.pack_frame_header(8, 1, seq) + b"%07d\n" % seq for seq in range(1, n + 1)]
        writer = threading.Thread(target=lambda: [p.write_pipe(b"".join(frames[i:i + 500])) for i in range(0, n, 500)])
        writer.start()
        p.wait_release(n)
        writer.join(60)
        p.close()
        assert d.log("deep").read_bytes() == b"".join(b"%07d\n" % seq for seq in range(1, n + 1))
