"""Pure-Python twin of ``_fastcopy.pyx``, for debugging and for machines
without a C compiler (select it with ``FWD_PURE_PYTHON=1``)."""
from __future__ import annotations

import os
from typing import Any


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
