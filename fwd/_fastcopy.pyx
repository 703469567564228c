# cython: language_level=3
"""The per-read hot loop: take one read, hand it to every receiver.

Only this loop is compiled. ``Relay`` is the base of every session: it holds
the fields the loop reads and writes on each read (as C fields, so a read
allocates no float or int objects) and the two callbacks uvloop makes per read,
``get_buffer`` and ``buffer_updated``, so that a live session's read runs no
Python frame at all while its route stays the same. Everything else (the
handshake, held bytes, other workers, backpressure) is the session's own
Python code, which this calls when a read needs it.

The pure-Python twin in _fastcopy_py.py has the same contract and tests.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL


# What the sessions of this process share (one worker, one event loop): set by bind().
cdef bytearray _buf = None
cdef object _view = None
cdef object _small = None
cdef object _router = None
cdef object _clock = None


def bind(bytearray buf, Py_ssize_t small, object router, object clock):
    """Give this process's sessions their read buffer (``small``: how much of it
    a session that is not live yet may fill), routing table and clock."""
    global _buf, _view, _small, _router, _clock
    _buf = buf
    _view = memoryview(buf)
    _small = _view[:small]
    _router = router
    _clock = clock


cdef class Relay:
    """What the hot path touches of a session, and its read callbacks."""

    cdef public object hub
    cdef public object transport
    cdef public object route  # cached; valid while its generation is the router's
    cdef public int fd
    cdef public double last_active
    cdef public long long bytes_in
    cdef public long long bytes_out
    cdef public bint writing_paused
    cdef public bint live

    def get_buffer(self, Py_ssize_t sizehint):
        # Before a session is live, small reads: what follows hs3 in the same
        # read must fit into a hand-off message if the session moves.
        return _view if self.live else _small

    def buffer_updated(self, Py_ssize_t nbytes):
        if not self.live:
            self._read_early(nbytes)
            return
        cdef double now = _clock()
        self.last_active = now
        self.bytes_in += nbytes
        route = self.route
        if route is None or route.generation != _router.generation:
            route = self.route = _router.route(self)
        full, chunk = _send_view(_buf, nbytes, route.targets, self, now)
        if full is not None or not route.local:
            self._route_rest(route, chunk, nbytes, now, full)
        elif chunk is not None:
            self._queued(route, chunk, nbytes, now)


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
    return _send_view(buf, n, targets, sender, now)


cdef tuple _send_view(bytearray buf, Py_ssize_t n, tuple targets, object sender, double now):
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
    return full, chunk
