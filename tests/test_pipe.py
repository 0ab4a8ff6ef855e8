"""`logsink pipe STREAM`: stdin to a stream, by splice when stdin is a pipe, cut only at newlines."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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


# The relay's data pipe is the default 1 MiB here (root: no per-user pipe budget in the way); a batch
# is its 32-byte header plus the payload, so one line may be 1 MiB - 32 bytes long, newline included.
MAX_LINE = (1 << 20) - 32
CUT = re.compile(rb"^(x*) \[logsink: line cut at (\d+) bytes\]\n$")
# Writes its stdin's data to stdout in 64 KiB pieces; exits 1 on EPIPE (the relay closed the pipe).
WRITER = ("import sys\ndata = sys.stdin.buffer.read()\n"
          "try:\n    [sys.stdout.buffer.write(data[i:i + 65536]) for i in range(0, len(data), 65536)]\n"
          "    sys.stdout.flush()\nexcept BrokenPipeError:\n    sys.exit(1)\n")


def relay_through_pipe(d, stream: str, data: bytes) -> subprocess.CompletedProcess:
    """``logsink pipe`` with a pipe on stdin fed by a writer process; both must exit 0."""
    r_fd, w_fd = os.pipe()
    writer = subprocess.Popen([sys.executable, "-c", WRITER], stdin=subprocess.PIPE, stdout=w_fd)
    os.close(w_fd)
    relay = subprocess.Popen([*PIPE, stream], stdin=r_fd, env={**os.environ, "LOGSINK_SOCKET": d.sock},
                             stderr=subprocess.PIPE)
    os.close(r_fd)
    writer.communicate(data, timeout=60)
    _, err = relay.communicate(timeout=60)
    assert writer.returncode == 0, "the writer got EPIPE: the relay stopped reading"
    assert relay.returncode == 0, err.decode()
    return subprocess.CompletedProcess(relay.args, relay.returncode, b"", err)


def assert_cut(line: bytes, original: int) -> None:
    m = CUT.match(line)
    assert m, line[-100:]
    assert int(m.group(2)) == len(m.group(1)) and len(line) <= MAX_LINE < original


class TestLongLines:
    def test_line_longer_than_a_batch_is_cut_with_a_marker_and_the_relay_goes_on(self, daemon):
        """A 3 MB line between records lands cut at the limit with a marker; the records around it land, the writer never sees EPIPE."""
        d = daemon("io_uring")
        before, after = make_records("pre", 1000), make_records("post", 20_000)
        res = relay_through_pipe(d, "cut", b"".join(before) + b"x" * 3_000_000 + b"\n" + b"".join(after))
        lines = d.log("cut").read_bytes().splitlines(keepends=True)
        assert lines[:1000] == before and lines[1001:] == after
        assert_cut(lines[1000], 3_000_001)
        assert b"1 line longer than" in res.stderr, res.stderr.decode()
        assert d.status()["streams"]["cut"]["records"] == 21_001

    def test_line_of_exactly_the_limit_lands_whole_and_one_byte_more_is_cut(self, daemon):
        """A line of MAX_LINE bytes (newline included) lands whole; one of MAX_LINE + 1 is cut."""
        d = daemon("io_uring")
        fits, too_long = b"x" * (MAX_LINE - 1) + b"\n", b"x" * MAX_LINE + b"\n"
        relay_through_pipe(d, "edge", b"a\n" + fits + b"b\n" + too_long + b"c\n")
        lines = d.log("edge").read_bytes().splitlines(keepends=True)
        assert lines[:3] == [b"a\n", fits, b"b\n"] and lines[4] == b"c\n" and len(lines) == 5
        assert_cut(lines[3], len(too_long))

    def test_unterminated_long_last_line_is_cut(self, daemon):
        """A 2 MB last line without a newline (the writer then exits) is cut with the marker, not lost."""
        d = daemon("io_uring")
        relay_through_pipe(d, "tail", b"a\n" + b"x" * 2_000_000)
        lines = d.log("tail").read_bytes().splitlines(keepends=True)
        assert lines[0] == b"a\n" and len(lines) == 2
        assert_cut(lines[1], 2_000_001)

    def test_long_line_in_a_regular_file_is_cut(self, daemon, tmp_path):
        """From a regular file (the copy path), a 3 MB line is cut the same way and the lines after it land."""
        d = daemon("splice")
        src = tmp_path / "in.txt"
        src.write_bytes(b"a\n" + b"x" * 3_000_000 + b"\nb\n")
        with open(src, "rb") as fh:
            res = run_pipe(d, "fcut", fh)
        assert res.returncode == 0, res.stderr.decode()
        lines = d.log("fcut").read_bytes().splitlines(keepends=True)
        assert lines[0] == b"a\n" and lines[2] == b"b\n" and len(lines) == 3
        assert_cut(lines[1], 3_000_001)


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
