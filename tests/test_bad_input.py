"""Bad producers: each is refused with the right ERROR and counter, and well-behaved producers are unaffected."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess

import pytest
from conftest import finish_producer, run_producer
from lsk_helpers import ENGINES, RawProducer, assert_file, make_records, protocol, read_line, wait_for

ERROR_CODES = (
    "bad-message", "bad-version", "bad-stream", "bad-fd", "bad-frame",
    "producer-died", "write-failed", "shutting-down", "too-many-producers",
)


class GoodProducers:
    """Well-behaved logsink.Client producers on stream "app" (same as the bad one) and "other"."""

    PHASE = 2000

    def __init__(self, d):
        import logsink

        self.d = d
        self.logsink = logsink
        self.clients = {
            "gA": ("app", logsink.Client("app", socket=d.sock)),
            "gO": ("other", logsink.Client("other", socket=d.sock)),
        }
        self.written = {tag: 0 for tag in self.clients}
        self.late: list[str] = []
        self.phase()
        self.check()

    def phase(self) -> None:
        for tag, (_, client) in self.clients.items():
            for rec in make_records(tag, self.PHASE, start=self.written[tag]):
                client.write(rec)
            client.flush(timeout=20)
            self.written[tag] += self.PHASE

    def expected(self, stream: str) -> dict[str, list[bytes]]:
        return {tag: make_records(tag, self.written[tag]) for tag, (s, _) in self.clients.items() if s == stream}

    def check(self, app_extra: dict[str, list[bytes]] | None = None) -> None:
        assert_file(self.d.log("app"), {**self.expected("app"), **(app_extra or {})})
        assert_file(self.d.log("other"), self.expected("other"))

    def finish(self, app_extra: dict[str, list[bytes]] | None = None) -> None:
        """After the bad producer: write more, connect a fresh client, close all, check both files."""
        assert self.d.proc.poll() is None, f"daemon died:\n{self.d.stderr()}"
        self.phase()
        with self.logsink.Client("app", socket=self.d.sock) as fresh:
            for rec in make_records("gN", 500):
                fresh.write(rec)
            fresh.flush(timeout=20)
        for _, client in self.clients.values():
            client.close()
        self.check({**(app_extra or {}), "gN": make_records("gN", 500)})


def error_counts(d) -> dict[str, int]:
    errs = d.status()["errors"]
    assert set(ERROR_CODES) <= set(errs), f"status errors lacks {set(ERROR_CODES) - set(errs)}"
    return errs


def assert_counted(d, before: dict[str, int], code: str, n: int = 1) -> None:
    """The daemon's counter for ``code`` went up by exactly ``n`` and no other error counter moved."""
    after = wait_for(lambda: (e := error_counts(d))[code] >= before[code] + n and e, 10, f"errors[{code!r}] to reach {before[code] + n}")
    assert after[code] == before[code] + n, f"errors[{code!r}]: {before[code]} -> {after[code]}, expected +{n}"
    moved = {k: (before[k], after[k]) for k in ERROR_CODES if k != code and after[k] != before[k]}
    assert not moved, f"other error counters moved: {moved}"


@pytest.fixture
def setup(daemon):
    """A daemon (io_uring engine) with good producers already running; returns (daemon, good, counters)."""

    def make(engine: str = "io_uring"):
        d = daemon(engine)
        good = GoodProducers(d)
        return d, good, error_counts(d)

    return make


class TestBadControlMessages:
    @pytest.mark.parametrize(
        "garbage",
        [
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
            struct.pack(">I", 8) + b"\xc1\xc1\xc1\xc1\xc1\xc1\xc1\xc1",
            b"\x00\x00\x00\x00",
            b"\xff" * 64,
        ],
        ids=["http", "not-msgpack", "zero-length", "huge-length"],
    )
    def test_garbage_on_control_socket_is_bad_message(self, setup, garbage):
        """Garbage bytes on a fresh control connection get ERROR bad-message, a close, and a count."""
        d, good, before = setup()
        raw = RawProducer(d.sock)
        raw.send(garbage)
        raw.expect_error("bad-message")
        raw.close()
        assert_counted(d, before, "bad-message")
        good.finish()

    def test_unknown_message_type_is_bad_message(self, setup):
        """A well-formed frame with an unknown message type gets ERROR bad-message."""
        d, good, before = setup()
        raw = RawProducer(d.sock)
        raw.send(protocol.encode({"t": "bogus", "v": 1}))
        raw.expect_error("bad-message")
        raw.close()
        assert_counted(d, before, "bad-message")
        good.finish()

    def test_hello_with_wrong_version_is_bad_version(self, setup):
        """A HELLO with protocol version 2 (and a valid pipe) gets ERROR bad-version."""
        d, good, before = setup()
        raw = RawProducer(d.sock)
        raw.hello("app", v=protocol.PROTOCOL_VERSION + 1)
        raw.expect_error("bad-version")
        raw.close()
        assert_counted(d, before, "bad-version")
        good.finish()

    def test_hello_with_unknown_transport_is_bad_message(self, setup):
        """A HELLO whose transport is not vmsplice/copy gets ERROR bad-message."""
        d, good, before = setup()
        raw = RawProducer(d.sock)
        raw.hello("app", transport="carrier-pigeon")
        raw.expect_error("bad-message")
        raw.close()
        assert_counted(d, before, "bad-message")
        good.finish()

    def test_garbage_after_welcome_is_bad_message(self, setup):
        """Garbage on the control socket of an accepted producer gets ERROR bad-message; its landed batch stays."""
        d, good, before = setup()
        raw = RawProducer(d.sock)
        raw.hello("app")
        raw.expect_welcome()
        recs = make_records("r1", 100)
        raw.send_batch(recs, 1)
        raw.wait_release(1)
        raw.send(b"\xde\xad\xbe\xef" * 4)
        raw.expect_error("bad-message")
        raw.close()
        assert_counted(d, before, "bad-message")
        good.finish({"r1": recs})

    @pytest.mark.parametrize(
        "name",
        ["", "x" * 65, "a/b", "../escape", "a..b", "..", ".hidden", "a b"],
        ids=["empty", "65-chars", "slash", "dotdot-slash", "dotdot-inside", "dotdot", "leading-dot", "space"],
    )
    def test_bad_stream_name_is_refused(self, setup, name):
        """A HELLO with an invalid stream name gets ERROR bad-stream and creates no file anywhere."""
        d, good, before = setup()
        raw = RawProducer(d.sock)
        raw.hello(name)
        raw.expect_error("bad-stream")
        raw.close()
        assert_counted(d, before, "bad-stream")
        good.finish()
        assert sorted(p.name for p in d.dir.iterdir() if p.name != ".logsink.lock") == ["app.log", "other.log"]  # the lock: one daemon per dir
        assert not (d.dir.parent / "escape.log").exists()
        assert not (d.root / "escape.log").exists()

    def test_producer_count_unaffected_by_refusals(self, setup):
        """After refused HELLOs the status lists only the good producers."""
        d, good, before = setup()
        for name in ("", "a/b"):
            raw = RawProducer(d.sock)
            raw.hello(name)
            raw.expect_error("bad-stream")
            raw.close()
        assert_counted(d, before, "bad-stream", 2)
        st = d.status()
        assert sorted(p["stream"] for p in st["producers"]) == ["app", "other"]
        good.finish()


class TestBadFds:
    def test_hello_without_fd_is_bad_fd(self, setup):
        """A HELLO carrying no file descriptor gets ERROR bad-fd."""
        d, good, before = setup()
        raw = RawProducer(d.sock)
        raw.hello("app", fds=[])
        raw.expect_error("bad-fd")
        raw.close()
        assert_counted(d, before, "bad-fd")
        good.finish()

    def test_hello_with_regular_file_fd_is_bad_fd(self, setup, tmp_path):
        """A HELLO carrying a regular file's fd instead of a pipe gets ERROR bad-fd; the file is untouched."""
        d, good, before = setup()
        path = tmp_path / "not-a-pipe"
        path.write_bytes(b"keep me\n")
        fd = os.open(path, os.O_RDWR)
        try:
            raw = RawProducer(d.sock)
            raw.hello("app", fds=[fd])
            raw.expect_error("bad-fd")
            raw.close()
        finally:
            os.close(fd)
        assert_counted(d, before, "bad-fd")
        good.finish()
        assert path.read_bytes() == b"keep me\n"

    def test_hello_with_socket_fd_is_bad_fd(self, setup):
        """A HELLO carrying a socket's fd instead of a pipe gets ERROR bad-fd."""
        d, good, before = setup()
        a, b = socket.socketpair()
        try:
            raw = RawProducer(d.sock)
            raw.hello("app", fds=[a.fileno()])
            raw.expect_error("bad-fd")
            raw.close()
        finally:
            a.close()
            b.close()
        assert_counted(d, before, "bad-fd")
        good.finish()

    def test_hello_with_pipe_write_end_is_bad_fd(self, setup):
        """A HELLO carrying the pipe's write end (not its read end) gets ERROR bad-fd."""
        d, good, before = setup()
        r, w = os.pipe()
        try:
            raw = RawProducer(d.sock)
            raw.hello("app", fds=[w])
            raw.expect_error("bad-fd")
            raw.close()
        finally:
            os.close(r)
            os.close(w)
        assert_counted(d, before, "bad-fd")
        good.finish()

    def test_hello_with_two_fds_is_bad_fd(self, setup):
        """A HELLO carrying two pipe read ends gets ERROR bad-fd (exactly one is allowed)."""
        d, good, before = setup()
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        try:
            raw = RawProducer(d.sock)
            raw.hello("app", fds=[r1, r2])
            raw.expect_error("bad-fd")
            raw.close()
        finally:
            for fd in (r1, w1, r2, w2):
                os.close(fd)
        assert_counted(d, before, "bad-fd")
        good.finish()


class TestBadFrames:
    def _accepted(self, d, n=100):
        raw = RawProducer(d.sock)
        raw.hello("app")
        raw.expect_welcome()
        recs = make_records("r1", n)
        raw.send_batch(recs, 1)
        raw.wait_release(1)
        return raw, recs

    @pytest.mark.parametrize("engine", ENGINES)
    def test_frame_with_bad_magic_is_bad_frame(self, setup, engine):
        """A batch header with bad magic gets ERROR bad-frame; its payload never reaches the file."""
        d, good, before = setup(engine)
        raw, recs = self._accepted(d)
        evil = make_records("bx", 20)
        payload = b"".join(evil)
        raw.write_pipe(b"XXXX" + protocol.pack_frame_header(len(payload), len(evil), 2)[4:] + payload)
        raw.expect_error("bad-frame")
        raw.close()
        assert_counted(d, before, "bad-frame")
        good.finish({"r1": recs})

    @pytest.mark.parametrize("engine", ENGINES)
    def test_frame_with_absurd_length_is_bad_frame(self, setup, engine):
        """A batch header claiming 2**31 payload bytes gets ERROR bad-frame and nothing of it is written."""
        d, good, before = setup(engine)
        raw, recs = self._accepted(d)
        evil = b"".join(make_records("bx", 20))
        raw.write_pipe(protocol.pack_frame_header(2**31, 1, 2) + evil)
        raw.expect_error("bad-frame")
        raw.close()
        assert_counted(d, before, "bad-frame")
        good.finish({"r1": recs})
        assert d.log("app").stat().st_size < 10 << 20

    def test_bad_frame_as_first_batch_is_bad_frame(self, setup):
        """A producer whose very first header is invalid gets ERROR bad-frame and writes nothing."""
        d, good, before = setup("splice")
        raw = RawProducer(d.sock)
        raw.hello("app")
        raw.expect_welcome()
        raw.write_pipe(protocol.pack_frame_header(100, 0, 1) + b"x" * 99 + b"\n")
        raw.expect_error("bad-frame")
        raw.close()
        assert_counted(d, before, "bad-frame")
        good.finish()


class TestProducerDeath:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_pipe_closed_mid_batch_discards_partial_batch(self, setup, engine):
        """Header plus half a payload then a closed pipe: ERROR producer-died, counted, and nothing partial in the file."""
        d, good, before = setup(engine)
        raw = RawProducer(d.sock)
        raw.hello("app")
        raw.expect_welcome()
        recs = make_records("r1", 100)
        raw.send_batch(recs, 1)
        raw.wait_release(1)
        partial = make_records("r2x", 50)
        payload = b"".join(partial)
        raw.write_pipe(protocol.pack_frame_header(len(payload), len(partial), 2) + payload[: len(payload) // 2])
        raw.close_pipe()
        raw.expect_error("producer-died")
        raw.close()
        assert_counted(d, before, "producer-died")
        good.finish({"r1": recs})  # an "r2x" line (whole or torn) would be an unknown tag

    @pytest.mark.parametrize("engine", ENGINES)
    def test_killed_producer_process_discards_partial_batch(self, setup, engine):
        """A producer process SIGKILLed mid-batch: counted as producer-died, its whole batch kept, the partial one absent."""
        d, good, before = setup(engine)
        proc = run_producer({"socket": d.sock, "stream": "app", "tag": "k", "mode": "raw-die-mid-batch", "count": 100})
        try:
            assert read_line(proc, 20, "'half'") == "half"
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert_counted(d, before, "producer-died")
        good.finish({"k": make_records("k", 100)})

    def test_clean_close_between_batches_is_not_an_error(self, setup):
        """A producer that closes its pipe after whole batches is no error and all its batches land."""
        d, good, before = setup()
        raw = RawProducer(d.sock)
        raw.hello("app")
        raw.expect_welcome()
        recs = make_records("r1", 300)
        for seq in range(1, 4):
            raw.send_batch(recs[(seq - 1) * 100 : seq * 100], seq)
        raw.wait_release(3)
        raw.close()
        good.finish({"r1": recs})
        assert error_counts(d) == before


class TestUnderLoad:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_storm_of_bad_producers_during_good_traffic(self, daemon, producers, tmp_path, engine):
        """Every kind of bad producer, one after another while two good producers write flat out: each is refused
        with its code and counted, and the good producers' records are all in the file, in order."""
        d = daemon(engine)
        good = {
            tag: producers({"socket": d.sock, "stream": "app", "tag": tag, "mode": "until-stdin", "max_seconds": 60},
                           stdin=subprocess.PIPE)
            for tag in ("L0", "L1")
        }
        for p in good.values():
            assert read_line(p, 30, "'ready'") == "ready"
        before = error_counts(d)
        kept: dict[str, list[bytes]] = {}

        def refused(code, *, stream="app", send=None, fds=None, **hello_fields):
            raw = RawProducer(d.sock)
            if send is not None:
                raw.send(send)
            else:
                raw.hello(stream, fds=fds, **hello_fields)
            raw.expect_error(code)
            raw.close()

        def accepted_then(tag, bad_bytes, code, close_pipe=False):
            raw = RawProducer(d.sock)
            raw.hello("app")
            raw.expect_welcome()
            kept[tag] = make_records(tag, 50)
            raw.send_batch(kept[tag], 1)
            raw.wait_release(1)
            raw.write_pipe(bad_bytes)
            if close_pipe:
                raw.close_pipe()
            raw.expect_error(code)
            raw.close()

        regular = tmp_path / "regular"
        regular.write_bytes(b"")
        reg_fd = os.open(regular, os.O_RDONLY)
        evil = b"".join(make_records("evil", 40))
        try:
            refused("bad-message", send=b"GET / HTTP/1.0\r\n\r\n")
            refused("bad-message", send=protocol.encode({"t": "nope"}))
            refused("bad-version", v=99)
            refused("bad-stream", stream="../x")
            refused("bad-stream", stream=".x")
            refused("bad-fd", fds=[])
            refused("bad-fd", fds=[reg_fd])
            accepted_then("s1", b"JUNK" + protocol.pack_frame_header(len(evil), 40, 2)[4:] + evil, "bad-frame")
            accepted_then("s2", protocol.pack_frame_header(2**31, 1, 2) + evil, "bad-frame")
            accepted_then("s3", protocol.pack_frame_header(len(evil), 40, 2) + evil[: len(evil) // 3], "producer-died", close_pipe=True)
            running = [tag for tag, p in good.items() if p.poll() is None]
            assert running == list(good), "a good producer ended during the storm"
        finally:
            os.close(reg_fd)
        results = {tag: finish_producer(p, timeout=90, input=b"") for tag, p in good.items()}
        after = error_counts(d)
        want = {"bad-message": 2, "bad-version": 1, "bad-stream": 2, "bad-fd": 2, "bad-frame": 2, "producer-died": 1}
        got = {code: after[code] - before[code] for code in ERROR_CODES}
        assert got == {code: want.get(code, 0) for code in ERROR_CODES}
        expected = {tag: make_records(tag, res["count"]) for tag, res in results.items()}
        assert_file(d.log("app"), {**expected, **kept})
        for res in results.values():
            assert res["count"] > 500 and res["dropped_records"] == 0 and res["failed_batches"] == 0, res
