"""A worker: one event loop, its listening sockets, its sessions and the state
they share (routing table, backpressure marks, the one read buffer, counters).

With ``--workers 1`` this is the whole server. Sessions reach shared state only
through the Hub, so that a multi-process layer can replace what is behind it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import signal
import socket
import sys
from typing import Any

from . import fdpass
from .config import Config
from .crypto import derive_key
from .routing import Backpressure, Router
from .runtime import set_title, setup_logging
from .session import Session, St

log = logging.getLogger("fwd.worker")

READ_SIZE = 256 * 1024
"""One read's maximum: large enough for bulk streams, shared by all sessions."""
HOLD_TICK = 1.0
"""How often held bytes are checked for expiry (``--hold-seconds`` precision)."""


class Hub:
    """What the sessions of one worker share."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        # scrypt is slow on purpose: once per process, never per connection.
        self.key: bytes | None = None if config.password is None else derive_key(config.password)
        self.router: Router[Session] = Router(
            hold_bytes=config.hold_bytes,
            hold_seconds=config.hold_seconds,
            hold_total=config.hold_total,
        )
        self.backpressure: Backpressure[Session] = Backpressure()
        self.buffer = bytearray(READ_SIZE)
        self.view = memoryview(self.buffer)
        self.sessions: set[Session] = set()
        self.pending: set[Session] = set()
        self.stats: collections.Counter[str] = collections.Counter()
        self.closed = asyncio.Event()
        self.stopping = False
        self._hold_timer: asyncio.TimerHandle | None = None
        self._last_reject_log = -1e9

    def admit(self, session: Session) -> bool:
        """Count a new connection in, or refuse it (``--max-conns``, shutdown)."""
        if self.stopping or len(self.sessions) >= self.config.max_conns:
            self.stats["rejected"] += 1
            now = self.loop.time()
            if now - self._last_reject_log >= 1.0:
                self._last_reject_log = now
                log.warning("refusing connection from %s: %d connections (--max-conns), "
                            "%d refused so far", session.peer, len(self.sessions),
                            self.stats["rejected"])
            return False
        self.sessions.add(session)
        self.stats["connections"] += 1
        return True

    def release(self, session: Session) -> None:
        self.sessions.discard(session)
        if self.stopping and not self.sessions:
            self.closed.set()

    def resume_senders(self, senders: list[Session]) -> None:
        for s in senders:
            if s.state is St.LIVE and s.transport is not None:
                s.transport.resume_reading()

    def watch_holds(self) -> None:
        if self._hold_timer is None and self.router.has_holds():
            self._hold_timer = self.loop.call_later(HOLD_TICK, self._expire_holds)

    def _expire_holds(self) -> None:
        self._hold_timer = None
        dropped = self.router.expire(self.loop.time())
        if dropped:
            self.stats["dropped_bytes"] += dropped
            log.info("dropped %d held bytes older than %gs (--hold-seconds)",
                     dropped, self.config.hold_seconds)
        self.watch_holds()

    async def shutdown(self) -> None:
        """Close every session, letting queued bytes flush for a bounded time."""
        self.stopping = True
        queued = sum(s.transport.get_write_buffer_size() for s in self.sessions if s.transport)
        log.info("draining %d sessions with %d queued bytes", len(self.sessions), queued)
        for s in list(self.sessions):
            s.close("server shutdown")
        if self.sessions:
            try:
                await asyncio.wait_for(self.closed.wait(), self.config.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("%d sessions did not drain within %gs: aborting them",
                            len(self.sessions), self.config.drain_timeout)
                for s in list(self.sessions):
                    if s.transport is not None:
                        s.transport.abort()


async def serve(config: Config, wid: int, channel: socket.socket) -> None:
    """Serve the client sockets the parent sends on ``channel`` until SIGTERM
    (or until the parent is gone), then drain."""
    loop = asyncio.get_running_loop()
    hub = Hub(config, loop)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    last_loss_log = -1e9

    async def adopt(sock: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(lambda: Session(hub), sock)
        except OSError as exc:  # the client left during the hand-off
            log.debug("could not adopt a connection: %s", exc)
            sock.close()

    def on_socket(sock: socket.socket, meta: dict[str, Any], data: bytes) -> None:
        if hub.stopping:
            sock.close()
            return
        loop.create_task(adopt(sock))

    def on_parent_gone() -> None:
        if not stop.is_set():
            log.warning("the parent process is gone: stopping")
            stop.set()

    def on_loss(exc: OSError) -> None:
        nonlocal last_loss_log
        hub.stats["rejected"] += 1
        if loop.time() - last_loss_log >= 1.0:
            last_loss_log = loop.time()
            log.warning("a connection was lost in the hand-off (%s): %d so far",
                        exc, hub.stats["rejected"])

    fdpass.receive_into(loop, channel, on_socket, on_parent_gone, on_loss)
    channel.send(b"ready")
    await stop.wait()
    loop.remove_reader(channel)
    await hub.shutdown()
    channel.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of a worker process: ``python -m fwd.worker WID FD``."""
    import uvloop

    wid, fd = (int(a) for a in (sys.argv[1:] if argv is None else argv))
    channel = socket.socket(fileno=fd)
    meta, _ = fdpass.unpack(channel.recv(65536))
    meta["listen"] = [tuple(a) for a in meta["listen"]]
    config = Config(**meta)
    setup_logging(config.log_level, f"w{wid}")
    set_title(f"fwd-server: worker {wid}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which drains us
    uvloop.run(serve(config, wid, channel))


if __name__ == "__main__":
    main()
