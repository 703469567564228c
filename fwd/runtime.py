"""Process-wide setup shared by the parent and the workers: log format naming
the process role, process title, the file descriptor limit, and a worker's
tie to its parent."""
from __future__ import annotations

import asyncio
import collections
import datetime
import json
import logging
import os
import re
import resource
import select
import sys
from collections.abc import Iterable
from typing import Any, TextIO

log = logging.getLogger("fwd.runtime")

FD_RESERVE = 64
"""File descriptors kept for listeners, logs and the event loop itself."""
LOG_WRITE = select.PIPE_BUF
"""Largest write of log lines: the processes of one server share stderr, and a
pipe write up to this size is never interleaved with another's."""
LOG_BATCH = 256
"""Records kept back at most before they are written."""
LOG_BACKLOG = 1 << 20
"""Bytes of log lines kept, in a running event loop, while stderr takes
nothing (a stuck log collector); further lines are dropped and counted.
Writing them regardless would block the loop, and with it every session."""
LOG_RETRY = 0.05
"""How often a backlog tries stderr again."""


_BARE = re.compile(r'[^\s="\\,*]+')  # "*": recvers=* is "everyone"


def logval(value: object) -> str:
    """A field value for a text log line (``key=value``, logfmt-style): as is
    if it cannot be taken for another field, else as a JSON string. Clients
    pick their chids, which may hold spaces, ``=`` or ``,`` (the separator
    of ``recvers``; ``*`` is everyone there): unquoted, ``chid=x peer=...``
    would forge a field."""
    text = str(value)
    if _BARE.fullmatch(text) and text.isprintable() and (text != "None" or value is None):
        return text  # None: a session without a chid (broadcast)
    return json.dumps(text)


def logvals(values: Iterable[object]) -> str:
    """A list field (``recvers=a,b``), each entry as ``logval``."""
    return ",".join(logval(v) for v in values)


class LoopBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes records at the end of the event loop's current iteration, many
    lines per write(): two lines per session cost a system call each otherwise,
    which showed in the handshake rate. Warnings and errors are written at once;
    outside a running loop every record is. In a running loop a write waits
    until stderr can take it without blocking (LOG_BACKLOG), and lines past
    that are dropped, then counted in a line of their own: a log reader that
    stalls must not stall the relay (clients can make lines: bad handshakes)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: list[bytes] = []
        self._scheduled = False
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_size = 0
        self._dropped = 0
        self._retry: asyncio.TimerHandle | None = None
        self._poll: select.poll | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append((self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING or len(self._lines) >= LOG_BATCH:
            self._write()
            return
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._write()
                return
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def _write(self) -> None:
        self._scheduled = False
        lines, self._lines = self._lines, []
        for line in lines:
            if self._backlog_size + len(line) > LOG_BACKLOG:
                self._dropped += 1
            else:
                self._backlog.append(line)
                self._backlog_size += len(line)
        if self._retry is not None:
            if _running_loop() is not None:
                return  # it drains the backlog, in order
            self._retry.cancel()  # the loop is over: block rather than lose lines
            self._retry = None
        self._drain()

    def _drain(self) -> None:
        loop = _running_loop()  # none at start and exit: block rather than lose lines
        backlog = self._backlog
        try:
            fd = self.stream.fileno()
            self.stream.flush()  # anything written to the stream directly goes first
            while backlog:
                if loop is not None and not self._writable(fd):
                    self._retry = loop.call_later(LOG_RETRY, self._again)
                    return
                batch = backlog.popleft()
                while backlog and len(batch) + len(backlog[0]) <= LOG_WRITE:
                    batch += backlog.popleft()
                self._backlog_size -= len(batch)
                _write_all(fd, batch)
                if not backlog and self._dropped:
                    note = logging.makeLogRecord({
                        "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                        "msg": "%d log lines dropped: stderr took nothing for a while",
                        "args": (self._dropped,)})
                    self._dropped = 0
                    line = (self.format(note) + "\n").encode()
                    backlog.append(line)
                    self._backlog_size += len(line)
        except (OSError, ValueError):  # stderr gone: nothing sensible to do with a log line
            backlog.clear()
            self._backlog_size = 0

    def _again(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._retry = None
            self._drain()

    def _writable(self, fd: int) -> bool:
        """Whether a write of LOG_WRITE bytes at most would not block: a pipe
        that polls writable has a free page, and a file always is."""
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(fd, select.POLLOUT)
        return bool(self._poll.poll(0))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
    handler = LoopBufferedHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else logging.Formatter(
        f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # No record field needs the caller's frame, thread or process: skip finding them.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


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


def die_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies.
    A worker notices a parent that is gone on its channel once it serves;
    before that (while it boots, waiting for its peers) nothing would stop it,
    and it would stay behind. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
