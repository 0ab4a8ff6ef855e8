"""HELLO admission (logsink.daemon.admission.admit_hello) as a pure function: no daemon, no sockets, no engine."""

from __future__ import annotations

import pytest

from logsink import protocol
from logsink.access import AccessRules, Principals
from logsink.daemon.admission import Admission, ConnFacts, DaemonFacts, admit_hello, status_refusal, write_refusal

OPEN = AccessRules(daemon_uid=0)  # no write rules: every local uid may write
APP_FOR_1000 = AccessRules(daemon_uid=0, write_rules=True, streams={"app": Principals(uids=frozenset({1000}), gids=frozenset({50}))},
                           status=Principals(uids=frozenset({1000})))
LOCAL = ConnFacts(tcp=False, uid=1000, gid=1000, fds=1)
TCP = ConnFacts(tcp=True)


def hello(stream: str = "app", transport: str = "vmsplice", **extra):
    return protocol.check_message(protocol.hello(stream, 4242, transport, **extra))


def state(**kw) -> DaemonFacts:
    base = dict(rules=OPEN, free_slots=10, max_producers=10)
    base.update(kw)
    return DaemonFacts(**base)


def no_groups(uid: int, gid: int) -> frozenset[int]:
    return frozenset({gid})


def refused(code: str, msg, conn: ConnFacts, daemon: DaemonFacts, gids=no_groups) -> str:
    with pytest.raises(protocol.ProtocolError) as exc:
        admit_hello(msg, conn, daemon, gids)
    assert exc.value.code == code, exc.value.reason
    return exc.value.reason


class TestAdmitted:
    def test_local_hello_with_one_fd_is_admitted_with_its_segment_size(self):
        """A local HELLO with exactly one fd and a free slot is admitted, carrying stream, transport, pid and segment size."""
        got = admit_hello(hello(segment_size=1 << 20), LOCAL, state(), no_groups)
        assert got == Admission(stream="app", transport="vmsplice", pid=4242, segment_size=1 << 20)

    def test_missing_or_nonsense_segment_size_is_zero(self):
        """A HELLO without a positive integer segment_size is admitted with segment size 0."""
        assert admit_hello(hello(), LOCAL, state(), no_groups).segment_size == 0
        assert admit_hello(hello(segment_size=-5), LOCAL, state(), no_groups).segment_size == 0
        assert admit_hello(hello(segment_size="1M"), LOCAL, state(), no_groups).segment_size == 0

    def test_tcp_hello_with_the_token_is_admitted(self):
        """A TCP HELLO with a TCP transport and the right token is admitted."""
        got = admit_hello(hello(transport="zerocopy", token="s3cret"), TCP, state(auth_token="s3cret"), no_groups)
        assert (got.transport, got.pid) == ("zerocopy", 4242)


class TestRefused:
    def test_shutting_down_is_told_first(self):
        """A stopping daemon answers shutting-down even to a HELLO that is wrong in other ways too."""
        refused(protocol.E_SHUTTING_DOWN, hello(transport="zerocopy"), ConnFacts(tcp=False, fds=0), state(shutting_down=True, free_slots=0))

    def test_failed_engine_refuses_with_internal_and_its_reason(self):
        """After the engine failed, HELLO gets internal naming why."""
        reason = refused(protocol.E_INTERNAL, hello(), LOCAL, state(engine_failed="epoll_wait: EBADF"))
        assert "epoll_wait: EBADF" in reason

    @pytest.mark.parametrize("fds", [0, 2])
    def test_local_hello_needs_exactly_one_fd(self, fds):
        """A local HELLO with no fd or two is bad-fd."""
        reason = refused(protocol.E_BAD_FD, hello(), ConnFacts(tcp=False, uid=1000, gid=1000, fds=fds), state())
        assert f"got {fds}" in reason

    def test_tcp_transport_on_the_local_socket_is_bad_message(self):
        """zerocopy is a TCP transport: on the local socket it is bad-message."""
        refused(protocol.E_BAD_MESSAGE, hello(transport="zerocopy"), LOCAL, state())

    def test_local_transport_over_tcp_is_bad_message(self):
        """vmsplice is local-only: over TCP it is bad-message."""
        refused(protocol.E_BAD_MESSAGE, hello(transport="vmsplice"), TCP, state())

    @pytest.mark.parametrize("token", [None, "wrong", 7])
    def test_tcp_without_the_token_is_auth(self, token):
        """A TCP HELLO without the daemon's token (missing, wrong, not a string) is auth."""
        extra = {} if token is None else {"token": token}
        refused(protocol.E_AUTH, hello(transport="copy", **extra), TCP, state(auth_token="s3cret"))

    def test_tcp_bytes_before_welcome_are_bad_message(self):
        """Bytes that followed a TCP HELLO before WELCOME are refused with the table's reason."""
        reason = refused(protocol.E_BAD_MESSAGE, hello(transport="copy"), ConnFacts(tcp=True, early_bytes=32), state())
        assert "data sent before WELCOME" in reason

    def test_wrong_token_is_told_before_early_data(self):
        """Auth is checked before early data, so a peer without the token learns nothing else."""
        refused(protocol.E_AUTH, hello(transport="copy"), ConnFacts(tcp=True, early_bytes=32), state(auth_token="s3cret"))

    def test_no_free_slot_is_too_many_producers(self):
        """With every producer slot taken HELLO is too-many-producers, naming the limit."""
        reason = refused(protocol.E_TOO_MANY, hello(), LOCAL, state(free_slots=0, max_producers=7))
        assert "7" in reason

    def test_access_rules_are_checked_before_the_slot_count(self):
        """A peer the rules do not admit is told forbidden even when no slot is free."""
        refused(protocol.E_FORBIDDEN, hello(), ConnFacts(tcp=False, uid=2000, gid=2000, fds=1), state(rules=APP_FOR_1000, free_slots=0))


class TestAccess:
    def test_group_from_the_lookup_admits(self):
        """A uid not listed is admitted through a group the gids lookup reports."""
        conn = ConnFacts(tcp=False, uid=2000, gid=2000, fds=1)
        assert admit_hello(hello(), conn, state(rules=APP_FOR_1000), lambda uid, gid: frozenset({gid, 50})).stream == "app"
        assert write_refusal(APP_FOR_1000, conn, "app", lambda uid, gid: frozenset({gid})) is not None

    def test_no_write_rules_spare_the_group_lookup(self):
        """Without write rules admission never asks for the peer's groups."""
        def boom(uid: int, gid: int) -> frozenset[int]:
            raise AssertionError("the group database was consulted")

        assert write_refusal(OPEN, ConnFacts(tcp=False, uid=2000, gid=2000), "app", boom) is None

    def test_status_is_refused_over_tcp_and_to_unlisted_uids(self):
        """Status is for the local socket, and with status rules only for the peers they list."""
        assert status_refusal(APP_FOR_1000, TCP, no_groups) is not None
        assert status_refusal(APP_FOR_1000, ConnFacts(tcp=False, uid=1000, gid=1000), no_groups) is None
        assert status_refusal(APP_FOR_1000, ConnFacts(tcp=False, uid=2000, gid=2000), no_groups) is not None
