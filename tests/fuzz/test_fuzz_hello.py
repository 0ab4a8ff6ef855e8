"""Fuzz target: HELLO mutations (every field dropped, retyped or changed, unknown keys, bad
framing), each sent with a pipe's read end the way a producer sends it, beside good producers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lsk_helpers import protocol

from fuzz.harness import Target, check_prediction, corpus, fuzz_settings, predict
from fuzz.strategies import framed, hello_message, named_stream, pack, whole_lines


def send_hello(target: Target, frame: bytes, lines: list[bytes]) -> None:
    """One example: ``frame`` goes out with a fresh pipe's read end (one sendmsg); the answer must be
    the one docs/protocol.md gives (WELCOME, or ERROR with the predicted code); once WELCOMEd the
    producer writes one batch of ``lines`` and closes its pipe."""
    want = predict(frame, fds=1)
    with target.example() as ex:
        conn = ex.connect()
        conn.stream = named_stream(frame)
        conn.raw.r, conn.raw.w = os.pipe()
        sent = conn.send(frame, [conn.raw.r])
        os.close(conn.raw.r)
        conn.raw.r = None
        if sent and want.welcome is not False:
            reply = conn.hello_reply()
            if reply is not None and reply["t"] == protocol.WELCOME:
                payload = b"".join(lines)
                ex.write_pipe(conn, protocol.pack_frame_header(len(payload), len(lines), 1) + payload)
        conn.end()
        conn.read_to_eof()
        problems = check_prediction(conn, want)
        assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def target(live):
    t = Target(live, "hello.", fuzz_streams=2)
    yield t
    t.close()


@st.composite
def hello_frames(draw, target: Target) -> bytes:
    """A mutated HELLO, framed right or wrong, sometimes followed by another frame."""
    msg = draw(hello_message([target.app, target.other, *target.extra], protocol.TRANSPORTS))
    body = pack(msg)
    how = draw(st.sampled_from(["framed", "framed", "framed", "truncated", "prefix-off", "followed"]))
    if how == "truncated":
        return framed(body)[: draw(st.integers(0, len(body) + 3))]
    if how == "prefix-off":
        return (len(body) + draw(st.integers(-len(body), 64).filter(lambda d: d != 0))).to_bytes(4, "big") + body
    if how == "followed":
        after = draw(st.sampled_from([framed(body), protocol.encode({"t": protocol.STATUS}), b"\xde\xad\xbe\xef", framed(b"\xc1")]))
        return framed(body) + after
    return framed(body)


class TestHelloFuzz:
    @fuzz_settings(ci_examples=100)
    @given(data=st.data(), lines=whole_lines)
    def test_mutated_hello_gets_the_documented_answer_and_costs_nobody_else(self, target, data, lines):
        """A HELLO with fields dropped, retyped or changed (version, stream, pid, transport, optional
        and unknown keys) and framed right or wrong: WELCOME exactly when the protocol module accepts
        it, otherwise ERROR with the code it predicts; an accepted one's batch lands whole."""
        send_hello(target, data.draw(hello_frames(target)), lines)


@pytest.fixture(scope="module")
def seed_target(live):
    # Seeds name the streams "app" and "other" (make_corpus.py): the replay runs on exactly those.
    t = Target(live, "")
    yield t
    t.close()


class TestHelloCorpus:
    @pytest.mark.parametrize("seed", corpus("hello"))
    def test_saved_hello_gets_the_documented_answer(self, seed_target, seed: Path):
        """A saved HELLO (corpus/hello/) sent with a pipe's read end gets the predicted answer; an
        accepted one's batch lands whole beside the good producers."""
        send_hello(seed_target, seed.read_bytes(), [b"fz seed line one\n", b"fz seed line two\n"])
