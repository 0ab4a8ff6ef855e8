"""A producer process for the tests: ``python producer.py '<json config>'``.

Config keys: ``socket``, ``stream``, ``tag`` (record prefix), ``mode``, ``count``, ``client`` (extra
``logsink.Client`` keyword arguments). Modes:

- ``count``: write records 0..count-1 with logsink.Client, flush, print the client's stats as JSON.
- ``until-error``: write records until write() raises (or ``max_seconds`` pass); after the first
  ``ready_after`` records, flush and print ``ready``. Last line: JSON with ``accepted`` (writes that
  returned), ``error`` (the exception's type name) and ``is_connection_error``.
- ``flush-then-wait``: write ``count`` records, flush, print ``flushed``, wait for stdin to close.
- ``until-stdin``: print ``ready`` after the first records, write records until stdin closes,
  then flush and print the client's stats as JSON plus ``count`` (records written).
- ``continuous``: write records 0, 1, 2... until stdin closes (or ``max_seconds`` pass), riding
  out daemon restarts (the client reconnects by itself); print ``ready`` once the first records
  are flushed. Last line: JSON with ``count`` (records written), ``max_write_seconds`` (the
  longest single write: how long the arena kept us waiting) and the client's stats.
- ``raw-die-mid-batch``: by hand, HELLO, one whole batch of ``count`` records (waits for its
  RELEASE), then a header and half the payload of the next batch; prints ``half`` and sleeps until
  killed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lsk_helpers import RawProducer, make_records, record  # noqa: E402


def main() -> int:
    cfg = json.loads(sys.argv[1])
    mode = cfg["mode"]
    tag = cfg["tag"]
    if mode == "raw-die-mid-batch":
        raw = RawProducer(cfg["socket"])
        raw.hello(cfg["stream"], transport="copy")
        raw.expect_welcome()
        raw.send_batch(make_records(tag, cfg["count"]), 1)
        raw.wait_release(1)
        partial = make_records(tag + "x", 50)
        payload = b"".join(partial)
        from logsink import protocol

        raw.write_pipe(protocol.pack_frame_header(len(payload), len(partial), 2) + payload[: len(payload) // 2])
        print("half", flush=True)
        while True:
            time.sleep(60)

    import logsink

    client = logsink.Client(cfg["stream"], socket=cfg["socket"], **cfg.get("client", {}))
    if mode == "count":
        n = cfg["count"]
        for rec in make_records(tag, n):
            client.write(rec)
        client.flush(timeout=60)
        stats = client.stats()
        client.close()
        print(json.dumps(stats), flush=True)
        return 0
    if mode == "until-error":
        accepted = 0
        err: BaseException | None = None
        deadline = time.monotonic() + cfg.get("max_seconds", 60)
        ready_after = cfg.get("ready_after", 2000)
        try:
            i = 0
            while time.monotonic() < deadline:
                for _ in range(1000):
                    client.write(record(tag, i))
                    i += 1
                    accepted += 1
                    if accepted == ready_after:
                        client.flush(timeout=30)
                        print("ready", flush=True)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            err = exc
        try:
            client.close()
        except Exception:
            pass
        print(json.dumps({
            "accepted": accepted,
            "error": type(err).__name__ if err else None,
            "message": str(err) if err else "",
            "is_connection_error": isinstance(err, ConnectionError),
        }), flush=True)
        return 0
    if mode == "until-stdin":
        import select

        n = 0
        deadline = time.monotonic() + cfg.get("max_seconds", 60)
        while time.monotonic() < deadline:
            for _ in range(500):
                client.write(record(tag, n))
                n += 1
            if n == 500:
                print("ready", flush=True)
            if select.select([sys.stdin], [], [], 0)[0]:
                break
        client.flush(timeout=60)
        stats = client.stats()
        client.close()
        print(json.dumps({"count": n, **stats}), flush=True)
        return 0
    if mode == "continuous":
        import select

        n = 0
        longest = 0.0
        deadline = time.monotonic() + cfg.get("max_seconds", 120)
        while time.monotonic() < deadline:
            for _ in range(200):
                t0 = time.monotonic()
                client.write(record(tag, n))
                longest = max(longest, time.monotonic() - t0)
                n += 1
            if n == 200:
                client.flush(timeout=60)
                print("ready", flush=True)
            if select.select([sys.stdin], [], [], 0)[0]:
                break
        client.flush(timeout=120)
        stats = client.stats()
        client.close()
        print(json.dumps({"count": n, "max_write_seconds": longest, **stats}), flush=True)
        return 0
    if mode == "flush-then-wait":
        for rec in make_records(tag, cfg["count"]):
            client.write(rec)
        client.flush(timeout=30)
        print("flushed", flush=True)
        sys.stdin.read()
        try:
            client.close()
        except Exception:
            pass
        print(json.dumps({"ok": True}), flush=True)
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main())
