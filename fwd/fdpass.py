"""Hand a connected client socket to another process, with its metadata and
the bytes already read from it, in one SCM_RIGHTS message.

The channel is a Unix SOCK_SEQPACKET pair: each message arrives whole, so a
socket can never be separated from its metadata, and a peer that died shows as
EOF. The sending side never blocks (a full channel queues, see ``Handoff``),
because the acceptor must keep accepting while a worker is busy or dead.

The sender keeps its copy of each socket until the receiver confirms it (one
CONFIRM note per batch, before it touches any of them): a socket sent to a
process that dies before reading it would otherwise die with it, reset
without a word, though nobody had used it yet.
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
CONFIRM = b"a"
"""Starts the receiver's note about the sockets it took: then one byte per
message read, in order, TAKEN or LOST."""
TAKEN, LOST = b"y", b"n"
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

    Sockets that do not fit into the channel right now wait in a queue. Our
    copy of a socket stays open until the receiver confirms it (``confirm``),
    so that one the receiver never read is not lost with it. A socket the
    kernel refuses to pass while the receiver lives (ETOOMANYREFS: too many
    descriptors in flight for our RLIMIT_NOFILE) is closed, and
    ``on_drop(meta, exc)`` tells the owner, which counted it as handed on.
    One whose descriptor the receiver could not take (it is out of
    descriptors) goes to ``on_lost(sock, meta)``: the receiver counted it
    out, and the owner may still tell the client. Once the receiver is gone
    (it died, before its exit is handled), or the channel is closed, every
    socket it did not confirm, sent, waiting or sent from now on, goes to
    ``on_gone(sock, meta, data)``, in order, which may hand it to another
    process; without one it is closed.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: socket.socket,
                 on_drop: Callable[[dict[str, Any], OSError], None] | None = None,
                 on_gone: Callable[[socket.socket, dict[str, Any], bytes], None] | None = None,
                 on_lost: Callable[[socket.socket, dict[str, Any]], None] | None = None,
                 ) -> None:
        channel.setblocking(False)
        self.loop = loop
        self.channel = channel
        self.on_drop = on_drop
        self.on_gone = on_gone
        self.on_lost = on_lost
        self.gone = False  # the receiver is: nothing goes to it any more
        self._queue: collections.deque[
            tuple[socket.socket, bytes, dict[str, Any]]] = collections.deque()
        self._sent: collections.deque[tuple[socket.socket, bytes]] = collections.deque()
        self._writing = False

    def send(self, sock: socket.socket, meta: dict[str, Any], data: bytes = b"") -> None:
        """Pass ``sock`` on; our copy is closed once the receiver confirms it."""
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
                self._sent.append((sock, message))
                return
        self._queue.append((sock, message, meta))
        if not self._writing:
            self._writing = True
            self.loop.add_writer(self.channel, self._flush)

    def confirm(self, word: bytes) -> None:
        """The receiver's note (after CONFIRM): the next ``len(word)`` sockets
        sent reached it (TAKEN) or lost their descriptor on the way (LOST)."""
        for taken in word:
            if not self._sent:
                return  # a note we cannot match: the socket is not ours to close
            sock, message = self._sent.popleft()
            if taken == TAKEN[0] or self.on_lost is None:
                sock.close()
            else:
                self.on_lost(sock, unpack(message)[0])

    def _failed(self, sock: socket.socket, message: bytes, meta: dict[str, Any],
                exc: OSError) -> None:
        if exc.errno in _GONE:  # the other process is gone: what waits for it goes back
            self._queue.appendleft((sock, message, meta))
            self._give_all_back()
            return
        sock.close()  # the client sees its connection end
        if self.on_drop is not None:
            self.on_drop(meta, exc)

    def _give_all_back(self) -> None:
        self.gone = True
        self._stop_writing()
        while self._sent:
            self._give_back(*self._sent.popleft())
        while self._queue:
            waiting, message, _ = self._queue.popleft()
            self._give_back(waiting, message)

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
            self._sent.append((sock, message))
        self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writing:
            self.loop.remove_writer(self.channel)
            self._writing = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def unconfirmed(self) -> int:
        """Sockets sent and not confirmed yet: our copies are still open."""
        return len(self._sent)

    def close(self) -> None:
        """The receiver is gone for good: what it did not confirm goes back (on_gone)."""
        self._give_all_back()
        self.channel.close()


Received = tuple[socket.socket, dict[str, Any], bytes]


def receive_into(loop: asyncio.AbstractEventLoop, channel: socket.socket,
                 on_batch: Callable[[bytes, list[Received]], None],
                 on_eof: Callable[[], None],
                 on_error: Callable[[OSError], None]) -> None:
    """Call ``on_batch(word, sockets)`` with what each wake-up read from
    ``channel``: ``word`` is the note for the sender (``Handoff.confirm``), to
    send before any of ``sockets`` is used. A socket lost in transit
    (``on_error``) does not stop the ones behind it."""
    channel.setblocking(False)

    def readable() -> None:
        word = bytearray()
        batch: list[Received] = []
        eof = False
        while True:
            try:
                got = recv_socket(channel)
            except BlockingIOError:
                break
            except LostSocket as exc:  # out of descriptors: the kernel closed it
                word += LOST
                on_error(exc)
                continue
            except OSError as exc:
                on_error(exc)
                break  # the loop calls us again for what is left
            if got is None:
                eof = True
                break
            word += TAKEN
            batch.append(got)
        if word:
            on_batch(bytes(word), batch)
        if eof:
            loop.remove_reader(channel)
            on_eof()

    loop.add_reader(channel, readable)
