"""Forwarding streams to downstream TCP collectors (rsyslog imtcp or imrelp, syslog-ng network()) from the daemon's own files.

- ``logsink.config``: what is forwarded where (``forward_from_config``, ``ForwardSpec``): no core needed.
- ``manager``: :class:`ForwardManager`, the daemon's handful of calls; a stream's forwarders share its file.
- ``forwarder``: :class:`Forwarder`, one (stream, downstream): connect, backoff, spool bound, cursor.
- ``relp``: RELP's open handshake. ``cursor``: the cursor files, written durably by one writer.

docs/forwarding.md describes the behaviour.
"""

from logsink.config import ForwardConfigError, ForwardSpec, forward_from_config
from logsink.forward.cursor import CursorStore, replace_durably
from logsink.forward.forwarder import Forwarder
from logsink.forward.manager import ForwardManager, _StreamGroup
from logsink.forward.relp import RelpError, relp_frame

__all__ = ["CursorStore", "ForwardConfigError", "ForwardManager", "ForwardSpec", "Forwarder", "RelpError", "_StreamGroup",
           "forward_from_config", "relp_frame", "replace_durably"]
