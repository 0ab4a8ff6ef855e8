"""RELP's session handshake (librelp's doc/relp.md), the part Python does: open and the frames it reads.

The per-record ``syslog`` commands and the collector's responses are C's (native/ls_forward_relp.c).
"""

from __future__ import annotations

import asyncio
import socket

from logsink._version import __version__

# RELP open/close handshakes: how long the collector gets to answer.
RELP_HANDSHAKE_TIMEOUT = 5.0
RELP_CLOSE_TIMEOUT = 1.0
# Our RELP offers: protocol version 0 as librelp speaks it, one command.
RELP_OFFERS = b"relp_version=0\nrelp_software=logsink,%s\ncommands=syslog"


class RelpError(ConnectionError):
    """The collector did not open a RELP session with us (the message says why); retried with backoff."""


def relp_frame(buf: bytes) -> tuple[int, bytes, bytes, bytes] | None:
    """The first whole RELP frame in ``buf`` as (txnr, command, data, the bytes after it), or None if
    it is incomplete. Only for the open handshake (a few hundred bytes); C parses the rest."""
    head = buf[:64].split(b" ", 3)
    if len(head) < 3:
        return None
    txnr, cmd, tail = head[0], head[1], b" ".join(head[2:])
    digits = len(tail) - len(tail.lstrip(b"0123456789"))
    if digits == len(tail):
        return None
    if not txnr.isdigit() or not cmd.isalpha() or digits == 0 or digits > 9:
        raise RelpError(f"the collector sent something that is not a RELP frame: {buf[:60]!r}")
    dlen = int(tail[:digits])
    start = len(txnr) + len(cmd) + 2 + digits
    if dlen == 0:
        if buf[start : start + 1] != b"\n":
            raise RelpError(f"the collector sent a RELP frame without its LF trailer: {buf[:60]!r}")
        return int(txnr), cmd, b"", buf[start + 1 :]
    if len(buf) < start + 1 + dlen + 1:
        return None
    if buf[start : start + 1] != b" " or buf[start + 1 + dlen : start + 2 + dlen] != b"\n":
        raise RelpError(f"the collector sent a malformed RELP frame: {buf[:60]!r}")
    return int(txnr), cmd, buf[start + 1 : start + 1 + dlen], buf[start + 2 + dlen :]


async def relp_open(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """RELP's open (txnr 1): offer version 0 and the syslog command; the collector must accept both."""
    offers = RELP_OFFERS % __version__.encode()
    await loop.sock_sendall(sock, b"1 open %d %s\n" % (len(offers), offers))
    buf = b""
    while (frame := relp_frame(buf)) is None:
        data = await loop.sock_recv(sock, 4096)
        if not data:
            raise RelpError("the collector closed the connection instead of answering RELP open")
        buf += data
    txnr, cmd, data, rest = frame
    first, _, offers_back = data.partition(b"\n")
    if txnr != 1 or cmd != b"rsp":
        raise RelpError(f"the collector answered RELP open with {txnr} {cmd.decode(errors='replace')}, not 1 rsp")
    if not first.startswith(b"200"):
        raise RelpError(f"the collector refused the RELP session: {first.decode(errors='replace')[:100]}")
    got = dict(line.partition(b"=")[::2] for line in offers_back.split(b"\n") if line)
    if b"relp_version" not in got or b"syslog" not in got.get(b"commands", b"").split(b","):
        raise RelpError(f"the collector's RELP offers lack relp_version or commands=syslog: {offers_back[:200]!r}")
    if rest:
        raise RelpError(f"the collector sent {len(rest)} bytes after answering RELP open: {rest[:40]!r}")
