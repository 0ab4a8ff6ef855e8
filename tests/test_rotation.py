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


class TestShippedLogrotateSnippet:
    @pytest.mark.skipif(not os.path.exists("/usr/sbin/logrotate"), reason="logrotate is not installed")
    def test_real_logrotate_with_the_snippet_rotates_without_loss(self, daemon, tmp_path):
        """systemd/logsink.logrotate, pointed at a test daemon's directory (its user and HUP command swapped for the test's), run by the real logrotate twice while a producer writes: every record is in exactly one of the files, the daemon made the new file itself, and the old one was compressed on the next rotation."""
        import gzip
        import pwd
        import threading
        from pathlib import Path

        import logsink

        d = daemon("io_uring")
        snippet = (Path(__file__).resolve().parent.parent / "systemd" / "logsink.logrotate").read_text()
        assert "su logsink logsink" in snippet and "nocreate" in snippet
        user = pwd.getpwuid(os.getuid()).pw_name
        conf = tmp_path / "logrotate.conf"
        conf.write_text(snippet.replace("/var/log/logsink/*.log", f"{d.dir}/*.log")
                        .replace("su logsink logsink", f"su {user} {user}")
                        .replace("systemctl kill -s HUP logsink.service", f"kill -HUP {d.pid}"))
        state = tmp_path / "logrotate.state"
        stop = threading.Event()
        written = []

        def produce() -> None:
            with logsink.Client("app", socket=d.sock) as c:
                i = 0
                while not stop.is_set() or i < 3000:
                    c.write(b"rot %06d\n" % i)
                    written.append(i)
                    i += 1
                    if i % 500 == 0:
                        c.flush(timeout=10)

        t = threading.Thread(target=produce)
        t.start()
        try:
            for rnd in range(2):
                wait_for(lambda: (d.dir / "app.log").exists() and (d.dir / "app.log").stat().st_size > 0, 30, "records in app.log")
                r = subprocess.run(["logrotate", "-f", "-s", str(state), str(conf)], capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, r.stdout + r.stderr
                wait_for(lambda: (d.dir / "app.log").exists(), 30, f"the daemon to create app.log after rotation {rnd + 1}")
        finally:
            stop.set()
            t.join(60)
        data = b""
        for rotated in sorted(d.dir.glob("app.log.*"), reverse=True):  # oldest (.2.gz) first
            data += gzip.decompress(rotated.read_bytes()) if rotated.suffix == ".gz" else rotated.read_bytes()
        data += (d.dir / "app.log").read_bytes()
        assert sorted(p.name for p in d.dir.glob("app.log*")) == ["app.log", "app.log.1", "app.log.2.gz"]
        assert data == b"".join(b"rot %06d\n" % i for i in range(len(written)))
        assert (d.dir / "app.log").stat().st_mode & 0o777 == 0o640  # the daemon's mode, not logrotate's
