"""Hygiene of a daemon that trusts no producer and no name in its directory (issue 7).

fd containment (SCM_RIGHTS floods, fd exhaustion), files opened beneath the directory without
following links, the control socket path, one daemon per directory, explicit modes, TCP without a
token, and `logsink status` against a busy daemon. docs/security.md maps each threat to these tests.
"""

from __future__ import annotations

import grp
import os
import resource
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lsk_helpers import RawProducer, make_records, wait_for

START_TIMEOUT = 20.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def errors(d) -> dict[str, int]:
    return d.status()["errors"]


def client_round_trip(d, stream: str = "good", n: int = 200) -> None:
    """A normal Client writes ``n`` records and they are all in the stream's file."""
    import logsink

    recs = make_records(stream, n)
    c = logsink.Client(stream, socket=d.sock)
    try:
        for r in recs:
            c.write(r)
        c.flush(timeout=20)
    finally:
        c.close()
    path = d.dir / f"{stream}.log"
    wait_for(lambda: path.exists() and path.read_bytes().endswith(recs[-1]), 10, f"{stream}'s records in {path}")


def serve_expect_refusal(args: list[str], timeout: float = START_TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `logsink serve ARGS`, which must exit (non-zero) on its own; a daemon that starts instead fails the test."""
    proc = subprocess.Popen([sys.executable, "-m", "logsink", "serve", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"`logsink serve {' '.join(args)}` started instead of refusing; stderr:\n{err.decode(errors='replace')[-3000:]}")
    assert proc.returncode != 0, f"serve exited 0; stderr:\n{err.decode(errors='replace')}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


class TestFdContainment:
    """A connection that passes fds without a HELLO, and a daemon out of fds."""

    def test_fds_without_hello_are_closed_at_once(self, daemon):
        """SCM_RIGHTS floods (16 pipe fds a message, a huge announced frame length, no HELLO) never pile up in the daemon."""
        d = daemon("readwrite")
        base = fd_count(d.pid)
        conns = []
        try:
            for _ in range(10):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(d.sock)
                conns.append(s)
                for j in range(20):
                    pipes = [os.pipe() for _ in range(16)]
                    data = struct.pack(">I", 1 << 20) if j == 0 else b"\x90" * 64  # announce 1 MiB, never complete it
                    try:
                        socket.send_fds(s, [data], [r for r, _ in pipes])
                    except OSError:  # the daemon closed this connection: that is the point
                        break
                    finally:
                        for r, w in pipes:
                            os.close(r)
                            os.close(w)
            # The connections themselves may stay open until the daemon reads them; fds they passed may not.
            wait_for(lambda: fd_count(d.pid) <= base + len(conns) + 4, 10,
                     f"the daemon's fd count to stay near {base} (it is {fd_count(d.pid)})")
            client_round_trip(d)
        finally:
            for s in conns:
                s.close()
        e = errors(d)
        assert e.get("too-many-fds", 0) + e.get("bad-fd", 0) >= 1, f"fd abuse was not counted: {e}"

    def test_fd_sent_with_status_is_closed(self, daemon):
        """An fd that comes with a message other than HELLO is closed and the connection refused with bad-fd."""
        d = daemon("readwrite")
        from logsink import protocol

        r, w = os.pipe()
        raw = RawProducer(d.sock)
        try:
            raw.send(protocol.encode({"t": protocol.STATUS}), [r])
            os.close(r)
            msg = raw.next_message()
            while msg is not None and msg["t"] == protocol.STATUS:
                msg = raw.next_message()
            assert msg is not None and msg["t"] == protocol.ERROR and msg["code"] == "bad-fd", f"expected ERROR bad-fd, got {msg}"
            # The daemon's copy of the read end is closed: with ours closed too, the write end sees EPIPE.
            wait_for(lambda w=w: _pipe_reader_gone(w), 10, "the daemon to close the passed pipe")
        finally:
            os.close(w)
            raw.close()

    def test_fd_exhaustion_backs_off_and_recovers(self, daemon):
        """At its fd limit the daemon neither spins nor floods its log, and serves again once connections close."""
        d = daemon("readwrite")
        limit = 64
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (limit, limit))
        idle = []
        try:
            for _ in range(limit + 40):  # more than the daemon can accept: the rest wait in the backlog
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(5)
                s.connect(d.sock)
                idle.append(s)
            wait_for(lambda: any(e.get("event") == "accept_failed" for e in d.stderr_events()), 10, "accept_failed in the daemon's log")
            cpu0, t0 = cpu_seconds(d.pid), time.monotonic()
            time.sleep(3.0)  # the measured episode: CPU the daemon burns while at its limit
            used, wall = cpu_seconds(d.pid) - cpu0, time.monotonic() - t0
            assert used < 0.5 * wall, f"the daemon used {used:.2f} s of CPU in {wall:.2f} s at its fd limit (busy loop)"
            lines = [e for e in d.stderr_events() if e.get("event") == "accept_failed"]
            assert len(lines) <= 5, f"{len(lines)} accept_failed lines in {wall:.1f} s: the log line is not rate-limited"
        finally:
            for s in idle:
                s.close()
        client_round_trip(d)
        assert errors(d).get("fd-limit", 0) >= 1


def _pipe_reader_gone(w: int) -> bool:
    try:
        os.set_blocking(w, False)
        os.write(w, b"x")
        return False
    except BrokenPipeError:
        return True


class TestStreamFiles:
    """Stream files are opened beneath --dir, never through a link, and must be regular files."""

    def refused(self, d, stream: str, why: str) -> None:
        before = errors(d).get("file-refused", 0)
        raw = RawProducer(d.sock)
        try:
            raw.hello(stream)
            msg = raw.expect_error("file-refused")
        finally:
            raw.close()
        assert f"{stream}.log" in msg["reason"] and why in msg["reason"], msg["reason"]
        wait_for(lambda: errors(d).get("file-refused", 0) == before + 1, 10, "errors['file-refused'] to count the refusal")
        client_round_trip(d)  # the daemon keeps serving everyone else

    def test_symlink_to_a_file_outside_is_refused(self, daemon, tmp_path):
        """<dir>/evil.log -> a file elsewhere: HELLO refused, the target neither written nor tail-repaired."""
        d = daemon("readwrite")
        target = tmp_path / "outside.log"
        target.write_bytes(b"precious line\nlast line without newline")
        (d.dir / "evil.log").symlink_to(target)
        self.refused(d, "evil", "is a symlink")
        assert target.read_bytes() == b"precious line\nlast line without newline"

    def test_dangling_symlink_target_is_not_created(self, daemon, tmp_path):
        """<dir>/evil.log -> a path that does not exist: HELLO refused, nothing created there."""
        d = daemon("readwrite")
        target = tmp_path / "created-by-daemon.log"
        (d.dir / "evil.log").symlink_to(target)
        self.refused(d, "evil", "is a symlink")
        assert not target.exists() and not target.is_symlink()

    def test_fifo_is_refused_without_blocking(self, daemon):
        """A FIFO named like a stream file is refused (and opening it does not block the daemon)."""
        d = daemon("readwrite")
        os.mkfifo(d.dir / "fifo.log")
        self.refused(d, "fifo", "not a regular file")

    def test_hard_link_to_a_file_outside_is_refused(self, daemon, tmp_path):
        """<dir>/hl.log hard-linked to a file elsewhere is refused; that file is untouched."""
        d = daemon("readwrite")
        target = tmp_path / "linked.log"
        target.write_bytes(b"precious line\nlast line without newline")
        os.link(target, d.dir / "hl.log")
        self.refused(d, "hl", "hard link")
        assert target.read_bytes() == b"precious line\nlast line without newline"

    def test_directory_named_like_a_stream_file_is_refused(self, daemon):
        """A directory x.log is refused with file-refused (not an internal error)."""
        d = daemon("readwrite")
        (d.dir / "x.log").mkdir()
        self.refused(d, "x", "is a directory")

    def test_symlink_planted_before_rotation_is_refused_on_sighup(self, daemon, tmp_path):
        """After logrotate moved a file away, a symlink planted in its place is not followed by the reopen."""
        import signal

        d = daemon("readwrite")
        client_round_trip(d, "rot", 10)
        target = tmp_path / "outside.log"
        target.write_bytes(b"precious\n")
        os.rename(d.dir / "rot.log", d.dir / "rot.log.1")
        (d.dir / "rot.log").symlink_to(target)
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "reopen_failed" for e in d.stderr_events()), 10, "reopen_failed in the log")
        assert target.read_bytes() == b"precious\n"


class TestSocketPath:
    """--socket never deletes what is not a stale socket."""

    def test_regular_file_at_socket_path_is_kept_and_start_refused(self, tmp_path):
        """--socket naming a regular file: the daemon refuses to start and the file survives."""
        precious = tmp_path / "precious.txt"
        precious.write_bytes(b"do not delete\n")
        res = serve_expect_refusal(["--dir", str(tmp_path / "logs"), "--socket", str(precious), "--engine", "readwrite"])
        assert precious.read_bytes() == b"do not delete\n"
        assert "not a socket" in res.stderr, res.stderr

    def test_stale_socket_is_replaced(self, daemon, tmp_path):
        """A socket nobody listens on (a daemon that died) is removed and the daemon starts."""
        path = tmp_path / "d0" / "s.sock"
        path.parent.mkdir()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.close()
        d = daemon("readwrite")
        assert d.sock == str(path)
        client_round_trip(d)


class TestDirLock:
    """One daemon per --dir."""

    def test_second_daemon_on_same_dir_refuses(self, daemon, tmp_path):
        """A second daemon on the same --dir (another socket) exits non-zero naming the first's pid; the first keeps working."""
        d = daemon("readwrite")
        res = serve_expect_refusal(["--dir", str(d.dir), "--socket", str(tmp_path / "second.sock"), "--engine", "readwrite"])
        assert "another logsink daemon" in res.stderr and str(d.pid) in res.stderr, res.stderr
        assert not (tmp_path / "second.sock").exists()
        client_round_trip(d)


class TestModes:
    """Files, directories and the socket get the configured modes, whatever the umask."""

    @pytest.mark.parametrize("umask", [0o000, 0o077])
    def test_default_modes_ignore_the_umask(self, daemon, tmp_path, umask):
        """Defaults: stream files 0640, created directories 0750, the socket 0660 (umask 000 and 077)."""
        new_dir = tmp_path / "fresh" / "logs"
        old = os.umask(umask)
        try:
            d = daemon("readwrite", "--dir", str(new_dir))
        finally:
            os.umask(old)
        d.dir = new_dir
        client_round_trip(d)
        assert stat.S_IMODE(os.stat(new_dir).st_mode) == 0o750
        assert stat.S_IMODE(os.stat(new_dir / "good.log").st_mode) == 0o640
        assert stat.S_IMODE(os.stat(d.sock).st_mode) == 0o660

    @pytest.mark.parametrize("umask", [0o000, 0o077])
    def test_configured_modes_and_group(self, daemon, tmp_path, umask):
        """file_mode/dir_mode/socket_mode (strings or TOML octal) and socket_group are applied exactly."""
        group = grp.getgrgid(65534).gr_name if _has_gid(65534) else "0"
        conf = tmp_path / "modes.toml"
        conf.write_text(f'file_mode = "0600"\ndir_mode = 0o700\nsocket_mode = "0600"\nsocket_group = "{group}"\n')
        new_dir = tmp_path / "fresh" / "logs"
        old = os.umask(umask)
        try:
            d = daemon("readwrite", "--config", str(conf), "--dir", str(new_dir))
        finally:
            os.umask(old)
        d.dir = new_dir
        client_round_trip(d)
        assert stat.S_IMODE(os.stat(new_dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(new_dir / "good.log").st_mode) == 0o600
        st = os.stat(d.sock)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_gid == grp.getgrnam(group).gr_gid if not group.isdigit() else st.st_gid == int(group)

    def test_bad_mode_values_are_config_errors(self, tmp_path):
        """A mode that is not octal permission bits, or an unknown group, is refused with a clear message."""
        from logsink.config import ConfigError, load

        for text, words in [
            ('file_mode = "rw-r-----"', "file_mode"),
            ('file_mode = "0999"', "file_mode"),
            ("dir_mode = 0o17777", "dir_mode"),
            ("socket_mode = true", "socket_mode"),
            ('socket_group = "no-such-group-xyz"', "no-such-group-xyz"),
        ]:
            conf = tmp_path / "bad.toml"
            conf.write_text(text + "\n")
            with pytest.raises(ConfigError, match=words):
                load(str(conf), {})

    def test_mode_strings_are_parsed(self, tmp_path):
        """Modes written as "0640", "640" or 0o640 in TOML all mean 0o640."""
        from logsink.config import load

        for text in ('file_mode = "0640"', 'file_mode = "640"', "file_mode = 0o640", 'file_mode = "0o640"'):
            conf = tmp_path / "ok.toml"
            conf.write_text(text + "\n")
            assert load(str(conf), {}).file_mode == 0o640


def _has_gid(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
        return True
    except KeyError:
        return False


class TestTcpAuth:
    """TCP beyond loopback needs a token, or an explicit opt-out."""

    def test_non_loopback_listen_without_token_refuses_to_start(self, tmp_path):
        """--listen tcp://0.0.0.0:PORT with no auth_token: the daemon exits with a message naming both ways out."""
        res = serve_expect_refusal(["--dir", str(tmp_path / "logs"), "--socket", str(tmp_path / "s.sock"),
                                    "--engine", "readwrite", "--listen", "tcp://0.0.0.0:9"])
        assert "auth_token" in res.stderr and "allow_unauthenticated" in res.stderr, res.stderr
        assert not (tmp_path / "s.sock").exists()

    def test_loopback_token_or_opt_out_are_accepted(self):
        """Loopback needs nothing; elsewhere an auth_token or allow_unauthenticated is enough."""
        from logsink.config import ConfigError, load

        load(None, {"listen": ["tcp://127.0.0.1:9", "tcp://[::1]:9", "tcp://:9"]})
        load(None, {"listen": ["tcp://0.0.0.0:9"], "auth_token": "s3cret"})
        load(None, {"listen": ["tcp://0.0.0.0:9"], "allow_unauthenticated": True})
        with pytest.raises(ConfigError, match="not loopback"):
            load(None, {"listen": ["tcp://[::]:9"]})


class TestStatusBusy:
    """`logsink status` tells a busy daemon from a missing one."""

    def status_cli(self, d, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "logsink", "status", "--socket", d.sock, *extra],
                              capture_output=True, text=True, timeout=60)

    def test_full_backlog_reports_busy(self, daemon):
        """A stopped daemon whose listen backlog is full is reported busy (exit 3), not absent."""
        d = daemon("readwrite")
        d.sigstop()
        filler = []
        try:
            while True:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect(d.sock)
                except BlockingIOError:
                    s.close()
                    break
                filler.append(s)
                assert len(filler) < 100000, "the backlog never filled"
            res = self.status_cli(d, "--timeout", "1")
            assert res.returncode == 3, (res.returncode, res.stderr)
            assert "busy" in res.stderr and "no logsink daemon" not in res.stderr, res.stderr
        finally:
            d.sigcont()
            for s in filler:
                s.close()
        assert self.status_cli(d).returncode == 0

    def test_stopped_daemon_that_never_answers_reports_busy(self, daemon):
        """A daemon that accepts nothing within --timeout is reported busy, with exit 3."""
        d = daemon("readwrite")
        d.sigstop()
        try:
            res = self.status_cli(d, "--timeout", "1")
        finally:
            d.sigcont()
        assert res.returncode == 3 and "busy" in res.stderr, (res.returncode, res.stderr)

    def test_no_daemon_still_says_so(self, tmp_path):
        """With nothing at the socket path the message still says there is no daemon (exit 1)."""
        res = subprocess.run([sys.executable, "-m", "logsink", "status", "--socket", str(tmp_path / "none.sock"), "--timeout", "1"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and "no logsink daemon" in res.stderr, (res.returncode, res.stderr)


class TestFdRules:
    """The one-unclaimed-fd rule, message by message."""

    def test_more_fds_than_a_read_holds_are_all_closed(self, daemon):
        """20 fds in one message (past the daemon's 16-fd control buffer): refused with too-many-fds, every fd closed."""
        d = daemon("readwrite")
        base = fd_count(d.pid)
        from logsink import protocol

        pipes = [os.pipe() for _ in range(20)]
        raw = RawProducer(d.sock)
        try:
            raw.send(protocol.encode(protocol.hello("app", os.getpid(), "copy")), [r for r, _ in pipes])
            for r, _ in pipes:
                os.close(r)
            raw.expect_error("too-many-fds")
            for _, w in pipes:
                wait_for(lambda w=w: _pipe_reader_gone(w), 10, "the daemon to close every passed pipe")
        finally:
            for _, w in pipes:
                os.close(w)
            raw.close()
        wait_for(lambda: fd_count(d.pid) <= base, 10, "the daemon's fd count back to where it was")

    def test_second_fd_before_hello_completes_is_refused(self, daemon):
        """One fd may wait for a HELLO still arriving; a second one gets too-many-fds."""
        d = daemon("readwrite")
        from logsink import protocol

        frame = protocol.encode(protocol.hello("app", os.getpid(), "copy"))
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        raw = RawProducer(d.sock)
        try:
            raw.send(frame[:3], [r1])
            raw.send(frame[3:5], [r2])
            os.close(r1)
            os.close(r2)
            raw.expect_error("too-many-fds")
            wait_for(lambda: _pipe_reader_gone(w1) and _pipe_reader_gone(w2), 10, "the daemon to close both pipes")
        finally:
            for fd in (w1, w2):
                os.close(fd)
            raw.close()

    def test_hello_split_across_reads_keeps_its_fd(self, daemon):
        """A HELLO whose fd came with its first bytes still gets WELCOME when the rest arrives later."""
        d = daemon("readwrite")
        from logsink import protocol

        frame = protocol.encode(protocol.hello("app", os.getpid(), "copy"))
        raw = RawProducer(d.sock)
        try:
            raw.send(frame[:3], [raw.pipe()])
            os.close(raw.r)
            raw.r = None
            time.sleep(0.2)  # let the daemon read the first part on its own
            raw.send(frame[3:])
            raw.expect_welcome()
            recs = make_records("h", 5)
            raw.send_batch(recs, 1)
            raw.wait_release(1)
        finally:
            raw.close()


class TestForwardStateFiles:
    """Spools, cursors and the state dir are opened beneath their directory without links too."""

    @pytest.fixture
    def collector(self):
        """A TCP listener that never accepts: the kernel takes (and ACKs) what fits its backlog and buffers."""
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        yield srv.getsockname()[1]
        srv.close()

    def test_symlinked_spool_is_refused(self, daemon, tmp_path, collector):
        """A spool planted as a symlink is never written: the forward-only stream's HELLO gets file-refused."""
        target = tmp_path / "outside.log"
        target.write_bytes(b"precious\nno newline")
        spool = tmp_path / "d0" / "logs" / ".state" / "spool"
        spool.mkdir(parents=True)
        (spool / "app.spool").symlink_to(target)
        d = daemon("readwrite", "--forward", f"app=tcp://127.0.0.1:{collector}")
        raw = RawProducer(d.sock)
        try:
            raw.hello("app")
            msg = raw.expect_error("file-refused")
        finally:
            raw.close()
        assert "app.spool is a symlink" in msg["reason"], msg
        assert target.read_bytes() == b"precious\nno newline"

    def test_symlinked_state_dir_refuses_start(self, tmp_path, collector):
        """<dir>/.state planted as a symlink to another directory: the daemon refuses to start and creates nothing there."""
        logs = tmp_path / "logs"
        logs.mkdir()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (logs / ".state").symlink_to(elsewhere)
        res = serve_expect_refusal(["--dir", str(logs), "--socket", str(tmp_path / "s.sock"), "--engine", "readwrite",
                                    "--forward", f"app=tcp://127.0.0.1:{collector}"])
        assert ".state is a symlink" in res.stderr, res.stderr
        assert list(elsewhere.iterdir()) == []

    def test_planted_cursor_temp_link_is_not_followed(self, daemon, tmp_path, collector):
        """A symlink planted at the cursor's temp name is replaced, not written through; the cursor is still saved."""
        target = tmp_path / "outside.txt"
        target.write_bytes(b"precious\n")
        state = tmp_path / "d0" / "logs" / ".state"
        state.mkdir(parents=True)
        cursor = state / f"app.127.0.0.1_{collector}.cursor"
        Path(str(cursor) + ".tmp").symlink_to(target)
        d = daemon("readwrite", "--forward", f"app=tcp://127.0.0.1:{collector},file")
        client_round_trip(d, "app", 50)
        wait_for(lambda: cursor.is_file() and not cursor.is_symlink(), 10, f"{cursor} to be saved")
        assert target.read_bytes() == b"precious\n"
