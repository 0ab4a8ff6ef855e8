"""Write the curated seed corpus (corpus/<target>/): ``python tests/fuzz/make_corpus.py``.

The seeds are committed; this script says how each was built and rebuilds them byte for byte.
Add a seed found by a long run by saving its bytes under corpus/<target>/ with a name that says
what it is (README.md, "Saving a failure as a seed"). Stream names in seeds are ``app`` (shared
with a good producer) and ``other``: the replay tests run them on streams of exactly those names.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

import msgpack  # noqa: E402

from logsink import protocol  # noqa: E402

CORPUS = HERE / "corpus"
MAX = protocol.MAX_BATCH_PAYLOAD
FRAME = struct.Struct("<4sBBHIIQQ")


def header(payload_len: int, records: int, seq: int = 1, magic: bytes = b"LSK1", version: int = 1, flags: int = 0,
           header_len: int = 32, reserved: int = 0) -> bytes:
    return FRAME.pack(magic, version, flags, header_len, payload_len, records, seq, reserved)


def lines(tag: str, n: int) -> bytes:
    return b"".join(b"fz %s line %d of a saved seed\n" % (tag.encode(), i) for i in range(n))


def batch(tag: str, n: int, seq: int = 1, **kw) -> bytes:
    payload = lines(tag, n)
    return header(len(payload), n, seq, **kw) + payload


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def hello(stream="app", transport="copy", **kw) -> dict:
    msg = protocol.hello(stream, 4242, transport)
    msg.update(kw)
    return msg


# Bytes written to an accepted producer's data pipe (and, after WELCOME, to a TCP producer's socket).
PIPE = {
    "valid-batch.bin": batch("a", 3),
    "two-valid-batches.bin": batch("a", 3, 1) + batch("b", 2, 2),
    "free-fields-at-extremes.bin": batch("a", 2, seq=0, flags=255, reserved=2**64 - 1) + batch("b", 1, seq=2**64 - 1),
    "nul-bytes-inside-lines.bin": header(12, 2) + b"a\0b\0c\n\0\0\0\0\0\n",
    "bad-magic.bin": batch("a", 1) + batch("x", 3, 2, magic=b"XXXX"),
    "bad-version.bin": batch("x", 3, version=2),
    "bad-header-len.bin": batch("x", 3, header_len=64),
    "zero-payload-len.bin": header(0, 1) + lines("x", 2),
    "zero-records.bin": header(len(lines("x", 2)), 0) + lines("x", 2),
    "records-over-payload-len.bin": header(len(lines("x", 2)), len(lines("x", 2)) + 1) + lines("x", 2),
    "payload-len-over-max.bin": header(MAX + 1, 1) + lines("x", 3),
    "huge-payload-len.bin": header(2**32 - 1, 1) + lines("x", 3),
    "max-payload-len-announced-then-closed.bin": header(MAX, 1) + lines("x", 3),
    "truncated-header.bin": batch("a", 2) + header(100, 1)[:17],
    "truncated-payload.bin": batch("a", 2) + batch("x", 5, 2)[: 32 + 40],
    "garbage-after-batch.bin": batch("a", 2) + b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    # Defect seeds (issue 7): a committed batch that does not end in a newline.
    "payload-without-newline.bin": header(24, 1) + b"partial line, no newline",  # the repro
    "understated-payload-len.bin": header(len(lines("x", 3)) - 5, 3) + lines("x", 3),
    "overstated-payload-len-then-batch.bin": header(len(lines("x", 2)) + 10, 2) + lines("x", 2) + batch("y", 2, 2),
}

# One control frame (or raw bytes) sent with a fresh pipe's read end as the first message.
HELLO = {
    "valid-copy.bin": frame(pack(hello())),
    "valid-vmsplice.bin": frame(pack(hello(transport="vmsplice"))),
    "valid-other-stream.bin": frame(pack(hello("other"))),
    "valid-with-unknown-keys.bin": frame(pack(hello(x=1, nested={"a": [1, 2]}, token="t"))),
    "segment-size-negative.bin": frame(pack(hello(segment_size=-1, pipe_size=-(2**63)))),
    "segment-size-huge.bin": frame(pack(hello(segment_size=2**64 - 1))),
    "segment-size-string.bin": frame(pack(hello(segment_size="1MiB", pipe_size=[1]))),
    "segment-size-bool.bin": frame(pack(hello(segment_size=True))),
    "version-2.bin": frame(pack(hello(v=2))),
    "version-as-string.bin": frame(pack(hello(v="1"))),
    "version-as-bool.bin": frame(pack(hello(v=True))),
    "version-huge.bin": frame(pack(hello(v=2**64 - 1))),
    "stream-as-int.bin": frame(pack(hello(stream=7))),
    "stream-as-bytes.bin": frame(pack(hello(stream=b"app"))),
    "stream-dotdot.bin": frame(pack(hello("../app"))),
    "stream-slash.bin": frame(pack(hello("a/b"))),
    "stream-empty.bin": frame(pack(hello(""))),
    "stream-too-long.bin": frame(pack(hello("a" * 65))),
    "stream-with-nul.bin": frame(pack(hello("app\0"))),
    "pid-as-string.bin": frame(pack(hello(pid="4242"))),
    "pid-negative.bin": frame(pack(hello(pid=-1))),
    "transport-zerocopy-locally.bin": frame(pack(hello(transport="zerocopy"))),
    "transport-unknown.bin": frame(pack(hello(transport="carrier-pigeon"))),
    "missing-stream.bin": frame(pack({k: v for k, v in hello().items() if k != "stream"})),
    "missing-type.bin": frame(pack({k: v for k, v in hello().items() if k != "t"})),
    "int-keys.bin": frame(pack({1: "hello", 2: 1})),
    "array-not-map.bin": frame(pack(["hello", 1, "app", 1, "copy"])),
    "truncated-msgpack.bin": frame(pack(hello()))[:-7],
    "length-prefix-too-long.bin": struct.pack(">I", len(pack(hello())) + 100) + pack(hello()),
    "length-prefix-too-short.bin": struct.pack(">I", len(pack(hello())) - 3) + pack(hello()),
    "oversized-length-prefix.bin": struct.pack(">I", protocol.MAX_CONTROL_MESSAGE + 1) + pack(hello()),
    "hello-twice.bin": frame(pack(hello())) + frame(pack(hello())),
    "hello-then-garbage.bin": frame(pack(hello())) + b"\xde\xad\xbe\xef" * 4,
    "status-then-hello.bin": protocol.encode({"t": "status"}) + frame(pack(hello())),
}

# Bytes sent on a fresh control connection, no fds.
CONTROL = {
    "status.bin": protocol.encode({"t": "status"}),
    "status-twice-in-one-write.bin": protocol.encode({"t": "status"}) * 2,
    "http-request.bin": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "not-msgpack.bin": struct.pack(">I", 8) + b"\xc1" * 8,
    "zero-length.bin": b"\x00\x00\x00\x00",
    "huge-length.bin": b"\xff" * 64,
    "oversized-length-prefix.bin": struct.pack(">I", protocol.MAX_CONTROL_MESSAGE + 1) + b"\x80",
    "max-length-prefix-then-eof.bin": struct.pack(">I", protocol.MAX_CONTROL_MESSAGE) + b"\x80",
    "truncated-msgpack.bin": frame(pack({"t": "status", "x": "y" * 40}))[:-10],
    "length-shorter-than-body.bin": struct.pack(">I", 3) + pack({"t": "status"}),
    "unknown-type.bin": frame(pack({"t": "bogus", "v": 1})),
    "type-as-int.bin": frame(pack({"t": 1})),
    "welcome-from-client.bin": frame(pack(protocol.welcome(1, "io_uring"))),
    "release-from-client.bin": frame(pack(protocol.release(5, [[1, "x", "y"]]))),
    "error-from-client.bin": frame(pack(protocol.error("bad-message", "you"))),
    "shutdown-from-client.bin": frame(pack({"t": "shutdown"})),
    "hello-without-fd.bin": frame(pack(hello())),
    "array-not-map.bin": frame(pack(["status"])),
    "deeply-nested.bin": frame(b"\x91" * 100_000 + b"\xc0"),
    "map-with-bin-keys.bin": frame(b"\x81\xc4\x01t\xa6status"),
    "status-then-garbage.bin": protocol.encode({"t": "status"}) + b"\x00\x00\x00\x02\xc1\xc1",
}

# Bytes sent first on a fresh TCP connection (frames after WELCOME replay PIPE's seeds).
TCP = {
    "http-request.bin": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "tls-client-hello-start.bin": bytes.fromhex("16030100a5010000a10303") + b"\0" * 32,
    "zero-length.bin": b"\x00\x00\x00\x00",
    "huge-length.bin": b"\xff" * 64,
    "valid-hello-then-close.bin": frame(pack(hello(transport="copy"))),
    "valid-hello-zerocopy-then-close.bin": frame(pack(hello(transport="zerocopy"))),
    "hello-with-batch-before-welcome.bin": frame(pack(hello(transport="copy"))) + batch("x", 2),
    "hello-vmsplice-over-tcp.bin": frame(pack(hello(transport="vmsplice"))),
    "hello-wrong-version.bin": frame(pack(hello(transport="copy", v=0))),
    "hello-bad-stream.bin": frame(pack(hello("../x", transport="copy"))),
    "truncated-hello.bin": frame(pack(hello(transport="copy")))[:-4],
    "frame-header-instead-of-hello.bin": batch("x", 2),
}

# SCM_RIGHTS abuse: a list of sends on one control connection, each with bytes (hex) and fds of
# named kinds (see test_fuzz_scm_rights.FD_KINDS); "abrupt": close without shutdown(); "repeat": connections.
HUGE_PREFIX = struct.pack(">I", protocol.MAX_CONTROL_MESSAGE).hex()
SCM = {
    "many-pipe-fds-no-hello.json": {"sends": [{"data": HUGE_PREFIX, "fds": ["pipe_r"] * 16}]
                                    + [{"data": "80", "fds": ["pipe_r"] * 16} for _ in range(19)]},
    "many-mixed-fds-no-hello.json": {"sends": [{"data": HUGE_PREFIX, "fds": []}]
                                     + [{"data": "c0", "fds": ["pipe_w", "file", "dir", "socket", "devnull", "eventfd", "memfd", "pipe_r"] * 2}
                                        for _ in range(6)]},
    "more-fds-than-one-read-takes.json": {"sends": [{"data": "00", "fds": ["pipe_r"] * 40}]},
    "fds-with-garbage.json": {"sends": [{"data": b"GET / HTTP/1.1\r\n\r\n".hex(), "fds": ["pipe_r", "pipe_r", "file"]}]},
    "fds-with-status.json": {"sends": [{"data": protocol.encode({"t": "status"}).hex(), "fds": ["pipe_r"] * 4}]},
    "hello-with-two-pipes.json": {"sends": [{"data": frame(pack(hello())).hex(), "fds": ["pipe_r", "pipe_r"]}]},
    "hello-with-write-end.json": {"sends": [{"data": frame(pack(hello())).hex(), "fds": ["pipe_w"]}]},
    "hello-with-socket.json": {"sends": [{"data": frame(pack(hello())).hex(), "fds": ["socket"]}]},
    "hello-with-directory.json": {"sends": [{"data": frame(pack(hello())).hex(), "fds": ["dir"]}]},
    "hello-with-memfd.json": {"sends": [{"data": frame(pack(hello())).hex(), "fds": ["memfd"]}]},
    "hello-with-its-own-socket.json": {"sends": [{"data": frame(pack(hello())).hex(), "fds": ["self"]}]},
    "fd-before-hello-split.json": {"sends": [{"data": frame(pack(hello())).hex()[:8], "fds": ["pipe_r"]},
                                             {"data": frame(pack(hello())).hex()[8:], "fds": []}]},
    "valid-hello-then-more-fds.json": {"sends": [{"data": frame(pack(hello())).hex(), "fds": ["pipe_r"]},
                                                 {"data": "00", "fds": ["pipe_r"] * 16}]},
    "own-socket-fd-abrupt-close-x20.json": {"sends": [{"data": "00", "fds": ["self"]}], "abrupt": True, "repeat": 20},
}


def write(target: str, seeds: dict, as_json: bool = False) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    for old in d.iterdir():
        if old.name not in seeds:
            old.unlink()
    for name, value in seeds.items():
        data = (json.dumps(value, indent=1) + "\n").encode() if as_json else value
        (d / name).write_bytes(data)


if __name__ == "__main__":
    write("pipe", PIPE)
    write("hello", HELLO)
    write("control", CONTROL)
    write("tcp", TCP)
    write("scm", SCM, as_json=True)
    print(f"wrote {sum(map(len, (PIPE, HELLO, CONTROL, TCP, SCM)))} seeds under {CORPUS}")
