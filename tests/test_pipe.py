"""`logsink pipe STREAM`: stdin to a stream, by splice when stdin is a pipe, cut only at newlines."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lsk_helpers import make_records

PIPE = [sys.executable, "-m", "logsink", "pipe"]


def run_pipe(d, stream: str, stdin, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOGSINK_SOCKET": d.sock}
    return subprocess.run([*PIPE, stream], stdin=stdin, env=env, capture_output=True, timeout=timeout, check=False)


class TestPipeFromAPipe:
    @pytest.mark.parametrize("engine", ["io_uring", "splice", "readwrite"])
    def test_pipe_input_lands_byte_exact_and_moves_by_splice(self, daemon, engine):
        """200k records written into a pipe arrive byte-exact, and the relay moved them without copying them."""
        d = daemon(engine)
        data = b"".join(make_records("pipe", 200_000))
        r_fd, w_fd = os.pipe()
        writer = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"],
                                  stdin=subprocess.PIPE, stdout=w_fd)
        os.close(w_fd)
        relay = subprocess.Popen([*PIPE, "p"], stdin=r_fd, env={**os.environ, "LOGSINK_SOCKET": d.sock}, stderr=subprocess.PIPE)
        os.close(r_fd)
        writer.communicate(data, timeout=60)
        _, err = relay.communicate(timeout=60)
        assert relay.returncode == 0, err.decode()
        assert d.log("p").read_bytes() == data
        st = d.status()
        assert st["streams"]["p"]["records"] == 200_000
        if engine != "readwrite":
            assert st["totals"]["bytes_copied"] == 0

    def test_last_line_without_newline_is_terminated_not_lost(self, daemon):
        """A final partial line gets its '\\n' and lands."""
        d = daemon("io_uring")
        p = subprocess.Popen(["printf", "one\\ntwo\\nthree-without-newline"], stdout=subprocess.PIPE)
        res = run_pipe(d, "partial", p.stdout)
        p.wait()
        assert res.returncode == 0, res.stderr.decode()
        assert d.log("partial").read_bytes() == b"one\ntwo\nthree-without-newline\n"

    def test_line_split_across_slow_writes_stays_whole(self, daemon):
        """A writer that sends half a line, pauses, then the rest, still yields whole lines (the relay waits for the newline)."""
        d = daemon("io_uring")
        script = "import sys, time\nfor i in range(5):\n    sys.stdout.write(f'part{i}-'); sys.stdout.flush(); time.sleep(0.03)\n    sys.stdout.write(f'end{i}\\n'); sys.stdout.flush()\n"
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        res = run_pipe(d, "slow", p.stdout)
        p.wait()
        assert res.returncode == 0, res.stderr.decode()
        assert d.log("slow").read_bytes() == b"".join(b"part%d-end%d\n" % (i, i) for i in range(5))

    def test_line_longer_than_the_pipe_lands_whole(self, daemon):
        """A 300 KB line (longer than the 64 KiB input pipe) is assembled and lands as one record."""
        d = daemon("io_uring")
        script = "import sys; sys.stdout.write('a\\n' + 'x' * 300000 + '\\nb\\n')"
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        res = run_pipe(d, "long", p.stdout)
        p.wait()
        assert res.returncode == 0, res.stderr.decode()
        assert d.log("long").read_bytes() == b"a\n" + b"x" * 300000 + b"\nb\n"


class TestPipeFromAFile:
    def test_regular_file_on_stdin_is_copied_whole(self, daemon, tmp_path):
        """A regular file on stdin (no splice possible) lands byte-exact, its unterminated tail terminated."""
        d = daemon("splice")
        src = tmp_path / "in.txt"
        src.write_bytes(b"".join(make_records("file", 10_000)) + b"tail")
        with open(src, "rb") as fh:
            res = run_pipe(d, "file", fh)
        assert res.returncode == 0, res.stderr.decode()
        assert d.log("file").read_bytes() == src.read_bytes() + b"\n"

    def test_unreachable_daemon_is_a_clear_error(self, tmp_path):
        """Without a daemon the command fails with exit 1 and says where it looked."""
        env = {**os.environ, "LOGSINK_SOCKET": str(tmp_path / "none.sock")}
        res = subprocess.run([*PIPE, "x"], stdin=subprocess.DEVNULL, env=env, capture_output=True, timeout=30)
        assert res.returncode == 1
        assert b"cannot reach the logsink daemon" in res.stderr
