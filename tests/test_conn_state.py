"""A control connection's life as one table (logsink.protocol.CONN_TRANSITIONS), and the daemon following it."""

from __future__ import annotations

import pytest
from lsk_helpers import RawProducer, make_records, wait_for

from logsink import protocol
from logsink.protocol import CONN_TRANSITIONS, ConnEvent, ConnState, ProtocolError, conn_step

S, E = ConnState, ConnEvent

# The specification, written out independently of the implementation: every legal move.
LEGAL = {
    (S.AWAIT_HELLO, E.HELLO): S.ADMITTING,
    (S.AWAIT_HELLO, E.STATUS): S.AWAIT_HELLO,
    (S.AWAIT_HELLO, E.FD): S.AWAIT_HELLO,
    (S.ADMITTING, E.WELCOME): S.PRODUCING,
    (S.ADMITTING, E.WELCOME_TCP): S.FRAMES,
    (S.PRODUCING, E.STATUS): S.PRODUCING,
    (S.PRODUCING, E.PRODUCER_END): S.ENDED,
    (S.FRAMES, E.PRODUCER_END): S.CLOSED,
    (S.ENDED, E.STATUS): S.ENDED,
    **{(s, E.CLOSE): S.CLOSED for s in S},
}
# The code a peer is told for the illegal moves a peer can cause; anything else illegal is bad-message.
REFUSED_WITH = {
    **{(s, E.FD): protocol.E_TOO_MANY_FDS for s in (S.ADMITTING, S.PRODUCING, S.FRAMES, S.ENDED)},
}
ALL = [(s, e) for s in S for e in E]


class TestTransitionTable:
    @pytest.mark.parametrize("state,event", ALL, ids=[f"{s.value}-{e.value}" for s, e in ALL])
    def test_every_state_and_event_is_legal_or_refused_with_a_protocol_error(self, state, event):
        """Each (state, event) either moves to the specified state or raises ProtocolError with the peer's error code."""
        if (state, event) in LEGAL:
            assert conn_step(state, event) is LEGAL[(state, event)]
        else:
            with pytest.raises(ProtocolError) as exc:
                conn_step(state, event, kind="welcome")
            assert exc.value.code == REFUSED_WITH.get((state, event), protocol.E_BAD_MESSAGE)
            assert exc.value.reason and "{" not in exc.value.reason

    def test_table_is_exactly_the_specification(self):
        """The module's table holds the specified moves and no others."""
        assert CONN_TRANSITIONS == LEGAL

    def test_hello_is_legal_once(self):
        """HELLO is legal only before any HELLO: a second one, in any later state, is 'HELLO sent twice'."""
        for state in (S.ADMITTING, S.PRODUCING, S.FRAMES, S.ENDED):
            with pytest.raises(ProtocolError, match="HELLO sent twice"):
                conn_step(state, E.HELLO)

    def test_nothing_but_welcome_may_follow_hello(self):
        """Bytes after HELLO and before WELCOME are refused with the reason that says to wait for WELCOME."""
        with pytest.raises(ProtocolError, match="data sent before WELCOME") as exc:
            conn_step(S.ADMITTING, E.DATA)
        assert exc.value.code == protocol.E_BAD_MESSAGE

    def test_daemon_only_message_names_its_type(self):
        """A client sending a message only the daemon sends is told which type it sent."""
        with pytest.raises(ProtocolError, match="'release' is not a message a client may send"):
            conn_step(S.AWAIT_HELLO, E.OTHER, kind="release")

    def test_status_any_time_the_connection_is_read(self):
        """STATUS is answered before HELLO, while producing, and after the producer ended (local connections)."""
        for state in (S.AWAIT_HELLO, S.PRODUCING, S.ENDED):
            assert conn_step(state, E.STATUS) is state

    def test_tcp_switches_to_frames_and_closes_with_its_producer(self):
        """A TCP producer's connection carries frames after WELCOME and ends when its producer ends."""
        state = conn_step(conn_step(S.AWAIT_HELLO, E.HELLO), E.WELCOME_TCP)
        assert state is S.FRAMES
        assert conn_step(state, E.PRODUCER_END) is S.CLOSED

    def test_closed_is_final(self):
        """Nothing leaves CLOSED: closing again is a no-op, every other event is illegal."""
        for event in E:
            if event is E.CLOSE:
                assert conn_step(S.CLOSED, event) is S.CLOSED
            else:
                with pytest.raises(ProtocolError):
                    conn_step(S.CLOSED, event)


class TestDaemonFollowsTheTable:
    def test_second_hello_after_the_producer_ended_is_refused(self, daemon):
        """A local connection whose producer's pipe ended may still ask STATUS but not HELLO again: ERROR bad-message."""
        d = daemon()
        raw = RawProducer(d.sock)
        try:
            raw.hello("app")
            raw.expect_welcome()
            recs = make_records("a", 10)
            raw.send_batch(recs, 1)
            raw.wait_release(1)
            raw.close_pipe()  # the producer ends (pipe EOF); the connection stays open
            wait_for(lambda: not d.status()["producers"], 10, "the producer to end")
            raw.send(protocol.encode({"t": protocol.STATUS}))
            msg = raw.next_message()
            while msg is not None and msg["t"] == protocol.RELEASE:
                msg = raw.next_message()
            assert msg is not None and msg["t"] == protocol.STATUS, msg
            raw.hello("app", fds=[])  # (with an fd, the fd is refused first: too-many-fds, "an fd after HELLO")
            err = raw.expect_error(protocol.E_BAD_MESSAGE)
            assert "HELLO sent twice" in err["reason"]
        finally:
            raw.close()
        assert d.status()["errors"][protocol.E_BAD_MESSAGE] == 1
        assert d.log("app").read_bytes() == b"".join(recs)
