"""Pure-Python twin of ``_fastcopy.pyx``, for debugging and for machines
without a C compiler (select it with ``FWD_PURE_PYTHON=1``)."""
from __future__ import annotations

import ctypes
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
_tee = False
_meter: Any = None  # --max-rate (see bind)
_scratch: tuple[int, int] | None = None  # (read end, write end), see _fastcopy.pyx
_libc = ctypes.CDLL(None, use_errno=True)  # os has splice() but no tee()
_libc.tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
_libc.tee.restype = ctypes.c_ssize_t


def bind(buf: bytearray, small: int, router: Any, splice_min: int = 0, pipes: int = 0,
         tee: bool = False, offer: Any = None, meter: Any = None) -> None:
    """Give this process's sessions their read buffer (``small``: how much of it
    a session that is not live yet may fill) and routing table. A
    session whose read brings ``splice_min`` bytes or more (0: never) for one
    local receiver, or with ``tee`` for several, gets a pipe, while fewer than
    ``pipes`` are open here, and from then on its bytes go to those receivers
    by splice(2), a read's worth (``len(buf)``) per round: what a receiver
    does not take is queued, as much as one read would have queued. There
    are no pumps here (fastpath.Pump is None), so ``offer`` is never called.
    ``meter(session, nbytes, now, inside=False)``, if given, is told of every
    live read and splice round after its bytes went out (--max-rate; see
    _fastcopy.pyx)."""
    global _buf, _view, _small, _router, _splice_min, _pipes_left, _round, _tee, _meter
    _buf, _view = buf, memoryview(buf)
    _round = len(buf)
    _small = _view[:small]
    _router = router
    _splice_min, _pipes_left, _tee, _meter = splice_min, pipes, tee, meter


def _receivers(route: Any, sender: Any, ready: bool) -> tuple[list[Any], bool] | None:
    """The local receivers of a route, if a splice round may serve them (see
    _fastcopy.pyx), and whether the rest of the route needs a copy."""
    keep = not route.local and not sender.hub.all_local(route)
    rx = [t for t in route.targets if t is not sender]
    if not rx or ((len(rx) > 1 or keep) and not _tee):
        return None
    if ready and all(t.transport.get_write_buffer_size() for t in rx):
        return None
    return rx, keep


class Relay:
    """What the hot path touches of a session, and its read callbacks."""

    # Session.__init__ sets every one of these (the compiled class starts them
    # at zero, None and False).
    __slots__ = ("hub", "transport", "route", "fd", "last_active", "bytes_in", "bytes_out",
                 "writing_paused", "live", "bulk", "pipe_r", "pipe_w", "unsent", "pump_wait",
                 "peer_reset")
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
    unsent: tuple[Any, bytes, float, list[Any]] | None
    pump_wait: bool  # no pumps here: kept for the same contract
    peer_reset: bool  # see _fastcopy.pyx

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
        if self.unsent is not None:
            self.flush_rest()
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
            self.bulk = _receivers(route, self, False) is not None
        if _meter is not None:
            _meter(self, nbytes, now)

    def _splice(self) -> bool:
        if self.unsent is not None:  # not expected: buffer_updated delivers it
            return False
        route = self.route
        if route is None or route.generation != _router.generation:
            route = self.route = _router.route(self)
        found = _receivers(route, self, True)
        if found is None:
            return False
        rx, keep = found
        if self.pipe_w < 0 and not self._open_pipe():
            self.bulk = False
            return False
        if (len(rx) > 1 or keep) and _scratch is None and not _open_scratch():
            self.bulk = False
            return False
        moved = 0
        queued = None
        if _meter is not None and _meter(self, 0, _now(), True):  # see _fastcopy.pyx
            return False
        want = _round if _meter is None else max(_round - len(_small), 1)  # see _fastcopy.pyx
        while moved * len(rx) < ROUND_MAX:
            try:
                n = os.splice(self.fd, self.pipe_w, want, flags=_FLAGS)
            except OSError:  # empty or an error: uvloop's read finds out which
                break
            if not n:  # EOF: uvloop's read sees it too
                break
            moved += n
            queued, kept = _spread(self.pipe_r, n, rx, keep)
            if queued is not None or n < _splice_min or keep or _meter is not None:
                break  # see _fastcopy.pyx
        if not moved:
            return False
        if moved < _splice_min:  # a trickle: plain reads again, until a big one
            self.bulk = False
        now = _now()
        self.last_active = now
        self.bytes_in += moved
        for t in rx:
            t.last_active = now
            t.bytes_out += moved
        if _meter is not None:
            _meter(self, moved, now, True)
        if keep:
            assert kept is not None
            self.unsent = (route, kept, now, rx)
            self.hub.loop.call_soon(self.flush_rest)  # see _fastcopy.pyx
        if queued is None:
            return True
        for t, rest in queued:
            t.transport.write(rest)
            # Not from inside uvloop's buffer callback: see _fastcopy.pyx.
            self.hub.loop.call_soon(self._spliced_rest, t, rest, now)  # type: ignore[attr-defined]
        return True

    def flush_rest(self) -> None:
        """Give the last spliced round to the rest of its route: other
        workers, held bytes, clients in their sniff window."""
        unsent = self.unsent
        if unsent is not None:
            self.unsent = None
            route, chunk, now, served = unsent
            self._route_unsent(route, chunk, now, served)  # type: ignore[attr-defined]

    def _open_pipe(self) -> bool:
        fds = _new_pipe()
        if fds is None:
            return False
        self.pipe_r, self.pipe_w = fds
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


def _new_pipe() -> tuple[int, int] | None:
    """A pipe of one round's size, out of this process's budget."""
    global _pipes_left
    if _pipes_left <= 0:
        return None
    try:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _round)
    except OSError:  # refused beyond the user's quota
        pass
    if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) < min(_round, PIPE_MIN):
        os.close(r)
        os.close(w)
        return None
    _pipes_left -= 1
    return r, w


def _open_scratch() -> bool:
    """The worker's one scratch pipe, for tee(2): kept for the process's life."""
    global _scratch
    _scratch = _new_pipe()
    return _scratch is not None


def _spread(src: int, n: int, rx: list[Any], keep: bool
            ) -> tuple[list[tuple[Any, bytes]] | None, bytes | None]:
    """Send the ``n`` bytes in pipe ``src`` to every receiver of ``rx`` and
    leave the pipe empty (see _fastcopy.pyx): tee(2) for all but the last,
    bytes queued behind what a receiver has queued, one shared copy for the
    receivers that take none of the round and, with ``keep``, for the rest of
    the route. Returns (what to queue or None, that copy or None)."""
    queued: list[tuple[Any, bytes]] = []
    shared = None
    k = len(rx)

    def copied(i: int) -> tuple[list[tuple[Any, bytes]], bytes]:
        # tee fell short (not expected): the rest get the round copied once
        nonlocal shared
        if shared is None:
            shared = _read_exactly(src, n)
        else:
            _read_exactly(src, n)
        queued.extend((r, shared) for r in rx[i:])
        return queued, shared

    if keep:
        teed = _tee_scratch(src, n)
        if teed is None:
            return copied(0)
        shared = _read_exactly(teed, n)
    for i, t in enumerate(rx):
        busy = t.transport.get_write_buffer_size() > 0
        fd = src
        if i < k - 1 and not (busy and shared is not None):
            teed = _tee_scratch(src, n)
            if teed is None:
                return copied(i)
            fd = teed
        if busy:
            if shared is None:
                shared = _read_exactly(fd, n)
            elif i == k - 1:
                _read_exactly(src, n)  # src must end empty
            queued.append((t, shared))
            continue
        left = n
        gone = False
        while left:
            try:
                m = os.splice(fd, t.fd, left, flags=_FLAGS)
            except (BrokenPipeError, ConnectionResetError):
                gone = True  # see _fastcopy.pyx _gone
                t.peer_reset = True
                t.hub.loop.call_soon(t.peer_gone)
                break
            except OSError:
                break
            if not m:
                break
            left -= m
        if not left:
            continue
        if gone:
            _read_exactly(fd, left)
            t.bytes_out -= left  # the caller counts the whole round as sent
            t.hub.drop("discarded", left)
            continue
        if left < n:
            rest = _read_exactly(fd, left)
        elif shared is None:
            rest = shared = _read_exactly(fd, n)
        else:
            _read_exactly(fd, n)
            rest = shared
        queued.append((t, rest))
    return queued or None, shared


def _tee_scratch(src: int, n: int) -> int | None:
    """Duplicate the ``n`` bytes in pipe ``src`` into the empty scratch pipe
    and return its read end; None (and the scratch pipe empty again) if
    tee(2) falls short."""
    assert _scratch is not None
    c = _libc.tee(src, _scratch[1], n, os.SPLICE_F_NONBLOCK)
    if c == n:
        return _scratch[0]
    if c > 0:
        _read_exactly(_scratch[0], c)
    return None


def _read_exactly(fd: int, n: int) -> bytes:
    """The ``n`` bytes a pipe holds."""
    out = b""
    while len(out) < n:
        part = os.read(fd, n - len(out))
        if not part:  # cannot happen: the pipe holds n bytes
            raise OSError("pipe drained short")
        out += part
    return out


def _send_first(t: Any, data: bytes | memoryview, n: int) -> int:
    """See _fastcopy.pyx: what a plain send took, or -1 if the peer reset."""
    try:
        return os.write(t.fd, data)
    except (BrokenPipeError, ConnectionResetError):  # see _fastcopy.pyx _gone
        t.bytes_out -= n
        t.hub.drop("discarded", n)
        t.peer_reset = True
        t.hub.loop.call_soon(t.peer_gone)
        return -1
    except OSError:  # EAGAIN
        return 0


def fanout(chunk: bytes, targets: tuple[Any, ...], sender: Any, now: float) -> list[Any] | None:
    """Write ``chunk`` to each target but ``sender``; return the targets that
    are now above their high-water mark (None when there are none)."""
    full = None
    n = len(chunk)
    for t in targets:
        if t is sender:
            continue
        t.last_active = now
        t.bytes_out += n
        transport = t.transport
        sent = _send_first(t, chunk, n) if transport.get_write_buffer_size() == 0 else 0
        if sent == n or sent < 0:
            continue
        transport.write(chunk if sent == 0 else memoryview(chunk)[sent:])
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
        sent = _send_first(t, view, n) if transport.get_write_buffer_size() == 0 else 0
        if sent == n or sent < 0:
            continue
        if chunk is None:
            chunk = bytes(view)
        transport.write(chunk if sent == 0 else memoryview(chunk)[sent:])
        if t.writing_paused:
            if full is None:
                full = []
            full.append(t)
    return full, chunk
