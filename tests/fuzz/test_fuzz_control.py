"""Fuzz target: bytes on the control socket (length-prefixed msgpack frames, well-formed or not,
split anywhere), without fds, beside good producers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz.harness import Target, check_prediction, corpus, fuzz_settings, predict
from fuzz.strategies import control_frame


@st.composite
def split_anywhere(draw, data: st.SearchStrategy[bytes]) -> list[bytes]:
    """The bytes, cut into up to 6 sends at arbitrary points."""
    blob = draw(data)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(blob) - 1)), max_size=5))) if len(blob) > 1 else []
    return [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=False)]


control_bytes = st.lists(control_frame(), min_size=1, max_size=4).map(b"".join)


def send_control(target: Target, chunks: list[bytes]) -> None:
    """One example: a fresh control connection gets ``chunks`` (no fds), then we end it; the daemon
    answers as docs/protocol.md says (see ``predict``) and closes."""
    want = predict(b"".join(chunks), fds=0)
    with target.example() as ex:
        conn = ex.connect()
        for chunk in chunks:
            if not conn.send(chunk):
                break
        conn.end()
        conn.read_to_eof()
        problems = check_prediction(conn, want)
        assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def target(live):
    t = Target(live, "control.")
    yield t
    t.close()


class TestControlSocketFuzz:
    @fuzz_settings(ci_examples=100)
    @given(chunks=split_anywhere(control_bytes))
    def test_any_control_bytes_get_the_documented_answer_and_cost_nobody_else(self, target, chunks):
        """Control frames of every shape (message-like maps, any msgpack value, junk, wrong length
        prefixes), split anywhere: the daemon answers STATUS, or ERROR with the code the protocol
        module predicts, then closes; good producers are unaffected."""
        send_control(target, chunks)


class TestControlCorpus:
    @pytest.mark.parametrize("seed", corpus("control"))
    def test_saved_control_input_gets_the_documented_answer(self, target, seed: Path):
        """A saved input (corpus/control/) sent on a fresh control connection gets the predicted
        answer and leaves the good producers byte-exact."""
        send_control(target, [seed.read_bytes()])
