"""The daemon's streams: each a file the engine writes (opened safely, torn tail repaired), its fsync policy, SIGHUP reopen."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import structlog

from logsink import protocol
from logsink._native import check, ffi, lib
from logsink.config import Config
from logsink.daemon.status import engine_counters
from logsink.files import FileRefused, open_beneath

log = structlog.get_logger("logsink.daemon")


@dataclass
class Stream:
    id: int
    name: str
    path: str
    fd: int
    inode: tuple[int, int]
    producers: int = 0
    dirfd: int = -1      # the directory the file is opened beneath (the daemon's, or the spool dir)
    filename: str = ""   # its name there (one component: stream names cannot contain '/')
    fsync: str = "never"  # never / batch (the engine syncs each batch) / interval (a timer here)
    fsync_interval: float = 1.0
    synced_bytes: int = 0  # interval: the stream's byte counter at the last fdatasync
    interval_syncs: int = 0
    sync_timer: asyncio.TimerHandle | None = None


class StreamTable:
    """Stream name -> :class:`Stream`, each registered with the engine as stream ``id``."""

    def __init__(self, cfg: Config, engine: Any, dirfd: int, dir: str, forward: Any):
        self.cfg = cfg
        self.engine = engine
        self.dirfd = dirfd
        self.dir = dir
        self.forward = forward  # logsink.forward.ForwardManager: forwarded streams may live in a spool
        self.by_name: dict[str, Stream] = {}
        self.stopping = False  # shutdown: no more interval syncs are scheduled

    def values(self) -> Any:
        return self.by_name.values()

    def __len__(self) -> int:
        return len(self.by_name)

    def open_output(self, dirfd: int, name: str, path: str) -> tuple[int, int, tuple[int, int]]:
        """Open (create) an output file without O_APPEND (splice refuses it), repair a torn tail.

        Opened beneath ``dirfd`` with no link followed and only if it is a regular file with one
        link (logsink/files.py): a planted symlink, FIFO or hard link raises FileRefused before
        anything is written or cut."""
        fd = open_beneath(dirfd, name, os.O_RDWR | os.O_CREAT, self.cfg.file_mode, where=path)  # RDWR: the tail check reads
        size = ffi.new("uint64_t *")
        try:
            cut = check(lib.ls_repair_tail(fd, size), "checking the tail", path)
        except OSError:
            os.close(fd)
            raise
        if cut:
            log.warning("torn_tail_repaired", file=path, bytes_cut=cut)
        st = os.fstat(fd)
        return fd, size[0], (st.st_dev, st.st_ino)

    def get(self, name: str) -> Stream:
        """Stream ``name``, opened and registered with the engine on first use; ProtocolError if it cannot be."""
        s = self.by_name.get(name)
        if s is not None:
            return s
        if len(self.by_name) >= self.cfg.max_streams:
            raise protocol.ProtocolError(protocol.E_TOO_MANY, f"all {self.cfg.max_streams} stream slots are in use")
        filename = protocol.validate_stream_name(name) + ".log"
        dirfd, filename, path = self.forward.output_location(name, (self.dirfd, filename, os.path.join(self.dir, filename)))
        try:
            fd, size, inode = self.open_output(dirfd, filename, path)
        except FileRefused as exc:
            raise protocol.ProtocolError(protocol.E_FILE_REFUSED, f"stream {name!r} cannot be written: {exc.strerror}") from None
        sid = len(self.by_name)
        check(lib.ls_engine_set_stream(self.engine, sid, fd, size), "registering the stream")
        policy, interval = self.cfg.stream_fsync(name)
        s = Stream(id=sid, name=name, path=path, fd=fd, inode=inode, dirfd=dirfd, filename=filename, fsync=policy,
                   fsync_interval=interval, synced_bytes=0)
        if policy == "batch":
            check(lib.ls_engine_set_stream_sync(self.engine, sid, lib.LS_SYNC_BATCH), "setting fsync=batch")
        elif policy == "interval":
            s.sync_timer = asyncio.get_running_loop().call_later(interval, self._sync_tick, s)
        self.by_name[name] = s
        self.forward.stream_opened(name, sid, fd, size)
        log.info("stream_opened", stream=name, file=path, offset=size)
        return s

    def reopen(self) -> None:
        """SIGHUP: after logrotate moved a file away, start a new one at the configured path."""
        for s in self.by_name.values():
            try:
                st = os.stat(s.filename, dir_fd=s.dirfd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == s.inode:
                    continue
            except FileNotFoundError:
                pass
            try:
                fd, size, inode = self.open_output(s.dirfd, s.filename, s.path)
            except OSError as exc:
                log.error("reopen_failed", stream=s.name, file=s.path, error=str(exc))
                continue
            check(lib.ls_engine_set_stream(self.engine, s.id, fd, size), "switching the stream's file")
            self.forward.stream_reopened(s.id, fd, size)
            os.close(s.fd)
            s.fd, s.inode = fd, inode
            log.info("stream_reopened", stream=s.name, file=s.path)

    def _sync_tick(self, s: Stream) -> None:
        """fsync=interval: fdatasync the stream's file (in a worker thread) if it grew since the last one."""
        s.sync_timer = None
        if self.stopping or self.engine == ffi.NULL:
            return
        written = engine_counters(self.engine, lib.ls_engine_stream_counters, s.id)["bytes"]
        loop = asyncio.get_running_loop()
        if written == s.synced_bytes:
            s.sync_timer = loop.call_later(s.fsync_interval, self._sync_tick, s)
            return
        fd = os.dup(s.fd)  # rotation may close s.fd while the thread syncs

        def done(fut: asyncio.Future) -> None:
            os.close(fd)
            exc = fut.exception()
            if exc is not None:
                log.error("fsync_failed", stream=s.name, file=s.path, error=str(exc))
            else:
                s.synced_bytes = written
                s.interval_syncs += 1
            if not self.stopping:
                s.sync_timer = loop.call_later(s.fsync_interval, self._sync_tick, s)

        loop.run_in_executor(None, os.fdatasync, fd).add_done_callback(done)

    def close(self) -> None:
        """After the engine is freed: stop the sync timers, sync what a policy left unsynced, close the files."""
        self.stopping = True
        self.engine = ffi.NULL
        for s in self.by_name.values():
            if s.sync_timer is not None:
                s.sync_timer.cancel()
            if s.fsync != "never":  # what the last interval (or a failed batch sync) left unsynced
                try:
                    os.fdatasync(s.fd)
                except OSError as exc:
                    log.error("fsync_failed", stream=s.name, file=s.path, error=str(exc))
            os.close(s.fd)
