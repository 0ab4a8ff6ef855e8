"""Packaging habits: one version source for every build, complete and warning-free C builds, license and typing metadata."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIR = ROOT / "clients" / "c"
MAKE_TIMEOUT = 180
# What the Makefile compiles into liblogsink (its LIB_SRCS), relative to clients/c.
LIB_SRCS = [f"../../native/{n}" for n in ("ls_producer.c", "ls_producer_send.c", "ls_producer_msg.c", "ls_producer_conn.c", "ls_transport.c", "ls_msgpack.c", "ls_render.c", "ls_zerocopy.c")] + ["src/logsink.c"]


def make_var(name: str, cwd: Path = CLIENT_DIR) -> str:
    """The value of a variable of clients/c/Makefile, as make expands it."""
    if not shutil.which("make"):
        pytest.fail("make is not on PATH: the packaging tests need it")
    res = subprocess.run(["make", "-s", "--no-print-directory", "--eval", "print-var-%: ; @echo $($*)", f"print-var-{name}"],
                         cwd=cwd, capture_output=True, text=True, timeout=MAKE_TIMEOUT)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def build_engine_version(root: Path = ROOT) -> str:
    """VERSION as native/build_engine.py computes it (run from the project root, as the build does)."""
    code = "import sys; sys.path.insert(0, 'native'); import build_engine; print(build_engine.VERSION)"
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def header_version(header: Path) -> str:
    m = re.search(r'^#define LOGSINK_VERSION "([^"]+)"', header.read_text(), re.M)
    assert m, f"{header} defines no LOGSINK_VERSION"
    return m.group(1)


@pytest.fixture
def client_tree(tmp_path):
    """A copy of logsink/_version.py, native/ and clients/c/ in tmp_path, laid out as in the repository."""
    (tmp_path / "logsink").mkdir()
    shutil.copy(ROOT / "logsink" / "_version.py", tmp_path / "logsink" / "_version.py")
    shutil.copytree(ROOT / "native", tmp_path / "native", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(CLIENT_DIR, tmp_path / "clients" / "c", ignore=shutil.ignore_patterns("build"))
    return tmp_path


def run_make(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(tree / "clients" / "c"), f"BUILD={tree / 'build'}", *args],
                          capture_output=True, text=True, timeout=MAKE_TIMEOUT)


class TestVersionSource:
    def test_every_reader_reports_the_one_version(self):
        """The package, its metadata, the compiled core, build_engine.py, the C Makefile and logsink.h all say logsink/_version.py's version."""
        import logsink
        from logsink._native import ffi, lib
        from logsink._version import __version__

        assert re.fullmatch(r"\d+\.\d+\.\d+\S*", __version__), __version__
        assert logsink.__version__ == __version__
        assert importlib.metadata.version("logsink") == __version__
        assert ffi.string(lib.ls_native_version()).decode() == __version__
        assert build_engine_version() == __version__
        assert make_var("VERSION") == __version__
        assert header_version(CLIENT_DIR / "include" / "logsink.h") == __version__
        assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dynamic"] == ["version"]

    def test_a_bumped_version_reaches_both_builds_and_a_stale_header_stops_the_c_build(self, client_tree):
        """Changing only logsink/_version.py changes build_engine's VERSION and the Makefile's; logsink.h still saying the old one fails the C build with a message naming it, and once updated logsink.pc carries the new version."""
        ver = client_tree / "logsink" / "_version.py"
        ver.write_text(ver.read_text().replace(f'"{header_version(CLIENT_DIR / "include" / "logsink.h")}"', '"9.8.7"'))
        assert make_var("VERSION", client_tree / "clients" / "c") == "9.8.7"
        code = "import sys; sys.path.insert(0, 'native'); import build_engine; print(build_engine.read_version())"
        res = subprocess.run([sys.executable, "-c", code], cwd=client_tree, capture_output=True, text=True, timeout=60)
        assert res.stdout.strip() == "9.8.7", res.stderr
        stale = run_make(client_tree)
        assert stale.returncode != 0
        assert "LOGSINK_VERSION" in stale.stderr and "9.8.7" in stale.stderr, stale.stderr
        header = client_tree / "clients" / "c" / "include" / "logsink.h"
        header.write_text(re.sub(r'(#define LOGSINK_VERSION )"[^"]+"', r'\1"9.8.7"', header.read_text()))
        ok = run_make(client_tree)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "Version: 9.8.7" in (client_tree / "build" / "logsink.pc").read_text()


class TestCBuilds:
    def test_makefile_header_list_names_every_included_header(self):
        """HEADERS in clients/c/Makefile lists every header the library's sources include (gcc -MM), so a header change rebuilds."""
        cc = shutil.which("gcc") or shutil.which("cc")
        if not cc:
            pytest.fail("no C compiler (gcc/cc) on PATH: install gcc")
        res = subprocess.run([cc, "-MM", "-std=gnu11", "-Iinclude", "-I../../native", *LIB_SRCS], cwd=CLIENT_DIR,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        included = {Path(w).name for w in res.stdout.replace("\\\n", " ").split() if w.endswith(".h")}
        listed = {Path(h).name for h in make_var("HEADERS").split()}
        assert included <= listed, f"missing from the Makefile's HEADERS: {sorted(included - listed)}"

    def test_a_warning_fails_the_c_client_build(self, client_tree):
        """clients/c builds with -Werror: an unused parameter in the library's sources stops make with an error."""
        src = client_tree / "clients" / "c" / "src" / "logsink.c"
        src.write_text(src.read_text() + "\nint logsink_unused_param(int x);\nint logsink_unused_param(int x) { return 0; }\n")
        res = run_make(client_tree)
        assert res.returncode != 0, "a warning did not fail the build"
        assert "unused parameter" in res.stderr and "-Werror" in res.stderr, res.stderr

    def test_cffi_build_turns_warnings_into_errors(self):
        """native/build_engine.py compiles the core with -Wall -Wextra -Werror, as the Makefile does."""
        code = "import sys; sys.path.insert(0, 'native'); import build_engine; print(' '.join(build_engine.CFLAGS))"
        res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert {"-Wall", "-Wextra", "-Werror"} <= set(res.stdout.split()), res.stdout
        assert "-Wno-unused-parameter" not in res.stdout


class TestPackageMetadata:
    def test_license_file_matches_the_declared_license(self):
        """pyproject declares MIT and ships LICENSE, whose text is the MIT license of the logsink authors."""
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
        text = (ROOT / "LICENSE").read_text()
        assert text.startswith("MIT License") and "logsink authors" in text and "WITHOUT WARRANTY OF ANY KIND" in text

    def test_package_is_marked_typed_and_described(self):
        """logsink/py.typed exists and is package data; the installed metadata carries classifiers and project URLs."""
        assert (ROOT / "logsink" / "py.typed").is_file()
        tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
        assert "py.typed" in tool["package-data"]["logsink"]
        meta = importlib.metadata.metadata("logsink")
        classifiers = meta.get_all("Classifier") or []
        assert "Typing :: Typed" in classifiers and "Operating System :: POSIX :: Linux" in classifiers, classifiers
        urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
        assert {"Homepage", "Source", "Issues"} <= set(urls), urls


class TestBenchEntryPoint:
    def test_bench_finds_the_harness_in_the_source_tree(self):
        """logsink bench locates benchmarks/logsink_bench next to the package (a checkout or an editable install)."""
        from logsink import bench

        assert bench.benchmarks_dir() == ROOT / "benchmarks"

    def test_bench_without_the_harness_says_where_it_lives(self, tmp_path):
        """Where the package has no source tree beside it (a wheel install), logsink bench exits 2 naming benchmarks/ and LOGSINK_BENCHMARKS."""
        (tmp_path / "logsink").mkdir()
        shutil.copy(ROOT / "logsink" / "bench.py", tmp_path / "logsink" / "bench.py")
        code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('b', sys.argv[1]); "
                "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); sys.exit(m.main(['--runs', '1']))")
        env = {k: v for k, v in os.environ.items() if k != "LOGSINK_BENCHMARKS"}
        res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "logsink" / "bench.py")], capture_output=True,
                             text=True, timeout=60, env=env)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "benchmarks/" in res.stderr and "LOGSINK_BENCHMARKS" in res.stderr and "pip install -e" in res.stderr, res.stderr

    def test_bench_takes_the_harness_from_the_environment(self, tmp_path, monkeypatch):
        """$LOGSINK_BENCHMARKS pointing at a benchmarks/ directory is where logsink bench looks first."""
        from logsink import bench

        shutil.copytree(ROOT / "benchmarks" / "logsink_bench", tmp_path / "logsink_bench",
                        ignore=shutil.ignore_patterns("__pycache__"))
        monkeypatch.setenv("LOGSINK_BENCHMARKS", str(tmp_path))
        assert bench.benchmarks_dir() == tmp_path.resolve()
