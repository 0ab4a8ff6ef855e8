"""A file that refuses a batch (disk full, file-size limit): that batch fails, counted; nothing torn; the producer lives on."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys

import pytest
from lsk_helpers import status, wait_for

import logsink

LIMIT = 64 << 10  # the file may not grow past this (RLIMIT_FSIZE: writes past it fail with EFBIG)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _accepts(path: str) -> bool:
    """The socket exists and is listening (bind comes before listen: a connect in between is refused)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.fixture
def limited_daemon(tmp_path):
    procs = []

    def start(engine: str):
        sock = str(tmp_path / f"{engine}.sock")
        err = open(tmp_path / f"{engine}.err", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "logsink", "serve", "--engine", engine, "--dir", str(tmp_path / engine), "--socket", sock],
            stdout=err, stderr=err, preexec_fn=_limit_file_size, cwd=tmp_path,
        )
        procs.append(proc)
        wait_for(lambda: _accepts(sock), 20, "the daemon to accept on its socket")
        return sock, tmp_path / engine / "big.log"

    yield start
    for proc in procs:
        proc.terminate()
        assert proc.wait(30) == 0


class TestWriteFailure:
    @pytest.mark.parametrize("engine", ["io_uring", "splice", "readwrite"])
    def test_refused_batch_fails_alone_and_the_producer_stays_connected(self, limited_daemon, engine):
        """The batch that would cross the size limit is reported failed (flush raises OSError), cut back whole, counted as write-failed; the producer is not treated as died and stays usable."""
        sock, path = limited_daemon(engine)
        c = logsink.Client("big", socket=sock, segment_size=16 << 10, segments=4, flush_interval=None)
        first = b"".join(b"first %05d %s\n" % (i, b"x" * 80) for i in range(400))  # ~36 KiB: fits
        c.write(first)
        c.flush()
        second = b"".join(b"second %05d %s\n" % (i, b"y" * 80) for i in range(400))
        c.write(second)  # in 16 KiB batches: the ones below the limit land, the one crossing it fails
        with pytest.raises(OSError, match="could not write"):
            c.flush()
        assert c.connected, "a refused write must fail the batch, not the producer"
        st = status(sock)
        assert st["errors"]["write-failed"] >= 1 and st["errors"]["producer-died"] == 0, st["errors"]
        data = path.read_bytes()
        assert len(data) <= LIMIT and data.endswith(b"\n") and b"\0" not in data
        lines = data.split(b"\n")[:-1]
        first_lines, second_lines = first.split(b"\n")[:-1], second.split(b"\n")[:-1]
        assert lines[:400] == first_lines
        got = lines[400:]
        # Every line whole and in order; what is missing is whole batches (one contiguous gap at
        # least): the refused batch was cut back off, later smaller ones may have fitted.
        idx = [second_lines.index(line) for line in got]
        assert idx == sorted(idx) and len(idx) < 400, "the batch that crossed the limit must be missing"
        c.write(b"after\n")  # still usable: it lands if it fits, else its flush says it was refused
        try:
            c.flush()
        except OSError as exc:
            assert "could not write" in str(exc)
        c.close()
