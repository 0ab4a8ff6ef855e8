"""Daemon settings: embedded defaults, an optional TOML file, then command-line flags (each overrides the one before)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from logsink.access import AccessRules, rules_from_config
from logsink.errors import ConfigError  # the one ConfigError (re-exported: logsink.config.ConfigError)

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
    # TCP ingest: off unless configured; an address without a host binds loopback.
    listen: list = field(default_factory=list)
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

    def stream_fsync(self, name: str) -> tuple[str, float]:
        """The fsync policy and interval of stream ``name``: its [stream.NAME] table, else the top level."""
        table = self.stream.get(name) or {}
        return table.get("fsync", self.fsync), float(table.get("fsync_interval", self.fsync_interval))

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
        from logsink.daemon import parse_tcp_address

        try:
            parse_tcp_address(addr)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    from logsink.forward import forward_from_config

    try:
        cfg.forwards = forward_from_config(cfg.forward, cfg.forward_cli, cfg.framing)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_hygiene(cfg)
    _check_fsync(cfg)
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
        import grp

        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise ConfigError(f"socket_group {value!r} is not a group on this host (see /etc/group), or give its number") from None
    raise ConfigError(f"socket_group must be a group name or number, got {value!r}")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; any other name counts as reachable from outside."""
    import ipaddress

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
    from logsink.daemon import parse_tcp_address

    for addr in cfg.listen:
        host, _ = parse_tcp_address(addr)
        if not is_loopback(host):
            raise ConfigError(
                f"listen address {addr} is not loopback and no auth_token is set: anyone who can reach it could write "
                "logs. Set auth_token in the config (producers send it via LOGSINK_TOKEN), or, if the network is trusted, "
                "set allow_unauthenticated = true (or pass --allow-unauthenticated)")


FSYNC_POLICIES = ("never", "batch", "interval")


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
