"""`logsink status`: the JSON document of the contract and the human-readable text."""

from __future__ import annotations

import os

import pytest
from lsk_helpers import ENGINES, SPLICE_ENGINES, make_records, status, wait_for

TOP_KEYS = {"engine", "fallback_reason", "pid", "dir", "socket", "totals", "errors", "streams", "producers"}
TOTAL_KEYS = {"bytes", "records", "batches", "bytes_spliced", "bytes_copied", "header_bytes"}
ERROR_KEYS = {
    "bad-message", "bad-version", "bad-stream", "bad-fd", "bad-frame",
    "producer-died", "write-failed", "shutting-down", "too-many-producers",
}
STREAM_KEYS = {"file", "bytes", "records", "batches", "producers", "bytes_spliced", "bytes_copied", "errors"}
PRODUCER_KEYS = {"id", "stream", "pid", "uid", "transport", "batches", "bytes", "records", "released", "pinned_segments"}


@pytest.fixture
def running(daemon):
    """A daemon of the given engine with one open vmsplice client on "app" that wrote and flushed 1000 records."""
    import logsink

    clients = []

    def make(engine, transport="vmsplice"):
        d = daemon(engine)
        c = logsink.Client("app", socket=d.sock, transport=transport)
        clients.append(c)
        recs = make_records("s", 1000)
        for r in recs:
            c.write(r)
        c.flush(timeout=20)
        return d, c, recs

    yield make
    for c in clients:
        c.close()


class TestStatusJson:
    @pytest.mark.parametrize("engine", ENGINES)
    def test_status_has_contract_keys_and_values(self, running, engine):
        """status --json names the engine, the daemon, totals, every error counter, the stream and the producer."""
        d, c, recs = running(engine)
        st = status(d.sock)
        assert TOP_KEYS <= set(st), f"missing {TOP_KEYS - set(st)}"
        assert st["engine"] == engine
        assert st["fallback_reason"] == ""
        assert st["pid"] == d.pid
        assert os.path.samefile(st["dir"], d.dir) and os.path.isabs(st["dir"])
        assert st["socket"] == d.sock
        assert TOTAL_KEYS <= set(st["totals"]), f"missing {TOTAL_KEYS - set(st['totals'])}"
        assert ERROR_KEYS <= set(st["errors"]), f"missing {ERROR_KEYS - set(st['errors'])}"
        assert all(v == 0 for v in st["errors"].values()), st["errors"]
        size = sum(map(len, recs))
        assert st["totals"]["bytes"] == size and st["totals"]["records"] == 1000
        assert st["totals"]["batches"] == c.stats()["batches"] >= 1
        assert st["totals"]["header_bytes"] == 32 * st["totals"]["batches"]

        assert set(st["streams"]) == {"app"}
        s = st["streams"]["app"]
        assert STREAM_KEYS <= set(s), f"missing {STREAM_KEYS - set(s)}"
        assert os.path.samefile(s["file"], d.log("app")) and os.path.isabs(s["file"])
        assert (s["bytes"], s["records"], s["producers"], s["errors"]) == (size, 1000, 1, 0)
        assert s["batches"] == st["totals"]["batches"]

        assert len(st["producers"]) == 1
        p = st["producers"][0]
        assert PRODUCER_KEYS <= set(p), f"missing {PRODUCER_KEYS - set(p)}"
        assert p["id"] == c.producer_id
        assert (p["stream"], p["pid"], p["uid"], p["transport"]) == ("app", os.getpid(), os.getuid(), "vmsplice")
        assert (p["bytes"], p["records"]) == (size, 1000)
        assert p["batches"] == p["released"] == c.stats()["released_through"]
        assert p["pinned_segments"] == 0

    @pytest.mark.parametrize("engine", SPLICE_ENGINES)
    def test_splice_engines_splice_every_payload_byte(self, running, engine):
        """io_uring and splice with the vmsplice transport report bytes_spliced = bytes and bytes_copied = 0."""
        d, c, recs = running(engine)
        st = status(d.sock)
        size = sum(map(len, recs))
        assert st["totals"]["bytes_spliced"] == size > 0
        assert st["totals"]["bytes_copied"] == 0
        assert st["streams"]["app"]["bytes_spliced"] == size
        assert st["streams"]["app"]["bytes_copied"] == 0

    def test_readwrite_engine_copies_every_payload_byte(self, running):
        """The readwrite engine reports bytes_copied = bytes and bytes_spliced = 0."""
        d, c, recs = running("readwrite")
        st = status(d.sock)
        size = sum(map(len, recs))
        assert st["totals"]["bytes_copied"] == size > 0
        assert st["totals"]["bytes_spliced"] == 0
        assert st["streams"]["app"]["bytes_copied"] == size

    def test_copy_transport_is_reported_per_producer(self, running):
        """A Client with transport="copy" is listed with transport "copy"."""
        d, c, recs = running("splice", transport="copy")
        st = status(d.sock)
        assert [p["transport"] for p in st["producers"]] == ["copy"]
        assert st["totals"]["bytes_spliced"] == sum(map(len, recs))

    def test_closed_producer_leaves_the_list_but_stream_counts_stay(self, daemon):
        """After a Client closes, it is gone from "producers" while its stream keeps its byte count."""
        import logsink

        d = daemon("io_uring")
        with logsink.Client("app", socket=d.sock) as c:
            c.write(b"hello world\n")
            c.flush(timeout=10)
            assert len(status(d.sock)["producers"]) == 1
        st = wait_for(lambda: (s := status(d.sock))["producers"] == [] and s, 10, "the producer to leave the list")
        assert st["streams"]["app"]["bytes"] == 12
        assert st["streams"]["app"]["producers"] == 0

    def test_empty_daemon_status(self, daemon):
        """A daemon with no producer yet reports zero totals and no streams or producers."""
        d = daemon("splice")
        st = status(d.sock)
        assert st["engine"] == "splice"
        assert st["producers"] == [] and st["streams"] == {}
        assert st["totals"]["bytes"] == 0 and st["totals"]["records"] == 0


class TestStatusText:
    def test_text_status_names_engine_and_streams(self, daemon):
        """Plain `logsink status` prints the engine name and every stream name."""
        import logsink

        d = daemon("splice")
        with logsink.Client("web-access", socket=d.sock) as a, logsink.Client("audit.log", socket=d.sock) as b:
            a.write(b"GET /\n")
            b.write(b"login root\n")
            a.flush(timeout=10)
            b.flush(timeout=10)
            out = status(d.sock, text=True)
        assert "splice" in out
        assert "web-access" in out and "audit.log" in out
        assert d.log("web-access").read_bytes() == b"GET /\n"
        assert d.log("audit.log").read_bytes() == b"login root\n"

    def test_status_without_daemon_fails(self, tmp_path):
        """`logsink status` against a socket nobody listens on exits non-zero with a message."""
        import subprocess
        import sys

        res = subprocess.run(
            [sys.executable, "-m", "logsink", "status", "--socket", str(tmp_path / "none.sock"), "--json"],
            capture_output=True, timeout=30,
        )
        assert res.returncode != 0
        assert res.stderr.strip(), "no error message on stderr"


class TestRates:
    def test_stream_rate_shows_traffic_and_falls_to_zero_when_it_stops(self, daemon):
        """While a producer writes, status shows the stream's bytes/s and records/s above zero; some seconds after it stops, both are 0 (a stall is visible)."""
        import threading

        import logsink

        d = daemon("splice")
        stop = threading.Event()

        def produce() -> None:
            with logsink.Client("busy", socket=d.sock) as c:
                i = 0
                while not stop.is_set():
                    c.write(b"busy %d\n" % i)
                    i += 1
                    if i % 1000 == 0:
                        c.flush(timeout=10)

        t = threading.Thread(target=produce)
        t.start()
        try:
            busy = wait_for(lambda: (s := status(d.sock)["streams"].get("busy")) and s["bytes_per_s"] > 0 and s, 30,
                            "a non-zero rate for the busy stream")
            assert busy["records_per_s"] > 0
        finally:
            stop.set()
            t.join(30)
        wait_for(lambda: status(d.sock)["streams"]["busy"]["bytes_per_s"] == 0, 30, "the rate to fall to 0 after the writes stopped")
        text = status(d.sock, text=True)
        assert "BYTES/S" in text and "REC/S" in text

    def test_watch_refreshes_until_interrupted(self, daemon):
        """`logsink status --watch 0.2 --json` prints a fresh status object every period and exits 0 on Ctrl-C."""
        import json
        import signal
        import subprocess
        import sys

        d = daemon("readwrite")
        proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "logsink", "status", "--socket", str(d.sock),
                                 "--watch", "0.2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first, second = json.loads(proc.stdout.readline()), json.loads(proc.stdout.readline())
            assert first["pid"] == second["pid"] == d.pid and second["uptime"] > first["uptime"]
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:  # (seen once under load) say where it was: faulthandler dumps on SIGABRT
                proc.send_signal(signal.SIGABRT)
                proc.wait(30)
                pytest.fail(f"--watch did not exit within 30 s of SIGINT; its threads:\n{proc.stderr.read()}")
            assert rc == 0, proc.stderr.read()


class TestServe:
    def test_listening_event_names_socket_dir_and_engine(self, daemon):
        """Once it accepts connections the daemon has logged a JSON "listening" event with socket, dir and engine."""
        d = daemon("readwrite")
        # The socket accepts (listen) a moment before the line is written: wait for it.
        events = wait_for(lambda: [e for e in d.stderr_events() if e.get("event") == "listening"], 20, "the listening event")
        assert len(events) == 1, d.stderr()
        ev = events[0]
        assert ev["socket"] == d.sock
        assert os.path.samefile(ev["dir"], d.dir)
        assert ev["engine"] == "readwrite"

    def test_auto_engine_picks_a_real_engine(self, daemon):
        """--engine auto runs one of the three engines and says why if it stepped down."""
        d = daemon("auto")
        st = status(d.sock)
        assert st["engine"] in ENGINES
        assert isinstance(st["fallback_reason"], str)
        if st["engine"] != "io_uring":
            assert st["fallback_reason"], "auto did not pick io_uring but gives no reason"
