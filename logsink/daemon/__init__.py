"""``logsink serve``: the daemon's control plane (asyncio) around the native engine.

- ``server``: :class:`Daemon` and :func:`serve`: lifecycle, listeners, HELLO's effects, engine events -> RELEASE.
- ``conn``: a control connection's transport (framing, the fd HELLO carries) and the accept gate.
- ``admission``: HELLO admission as a pure function (no daemon needed to test it).
- ``streams``: stream files (opened beneath the directory, torn tails repaired), fsync, SIGHUP reopen.
- ``status``: what ``logsink status`` shows.

A connection's life (HELLO once, STATUS any time, frames after WELCOME over TCP) is the table
``logsink.protocol.CONN_TRANSITIONS``.
"""

from logsink.daemon.server import Daemon, serve
from logsink.protocol import parse_tcp_address  # its old home; the protocol owns it now

__all__ = ["Daemon", "parse_tcp_address", "serve"]
