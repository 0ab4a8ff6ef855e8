"""Fuzz target: bytes on the TCP port, before HELLO (garbage, mutated HELLOs, early batches) and as
frames after WELCOME, beside good producers: local ones and a TCP one on the shared stream."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from lsk_helpers import protocol

from fuzz.harness import Target, corpus, fuzz_settings
from fuzz.strategies import control_frame, frame_header, framed, hello_message, named_stream, pack, pipe_any_stream, pipe_lines_stream

FUZZ_TCP = True  # the module's daemon listens on loopback TCP as well


def send_raw(target: Target, data: bytes) -> None:
    """One example: a fresh TCP connection gets ``data`` and is ended; the daemon answers with
    well-formed control messages only and closes it. If a HELLO in ``data`` is accepted before the
    bytes after it arrive, those bytes are its batches: they count as aimed at its stream."""
    with target.example() as ex:
        conn = ex.connect_tcp()
        conn.stream = named_stream(data)
        if conn.stream is not None:
            ex.sent[conn.stream] += data
        conn.send(data)


def send_frames(target: Target, data: bytes, transport: str = "copy") -> None:
    """One example: a TCP producer on the shared stream is WELCOMEd, then sends ``data`` as its
    batch stream and ends the connection."""
    with target.example() as ex:
        conn = ex.connect_tcp()
        conn.stream = target.app
        conn.send(protocol.encode(protocol.hello(target.app, 4242, transport)))
        reply = conn.hello_reply()
        assert reply is not None and reply["t"] == protocol.WELCOME, f"a valid TCP HELLO was answered with {reply}"
        ex.write_pipe(conn, data)


@pytest.fixture(scope="module")
def raw_target(live):
    t = Target(live, "tcpraw.", tcp_good=True)
    yield t
    t.close()


@pytest.fixture(scope="module")
def lines_target(live):
    t = Target(live, "tcplines.", tcp_good=True)
    yield t
    t.close()


@pytest.fixture(scope="module")
def any_target(live):
    t = Target(live, "tcpany.", tcp_good=True)
    yield t
    t.close()


@st.composite
def before_welcome(draw, target: Target) -> bytes:
    """What a TCP peer may send first: junk, control frames, or a (mutated) HELLO with or without
    bytes after it that arrive before WELCOME."""
    kind = draw(st.sampled_from(["junk", "frames", "hello", "hello"]))
    if kind == "junk":
        return draw(st.binary(min_size=1, max_size=200))
    if kind == "frames":
        return b"".join(draw(st.lists(control_frame(), min_size=1, max_size=3)))
    msg = draw(hello_message([target.app, target.other], protocol.TCP_TRANSPORTS))
    return framed(pack(msg)) + draw(st.just(b"") | st.binary(min_size=1, max_size=64) | pipe_lines_stream)


class TestTcpFuzz:
    @fuzz_settings(ci_examples=60)
    @given(data=st.data())
    def test_any_first_bytes_on_the_tcp_port_cost_nobody_else(self, raw_target, data):
        """Junk, control frames or mutated HELLOs (with early batch bytes) as a TCP peer's first
        bytes: the daemon answers well-formed messages, closes the connection, and the good local
        and TCP producers land byte-exact."""
        send_raw(raw_target, data.draw(before_welcome(raw_target)))

    @fuzz_settings(ci_examples=50)
    @given(data=pipe_lines_stream, transport=st.sampled_from(protocol.TCP_TRANSPORTS))
    def test_broken_headers_and_cut_batches_over_tcp_cost_only_their_producer(self, lines_target, data, transport):
        """After WELCOME, whole-line batches with refused headers or cut anywhere: only the fuzzed
        TCP producer is ended; every line in the shared file is whole."""
        send_frames(lines_target, data, transport)

    @fuzz_settings(ci_examples=30)
    @given(data=pipe_any_stream)
    @example(data=frame_header(payload_len=24, records=1) + b"partial line, no newline")  # the repro, over TCP
    def test_any_frame_bytes_over_tcp_never_glue_onto_another_producers_line(self, any_target, data):
        """After WELCOME, any bytes as batches: no line of the shared file mixes the fuzzed TCP
        producer's bytes with a good record."""
        send_frames(any_target, data)


@pytest.fixture(scope="module")
def seed_target(live):
    # Seeds with a HELLO name the stream "app" (make_corpus.py): the replay runs on exactly that.
    t = Target(live, "", tcp_good=True)
    yield t
    t.close()


class TestTcpCorpus:
    @pytest.mark.parametrize("seed", corpus("tcp"))
    def test_saved_first_bytes_on_the_tcp_port(self, seed_target, seed: Path):
        """A saved input (corpus/tcp/) as a TCP peer's first bytes leaves the good producers byte-exact."""
        send_raw(seed_target, seed.read_bytes())

    @pytest.mark.parametrize("seed", corpus("pipe"))
    def test_saved_batch_bytes_after_welcome(self, live, seed: Path):
        """A saved data-pipe input (corpus/pipe/) sent as a TCP producer's batches costs only that producer."""
        target = Target(live, f"tcp-{seed.stem}.", tcp_good=True)
        try:
            send_frames(target, seed.read_bytes())
        finally:
            target.close()
