"""Forward cursor files: how far each downstream has received a stream, kept durably under the state dir.

One writer (:meth:`CursorStore.write`, through :func:`replace_durably`) for every cursor the daemon
saves: the forwarder's periodic saves and the manager's reset of a compacted spool. The spool is
punched only behind what this wrote, so "on disk" has to mean it.
"""

from __future__ import annotations

import json
import os

import structlog

from logsink.config import ForwardSpec
from logsink.files import read_beneath, replace_durably

log = structlog.get_logger("logsink.forward")


class CursorStore:
    """The cursor files of one state directory: ``<stream>.<host>_<port>.cursor``, a small JSON map
    (offset, and the dev/ino of the file that offset is in)."""

    def __init__(self, state_dir: str, state_fd: int, file_mode: int):
        self.state_dir = state_dir
        self.state_fd = state_fd
        self.file_mode = file_mode

    def path(self, spec: ForwardSpec) -> str:
        return os.path.join(self.state_dir, spec.key + ".cursor")

    def read(self, spec: ForwardSpec) -> tuple[int, tuple[int, int]] | None:
        """(offset, (dev, ino)) saved for ``spec``, or None if there is none (or it is unreadable: logged)."""
        try:
            raw = read_beneath(self.state_fd, spec.key + ".cursor", self.path(spec))
            if raw is None:
                return None
            d = json.loads(raw)
            return int(d["offset"]), (int(d["dev"]), int(d["ino"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("forward_cursor_unreadable", file=self.path(spec), error=str(exc), action="starting from the file's start")
            return None

    def write(self, spec: ForwardSpec, offset: int, identity: tuple[int, int], file: str) -> None:
        """Save ``offset`` in the file ``identity`` (named ``file`` for people) durably; OSError if it failed."""
        data = json.dumps({"offset": offset, "dev": identity[0], "ino": identity[1], "file": file,
                           "downstream": f"tcp://{spec.host}:{spec.port}"}).encode()
        replace_durably(self.state_fd, spec.key + ".cursor", data, self.file_mode, self.path(spec))
