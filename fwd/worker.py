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

from .config import Config, format_hostport
from .routing import Backpressure, Router
from .session import CLOSE_LINGER, Session, St

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
        for s in list(self.sessions):
            s.close("server shutdown")
        if self.sessions:
            try:
                await asyncio.wait_for(self.closed.wait(), CLOSE_LINGER + 1)
            except asyncio.TimeoutError:  # pragma: no cover - linger aborts first
                pass


async def serve(config: Config) -> None:
    """Listen, serve until SIGINT/SIGTERM, then close cleanly."""
    loop = asyncio.get_running_loop()
    hub = Hub(config, loop)
    servers = []
    for host, port in config.listen:
        servers.append(await loop.create_server(
            lambda: Session(hub), host, port, backlog=1024, reuse_address=True))
    # Handlers first: "listening on" tells supervisors (and tests) the server is
    # ready, so a SIGTERM right after it must already mean a clean stop.
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    addrs = [format_hostport(*s.getsockname()[:2]) for srv in servers for s in srv.sockets]
    log.info("listening on %s mode=%s workers=%d password=%s",
             ",".join(addrs), config.mode, config.workers, "off")
    await stop.wait()
    log.info("stopping: closing %d sessions", len(hub.sessions))
    for srv in servers:
        srv.close()
    await hub.shutdown()
    log.info("stopped")


FD_RESERVE = 64
"""File descriptors kept for listeners, logs and the event loop itself."""


def raise_fd_limit(max_conns: int) -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one, and warn if it still cannot
    hold ``max_conns``: beyond it libuv sheds new connections silently."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # pragma: no cover - hard limit unsettable
            pass
    if soft != resource.RLIM_INFINITY and max_conns + FD_RESERVE > soft:
        log.warning("file descriptor limit %d is below --max-conns %d + %d: connections "
                    "beyond the limit are closed at accept without a log line",
                    soft, max_conns, FD_RESERVE)
    return soft


def run(config: Config) -> None:
    import uvloop

    raise_fd_limit(config.max_conns)
    uvloop.run(serve(config))
