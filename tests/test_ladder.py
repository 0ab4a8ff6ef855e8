"""The fallback ladder: io_uring -> splice -> readwrite on the daemon, vmsplice -> copy on the client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lsk_helpers import assert_file, build_shim, make_records

IO_URING_DISABLED = Path("/proc/sys/kernel/io_uring_disabled")


@pytest.fixture
def io_uring_refused():
    """Set kernel.io_uring_disabled=2 for the test (root only), restore it afterwards."""
    old = IO_URING_DISABLED.read_text().strip()
    try:
        IO_URING_DISABLED.write_text("2\n")
    except OSError as exc:
        pytest.fail(f"cannot set {IO_URING_DISABLED} (the suite runs as root in CI): {exc}")
    try:
        yield
    finally:
        IO_URING_DISABLED.write_text(old + "\n")


class TestDaemonLadder:
    def test_auto_steps_down_to_splice_when_io_uring_is_refused(self, daemon, io_uring_refused):
        """With io_uring disabled by sysctl, --engine auto runs splice, says why, and still delivers byte-exact."""
        d = daemon("auto")
        st = d.status()
        assert st["engine"] == "splice"
        assert "io_uring_setup" in st["fallback_reason"]
        events = [e for e in d.stderr_events() if e.get("event") == "engine_fallback"]
        assert events and events[0]["engine"] == "splice"
        recs = make_records("lad", 20_000)
        import logsink

        with logsink.Client("lad", socket=d.sock, transport="vmsplice") as c:
            for r in recs:
                c.write(r)
        assert_file(d.log("lad"), {"lad": recs})
        assert d.status()["totals"]["bytes_spliced"] == sum(map(len, recs))

    def test_asking_for_io_uring_when_refused_is_a_clear_startup_error(self, tmp_path, io_uring_refused):
        """--engine io_uring with io_uring disabled exits 1 with the reason, instead of silently using another engine."""
        res = subprocess.run(
            [sys.executable, "-m", "logsink", "serve", "--engine", "io_uring", "--dir", str(tmp_path / "l"), "--socket", str(tmp_path / "s")],
            capture_output=True, timeout=30, cwd=tmp_path,
        )
        assert res.returncode == 1
        assert b"io_uring" in res.stderr and b"Operation not permitted" in res.stderr


def run_with_shim(tmp_path: Path, name: str, shim: str, script: str) -> dict:
    """Build `shim` (C) into a preload library, run `script` under it, return the stats it prints last."""
    lib = build_shim(tmp_path, name, shim)
    res = subprocess.run([sys.executable, "-c", script], env={**os.environ, "LD_PRELOAD": lib},
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    return json.loads(res.stdout.decode().strip().splitlines()[-1])


SHIM = r"""
#include <errno.h>
#include <sys/types.h>
#include <sys/uio.h>
ssize_t vmsplice(int fd, const struct iovec *iov, unsigned long n, unsigned int flags)
{ (void)fd; (void)iov; (void)n; (void)flags; errno = ENOSYS; return -1; }
"""


class TestClientLadder:
    def test_client_steps_down_to_copy_where_vmsplice_is_missing(self, daemon, tmp_path):
        """Where vmsplice fails with ENOSYS (as under gVisor), the client switches to copy and loses nothing."""
        d = daemon("io_uring")
        script = f"""
import json, logsink
c = logsink.Client("novs", socket={d.sock!r}, transport="vmsplice", segments=4, segment_size=4096)
for i in range(20000):
    c.write(b"rec %d\\n" % i)
c.flush()
print(json.dumps(c.stats()))
c.close()
"""
        stats = run_with_shim(tmp_path, "novmsplice", SHIM, script)
        assert stats["transport"] == "copy"
        assert d.log("novs").read_bytes() == b"".join(b"rec %d\n" % i for i in range(20000))


SMALL_PIPE_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
/* As past pipe-user-pages-soft: every pipe stays at 2 pages and growing it is refused. */
int fcntl(int fd, int cmd, ...)
{
    static int (*real)(int, int, ...);
    if (!real)
        real = (int (*)(int, int, ...))dlsym(RTLD_NEXT, "fcntl");
    va_list ap;
    va_start(ap, cmd);
    long arg = va_arg(ap, long);
    va_end(ap);
    if (cmd == F_SETPIPE_SZ) {
        real(fd, F_SETPIPE_SZ, 8192L);
        errno = EPERM;
        return -1;
    }
    return real(fd, cmd, arg);
}
"""


class TestSmallPipes:
    def test_producer_works_through_a_two_page_pipe(self, daemon, tmp_path):
        """A uid past pipe-user-pages-soft gets 2-page pipes: 1 MiB segments still move through them, byte-exact."""
        d = daemon("io_uring")
        script = f"""
import json, logsink
c = logsink.Client("small", socket={d.sock!r})
for i in range(50000):
    c.write(b"small %d %s\\n" % (i, b"z" * (i % 200)))
c.flush()
print(json.dumps(c.stats()))
c.close()
"""
        stats = run_with_shim(tmp_path, "smallpipe", SMALL_PIPE_SHIM, script)
        assert stats["pipe_size"] == 8192 and stats["segment_size"] == 1 << 20
        assert d.log("small").read_bytes() == b"".join(b"small %d %s\n" % (i, b"z" * (i % 200)) for i in range(50000))
