"""What the engine's refusals and verdicts mean to a producer: the sentences its ERROR carries.

``FRAME_ERRORS`` explains each batch verdict (LS_EFRAME_*, LS_EBATCH_*: tests/test_conformance.py
checks every one has a sentence); ``raise_add_refusal`` turns an ls_engine_add_*_producer -errno into
the ERROR the peer is told (a bad fd, a bad arena) or an OSError (the daemon's own trouble).
"""

from __future__ import annotations

import errno
import fcntl

from logsink import protocol
from logsink._native import check, lib

F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)

FRAME_ERRORS = {
    lib.LS_EFRAME_MAGIC: "bad magic (expected b'LSK1'): the pipe does not carry logsink frames",
    lib.LS_EFRAME_VERSION: "unsupported frame version or header length",
    lib.LS_EFRAME_LENGTH: "payload length is 0 or larger than the daemon's max_batch",
    lib.LS_EFRAME_RECORDS: "record count is 0 or larger than the payload length",
    lib.LS_EBATCH_TOO_BIG: "payload length is larger than the data pipe holds whole (header + payload must fit the "
                           "pipe's F_GETPIPE_SZ; over TCP, WELCOME's max_batch): send smaller batches",
    lib.LS_EBATCH_NO_NEWLINE: "the batch does not end in a newline: every batch must be whole records, each ending "
                              "in \\n; the batch was cut back off the file",
    lib.LS_EBATCH_VANISHED: "the batch's bytes left the data pipe before the daemon took them (another reader of "
                            "the pipe?); what landed was cut back off the file",
    lib.LS_EBATCH_ARENA: "a shm descriptor outside the arena (offset + length past its end), a descriptor from a "
                         "producer without an arena, or payload bytes in the pipe from one with",
}

def raise_add_refusal(ret: int, max_arena: int) -> None:
    """The engine refused a producer's fds (ls_engine_add_*_producer's -errno): say why to the peer, or raise OSError."""
    err = -ret
    if err == errno.ENOTTY:
        raise protocol.ProtocolError(protocol.E_BAD_FD, "the fd sent with HELLO is not a pipe: send the read end of the data pipe")
    if err == errno.EBADF:
        raise protocol.ProtocolError(protocol.E_BAD_FD, "the fd sent with HELLO is a pipe's write end: send its read end")
    if err == errno.EMEDIUMTYPE:
        raise protocol.ProtocolError(protocol.E_BAD_FRAME, "the arena fd is not a memfd: create it with memfd_create(MFD_ALLOW_SEALING)")
    if err == errno.EPERM:
        raise protocol.ProtocolError(protocol.E_BAD_FRAME, "the arena memfd is not sealed against shrinking: "
                                                           "fcntl(F_ADD_SEALS, F_SEAL_SHRINK) before HELLO")
    if err == errno.EACCES:
        raise protocol.ProtocolError(protocol.E_BAD_FRAME, "the arena memfd cannot be mapped (opened read-only or write-only?): "
                                                           "pass the fd memfd_create returned, open for reading and writing")
    if err == errno.EFBIG:
        raise protocol.ProtocolError(protocol.E_BAD_FRAME, f"the arena memfd is empty or larger than the daemon's max_arena ({max_arena} bytes): "
                                                           "use fewer or smaller segments, or raise max_arena in the daemon's config")
    check(ret, "adding producer")


def pipe_size_of(fd: int) -> int:
    """F_GETPIPE_SZ of ``fd`` (0 if it is not a pipe: the engine refuses it with the reason)."""
    try:
        return fcntl.fcntl(fd, F_GETPIPE_SZ)
    except OSError:
        return 0
