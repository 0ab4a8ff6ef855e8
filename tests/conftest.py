"""Fixtures: a ``daemon`` factory that runs ``python -m logsink serve`` in a temporary directory."""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lsk_helpers import io_uring_unavailable, status, wait_for  # noqa: E402

__all__ = ["status"]

TESTS_DIR = Path(__file__).resolve().parent
PRODUCER = TESTS_DIR / "producer.py"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0
WATCHDOG_SECONDS = 240


def proc_state_of(stat_path: str) -> str:
    try:
        return Path(stat_path).read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "T"  # a thread that is gone does not run


class Daemon:
    """One ``logsink serve`` subprocess with its own log directory, socket and captured stderr."""

    def __init__(self, root: Path, engine: str, extra: tuple[str, ...], log_dir: Path | None = None,
                 env: dict[str, str] | None = None):
        self.root = root
        self.env = env  # extra environment for the daemon (e.g. LD_PRELOAD of a fault shim)
        self.root.mkdir(parents=True, exist_ok=True)
        self.dir = log_dir or root / "logs"
        self.dir.mkdir(exist_ok=True)
        sock = root / "s.sock"
        if len(str(sock)) > 100:  # AF_UNIX paths are limited to 108 bytes
            sock = Path(tempfile.mkdtemp(prefix="lsk-")) / "s.sock"
        self.sock = str(sock)
        self.engine = engine
        self.stderr_path = root / "daemon.stderr"
        self.cmd = [
            sys.executable, "-m", "logsink", "serve",
            "--dir", str(self.dir), "--socket", self.sock, "--engine", engine, *extra,
        ]
        self.proc: subprocess.Popen | None = None
        self.stopped = False  # True while SIGSTOPped

    def start(self) -> Daemon:
        self._stderr = open(self.stderr_path, "wb")
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr, cwd=self.root, env=env)
        wait_for(self._ready, START_TIMEOUT, f"the daemon to accept connections on {self.sock}")
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise_exit = f"daemon exited with {self.proc.returncode} before listening:\n{self.stderr()}"
            pytest.fail(raise_exit)
        if not os.path.exists(self.sock):
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.sock)
            return True
        except OSError:
            return False
        finally:
            s.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, stream: str) -> Path:
        return self.dir / f"{stream}.log"

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-20000:]
        except OSError as exc:
            return f"<no stderr: {exc}>"

    def stderr_events(self) -> list[dict]:
        out = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def status(self) -> dict:
        return status(self.sock)

    def sigstop(self) -> None:
        """SIGSTOP, and return once every thread is stopped: kill() returns before that, and the engine
        thread can still answer a batch meanwhile."""
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True
        task = Path(f"/proc/{self.pid}/task")

        def all_stopped() -> bool:
            return all(proc_state_of(f"{task}/{t}/stat") in ("T", "t") for t in os.listdir(task))

        wait_for(all_stopped, 10, "every thread of the daemon to stop")

    @contextlib.contextmanager
    def control_plane_stalled(self) -> Iterator[None]:
        """Stop only the daemon's main thread (the asyncio control plane) with ptrace, leaving the
        engine thread running: what a loop stuck behind a slow disk or a long GC pause looks like to
        the engine. The engine must keep every bound on its own meanwhile."""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH, WALL = 0x4206, 0x4207, 17, 0x40000000
        if libc.ptrace(PTRACE_SEIZE, self.pid, None, None) != 0:  # the main thread's tid is the pid
            raise OSError(ctypes.get_errno(), "ptrace(PTRACE_SEIZE) of the daemon's main thread")
        try:
            if libc.ptrace(PTRACE_INTERRUPT, self.pid, None, None) != 0:
                raise OSError(ctypes.get_errno(), "ptrace(PTRACE_INTERRUPT)")
            _, st = os.waitpid(self.pid, WALL)  # returns once the main thread is in its ptrace-stop
            assert os.WIFSTOPPED(st), f"the daemon's main thread did not stop: status {st:#x}"
            yield
        finally:
            if libc.ptrace(PTRACE_DETACH, self.pid, None, None) != 0:
                raise OSError(ctypes.get_errno(), "ptrace(PTRACE_DETACH)")

    def sigcont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.stopped = False

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; returns the exit code (fails the test if it does not exit in time)."""
        if self.proc.poll() is None:
            if self.stopped:
                self.sigcont()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"daemon did not exit within {timeout}s of SIGTERM; stderr:\n{self.stderr()}")
        return self.proc.returncode

    def close(self) -> None:
        """Teardown: stop the daemon and require exit code 0."""
        if self.proc is None:
            return
        try:
            rc = self.terminate()
        finally:
            self._stderr.close()
        assert rc == 0, f"daemon exited with {rc}; stderr:\n{self.stderr()}"


# -- io_uring: skip, with the reason, where the kernel refuses it ---------------------------------
# For tests that need io_uring without naming the engine as a parameter (parametrized ones are
# marked automatically): @requires_io_uring, or pytest.param("io_uring", marks=requires_io_uring).
requires_io_uring = pytest.mark.requires_io_uring


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_io_uring: skip (with the reason) where the kernel refuses io_uring")


def pytest_collection_modifyitems(config, items):
    """Mark every test that gets "io_uring" as a parameter value (engine, or any other name)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec and "io_uring" in callspec.params.values():
            item.add_marker(requires_io_uring)


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_io_uring"):
        skip_without_io_uring()


def skip_without_io_uring() -> None:
    why = io_uring_unavailable()
    if why:
        pytest.skip(f"needs the io_uring engine: {why}")


@pytest.fixture(autouse=True)
def _watchdog():
    """A hung test (e.g. a flush the daemon never confirms) dumps every thread's stack and ends the run
    instead of eating CI's whole time budget."""
    faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def daemon(tmp_path):
    """Factory: ``daemon(engine="readwrite", *extra_args, log_dir=None)`` starts a daemon; teardown SIGTERMs
    it and asserts exit 0. ``log_dir`` reuses another daemon's ``dir`` (a restart)."""
    started: list[Daemon] = []

    def start(engine: str = "readwrite", *extra: str, log_dir: Path | None = None, env: dict[str, str] | None = None) -> Daemon:
        if engine == "io_uring":
            skip_without_io_uring()
        d = Daemon(tmp_path / f"d{len(started)}", engine, extra, log_dir, env)
        started.append(d)
        return d.start()

    yield start
    errors = []
    for d in started:
        try:
            d.close()
        except BaseException as exc:  # report every daemon, not just the first
            errors.append(str(exc))
    if errors:
        pytest.fail("\n\n".join(errors))


def run_producer(config: dict, **popen) -> subprocess.Popen:
    """Start tests/producer.py with ``config`` (see that file) in a subprocess."""
    return subprocess.Popen(
        [sys.executable, str(PRODUCER), json.dumps(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen,
    )


def finish_producer(proc: subprocess.Popen, timeout: float = 120.0, input: bytes | None = None) -> dict:
    """Wait for a producer subprocess, require exit 0, and return the JSON on its last stdout line.

    ``input`` (for a producer started with stdin=PIPE) is written to its stdin, which is then closed.
    """
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"producer {proc.pid} did not finish in {timeout}s; stderr:\n{err.decode(errors='replace')[-5000:]}")
    assert proc.returncode == 0, f"producer exited {proc.returncode}; stderr:\n{err.decode(errors='replace')[-5000:]}"
    lines = out.decode().strip().splitlines()
    assert lines, f"producer printed nothing; stderr:\n{err.decode(errors='replace')[-5000:]}"
    return json.loads(lines[-1])


@pytest.fixture
def producers():
    """Factory for producer subprocesses; any still running at teardown are killed."""
    procs: list[subprocess.Popen] = []

    def start(config: dict, **popen) -> subprocess.Popen:
        p = run_producer(config, **popen)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
