"""Who may write which stream and who may read status: the config's rules, checked against the peer's SO_PEERCRED identity.

The checks (``admit``, ``admit_tcp``, ``may_read_status``) are pure functions of the rules and the
peer's uid and groups; the daemon calls them on HELLO and STATUS. Names in the config are resolved
to numbers once, when the config is loaded (``rules_from_config``), so a typo fails the start, not
a producer. The semantics, with examples, are in docs/security.md ("Who may write where").

Rules only grant. A local producer may write stream S if any of these holds:
  - its uid is 0 or the daemon's own uid (unless ``[access] trust_root = false``);
  - no write rules are configured at all (no ``[stream.*]``, ``[streams_default]``,
    ``[access.uid]`` or ``[access.gid]``): every local uid that can reach the socket may write;
  - S's own ``[stream.S]`` table - or, if S has none, ``[streams_default]`` - lists its uid in
    ``allow_uids`` or one of its groups in ``allow_gids``;
  - ``[access.uid]`` lists its uid, or ``[access.gid]`` one of its groups, with a pattern
    (fnmatch, case-sensitive) that matches S.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from logsink import protocol
from logsink.errors import ConfigError

STREAM_TABLE_KEYS = ("allow_gids", "allow_uids")
# Keys of a [stream.NAME] table that are stream settings, not access rules (logsink/config.py).
STREAM_SETTING_KEYS = ("fsync", "fsync_interval", "rate_bytes", "rate_records", "uid_rate_bytes", "uid_rate_records")
ACCESS_KEYS = ("gid", "status_gids", "status_uids", "tcp_streams", "trust_root", "uid")


@dataclass(frozen=True)
class Principals:
    """A set of uids and gids; a peer matches if its uid or any of its groups is in it."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def match(self, uid: int, gids: frozenset[int]) -> bool:
        return uid in self.uids or not self.gids.isdisjoint(gids)


@dataclass(frozen=True)
class AccessRules:
    """The parsed access config. ``AccessRules()`` is "no rules": every local uid may write every stream."""

    daemon_uid: int = field(default_factory=os.geteuid)
    write_rules: bool = False          # False: no write rules configured (every local uid may write)
    trust_root: bool = True            # uid 0 and daemon_uid pass every check
    default: Principals | None = None  # [streams_default]: streams without their own table
    streams: Mapping[str, Principals] = field(default_factory=dict)            # [stream.NAME]
    uid_streams: Mapping[int, tuple[str, ...]] = field(default_factory=dict)   # [access.uid]
    gid_streams: Mapping[int, tuple[str, ...]] = field(default_factory=dict)   # [access.gid]
    status: Principals = Principals()                                          # status_uids/status_gids
    tcp_streams: tuple[str, ...] | None = None                                 # None: every stream

    def trusted(self, uid: int) -> bool:
        return self.trust_root and uid in (0, self.daemon_uid)


# -- the checks (pure) ----------------------------------------------------------------------------
def admit(rules: AccessRules, stream: str, uid: int, gids: frozenset[int]) -> str | None:
    """None if the local peer (uid, all its gids) may write ``stream``, else the reason it may not."""
    if rules.trusted(uid) or not rules.write_rules:
        return None
    table = rules.streams.get(stream, rules.default)
    if table is not None and table.match(uid, gids):
        return None
    if any(fnmatchcase(stream, pat) for pat in rules.uid_streams.get(uid, ())):
        return None
    if any(fnmatchcase(stream, pat) for g in gids for pat in rules.gid_streams.get(g, ())):
        return None
    return (
        f"uid {uid} (groups {', '.join(map(str, sorted(gids))) or 'none'}) may not write stream {stream!r}: "
        f"no access rule of the daemon admits it; an admin can add the uid or a group to allow_uids/allow_gids "
        f"of [stream.{stream}] (or [streams_default]), or a pattern to [access.uid]/[access.gid]"
    )


def admit_tcp(rules: AccessRules, stream: str) -> str | None:
    """None if a TCP producer (no uid: its token is its identity) may write ``stream``, else why not."""
    if rules.tcp_streams is None or any(fnmatchcase(stream, pat) for pat in rules.tcp_streams):
        return None
    return f"TCP producers may not write stream {stream!r}: it matches none of the daemon's [access] tcp_streams patterns"


def may_read_status(rules: AccessRules, uid: int | None, gids: frozenset[int]) -> str | None:
    """None if the peer may read status (uid None: a TCP peer, never), else the reason it may not."""
    if uid is None:
        return "status is served on the local socket only"
    if rules.trusted(uid) or rules.status.match(uid, gids):
        return None
    return (
        f"uid {uid} may not read status: only root and the daemon's uid ({rules.daemon_uid}) may, and the uids and "
        f"groups in [access] status_uids/status_gids of its config"
    )


def peer_gids(uid: int, gid: int) -> frozenset[int]:
    """The peer's groups: its SO_PEERCRED gid plus the uid's groups in the group database (os.getgrouplist).

    A uid the passwd database does not know has only ``gid``.
    """
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return frozenset({gid})
    try:
        return frozenset(os.getgrouplist(name, gid)) | {gid}
    except OSError:
        return frozenset({gid})


# -- the config -----------------------------------------------------------------------------------
def rules_from_config(access: Mapping[str, Any] | None, stream: Mapping[str, Any] | None,
                      streams_default: Mapping[str, Any] | None, daemon_uid: int | None = None) -> AccessRules:
    """Parse the ``[access]``, ``[stream.NAME]`` and ``[streams_default]`` tables; names -> numbers.

    Raises ConfigError (a ValueError) naming the key and the value that is wrong.
    """
    access = _table(access or {}, "access")
    stream = _table(stream or {}, "stream")
    _known(access, ACCESS_KEYS, "[access]")
    streams = {}
    for name, table in stream.items():
        try:
            protocol.validate_stream_name(name)
        except protocol.ProtocolError as exc:
            raise ConfigError(f"[stream.{name}]: {exc.reason}") from None
        table = {k: v for k, v in _table(table, f"stream.{name}").items() if k not in STREAM_SETTING_KEYS}
        if table:  # a table with only settings grants nothing and turns no rules on
            streams[name] = _principals(table, f"stream.{name}")
    default = None
    if streams_default is not None:
        default = _principals(_table(streams_default, "streams_default"), "streams_default")
    uid_streams = {_uid(k, "access.uid"): _patterns(v, f"access.uid.{k}") for k, v in _table(access.get("uid", {}), "access.uid").items()}
    gid_streams = {_gid(k, "access.gid"): _patterns(v, f"access.gid.{k}") for k, v in _table(access.get("gid", {}), "access.gid").items()}
    trust_root = access.get("trust_root", True)
    if not isinstance(trust_root, bool):
        raise ConfigError(f"access.trust_root must be true or false, got {trust_root!r}")
    tcp = access.get("tcp_streams")
    return AccessRules(
        daemon_uid=os.geteuid() if daemon_uid is None else daemon_uid,
        write_rules=bool(streams or default is not None or uid_streams or gid_streams),
        trust_root=trust_root,
        default=default,
        streams=streams,
        uid_streams=uid_streams,
        gid_streams=gid_streams,
        status=Principals(
            frozenset(_uid(v, "access.status_uids") for v in _list(access.get("status_uids", []), "access.status_uids")),
            frozenset(_gid(v, "access.status_gids") for v in _list(access.get("status_gids", []), "access.status_gids")),
        ),
        tcp_streams=None if tcp is None else _patterns(tcp, "access.tcp_streams"),
    )


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table ([{where}] ...), got {value!r}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list, got {value!r}")
    return value


def _known(table: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    for key in table:
        if key not in keys:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(keys))})")


def _principals(table: Mapping[str, Any], where: str) -> Principals:
    _known(table, STREAM_TABLE_KEYS, f"[{where}]")
    return Principals(
        frozenset(_uid(v, f"{where}.allow_uids") for v in _list(table.get("allow_uids", []), f"{where}.allow_uids")),
        frozenset(_gid(v, f"{where}.allow_gids") for v in _list(table.get("allow_gids", []), f"{where}.allow_gids")),
    )


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{where} must be a list of stream name patterns (fnmatch: \"web.*\"), got {value!r}")
    return tuple(value)


def _number(value: Any) -> int | None:
    """An id given as a number (or a string of digits, as TOML keys are); None for a name."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


# uid or gid: what the name is called, the database it is looked up in, and the lookup.
_ID_KINDS: dict[str, tuple[str, str, Callable[[str], int]]] = {
    "uid": ("user", "passwd", lambda name: pwd.getpwnam(name).pw_uid),
    "gid": ("group", "group", lambda name: grp.getgrnam(name).gr_gid),
}


def _id(value: Any, where: str, kind: str) -> int:
    """A uid or gid (``kind``) from a number or a name; ConfigError names the key and what to write."""
    noun, database, lookup = _ID_KINDS[kind]
    n = _number(value)
    if n is None:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {value!r} is neither a {noun} name nor a {kind}")
        try:
            return lookup(value)
        except KeyError:
            raise ConfigError(f"{where}: unknown {noun} {value!r} (not in the {database} database): use an existing name or a number") from None
    if not 0 <= n < 2**32 - 1:
        raise ConfigError(f"{where}: {n} is not a valid {kind} (0 .. 4294967294)")
    return n


def _uid(value: Any, where: str) -> int:
    return _id(value, where, "uid")


def _gid(value: Any, where: str) -> int:
    return _id(value, where, "gid")
