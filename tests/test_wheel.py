"""A wheel built once (``pip wheel . -w dist``, as the README tells a host without a compiler) installs
into a fresh environment and works from any directory: the CLI, the version, the compiled core, a
daemon and a producer.

Runs in CI by default and takes about 10 s: the build reuses pip's cache (the build dependencies and
the dependencies' wheels the README's own install fetched); the install on the "target" uses dist/
alone.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lsk_helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600
# What a source checkout holds that is not source: left out of the copy the wheel is built from.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "logs",
                                    "*.so", "*.o", "*.a", "_core.c", ".pytest_cache", ".hypothesis")


def run(cmd, cwd: Path, timeout: float = TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


# The README's two commands for a host without a compiler (test_readme.py skips them, pointing here).
BUILD_CMD = ".venv/bin/pip wheel . -w dist"
INSTALL_CMD = ".venv/bin/pip install --no-index --find-links dist logsink"


def isolated_pip_env() -> dict[str, str]:
    """pip with no config file, index or find-links of this machine: only what the command line names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(venv bin dir, a directory outside any source tree): the README's commands for a host without a
    compiler, run as written (``.venv/bin/pip`` is this environment's pip): wheels built from a copy of
    the checkout into dist/, then a new venv installed from dist/ alone (no index, no other wheels)."""
    readme = (ROOT / "README.md").read_text()
    assert BUILD_CMD in readme and INSTALL_CMD in readme, "README.md no longer shows the wheel commands this test runs"
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    pip = [sys.executable, "-m", "pip"]
    run([*pip, *BUILD_CMD.split()[1:], "-q"], cwd=src)
    target = tmp / "target"
    shutil.copytree(src / "dist", target / "dist")  # "copy dist/ to the target"
    shutil.rmtree(src)  # nothing may still point into the tree the wheel came from
    venv = target / ".venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=target)
    # The venv has no pip of its own (ensurepip is slow): this one installs into it with --python.
    run([*pip, "--isolated", "--python", venv / "bin" / "python", *INSTALL_CMD.split()[1:], "-q"], cwd=target,
        env=isolated_pip_env())
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv / "bin", elsewhere


class TestWheel:
    def test_wheel_cli_and_version_work_outside_the_source_tree(self, wheel_venv):
        """From a directory outside the source tree, the wheel's ``logsink --help`` lists the commands and ``logsink.__version__`` is the package version, imported from the venv with its compiled core."""
        bindir, elsewhere = wheel_venv
        help_ = run([bindir / "logsink", "--help"], cwd=elsewhere)
        assert all(cmd in help_.stdout for cmd in ("serve", "status", "pipe")), help_.stdout
        out = run([bindir / "python", "-c", "import logsink, logsink._native; print(logsink.__version__); print(logsink.__file__)"],
                  cwd=elsewhere)
        version, path = out.stdout.splitlines()
        assert version == re.search(r'__version__ = "([^"]+)"', (ROOT / "logsink" / "_version.py").read_text()).group(1)
        assert Path(path).is_relative_to(bindir.parent), f"logsink imported from {path}, not the wheel's venv"

    def test_wheel_daemon_and_producer_land_a_record(self, wheel_venv, tmp_path):
        """The wheel's ``logsink serve`` (started from an unrelated directory, on its default ./logs) takes a record from the wheel's Client, ``logsink status`` reports it, and SIGTERM ends it with 0."""
        bindir, elsewhere = wheel_venv
        sock = tmp_path / "s.sock"
        env = {**os.environ, "LOGSINK_SOCKET": str(sock)}
        err = open(tmp_path / "stderr", "wb")
        proc = subprocess.Popen([bindir / "logsink", "serve"], cwd=tmp_path, env=env, stdout=err, stderr=err)
        try:
            def ready() -> bool:
                assert proc.poll() is None, f"exited {proc.returncode}: {(tmp_path / 'stderr').read_text()}"
                return sock.exists()
            wait_for(ready, 20, "the wheel's daemon to listen")
            run([bindir / "python", "-c", "import logsink\nwith logsink.Client('app') as c:\n"
                 "    c.write(b'from the wheel\\n'); c.flush()"], cwd=elsewhere, env=env)
            assert (tmp_path / "logs" / "app.log").read_bytes() == b"from the wheel\n"
            st = run([bindir / "logsink", "status"], cwd=elsewhere, env=env)
            assert "app" in st.stdout, st.stdout
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
            err.close()
        assert rc == 0, (tmp_path / "stderr").read_text()[-3000:]
