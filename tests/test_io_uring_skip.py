"""The suite on a kernel without io_uring: io_uring tests skip with the reason instead of failing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lsk_helpers import build_shim, syscall_shim

TESTS_DIR = Path(__file__).resolve().parent
RUN_TIMEOUT = 300

# An LD_PRELOAD shim: io_uring_setup fails with ENOSYS, as under gVisor or a seccomp filter that
# blocks it (docker's default). Only this process tree sees it: the kernel's sysctl is untouched.
NO_IO_URING_SHIM = syscall_shim(r"""
    if (n == __NR_io_uring_setup) {
        errno = ENOSYS;
        return -1;
    }
    return real(n, a[0], a[1], a[2], a[3], a[4], a[5]);
""")


class TestRequiresIoUring:
    def test_io_uring_tests_skip_with_the_reason_where_the_kernel_refuses_io_uring(self, tmp_path):
        """Under a shim that makes io_uring_setup fail, a parametrized [io_uring] test and one calling daemon("io_uring") are skipped with the reason, while the same test on splice and readwrite passes."""
        lib = build_shim(tmp_path, "no_io_uring", NO_IO_URING_SHIM)
        select = ("test_pipe.py::TestPipeFromAPipe::test_pipe_input_lands_byte_exact_and_moves_by_splice",
                  "test_pipe.py::TestPipeFromAPipe::test_last_line_without_newline_is_terminated_not_lost")
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *(str(TESTS_DIR / s) for s in select)],
            env={**os.environ, "LD_PRELOAD": str(lib)}, cwd=TESTS_DIR.parent, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        )
        out = res.stdout + res.stderr
        assert res.returncode == 0, out
        assert "2 passed, 2 skipped" in out, out  # splice and readwrite ran
        # -rs folds the two identical reasons into one line: "SKIPPED [2] ...: <reason>"
        skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
        assert len(skips) == 1 and skips[0].startswith("SKIPPED [2]"), out
        assert "needs the io_uring engine" in skips[0] and "Function not implemented" in skips[0], out
