"""TCP producers: MSG_ZEROCOPY and copy transports end to end, segment reuse, auth, and bad input on the TCP port."""

from __future__ import annotations

import os
import struct

import pytest
from conftest import finish_producer
from lsk_helpers import ENGINES, RawTcpProducer, assert_file, make_records, protocol, wait_for

# The C producer's thresholds (native/ls_producer.c), repeated here to build the workloads.
ZC_MIN_SEND = 10 << 10      # smaller sends go copied
ZC_COPIED_SWITCH = 32       # default: after this many COPIED ids in a row, zerocopy is turned off
FRAME_HEADER = 32
START_TIMEOUT = 20.0
STATUS_TIMEOUT = 10.0


# -- helpers ------------------------------------------------------------------------------------------
def tcp_daemon(daemon, engine: str, *extra: str):
    """A daemon listening on a loopback port it picked (port 0; no port is bound, closed and reused);
    returns (daemon, "tcp://127.0.0.1:PORT") with the port read back from its status."""
    d = daemon(engine, "--listen", "tcp://127.0.0.1:0", *extra)
    (address,) = d.status()["listen"]
    return d, address


def segment_groups(tag: str, at_least: int, segment_size: int, last_min: int) -> list[bytes]:
    """Records tag:0.. packed greedily into segment payloads (what the producer does with one record per
    write, and exactly what it does with one group per write), at least at_least records, the last
    group holding >= last_min bytes so that even the final flush's batch is above ZC_MIN_SEND."""
    cap = segment_size - FRAME_HEADER
    groups: list[bytes] = []
    cur: list[bytes] = []
    pos, n = 0, 0
    for rec in make_records(tag, at_least + 2000):
        if pos + len(rec) > cap:
            groups.append(b"".join(cur))
            if n >= at_least and pos >= last_min:
                return groups
            cur, pos = [], 0
        cur.append(rec)
        pos += len(rec)
        n += 1
    raise AssertionError("no record count fills the last segment enough; widen the search")


def error_count(d, code: str) -> int:
    return d.status()["errors"][code]


def wait_error_count(d, code: str, n: int) -> None:
    wait_for(lambda: error_count(d, code) == n, STATUS_TIMEOUT, f"errors[{code!r}] == {n} (status: {d.status()['errors']})")


def wait_producers_gone(d) -> None:
    """A TCP producer that closed between batches is gone from status (its connection ended cleanly)."""
    wait_for(lambda: not d.status()["producers"], STATUS_TIMEOUT, "closed TCP producers to leave the daemon's status")


def daemon_events(d, event: str) -> list[dict]:
    return [ev for ev in d.stderr_events() if ev.get("event") == event]


class GoodProducers:
    """A well-behaved TCP producer and a local producer on stream "app" of the same daemon."""

    PHASE = 3000

    def __init__(self, d, address: str):
        import logsink

        self.d = d
        self.clients = {
            "tcp": logsink.Client("app", address=address, transport="zerocopy", segment_size=65536),
            "local": logsink.Client("app", socket=d.sock),
        }
        self.written = dict.fromkeys(self.clients, 0)
        self.phase()

    def phase(self) -> None:
        """Write a phase of records from each, flush, and check the file holds exactly all so far."""
        for tag, client in self.clients.items():
            for rec in make_records(tag, self.PHASE, start=self.written[tag]):
                client.write(rec)
            self.written[tag] += self.PHASE
        for tag, client in self.clients.items():
            client.flush(timeout=20)
            assert client.connected, f"the good {tag} producer was disconnected"
        self.check()

    def check(self) -> None:
        assert_file(self.d.log("app"), {tag: make_records(tag, n) for tag, n in self.written.items()})

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.check()


# -- tests --------------------------------------------------------------------------------------------
class TestZerocopyTransport:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_two_zerocopy_producers_are_byte_exact_and_adapt_to_copied(self, daemon, producers, engine):
        """Two zerocopy producers' 100k records each land byte-exact, and on loopback every completion comes back COPIED so the client switches to copied sends."""
        d, address = tcp_daemon(daemon, engine)
        n = 100_000
        env = {k: v for k, v in os.environ.items() if k != "LOGSINK_TOKEN"}
        # 64 KiB segments: ~250 batches per producer, well past the 32 COPIED ids the switch needs.
        client = {"address": address, "transport": "zerocopy", "segment_size": 65536}
        procs = [producers({"socket": d.sock, "stream": "app", "tag": tag, "mode": "count", "count": n, "client": client}, env=env)
                 for tag in ("a", "b")]
        stats = [finish_producer(p, timeout=60) for p in procs]
        assert_file(d.log("app"), {"a": make_records("a", n), "b": make_records("b", n)})
        for st in stats:
            assert st["transport"] == "zerocopy", st
            assert st["records"] == n and st["dropped_records"] == 0 and st["failed_batches"] == 0, st
            assert st["zc_sends"] >= ZC_COPIED_SWITCH, st
            assert st["zc_completed"] > 0 and st["zc_copied"] > 0, f"completions were not tracked: {st}"
            assert st["zc_switched_to_copy"] == 1, f"loopback COPIED completions did not turn zerocopy off: {st}"
            assert st["copied_sends"] > 0, st
            assert st["zc_sends"] + st["copied_sends"] == st["batches"], st
        wait_producers_gone(d)
        status = d.status()
        assert status["streams"]["app"]["records"] == 2 * n
        assert not any(status["errors"].values()), status["errors"]

    @pytest.mark.parametrize("engine", ENGINES)
    def test_segment_not_reused_before_completion(self, daemon, monkeypatch, engine):
        """With a 4 x 16 KiB arena and zerocopy kept on, every segment goes out zerocopy and is reused only after its completion: the output stays byte-exact."""
        import logsink

        monkeypatch.delenv("LOGSINK_TOKEN", raising=False)
        d, address = tcp_daemon(daemon, engine)
        seg = 16384
        assert seg - FRAME_HEADER > ZC_MIN_SEND + 300  # a full segment is always above the zerocopy threshold
        # One write per segment payload: the producer outruns the completions, so segments wait for them.
        groups = segment_groups("z", 200_000, seg, last_min=ZC_MIN_SEND + 1024)
        # zc_copied_switch=0: never switch, every full segment is a zerocopy send.
        with logsink.Client("app", address=address, transport="zerocopy", segments=4, segment_size=seg,
                            flush_interval=None, timeout=30, zc_copied_switch=0) as c:
            for group in groups:
                c.write(group)
            c.flush(timeout=30)
            st = c.stats()
        recs = b"".join(groups).splitlines(keepends=True)
        assert_file(d.log("app"), {"z": recs})
        assert recs == make_records("z", len(recs))
        assert st["batches"] == len(groups) > 100 * st["segments"], st  # every segment was reused many times
        assert st["waits_for_release"] > 0, f"the writer never waited for a completion: no reuse was at stake: {st}"
        assert st["zc_switched_to_copy"] == 0 and st["copied_sends"] == 0, st
        assert st["zc_sends"] == st["batches"], f"some segments went copied: {st}"
        assert st["zc_completed"] == st["zc_sends"], f"completions do not match zerocopy sends: {st}"


class TestZerocopyCopiedSwitch:
    """The run of COPIED completions that turns zerocopy off is a Client option, not an environment knob."""

    SEG = 16384
    SEGMENTS = 4

    def _send_segments(self, address: str, **client_opts) -> dict:
        """Write about 60 full 16 KiB segments (well past the default switch of 32) over zerocopy TCP; return the client's stats."""
        import logsink

        groups = segment_groups("s", 6000, self.SEG, last_min=ZC_MIN_SEND + 1024)
        assert len(groups) > ZC_COPIED_SWITCH + self.SEGMENTS
        with logsink.Client("app", address=address, transport="zerocopy", segments=self.SEGMENTS, segment_size=self.SEG,
                            flush_interval=None, timeout=30, **client_opts) as c:
            for group in groups:
                c.write(group)
            c.flush(timeout=30)
            return c.stats()

    def test_option_sets_how_many_copied_completions_turn_zerocopy_off(self, daemon, monkeypatch):
        """zc_copied_switch=4 turns zerocopy off after 4 COPIED ids (loopback copies every send): at most 4 + the in-flight segments went zerocopy."""
        monkeypatch.delenv("LOGSINK_TOKEN", raising=False)
        d, address = tcp_daemon(daemon, "readwrite")
        st = self._send_segments(address, zc_copied_switch=4)
        assert st["zc_switched_to_copy"] == 1, st
        assert 4 <= st["zc_sends"] <= 4 + self.SEGMENTS, st
        assert st["zc_sends"] + st["copied_sends"] == st["batches"], st

    def test_environment_variable_no_longer_changes_the_switch(self, daemon, monkeypatch):
        """LOGSINK_ZC_COPIED_SWITCH=0 in the environment is ignored: a default client still switches to copied sends on loopback."""
        monkeypatch.setenv("LOGSINK_ZC_COPIED_SWITCH", "0")
        monkeypatch.delenv("LOGSINK_TOKEN", raising=False)
        d, address = tcp_daemon(daemon, "readwrite")
        st = self._send_segments(address)
        assert st["zc_switched_to_copy"] == 1, f"the environment knob still controls the switch: {st}"
        assert ZC_COPIED_SWITCH <= st["zc_sends"] <= ZC_COPIED_SWITCH + self.SEGMENTS, st

    @pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "8", True])
    def test_out_of_range_switch_is_refused(self, bad):
        """zc_copied_switch must be an int in 0 .. 2**32-1: anything else is a ValueError naming the option, before any connection."""
        import logsink

        with pytest.raises(ValueError, match="zc_copied_switch"):
            logsink.Client("app", address="tcp://127.0.0.1:9", zc_copied_switch=bad)


class TestPayloadStaysInTheEngine:
    @pytest.mark.parametrize("engine", ["io_uring", "splice"])
    def test_tcp_payload_is_spliced_and_only_headers_are_read(self, daemon, monkeypatch, engine):
        """Over TCP the daemon splices every payload byte (socket -> stage pipe -> file) and reads only the 32-byte headers: nothing is copied through user space."""
        import logsink

        monkeypatch.delenv("LOGSINK_TOKEN", raising=False)
        d, address = tcp_daemon(daemon, engine)
        recs = make_records("s", 30_000)
        with logsink.Client("app", address=address, segment_size=65536) as c:
            for rec in recs:
                c.write(rec)
            c.flush(timeout=20)
            batches = c.stats()["batches"]
        size = sum(map(len, recs))
        assert d.log("app").read_bytes() == b"".join(recs)
        totals = d.status()["totals"]
        assert totals["bytes_spliced"] == size and totals["bytes_copied"] == 0, totals
        assert totals["header_bytes"] == 32 * batches, totals


class TestCopyTransport:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_copy_over_tcp_is_byte_exact_and_flush_means_in_the_file(self, daemon, monkeypatch, engine):
        """transport="copy" over TCP lands byte-exact, and each flush() returns only once its records are in the file."""
        import logsink

        monkeypatch.delenv("LOGSINK_TOKEN", raising=False)
        d, address = tcp_daemon(daemon, engine)
        written: list[bytes] = []
        with logsink.Client("app", address=address, transport="copy", segment_size=65536) as c:
            for round_no in range(5):
                recs = make_records("c", 7000 + round_no, start=len(written))
                for rec in recs:
                    c.write(rec)
                written += recs
                c.flush(timeout=20)
                # No waiting: flush() returning is the promise.
                assert d.log("app").read_bytes() == b"".join(written), f"round {round_no}: flush returned before the file held every record"
            st = c.stats()
        assert_file(d.log("app"), {"c": written})
        wait_producers_gone(d)
        assert st["transport"] == "copy", st
        assert st["zc_sends"] == 0 and st["zc_completed"] == 0 and st["copied_sends"] == st["batches"] > 0, st


class TestAuth:
    def test_token_required_and_failure_counted_with_peer(self, daemon, monkeypatch, tmp_path):
        """With auth_token set, a client without LOGSINK_TOKEN is refused naming the token, the failure is counted and logged with the peer address, and the right token works."""
        import logsink

        conf = tmp_path / "logsink.toml"
        conf.write_text('auth_token = "tcp-test-secret"\n')
        d, address = tcp_daemon(daemon, "io_uring", "--config", str(conf))

        monkeypatch.delenv("LOGSINK_TOKEN", raising=False)
        with pytest.raises(ConnectionError) as exc:
            logsink.Client("app", address=address)
        assert "LOGSINK_TOKEN" in str(exc.value) and "token" in str(exc.value), str(exc.value)
        wait_error_count(d, "auth", 1)

        monkeypatch.setenv("LOGSINK_TOKEN", "not-the-secret")
        with pytest.raises(ConnectionError, match="token"):
            logsink.Client("app", address=address)
        wait_error_count(d, "auth", 2)

        monkeypatch.setenv("LOGSINK_TOKEN", "tcp-test-secret")
        recs = make_records("ok", 5000)
        with logsink.Client("app", address=address) as c:
            for rec in recs:
                c.write(rec)
            c.flush(timeout=20)
        assert_file(d.log("app"), {"ok": recs})
        assert error_count(d, "auth") == 2

        rejected = wait_for(lambda: [ev for ev in daemon_events(d, "producer_rejected") if ev.get("code") == "auth"],
                            STATUS_TIMEOUT, "the daemon's auth log line")
        for ev in rejected:
            host, _, port = ev.get("peer", "").rpartition(":")
            assert host == "127.0.0.1" and port.isdigit(), f"auth failure logged without the peer address: {ev}"
            assert "token" in ev["reason"], ev


@pytest.fixture
def bad_input_setup(daemon, monkeypatch):
    monkeypatch.delenv("LOGSINK_TOKEN", raising=False)
    d, address = tcp_daemon(daemon, "io_uring")
    good = GoodProducers(d, address)
    yield d, address, good
    for client in good.clients.values():
        client.close()


class TestBadInputOnTcp:
    def test_bad_peers_get_clear_errors_and_good_producers_are_unaffected(self, bad_input_setup):
        """Garbage, a local-only transport, data before WELCOME, an absurd frame length and a half-sent frame are each refused with their code and counter, while a TCP and a local producer on the same stream keep landing byte-exact."""
        d, address, good = bad_input_setup
        expected = {"bad-message": 0, "bad-frame": 0, "producer-died": 0}

        def refused(code: str) -> None:
            expected[code] += 1
            wait_error_count(d, code, expected[code])
            good.phase()

        # 1. garbage instead of HELLO (an HTTP request: its first 4 bytes are an absurd length)
        raw = RawTcpProducer(address)
        raw.send(b"GET / HTTP/1.1\r\nHost: logsink\r\n\r\n")
        msg = raw.expect_error("bad-message")
        assert "length" in msg["reason"], msg
        raw.close()
        refused("bad-message")

        # 2. a HELLO asking for vmsplice, which needs a local pipe
        raw = RawTcpProducer(address)
        raw.hello("app", transport="vmsplice")
        msg = raw.expect_error("bad-message")
        assert "vmsplice" in msg["reason"] and "TCP" in msg["reason"], msg
        raw.close()
        refused("bad-message")

        # 3. a whole batch sent in the same segment as HELLO, before WELCOME came back
        raw = RawTcpProducer(address)
        early = make_records("early", 10)
        payload = b"".join(early)
        hello = protocol.encode(protocol.hello("app", os.getpid(), "copy"))
        raw.send(hello + protocol.pack_frame_header(len(payload), len(early), 1) + payload)
        raw.expect_error("bad-message")
        raw.close()
        refused("bad-message")

        # 4. after WELCOME, a frame header claiming a 2 GiB payload
        raw = RawTcpProducer(address)
        raw.hello("app", transport="copy")
        raw.expect_welcome()
        raw.write_pipe(struct.pack("<4sBBHIIQQ", b"LSK1", 1, 0, 32, 2**31, 1, 1, 0))
        msg = raw.expect_error("bad-frame")
        assert "payload length" in msg["reason"], msg
        raw.close()
        refused("bad-frame")

        # 5. a whole batch, then a header and half the next payload, then the connection closes
        raw = RawTcpProducer(address)
        raw.hello("app", transport="copy")
        raw.expect_welcome()
        whole = make_records("torn-ok", 100)
        raw.send_batch(whole, 1)
        raw.wait_release(1)
        good.written["torn-ok"] = 100  # its whole batch stays; nothing of "torn" may appear
        torn = make_records("torn", 400)
        payload = b"".join(torn)
        raw.write_pipe(protocol.pack_frame_header(len(payload), len(torn), 2) + payload[: len(payload) // 2])
        raw.sock.close()
        expected["producer-died"] += 1
        wait_error_count(d, "producer-died", expected["producer-died"])
        died = wait_for(lambda: daemon_events(d, "producer_died_mid_batch"), STATUS_TIMEOUT, "the producer_died_mid_batch log line")
        assert died[-1]["discarded_bytes"] <= len(payload) // 2, died
        good.phase()

        assert d.proc.poll() is None, f"daemon died:\n{d.stderr()}"
        errors = d.status()["errors"]
        for code, n in expected.items():
            assert errors[code] == n, errors
        good.close()
        data = d.log("app").read_bytes()
        assert b"\0" not in data and b"torn:" not in data

    def test_data_before_welcome_reason_names_welcome(self, bad_input_setup):
        """A batch sent before WELCOME is refused with a reason that says to wait for WELCOME."""
        d, address, good = bad_input_setup
        raw = RawTcpProducer(address)
        early = make_records("early", 10)
        payload = b"".join(early)
        hello = protocol.encode(protocol.hello("app", os.getpid(), "copy"))
        raw.send(hello + protocol.pack_frame_header(len(payload), len(early), 1) + payload)
        msg = raw.expect_error("bad-message")
        raw.close()
        assert "WELCOME" in msg["reason"], msg


class TestTransportChoice:
    def test_local_producers_cannot_use_zerocopy(self, tmp_path):
        """transport="zerocopy" on the local socket is a ValueError that points at TCP."""
        import logsink

        with pytest.raises(ValueError, match="zerocopy.*tcp://"):
            logsink.Client("app", socket=str(tmp_path / "nowhere.sock"), transport="zerocopy")

    def test_tcp_producers_cannot_use_vmsplice(self):
        """transport="vmsplice" with a tcp:// address is a ValueError naming the TCP transports."""
        import logsink

        with pytest.raises(ValueError, match="vmsplice.*'zerocopy', 'copy'.*TCP"):
            logsink.Client("app", address="tcp://127.0.0.1:9", transport="vmsplice")  # refused before any connect

    def test_c_producer_refuses_zerocopy_on_a_unix_socket(self, tmp_path):
        """The C producer itself refuses LS_TRANSPORT_ZEROCOPY for a socket path with -EINVAL and says why."""
        import errno

        from logsink._native import ffi, lib

        opts = ffi.new("struct ls_producer_opts *")
        lib.ls_producer_opts_init(opts)
        opts.transport = lib.LS_TRANSPORT_ZEROCOPY
        out = ffi.new("struct ls_producer **")
        assert lib.ls_producer_open(b"app", str(tmp_path / "nowhere.sock").encode(), opts, out) == -errno.EINVAL
        assert b"zerocopy is for TCP" in ffi.string(lib.ls_producer_last_error(ffi.NULL))
