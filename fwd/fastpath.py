"""Pick the compiled data path, or its pure-Python twin when asked to.

Like pyzmq's backend selection: the choice is made once at import, an
environment variable overrides it, and a missing build fails loudly with the
fix instead of silently running slow.
"""
from __future__ import annotations

import os

if os.environ.get("FWD_PURE_PYTHON") == "1":
    from ._fastcopy_py import Relay, bind, fanout, send_view
    Pump = None  # no pumps: a Python thread cannot be woken out of splice(2)
    PUMP_READS = 0
    IMPLEMENTATION = "python"
else:
    try:
        from ._fastcopy import (  # type: ignore[no-redef]
            PUMP_READS,
            Pump,
            Relay,
            bind,
            fanout,
            send_view,
        )
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "fwd._fastcopy is not built: install fwd with 'pip install .' (needs gcc and "
            "the Python headers), or set FWD_PURE_PYTHON=1 to use the slow twin"
        ) from exc
    IMPLEMENTATION = "cython"

__all__ = ["IMPLEMENTATION", "PUMP_READS", "Pump", "Relay", "bind", "fanout", "send_view"]
