"""The daemon's side of forwarding: which streams are forwarded where, their spools, and the forwarders.

The daemon drives it through :class:`ForwardManager` (a handful of calls; see each method); each
(stream, downstream) is a :class:`~logsink.forward.forwarder.Forwarder`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from typing import Any

import structlog

from logsink._native import check, ffi, lib
from logsink.config import ForwardSpec
from logsink.files import dir_beneath, open_beneath
from logsink.forward.cursor import CursorStore
from logsink.forward.forwarder import CLOSE_TIMEOUT, Forwarder

log = structlog.get_logger("logsink.forward")


# -- one stream's forwarders ----------------------------------------------------------------------
class _StreamGroup:
    """The forwarders of one stream, sharing its file: pausing, and punching the spool behind them all."""

    def __init__(self, mgr: ForwardManager, name: str, sid: int, fd: int, path: str, spool: bool):
        self.mgr = mgr
        self.name = name
        self.sid = sid
        self.fd = os.dup(fd)  # ours: punching needs write access, and rotation closes the daemon's
        self.path = path
        self.spool = spool
        st = os.fstat(self.fd)
        self.identity = (st.st_dev, st.st_ino)
        self.fd_identity = self.identity  # the file self.fd is (rotation switches it before the forwarders)
        self.forwarders: list[Forwarder] = []
        self.paused = False
        self.bound = 0  # the engine's: no new batch starts at or past this offset (0: none)
        self.switching = False  # stream_reopened is moving the forwarders to a new file
        self.punched = 0
        self.last_end = -1
        self._c = ffi.new("struct ls_counters *")

    def end(self) -> int:
        lib.ls_engine_stream_counters(self.mgr.engine, self.sid, self._c)
        return self._c.offset

    def update_pause(self) -> None:
        want = any(f.wants_pause for f in self.forwarders) and not self.mgr.no_blocking
        if want != self.paused:
            self.paused = want
            check(lib.ls_engine_pause_stream(self.mgr.engine, self.sid, 1 if want else 0), "pausing the stream")
            log.info("stream_paused" if want else "stream_resumed", stream=self.name, reason="forward spool bound")
        self.update_bound()

    def update_bound(self, force: bool = False) -> None:
        """Give the engine the spool bound of the "block" policy as an offset in the file: it lands and
        releases batches itself, so the bound must hold there, not only when this loop gets to run.
        ``force``: send it even if unchanged (the engine moved or held its own: a new file, a shrunk one)."""
        if self.switching:
            return  # stream_reopened sends one bound once every forwarder has the new file
        ends = [f.allowed_end() for f in self.forwarders if f.spec.policy == "block"]
        want = 0 if self.mgr.no_blocking or not ends else max(1, min(ends))
        if want != self.bound or force:
            self.bound = want
            check(lib.ls_engine_bound_stream(self.mgr.engine, self.sid, want), "bounding the stream")

    def punch(self) -> None:
        """Spools only: give back the disk blocks every downstream has been sent, ACKed, and has a cursor
        file past. Never past a cursor on disk: a crash then resumes there, and a hole reads as zeros."""
        if not self.spool or self.mgr.punch_unsupported:
            return
        if any(f.durable[1] != self.fd_identity for f in self.forwarders):
            return  # a forwarder has no saved cursor in this file yet (rotation)
        upto = min(f.durable[0] for f in self.forwarders)
        r = lib.ls_spool_punch(self.fd, self.punched, upto)
        if r == -errno.EOPNOTSUPP:
            self.mgr.punch_unsupported = True
            log.warning("spool_punch_unsupported", file=self.path, reason="the file system cannot punch holes; the spool only shrinks on restart")
        elif r >= 0:
            self.punched = r

    def close(self) -> None:
        os.close(self.fd)


class ForwardManager:
    """Everything forwarding needs from the daemon, in six calls (see docs in each)."""

    def __init__(self, forwards: dict[str, list[ForwardSpec]], state_dir: tuple[str, int], engine: Any, file_mode: int = 0o640,
                 dir_mode: int = 0o750):
        """``state_dir`` is (path, fd of it): cursors and spools are opened beneath that fd, never
        through a link (logsink/files.py); fd -1 when nothing is forwarded."""
        self.specs = forwards
        self.state_dir = os.path.abspath(state_dir[0])
        self.state_fd = state_dir[1]
        self.engine = engine
        self.file_mode = file_mode
        self.cursors = CursorStore(self.state_dir, self.state_fd, file_mode)
        self.groups: dict[int, _StreamGroup] = {}
        self.no_blocking = False
        self.punch_unsupported = False
        self.spool_fd = -1
        if forwards:
            self.spool_fd = dir_beneath(self.state_fd, "spool", dir_mode, os.path.join(self.state_dir, "spool"))

    def stream_names(self) -> list[str]:
        """Streams to open at start-up, so a spool left by the last run is replayed without waiting for a producer."""
        return list(self.specs)

    def output_location(self, name: str, default: tuple[int, str, str]) -> tuple[int, str, str]:
        """Where the daemon writes stream ``name``, as (dir fd, file name, path for messages):
        ``default`` (<dir>/<name>.log), or its spool beneath the state dir."""
        specs = self.specs.get(name)
        if not specs or any(s.file for s in specs):
            return default
        filename = f"{name}.spool"
        path = os.path.join(self.state_dir, "spool", filename)
        self._compact_spool(filename, path, specs)
        return self.spool_fd, filename, path

    def _compact_spool(self, filename: str, path: str, specs: list[ForwardSpec]) -> None:
        """Before the daemon opens it: a spool every downstream has fully received starts over at 0."""
        try:
            st = os.stat(filename, dir_fd=self.spool_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            return  # the daemon's open refuses it, with the reason
        for s in specs:
            saved = self.cursors.read(s)
            if saved is None or saved[0] != st.st_size or saved[1] != (st.st_dev, st.st_ino):
                return
        fd = open_beneath(self.spool_fd, filename, os.O_WRONLY, where=path)
        try:
            if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (st.st_dev, st.st_ino):
                return  # replaced since the stat: leave it
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        for s in specs:
            self.cursors.write(s, 0, (st.st_dev, st.st_ino), path)

    def stream_opened(self, name: str, sid: int, fd: int, size: int) -> None:
        """The daemon registered stream ``name`` as engine stream ``sid`` writing ``fd`` from ``size``."""
        specs = self.specs.get(name)
        if not specs:
            return
        spool = not any(s.file for s in specs)
        path = os.readlink(f"/proc/self/fd/{fd}")
        group = _StreamGroup(self, name, sid, fd, path, spool)
        for spec in specs:
            cursor = self._start_cursor(spec, group, size)
            fw = Forwarder(spec, group, cursor)
            group.forwarders.append(fw)
            if cursor < size:
                log.info("forward_backlog", stream=name, downstream=fw.address, bytes=size - cursor, file=path)
            check(lib.ls_forward_advance(fw.f, size), "advancing the forwarder")
            fw.skip_zeros()  # never resume inside a hole
            fw.on_advance(size)
        group.last_end = size
        group.update_bound()
        self.groups[sid] = group

    def _start_cursor(self, spec: ForwardSpec, group: _StreamGroup, size: int) -> int:
        saved = self.cursors.read(spec)
        if saved is not None and saved[1] == group.identity and saved[0] <= size:
            return saved[0]
        if saved is not None and saved[1] != group.identity:
            return 0  # a new file (rotated while we were down): all of it is new
        return 0 if group.spool else size  # first run: a spool is all backlog; an old .log is history

    def poll(self) -> None:
        """After engine events were handled: tell each forwarded stream how far its file has whole batches."""
        for g in self.groups.values():
            end = g.end()
            if end != g.last_end:
                shrunk = end < g.last_end  # truncated under us (copytruncate)
                g.last_end = end
                for fw in g.forwarders:
                    fw.on_advance(end)
                if shrunk:  # the engine holds a bounded stream whose file shrank until it hears from us
                    g.update_bound(force=True)

    def stream_reopened(self, sid: int, fd: int, size: int) -> None:
        """SIGHUP moved stream ``sid`` to a new ``fd`` (at ``size``); the old file is complete."""
        g = self.groups.get(sid)
        if g is None:
            return
        old_end = os.fstat(g.fd).st_size
        st = os.fstat(fd)
        os.close(g.fd)
        g.fd = os.dup(fd)
        g.fd_identity = (st.st_dev, st.st_ino)
        g.path = os.readlink(f"/proc/self/fd/{fd}")
        g.punched = 0
        g.last_end = size
        g.switching = True
        try:
            for fw in g.forwarders:
                fw.switch_file(old_end, fd, size, (st.st_dev, st.st_ino))
        finally:
            g.switching = False
        g.update_bound(force=True)  # the engine moved its bound to the new file's offsets: send ours again

    def stop_blocking(self) -> None:
        """Shutdown: let paused streams take their pending batches (they land in the spool, not lost)."""
        self.no_blocking = True
        for g in self.groups.values():
            g.update_pause()

    def status(self) -> list[dict[str, Any]]:
        return [fw.status() for g in self.groups.values() for fw in g.forwarders]

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """After the engine drained: flush every downstream (bounded by ``timeout``), save cursors."""
        self.poll()
        await asyncio.gather(*(fw.close(timeout) for g in self.groups.values() for fw in g.forwarders))
        for g in self.groups.values():
            g.punch()
            g.close()
        self.groups.clear()
        for fd in (self.spool_fd, self.state_fd):
            if fd >= 0:
                os.close(fd)
        self.spool_fd = self.state_fd = -1
