"""Pure-Python twin of ``_fastcopy.pyx``, for debugging and for machines
without a C compiler (select it with ``FWD_PURE_PYTHON=1``)."""
from __future__ import annotations

import fcntl
import os
import time
from typing import Any

PIPE_MIN = 64 << 10  # a smaller pipe is not worth a splice round
ROUND_MAX = 4 << 20  # bytes spliced per readiness event at most
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

_buf = bytearray()
_view = memoryview(_buf)
_small = _view
_router: Any = None
_now = time.monotonic  # the clock under loop.time(), uvloop's and asyncio's
_splice_min = 0
_pipes_left = 0
_round = 0


def bind(buf: bytearray, small: int, router: Any, splice_min: int = 0, pipes: int = 0) -> None:
    """Give this process's sessions their read buffer (``small``: how much of it
    a session that is not live yet may fill) and routing table. A
    session whose read brings ``splice_min`` bytes or more (0: never) for one
    local receiver gets a pipe, while fewer than ``pipes`` are open here, and
    from then on its bytes go to that receiver by splice(2), a read's worth
    (``len(buf)``) per round: what a receiver does not take is queued, as
    much as one read would have queued."""
    global _buf, _view, _small, _router, _splice_min, _pipes_left, _round
    _buf, _view = buf, memoryview(buf)
    _round = len(buf)
    _small = _view[:small]
    _router = router
    _splice_min, _pipes_left = splice_min, pipes


def _single(route: Any, sender: Any) -> Any:
    """The one local receiver of a route that reaches nothing else, or None."""
    if not route.local:
        return None
    found = None
    for t in route.targets:
        if t is sender:
            continue
        if found is not None:
            return None
        found = t
    return found


class Relay:
    """What the hot path touches of a session, and its read callbacks."""

    # Session.__init__ sets every one of these (the compiled class starts them
    # at zero, None and False).
    __slots__ = ("hub", "transport", "route", "fd", "last_active", "bytes_in", "bytes_out",
                 "writing_paused", "live", "bulk", "pipe_r", "pipe_w")
    hub: Any
    transport: Any
    route: Any
    fd: int
    last_active: float
    bytes_in: int
    bytes_out: int
    writing_paused: bool
    live: bool
    bulk: bool
    pipe_r: int
    pipe_w: int

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self.live:
            return _small
        if self.bulk and self._splice():
            return _small  # see _fastcopy.pyx
        return _view

    def buffer_updated(self, nbytes: int) -> None:
        if not self.live:
            self._read_early(nbytes)  # type: ignore[attr-defined]
            return
        now = _now()
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
        if _splice_min and nbytes >= _splice_min and not self.bulk:
            self.bulk = _single(route, self) is not None

    def _splice(self) -> bool:
        route = self.route
        if route is None or route.generation != _router.generation:
            route = self.route = _router.route(self)
        t = _single(route, self)
        if t is None or t.writing_paused or t.transport.get_write_buffer_size():
            return False
        if self.pipe_w < 0 and not self._open_pipe():
            self.bulk = False
            return False
        moved = left = 0
        while moved < ROUND_MAX:
            try:
                n = os.splice(self.fd, self.pipe_w, _round, flags=_FLAGS)
            except OSError:  # empty or an error: uvloop's read finds out which
                break
            if not n:  # EOF: uvloop's read sees it too
                break
            moved += n
            left = n
            while left:
                try:
                    m = os.splice(self.pipe_r, t.fd, left, flags=_FLAGS)
                except OSError:
                    break
                if not m:
                    break
                left -= m
            if left or n < _splice_min:  # the receiver is full, or this is no bulk now
                break
        if not moved:
            return False
        if moved < _splice_min:  # a trickle: plain reads again, until a big one
            self.bulk = False
        now = _now()
        self.last_active = t.last_active = now
        self.bytes_in += moved
        t.bytes_out += moved
        if left:
            rest = b""
            while len(rest) < left:  # the pipe holds exactly ``left`` bytes
                rest += os.read(self.pipe_r, left - len(rest))
            t.transport.write(rest)
            # Not from inside uvloop's buffer callback: see _fastcopy.pyx.
            self.hub.loop.call_soon(self._spliced_rest, t, rest, now)  # type: ignore[attr-defined]
            return True
        return False

    def _open_pipe(self) -> bool:
        global _pipes_left
        if _pipes_left <= 0:
            return False
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _round)
        except OSError:  # refused beyond the user's quota
            pass
        if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) < min(_round, PIPE_MIN):
            os.close(r)
            os.close(w)
            return False
        self.pipe_r, self.pipe_w = r, w
        _pipes_left -= 1
        return True

    def close_pipe(self) -> None:
        """The session is over: give its pipe back."""
        global _pipes_left
        self.bulk = False
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1
            _pipes_left += 1


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
