"""The fuzz harness's own checks: each invariant reports the damage it exists for (no daemon needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lsk_helpers import protocol, record

from fuzz.harness import FileState, Target, predict
from fuzz.strategies import framed, pack


class FakeLive:
    def __init__(self, d: Path):
        self.dir = d
        self.streams = {"app"}


def checker(tmp_path: Path, written: int = 2) -> Target:
    """A Target with no daemon behind it: one stream "app" written by good producer "g"."""
    t = Target.__new__(Target)
    t.live = FakeLive(tmp_path)
    t.files = {"app": FileState(0, {"g": 0})}
    t.written = {"g": written}
    return t


GOOD = [record("g", 0), record("g", 1)]


class TestFileCheck:
    def test_good_records_and_whole_fuzzed_lines_pass(self, tmp_path):
        """Good records in order with whole fuzzed lines between them are no problem."""
        (tmp_path / "app.log").write_bytes(GOOD[0] + b"fz one\n" + GOOD[1] + b"fz two\n")
        assert checker(tmp_path).check_file("app", b"fz one\nfz two\n") == []

    def test_fuzzed_bytes_glued_onto_a_good_record_are_reported(self, tmp_path):
        """A fuzzed partial line followed by a good record (the issue's glue) is a problem."""
        (tmp_path / "app.log").write_bytes(b"partial" + GOOD[0] + GOOD[1])
        problems = checker(tmp_path).check_file("app", b"partial")
        assert problems and "neither the next good record" in problems[0]

    def test_torn_last_line_is_reported(self, tmp_path):
        """A file that ends without a newline is a problem even if the bytes are the fuzzer's."""
        (tmp_path / "app.log").write_bytes(GOOD[0] + GOOD[1] + b"fz no newline")
        assert any("torn line" in p for p in checker(tmp_path).check_file("app", b"fz no newline"))

    def test_nul_hole_is_reported(self, tmp_path):
        """A run of NUL bytes nobody sent (a hole) is a problem."""
        (tmp_path / "app.log").write_bytes(GOOD[0] + b"\0" * 16 + b"\n" + GOOD[1])
        problems = checker(tmp_path).check_file("app", b"fz x\n")
        assert problems and "NUL" in problems[0]

    def test_missing_or_reordered_good_records_are_reported(self, tmp_path):
        """A good record missing, or two out of order, is a problem."""
        (tmp_path / "app.log").write_bytes(GOOD[0])
        assert checker(tmp_path).check_file("app", b"") != []
        (tmp_path / "app.log").write_bytes(GOOD[1] + GOOD[0])
        assert checker(tmp_path).check_file("app", b"") != []

    def test_a_torn_good_record_is_reported(self, tmp_path):
        """A good record cut short (its newline kept) is a problem."""
        (tmp_path / "app.log").write_bytes(GOOD[0][:10] + b"\n" + GOOD[1])
        assert checker(tmp_path).check_file("app", b"") != []

    def test_each_check_reads_on_from_the_last(self, tmp_path):
        """A second check looks only at what was written since the first."""
        t = checker(tmp_path, written=1)
        (tmp_path / "app.log").write_bytes(GOOD[0])
        assert t.check_file("app", b"") == []
        t.written["g"] = 2
        with open(tmp_path / "app.log", "ab") as f:
            f.write(b"fz later\n" + GOOD[1])
        assert t.check_file("app", b"fz later\n") == []
        assert t.files["app"].offset == len(GOOD[0] + b"fz later\n" + GOOD[1])

    def test_unexpected_file_in_the_directory_is_reported(self, tmp_path):
        """A file that is not a known stream's log (e.g. created for a bad name) is a problem."""
        (tmp_path / "app.log").write_bytes(b"")
        (tmp_path / "escape.log").write_bytes(b"")
        assert checker(tmp_path).check_dir() == ["unexpected entries in the daemon's directory: ['escape.log']"]


HELLO = framed(pack(protocol.hello("app", 1, "copy")))


class TestPrediction:
    @pytest.mark.parametrize(
        ("data", "fds", "welcome", "codes"),
        [
            (HELLO, 1, True, set()),
            (HELLO, 0, False, {protocol.E_BAD_FD}),
            (HELLO, 2, False, {protocol.E_BAD_FD}),
            (framed(pack(protocol.hello("app", 1, "copy", v=2))), 1, False, {protocol.E_BAD_VERSION}),
            (framed(pack(protocol.hello("../x", 1, "copy"))), 1, False, {protocol.E_BAD_STREAM}),
            (framed(pack(protocol.hello("app", 1, "zerocopy"))), 1, False, {protocol.E_BAD_MESSAGE}),
            (HELLO + HELLO, 1, True, {protocol.E_BAD_MESSAGE}),
            (HELLO + b"\0\0\0\0", 1, None, {protocol.E_BAD_MESSAGE}),
            (HELLO[:-3], 1, False, set()),
            (protocol.encode({"t": "status"}), 0, False, set()),
        ],
        ids=["valid", "no-fd", "two-fds", "version", "stream", "tcp-transport", "twice", "then-garbage", "truncated", "status"],
    )
    def test_prediction_follows_the_protocol_doc(self, data, fds, welcome, codes):
        """The oracle answers what docs/protocol.md says the daemon answers."""
        want = predict(data, fds)
        assert (want.welcome, set(want.codes), want.must_error) == (welcome, codes, bool(codes))
