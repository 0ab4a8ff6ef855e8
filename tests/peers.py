"""Real syslog collectors for the forwarding tests: rsyslog (imtcp, imrelp) and syslog-ng (network()), each on a
free loopback port with a private config, pid file and state under the test's directory.

rsyslog and syslog-ng-core conflict as Debian packages: .ci/run installs rsyslog and rsyslog-relp with apt and unpacks
syslog-ng-core (``apt-get download`` + ``dpkg -x``) into ``/opt/peers/syslog-ng``, run with
LD_LIBRARY_PATH and ``--module-path`` pointing into that prefix. ``LOGSINK_SYSLOG_NG_PREFIX`` and
``LOGSINK_RSYSLOGD`` override where they are looked for. Missing peers fail the test (never skip).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

SYSLOG_NG_PREFIX = Path(os.environ.get("LOGSINK_SYSLOG_NG_PREFIX", "/opt/peers/syslog-ng"))
INSTALL_SCRIPT = Path(__file__).resolve().parent / "install_peers.sh"
INSTALL_HINT = f"run `sh {INSTALL_SCRIPT}` as root (it installs rsyslog and rsyslog-relp and unpacks syslog-ng-core into /opt/peers/syslog-ng)"
_install_tried = False


def ensure_peers() -> None:
    """Install the peers once per session if they are missing (root + apt, as on a fresh Debian)."""
    global _install_tried
    have_rsyslog = bool(os.environ.get("LOGSINK_RSYSLOGD") or shutil.which("rsyslogd") or os.access("/usr/sbin/rsyslogd", os.X_OK))
    have_ng = (SYSLOG_NG_PREFIX / "usr/sbin/syslog-ng").exists()
    have_relp = bool(imrelp_module())
    if (have_rsyslog and have_ng and have_relp) or _install_tried:
        return
    _install_tried = True
    res = subprocess.run(["sh", str(INSTALL_SCRIPT)], capture_output=True, timeout=900)
    if res.returncode != 0:
        pytest.fail(f"installing the syslog peers failed ({INSTALL_HINT}):\n{res.stderr.decode(errors='replace')[-3000:]}")
START_TIMEOUT = 15.0


def imrelp_module() -> str | None:
    """rsyslog's imrelp.so (Debian package rsyslog-relp), or None."""
    for pattern in ("/usr/lib/*/rsyslog/imrelp.so", "/usr/lib/rsyslog/imrelp.so", "/usr/lib64/rsyslog/imrelp.so"):
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return str(found[0])
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} before listening on {port}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"{what} did not listen on 127.0.0.1:{port} within {START_TIMEOUT}s:\n{log.read_text(errors='replace')[-4000:]}")


class Peer:
    """A collector process writing each received message, one per line, to ``self.out``."""

    name = "peer"

    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.out = root / "received.log"
        self.log = root / "peer.stderr"
        self.pidfile = root / "peer.pid"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self) -> Peer:
        ensure_peers()
        cmd, env = self.command()
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env={**os.environ, **env}, cwd=self.root)
        _wait_listening(self.port, self.proc, self.log, self.name)
        return self

    def lines(self) -> list[bytes]:
        try:
            data = self.out.read_bytes()
        except FileNotFoundError:
            return []
        return data.splitlines(keepends=True)

    def wait_lines(self, n: int, timeout: float) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.lines()
            if len(got) >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Send ``sig`` and wait for the process to exit (SIGTERM: rsyslog's own clean shutdown)."""
        assert self.proc is not None, f"{self.name} is not running"
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit within {timeout}s of signal {sig}")
        self._log.close()
        self.proc = None

    def restart(self) -> Peer:
        """Start again on the same port and output file (after kill())."""
        return self.start()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.proc = None


class Rsyslog(Peer):
    """rsyslogd -n with imtcp (octet-counted or newline framing, detected per frame) -> omfile, %rawmsg%."""

    name = "rsyslogd"

    def command(self) -> tuple[list[str], dict[str, str]]:
        exe = os.environ.get("LOGSINK_RSYSLOGD") or shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        if not os.access(exe, os.X_OK):
            pytest.fail(f"rsyslogd not found (looked for {exe}): {INSTALL_HINT}")
        conf = self.root / "rsyslog.conf"
        conf.write_text(
            f'global(workDirectory="{self.root}" maxMessageSize="64k")\n'
            'module(load="imtcp")\n'
            'template(name="raw" type="string" string="%rawmsg%\\n")\n'
            f'ruleset(name="fwd") {{ action(type="omfile" file="{self.out}" template="raw") }}\n'
            f'input(type="imtcp" port="{self.port}" address="127.0.0.1" ruleset="fwd")\n'
        )
        return [exe, "-n", "-f", str(conf), "-i", str(self.pidfile)], {}


class RsyslogRelp(Rsyslog):
    """rsyslogd -n with imrelp (RELP, Debian package rsyslog-relp) -> omfile, %rawmsg%.

    The ruleset's queue is direct: imrelp answers "rsp 200" only after omfile wrote the record (to
    the page cache), so a SIGKILLed rsyslogd can lose nothing it acknowledged. With rsyslog's
    default in-memory main queue, records acknowledged but still queued die with the process.
    """

    name = "rsyslogd imrelp"

    def command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = super().command()
        if not imrelp_module():
            pytest.fail(f"rsyslog's imrelp module is not installed (Debian package rsyslog-relp): {INSTALL_HINT}")
        conf = self.root / "rsyslog.conf"
        conf.write_text(
            f'global(workDirectory="{self.root}" maxMessageSize="64k")\n'
            'module(load="imrelp")\n'
            'template(name="raw" type="string" string="%rawmsg%\\n")\n'
            f'ruleset(name="fwd" queue.type="direct") {{ action(type="omfile" file="{self.out}" template="raw") }}\n'
            f'input(type="imrelp" port="{self.port}" address="127.0.0.1" ruleset="fwd")\n'
        )
        return cmd, env


class SyslogNg(Peer):
    """syslog-ng -F from the private prefix: network() with flags(no-parse) -> file(), ``${MESSAGE}\\n``.

    ``framing="newline"`` uses transport("tcp"); ``"octet-counted"`` uses transport("framed") (RFC 6587).
    """

    name = "syslog-ng"

    def __init__(self, root: Path, framing: str):
        super().__init__(root)
        self.framing = framing

    def command(self) -> tuple[list[str], dict[str, str]]:
        exe = SYSLOG_NG_PREFIX / "usr/sbin/syslog-ng"
        libdir = SYSLOG_NG_PREFIX / "usr/lib/syslog-ng"
        modules = next(iter(sorted(libdir.glob("3.*"))), None) if libdir.is_dir() else None
        if not exe.exists() or modules is None:
            pytest.fail(f"syslog-ng not found under {SYSLOG_NG_PREFIX}: {INSTALL_HINT}")
        version = modules.name
        transport = "framed" if self.framing == "octet-counted" else "tcp"
        conf = self.root / "syslog-ng.conf"
        conf.write_text(
            f"@version: {version}\n"
            "options { log-msg-size(65536); stats-freq(0); };\n"
            f'source s_fwd {{ network(ip("127.0.0.1") port({self.port}) transport("{transport}") flags(no-parse)); }};\n'
            f'destination d_out {{ file("{self.out}" template("${{MESSAGE}}\\n")); }};\n'
            "log { source(s_fwd); destination(d_out); };\n"
        )
        cmd = [
            str(exe), "-F", "-e", "--no-caps", "-f", str(conf), f"--module-path={modules}",
            "-p", str(self.pidfile), "-R", str(self.root / "syslog-ng.persist"), "-c", str(self.root / "syslog-ng.ctl"),
        ]
        env = {"LD_LIBRARY_PATH": ":".join(filter(None, [str(libdir), os.environ.get("LD_LIBRARY_PATH", "")]))}
        return cmd, env
