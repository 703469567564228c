"""Process-wide setup shared by the parent and the workers: log format naming
the process role, process title, and the file descriptor limit."""
from __future__ import annotations

import logging
import resource
import sys

log = logging.getLogger("fwd.runtime")

FD_RESERVE = 64
"""File descriptors kept for listeners, logs and the event loop itself."""


def setup_logging(level: str, role: str) -> None:
    """One line per record on stderr, tagged with the role (``acceptor``, ``w0``)
    so that lines of several processes sharing stderr can be told apart."""
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, force=True,
        format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s",
    )


def set_title(title: str) -> None:
    """Name the process in ps/top (``fwd-server: worker 2``); also hides argv."""
    try:
        import setproctitle
    except ImportError:  # pragma: no cover - optional at run time
        return
    setproctitle.setproctitle(title)


def raise_fd_limit(max_conns: int) -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one, and warn if it still cannot
    hold ``max_conns``: beyond it new connections are shed at accept."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # pragma: no cover - hard limit unsettable
            pass
    if soft != resource.RLIM_INFINITY and max_conns + FD_RESERVE > soft:
        log.warning("file descriptor limit %d is below --max-conns %d + %d: connections "
                    "beyond the limit are closed at once", soft, max_conns, FD_RESERVE)
    return soft
