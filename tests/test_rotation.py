"""Rotation: logrotate's copytruncate (copy the file, then truncate it in place) never leaves NUL bytes behind."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import finish_producer
from lsk_helpers import ENGINES, NUL, read_line, record, wait_for


def _whole_records(data: bytes, tag: str) -> list[int]:
    """The record indexes of ``data``'s lines; every line must be a whole record of ``tag``."""
    idx = []
    for line in data.splitlines(keepends=True):
        i = int(line.split(b":", 2)[1])
        assert line == record(tag, i), f"line is not record {i}: {line[:120]!r}"
        idx.append(i)
    return idx


class TestCopytruncate:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_copy_then_truncate_loop_never_leaves_nul_bytes(self, daemon, producers, engine):
        """Truncating the live file again and again under a busy producer never leaves a hole of NULs in it."""
        d = daemon(engine)
        busy = producers({"socket": d.sock, "stream": "app", "tag": "ct", "mode": "until-stdin",
                          "client": {"segment_size": 64 << 10, "segments": 4}}, stdin=subprocess.PIPE)
        assert read_line(busy, 30, "ready") == "ready"
        path = d.log("app")
        for round_ in range(40):
            wait_for(lambda: path.stat().st_size > 256 << 10, 30, f"the file to grow again (round {round_})")
            with open(path, "rb") as fh:  # what logrotate's copy would keep (it may end mid-batch)
                copy = fh.read()
            os.truncate(path, 0)
            assert NUL not in copy, f"round {round_}: the copy holds NUL bytes at {copy.index(NUL)}"
        out = finish_producer(busy, input=b"")
        data = path.read_bytes()
        assert NUL not in data, f"the file holds NUL bytes at offset {data.index(NUL)} of {len(data)}"
        assert data.endswith(b"\n")
        idx = _whole_records(data, "ct")
        assert idx == sorted(idx) and idx[-1] == out["count"] - 1
