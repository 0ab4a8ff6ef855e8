"""``logsink pipe STREAM``: records from stdin to the daemon; a pipe on stdin moves by splice, cut only at newlines."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import time

from logsink._native import check, ffi, lib
from logsink.client import Client

# Read size for a stdin that is not a pipe (a file, a terminal): the copy path.
READ_CHUNK = 1 << 20
# A line split across writes: how long to wait before looking at stdin again.
PARTIAL_LINE_POLL = 0.002
# ...and after this long without progress, copy the partial line out so the writer is not stuck.
STALL = 0.05
PAGE = 4096
_F_GETPIPE_SZ = 1032


def run(stream: str, socket: str | None = None) -> int:
    """Relay stdin into ``stream`` until EOF; a last line without '\\n' is terminated, not lost."""
    with Client(stream, socket=socket, transport="copy") as client:
        if stat.S_ISFIFO(os.fstat(0).st_mode):
            _relay_pipe(client, 0)
        else:
            _relay_copy(client, 0)
    return 0


def _relay_copy(client: Client, fd: int) -> None:
    carry = b""
    while True:
        data = os.read(fd, READ_CHUNK)
        if not data:
            break
        data = carry + data
        cut = data.rfind(b"\n") + 1
        if cut:
            client.write(data[:cut])
        carry = data[cut:]
    if carry:
        client.write(carry + b"\n")


def _relay_pipe(client: Client, fd: int) -> None:
    """tee() shows us the pending bytes (to find the last newline), splice() moves them."""
    rfd, wfd, got = ffi.new("int *"), ffi.new("int *"), ffi.new("int *")
    check(lib.ls_pipe_create(1 << 20, rfd, wfd, got), "creating the scan pipe")
    scan_r, scan_w, cap = rfd[0], wfd[0], got[0]
    fcntl.fcntl(scan_w, fcntl.F_SETFL, 0)  # tee() into it must not fail with EAGAIN
    try:
        in_cap = fcntl.fcntl(fd, _F_GETPIPE_SZ)
    except OSError:
        in_cap = cap
    buf = ffi.new("char[]", cap)
    avail, batch, records = ffi.new("size_t *"), ffi.new("size_t *"), ffi.new("uint32_t *")
    carry = b""  # a line longer than the input pipe: assembled by copying
    last_avail, since = -1, 0.0
    try:
        while True:
            ret = lib.ls_peek_records(fd, scan_r, scan_w, buf, cap, avail, batch, records)
            if ret == -errno.EINTR:
                continue
            check(ret, "reading stdin")
            if avail[0] == 0:
                break  # EOF with nothing pending
            if batch[0] and not carry:
                client.splice_from(fd, batch[0], records[0])
                continue
            if batch[0]:  # finish the long line by copy, then back to splicing
                client.write(carry + os.read(fd, batch[0]))
                carry = b""
                continue
            if _writer_gone(fd):  # the last line has no '\n': terminate it
                client.write(carry + os.read(fd, avail[0]) + b"\n")
                carry = b""
                continue
            # The pipe is (nearly: a partly consumed page counts whole) full of one unfinished line,
            # or the writer stalled mid-line: take the bytes by copy so the writer can go on.
            if avail[0] >= min(in_cap, cap) - PAGE or avail[0] == last_avail and time.monotonic() - since > STALL:
                carry += os.read(fd, avail[0])
                last_avail = -1
                continue
            if avail[0] != last_avail:
                last_avail, since = avail[0], time.monotonic()
            time.sleep(PARTIAL_LINE_POLL)  # the rest of the line is on its way
    finally:
        os.close(scan_r)
        os.close(scan_w)
    if carry:
        client.write(carry + b"\n")


def _writer_gone(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))
