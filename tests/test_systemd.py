"""systemd integration: the notify protocol over a real $NOTIFY_SOCKET, socket activation, and the shipped units pass systemd-analyze."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from lsk_helpers import RawProducer, build_shim, wait_for
from test_engine_faults import EPOLL_WAIT_FAILS_SHIM

import logsink
from logsink.daemon import activation
from logsink.daemon.notify import SystemdNotifier, notify_address, watchdog_interval
from logsink.errors import ConfigError

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "logsink.service"
SOCKET_UNIT = UNIT.with_name("logsink.socket")


def parse(datagram: bytes) -> dict[str, str]:
    """One sd_notify datagram as a dict (newline-separated KEY=VALUE; a trailing newline or none)."""
    return dict(line.split("=", 1) for line in datagram.decode().split("\n") if line)


class NotifyListener:
    """What systemd does: a bound AF_UNIX SOCK_DGRAM socket that collects the daemon's notifications."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []

    def poll(self) -> None:
        try:
            while True:
                self.messages.append(parse(self.sock.recv(65536)))
        except TimeoutError:
            pass

    def wait(self, key: str, value: str | None = None, after: int = 0, timeout: float = 20.0) -> int:
        """Index of the first message from ``after`` on that has ``key`` (equal to ``value`` if given)."""
        def found() -> int | None:
            self.poll()
            for i in range(after, len(self.messages)):
                if key in self.messages[i] and (value is None or self.messages[i][key] == value):
                    return i + 1  # truthy even for index 0
            return None
        return wait_for(found, timeout, f"a notification with {key}={value or '*'} (got {self.messages[after:]})") - 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path):
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:  # AF_UNIX path limit: use an abstract name instead
        pytest.skip("tmp_path too long for an AF_UNIX path")
    lis = NotifyListener(str(path))
    lis.env = {"NOTIFY_SOCKET": str(path)}
    yield lis
    lis.close()


def connects(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    finally:
        s.close()


class TestNotifyProtocol:
    def test_ready_is_sent_once_the_control_socket_accepts(self, daemon, listener):
        """READY=1 arrives, and a connection to the control socket succeeds the moment it has."""
        d = daemon("readwrite", env=listener.env)
        i = listener.wait("READY", "1")
        assert connects(d.sock)
        assert all("READY" not in m for m in listener.messages[:i])  # once, not before

    def test_status_names_producers_streams_and_engine(self, daemon, listener):
        """STATUS= comes with READY=1 and says how many producers and streams and which engine."""
        d = daemon("readwrite", env=listener.env)
        i = listener.wait("STATUS")
        assert listener.messages[i]["STATUS"] == "producers 0, streams 0, engine readwrite"
        c = logsink.Client("app", socket=d.sock, flush_interval=None)
        c.write(b"x\n")
        c.flush(timeout=10)
        os.kill(d.pid, signal.SIGHUP)  # READY=1 after the reload carries a fresh STATUS=
        j = listener.wait("STATUS", "producers 1, streams 1, engine readwrite", after=i + 1)
        assert j > i
        c.close()

    def test_sighup_sends_reloading_then_ready(self, daemon, listener):
        """SIGHUP gives RELOADING=1 with a CLOCK_MONOTONIC MONOTONIC_USEC, then READY=1 when the files are reopened."""
        d = daemon("readwrite", env=listener.env)
        first = listener.wait("READY", "1")
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        os.kill(d.pid, signal.SIGHUP)
        r = listener.wait("RELOADING", "1", after=first + 1)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert before <= int(listener.messages[r]["MONOTONIC_USEC"]) <= after
        listener.wait("READY", "1", after=r + 1)

    def test_sigterm_sends_stopping(self, daemon, listener):
        """SIGTERM gives STOPPING=1 before the daemon exits (with 0)."""
        d = daemon("readwrite", env=listener.env)
        first = listener.wait("READY", "1")
        assert d.terminate() == 0
        listener.wait("STOPPING", "1", after=first + 1, timeout=5)

    def test_abstract_notify_socket_works(self, daemon):
        """An abstract '@name' NOTIFY_SOCKET (as systemd may pass) gets READY=1 too."""
        name = f"lsk-test-{uuid.uuid4().hex}"
        lis = NotifyListener("\0" + name)
        try:
            daemon("readwrite", env={"NOTIFY_SOCKET": "@" + name})
            lis.wait("READY", "1")
        finally:
            lis.close()

    def test_notify_socket_is_not_inherited(self):
        """The notifier removes NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from the environment it read."""
        env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
        n = SystemdNotifier(env)
        assert env == {"PATH": "/bin"}
        assert n.address == "/run/x" and n.watchdog == 0.0005

    def test_without_notify_socket_nothing_is_sent(self):
        """Without NOTIFY_SOCKET every call is a no-op (the daemon runs the same outside systemd)."""
        n = SystemdNotifier({"WATCHDOG_USEC": "1000"})
        assert not n.enabled and n.watchdog is None
        assert n.send(READY=1) is False

    def test_send_failure_is_logged_once_and_not_raised(self, tmp_path, capsys):
        """A NOTIFY_SOCKET nobody listens on makes send() return False and log one error, never raise."""
        n = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
        assert n.send(READY=1) is False
        assert n.send(STATUS="x") is False
        out = capsys.readouterr()
        assert (out.out + out.err).count("notify_failed") == 1
        n.close()

    def test_addresses_and_watchdog_owner(self):
        """'@name' is abstract, a relative path is refused; a WATCHDOG_PID of another process disables the pings."""
        assert notify_address("@abc") == "\0abc"
        assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
        assert notify_address("relative.sock") is None
        assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
        assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
        assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None

    @pytest.mark.skipif(shutil.which("systemd-notify") is None, reason="systemd-notify is not installed")
    def test_real_systemd_notify_speaks_what_the_listener_parses(self, listener):
        """systemd's own systemd-notify sends to our listener in the format the daemon's messages are checked in."""
        subprocess.run(["systemd-notify", "--no-block", "--ready", "--status=from systemd-notify"],
                       env={**os.environ, **listener.env}, check=True, timeout=10)
        i = listener.wait("READY", "1")
        assert listener.messages[i]["STATUS"] == "from systemd-notify"


class TestWatchdog:
    def test_watchdog_pings_repeat(self, daemon, listener):
        """With WATCHDOG_USEC=200000 the daemon sends WATCHDOG=1 again and again (every 0.1 s)."""
        daemon("readwrite", env={**listener.env, "WATCHDOG_USEC": "200000"})
        i = -1
        for _ in range(3):
            i = listener.wait("WATCHDOG", "1", after=i + 1)

    def test_watchdog_for_another_pid_is_not_ours(self, daemon, listener):
        """WATCHDOG_PID naming another process: READY=1 but no WATCHDOG=1 in ten intervals."""
        daemon("readwrite", env={**listener.env, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
        listener.wait("READY", "1")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            listener.poll()
        assert not any("WATCHDOG" in m for m in listener.messages)

    def test_watchdog_stops_when_the_engine_fails(self, daemon, listener, tmp_path):
        """After the engine thread dies, STATUS= says so and no WATCHDOG=1 follows, so systemd restarts the daemon."""
        shim = build_shim(tmp_path, "epollfails", EPOLL_WAIT_FAILS_SHIM)
        trigger = tmp_path / "fail-now"
        d = daemon("splice", env={**listener.env, "WATCHDOG_USEC": "200000", "LD_PRELOAD": shim, "LSK_FAIL_TRIGGER": str(trigger)})
        listener.wait("WATCHDOG", "1")
        c = logsink.Client("app", socket=d.sock, flush_interval=None, reconnect=False)
        c.write(b"before\n")
        c.flush(timeout=10)
        trigger.touch()
        c.write(b"after\n")  # wakes the engine: its next epoll_wait fails
        c.flush(timeout=10)
        wait_for(lambda: listener.poll() or any("FAILED" in m.get("STATUS", "") for m in listener.messages), 20,
                 "a STATUS= saying the engine failed")
        at = next(i for i, m in enumerate(listener.messages) if "FAILED" in m.get("STATUS", ""))
        deadline = time.monotonic() + 1.0  # ten watchdog intervals
        while time.monotonic() < deadline:
            listener.poll()
        assert not any("WATCHDOG" in m for m in listener.messages[at:]), listener.messages[at:]
        try:
            c.close()
        except ConnectionError:
            pass


class TestUnitFile:
    def test_unit_is_type_notify_with_a_watchdog(self):
        """The shipped unit asks for the notify protocol from the main process and a watchdog."""
        lines = UNIT.read_text().splitlines()
        for want in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30s"):
            assert want in lines

    @pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (systemd's tools)")
    def test_systemd_analyze_verify_passes_without_warnings(self, tmp_path):
        """systemd-analyze verify accepts the unit with no message at all (it exits 0 even on ignored bad lines).

        ExecStart points at this venv's logsink in a temporary copy: /usr/local/bin/logsink is not installed here."""
        logsink_bin = Path(sys.executable).parent / "logsink"
        assert logsink_bin.exists(), f"{logsink_bin} missing: pip install -e . into this venv"
        text = UNIT.read_text()
        assert "/usr/local/bin/logsink " in text
        unit = tmp_path / "logsink.service"
        unit.write_text(text.replace("/usr/local/bin/logsink ", f"{logsink_bin} "))
        sock_unit = tmp_path / "logsink.socket"
        sock_unit.write_text(SOCKET_UNIT.read_text())
        r = subprocess.run(["systemd-analyze", "verify", str(unit), str(sock_unit)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


class TestHardening:
    """The unit runs unprivileged and hardened; its user and directories come from sysusers.d/tmpfiles.d snippets."""

    def test_unit_runs_as_the_sysusers_user_with_io_uring_allowed(self):
        """User=logsink matches systemd/logsink.sysusers, and the syscall filter names io_uring (not in @system-service before systemd 255) with EPERM, not a kill."""
        lines = UNIT.read_text().splitlines()
        assert "User=logsink" in lines and "Group=logsink" in lines
        assert (UNIT.parent / "logsink.sysusers").read_text().splitlines()[-1].split()[:2] == ["u", "logsink"]
        filt = [ln for ln in lines if ln.startswith("SystemCallFilter=@system-service")]
        assert filt and all(c in filt[0] for c in ("io_uring_setup", "io_uring_enter", "io_uring_register"))
        assert "SystemCallErrorNumber=EPERM" in lines

    @pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (systemd's tools)")
    def test_systemd_analyze_security_rates_the_unit_ok(self, tmp_path):
        """systemd-analyze security (offline) rates the shipped unit's exposure at most 2.0 ("OK")."""
        unit = tmp_path / "logsink.service"
        unit.write_text(UNIT.read_text())
        r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True, timeout=60)
        line = [ln for ln in r.stdout.splitlines() if "Overall exposure level" in ln]
        assert line, r.stdout + r.stderr
        score = float(line[0].split(":", 1)[1].split()[0])
        assert score <= 2.0, line[0]

    @pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
    def test_sysusers_snippet_creates_the_user(self):
        """systemd-sysusers --dry-run accepts the snippet and would create user logsink."""
        r = subprocess.run(["systemd-sysusers", "--dry-run", str(UNIT.parent / "logsink.sysusers")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "Creating user 'logsink'" in r.stdout + r.stderr, r.stdout + r.stderr

    @pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles is not installed")
    def test_tmpfiles_snippet_creates_the_directories(self, tmp_path):
        """systemd-tmpfiles --create under an alternate root makes /var/log/logsink and /var/lib/logsink, mode 0750, owned by logsink."""
        root = tmp_path / "root"
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nlogsink:x:995:995::/var/lib/logsink:/usr/sbin/nologin\n")
        (root / "etc" / "group").write_text("root:x:0:\nlogsink:x:995:\n")
        r = subprocess.run(["systemd-tmpfiles", "--create", f"--root={root}", str(UNIT.parent / "logsink.tmpfiles")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for d in ("var/log/logsink", "var/lib/logsink"):
            st = (root / d).stat()
            assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 995, 995), d


def _terminate(proc: subprocess.Popen) -> str:
    """SIGTERM a `systemd-socket-activate ... logsink serve` and return its stderr (killed after 30 s)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]

class TestSocketActivation:
    """systemd/logsink.socket: systemd holds the control socket; the daemon adopts it (logsink/daemon/activation.py)."""

    def test_listen_fds_for_another_pid_are_ignored_and_cleared(self):
        """LISTEN_* variables inherited from a parent (LISTEN_PID is not ours) are not taken, and are removed."""
        env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "control"}
        assert activation.passed_fds(env, pid=4242) == ([], [])
        assert env == {}

    def test_listen_fds_give_fds_from_3_with_their_names(self):
        """LISTEN_FDS=3 means fds 3, 4, 5; missing names are empty."""
        env = {"LISTEN_PID": "4242", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "control:tcp"}
        assert activation.passed_fds(env, pid=4242) == ([3, 4, 5], ["control", "tcp", ""])

    def test_a_passed_socket_that_is_not_listening_is_a_clear_config_error(self):
        """An fd that is a socket but not a listening stream (e.g. Accept=yes hands connections) is refused, naming the fix."""
        a, b = socket.socketpair()
        try:
            fd = fcntl.fcntl(a.fileno(), fcntl.F_DUPFD, 3 + 100)  # a free fd above the low ones other threads take
            env = {"LISTEN_PID": "7", "LISTEN_FDS": "1"}
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(activation, "SD_LISTEN_FDS_START", fd)
                with pytest.raises(ConfigError, match="not a listening stream socket.*Accept=yes"):
                    activation.take(env, pid=7)
        finally:
            os.close(fd)
            a.close()
            b.close()

    @pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate is not installed")
    def test_producer_that_starts_before_the_daemon_queues_and_lands(self, tmp_path):
        """Under systemd-socket-activate the daemon starts only on the first connection: a Client that connects first is served by it, and every record lands."""
        sock = tmp_path / "act.sock"
        logs = tmp_path / "logs"
        cmd = ["systemd-socket-activate", "-l", str(sock), "--fdname=control",
               sys.executable, "-m", "logsink", "serve", "--dir", str(logs), "--engine", "readwrite"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(sock.exists, 30, "systemd-socket-activate to bind the socket")
            with logsink.Client("early", socket=str(sock), timeout=30) as c:  # no daemon running yet
                for i in range(1000):
                    c.write(b"early %d\n" % i)
                c.flush(timeout=30)
            assert (logs / "early.log").read_bytes() == b"".join(b"early %d\n" % i for i in range(1000))
        finally:
            err = _terminate(proc)
        assert "socket_activation" in err and str(sock) in err, err
        assert sock.exists(), "the daemon must not unlink a socket systemd owns"


class TestAbstractActivation:
    @pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate is not installed")
    def test_abstract_control_socket_serves_and_shuts_down_cleanly(self, tmp_path):
        """An abstract socket passed by systemd (ListenStream=@name) is adopted; SIGTERM then drains and exits 0 (it crashed on os.lstat of the name)."""
        name = f"logsink-test-{uuid.uuid4().hex[:8]}"
        logs = tmp_path / "logs"
        proc = subprocess.Popen(["systemd-socket-activate", "-l", f"@{name}", sys.executable, "-m", "logsink", "serve",
                                 "--dir", str(logs), "--engine", "readwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            def connected() -> socket.socket | None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect("\0" + name)
                    return s
                except OSError:
                    s.close()
                    return None

            s = wait_for(connected, 30, "systemd-socket-activate to listen")
            s.close()  # the first connection starts the daemon
            p = RawProducer("\0" + name, timeout=30)  # (the C client takes filesystem paths only)
            p.hello("abs")
            p.expect_welcome()
            p.send_batch([b"abstract\n"], 1)
            p.wait_release(1)
            p.close()
            assert (logs / "abs.log").read_bytes() == b"abstract\n"
        finally:
            err = _terminate(proc)
        assert proc.returncode == 0 and "embedded null" not in err, err
