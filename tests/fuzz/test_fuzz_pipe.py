"""Fuzz target: frame headers and payloads on the data pipe of an accepted producer, beside good
producers on the same stream and on another one."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from lsk_helpers import protocol

from fuzz.harness import Example, Target, corpus, fuzz_settings
from fuzz.strategies import frame_header, pipe_any_stream, pipe_lines_stream

# A stalled batch may hold the stream at most this long: others' flush() must come back within it.
STALL_FLUSH_TIMEOUT = 5.0


def accepted_producer(ex: Example, stream: str, transport: str = "copy"):
    """A raw producer on ``stream`` that the daemon WELCOMEd."""
    conn = ex.connect()
    conn.stream = stream
    conn.raw.hello(stream, transport=transport)
    reply = conn.hello_reply()
    assert reply is not None and reply["t"] == protocol.WELCOME, f"a valid HELLO was answered with {reply}"
    return conn


def feed_pipe(target: Target, data: bytes, transport: str = "copy") -> None:
    """One example: a producer on the shared stream writes ``data`` to its pipe and closes it."""
    with target.example() as ex:
        conn = accepted_producer(ex, target.app, transport)
        ex.write_pipe(conn, data)


@pytest.fixture(scope="module")
def lines_target(live):
    t = Target(live, "lines.")
    yield t
    t.close()


@pytest.fixture(scope="module")
def any_target(live):
    t = Target(live, "any.")
    yield t
    t.close()


# The transports whose pipe carries payload (shm's carries descriptors: tests/test_shm_engine.py).
PIPE_TRANSPORTS = tuple(t for t in protocol.LOCAL_TRANSPORTS if t != "shm")


class TestDataPipeFuzz:
    @fuzz_settings(ci_examples=80)
    @given(data=pipe_lines_stream, transport=st.sampled_from(PIPE_TRANSPORTS))
    def test_broken_headers_and_cut_batches_cost_only_their_producer(self, lines_target, data, transport):
        """Whole-line batches with headers the daemon must refuse (magic, version, header_len,
        payload_len, records), free fields at any value, cut anywhere then closed: good records land
        byte-exact and every other line is one the fuzzed producer sent whole."""
        feed_pipe(lines_target, data, transport)

    @fuzz_settings(ci_examples=60)
    @given(data=pipe_any_stream)
    @example(data=frame_header(payload_len=24, records=1) + b"partial line, no newline")  # the repro
    def test_any_pipe_bytes_never_glue_onto_another_producers_line(self, any_target, data):
        """Any bytes on the pipe (payloads without a final newline, lengths overstated or
        understated, NULs, garbage between batches): no line of the shared file mixes the fuzzed
        producer's bytes with a good record."""
        feed_pipe(any_target, data)


class TestStalledBatch:
    @fuzz_settings(ci_examples=3)
    @given(lines=st.lists(st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"~") + b"\n"), min_size=1, max_size=20),
           cut=st.floats(0, 1, exclude_max=True))
    def test_producer_stalled_mid_batch_does_not_hold_the_stream(self, live, lines, cut):
        """A producer that sends a header and part of its payload and then stalls (pipe held open):
        the good producer on the same stream still flushes within STALL_FLUSH_TIMEOUT."""
        target = Target(live, f"stall{len(live.streams)}.")
        try:
            with target.example() as ex:
                conn = accepted_producer(ex, target.app)
                payload = b"".join(lines)
                ex.write_pipe(conn, frame_header(payload_len=len(payload), records=len(lines)) + payload[: int(len(payload) * cut)])
                target.good_write(3)
                target.good_flush(timeout=STALL_FLUSH_TIMEOUT)
        finally:
            target.close()


class TestPipeCorpus:
    @pytest.mark.parametrize("seed", corpus("pipe"))
    def test_saved_pipe_input_costs_only_its_producer(self, live, seed: Path):
        """A saved input (corpus/pipe/), written to an accepted producer's pipe and then closed,
        leaves the good producers byte-exact and every line whole."""
        target = Target(live, f"{seed.stem}.")
        try:
            feed_pipe(target, seed.read_bytes())
        finally:
            target.close()
