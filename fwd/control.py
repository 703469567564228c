"""The control socket: how fwd-ctl talks to a running server, and how the
parent asks its workers.

The wire format is JSON lines over a Unix stream socket (docs/PROTOCOL.md §9):
one request object per line, one reply object per line, in order. Parsing and
validation are plain functions; the socket plumbing below them is thin.

Only the server's own user (and root) may talk to it: the socket file is
created with mode 0600, and each connection's peer credentials (SO_PEERCRED)
are checked too, so a socket whose mode was loosened still refuses others.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

log = logging.getLogger("fwd.control")

MAX_REQUEST = 64 * 1024
"""Longest request line a server reads; a longer one gets an error and the connection ends."""
MAX_REPLY = 512 * 1024**2
"""Longest reply line a client reads (a sessions list of a large server)."""
IDLE_LIMIT = 60.0
"""A control connection that sends no request for this long is closed."""

COMMANDS: Mapping[str, tuple[str, ...]] = {
    "status": (),
    "sessions": (),
    "kick": ("chid",),
    "kick-peer": ("peer",),
    "reload": (),
    "drain": (),
}
"""What fwd-ctl may ask the server: command → its required string arguments."""
WORKER_COMMANDS: Mapping[str, tuple[str, ...]] = {
    "status": (),
    "sessions": (),
    "kick": ("chid",),
    "kick-peer": ("peer",),
    "flush": (),
}
"""What the parent may ask a worker (``flush``: bring the metrics files up to date)."""

Handler = Callable[["Request"], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """A request that cannot be served; ``str()`` is the one line the client sees."""


@dataclasses.dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, str]


def parse_request(line: bytes, commands: Mapping[str, tuple[str, ...]] = COMMANDS) -> Request:
    """One request line → Request, or ControlError saying what is wrong with it."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: "[" nested thousands deep
        raise ControlError("request is not JSON") from None
    if not isinstance(obj, dict):
        raise ControlError("request must be a JSON object")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise ControlError("request needs a \"cmd\" string")
    if cmd not in commands:
        raise ControlError(f"unknown command {cmd[:32]!r} (known: {', '.join(commands)})")
    args: dict[str, str] = {}
    for name in commands[cmd]:
        value = obj.get(name)
        if not isinstance(value, str) or not value:
            raise ControlError(f"{cmd} needs a non-empty \"{name}\" string")
        args[name] = value
    return Request(cmd, args)


def encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def ok(**result: Any) -> dict[str, Any]:
    return {"ok": True, **result}


def error(desc: str) -> dict[str, Any]:
    return {"ok": False, "error": desc}


def default_path(port: int) -> str:
    """Where a server listening on ``port`` puts its control socket unless told
    otherwise, and where fwd-ctl looks for it: ``$XDG_RUNTIME_DIR/fwd-PORT.ctl``,
    or the temporary directory when there is no runtime directory."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not os.path.isdir(base):
        base = tempfile.gettempdir()
    return os.path.join(base, f"fwd-{port}.ctl")


def worker_path(rundir: str, wid: int) -> str:
    """Where worker ``wid`` answers the parent (in the server's private run directory)."""
    return os.path.join(rundir, f"w{wid}.ctl")


# -- server side ----------------------------------------------------------------------


def _claim_path(path: str) -> None:
    """Make room for our socket at ``path``: remove a stale socket of a server
    that died; refuse anything else (a live server, another user's file)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"control socket {path}: exists and is not a socket")
    if st.st_uid != os.geteuid():
        raise OSError(f"control socket {path}: exists and belongs to uid {st.st_uid}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: left behind by a server that was killed
        return
    finally:
        probe.close()
    # Two servers on one port (other addresses) meet here: say the way out.
    raise OSError(f"control socket {path}: another server is using it "
                  "(give this one --control PATH, or --control none)")


def _peer_allowed(sock: socket.socket) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


class ControlServer:
    """Serves ``handler`` on a Unix socket at ``path`` (mode 0600) until closed."""

    def __init__(self, path: str, handler: Handler,
                 commands: Mapping[str, tuple[str, ...]] = COMMANDS) -> None:
        self.path = path
        self.handler = handler
        self.commands = commands
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def start(self) -> None:
        _claim_path(self.path)
        old = os.umask(0o177)  # the file is 0600 from its first instant
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path,
                                                           limit=MAX_REQUEST)
        except OSError as exc:
            raise OSError(f"control socket {self.path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._inode = os.lstat(self.path).st_ino

    async def close(self) -> None:
        """Stop listening, remove the socket file, end open connections."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(OSError):  # only our own socket, never a successor's
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        await close_connections(self._conns)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with tracked(self._conns, writer), contextlib.suppress(asyncio.CancelledError):
            # Cancelled at close (close_connections) while a request waits (a
            # reload whose read hangs): asyncio's stream server would log the
            # cancelled task as an error.
            await self._exchange(reader, writer)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            if sock is None or not _peer_allowed(sock):
                writer.write(encode(error("permission denied: not the server's user")))
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_LIMIT)
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(encode(error(f"request longer than {MAX_REQUEST} bytes")))
                    return
                except asyncio.TimeoutError:
                    return
                if not line.endswith(b"\n"):
                    return  # EOF (a last line without its newline is not a request)
                cmd = None
                try:
                    request = parse_request(line, self.commands)
                    cmd = request.cmd
                    reply = await self.handler(request)
                except ControlError as exc:
                    reply = error(str(exc))
                if writer.is_closing():  # the asker gave up waiting (a stopped worker)
                    return
                writer.write(encode(reply))
                await writer.drain()
                if cmd == "drain" and reply.get("ok"):
                    # Open until the server exits, which is how fwd-ctl drain
                    # knows the drain is over: no IDLE_LIMIT, which a longer
                    # --drain-timeout outlasts.
                    while await reader.read(65536):
                        pass
                    return
        except (ConnectionError, OSError):
            pass
        except Exception:  # a bug must not take the control socket down
            log.exception("control request failed")
            with contextlib.suppress(Exception):
                writer.write(encode(error("internal error (see the server log)")))


@contextlib.contextmanager
def tracked(conns: dict[asyncio.Task[Any], asyncio.StreamWriter],
            writer: asyncio.StreamWriter) -> Iterator[None]:
    """Around a stream server's handler: register its connection (so that
    ``close_connections`` can end it at shutdown), and close it when done."""
    task = asyncio.current_task()
    assert task is not None
    conns[task] = writer
    try:
        yield
    finally:
        del conns[task]
        with contextlib.suppress(Exception):
            writer.close()


async def close_connections(conns: Mapping[asyncio.Task[Any], asyncio.StreamWriter],
                            grace: float = 1.0) -> None:
    """End the handlers of a stream server's open connections before the loop
    stops (a handler task still pending then is logged as an error)."""
    for writer in conns.values():
        writer.close()  # a handler waiting for a request sees EOF
    tasks = list(conns)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


# -- client side ------------------------------------------------------------------------


async def ask(path: str, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """One request, one reply, over a fresh connection (the parent asking a worker)."""
    async def exchange() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_REPLY)
        try:
            writer.write(encode(request))
            line = await reader.readline()
        finally:
            writer.close()
        if not line:
            raise ControlError("no reply (connection closed)")
        reply: dict[str, Any] = json.loads(line)
        return reply

    return await asyncio.wait_for(exchange(), timeout)


class Client:
    """A blocking connection to a control socket (fwd-ctl)."""

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._file = self.sock.makefile("rb")

    def call(self, request: Mapping[str, Any]) -> dict[str, Any]:
        self.sock.sendall(encode(request))
        line = self._file.readline(MAX_REPLY)
        if not line:
            raise ControlError("the server closed the connection without a reply")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def wait_closed(self, timeout: float) -> bool:
        """Wait until the server closes the connection (it exits); False on timeout."""
        self.sock.settimeout(timeout)
        try:
            while self._file.read(65536):
                pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._file.close()
        self.sock.close()
