"""Prometheus metrics: counters summed over every process of the server.

prometheus_client's multiprocess mode keeps each process's values in small
mmap'ed files in one directory; the parent's /metrics sums them. The hot path
never touches a metric: workers keep plain integer counters in their Hub and
copy them into the files every FLUSH_EVERY seconds and just before each scrape
(the parent asks them to), so a scrape is current to within the request.

Counters of a worker that died keep their last flushed values (a counter must
not go backwards); its gauges are dropped when the parent sees it exit.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .config import format_hostport
from .control import close_connections, tracked
from .protocol import FAILURE_REASONS

log = logging.getLogger("fwd.metrics")

FLUSH_EVERY = 5.0
"""Seconds between a worker's copies of its counters into the metrics files."""
ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_HEAD = 8192
"""Longest HTTP request head the endpoint reads."""
HEAD_TIMEOUT = 10.0
"""Seconds a client has to send its request head."""
LINGER = 1.0
"""After a reply, seconds spent reading and dropping what the client still
sends (nginx's lingering close): closing with unread bytes resets the
connection, and the reset can destroy the reply before the client reads it
(a 431 for a 70 KB head, say). Bounded in bytes too, by LINGER_BYTES."""
LINGER_BYTES = 1 << 20
MAX_CLIENTS = 64
"""Clients kept at once; a new one closes the oldest (a flood of idle ones must
neither take the parent's descriptors, which the acceptor needs, nor lock a
real scraper out)."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic text format: every Prometheus version reads it (our names need no escaping)."""

REASONS = tuple(sorted({r for _, r in FAILURE_REASONS} | {"malformed"}))

# Hub counter → (metric name, help). Counters are exported with a _total suffix.
COUNTERS: Mapping[str, tuple[str, str]] = {
    "connections": ("fwd_connections", "Client connections accepted."),
    "rejected": ("fwd_connections_refused", "Connections closed at once (--max-conns, "
                 "--max-conns-per-ip, --allow/--deny, shutdown, lost in a hand-off)."),
    "bytes_in": ("fwd_received_bytes", "Stream bytes read from clients (after the handshake)."),
    "bytes_out": ("fwd_sent_bytes", "Stream bytes written to clients."),
    "slow_disconnects": ("fwd_slow_consumer_disconnects", "Receivers disconnected for "
                         "staying above their high-water mark longer than --slow-timeout."),
    "cross_worker_bytes": ("fwd_cross_worker_bytes", "Bytes sent to another worker process."),
    "full_notices": ("fwd_full_notices", "Notices to the other workers that a receiver "
                     "went above --max-buffer."),
    "kicked": ("fwd_kicked_sessions", "Sessions closed by fwd-ctl kick."),
    "pumped_pairs": ("fwd_pumps_started", "Bulk pairs handed to threads."),
    "throttled": ("fwd_rate_limited", "Times a client was paused for going over --max-rate."),
}
GAUGES: Mapping[str, tuple[str, str]] = {
    "open_connections": ("fwd_open_connections", "Client connections open now."),
    "held_bytes": ("fwd_held_bytes", "Bytes held now for absent chan receivers."),
    "held_memory": ("fwd_held_memory_bytes", "Memory of the holds now, their bytes and "
                    "bookkeeping, and held bytes queued for a receiver and not written "
                    "yet: what --hold-total caps."),
    "buffered_bytes": ("fwd_buffered_bytes", "Bytes queued now towards receivers."),
    "spliced_sessions": ("fwd_spliced_sessions", "Sessions holding a splice(2) pipe now."),
    "pumped_pairs": ("fwd_pumped_pairs", "Bulk pairs whose bytes two threads move now."),
}
MODES = ("chan", "broadcast")


def prepare(rundir: str) -> str:
    """Choose the metrics directory; must run before prometheus_client is
    imported here and before workers start (they inherit the environment)."""
    path = os.path.join(rundir, "metrics")
    os.makedirs(path, exist_ok=True)
    os.environ[ENV] = path
    return path


class WorkerMetrics:
    """A worker's metrics, fed from its Hub's counters by ``flush``."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        from .session import END_LABELS  # workers only: it loads the data path
        from .worker import DROP_REASONS

        self.counters = {k: Counter(n, h, registry=None) for k, (n, h) in COUNTERS.items()}
        self.gauges = {k: Gauge(n, h, registry=None, multiprocess_mode="livesum")
                       for k, (n, h) in GAUGES.items()}
        self.sessions_total = Counter("fwd_sessions", "Sessions that went live, by mode.",
                                      ["mode"], registry=None)
        self.sessions_live = Gauge("fwd_sessions_live", "Live sessions now, by mode.",
                                   ["mode"], registry=None, multiprocess_mode="livesum")
        self.failures = Counter("fwd_handshake_failures", "Failed handshakes, by reason.",
                                ["reason"], registry=None)
        self.drops = Counter("fwd_dropped_bytes", "Stream bytes that reached nobody, by why.",
                             ["reason"], registry=None)
        self.ends = Counter("fwd_session_ends", "Live sessions that ended, by reason.",
                            ["reason"], registry=None)
        for mode in MODES:  # every series exists from the start, at 0
            self.sessions_total.labels(mode)
            self.sessions_live.labels(mode)
        for reason in REASONS:
            self.failures.labels(reason)
        for reason in END_LABELS:
            self.ends.labels(reason)
        for reason in DROP_REASONS:
            self.drops.labels(reason)
        self._last: dict[str, int] = {}

    def _advance(self, key: str, value: int) -> int:
        delta = value - self._last.get(key, 0)
        self._last[key] = value
        return max(delta, 0)

    def flush(self, snapshot: Mapping[str, Any]) -> None:
        """Copy a Hub snapshot (``Hub.snapshot()``) into the metrics files."""
        totals = snapshot["totals"]
        for key, counter in self.counters.items():
            if delta := self._advance(key, totals.get(key, 0)):
                counter.inc(delta)
        for mode in MODES:
            if delta := self._advance(f"sessions_{mode}", totals.get(f"sessions_{mode}", 0)):
                self.sessions_total.labels(mode).inc(delta)
            self.sessions_live.labels(mode).set(snapshot["live"].get(mode, 0))
        for reason, count in snapshot["failures"].items():
            if delta := self._advance(f"fail_{reason}", count):
                self.failures.labels(reason).inc(delta)
        for reason, count in snapshot["ends"].items():
            if delta := self._advance(f"end_{reason}", count):
                self.ends.labels(reason).inc(delta)
        for reason, count in snapshot["drops"].items():
            if delta := self._advance(f"drop_{reason}", count):
                self.drops.labels(reason).inc(delta)
        for key, gauge in self.gauges.items():
            gauge.set(snapshot[key])


class ParentMetrics:
    """The parent's own metrics, and the sum over all processes for /metrics."""

    def __init__(self, workers: int) -> None:
        from prometheus_client import Counter, Gauge

        self.refused = Counter(*COUNTERS["rejected"], registry=None)
        self.restarts = Counter("fwd_worker_restarts", "Workers restarted after they died.",
                                registry=None)
        self.timeouts = Counter("fwd_worker_timeouts", "Workers killed for --worker-timeout "
                                "(also counted as restarts).", registry=None)
        self.workers = Gauge("fwd_workers", "Worker processes configured.", registry=None,
                             multiprocess_mode="livesum")
        self.workers.set(workers)
        from . import __version__

        info = Gauge("fwd_build_info", "Always 1; its label is the fwd version.", ["version"],
                     registry=None, multiprocess_mode="max")
        info.labels(__version__).set(1)
        # The name node_exporter and client libraries use: uptime dashboards know it.
        Gauge("process_start_time_seconds", "When the server started, in Unix seconds.",
              registry=None, multiprocess_mode="max").set(time.time())

    def worker_gone(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)


async def _reply(writer: asyncio.StreamWriter, status: str, body: bytes,
                 ctype: str = "text/plain", head_only: bool = False, extra: str = "") -> None:
    """``extra``: more header lines, each ending in CRLF."""
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: "
                 f"{len(body)}\r\n{extra}Connection: close\r\n\r\n".encode())
    if not head_only:
        writer.write(body)
    await writer.drain()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The reply is out: say so with a FIN, then drop what the client still
    sends, until its EOF, LINGER seconds or LINGER_BYTES (see LINGER)."""
    if writer.can_write_eof():
        writer.write_eof()

    async def drain() -> None:
        left = LINGER_BYTES
        while left > 0 and (chunk := await reader.read(min(left, 65536))):
            left -= len(chunk)

    try:
        await asyncio.wait_for(drain(), LINGER)
    except asyncio.TimeoutError:
        pass


class MetricsServer:
    """A minimal HTTP/1.1 endpoint for GET /metrics in the parent's event loop
    (no thread: ``render`` first asks the workers to flush), and GET /healthz
    for load balancers and orchestrators (``health``: None when serving, else
    why not)."""

    def __init__(self, host: str, port: int, render: Callable[[], Awaitable[bytes]],
                 health: Callable[[], str | None] = lambda: None) -> None:
        self.host, self.port = host, port
        self.render = render
        self.health = health
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def start(self) -> tuple[str, int]:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                      limit=MAX_HEAD)
        except OSError as exc:  # say which address, as --listen does
            where = format_hostport(self.host, self.port)
            code = exc.errno or 0  # uvloop's own strerror is a sentence
            why = os.strerror(code) if code > 0 else exc.strerror or exc
            raise OSError(f"--metrics {where}: {why}") from None
        addr = self._server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await close_connections(self._conns)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_ = [w for w in self._conns.values() if not w.is_closing()]
        if len(open_) >= MAX_CLIENTS:
            open_[0].close()  # the oldest: its handler sees EOF and ends
        with tracked(self._conns, writer):
            await self._respond(reader, writer)

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except asyncio.LimitOverrunError:
                await _reply(writer, "431 Request Header Fields Too Large",
                             b"request head too long\n")
                await _linger(reader, writer)
                return
            except (asyncio.IncompleteReadError, asyncio.TimeoutError):
                return
            request_line = head.split(b"\r\n", 1)[0].split(b" ")
            if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/1."):
                await _reply(writer, "400 Bad Request", b"not an HTTP/1 request\n")
            elif request_line[0] not in (b"GET", b"HEAD"):
                await _reply(writer, "405 Method Not Allowed", b"GET or HEAD only\n",
                             extra="Allow: GET, HEAD\r\n")  # RFC 9110 15.5.6
            elif (path := request_line[1].split(b"?", 1)[0]) == b"/healthz":
                why = self.health()
                await _reply(writer, "200 OK" if why is None else "503 Service Unavailable",
                             b"ok\n" if why is None else why.encode() + b"\n",
                             head_only=request_line[0] == b"HEAD")
            elif path != b"/metrics":
                await _reply(writer, "404 Not Found", b"see /metrics\n")
            else:
                await _reply(writer, "200 OK", await self.render(), CONTENT_TYPE,
                             head_only=request_line[0] == b"HEAD")
            await _linger(reader, writer)
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("serving /metrics failed")
