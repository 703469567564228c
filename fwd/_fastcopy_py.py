"""Pure-Python twin of ``_fastcopy.pyx``, for debugging and for machines
without a C compiler (select it with ``FWD_PURE_PYTHON=1``)."""
from __future__ import annotations

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
