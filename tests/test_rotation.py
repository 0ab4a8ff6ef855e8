"""Rotation: logrotate's copytruncate (copy the file, then truncate it in place) never leaves NUL bytes behind."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from conftest import finish_producer
from lsk_helpers import ENGINES, NUL, protocol, read_line, record, wait_for


def _stream_batches(sock: str) -> int:
    """The "app" stream's batch counter, asked over the control socket in-process (fast)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect(sock)
        c.sendall(protocol.encode({"t": protocol.STATUS}))
        dec = protocol.ControlDecoder()
        while True:
            for msg in dec.feed(c.recv(1 << 20)):
                return msg["status"]["streams"].get("app", {}).get("batches", 0)


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
        for round_ in range(60):
            wait_for(lambda: path.stat().st_size > 128 << 10, 30, f"the file to grow again (round {round_})")
            # Any batch that raced the last truncation is repaired before its counters move: once
            # two more batches landed, the file must hold no hole, whatever the race did.
            done = _stream_batches(d.sock)
            wait_for(lambda done=done: _stream_batches(d.sock) >= done + 2, 30, "two more batches")
            with open(path, "rb") as fh:  # what logrotate's copy keeps (it may end mid-batch)
                copy = fh.read()
            assert NUL not in copy, f"round {round_}: the file holds NUL bytes at {copy.index(NUL)} of {len(copy)}"
            os.truncate(path, 0)
        out = finish_producer(busy, input=b"")
        data = path.read_bytes()
        assert NUL not in data, f"the file holds NUL bytes at offset {data.index(NUL)} of {len(data)}"
        assert data.endswith(b"\n")
        idx = _whole_records(data, "ct")
        assert idx == sorted(idx) and idx[-1] == out["count"] - 1
