"""systemd's notify protocol (``Type=notify``): a few datagrams to ``$NOTIFY_SOCKET``, no library.

See sd_notify(3): each message is ``KEY=VALUE`` lines in one AF_UNIX SOCK_DGRAM datagram to the
path (or, with a leading '@', the abstract name) in ``$NOTIFY_SOCKET``. Without that variable every
call is a no-op, so the daemon runs the same outside systemd. A failed send is logged once and
never stops the daemon: systemd's own timeouts say what happens to a daemon that cannot notify.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

log = structlog.get_logger("logsink.daemon")

# How often STATUS= is refreshed (systemctl status shows the last one).
STATUS_INTERVAL = 10.0


def notify_address(value: str) -> str | None:
    """The socket address for a $NOTIFY_SOCKET value: an absolute path, or '@name' (abstract). None = unsupported."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. systemd's vsock: addresses, which a host service never gets


def watchdog_interval(environ: MutableMapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when the watchdog is not ours or off."""
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    try:
        if pid and int(pid) != os.getpid():
            return None  # meant for another process (a wrapper that exec'd us would have set it to us)
        n = int(usec)
    except ValueError:
        log.warning("watchdog_ignored", WATCHDOG_USEC=usec, WATCHDOG_PID=pid, detail="not an integer: no WATCHDOG=1 pings")
        return None
    return n / 2e6 if n > 0 else None


class SystemdNotifier:
    """Sends sd_notify messages when systemd asked for them ($NOTIFY_SOCKET), else does nothing.

    Reads and removes $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID from ``environ`` (as
    sd_notify's unset_environment does), so no child process inherits them."""

    def __init__(self, environ: MutableMapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        raw = env.pop("NOTIFY_SOCKET", "")
        self.watchdog = watchdog_interval(env) if raw else None
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        self.address = notify_address(raw) if raw else None
        self._sock: socket.socket | None = None
        self._failed_once = False
        self._timers: list[asyncio.TimerHandle] = []
        self._status: Callable[[], str] = lambda: ""
        if raw and self.address is None:
            log.warning("notify_socket_unsupported", NOTIFY_SOCKET=raw,
                        detail="expected an absolute path or an @abstract name: systemd will not hear READY=1")

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: Any) -> bool:
        """Send one datagram ``KEY=VALUE\\n...`` (keys as given, e.g. READY=1). True if it was sent."""
        if self.address is None:
            return False
        msg = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # MSG_DONTWAIT: a receiver with a full queue must not stall the event loop.
            self._sock.sendto(msg, socket.MSG_DONTWAIT, self.address)
            return True
        except OSError as exc:
            if not self._failed_once:
                self._failed_once = True
                log.error("notify_failed", socket=self.address.replace("\0", "@"), error=str(exc), message=sorted(fields),
                          detail="systemd did not get this notification (logged once); the daemon goes on")
            return False

    # -- the daemon's lifecycle ------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, status: Callable[[], str], alive: Callable[[], bool]) -> None:
        """READY=1 with a first STATUS=, then STATUS= every STATUS_INTERVAL and, with a watchdog, WATCHDOG=1
        every WATCHDOG_USEC/2 while ``alive()`` (the engine): a daemon whose engine died gets restarted."""
        if not self.enabled:
            return
        self._status = status
        self.send(READY=1, STATUS=status())
        self._every(loop, STATUS_INTERVAL, lambda: self.send(STATUS=status()))
        if self.watchdog is not None:

            def ping() -> None:
                if alive():
                    self.send(WATCHDOG=1)

            ping()
            self._every(loop, self.watchdog, ping)

    def _every(self, loop: asyncio.AbstractEventLoop, interval: float, fn: Callable[[], Any]) -> None:
        slot = len(self._timers)

        def tick() -> None:
            fn()
            self._timers[slot] = loop.call_later(interval, tick)

        self._timers.append(loop.call_later(interval, tick))

    def reloading(self) -> None:
        """SIGHUP: RELOADING=1 with MONOTONIC_USEC (systemd >= 253 matches the reload by it); ready() when done."""
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def ready(self) -> None:
        if self.enabled:
            self.send(READY=1, STATUS=self._status())

    def status_now(self) -> None:
        """An immediate STATUS= (e.g. the engine failed), not waiting for the next refresh."""
        if self.enabled:
            self.send(STATUS=self._status())

    def stopping(self) -> None:
        self.send(STOPPING=1, STATUS="stopping")

    def close(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
