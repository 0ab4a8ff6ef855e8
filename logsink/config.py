"""Daemon settings: embedded defaults, an optional TOML file, then command-line flags (each overrides the one before)."""

from __future__ import annotations

import grp
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

from logsink.access import AccessRules, rules_from_config
from logsink.errors import ConfigError  # the one ConfigError (re-exported: logsink.config.ConfigError)
from logsink.protocol import ProtocolError, parse_tcp_address, validate_stream_name

ENGINES = ("auto", "io_uring", "splice", "readwrite")


# The system daemon's runtime directory (systemd's RuntimeDirectory=logsink); native/ls_producer.c agrees.
SYSTEM_RUNTIME_DIR = "/run/logsink"


def default_socket_path() -> str:
    """Where daemon and clients meet when nobody configured it; both resolve it the same way (so does
    ls_default_socket_path in native/ls_producer.c).

    ``$LOGSINK_SOCKET``; else ``$XDG_RUNTIME_DIR/logsink.sock`` (a private per-user directory) if that
    directory exists; else ``/run/logsink/logsink.sock`` for root, and for other users if
    ``/run/logsink`` is a directory they may search; else, last, ``/tmp/logsink-<uid>.sock`` (a
    world-writable directory where another user could squat the path: clients check the daemon's
    uid with SO_PEERCRED, see docs/security.md).
    """
    env = os.environ.get("LOGSINK_SOCKET")
    if env:
        return env
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "logsink.sock")
    if os.getuid() == 0 or (os.path.isdir(SYSTEM_RUNTIME_DIR) and os.access(SYSTEM_RUNTIME_DIR, os.X_OK)):
        return os.path.join(SYSTEM_RUNTIME_DIR, "logsink.sock")
    return f"/tmp/logsink-{os.getuid()}.sock"


@dataclass
class Config:
    dir: str = "logs"
    socket: str = ""          # "" = default_socket_path()
    engine: str = "auto"
    # Producers told to stop get this long to hand over what they hold before pipes are drained.
    shutdown_grace: float = 5.0
    # Slot tables in the engine; each producer costs 64 bytes of registered header buffer.
    max_producers: int = 4096
    max_streams: int = 1024
    # Largest batch a producer may send (its segment size); mirrors protocol.MAX_BATCH_PAYLOAD.
    max_batch: int = 64 << 20
    # Largest arena (memfd) a producer on transport "shm" may pass. The engine maps it and io_uring pins
    # its pages while the producer is connected: max_producers x max_arena bounds that memory.
    max_arena: int = 16 << 20
    # io_uring engine, shm batches: "auto" (WRITE_FIXED where the filesystem takes non-blocking buffered
    # writes, else pwrite from the engine thread: docs/architecture.md), "ring" (always WRITE_FIXED),
    # "inline" (always pwrite).
    shm_write: str = "auto"
    # TCP ingest: off unless configured; an address without a host binds loopback.
    listen: list = field(default_factory=list)
    # Prometheus metrics (logsink/daemon/metrics.py): "" = off; tcp://HOST:PORT serves GET /metrics there.
    metrics: str = ""
    # Shared secret TCP producers must present in HELLO (clients read LOGSINK_TOKEN); "" = none.
    auth_token: str = ""
    # Forwarding to downstream collectors (logsink/forward.py): TOML [forward.STREAM] tables, and
    # --forward STREAM=tcp://HOST:PORT[,file][,policy=..][,spool_max=..] flags; framing is the default framing.
    forward: dict = field(default_factory=dict)
    forward_cli: list = field(default_factory=list)
    framing: str = "newline"
    # Cursors and spools of forwarded streams; "" = <dir>/.state
    state_dir: str = ""
    forwards: dict = field(default_factory=dict)  # parsed by load(): stream -> [ForwardSpec]
    # -- hygiene: modes, ownership, exposure (docs/security.md) --
    # Explicit modes, never the umask's: files the daemon creates (stream files, spools, cursors, the
    # lock), directories it creates (--dir, the state dir), the control socket. TOML: 0o640 or "0640".
    file_mode: int = 0o640
    dir_mode: int = 0o750
    socket_mode: int = 0o660
    socket_group: str | int = ""  # group (name or number) the control socket is chowned to; "" = the daemon's
    # A --listen address that is not loopback needs auth_token, unless this says the network is trusted.
    allow_unauthenticated: bool = False
    # Who may write where and who may read status (logsink/access.py, docs/security.md): the TOML
    # tables [access] (with [access.uid], [access.gid]), [stream.NAME] and [streams_default].
    access: dict = field(default_factory=dict)
    stream: dict = field(default_factory=dict)
    streams_default: dict | None = None
    access_rules: AccessRules = field(default_factory=AccessRules)  # parsed by load() from the three above
    # Durability (docs/architecture.md "Durability"): "never" (RELEASE once in the page cache), "batch"
    # (RELEASE only after an fdatasync covered the batch: flush() then means on disk), "interval"
    # (fdatasync every fsync_interval seconds). [stream.NAME] tables may set both per stream.
    fsync: str = "never"
    fsync_interval: float = 1.0
    # Rate limits (off: 0), per producer and per uid (all of a uid's producers of one stream), in bytes/s
    # and records/s; [stream.NAME] tables may set them per stream. A batch over a limit is dropped
    # whole and counted; a {"logsink":"suppressed",...} line says so in the stream once a second.
    rate_bytes: float = 0
    rate_records: float = 0
    uid_rate_bytes: float = 0
    uid_rate_records: float = 0

    def stream_fsync(self, name: str) -> tuple[str, float]:
        """The fsync policy and interval of stream ``name``: its [stream.NAME] table, else the top level."""
        table = self.stream.get(name) or {}
        return table.get("fsync", self.fsync), float(table.get("fsync_interval", self.fsync_interval))

    def stream_limits(self, name: str) -> RateLimits:
        """Stream ``name``'s rate limits: its [stream.NAME] table's, else the top level's."""
        table = self.stream.get(name) or {}
        return RateLimits(*(float(table.get(k, getattr(self, k))) for k in RATE_KEYS))

    def resolved_socket(self) -> str:
        return self.socket or default_socket_path()


def load(path: str | None, overrides: dict) -> Config:
    """Defaults, then the TOML file at ``path`` (if given), then ``overrides`` (flags that were set)."""
    cfg = Config()
    # forward_cli (the --forward flags) and forwards (parsed from forward) are not file settings.
    known = {f.name: f.type for f in fields(Config) if f.name not in ("forward_cli", "forwards", "access_rules")}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"config file {path}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
            setattr(cfg, name, value)
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if cfg.engine not in ENGINES:
        raise ConfigError(f"engine {cfg.engine!r} is not one of {', '.join(ENGINES)}")
    if not isinstance(cfg.shutdown_grace, (int, float)) or cfg.shutdown_grace < 0:
        raise ConfigError(f"shutdown_grace must be a number of seconds >= 0, got {cfg.shutdown_grace!r}")
    if isinstance(cfg.listen, str):
        cfg.listen = [cfg.listen]
    for addr in cfg.listen:
        try:
            parse_tcp_address(addr, listen=True)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    try:
        cfg.forwards = forward_from_config(cfg.forward, cfg.forward_cli, cfg.framing)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_hygiene(cfg)
    _check_fsync(cfg)
    _check_rates(cfg)
    if cfg.shm_write not in SHM_WRITES:
        raise ConfigError(f"shm_write must be one of {', '.join(SHM_WRITES)}, got {cfg.shm_write!r}")
    try:
        cfg.access_rules = rules_from_config(cfg.access, cfg.stream, cfg.streams_default)
    except ValueError as exc:
        raise ConfigError(f"access rules: {exc}") from None
    cfg.dir = str(Path(cfg.dir).expanduser())
    return cfg


def parse_mode(name: str, value: object) -> int:
    """A permission mode from TOML: an integer (0o640) or an octal string ("0640", "640", "0o640")."""
    if isinstance(value, str):
        text = value.strip().lower()
        text = text[2:] if text.startswith("0o") else text
        try:
            value = int(text, 8) if text else None
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise ConfigError(f"{name} must be an octal permission mode such as 0o640 or \"0640\", got {value!r}")
    return value


def resolve_group(value: str | int) -> int:
    """``socket_group`` as a gid (-1 = leave the socket's group alone)."""
    if value == "" or value is None:
        return -1
    if isinstance(value, bool):
        raise ConfigError(f"socket_group must be a group name or number, got {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        gid = int(value)
        if gid < 0:
            raise ConfigError(f"socket_group must be a group name or a number >= 0, got {value!r}")
        return gid
    if isinstance(value, str):
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise ConfigError(f"socket_group {value!r} is not a group on this host (see /etc/group), or give its number") from None
    raise ConfigError(f"socket_group must be a group name or number, got {value!r}")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; any other name counts as reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_hygiene(cfg: Config) -> None:
    for name in ("file_mode", "dir_mode", "socket_mode"):
        setattr(cfg, name, parse_mode(name, getattr(cfg, name)))
    resolve_group(cfg.socket_group)
    if not isinstance(cfg.allow_unauthenticated, bool):
        raise ConfigError(f"allow_unauthenticated must be true or false, got {cfg.allow_unauthenticated!r}")
    if cfg.auth_token or cfg.allow_unauthenticated:
        return
    for addr in cfg.listen:
        host, _ = parse_tcp_address(addr, listen=True)
        if not is_loopback(host):
            raise ConfigError(
                f"listen address {addr} is not loopback and no auth_token is set: anyone who can reach it could write "
                "logs. Set auth_token in the config (producers send it via LOGSINK_TOKEN), or, if the network is trusted, "
                "set allow_unauthenticated = true (or pass --allow-unauthenticated)")


FSYNC_POLICIES = ("never", "batch", "interval")
SHM_WRITES = ("auto", "ring", "inline")  # LS_SHM_WRITE_AUTO, _RING, _INLINE
RATE_KEYS = ("rate_bytes", "rate_records", "uid_rate_bytes", "uid_rate_records")


class RateLimits(NamedTuple):
    """Per second; 0 = no limit."""

    rate_bytes: float
    rate_records: float
    uid_rate_bytes: float
    uid_rate_records: float

    @property
    def any(self) -> bool:
        return any(v > 0 for v in self)


def _check_rates(cfg: Config) -> None:
    where = [("", {k: getattr(cfg, k) for k in RATE_KEYS})]
    where += [(f"stream.{name}.", table) for name, table in (cfg.stream or {}).items() if isinstance(table, dict)]
    for prefix, table in where:
        for key in RATE_KEYS:
            val = table.get(key, 0)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or val < 0:
                raise ConfigError(f"{prefix}{key} must be a number >= 0 (per second; 0 = no limit), got {val!r}")


def _check_fsync(cfg: Config) -> None:
    where = [("", cfg.fsync, cfg.fsync_interval)]
    for name, table in (cfg.stream or {}).items():
        if isinstance(table, dict):
            where.append((f"stream.{name}.", table.get("fsync", cfg.fsync), table.get("fsync_interval", cfg.fsync_interval)))
    for prefix, policy, interval in where:
        if policy not in FSYNC_POLICIES:
            raise ConfigError(f"{prefix}fsync must be one of {', '.join(FSYNC_POLICIES)}, got {policy!r}")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval <= 3600:
            raise ConfigError(f"{prefix}fsync_interval must be a number of seconds in (0, 3600], got {interval!r}")


# -- forward settings: plain names and numbers here; logsink/forward/ maps them to the C core's ------
FRAMINGS = ("newline", "octet-counted", "relp")
POLICIES = ("block", "drop-oldest")
# RELP: commands awaiting their rsp (a collector killed mid-stream may get up to this many twice).
# The same numbers as LS_RELP_WINDOW_DEFAULT / LS_RELP_WINDOW_MAX in native/ls_forward.h (a test checks).
RELP_WINDOW_DEFAULT = 1024
RELP_WINDOW_MAX = 65536
# Un-forwarded bytes a stream may hold before its policy applies: a few minutes of a busy service
# at ~1 MB/s, small enough for any state disk.
DEFAULT_SPOOL_MAX = 256 << 20
# Smallest bound we accept: below a few batches the block policy would stall on every batch.
MIN_SPOOL_MAX = 64 << 10
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*$")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class ForwardConfigError(ConfigError):
    """A forward setting that cannot be used; the message names the setting and what to write instead."""


# -- forwards (logsink/forward/ runs them; docs/forwarding.md) --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForwardSpec:
    """One downstream of one stream."""

    stream: str
    address: str
    host: str
    port: int
    framing: str = "newline"
    file: bool = False          # also keep <dir>/<stream>.log (else the stream lands in a spool)
    spool_max: int = DEFAULT_SPOOL_MAX
    policy: str = "block"
    window: int = RELP_WINDOW_DEFAULT  # RELP only: commands awaiting their rsp

    @property
    def key(self) -> str:
        """``<stream>.<host>_<port>``: names the cursor file."""
        host = re.sub(r"[^A-Za-z0-9.-]", "_", self.host)
        return f"{self.stream}.{host}_{self.port}"


def parse_size(value: Any, what: str) -> int:
    """``268435456``, ``"256M"``, ``"64KiB"``, ``"1G"`` -> bytes."""
    if isinstance(value, bool):
        raise ForwardConfigError(f"{what} must be a size like 268435456 or \"256M\", got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        n = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    else:
        raise ForwardConfigError(f"{what} must be a size like 268435456 or \"256M\" (units K, M, G), got {value!r}")
    if n < MIN_SPOOL_MAX:
        raise ForwardConfigError(f"{what} is {n} bytes; use at least {MIN_SPOOL_MAX} (64K)")
    return n


def parse_address(address: Any, what: str) -> tuple[str, int]:
    if not isinstance(address, str):
        raise ForwardConfigError(f"{what} must be a string like \"tcp://collector:514\", got {address!r}")
    try:
        return parse_tcp_address(address)
    except ValueError as exc:
        raise ForwardConfigError(f"{what}: {exc}") from None


def _spec(stream: str, opts: dict[str, Any], where: str, default_framing: str) -> ForwardSpec:
    known = {"address", "framing", "file", "spool_max", "policy", "window"}
    for key in opts:
        if key not in known:
            raise ForwardConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    if "address" not in opts:
        raise ForwardConfigError(f"{where}: address is missing (e.g. address = \"tcp://collector:514\")")
    try:
        validate_stream_name(stream)
    except ProtocolError as exc:
        raise ForwardConfigError(f"{where}: {exc.reason}") from None
    host, port = parse_address(opts["address"], f"{where}: address")
    framing = opts.get("framing", default_framing)
    if framing not in FRAMINGS:
        raise ForwardConfigError(f"{where}: framing {framing!r} is not one of {', '.join(FRAMINGS)}")
    policy = opts.get("policy", "block")
    if policy not in POLICIES:
        raise ForwardConfigError(f"{where}: policy {policy!r} is not one of {', '.join(POLICIES)}")
    keep = opts.get("file", False)
    if not isinstance(keep, bool):
        raise ForwardConfigError(f"{where}: file must be true or false, got {keep!r}")
    spool_max = parse_size(opts.get("spool_max", DEFAULT_SPOOL_MAX), f"{where}: spool_max")
    window = _window(opts, framing, where)
    return ForwardSpec(stream, opts["address"], host, port, framing, keep, spool_max, policy, window)


def _window(opts: dict[str, Any], framing: str, where: str) -> int:
    if "window" not in opts:
        return RELP_WINDOW_DEFAULT
    if framing != "relp":
        raise ForwardConfigError(f"{where}: window applies to framing = \"relp\" only (this forward's framing is {framing!r})")
    value = opts["window"]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= RELP_WINDOW_MAX:
        raise ForwardConfigError(f"{where}: window must be a number of records from 1 to {RELP_WINDOW_MAX}, got {opts['window']!r}")
    return value


def _parse_cli(item: str, default_framing: str) -> ForwardSpec:
    """``STREAM=tcp://HOST:PORT[,file][,framing=F | ,F][,window=N][,policy=P][,spool_max=N]``."""
    where = f"--forward {item!r}"
    stream, sep, rest = item.partition("=")
    if not sep or not stream or not rest:
        raise ForwardConfigError(f"{where}: expected STREAM=tcp://HOST:PORT, e.g. --forward app=tcp://127.0.0.1:514")
    address, *extras = rest.split(",")
    opts: dict[str, Any] = {"address": address}
    for extra in extras:
        key, has_value, value = extra.partition("=")
        key = key.strip().replace("-", "_")
        if key == "file" and not has_value:
            opts["file"] = True
        elif key == "file":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ForwardConfigError(f"{where}: file={value!r} must be true or false")
            opts["file"] = value.lower() in ("true", "1", "yes")
        elif key in ("framing", "policy", "spool_max", "window") and has_value:
            opts[key] = value
        elif not has_value and extra.strip() in FRAMINGS:
            opts["framing"] = extra.strip()  # the bare framing name: ,relp
        else:
            raise ForwardConfigError(f"{where}: unknown option {extra!r} (known: file, relp, octet-counted, newline, "
                                     "framing=..., window=..., policy=..., spool_max=...)")
    return _spec(stream, opts, where, default_framing)


def forward_from_config(table: Any, cli: list[str] | None = None, framing: str | None = None) -> dict[str, list[ForwardSpec]]:
    """The forwards of a config, by stream.

    ``table`` is the TOML ``forward`` table: ``[forward.app]`` (one downstream) or ``[[forward.app]]``
    (several) with keys address, framing, file, spool_max, policy, window (RELP). ``cli`` holds ``--forward``
    values; ``framing`` (``--framing``) is the framing of entries that do not name one.
    """
    default_framing = framing or "newline"
    if default_framing not in FRAMINGS:
        raise ForwardConfigError(f"framing {default_framing!r} is not one of {', '.join(FRAMINGS)}")
    specs: list[ForwardSpec] = []
    if table:
        if not isinstance(table, dict):
            raise ForwardConfigError("forward must be a table of streams, e.g. [forward.app] with address = \"tcp://host:514\"")
        for stream, entry in table.items():
            entries = entry if isinstance(entry, list) else [entry]
            for i, opts in enumerate(entries):
                where = f"[forward.{stream}]" + (f" #{i + 1}" if isinstance(entry, list) else "")
                if not isinstance(opts, dict):
                    raise ForwardConfigError(f"{where} must be a table with address = \"tcp://HOST:PORT\", got {opts!r}")
                specs.append(_spec(stream, opts, where, default_framing))
    for item in cli or []:
        specs.append(_parse_cli(item, default_framing))
    out: dict[str, list[ForwardSpec]] = {}
    for s in specs:
        if any(o.host == s.host and o.port == s.port for o in out.get(s.stream, [])):
            raise ForwardConfigError(f"stream {s.stream!r} is forwarded to {s.address} twice")
        out.setdefault(s.stream, []).append(s)
    return out
