"""Pure-Python twin of ``_fastcopy.pyx``, for debugging and for machines
without a C compiler (select it with ``FWD_PURE_PYTHON=1``)."""
from __future__ import annotations

import os
from typing import Any

_buf = bytearray()
_view = memoryview(_buf)
_small = _view
_router: Any = None
_clock: Any = None


def bind(buf: bytearray, small: int, router: Any, clock: Any) -> None:
    """Give this process's sessions their read buffer (``small``: how much of it
    a session that is not live yet may fill), routing table and clock."""
    global _buf, _view, _small, _router, _clock
    _buf, _view = buf, memoryview(buf)
    _small = _view[:small]
    _router, _clock = router, clock


class Relay:
    """What the hot path touches of a session, and its read callbacks."""

    # Session.__init__ sets every one of these (the compiled class starts them
    # at zero, None and False).
    __slots__ = ("hub", "transport", "route", "fd", "last_active", "bytes_in", "bytes_out",
                 "writing_paused", "live")
    hub: Any
    transport: Any
    route: Any
    fd: int
    last_active: float
    bytes_in: int
    bytes_out: int
    writing_paused: bool
    live: bool

    def get_buffer(self, sizehint: int) -> memoryview:
        return _view if self.live else _small

    def buffer_updated(self, nbytes: int) -> None:
        if not self.live:
            self._read_early(nbytes)  # type: ignore[attr-defined]
            return
        now = _clock()
        self.last_active = now
        self.bytes_in += nbytes
        route = self.route
        if route is None or route.generation != _router.generation:
            route = self.route = _router.route(self)
        full, chunk = send_view(_buf, nbytes, route.targets, self, now)
        if full is not None or not route.local:
            self._route_rest(route, chunk, nbytes, now, full)  # type: ignore[attr-defined]
        elif chunk is not None:
            self._queued(route, chunk, nbytes, now)  # type: ignore[attr-defined]


def fanout(chunk: bytes, targets: tuple[Any, ...], sender: Any, now: float) -> list[Any] | None:
    """Write ``chunk`` to each target but ``sender``; return the targets that
    are now above their high-water mark (None when there are none)."""
    full = None
    for t in targets:
        if t is sender:
            continue
        t.transport.write(chunk)
        t.last_active = now
        t.bytes_out += len(chunk)
        if t.writing_paused:
            if full is None:
                full = []
            full.append(t)
    return full


def send_view(buf: bytearray, n: int, targets: tuple[Any, ...], sender: Any,
              now: float) -> tuple[list[Any] | None, bytes | None]:
    """Send ``buf[:n]`` to each target but ``sender`` straight from the read
    buffer when its transport has nothing queued; what a socket does not take
    is copied once into a bytes chunk shared by the transports that queue it.
    Returns (targets now above their high-water mark or None, that chunk or None)."""
    view = memoryview(buf)[:n]
    full = None
    chunk = None
    for t in targets:
        if t is sender:
            continue
        t.last_active = now
        t.bytes_out += n
        transport = t.transport
        sent = 0
        if transport.get_write_buffer_size() == 0:
            try:
                sent = os.write(t.fd, view)
            except OSError:  # EAGAIN, or an error the transport will meet and report
                sent = 0
            if sent == n:
                continue
        if chunk is None:
            chunk = bytes(view)
        transport.write(chunk if sent == 0 else chunk[sent:])
        if t.writing_paused:
            if full is None:
                full = []
            full.append(t)
    return full, chunk
