"""RELP forwarding: the C session on its own (a hand-driven loopback peer), the daemon against a scripted
RELP server, and against a real rsyslog imrelp killed with SIGKILL and SIGTERM while producers write."""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import finish_producer
from lsk_helpers import make_records, wait_for
from peers import RsyslogRelp

RELP = 2


# -- RELP frames ------------------------------------------------------------------------------------
def parse_frames(buf: bytes) -> tuple[list[tuple[int, str, bytes]], bytes]:
    """``TXNR SP COMMAND SP DATALEN [SP DATA] LF`` frames -> ([(txnr, command, data)], the incomplete rest)."""
    out, pos = [], 0
    while True:
        sp1 = buf.find(b" ", pos)
        sp2 = buf.find(b" ", sp1 + 1) if sp1 >= 0 else -1
        if sp2 < 0:
            break
        end_len = sp2 + 1
        while end_len < len(buf) and buf[end_len : end_len + 1].isdigit():
            end_len += 1
        if end_len >= len(buf):
            break
        n = int(buf[sp2 + 1 : end_len])
        if n == 0:
            assert buf[end_len : end_len + 1] == b"\n", f"DATALEN 0 must be followed by LF: {buf[pos:end_len + 10]!r}"
            data, nxt = b"", end_len + 1
        else:
            assert buf[end_len : end_len + 1] == b" ", f"DATALEN must be followed by SP: {buf[pos:end_len + 10]!r}"
            if end_len + 1 + n + 1 > len(buf):
                break
            data = buf[end_len + 1 : end_len + 1 + n]
            assert buf[end_len + 1 + n : end_len + 2 + n] == b"\n", f"missing trailer after {buf[pos:end_len + 40]!r}"
            nxt = end_len + 2 + n
        out.append((int(buf[pos:sp1]), buf[sp1 + 1 : sp2].decode(), data))
        pos = nxt
    return out, buf[pos:]


def relp_wire(records: list[bytes], first_txnr: int = 2) -> bytes:
    """What the forwarder must send for ``records``: one syslog command each, the record's '\\n' as trailer."""
    out, t = [], first_txnr
    for r in records:
        body = r[:-1]
        out.append(b"%d syslog %d" % (t, len(body)) + (b" " + body if body else b"") + b"\n")
        t = 1 if t == 999_999_999 else t + 1
    return b"".join(out)


def rsp(txnr: int, text: bytes = b"200 OK") -> bytes:
    return b"%d rsp %d %s\n" % (txnr, len(text), text)


# -- the C session, driven by hand --------------------------------------------------------------------
class CRelp:
    """ls_forward_* with RELP framing over a loopback connection whose far end the test plays."""

    def __init__(self, path: Path, window: int | None = None):
        from logsink._native import ffi, lib

        self.ffi, self.lib = ffi, lib
        self.fd = os.open(path, os.O_RDONLY)
        out = ffi.new("struct ls_forward **")
        assert lib.ls_forward_new(self.fd, 0, RELP, out) == 0
        self.f = out[0]
        if window is not None:
            assert lib.ls_forward_relp_window(self.f, window) == 0
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(4)
        self.sock: socket.socket | None = None
        self.peer: socket.socket | None = None
        self.rx = b""

    def connect(self, next_txnr: int = 2) -> None:
        self.sock = socket.create_connection(self.srv.getsockname())
        self.sock.setblocking(False)
        self.peer, _ = self.srv.accept()
        self.peer.settimeout(5)
        self.rx = b""
        assert self.lib.ls_forward_relp_attach(self.f, self.sock.fileno(), next_txnr) == 0

    def advance(self, end: int) -> None:
        assert self.lib.ls_forward_advance(self.f, end) == 0

    def pump(self) -> int:
        return self.lib.ls_forward_pump(self.f)

    def read(self) -> int:
        return self.lib.ls_forward_relp_read(self.f)

    def counters(self):
        c = self.ffi.new("struct ls_forward_counters *")
        self.lib.ls_forward_counters(self.f, c)
        return c

    def error(self) -> str:
        buf = self.ffi.new("char[200]")
        self.lib.ls_forward_relp_error(self.f, buf, 200)
        return self.ffi.string(buf).decode()

    def frames(self, n: int, timeout: float = 5.0) -> list[tuple[int, str, bytes]]:
        """The next ``n`` frames the forwarder sent (pumping meanwhile)."""
        got: list[tuple[int, str, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            assert time.monotonic() < deadline, f"{len(got)} of {n} frames arrived"
            self.pump()
            self.peer.settimeout(0.05)
            try:
                data = self.peer.recv(1 << 20)
            except TimeoutError:
                continue
            assert data, "the forwarder closed the connection"
            frames, self.rx = parse_frames(self.rx + data)
            got += frames
        assert len(got) == n, f"expected {n} frames, got {len(got)}"
        return got

    def quiet(self, wait: float = 0.2) -> bytes:
        """Bytes the forwarder sends within ``wait`` seconds (pumping): b"" proves it holds back."""
        self.pump()
        self.peer.settimeout(wait)
        try:
            return self.peer.recv(1 << 20)
        except TimeoutError:
            return b""

    def answer(self, data: bytes) -> int:
        """The far end sends ``data``; returns what ls_forward_relp_read made of it (records acknowledged, or the end)."""
        self.peer.sendall(data)
        wait_for(lambda: _readable(self.sock), 5, "the response to arrive")
        total = 0
        while True:
            r = self.read()
            if r < 0:
                return r
            total += r
            if not _readable(self.sock):
                return total

    def close(self) -> None:
        self.lib.ls_forward_free(self.f)
        os.close(self.fd)
        for s in (self.sock, self.peer, self.srv):
            if s is not None:
                s.close()


def _readable(s: socket.socket) -> bool:
    return bool(select.select([s], [], [], 0.05)[0])


def write_records(path: Path, recs: list[bytes]) -> list[int]:
    """Write ``recs`` to ``path``; returns each record's end offset."""
    path.write_bytes(b"".join(recs))
    ends, pos = [], 0
    for r in recs:
        pos += len(r)
        ends.append(pos)
    return ends


@pytest.fixture
def crelp(tmp_path):
    made: list[CRelp] = []

    def make(recs: list[bytes], window: int | None = None) -> tuple[CRelp, list[int]]:
        path = tmp_path / f"src{len(made)}.log"
        ends = write_records(path, recs)
        c = CRelp(path, window)
        made.append(c)
        c.connect()
        c.advance(ends[-1] if ends else 0)
        return c, ends

    yield make
    for c in made:
        c.close()


class TestRelpSession:
    def test_each_record_is_one_syslog_command_with_its_newline_as_trailer(self, crelp):
        """Records of every size (empty, short, >16 KiB via sendfile, >256 KiB) go out as byte-exact syslog commands from txnr 2."""
        recs = make_records("a", 50) + [b"\n", b"x" * 20_000 + b"\n"] + make_records("b", 5) + [b"y" * 300_000 + b"\n", b"z\n"]
        c, ends = crelp(recs)
        want = relp_wire(recs)
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < len(want) and time.monotonic() < deadline:
            c.pump()
            c.peer.settimeout(0.05)
            try:
                got += c.peer.recv(1 << 20)
            except TimeoutError:
                pass
        assert got == want
        cn = c.counters()
        assert cn.records_sent == len(recs) and cn.relp_inflight == len(recs) and cn.cursor == ends[-1]
        assert cn.acked_cursor == 0, "nothing is acknowledged before the collector answers"
        assert cn.bytes_sendfile >= 320_000, "long records go by sendfile"

    def test_acked_cursor_moves_only_on_rsp_200(self, crelp):
        """Sent is not acknowledged: acked_cursor follows the rsp 200s, record by record."""
        recs = make_records("a", 10)
        c, ends = crelp(recs)
        frames = c.frames(10)
        assert [f[0] for f in frames] == list(range(2, 12)) and all(f[1] == "syslog" for f in frames)
        assert c.counters().acked_cursor == 0
        assert c.answer(rsp(2) + rsp(3) + rsp(4)) == 3
        cn = c.counters()
        assert cn.acked_cursor == ends[2] and cn.relp_acked == 3 and cn.relp_inflight == 7
        assert c.answer(b"".join(rsp(t) for t in range(5, 12))) == 7
        cn = c.counters()
        assert cn.acked_cursor == ends[-1] and cn.unacked_bytes == 0

    def test_window_bounds_the_commands_awaiting_a_response(self, crelp):
        """With window 5, five commands go out; the sixth waits for an rsp (pump says -ENOBUFS)."""
        recs = make_records("a", 20)
        c, ends = crelp(recs, window=5)
        assert [f[0] for f in c.frames(5)] == [2, 3, 4, 5, 6]
        assert c.pump() == -errno.ENOBUFS
        assert c.quiet() == b"", "a full window must hold back the next command"
        assert c.answer(rsp(2) + rsp(3)) == 2
        assert [f[0] for f in c.frames(2)] == [7, 8]
        assert c.quiet() == b""

    def test_txnr_wraps_from_999999999_to_1(self, crelp, tmp_path):
        """Transaction numbers run up to 999999999 and continue at 1 (0 is reserved for hints)."""
        recs = make_records("w", 4)
        path = tmp_path / "wrap.log"
        ends = write_records(path, recs)
        c = CRelp(path)
        try:
            c.connect(next_txnr=999_999_998)
            c.advance(ends[-1])
            assert [f[0] for f in c.frames(4)] == [999_999_998, 999_999_999, 1, 2]
            assert c.answer(rsp(999_999_998) + rsp(999_999_999) + rsp(1)) == 3
            assert c.counters().acked_cursor == ends[2]
        finally:
            c.close()

    def test_reconnect_replays_from_the_first_unanswered_record(self, crelp):
        """A connection lost with 7 of 10 commands unanswered: the next session sends those 7 again, from txnr 2."""
        recs = make_records("r", 10)
        c, ends = crelp(recs)
        c.frames(10)
        assert c.answer(rsp(2) + rsp(3) + rsp(4)) == 3
        assert c.lib.ls_forward_set_socket(c.f, -1) == 0
        cn = c.counters()
        assert cn.cursor == ends[2] and cn.acked_cursor == ends[2] and cn.rewound_bytes == ends[-1] - ends[2]
        c.sock.close()
        c.peer.close()
        c.connect()
        frames = c.frames(7)
        assert [f[0] for f in frames] == list(range(2, 9))
        assert [f[2] + b"\n" for f in frames] == recs[3:]

    def test_rsp_500_ends_the_session_and_keeps_the_record(self, crelp):
        """A refused record (rsp 500) ends the session with the collector's text; the cursor rewinds to it."""
        recs = make_records("e", 6)
        c, ends = crelp(recs)
        c.frames(6)
        assert c.answer(rsp(2) + rsp(3, b"500 disk full")) == -errno.EREMOTEIO
        assert c.error() == "500 disk full"
        cn = c.counters()
        assert cn.cursor == ends[0] and cn.acked_cursor == ends[0] and cn.relp_refused == 1 and cn.relp_acked == 1
        assert c.pump() == -errno.ENOTCONN, "the session is detached"

    def test_serverclose_hint_ends_the_session_after_the_answers_before_it(self, crelp):
        """rsp 200s followed by the serverclose hint: the answered records count, the rest is replayed."""
        recs = make_records("s", 5)
        c, ends = crelp(recs)
        c.frames(5)
        assert c.answer(rsp(2) + rsp(3) + b"0 serverclose 0\n") == -errno.ECONNABORTED
        cn = c.counters()
        assert cn.relp_acked == 2 and cn.cursor == ends[1] and cn.acked_cursor == ends[1]

    @pytest.mark.parametrize("bad, needle", [
        (rsp(5), "rsp for txnr 5"),
        (b"2 syslog 3 abc\n", "sent the command"),
        (b"x rsp 6 200 OK\n", "TXNR"),
        (b"2 rsp 6 200 OK!", "LF trailer"),
    ])
    def test_a_malformed_or_unexpected_response_is_a_protocol_error(self, crelp, bad, needle):
        """Answers to txnrs we are not waiting for, commands from the server and broken frames end the session (-EPROTO)."""
        c, ends = crelp(make_records("p", 3))
        c.frames(3)
        assert c.answer(bad) == -errno.EPROTO
        assert needle in c.error()
        assert c.counters().cursor == 0

    def test_responses_split_across_reads_are_reassembled(self, crelp):
        """Responses arriving a byte at a time are applied once whole."""
        recs = make_records("b", 3)
        c, ends = crelp(recs)
        c.frames(3)
        data = rsp(2) + rsp(3) + rsp(4)
        acked = 0
        for i in range(len(data)):
            c.peer.sendall(data[i : i + 1])
            wait_for(lambda: _readable(c.sock), 5, "the byte to arrive")
            r = c.read()
            assert r >= 0
            acked += r
        assert acked == 3 and c.counters().acked_cursor == ends[-1]

    def test_close_waits_for_its_rsp(self, crelp):
        """close goes out only with nothing in flight, takes the next txnr, and its rsp ends the session (-ESHUTDOWN)."""
        recs = make_records("c", 2)
        c, ends = crelp(recs)
        c.frames(2)
        assert c.lib.ls_forward_relp_close(c.f) == -errno.EBUSY
        assert c.answer(rsp(2) + rsp(3)) == 2
        assert c.lib.ls_forward_relp_close(c.f) == 4
        assert parse_frames(c.peer.recv(100))[0] == [(4, "close", b"")]
        assert c.answer(b"4 rsp 0\n0 serverclose 0\n") == -errno.ESHUTDOWN
        assert c.counters().acked_cursor == ends[-1]


# -- a scripted RELP server ---------------------------------------------------------------------------
class RelpServer:
    """A RELP collector in a thread: answers open, every syslog command with 200 (or ``refuse`` -> 500
    once for the record equal to it), close with ``rsp 0`` + serverclose. Keeps every session's frames."""

    def __init__(self):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self.sessions: list[list[tuple[int, str, bytes]]] = []
        self.refuse: bytes | None = None
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            frames: list[tuple[int, str, bytes]] = []
            with self.lock:
                self.sessions.append(frames)
            threading.Thread(target=self._serve, args=(c, frames), daemon=True).start()

    def _serve(self, c: socket.socket, frames: list) -> None:
        buf = b""
        with c:
            while True:
                try:
                    data = c.recv(1 << 20)
                except OSError:
                    return
                if not data:
                    return
                got, buf = parse_frames(buf + data)
                out = []
                for txnr, cmd, payload in got:
                    with self.lock:
                        frames.append((txnr, cmd, payload))
                    if cmd == "open":
                        offers = b"200 OK\nrelp_version=0\nrelp_software=test\ncommands=syslog"
                        out.append(b"%d rsp %d %s\n" % (txnr, len(offers), offers))
                    elif cmd == "syslog" and self.refuse is not None and payload + b"\n" == self.refuse:
                        self.refuse = None
                        out.append(rsp(txnr, b"500 refused for the test"))
                    elif cmd == "syslog":
                        out.append(rsp(txnr))
                    elif cmd == "close":
                        out.append(b"%d rsp 0\n0 serverclose 0\n" % txnr)
                c.sendall(b"".join(out))

    def records(self) -> list[bytes]:
        with self.lock:
            return [p + b"\n" for s in self.sessions for (_, cmd, p) in s if cmd == "syslog"]

    def commands(self, i: int) -> list[str]:
        with self.lock:
            return [cmd for _, cmd, _ in self.sessions[i]]

    def close(self) -> None:
        try:
            self.srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.srv.close()


@pytest.fixture
def relp_server():
    made: list[RelpServer] = []

    def make() -> RelpServer:
        s = RelpServer()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def forward_status(d, stream: str = "app") -> dict:
    fws = [f for f in d.status().get("forwards", []) if f["stream"] == stream]
    assert fws, f"status has no forward for {stream!r}"
    return fws[0]


def start_producers(d, producers, n: int, count: int, prefix: str = "p") -> dict[str, object]:
    return {f"{prefix}{i}": producers({"socket": d.sock, "stream": "app", "tag": f"{prefix}{i}", "mode": "count", "count": count, "client": {}})
            for i in range(n)}


def check_delivery(got: list[bytes], expected: dict[str, list[bytes]], max_duplicates: int) -> int:
    """Every expected record arrived (0 lost), in order per producer once duplicates are removed; nothing
    else arrived; returns the number of duplicates, asserted to be at most ``max_duplicates``."""
    counts = Counter(got)
    want = {r for recs in expected.values() for r in recs}
    stray = [r for r in counts if r not in want]
    assert not stray, f"{len(stray)} records arrived that nobody wrote, e.g. {stray[:3]}"
    lost = {tag: [r for r in recs if r not in counts] for tag, recs in expected.items()}
    assert not any(lost.values()), "lost: " + ", ".join(f"{t}: {len(v)} (first {v[0][:20]!r})" for t, v in lost.items() if v)
    for tag, recs in expected.items():
        seen, order = set(), []
        for r in got:
            if r.startswith(tag.encode() + b":") and r not in seen:
                seen.add(r)
                order.append(r)
        assert order == recs, f"producer {tag}: first arrivals out of order"
    dups = sum(n - 1 for n in counts.values())
    assert dups <= max_duplicates, f"{dups} duplicates, more than the {max_duplicates} the unacknowledged windows allow"
    return dups


class TestDaemonRelp:
    def test_records_arrive_once_and_a_clean_stop_closes_the_session(self, daemon, producers, relp_server):
        """open, one syslog command per record exactly once in order, and close on SIGTERM of the daemon."""
        srv = relp_server()
        d = daemon("io_uring", "--forward", f"app=tcp://127.0.0.1:{srv.port},relp")
        procs = start_producers(d, producers, 2, 10_000)
        for p in procs.values():
            finish_producer(p, timeout=60)
        expected = {t: make_records(t, 10_000) for t in procs}
        total = sum(len(r) for v in expected.values() for r in v)
        wait_for(lambda: forward_status(d)["acked_cursor"] == total, 30, "every record to be answered")
        fs = forward_status(d)
        assert fs["framing"] == "relp" and fs["relp_acked"] == 20_000 and fs["relp_inflight"] == 0 and fs["window"] == 1024
        assert check_delivery(srv.records(), expected, 0) == 0
        assert d.terminate() == 0
        cmds = srv.commands(0)
        assert cmds[0] == "open" and cmds[-1] == "close" and cmds.count("syslog") == 20_000

    def test_a_refused_record_is_sent_again_on_the_next_session(self, daemon, producers, relp_server):
        """rsp 500 for one record: the daemon reconnects and resends from it; nothing lost, duplicates within a window."""
        srv = relp_server()
        srv.refuse = make_records("q0", 3000)[1000]
        d = daemon("splice", "--forward", f"app=tcp://127.0.0.1:{srv.port},framing=relp,window=64")
        procs = start_producers(d, producers, 1, 3000, prefix="q")
        finish_producer(procs["q0"], timeout=60)
        expected = {"q0": make_records("q0", 3000)}
        total = sum(len(r) for r in expected["q0"])
        wait_for(lambda: forward_status(d)["acked_cursor"] == total, 30, "every record to be answered")
        fs = forward_status(d)
        assert fs["relp_refused"] == 1 and fs["reconnects"] >= 1
        assert "500 refused for the test" in fs["last_error"] or "500 refused for the test" in d.stderr()
        check_delivery(srv.records(), expected, 64)


# -- a real rsyslog imrelp ----------------------------------------------------------------------------
class TestRealImrelp:
    def test_rsyslog_imrelp_gets_every_record_once(self, daemon, producers, tmp_path):
        """A real rsyslogd (imrelp -> omfile, %rawmsg%) gets every record once, in order per producer."""
        peer = RsyslogRelp(tmp_path / "rsyslog").start()
        try:
            d = daemon("io_uring", "--forward", f"app=tcp://127.0.0.1:{peer.port},relp")
            procs = start_producers(d, producers, 3, 20_000)
            for p in procs.values():
                finish_producer(p, timeout=90)
            expected = {t: make_records(t, 20_000) for t in procs}
            got = peer.wait_lines(60_000, 60)
            assert check_delivery(got, expected, 0) == 0
        finally:
            peer.stop()

    @pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
    def test_collector_killed_mid_stream_loses_nothing(self, daemon, producers, tmp_path, sig):
        """rsyslog imrelp killed twice while 3 producers write: 0 lost; duplicates at most one window per kill."""
        window, n, kills = 256, 60_000, 2
        peer = RsyslogRelp(tmp_path / "rsyslog").start()
        try:
            d = daemon("io_uring", "--forward", f"app=tcp://127.0.0.1:{peer.port},relp,window={window}")
            procs = start_producers(d, producers, 3, n, prefix="k")
            for k in range(kills):
                have = len(peer.lines())
                wait_for(lambda have=have: len(peer.lines()) > have + 10_000, 60, f"rsyslog to receive records before kill {k + 1}")
                assert forward_status(d)["state"] == "up"
                peer.kill(sig)
                wait_for(lambda: forward_status(d)["state"] == "down", 20, "the forwarder to see the collector gone")
                peer.restart()
            for p in procs.values():
                finish_producer(p, timeout=120)
            expected = {t: make_records(t, n) for t in procs}
            total = sum(len(r) for v in expected.values() for r in v)
            wait_for(lambda: forward_status(d)["acked_cursor"] == total, 90, "every record to be answered")
            got = peer.lines()
            dups = check_delivery(got, expected, kills * window)
            fs = forward_status(d)
            # each record was answered once: a duplicate is a record rsyslog wrote whose rsp died with it
            assert fs["disconnects"] >= kills and fs["relp_acked"] == 3 * n
            print(f"{sig!r}: {kills} kills, {dups} duplicates (window {window})")
        finally:
            peer.stop()


class TestRelpConfig:
    def test_relp_in_toml_and_cli(self):
        """framing = "relp" (TOML, --framing, ,framing=relp or the bare ,relp) with an optional window."""
        from logsink.forward import forward_from_config

        got = forward_from_config({"app": {"address": "tcp://10.0.0.1:2514", "framing": "relp", "window": 128}},
                                  ["web=tcp://10.0.0.2:2514,relp", "db=tcp://10.0.0.3:2514,framing=relp,window=16"])
        assert (got["app"][0].framing, got["app"][0].window) == ("relp", 128)
        assert (got["web"][0].framing, got["web"][0].window) == ("relp", 1024)
        assert (got["db"][0].framing, got["db"][0].window) == ("relp", 16)
        assert forward_from_config({}, ["x=tcp://h:1"], "relp")["x"][0].framing == "relp"

    @pytest.mark.parametrize("table, cli, needle", [
        ({"app": {"address": "tcp://h:1", "window": 8}}, [], "window applies to framing = \"relp\""),
        ({"app": {"address": "tcp://h:1", "framing": "relp", "window": 0}}, [], "window must be"),
        ({"app": {"address": "tcp://h:1", "framing": "relp", "window": "many"}}, [], "window must be"),
        ({}, ["app=tcp://h:1,relp,window=70000"], "window must be"),
        ({}, ["app=tcp://h:1,rlp"], "unknown option"),
    ])
    def test_bad_window_or_framing_is_named(self, table, cli, needle):
        """A window without RELP, out of range or not a number is refused with the setting named."""
        from logsink.forward import ForwardConfigError, forward_from_config

        with pytest.raises(ForwardConfigError) as e:
            forward_from_config(table, cli)
        assert needle in str(e.value)
