# cython: language_level=3
"""The per-read hot loop: hand one received chunk to every receiver.

Only this loop is compiled; it runs once per read for every live sender, so it
must not grow Python-level work per receiver beyond the transport call itself.
The pure-Python twin in _fastcopy_py.py has the same contract and tests.
"""


def fanout(bytes chunk, tuple targets, object sender, double now):
    """Write ``chunk`` to each target but ``sender``; return the targets that
    are now above their high-water mark (None when there are none)."""
    cdef list full = None
    cdef object t
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


from cpython.bytes cimport PyBytes_FromStringAndSize


cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL


def send_view(bytearray buf, Py_ssize_t n, tuple targets, object sender, double now):
    """Send ``buf[:n]`` to each target but ``sender`` straight from the read
    buffer: a receiver whose transport has nothing queued gets a plain
    non-blocking send(), with no copy. Only what a socket does not take is
    copied, once, into a bytes chunk that every such receiver shares (their
    transports queue it). Returns (targets now above their high-water mark or
    None, that chunk or None)."""
    cdef const char *ptr = buf
    cdef list full = None
    cdef object chunk = None
    cdef object t, transport
    cdef ssize_t sent
    cdef int fd
    for t in targets:
        if t is sender:
            continue
        t.last_active = now
        t.bytes_out += n
        transport = t.transport
        sent = 0
        if transport.get_write_buffer_size() == 0:
            fd = t.fd
            sent = send(fd, ptr, n, MSG_DONTWAIT | MSG_NOSIGNAL)
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
