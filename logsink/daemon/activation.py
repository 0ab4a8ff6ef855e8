"""systemd socket activation: the listening sockets systemd (or ``systemd-socket-activate``) opened for us.

The protocol is sd_listen_fds(3): ``LISTEN_PID`` is our pid, ``LISTEN_FDS`` = N, the sockets are fds
3 .. 3+N-1, and ``LISTEN_FDNAMES`` (optional) names them. We take each by what it is, not by name:
the one listening AF_UNIX stream socket is the control socket, listening TCP sockets are producer
listeners (``--listen``). Anything else is a configuration error said plainly. The variables are
removed from the environment once read, so nothing the daemon starts inherits them.

With activation, producers that connect before the daemon is up wait in the socket's backlog
instead of failing, and a restart keeps the socket (and its queue): systemd holds it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from logsink.errors import ConfigError

SD_LISTEN_FDS_START = 3


@dataclass
class Activated:
    """What systemd passed: the control socket (or None: bind our own) and TCP listeners."""

    control: socket.socket | None = None
    tcp: list[socket.socket] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return self.control is not None or bool(self.tcp)


def passed_fds(environ: MutableMapping[str, str], pid: int) -> tuple[list[int], list[str]]:
    """The fds and names of sd_listen_fds(3) meant for process ``pid`` (none if the variables are absent or
    name another pid: they were inherited, not passed); the variables are removed from ``environ``."""
    want_pid = environ.pop("LISTEN_PID", "")
    count = environ.pop("LISTEN_FDS", "")
    names = environ.pop("LISTEN_FDNAMES", "")
    if not count or not want_pid:
        return [], []
    try:
        if int(want_pid) != pid:
            return [], []
        n = int(count)
    except ValueError:
        raise ConfigError(f"socket activation: LISTEN_PID={want_pid!r} / LISTEN_FDS={count!r} are not numbers") from None
    if n < 0 or n > 64:
        raise ConfigError(f"socket activation: LISTEN_FDS={n} is out of range")
    split = names.split(":") if names else []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n)), split + [""] * (n - len(split))


def take(environ: MutableMapping[str, str] | None = None, pid: int | None = None) -> Activated:
    """Adopt the sockets systemd passed (see the module docstring); ConfigError for one we cannot use."""
    env = os.environ if environ is None else environ
    fds, names = passed_fds(env, os.getpid() if pid is None else pid)
    got = Activated(names=names)
    for fd, name in zip(fds, names, strict=True):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ConfigError(f"socket activation: fd {fd} ({name or 'unnamed'}) is not a socket: {exc.strerror}") from None
        label = f"fd {fd}" + (f" ({name})" if name else "")
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()  # not ours to close: we refuse it and stop
            raise ConfigError(f"socket activation: {label} is not a listening stream socket "
                              "(use ListenStream= in logsink.socket, without Accept=yes)")
        sock.set_inheritable(False)
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            if got.control is not None:
                sock.detach()
                raise ConfigError(f"socket activation: {label} is a second AF_UNIX socket; logsink takes one control socket")
            got.control = sock
        elif sock.family in (socket.AF_INET, socket.AF_INET6):
            got.tcp.append(sock)
        else:
            sock.detach()
            raise ConfigError(f"socket activation: {label} has address family {sock.family!r}; logsink takes AF_UNIX and TCP")
    return got
