# cython: language_level=3
"""The per-read hot loop: take one read, hand it to every receiver.

Only this loop is compiled. ``Relay`` is the base of every session: it holds
the fields the loop reads and writes on each read (as C fields, so a read
allocates no float or int objects) and the two callbacks uvloop makes per read,
``get_buffer`` and ``buffer_updated``, so that a live session's read runs no
Python frame at all while its route stays the same. Everything else (the
handshake, held bytes, other workers, backpressure) is the session's own
Python code, which this calls when a read needs it. A bulk stream to a single
local receiver skips the read altogether: ``get_buffer`` splices it through a
pipe first (docs/ARCHITECTURE.md, "Bulk pairs go through a pipe").

The pure-Python twin in _fastcopy_py.py has the same contract and tests.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL

cdef extern from "<fcntl.h>" nogil:  # Python.h defines _GNU_SOURCE
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t n,
                   unsigned int flags)
    int fcntl(int fd, int cmd, ...)
    unsigned int SPLICE_F_MOVE
    unsigned int SPLICE_F_NONBLOCK
    int F_SETPIPE_SZ
    int F_GETPIPE_SZ
    int O_NONBLOCK
    int O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int pipe2(int fds[2], int flags)
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t n)


# What the sessions of this process share (one worker, one event loop): set by bind().
cdef bytearray _buf = None
cdef object _view = None
cdef object _small = None
cdef object _router = None
cdef list _full = None  # _send_view's second result: receivers above their mark
cdef Py_ssize_t _splice_min = 0
cdef int _pipes_left = 0
cdef Py_ssize_t _round = 0  # bytes per splice round: one read's worth

cdef enum:
    # A pipe the kernel will not make this big is not worth a splice round.
    _PIPE_MIN = 64 << 10
    # Bytes spliced per readiness event at most, so one stream cannot hold the loop.
    _ROUND_MAX = 4 << 20


cdef inline double _now() noexcept nogil:
    """loop.time() without a Python call or a float object: uvloop's and
    asyncio's loop.time() both read CLOCK_MONOTONIC, so the two compare."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def bind(bytearray buf, Py_ssize_t small, object router, Py_ssize_t splice_min=0,
         int pipes=0):
    """Give this process's sessions their read buffer (``small``: how much of it
    a session that is not live yet may fill) and routing table. A
    session whose read brings ``splice_min`` bytes or more (0: never) for one
    local receiver gets a pipe, while fewer than ``pipes`` are open here, and
    from then on its bytes go to that receiver by splice(2), a read's worth
    (``len(buf)``) per round: what a receiver does not take is queued, as
    much as one read would have queued."""
    global _buf, _view, _small, _router, _splice_min, _pipes_left, _round
    _buf = buf
    _round = len(buf)
    _view = memoryview(buf)
    _small = _view[:small]
    _router = router
    _splice_min = splice_min
    _pipes_left = pipes


cdef class Relay:
    """What the hot path touches of a session, and its read callbacks."""

    cdef public object hub
    cdef public object transport
    cdef object _route  # cached; valid while its generation is the router's
    # What the loop reads of _route, as C fields (set with it by _fresh_route).
    cdef Py_ssize_t _generation
    cdef tuple _targets
    cdef bint _local
    cdef public int fd
    cdef public double last_active
    cdef public long long bytes_in
    cdef public long long bytes_out
    cdef public bint writing_paused
    cdef public bint live
    cdef public bint bulk  # a read of splice_min or more went to one receiver
    cdef public int pipe_r
    cdef public int pipe_w

    def __cinit__(self):
        self.pipe_r = self.pipe_w = -1

    @property
    def route(self):
        return self._route

    @route.setter
    def route(self, value):
        # None when the session ends: it names other sessions, let them go.
        self._route = value
        self._targets = value.targets if value is not None else None
        self._local = value is not None and value.local
        self._generation = value.generation if value is not None else -1

    def get_buffer(self, Py_ssize_t sizehint):
        # Before a session is live, small reads: what follows hs3 in the same
        # read must fit into a hand-off message if the session moves.
        if not self.live:
            return _small
        if self.bulk and self._splice():
            # The receiver queued part of a round: until the pause that follows
            # (see _splice) the read libuv makes now may add only a little.
            return _small
        return _view

    def buffer_updated(self, Py_ssize_t nbytes):
        if not self.live:
            self._read_early(nbytes)
            return
        global _full
        cdef double now = _now()
        self.last_active = now
        self.bytes_in += nbytes
        self._fresh_route()
        chunk = _send_view(_buf, nbytes, self._targets, self, now)
        if _full is not None or not self._local:
            full, _full = _full, None
            self._route_rest(self._route, chunk, nbytes, now, full)
        elif chunk is not None:
            self._queued(self._route, chunk, nbytes, now)
        if _splice_min and nbytes >= _splice_min and not self.bulk:
            self.bulk = _single(self._route, self) is not None

    cdef inline void _fresh_route(self) except *:
        if self._route is None or self._generation != _router.generation:
            self.route = _router.route(self)

    cdef bint _splice(self) except -1:
        """Move what the socket holds to the one receiver through a pipe, with
        no copy to user space, before uvloop's read (which then finds little
        or nothing). Only while that receiver's transport has nothing queued;
        what the receiver does not take is read back out of the pipe and
        queued like any partial write, so the pipe is empty between events.
        Rounds go on only while each brings splice_min bytes or more: small
        rounds cost more than the copy (a 64 B message stream made 20-40
        splice calls per event), so a session whose rounds shrink goes back
        to plain reads until one brings splice_min again."""
        self._fresh_route()
        cdef Relay t = _single(self._route, self)
        if t is None or t.writing_paused or t.transport.get_write_buffer_size():
            return False
        if self.pipe_w < 0 and not self._open_pipe():
            self.bulk = False
            return False
        cdef ssize_t n, m, left = 0
        cdef Py_ssize_t moved = 0
        cdef unsigned int flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
        while moved < _ROUND_MAX:
            n = splice(self.fd, NULL, self.pipe_w, NULL, _round, flags)
            if n <= 0:  # empty, EOF or an error: uvloop's read finds out which
                break
            moved += n
            left = n
            while left > 0:
                m = splice(self.pipe_r, NULL, t.fd, NULL, left, flags)
                if m <= 0:
                    break
                left -= m
            if left or n < _splice_min:  # the receiver is full, or this is no bulk now
                break
        if not moved:
            return False
        if moved < _splice_min:  # a trickle: plain reads again, until a big one
            self.bulk = False
        cdef double now = _now()
        self.last_active = t.last_active = now
        self.bytes_in += moved
        t.bytes_out += moved
        if left:
            rest = self._drain_pipe(left)
            t.transport.write(rest)
            # Its backpressure may pause this sender, which libuv must not see
            # from inside its buffer callback (it would call a cleared read
            # callback): apply it right after.
            self.hub.loop.call_soon(self._spliced_rest, t, rest, now)
            return True
        return False

    cdef bint _open_pipe(self):
        global _pipes_left
        cdef int fds[2]
        if _pipes_left <= 0 or pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            return False
        fcntl(fds[1], F_SETPIPE_SZ, <int>_round)  # refused beyond the user's quota
        if fcntl(fds[1], F_GETPIPE_SZ) < min(_round, _PIPE_MIN):
            close(fds[0])
            close(fds[1])
            return False
        self.pipe_r, self.pipe_w = fds[0], fds[1]
        _pipes_left -= 1
        return True

    cdef bytes _drain_pipe(self, Py_ssize_t n):
        cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
        cdef char *p = out
        cdef Py_ssize_t got = 0
        cdef ssize_t r
        while got < n:
            r = read(self.pipe_r, p + got, n - got)
            if r <= 0:  # cannot happen: the pipe holds n bytes
                raise OSError("pipe drained short")
            got += r
        return out

    def close_pipe(self):
        """The session is over: give its pipe back."""
        global _pipes_left
        self.bulk = False
        if self.pipe_r >= 0:
            close(self.pipe_r)
            close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1
            _pipes_left += 1


cdef Relay _single(object route, object sender):
    """The one local receiver of a route that reaches nothing else, or None."""
    if not route.local:
        return None
    cdef Relay found = None
    for obj in route.targets:
        if obj is sender:
            continue
        if found is not None:
            return None
        found = <Relay?>obj
    return found


def fanout(bytes chunk, tuple targets, object sender, double now):
    """Write ``chunk`` to each target but ``sender``; return the targets that
    are now above their high-water mark (None when there are none)."""
    cdef list full = None
    cdef Relay t
    for obj in targets:
        if obj is sender:
            continue
        t = <Relay?>obj
        t.transport.write(chunk)
        t.last_active = now
        t.bytes_out += len(chunk)
        if t.writing_paused:
            if full is None:
                full = []
            full.append(t)
    return full


def send_view(bytearray buf, Py_ssize_t n, tuple targets, object sender, double now):
    """Send ``buf[:n]`` to each target but ``sender`` straight from the read
    buffer: a receiver whose transport has nothing queued gets a plain
    non-blocking send(), with no copy. Only what a socket does not take is
    copied, once, into a bytes chunk that every such receiver shares (their
    transports queue it). Returns (targets now above their high-water mark or
    None, that chunk or None)."""
    global _full
    chunk = _send_view(buf, n, targets, sender, now)
    full, _full = _full, None
    return full, chunk


cdef object _send_view(bytearray buf, Py_ssize_t n, tuple targets, object sender, double now):
    """send_view, with no result tuple: the chunk is returned, the full
    receivers are left in _full (None when there are none)."""
    global _full
    cdef const char *ptr = buf
    cdef list full = None
    cdef object chunk = None
    cdef Relay t
    cdef object transport
    cdef ssize_t sent
    for obj in targets:
        if obj is sender:
            continue
        t = <Relay?>obj
        t.last_active = now
        t.bytes_out += n
        transport = t.transport
        sent = 0
        if transport.get_write_buffer_size() == 0:
            sent = send(t.fd, ptr, n, MSG_DONTWAIT | MSG_NOSIGNAL)
            if sent == n:
                continue
            if sent < 0:  # EAGAIN, or an error the transport will meet and report
                sent = 0
        if chunk is None:
            chunk = PyBytes_FromStringAndSize(ptr, n)
        transport.write(chunk if sent == 0 else chunk[sent:])
        if t.writing_paused:
            if full is None:
                full = []
            full.append(t)
    _full = full
    return chunk
