"""``logsink pipe STREAM``: records from stdin to the daemon; a pipe on stdin moves by splice, cut only at newlines.

One line travels in one batch, and a batch (its 32-byte header included) must fit the relay's data
pipe: the daemon refuses larger ones. So a line may be ``max_line()`` bytes long, newline included
(1 MiB - 32 with the default data pipe). With ``--transport shm`` the pipe carries only descriptors:
a batch is read from stdin into the shared arena (one copy) and may be a segment's payload long
(also 1 MiB - 32 by default). A longer line is cut there and ends with
`` [logsink: line cut at N bytes]`` (N: the bytes of the line that were kept); the rest of it is
read and dropped, so the writer never blocks or sees EPIPE, and the relay counts the cut lines
and says so on stderr.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import sys
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
CUT_MARKER = " [logsink: line cut at {} bytes]\n"
# Say on stderr that lines were cut at most this often (the first cut is reported at once).
CUT_REPORT_INTERVAL = 60.0


def max_line(client: Client) -> int:
    """The longest line (newline included) that goes through whole: one batch holds it. A batch fits a
    segment (after its 32-byte header), the daemon's max_batch and, but for shm, the data pipe."""
    return client.max_batch


def run(stream: str, socket: str | None = None, transport: str = "copy") -> int:
    """Relay stdin into ``stream`` until EOF; a last line without '\\n' is terminated, not lost."""
    with Client(stream, socket=socket, transport=transport) as client:
        lines = _CopiedLines(client)
        if stat.S_ISFIFO(os.fstat(0).st_mode):
            _relay_pipe(client, lines, 0)
        else:
            _relay_copy(lines, 0)
        lines.report(final=True)
    return 0


class _CopiedLines:
    """The bytes the relay takes by copy: written as whole lines, a line longer than ``max_line`` cut
    with CUT_MARKER (counted in ``cut``), and an unfinished line carried until its newline comes."""

    def __init__(self, client: Client):
        self.client = client
        self.limit = max_line(client)
        self.carry = b""  # the start of an unfinished line, shorter than limit
        self.skipping = False  # the current line was cut: drop bytes up to its newline
        self.cut = 0
        self._reported = (0, 0.0)  # (cut count, when) last said on stderr

    @property
    def pending(self) -> bool:
        """True while a line is half taken: the next bytes must come by copy, not by splice."""
        return bool(self.carry) or self.skipping

    def feed(self, data: bytes) -> None:
        if self.skipping:
            nl = data.find(b"\n")
            if nl < 0:
                return
            data, self.skipping = data[nl + 1 :], False
        if self.carry:
            data, self.carry = self.carry + data, b""
        end = data.rfind(b"\n") + 1
        if end:
            complete = data[:end] if end < len(data) else data
            if len(complete) > self.limit and max(map(len, complete.split(b"\n"))) >= self.limit:
                complete = b"".join(self._cut(ln) if len(ln) >= self.limit else ln + b"\n"
                                    for ln in complete[:-1].split(b"\n"))
            self.client.write(complete)
        rest = data[end:]
        if len(rest) >= self.limit:  # too long even if its newline came next: cut now, drop the rest
            self.client.write(self._cut(rest))
            self.skipping = True
        else:
            self.carry = rest

    def finish(self) -> None:
        """At EOF: a last line without '\\n' is terminated (it fits: carry is shorter than limit)."""
        if self.carry:
            self.client.write(self.carry + b"\n")
        self.carry, self.skipping = b"", False

    def _cut(self, line: bytes) -> bytes:
        """``line`` (without its newline) cut to fit limit with the marker; never inside a UTF-8 character."""
        keep = self.limit - len(CUT_MARKER.format(self.limit))
        while keep and line[keep] & 0xC0 == 0x80:
            keep -= 1
        self.cut += 1
        self.report()
        return line[:keep] + CUT_MARKER.format(keep).encode()

    def report(self, final: bool = False) -> None:
        count, when = self._reported
        now = time.monotonic()
        if self.cut == count or not final and count and now - when < CUT_REPORT_INTERVAL:
            return
        self._reported = (self.cut, now)
        many = self.cut != 1
        print(f"logsink pipe: {self.cut} line{'s' if many else ''} longer than {self.limit} bytes "
              f"{'were' if many else 'was'} cut (marked{CUT_MARKER.rstrip()!r})", file=sys.stderr, flush=True)


def _relay_copy(lines: _CopiedLines, fd: int) -> None:
    while data := os.read(fd, READ_CHUNK):
        lines.feed(data)
    lines.finish()


def _relay_pipe(client: Client, lines: _CopiedLines, fd: int) -> None:
    """tee() shows us the pending bytes (to find the last newline), splice() moves them. A batch is
    at most ``lines.limit`` bytes, so with its header it fits the data pipe."""
    rfd, wfd, got = ffi.new("int *"), ffi.new("int *"), ffi.new("int *")
    check(lib.ls_pipe_create(1 << 20, rfd, wfd, got), "creating the scan pipe")
    scan_r, scan_w, cap = rfd[0], wfd[0], got[0]
    fcntl.fcntl(scan_w, fcntl.F_SETFL, 0)  # tee() into it must not fail with EAGAIN
    peek = min(cap, lines.limit)
    try:
        in_cap = fcntl.fcntl(fd, _F_GETPIPE_SZ)
    except OSError:
        in_cap = cap
    buf = ffi.new("char[]", peek)
    avail, batch, records = ffi.new("size_t *"), ffi.new("size_t *"), ffi.new("uint32_t *")
    last_avail, since = -1, 0.0
    try:
        while True:
            ret = lib.ls_peek_records(fd, scan_r, scan_w, buf, peek, avail, batch, records)
            if ret == -errno.EINTR:
                continue
            check(ret, "reading stdin")
            if avail[0] == 0:
                break  # EOF with nothing pending
            if batch[0] and not lines.pending:
                client.splice_from(fd, batch[0], records[0])
                continue
            if batch[0]:  # finish (or drop the cut rest of) the long line by copy, then back to splicing
                lines.feed(os.read(fd, batch[0]))
                continue
            if _writer_gone(fd):  # a last line without '\n': take it; EOF then terminates it
                lines.feed(os.read(fd, avail[0]))
                continue
            # The pipe is (nearly: a partly consumed page counts whole) full of one unfinished line,
            # or the writer stalled mid-line: take the bytes by copy so the writer can go on.
            if avail[0] >= min(in_cap, peek) - PAGE or avail[0] == last_avail and time.monotonic() - since > STALL:
                lines.feed(os.read(fd, avail[0]))
                last_avail = -1
                continue
            if avail[0] != last_avail:
                last_avail, since = avail[0], time.monotonic()
            time.sleep(PARTIAL_LINE_POLL)  # the rest of the line is on its way
    finally:
        os.close(scan_r)
        os.close(scan_w)
    lines.finish()


def _writer_gone(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))
