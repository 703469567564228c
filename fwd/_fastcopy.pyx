# cython: language_level=3
"""The per-read hot loop: take one read, hand it to every receiver.

Only this loop is compiled. ``Relay`` is the base of every session: it holds
the fields the loop reads and writes on each read (as C fields, so a read
allocates no float or int objects) and the two callbacks uvloop makes per read,
``get_buffer`` and ``buffer_updated``, so that a live session's read runs no
Python frame at all while its route stays the same. Everything else (the
handshake, held bytes, other workers, backpressure) is the session's own
Python code, which this calls when a read needs it. A bulk stream to local
receivers skips the read altogether: ``get_buffer`` splices it through a pipe
first, and tee(2) gives each further receiver the same pages
(docs/ARCHITECTURE.md, "Bulk streams go through a pipe").

The pure-Python twin in _fastcopy_py.py has the same contract and tests.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport ECONNRESET, EPIPE, errno
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL

cdef extern from "<fcntl.h>" nogil:  # Python.h defines _GNU_SOURCE
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out, size_t n,
                   unsigned int flags)
    ssize_t tee(int fd_in, int fd_out, size_t n, unsigned int flags)
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
cdef type _wbs_type = None  # the transport type whose get_write_buffer_size is _wbs
cdef object _wbs = None
cdef long long _no_generation = 0
cdef long long *_generation = &_no_generation  # the router's generation_cell
cdef object _generation_view = None  # keeps that cell's buffer exported
cdef list _full = None  # _send_view's second result: receivers above their mark
cdef Py_ssize_t _splice_min = 0
cdef int _pipes_left = 0
cdef Py_ssize_t _round = 0  # bytes per splice round: one read's worth
cdef Py_ssize_t _metered_round = 0  # with a meter: the round and the small read after it
cdef bint _tee = False  # fan-out rounds too (see bind)
cdef bint _keeps = False  # _receivers' second result: the route reaches more than them
cdef object _kept = None  # _spread's second result: the round as bytes, if asked for
cdef int _scratch_r = -1  # the pipe tee(2) fills for one receiver at a time
cdef int _scratch_w = -1
cdef object _offer = None  # called soon after a clean pair round (see bind)
cdef object _meter = None  # --max-rate: told of every live read (see bind)

cdef enum:
    # A pipe the kernel will not make this big is not worth a splice round.
    _PIPE_MIN = 64 << 10
    # Bytes spliced per readiness event at most, so one stream cannot hold the loop.
    _ROUND_MAX = 4 << 20
    # Reads that went whole to one local receiver before the pair is offered
    # to a Pump for its small rounds: a pair that lives that long (an
    # interactive session, a stream of messages) gains the threads' shorter
    # path; a pair that only swaps a request and an answer pays no thread.
    _PUMP_READS = 64


PUMP_READS = _PUMP_READS


cdef inline double _now() noexcept nogil:
    """loop.time() without a Python call or a float object: uvloop's and
    asyncio's loop.time() both read CLOCK_MONOTONIC, so the two compare."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def bind(bytearray buf, Py_ssize_t small, object router, Py_ssize_t splice_min=0,
         int pipes=0, bint tee=False, object offer=None, object meter=None):
    """Give this process's sessions their read buffer (``small``: how much of it
    a session that is not live yet may fill) and routing table. A
    session whose read brings ``splice_min`` bytes or more (0: never) for one
    local receiver, or with ``tee`` for several, gets a pipe, while fewer than
    ``pipes`` are open here, and from then on its bytes go to those receivers
    by splice(2), a read's worth (``len(buf)``) per round: what a receiver
    does not take is queued, as much as one read would have queued. After
    a round that went whole to the one receiver, ``offer(session)`` is called
    soon, unless the session's ``pump_wait`` is set (which this sets, and the
    offer clears when it may come again): it may hand the pair to a Pump.
    ``meter(session, nbytes, now, inside=False)``, if given, is told of every
    live read and splice round after its bytes went out (--max-rate; it may
    pause the session, and says whether the session is in debt); a metered
    session splices one round per event, and none while in debt."""
    global _buf, _view, _small, _router, _splice_min, _pipes_left, _round, _tee, _offer, _meter
    global _generation, _generation_view, _metered_round
    cdef long long[::1] cell
    _buf = buf
    _round = len(buf)
    _view = memoryview(buf)
    _small = _view[:small]
    _metered_round = max(_round - small, 1)
    _router = router
    if router is None:
        _generation, _generation_view = &_no_generation, None
    else:
        cell = router.generation_cell  # exported: the array cannot move
        _generation, _generation_view = &cell[0], cell
    _splice_min = splice_min
    _pipes_left = pipes
    _tee = tee
    _offer = offer
    _meter = meter


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
    cdef public bint bulk  # a read of splice_min or more went to local receivers
    cdef public int pipe_r
    cdef public int pipe_w
    cdef public bint pump_wait  # offered, or refused for now (Pumps clears it)
    # A send to it met its peer's reset (_gone): set at once, not when
    # peer_gone runs, since its EOF may be read before that.
    cdef public bint peer_reset
    cdef int _whole_reads  # toward _PUMP_READS
    # A spliced round the rest of its route (other workers, held bytes) has
    # not had yet: (route, bytes, now), see flush_rest.
    cdef public object unsent

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
            # The read libuv makes now goes the copy path: after a round let it
            # take little. Rounds stop at 4 MiB with more in the socket (a full
            # read here was 7% of a 1->1 stream, copied), and a receiver that
            # queued part of a round may pause this sender right after.
            return _small
        return _view

    def buffer_updated(self, Py_ssize_t nbytes):
        if not self.live:
            self._read_early(nbytes)
            return
        if self.unsent is not None:
            self.flush_rest()
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
        elif _offer is not None and not self.pump_wait and len(self._targets) == 1:
            self._whole_reads += 1
            if self._whole_reads >= _PUMP_READS:
                self.pump_wait = True
                self.hub.loop.call_soon(_offer, self)
        if _splice_min and nbytes >= _splice_min and not self.bulk:
            self.bulk = _receivers(self._route, self, False) is not None
        if _meter is not None:
            _meter(self, nbytes, now)

    cdef inline void _fresh_route(self) except *:
        if self._route is None or self._generation != _generation[0]:
            self.route = _router.route(self)

    cdef bint _splice(self) except -1:
        """Move what the socket holds to the local receivers through a pipe,
        with no copy to user space, before uvloop's read (which then finds
        little or nothing). Only while one receiver at least has nothing
        queued; what one does not take is read back out of the pipe and
        queued like any partial write, so the pipes are empty between events,
        and the rest of the route gets a copy (flush_rest). Rounds go on
        only while each brings splice_min bytes or more: small rounds cost
        more than the copy (a 64 B message stream made 20-40 splice calls per
        event), so a session whose rounds shrink goes back to plain reads
        until one brings splice_min again."""
        global _kept
        if self.unsent is not None:  # not expected: buffer_updated delivers it
            return False
        self._fresh_route()
        cdef list rx = _receivers(self._route, self, True)
        if rx is None:
            return False
        cdef bint keep = _keeps
        if self.pipe_w < 0 and not self._open_pipe():
            self.bulk = False
            return False
        cdef Py_ssize_t k = len(rx)
        if (k > 1 or keep) and _scratch_w < 0 and not _open_scratch():
            self.bulk = False
            return False
        cdef ssize_t n
        cdef Py_ssize_t moved = 0
        cdef list queued = None
        # In debt: the plain read that follows pauses it (--max-rate).
        if _meter is not None and _meter(self, 0, _now(), True):
            return False
        # Metered, the round and uvloop's small read after it are one read's
        # worth together: no more may overdraw the bucket.
        cdef Py_ssize_t want = _round if _meter is None else _metered_round
        while moved * k < _ROUND_MAX:
            n = splice(self.fd, NULL, self.pipe_w, NULL, want, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n <= 0:  # empty, EOF or an error: uvloop's read finds out which
                break
            moved += n
            queued = _spread(self.pipe_r, n, rx, keep)
            # A receiver is full, this is no bulk now, the rest of the route
            # must have this round before another, or the meter must see it.
            if queued is not None or n < _splice_min or keep or _meter is not None:
                break
        if not moved:
            return False
        if moved < _splice_min:  # a trickle: plain reads again, until a big one
            self.bulk = False
        cdef double now = _now()
        cdef Relay t
        self.last_active = now
        self.bytes_in += moved
        for obj in rx:
            t = <Relay>obj
            t.last_active = now
            t.bytes_out += moved
        if _meter is not None:
            _meter(self, moved, now, True)
        if keep:
            self.unsent, _kept = (self._route, _kept, now, rx), None
            # Before this session's next byte (buffer_updated, eof_received,
            # connection_lost flush it too), and where pausing is safe.
            self.hub.loop.call_soon(self.flush_rest)
        if queued is None:
            if _offer is not None and k == 1 and not keep and not self.pump_wait \
                    and moved >= _splice_min:
                self.pump_wait = True
                self.hub.loop.call_soon(_offer, self)
            return True
        for t, rest in queued:
            t.transport.write(rest)
            # Its backpressure may pause this sender, which libuv must not see
            # from inside its buffer callback (it would call a cleared read
            # callback): apply it right after.
            self.hub.loop.call_soon(self._spliced_rest, t, rest, now)
        return True

    def flush_rest(self):
        """Give the last spliced round to the rest of its route: other
        workers, held bytes, clients in their sniff window."""
        unsent = self.unsent
        if unsent is not None:
            self.unsent = None
            route, chunk, now, served = unsent
            self._route_unsent(route, chunk, now, served)

    cdef bint _open_pipe(self):
        cdef int fds[2]
        if not _new_pipe(fds):
            return False
        self.pipe_r, self.pipe_w = fds[0], fds[1]
        return True

    def close_pipe(self):
        """The session is over: give its pipe back."""
        global _pipes_left
        self.bulk = False
        if self.pipe_r >= 0:
            close(self.pipe_r)
            close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1
            _pipes_left += 1


cdef bint _new_pipe(int fds[2]):
    """A pipe of one round's size, out of this process's budget."""
    global _pipes_left
    if _pipes_left <= 0 or pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        return False
    fcntl(fds[1], F_SETPIPE_SZ, <int>_round)  # refused beyond the user's quota
    if fcntl(fds[1], F_GETPIPE_SZ) < min(_round, _PIPE_MIN):
        close(fds[0])
        close(fds[1])
        return False
    _pipes_left -= 1
    return True


cdef bint _open_scratch():
    """The worker's one scratch pipe, for tee(2): kept for the process's life."""
    global _scratch_r, _scratch_w
    cdef int fds[2]
    if not _new_pipe(fds):
        return False
    _scratch_r, _scratch_w = fds[0], fds[1]
    return True


cdef list _receivers(object route, Relay sender, bint ready):
    """The local receivers of a route, if a splice round may serve them (one
    that is all the route reaches, or with tee several, or some besides other
    workers or held bytes, which get a copy); with ``ready``, only if one of
    them at least has nothing queued (the others get their part queued behind
    what they have). None otherwise. Sets _keeps: the route needs a copy."""
    global _keeps
    _keeps = not route.local and not sender.hub.all_local(route)
    cdef list rx = []
    cdef bint idle = False
    cdef Relay t
    for obj in route.targets:
        if obj is sender:
            continue
        t = <Relay?>obj
        if ready and not idle:
            idle = not t.transport.get_write_buffer_size()
        rx.append(t)
    if not rx or ((len(rx) > 1 or _keeps) and not _tee) or (ready and not idle):
        return None
    return rx


cdef inline bint _gone(int err):
    """A send or splice to a receiver failed because its peer reset: drop the
    bytes instead of queueing them. A transport that tried to write them would
    close the socket at once, and what the receiver's kernel still holds from
    its client would be lost; its own reads get that first, then the EOF that
    sockopts.reset_by_peer tells from a FIN (docs/PROTOCOL.md §3.7). The
    receiver's ``peer_gone`` is told, for when no read will come."""
    return err == EPIPE or err == ECONNRESET


cdef list _spread(int src, ssize_t n, list rx, bint keep):
    """Send the ``n`` bytes in pipe ``src`` to every receiver of ``rx`` and
    leave the pipe empty: each but the last gets a tee(2) of them through the
    scratch pipe (the same pages, no copy), the last gets ``src`` itself. A
    receiver with bytes queued gets these queued behind them. Returns what
    must be queued, as (receiver, bytes) pairs, or None. The receivers that
    take none of the round share one bytes object, and so does the rest of
    the route with ``keep`` (left in _kept): one copy at most."""
    global _kept
    cdef list queued = None
    cdef object shared = None
    cdef object rest
    cdef Py_ssize_t i, k = len(rx)
    cdef ssize_t m, left
    cdef int fd
    cdef bint busy
    cdef Relay t
    if keep:
        shared = _tee_copy(src, n)
        if shared is None:
            return _copied(src, n, rx, 0, None, None)
    for i in range(k):
        t = <Relay>rx[i]
        busy = t.transport.get_write_buffer_size() > 0
        fd = src
        left = n
        if i < k - 1 and not (busy and shared is not None):
            if not _tee_scratch(src, n):
                return _copied(src, n, rx, i, shared, queued)
            fd = _scratch_r
        if busy:
            if shared is None:
                shared = _drain(fd, n)
            elif i == k - 1:
                _discard(src, n)  # src must end empty
            rest = shared
        else:
            while left > 0:
                m = splice(fd, NULL, t.fd, NULL, left, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                if m <= 0:
                    break
                left -= m
            if not left:
                continue
            if m < 0 and _gone(errno):
                _discard(fd, left)
                t.bytes_out -= left  # the caller counts the whole round as sent
                t.hub.drop("discarded", left)
                t.peer_reset = True
                t.hub.loop.call_soon(t.peer_gone)
                continue
            if left < n:
                rest = _drain(fd, left)
            elif shared is None:
                rest = shared = _drain(fd, n)
            else:
                _discard(fd, n)
                rest = shared
        if queued is None:
            queued = []
        queued.append((t, rest))
    _kept = shared
    return queued


cdef bint _tee_scratch(int src, ssize_t n) except -1:
    """Duplicate the ``n`` bytes in pipe ``src`` into the empty scratch pipe;
    False (and the scratch pipe empty again) if tee(2) falls short."""
    cdef ssize_t c = tee(src, _scratch_w, n, SPLICE_F_NONBLOCK)
    if c == n:
        return True
    if c > 0:
        _discard(_scratch_r, c)
    return False


cdef object _tee_copy(int src, ssize_t n):
    """The ``n`` bytes in pipe ``src`` as bytes, leaving them there; None if
    tee(2) falls short."""
    return _drain(_scratch_r, n) if _tee_scratch(src, n) else None


cdef list _copied(int src, ssize_t n, list rx, Py_ssize_t i, object shared, list queued):
    """tee(2) fell short (not expected: the scratch pipe is as big as ``src``
    and empty): the receivers from ``i`` on get the round queued, copied once."""
    global _kept
    if shared is None:
        shared = _drain(src, n)
    else:
        _discard(src, n)
    _kept = shared
    if queued is None:
        queued = []
    for obj in rx[i:]:
        queued.append((obj, shared))
    return queued


cdef bytes _drain(int fd, Py_ssize_t n):
    """The ``n`` bytes a pipe holds, as bytes."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    _read_exactly(fd, out, n)
    return out


cdef void _discard(int fd, Py_ssize_t n) except *:
    """Empty a pipe of its ``n`` bytes (into the read buffer, unused here)."""
    cdef char *p = _buf
    cdef Py_ssize_t step
    while n > 0:
        step = min(n, _round)
        _read_exactly(fd, p, step)
        n -= step


cdef void _read_exactly(int fd, char *p, Py_ssize_t n) except *:
    cdef Py_ssize_t got = 0
    cdef ssize_t r
    while got < n:
        r = read(fd, p + got, n - got)
        if r <= 0:  # cannot happen: the pipe holds n bytes
            raise OSError("pipe drained short")
        got += r


def fanout(bytes chunk, tuple targets, object sender, double now):
    """Write ``chunk`` to each target but ``sender``; return the targets that
    are now above their high-water mark (None when there are none). As in
    _send_view, a target with nothing queued gets a plain send() first, so
    that a reset peer is learnt here (_gone), not by its transport, which
    would close the socket before its reads got what its kernel holds."""
    cdef list full = None
    cdef Relay t
    cdef const char *ptr = chunk
    cdef Py_ssize_t n = len(chunk)
    cdef ssize_t sent
    for obj in targets:
        if obj is sender:
            continue
        t = <Relay?>obj
        t.last_active = now
        t.bytes_out += n
        transport = t.transport
        sent = _send_first(t, ptr, n) if _nothing_queued(transport) else 0
        if sent == n or sent < 0:
            continue
        transport.write(chunk if sent == 0 else memoryview(chunk)[sent:])
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


cdef inline ssize_t _send_first(Relay t, const char *ptr, Py_ssize_t n) except -2:
    """A plain non-blocking send() to a target with nothing queued: what it
    took, or -1 if its peer reset (_gone: the bytes are dropped and counted,
    and the target is told, as its transport would not)."""
    cdef ssize_t sent = send(t.fd, ptr, n, MSG_DONTWAIT | MSG_NOSIGNAL)
    if sent >= 0:
        return sent
    if _gone(errno):
        t.bytes_out -= n
        t.hub.drop("discarded", n)
        t.peer_reset = True
        t.hub.loop.call_soon(t.peer_gone)
        return -1
    return 0  # EAGAIN


cdef inline bint _nothing_queued(object transport) except -1:
    """transport.get_write_buffer_size() == 0, without looking the method up on
    every read: a third of _send_view's own cost when it did."""
    global _wbs_type, _wbs
    if type(transport) is not _wbs_type:
        _wbs_type = type(transport)
        _wbs = _wbs_type.get_write_buffer_size
    return _wbs(transport) == 0


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
        sent = _send_first(t, ptr, n) if _nothing_queued(transport) else 0
        if sent == n or sent < 0:
            continue
        if chunk is None:
            chunk = PyBytes_FromStringAndSize(ptr, n)
        transport.write(chunk if sent == 0 else memoryview(chunk)[sent:])
        if t.writing_paused:
            if full is None:
                full = []
            full.append(t)
    _full = full
    return chunk


# -- Pumps: a bulk pair's two directions, each a thread blocking in splice(2) --

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    #include <pthread.h>
    #include <signal.h>
    #include <stdint.h>
    #include <string.h>
    #include <sys/socket.h>
    #include <time.h>
    #include <unistd.h>

    #define FWD_COPY_MAX 16384

    /* One direction of a pumped pair. The thread owns src's reading and dst's
       writing until it is stopped; the loop reads the counters it updates. */
    typedef struct fwd_dir {
        struct fwd_dir *other;   /* the pair's other direction */
        int src, dst, pipe_r, pipe_w, notify;
        size_t round;
        size_t cap;      /* a copied round's most: fits the (empty) pipe */
        double idle;     /* both ways quiet this long: give the pair back (0: never) */
        double stall;    /* dst's SO_SNDTIMEO */
        double full_t;   /* dst full since (a send it took only part of, or none); 0: not */
        long long *bytes_in, *bytes_out;   /* the Relays' own fields; out: as dst takes them */
        double *src_active, *dst_active;
        int sending;  /* a round is on its way to dst: not idle, however long */
        int spliced;  /* a round went through the pipe: this way is bulk */
        int stop;   /* set by the loop */
        int done;   /* set by the thread, last */
        int why;    /* FWD_ASKED, FWD_EOF, FWD_FAILED, FWD_STALLED, FWD_IDLE */
        int err;
        long long left;  /* bytes in the pipe, not yet in dst */
        pthread_t tid;
        char buf[FWD_COPY_MAX];
    } fwd_dir;

    enum { FWD_ASKED, FWD_EOF, FWD_FAILED, FWD_STALLED, FWD_IDLE };

    static int fwd_wake_signal(void) { return SIGRTMIN + 7; }

    static void fwd_wake(int sig) { (void)sig; }

    /* No SA_RESTART: the signal makes a blocked splice return. */
    static int fwd_pump_install(void) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = fwd_wake;
        sigemptyset(&sa.sa_mask);
        return sigaction(fwd_wake_signal(), &sa, NULL);
    }

    static double fwd_clock(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec + ts.tv_nsec * 1e-9;
    }

    static void fwd_dir_end(fwd_dir *d, int why, int err, ssize_t left) {
        uint64_t one = 1;
        d->why = why;
        d->err = err;
        d->left = left;
        __atomic_store_n(&d->done, 1, __ATOMIC_RELEASE);
        if (why != FWD_ASKED && write(d->notify, &one, sizeof one) < 0) {
            /* the eventfd cannot overflow at one write per stop */
        }
    }

    /* A copied round that dst did not take goes into the pipe, which is empty
       in copy mode and holds at least cap bytes: stop() gives it back like the
       rest of a spliced round. */
    static void fwd_dir_park(fwd_dir *d, int why, int err, const char *p, ssize_t n) {
        ssize_t w = write(d->pipe_w, p, (size_t)n);
        fwd_dir_end(d, why, err, w > 0 ? w : 0);
    }

    /* A send begun at t0 returned, ``partial`` if dst took only part of it.
       1 if dst is stuck: it has been full for ``stall`` seconds. A zero
       window takes a few bytes at each probe, and one splice waits out
       SO_SNDTIMEO more than once, so the timeout alone took seconds more. */
    static int fwd_dir_full(fwd_dir *d, int partial, double t0) {
        if (!partial) {
            d->full_t = 0;
            return 0;
        }
        if (d->full_t == 0)
            d->full_t = t0;
        return fwd_clock() - d->full_t >= d->stall;
    }

    /* Copy mode: n bytes of buf to dst. 0 when all went, -1 when the thread
       ended (asked to stop in the middle, dst stuck or gone). */
    static int fwd_dir_send(fwd_dir *d, ssize_t n) {
        ssize_t off = 0, m;
        double t0;
        while (off < n) {
            t0 = fwd_clock();
            m = send(d->dst, d->buf + off, (size_t)(n - off), MSG_NOSIGNAL);
            if (m > 0) {
                off += m;
                __atomic_fetch_add(d->bytes_out, (long long)m, __ATOMIC_RELAXED);
                if (fwd_dir_full(d, off < n, t0)) {
                    fwd_dir_park(d, FWD_STALLED, 0, d->buf + off, n - off);
                    return -1;
                }
            } else if (m < 0 && errno == EINTR) {
                if (__atomic_load_n(&d->stop, __ATOMIC_ACQUIRE)) {
                    fwd_dir_park(d, FWD_ASKED, 0, d->buf + off, n - off);
                    return -1;
                }
            } else if (m < 0 && errno == EAGAIN) {  /* SO_SNDTIMEO: dst is stuck */
                fwd_dir_full(d, 1, t0);
                fwd_dir_park(d, FWD_STALLED, 0, d->buf + off, n - off);
                return -1;
            } else {
                fwd_dir_park(d, FWD_FAILED, m < 0 ? errno : EPIPE, d->buf + off, n - off);
                return -1;
            }
        }
        return 0;
    }

    /* Rounds are copied through buf (recv, send) while they are small, and
       spliced through the pipe once one fills buf: for a few bytes two copies
       cost less than splice's page references, for a bulk stream the other
       way round. */
    static void *fwd_dir_run(void *arg) {
        fwd_dir *d = (fwd_dir *)arg;
        sigset_t set;
        ssize_t n, m, got;
        double now, last;
        int copy = 1;
        sigfillset(&set);
        sigdelset(&set, fwd_wake_signal());
        pthread_sigmask(SIG_SETMASK, &set, NULL);
        while (!__atomic_load_n(&d->stop, __ATOMIC_ACQUIRE)) {
            if (copy)
                n = recv(d->src, d->buf, d->cap, 0);
            else
                n = splice(d->src, NULL, d->pipe_w, NULL, d->round, SPLICE_F_MOVE);
            if (n == 0) {
                fwd_dir_end(d, FWD_EOF, 0, 0);
                return NULL;
            }
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN) {  /* SO_RCVTIMEO: quiet this way; and the other? */
                    __atomic_load(d->src_active, &last, __ATOMIC_RELAXED);
                    if (fwd_clock() - last < d->idle
                            || __atomic_load_n(&d->other->sending, __ATOMIC_ACQUIRE))
                        continue;
                    fwd_dir_end(d, FWD_IDLE, 0, 0);
                    return NULL;
                }
                fwd_dir_end(d, FWD_FAILED, errno, 0);
                return NULL;
            }
            now = fwd_clock();
            __atomic_fetch_add(d->bytes_in, (long long)n, __ATOMIC_RELAXED);
            __atomic_store(d->src_active, &now, __ATOMIC_RELAXED);
            __atomic_store(d->dst_active, &now, __ATOMIC_RELAXED);
            __atomic_store_n(&d->sending, 1, __ATOMIC_RELEASE);
            if (copy) {
                if (fwd_dir_send(d, n) < 0)
                    return NULL;
                __atomic_store_n(&d->sending, 0, __ATOMIC_RELEASE);
                copy = (size_t)n < d->cap;
                continue;
            }
            got = n;
            while (n > 0) {
                now = fwd_clock();
                m = splice(d->pipe_r, NULL, d->dst, NULL, (size_t)n, SPLICE_F_MOVE);
                if (m > 0) {
                    n -= m;
                    __atomic_fetch_add(d->bytes_out, (long long)m, __ATOMIC_RELAXED);
                    if (fwd_dir_full(d, n > 0, now)) {
                        fwd_dir_end(d, FWD_STALLED, 0, n);
                        return NULL;
                    }
                } else if (m < 0 && errno == EINTR) {
                    if (__atomic_load_n(&d->stop, __ATOMIC_ACQUIRE))
                        break;
                } else if (m < 0 && errno == EAGAIN) {  /* SO_SNDTIMEO: dst is stuck */
                    fwd_dir_full(d, 1, now);
                    fwd_dir_end(d, FWD_STALLED, 0, n);
                    return NULL;
                } else {
                    fwd_dir_end(d, FWD_FAILED, m < 0 ? errno : EPIPE, n);
                    return NULL;
                }
            }
            if (n) {
                fwd_dir_end(d, FWD_ASKED, 0, n);
                return NULL;
            }
            __atomic_store_n(&d->sending, 0, __ATOMIC_RELEASE);
            d->spliced = 1;
            copy = (size_t)got < d->cap;
        }
        fwd_dir_end(d, FWD_ASKED, 0, 0);
        return NULL;
    }

    /* The thread starts with every signal blocked (none of the process's
       handlers run there) and then takes only the wake-up signal. */
    static int fwd_dir_start(fwd_dir *d) {
        sigset_t all, old;
        pthread_attr_t attr;
        int rc;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 64 * 1024);
        rc = pthread_create(&d->tid, &attr, fwd_dir_run, d);
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        return rc;
    }

    /* Stop and join the threads of a and b (b may be NULL). A signal sent
       just before a thread enters splice is lost, so it is sent again until
       the thread is out. */
    static void fwd_dirs_stop(fwd_dir *a, fwd_dir *b) {
        fwd_dir *d[2] = {a, b};
        struct timespec pause = {0, 20000};
        int i, k;
        for (i = 0; i < 2 && d[i]; i++)
            __atomic_store_n(&d[i]->stop, 1, __ATOMIC_RELEASE);
        for (i = 0; i < 2 && d[i]; i++) {
            for (k = 0; !__atomic_load_n(&d[i]->done, __ATOMIC_ACQUIRE); k++) {
                if (k % 50 == 0)
                    pthread_kill(d[i]->tid, fwd_wake_signal());
                nanosleep(&pause, NULL);
            }
            pthread_join(d[i]->tid, NULL);
        }
    }

    static int fwd_dir_done(fwd_dir *d) {
        return __atomic_load_n(&d->done, __ATOMIC_ACQUIRE);
    }

    static int fwd_set_timeout(int fd, int opt, double seconds) {
        struct timeval tv;
        tv.tv_sec = (time_t)seconds;
        tv.tv_usec = (suseconds_t)((seconds - tv.tv_sec) * 1e6);
        return setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof tv);
    }

    /* Blocking, with send and receive timeouts (0: none), or back to the loop's
       non-blocking socket with neither. */
    static int fwd_set_blocking(int fd, int blocking, double send_timeout, double recv_timeout) {
        int flags = fcntl(fd, F_GETFL);
        if (flags < 0)
            return -1;
        flags = blocking ? (flags & ~O_NONBLOCK) : (flags | O_NONBLOCK);
        if (fwd_set_timeout(fd, SO_SNDTIMEO, send_timeout) < 0
                || fwd_set_timeout(fd, SO_RCVTIMEO, recv_timeout) < 0)
            return -1;
        return fcntl(fd, F_SETFL, flags);
    }
    """
    ctypedef struct fwd_dir:
        fwd_dir *other
        int src, dst, pipe_r, pipe_w, notify
        size_t round, cap
        double idle, stall, full_t
        long long *bytes_in
        long long *bytes_out
        double *src_active
        double *dst_active
        int sending, spliced, stop, done, why, err
        long long left
    enum:
        FWD_ASKED
        FWD_EOF
        FWD_FAILED
        FWD_STALLED
        FWD_IDLE
        FWD_COPY_MAX
    int fwd_pump_install()
    int fwd_dir_start(fwd_dir *d)
    void fwd_dirs_stop(fwd_dir *a, fwd_dir *b) nogil
    int fwd_dir_done(fwd_dir *d)
    int fwd_set_blocking(int fd, int blocking, double send_timeout, double recv_timeout)
    int EAGAIN

cdef bint _pumps_ready = False

_WHY = {FWD_ASKED: "asked", FWD_EOF: "eof", FWD_FAILED: "failed", FWD_STALLED: "stalled",
        FWD_IDLE: "idle"}


cdef class Pump:
    """A pair whose two directions each block in a thread of their own, in
    recv(2) and send(2) while rounds are small, in splice(2) through a pipe
    once they are bulk, while the loop does not touch either socket: no poll,
    no callback, no GIL per round (docs/ARCHITECTURE.md, "Pairs get
    threads"). The loop gets them back with ``stop()``, which returns what
    each pipe still held; a thread that meets EOF, an error, a receiver stuck
    for ``stall`` seconds, or a pair quiet both ways for ``idle`` seconds (if
    not 0), stops by itself and says so on the ``notify`` eventfd, and the
    loop's own reads then find out what happened."""

    cdef fwd_dir d[2]
    cdef readonly Relay a
    cdef readonly Relay b
    cdef int threads  # started, and not joined yet

    def __init__(self, Relay a, Relay b, int notify, double stall, double idle=0.0):
        global _pumps_ready
        if not _pumps_ready:
            if fwd_pump_install() < 0:
                raise OSError("cannot install the pumps' wake-up signal")
            _pumps_ready = True
        if (a.pipe_w < 0 and not a._open_pipe()) or (b.pipe_w < 0 and not b._open_pipe()):
            raise OSError("no pipe left for a pump")
        self.a, self.b = a, b
        self._fill(0, a, b, notify, stall, idle)
        self._fill(1, b, a, notify, stall, idle)
        if fwd_set_blocking(a.fd, 1, stall, idle) < 0 \
                or fwd_set_blocking(b.fd, 1, stall, idle) < 0:
            self._unblock()
            raise OSError("cannot make the pair's sockets blocking")
        if fwd_dir_start(&self.d[0]) != 0:
            self._unblock()
            raise OSError("cannot start a pump thread")
        self.threads = 1
        if fwd_dir_start(&self.d[1]) == 0:
            self.threads = 2
        else:
            # The first may have read already: stop() gives back what it
            # holds, so this pump must be stopped like any other, at once.
            self.d[1].done, self.d[1].why, self.d[1].err = 1, FWD_FAILED, EAGAIN

    cdef void _fill(self, int i, Relay src, Relay dst, int notify, double stall, double idle):
        cdef fwd_dir *d = &self.d[i]
        d.src, d.dst = src.fd, dst.fd
        d.pipe_r, d.pipe_w = src.pipe_r, src.pipe_w
        d.notify = notify
        # A read's worth, as in the loop: what a stuck receiver leaves queued
        # when the pair goes back is one read at most (docs/PROTOCOL.md §3.4).
        d.round = <size_t>_round
        # What a copied round leaves unsent must fit the pipe.
        cdef int size = fcntl(src.pipe_w, F_GETPIPE_SZ)
        d.cap = <size_t>(size if 0 < size < FWD_COPY_MAX else FWD_COPY_MAX)
        d.idle = idle
        d.stall = stall
        d.full_t = 0
        d.bytes_in = &src.bytes_in
        d.bytes_out = &dst.bytes_out
        d.src_active = &src.last_active
        d.dst_active = &dst.last_active
        d.other = &self.d[1 - i]
        d.sending = d.spliced = d.stop = d.done = d.why = d.err = 0
        d.left = 0

    cdef void _unblock(self):
        fwd_set_blocking(self.a.fd, 0, 0.0, 0.0)
        fwd_set_blocking(self.b.fd, 0, 0.0, 0.0)

    def sending(self, Relay src):
        """Whether ``src``'s thread is in the middle of a round to the other
        side: ``src`` is not idle, it waits for its receiver (which, if stuck,
        sends the pair back to the loop within ``stall`` seconds)."""
        return bool(self.d[0 if src is self.a else 1].sending)

    @property
    def stalled(self):
        """For a -> b and b -> a: since when (time.monotonic()) the receiver
        was full, if that way stopped because it stayed so for ``stall``
        seconds; else None."""
        return tuple(self.d[i].full_t if fwd_dir_done(&self.d[i])
                     and self.d[i].why == FWD_STALLED else None for i in range(2))

    @property
    def spliced(self):
        """Whether a -> b and b -> a each spliced a round: those ways are bulk
        streams, which keep their pipes when the pair goes back (see stop)."""
        return bool(self.d[0].spliced), bool(self.d[1].spliced)

    @property
    def stopped(self):
        """Why a thread stopped on its own ("eof", "failed", "stalled"), or None."""
        cdef int i
        for i in range(2):
            if fwd_dir_done(&self.d[i]) and self.d[i].why != FWD_ASKED:
                return _WHY[self.d[i].why]
        return None

    def stop(self):
        """Join both threads and make the sockets the loop's again. Returns
        what a->b and b->a had in their pipes, as bytes (None if nothing):
        the loop sends them before anything else."""
        if not self.threads:
            return None, None
        cdef fwd_dir *second = &self.d[1] if self.threads == 2 else NULL
        self.threads = 0
        with nogil:
            fwd_dirs_stop(&self.d[0], second)
        self._unblock()
        ab = _drain(self.a.pipe_r, self.d[0].left) if self.d[0].left else None
        ba = _drain(self.b.pipe_r, self.d[1].left) if self.d[1].left else None
        return ab, ba

    def __dealloc__(self):
        cdef fwd_dir *second = &self.d[1] if self.threads == 2 else NULL
        if self.threads:  # not expected: the hub stops every pump it starts
            with nogil:
                fwd_dirs_stop(&self.d[0], second)
