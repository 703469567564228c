"""systemd's service notifications (sd_notify(3)), without libsystemd.

Under ``Type=notify`` systemd waits for ``READY=1`` before it calls the
service started, and with ``WatchdogSec=`` it restarts a service that stops
sending ``WATCHDOG=1``. The parent process sends both: the workers have the
parent's own watchdog (``--worker-timeout``), and the parent is what nothing
else watches. The protocol is one datagram per message to the Unix socket
named by ``NOTIFY_SOCKET``, so this needs no library.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("fwd.sdnotify")


class Notifier:
    """Where to send notifications, read (and removed) from the environment
    once, so that worker processes do not inherit them; with no
    ``NOTIFY_SOCKET`` every call does nothing."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.pop("NOTIFY_SOCKET", "")
        usec = env.pop("WATCHDOG_USEC", "")
        pid = env.pop("WATCHDOG_PID", "")
        # "@name" is an abstract socket (systemd's own notation).
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog: float | None = None
        """Seconds between WATCHDOG=1 messages: half systemd's timeout, as
        sd_watchdog_enabled(3) advises; None when there is no watchdog."""
        if self.address and usec.isdigit() and int(usec) > 0 \
                and (not pid or pid == str(os.getpid())):
            self.watchdog = int(usec) / 2e6
        self._sock: socket.socket | None = None
        self._failed = False

    def __bool__(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        """One message of ``KEY=value`` fields. A lost message is logged once
        and never stops the server: systemd may be gone, or the socket full."""
        if not self.address:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"),
                            exc.strerror or exc)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
