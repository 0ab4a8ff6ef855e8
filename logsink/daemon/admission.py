"""HELLO admission as a pure function: may this connection become a producer of that stream?

No sockets, no engine, no daemon object: the inputs are the parsed HELLO, what the connection is
(:class:`ConnFacts`) and the daemon state admission reads (:class:`DaemonFacts`); the output is an
:class:`Admission` or a ``ProtocolError`` whose code and reason the peer is told. Opening the
stream's file and adding the producer to the engine (which can still fail) are the daemon's.
The one outside lookup, a local peer's groups, is a parameter (``gids``), so tests pass their own.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from logsink import access, protocol
from logsink.access import AccessRules
from logsink.protocol import ConnEvent, ConnState, ProtocolError

GidsLookup = Callable[[int, int], frozenset[int]]


@dataclass(frozen=True)
class ConnFacts:
    """The connection a HELLO came on."""

    tcp: bool              # TCP (no credentials: the token is the identity) or the local socket
    uid: int = -1          # SO_PEERCRED (local only)
    gid: int = -1
    fds: int = 0           # fds that came with the HELLO (local: the data pipe's read end; shm: + the arena)
    early_bytes: int = 0   # bytes received after the HELLO, before any WELCOME (TCP: must be 0)


@dataclass(frozen=True)
class DaemonFacts:
    """What admission reads of the daemon's state."""

    rules: AccessRules
    free_slots: int
    max_producers: int
    auth_token: str = ""
    shutting_down: bool = False
    engine_failed: str = ""  # why the engine thread ended, once it has


@dataclass(frozen=True)
class Admission:
    """A HELLO that may become a producer."""

    stream: str
    transport: str
    pid: int           # the pid the producer reports (over TCP the only one there is)
    segment_size: int  # 0 when the HELLO gave none (status then shows no pinned segments)


def admit_hello(hello: Mapping[str, Any], conn: ConnFacts, daemon: DaemonFacts,
                gids: GidsLookup = access.peer_gids) -> Admission:
    """Admit ``hello`` (already shape-checked by ``protocol.check_message``) or raise ProtocolError.

    The checks run in a fixed order, so a peer wrong in several ways is told the first: the daemon
    stopping or failed, the transport and its credentials (TCP token, early data; the local fd),
    then the access rules, then a free producer slot."""
    if daemon.shutting_down:
        raise ProtocolError(protocol.E_SHUTTING_DOWN, "the daemon is shutting down and takes no new producers")
    if daemon.engine_failed:
        raise ProtocolError(protocol.E_INTERNAL, f"the daemon's engine failed ({daemon.engine_failed}): it takes no producers")
    transport = hello["transport"]
    if conn.tcp:
        if transport not in protocol.TCP_TRANSPORTS:
            raise ProtocolError(protocol.E_BAD_MESSAGE, f"transport {transport!r} is local-only; over TCP use one of {protocol.TCP_TRANSPORTS}")
        if daemon.auth_token:
            given = hello.get("token")
            # compare_digest: the time taken does not tell how much of a guess was right.
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), daemon.auth_token.encode()):
                raise ProtocolError(protocol.E_AUTH, "missing or wrong token (set LOGSINK_TOKEN to the daemon's auth_token)")
        if conn.early_bytes:
            protocol.conn_step(ConnState.ADMITTING, ConnEvent.DATA)  # illegal: raises with the table's reason
        if conn.fds:  # SCM_RIGHTS cannot cross TCP; never hold one here
            raise ProtocolError(protocol.E_TOO_MANY_FDS, "an fd with a TCP HELLO: fds are passed on the local socket only")
    else:
        if transport not in protocol.LOCAL_TRANSPORTS:
            raise ProtocolError(protocol.E_BAD_MESSAGE, f"transport {transport!r} is for TCP; on the local socket use one of {protocol.LOCAL_TRANSPORTS}")
        if transport == "shm" and conn.fds != protocol.HELLO_FDS_SHM:
            raise ProtocolError(protocol.E_BAD_FD, "a shm HELLO must carry two fds with SCM_RIGHTS (the data pipe's read end, then "
                                                   f"the arena memfd), got {conn.fds}")
        if transport != "shm" and conn.fds != 1:
            raise ProtocolError(protocol.E_BAD_FD, f"HELLO must carry exactly one fd (the data pipe's read end) with SCM_RIGHTS, got {conn.fds}")
    why = write_refusal(daemon.rules, conn, hello["stream"], gids)
    if why:
        raise ProtocolError(protocol.E_FORBIDDEN, why)
    if daemon.free_slots <= 0:
        raise ProtocolError(protocol.E_TOO_MANY, f"all {daemon.max_producers} producer slots are in use")
    seg = hello.get("segment_size")
    return Admission(stream=hello["stream"], transport=transport, pid=hello["pid"],
                     segment_size=seg if isinstance(seg, int) and seg > 0 else 0)


def write_refusal(rules: AccessRules, conn: ConnFacts, stream: str, gids: GidsLookup = access.peer_gids) -> str | None:
    """Why this peer may not write ``stream`` (logsink/access.py, docs/security.md), or None."""
    if conn.tcp:
        return access.admit_tcp(rules, stream)
    if rules.trusted(conn.uid) or not rules.write_rules:
        return None  # admitted whatever its groups: spare the group database lookup
    return access.admit(rules, stream, conn.uid, gids(conn.uid, conn.gid))


def status_refusal(rules: AccessRules, conn: ConnFacts, gids: GidsLookup = access.peer_gids) -> str | None:
    """Why this peer may not read status, or None."""
    if conn.tcp or rules.trusted(conn.uid):
        return access.may_read_status(rules, None if conn.tcp else conn.uid, frozenset())
    return access.may_read_status(rules, conn.uid, gids(conn.uid, conn.gid))
