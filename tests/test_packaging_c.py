"""The C library's documented first steps (clients/c/README.md), run as written: build a program against
the tree through ``logsink-uninstalled.pc``, and against a ``make install PREFIX=$HOME/.local`` copy
through ``PKG_CONFIG_PATH`` and an rpath; each program reaches a live daemon with no LD_LIBRARY_PATH."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIR = ROOT / "clients" / "c"
C_README = CLIENT_DIR / "README.md"
TIMEOUT = 240


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of a Markdown text."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def c_readme_blocks() -> tuple[str, str, str]:
    """The README's program (the ``c`` block), its build-against-the-tree block and its install block."""
    blocks = fenced_blocks(C_README.read_text())
    programs = [code for lang, code in blocks if lang == "c"]
    shells = [code for lang, code in blocks if lang == "sh"]
    assert len(programs) == 1, f"clients/c/README.md should show one complete C program, found {len(programs)}"
    tree = [s for s in shells if "logsink-uninstalled" in s]
    installed = [s for s in shells if "make install" in s]
    assert len(tree) == 1 and len(installed) == 1, "clients/c/README.md: expected one tree build block and one install block"
    assert sorted(shells) == sorted(tree + installed), "a new shell block in clients/c/README.md: add a test for it here"
    return programs[0], tree[0], installed[0]


def tool(name: str) -> None:
    if not shutil.which(name):
        pytest.fail(f"{name} is not on PATH: install it (apt-get install {name}; .ci/run does)")


@pytest.fixture
def c_tree(tmp_path):
    """A copy of the repository's C parts (logsink/_version.py, native/, clients/c without build/) with the README's
    program saved as clients/c/app.c, and an empty $HOME; returns the clients/c directory."""
    for t in ("make", "pkg-config", "cc"):
        tool(t)
    (tmp_path / "logsink").mkdir()
    shutil.copy(ROOT / "logsink" / "_version.py", tmp_path / "logsink" / "_version.py")
    shutil.copytree(ROOT / "native", tmp_path / "native", ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.so"))
    shutil.copytree(CLIENT_DIR, tmp_path / "clients" / "c", ignore=shutil.ignore_patterns("build", "app", "app.c"))
    (tmp_path / "home").mkdir()
    cdir = tmp_path / "clients" / "c"
    (cdir / "app.c").write_text(c_readme_blocks()[0])
    return cdir


def run_block(block: str, cdir: Path, sock: str) -> subprocess.CompletedProcess:
    """Run a README shell block in clients/c as a new user's shell would: HOME in the tmp tree, no
    PKG_CONFIG_PATH or LD_LIBRARY_PATH inherited, the daemon's socket as the default one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PKG_CONFIG_PATH", "LD_LIBRARY_PATH", "LIBRARY_PATH", "CPATH")}
    env.update(HOME=str(cdir.parent.parent / "home"), LOGSINK_SOCKET=sock)
    res = subprocess.run(["sh", "-e", "-c", block], cwd=cdir, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, f"the README block failed (exit {res.returncode}):\n{block}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def dynamic_section(exe: Path) -> str:
    tool("readelf")
    return subprocess.run(["readelf", "-d", str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout


class TestUninstalledPc:
    def test_make_writes_an_uninstalled_pc_pointing_into_the_tree(self, c_tree):
        """make writes build/logsink-uninstalled.pc whose flags name the tree's include/ and build/liblogsink.a by absolute path, at the package version."""
        subprocess.run(["make", "-s"], cwd=c_tree, capture_output=True, timeout=TIMEOUT, check=True)
        env = {**os.environ, "PKG_CONFIG_PATH": "build"}
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "logsink-uninstalled"], cwd=c_tree, env=env,
                               capture_output=True, text=True, timeout=60)
        assert flags.returncode == 0, flags.stderr
        assert flags.stdout.split() == [f"-I{c_tree}/include", f"{c_tree}/build/liblogsink.a", "-lpthread"]
        ver = subprocess.run(["pkg-config", "--modversion", "logsink-uninstalled"], cwd=c_tree, env=env,
                             capture_output=True, text=True, timeout=60)
        version = re.search(r'__version__ = "([^"]+)"', (ROOT / "logsink" / "_version.py").read_text()).group(1)
        assert ver.stdout.strip() == version

    def test_documented_tree_build_runs_without_install_or_ld_library_path(self, c_tree, daemon):
        """The README's tree block (make; cc app.c with logsink-uninstalled; ./app) builds a program that needs no liblogsink.so and lands its record."""
        d = daemon("readwrite")
        run_block(c_readme_blocks()[1], c_tree, d.sock)
        assert d.log("app").read_bytes() == b"one record\n"
        assert "liblogsink" not in dynamic_section(c_tree / "app"), "the tree build should link the static library"


class TestInstalledPc:
    def test_documented_home_install_builds_and_runs_against_the_installed_library(self, c_tree, daemon):
        """The README's install block (make install PREFIX=$HOME/.local, PKG_CONFIG_PATH, rpath from pkg-config) builds a program that loads the installed liblogsink.so.0 and lands its record."""
        d = daemon("readwrite")
        home = c_tree.parent.parent / "home"
        run_block(c_readme_blocks()[2], c_tree, d.sock)
        assert d.log("app").read_bytes() == b"one record\n"
        pc = (home / ".local" / "lib" / "pkgconfig" / "logsink.pc").read_text()
        assert f"prefix={home}/.local" in pc
        dyn = dynamic_section(c_tree / "app")
        assert "liblogsink.so.0" in dyn and f"{home}/.local/lib" in dyn, dyn
        ldd = subprocess.run(["ldd", str(c_tree / "app")], capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"})
        assert f"liblogsink.so.0 => {home}/.local/lib/liblogsink.so.0" in ldd.stdout, ldd.stdout

    def test_in_tree_logsink_pc_describes_the_install_prefix(self, c_tree):
        """build/logsink.pc names the PREFIX it was built for (the install), so a make with PREFIX=$HOME/.local rewrites it with that prefix."""
        subprocess.run(["make", "-s"], cwd=c_tree, capture_output=True, timeout=TIMEOUT, check=True)
        assert "prefix=/usr/local" in (c_tree / "build" / "logsink.pc").read_text()
        home = c_tree.parent.parent / "home"
        subprocess.run(["make", "-s", f"PREFIX={home}/.local"], cwd=c_tree, capture_output=True, timeout=TIMEOUT, check=True)
        assert f"prefix={home}/.local" in (c_tree / "build" / "logsink.pc").read_text()
