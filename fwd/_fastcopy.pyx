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
