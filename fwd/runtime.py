"""Process-wide setup shared by the parent and the workers: log format naming
the process role, process title, and the file descriptor limit."""
from __future__ import annotations

import datetime
import json
import logging
import resource
import sys
from typing import Any

log = logging.getLogger("fwd.runtime")

FD_RESERVE = 64
"""File descriptors kept for listeners, logs and the event loop itself."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, process role, logger, message, and
    the record's ``fields`` (``extra={"fields": {...}}``) as keys of their own,
    so that log shippers need no parsing of the message text."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "proc": self.role, "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, role: str, fmt: str = "text") -> None:
    """One line per record on stderr, tagged with the role (``acceptor``, ``w0``)
    so that lines of several processes sharing stderr can be told apart;
    ``fmt="json"`` writes JSON objects instead of text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else logging.Formatter(
        f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


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
