"""Hand a connected client socket to another process, with its metadata and
the bytes already read from it, in one SCM_RIGHTS message.

The channel is a Unix SOCK_SEQPACKET pair: each message arrives whole, so a
socket can never be separated from its metadata, and a peer that died shows as
EOF. The sending side never blocks (a full channel queues, see ``Handoff``),
because the acceptor must keep accepting while a worker is busy or dead.
"""
from __future__ import annotations

import asyncio
import collections
import errno
import json
import socket
import struct
from collections.abc import Callable
from typing import Any

MAX_DATA = 60 * 1024
"""Bytes already read that may travel with a socket (one message must fit a
default Unix socket buffer); the sender reads no more than this before a hand-off."""
BATCH = 256
"""Messages taken from a channel per wake-up before yielding to the loop."""
_HEAD = struct.Struct("!I")
_MAX_MESSAGE = 64 * 1024


_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})
"""Send errors that mean the receiving process is gone (its exit is handled apart)."""


class LostSocket(OSError):
    """A hand-off whose descriptor did not arrive (the receiver is out of
    descriptors: MSG_CTRUNC) though its message did: ``meta`` says whose it was."""

    def __init__(self, text: str, meta: dict[str, Any]) -> None:
        super().__init__(text)
        self.meta = meta


def peer_of(meta: dict[str, Any]) -> str:
    """The client a hand-off is about, as the parent wrote it (``[::1]:port``):
    the parent counts connections per address by it (--max-conns-per-ip)."""
    moved = meta.get("adopt")
    return str(moved["peer"] if moved is not None else meta.get("peer", "?"))


def pack(meta: dict[str, Any], data: bytes = b"") -> bytes:
    if len(data) > MAX_DATA:
        raise ValueError(f"at most {MAX_DATA} bytes may travel with a socket")
    blob = json.dumps(meta, separators=(",", ":")).encode()
    message = _HEAD.pack(len(blob)) + blob + data
    if len(message) > _MAX_MESSAGE:
        raise ValueError("hand-off message too large")
    return message


def unpack(message: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = _HEAD.unpack_from(message)
    meta = json.loads(message[_HEAD.size:_HEAD.size + n])
    return meta, message[_HEAD.size + n:]


def send_socket(channel: socket.socket, fd: int, meta: dict[str, Any], data: bytes = b"") -> None:
    """Send one socket; raises BlockingIOError on a full non-blocking channel."""
    socket.send_fds(channel, [pack(meta, data)], [fd])


def recv_socket(channel: socket.socket) -> tuple[socket.socket, dict[str, Any], bytes] | None:
    """Receive one socket, or None at EOF (the other process is gone)."""
    message, fds, flags, _ = socket.recv_fds(channel, _MAX_MESSAGE, 4)
    if not message and not fds:
        return None
    if flags & socket.MSG_CTRUNC or len(fds) != 1:
        for fd in fds:
            socket.close(fd)
        try:
            meta = unpack(message)[0]
        except (ValueError, struct.error):
            meta = {}
        raise LostSocket(f"hand-off message carried {len(fds)} descriptors (flags {flags:#x})",
                         meta)
    meta, data = unpack(message)
    return socket.socket(fileno=fds[0]), meta, data


def channel_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class Handoff:
    """The sending end of a channel in an event loop: never blocks the loop.

    Sockets that do not fit into the channel right now wait in a queue (the
    sender's copy of each fd stays open until it is sent). A socket the kernel
    refuses to pass while the receiver lives (ETOOMANYREFS: too many
    descriptors in flight for our RLIMIT_NOFILE) is closed, and
    ``on_drop(meta, exc)`` tells the owner, which counted it as handed on.
    Once the receiver is gone (it died, before its exit is handled), or the
    channel is closed, every socket not passed yet, sent from now on or
    waiting, goes to ``on_gone(sock, meta, data)``, which may hand it to
    another process; without one it is closed.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: socket.socket,
                 on_drop: Callable[[dict[str, Any], OSError], None] | None = None,
                 on_gone: Callable[[socket.socket, dict[str, Any], bytes], None] | None = None,
                 ) -> None:
        channel.setblocking(False)
        self.loop = loop
        self.channel = channel
        self.on_drop = on_drop
        self.on_gone = on_gone
        self.gone = False  # the receiver is: nothing goes to it any more
        self._queue: collections.deque[
            tuple[socket.socket, bytes, dict[str, Any]]] = collections.deque()
        self._writing = False

    def send(self, sock: socket.socket, meta: dict[str, Any], data: bytes = b"") -> None:
        """Pass ``sock`` on; our copy is closed once it has been sent."""
        message = pack(meta, data)
        if self.gone:
            self._give_back(sock, message)
            return
        if not self._queue:
            try:
                socket.send_fds(self.channel, [message], [sock.fileno()])
            except BlockingIOError:
                pass
            except OSError as exc:
                self._failed(sock, message, meta, exc)
                return
            else:
                sock.close()
                return
        self._queue.append((sock, message, meta))
        if not self._writing:
            self._writing = True
            self.loop.add_writer(self.channel, self._flush)

    def _failed(self, sock: socket.socket, message: bytes, meta: dict[str, Any],
                exc: OSError) -> None:
        if exc.errno in _GONE:  # the other process is gone: what waits for it goes back
            self.gone = True
            self._give_back(sock, message)
            self._stop_writing()
            while self._queue:
                waiting, message, _ = self._queue.popleft()
                self._give_back(waiting, message)
            return
        sock.close()  # the client sees its connection end
        if self.on_drop is not None:
            self.on_drop(meta, exc)

    def _give_back(self, sock: socket.socket, message: bytes) -> None:
        if self.on_gone is None:
            sock.close()
        else:
            self.on_gone(sock, *unpack(message))

    def _flush(self) -> None:
        while self._queue:
            sock, message, meta = self._queue[0]
            try:
                socket.send_fds(self.channel, [message], [sock.fileno()])
            except BlockingIOError:
                return
            except OSError as exc:
                self._queue.popleft()
                self._failed(sock, message, meta, exc)
                continue
            self._queue.popleft()
            sock.close()
        self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writing:
            self.loop.remove_writer(self.channel)
            self._writing = False

    def __len__(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """The receiver is gone for good: what still waits goes back (on_gone)."""
        self.gone = True
        self._stop_writing()
        while self._queue:
            sock, message, _ = self._queue.popleft()
            self._give_back(sock, message)
        self.channel.close()


def receive_into(loop: asyncio.AbstractEventLoop, channel: socket.socket,
                 on_socket: Callable[[socket.socket, dict[str, Any], bytes], None],
                 on_eof: Callable[[], None],
                 on_error: Callable[[OSError], None]) -> None:
    """Call ``on_socket`` for every socket that arrives on ``channel``; a socket
    lost in transit (``on_error``) does not stop the ones behind it."""
    channel.setblocking(False)

    def readable() -> None:
        while True:
            try:
                got = recv_socket(channel)
            except BlockingIOError:
                return
            except OSError as exc:
                # Typically out of descriptors: the kernel dropped the socket
                # (closing it), and the channel itself is fine.
                on_error(exc)
                return  # the loop calls us again for what is left
            if got is None:
                loop.remove_reader(channel)
                on_eof()
                return
            on_socket(*got)

    loop.add_reader(channel, readable)
