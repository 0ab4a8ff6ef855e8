"""Forwarding through the forwarder's own io_uring (native/ls_forward_uring.c) and its step-down to sendfile."""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time

import pytest
from lsk_helpers import build_shim, make_records, syscall_shim, wait_for
from test_forward import CForwarder, assert_exactly_once_in_order, forward_status, run_producers, sinks, write_records  # noqa: F401 (sinks: the fixture)

PATHS = {"sendfile": 0, "uring-send": 1, "uring-zc": 2}

# LD_PRELOAD shims. Only the daemon's process tree sees them; the kernel's sysctl is untouched.
# io_uring_setup fails with ERRNO: gVisor (ENOSYS), a seccomp profile or kernel.io_uring_disabled (EPERM).
NO_IO_URING_SHIM = syscall_shim(r"""
    if (n == __NR_io_uring_setup) {
        errno = ERRNO;
        return -1;
    }
    return real(n, a[0], a[1], a[2], a[3], a[4], a[5]);
""")
# The opcode probe says the kernel has no IORING_OP_SEND_ZC (a kernel before 6.0).
NO_SEND_ZC_SHIM = syscall_shim(r"""
    long r = real(n, a[0], a[1], a[2], a[3], a[4], a[5]);
    if (n == __NR_io_uring_register && a[1] == IORING_REGISTER_PROBE && r >= 0) {
        struct io_uring_probe *p = (struct io_uring_probe *)a[2];
        if (p->last_op >= IORING_OP_SEND_ZC)
            p->ops[IORING_OP_SEND_ZC].flags = 0;
    }
    return r;
""")


class RingForwarder(CForwarder):
    """CForwarder on a chosen path: a pump that waits on the ring while a send is in flight."""

    def __init__(self, path, framing: str, want: str, cursor: int = 0):
        super().__init__(path, framing, cursor)
        self.path = self.lib.ls_forward_use_path(self.f, PATHS[want])
        buf = self.ffi.new("char[256]")
        self.lib.ls_forward_path_reason(self.f, buf, 256)
        self.reason = self.ffi.string(buf).decode()

    def pump_until_sent(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.lib.ls_forward_pump(self.f)
            if r >= 0:
                return 0
            if r not in (-errno.EAGAIN, -errno.EINPROGRESS):
                return r
            ring = self.lib.ls_forward_ring_fd(self.f)
            waits = [self.sock] + ([ring] if ring >= 0 else [])
            rd, _, _ = select.select(waits, [self.sock] if r == -errno.EAGAIN else [], [], 0.5)
            if self.sock in rd and not self.sock.recv(4096, socket.MSG_PEEK):
                return self.drop()
            self.lib.ls_forward_ring_reap(self.f)
        raise AssertionError("forwarder did not hand everything over in time")

    def wait_notified(self, timeout: float = 10.0) -> None:
        """SEND_ZC: every send's notification came (the kernel let go of every page)."""
        def done() -> bool:
            self.lib.ls_forward_ring_reap(self.f)
            c = self.counters()
            return c.zc_notifs == c.uring_sends
        wait_for(done, timeout, "every SEND_ZC notification")


@pytest.mark.requires_io_uring
class TestRingForwarder:
    @pytest.mark.parametrize("want", ["uring-send", "uring-zc"])
    def test_newline_through_the_ring_is_byte_exact_across_mapping_windows(self, tmp_path, sinks, want):
        """70 MB of records (past the 64 MiB mapping window), a 600 KiB record among them, arrive byte-exact
        through the ring; every byte is counted as sent by io_uring, none by sendfile, none read."""
        recs = make_records("u", 20_000) + [b"y" * (600 << 10) + b"\n"] + [b"%07d" % i + b"z" * 1016 + b"\n" for i in range(68_000)]
        path = tmp_path / "app.log"
        end = write_records(path, recs)
        assert end > 64 << 20
        fw = RingForwarder(path, "newline", want)
        assert fw.path == PATHS[want], fw.reason
        assert "io_uring" in fw.reason and fw.lib.ls_forward_ring_fd(fw.f) >= 0
        sink = sinks()
        fw.connect(sink.port)
        fw.advance(end)
        assert fw.pump_until_sent() == 0
        fw.wait_acked()
        wait_for(lambda: sink.nbytes >= end, 20, "the sink to get everything")
        assert bytes(sink.conns[0]) == path.read_bytes()
        c = fw.counters()
        assert (c.cursor, c.acked_cursor, c.bytes_sent, c.payload_sent, c.bytes_uring) == (end, end, end, end, end)
        assert c.bytes_sendfile == 0 and c.uring_sends >= 1
        assert c.bytes_copied <= 4096 * (end // (4 << 20) + 2), "newline framing reads only a record per 4 MiB window"
        if want == "uring-zc":
            fw.wait_notified()
            assert fw.counters().zc_notifs == fw.counters().uring_sends
        fw.close()

    @pytest.mark.parametrize("want", ["uring-send", "uring-zc"])
    def test_peer_gone_with_a_send_in_flight_resumes_without_loss_or_duplicate(self, tmp_path, sinks, want):
        """The peer stops reading while a ring send waits for socket space, then closes: the in-flight send is
        settled and counted, the forwarder rewinds to the first record the peer did not ACK whole, and the next
        connection delivers the rest; every record arrives exactly once."""
        path = tmp_path / "app.log"
        recs = make_records("p", 200_000)
        end = write_records(path, recs)
        sink1 = sinks()
        fw = RingForwarder(path, "newline", want)
        sink1.paused.set()
        fw.connect(sink1.port)
        fw.advance(end)
        assert fw.lib.ls_forward_pump(fw.f) == -errno.EINPROGRESS, "the send waits in the ring, not in the event loop"
        wait_for(lambda: sink1.socks, 10, "the sink to accept the connection")
        t = threading.Thread(target=sink1.stop_gracefully)
        t.start()
        r = fw.pump_until_sent()
        t.join()
        assert r == -errno.ECONNRESET, "the peer closed mid-stream, the forwarder must notice"
        c = fw.counters()
        assert 0 < c.cursor < end and c.disconnects == 1 and c.rewound_bytes > 0
        sink2 = sinks()
        fw.connect(sink2.port)
        assert fw.pump_until_sent() == 0
        fw.wait_acked()
        wait_for(lambda: len(sink1.records("newline")) + len(sink2.records("newline")) >= len(recs), 10, "all records")
        assert sink1.records("newline") + sink2.records("newline") == recs
        fw.close()

    @pytest.mark.parametrize("want", ["uring-send", "uring-zc"])
    def test_reset_to_a_rotated_file_sends_the_new_files_bytes(self, tmp_path, sinks, want):
        """After ls_forward_reset to another file (rotation), the ring sends that file's bytes, not the old mapping's."""
        old, new = tmp_path / "app.log.1", tmp_path / "app.log"
        old_recs, new_recs = make_records("o", 3000), make_records("n", 2000)
        old_end, new_end = write_records(old, old_recs), write_records(new, new_recs)
        fw = RingForwarder(old, "newline", want)
        sink = sinks()
        fw.connect(sink.port)
        fw.advance(old_end)
        assert fw.pump_until_sent() == 0
        fw.wait_acked()
        new_fd = os.open(new, os.O_RDONLY)
        try:
            assert fw.lib.ls_forward_reset(fw.f, new_fd, 0) == 0
        finally:
            os.close(new_fd)
        fw.advance(new_end)
        assert fw.pump_until_sent() == 0
        fw.wait_acked()
        wait_for(lambda: sink.nbytes >= old_end + new_end, 10, "both files' bytes")
        assert sink.records("newline") == old_recs + new_recs
        fw.close()

    def test_free_with_a_send_in_flight_returns_promptly(self, tmp_path, sinks):
        """Freeing a forwarder whose ring send waits on a collector that reads nothing cancels it: no hang."""
        path = tmp_path / "app.log"
        end = write_records(path, make_records("f", 100_000))
        sink = sinks()
        sink.paused.set()
        fw = RingForwarder(path, "newline", "uring-send")
        fw.connect(sink.port)
        fw.advance(end)
        assert fw.lib.ls_forward_pump(fw.f) == -errno.EINPROGRESS
        t0 = time.monotonic()
        fw.lib.ls_forward_free(fw.f)
        assert time.monotonic() - t0 < 2.5
        fw.sock.close()
        os.close(fw.fd)


class TestPathChoice:
    def test_env_forces_sendfile_and_says_so(self, tmp_path, sinks, monkeypatch):
        """LOGSINK_FORWARD_PATH=sendfile overrides the caller's choice: no ring, sendfile moves the bytes."""
        monkeypatch.setenv("LOGSINK_FORWARD_PATH", "sendfile")
        path = tmp_path / "app.log"
        end = write_records(path, make_records("s", 5000))
        fw = RingForwarder(path, "newline", "uring-zc")
        assert (fw.path, fw.reason) == (PATHS["sendfile"], "LOGSINK_FORWARD_PATH=sendfile")
        assert fw.lib.ls_forward_ring_fd(fw.f) == -1
        sink = sinks()
        fw.connect(sink.port)
        fw.advance(end)
        assert fw.pump_until_sent() == 0
        wait_for(lambda: sink.nbytes >= end, 10, "the sink to get everything")
        c = fw.counters()
        assert (c.bytes_sendfile, c.bytes_uring) == (end, 0)
        fw.close()

    @pytest.mark.requires_io_uring
    def test_unknown_env_value_is_ignored_and_named(self, tmp_path, monkeypatch):
        """A misspelt LOGSINK_FORWARD_PATH does not silently pick something else: the reason says it was ignored."""
        monkeypatch.setenv("LOGSINK_FORWARD_PATH", "uring")
        path = tmp_path / "app.log"
        write_records(path, make_records("s", 10))
        fw = RingForwarder(path, "newline", "uring-send")
        assert fw.path == PATHS["uring-send"]
        assert "LOGSINK_FORWARD_PATH is not one of auto, sendfile, uring-send, uring-zc" in fw.reason
        fw.close()

    @pytest.mark.parametrize("framing", ["octet-counted", "relp"])
    def test_framings_with_headers_keep_sendmsg_and_say_why(self, tmp_path, framing, monkeypatch):
        """Octet counting and RELP put a header before each record: they stay on sendmsg + sendfile, with the reason."""
        monkeypatch.delenv("LOGSINK_FORWARD_PATH", raising=False)
        from logsink._native import ffi, lib

        path = tmp_path / "app.log"
        write_records(path, make_records("s", 10))
        fd = os.open(path, os.O_RDONLY)
        out = ffi.new("struct ls_forward **")
        assert lib.ls_forward_new(fd, 0, lib.LS_FWD_OCTET if framing == "octet-counted" else lib.LS_FWD_RELP, out) == 0
        try:
            assert lib.ls_forward_use_path(out[0], lib.LS_FWD_PATH_AUTO) == lib.LS_FWD_PATH_SENDFILE
            assert lib.ls_forward_ring_fd(out[0]) == -1
            buf = ffi.new("char[256]")
            lib.ls_forward_path_reason(out[0], buf, 256)
            assert ffi.string(buf).decode().startswith(f"{framing} framing puts a header before each record")
        finally:
            lib.ls_forward_free(out[0])
            os.close(fd)


class TestStepDown:
    @pytest.mark.parametrize("err,text", [("ENOSYS", "Function not implemented"), ("EPERM", "Operation not permitted")])
    def test_io_uring_refused_forwards_with_sendfile_and_says_why(self, tmp_path, daemon, producers, sinks, err, text):
        """Where io_uring_setup is refused (gVisor: ENOSYS; seccomp or io_uring_disabled: EPERM), the forwarder
        runs sendfile, status names the path and the refusal, and every record arrives exactly once."""
        shim = build_shim(tmp_path, f"no_io_uring_{err}", NO_IO_URING_SHIM.replace("ERRNO", err))
        sink = sinks()
        d = daemon("splice", "--forward", f"app=tcp://127.0.0.1:{sink.port},file", env={"LD_PRELOAD": shim})
        expected = run_producers(d, producers, 2, 5000)
        total = sum(len(r) for v in expected.values() for r in v)
        wait_for(lambda: forward_status(d)["acked_cursor"] == total, 20, "the forwarder to be ACKed")
        fs = forward_status(d)
        assert fs["path"] == "sendfile", fs
        assert f"io_uring_setup refused: {text}" in fs["path_reason"] and "sendfile" in fs["path_reason"], fs
        assert (fs["bytes_sendfile"], fs["bytes_uring"]) == (total, 0)
        assert_exactly_once_in_order(sink.records("newline"), expected)

    @pytest.mark.requires_io_uring
    def test_send_zc_missing_steps_down_to_io_uring_send(self, tmp_path, daemon, producers, sinks):
        """Asked for SEND_ZC on a kernel whose io_uring lacks it, the forwarder runs io_uring SEND and says why."""
        shim = build_shim(tmp_path, "no_send_zc", NO_SEND_ZC_SHIM)
        sink = sinks()
        d = daemon("io_uring", "--forward", f"app=tcp://127.0.0.1:{sink.port},file",
                   env={"LD_PRELOAD": shim, "LOGSINK_FORWARD_PATH": "uring-zc"})
        expected = run_producers(d, producers, 2, 5000)
        total = sum(len(r) for v in expected.values() for r in v)
        wait_for(lambda: forward_status(d)["acked_cursor"] == total, 20, "the forwarder to be ACKed")
        fs = forward_status(d)
        assert fs["path"] == "io_uring-send", fs
        assert "lacks IORING_OP_SEND_ZC" in fs["path_reason"] and "io_uring SEND from a mapping" in fs["path_reason"], fs
        assert (fs["bytes_uring"], fs["bytes_sendfile"]) == (total, 0)
        assert_exactly_once_in_order(sink.records("newline"), expected)


@pytest.mark.requires_io_uring
class TestDaemonRing:
    def test_stream_kept_in_its_file_and_forwarded_through_the_ring(self, daemon, producers, sinks):
        """--forward 'app=...,file': app.log and the collector get the same bytes; the ring moved all of them."""
        sink = sinks()
        d = daemon("io_uring", "--forward", f"app=tcp://127.0.0.1:{sink.port},file")
        expected = run_producers(d, producers, 3, 20_000)
        total = sum(len(r) for v in expected.values() for r in v)
        wait_for(lambda: forward_status(d)["acked_cursor"] == total, 20, "the forwarder to be ACKed")
        wait_for(lambda: sink.nbytes >= total, 10, "the sink to read everything")
        assert bytes(sink.conns[0]) == d.log("app").read_bytes()
        assert_exactly_once_in_order(sink.records("newline"), expected)
        fs = forward_status(d)
        assert fs["path"] == "io_uring-send" and "io_uring SEND from a mapping of the file" in fs["path_reason"], fs
        assert (fs["bytes_uring"], fs["bytes_sendfile"]) == (total, 0) and fs["uring_sends"] >= 1
