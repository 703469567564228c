"""Client library: open a relay session in one call, asyncio or blocking.

Every client of fwd-server repeats the same few steps: connect, run the
handshake through a buffer (stream bytes may arrive in the same segment as the
hs4 line), turn an hs4 FAIL into an error a program can report, and optionally
wrap the stream in end-to-end encryption (fwd/e2e.py). This module does those
steps once, on top of the sans-I/O ``Handshake`` of fwd/protocol.py.

Two entry points:

* ``await open_session(host, port, ...)`` returns ``(reader, writer, chid)``:
  asyncio ``StreamReader``/``StreamWriter`` (or, with ``e2e_key``, objects with
  the same methods that encrypt and decrypt transparently).
* ``connect(host, port, ...)`` returns a ``Connection``: a socket-like object
  (``sendall``, ``recv``, ``shutdown_write``, ``close``, ``abort``, ``chid``) for plain
  scripts and threads. ``splice_stdio(conn)`` copies stdin/stdout through it
  (the core of fwd-cat).

Handshake or not: ``handshake=True`` (the default) runs hs1..hs4 and is what
chan mode requires. ``handshake=False`` is a plain broadcast client: raw bytes
from the first byte on, no chid (``chid`` is returned as ``None``), and
``chid``/``recvers``/``timeout``/``password`` are then refused. Pointed at a
chan-mode server, such a client reads the server's hs4 FAIL line as data
(``splice_stdio`` recognises it and raises ``HandshakeError``).

Errors: ``HandshakeError`` (a ``FwdError``) when the server refuses (its
``desc`` is kept) or the handshake breaks; ``OSError`` for network errors;
``TimeoutError`` when connect plus handshake take longer than
``connect_timeout`` (``HandshakeTimeout`` if it connected); ``E2EError``
from reads when the encrypted stream is not authentic or is truncated.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

from .crypto import REJECTED
from .e2e import Decoder, E2EError, E2EKey, Encoder, as_key
from .errors import FwdError, RemoteProtocolError
from .protocol import (
    MAX_LINE,
    NEED_DATA,
    PAUSED,
    PLAIN,
    REFUSAL_WAIT,
    REFUSED_AT_ACCEPT,
    SERVER_CLOSED,
    Handshake,
    Hs1,
    Hs2,
    Hs3,
    Hs4,
    LineCodec,
    Role,
    refusal,
)
from .sockopts import await_fin_answer, set_keepalive

__all__ = [
    "Connection", "E2EError", "E2EKey", "E2EStreamReader", "E2EStreamWriter", "HandshakeError",
    "HandshakeTimeout", "SessionReader", "SessionWriter", "StdioError", "connect", "open_session",
    "splice_stdio",
]

READ_SIZE = 64 * 1024
CONNECT_TIMEOUT = 10.0
"""Default limit, in seconds, for connect plus handshake."""
STDIN_LINGER = 0.5
"""splice_stdio: once the relay ended the stream toward us, how long stdin may
stay quiet before our direction ends too (socat's ``-t`` is 0.5 s as well)."""
_DRAIN = b"d"
_MAX_POLL_MS = 2**31 - 1  # poll()'s timeout is a C int


class StdioError(OSError):
    """splice_stdio could not read its input or write its output: a local
    failure (a full disk, a bad descriptor), not the connection's."""


class HandshakeError(FwdError):
    """The server refused the session (hs4 FAIL) or the handshake broke off.

    ``desc`` is the server's reason as it sent it (e.g. ``chid in use: a``), or
    what went wrong locally (e.g. ``the server closed the connection during
    the handshake``: a server that refuses a connection in broadcast mode,
    over its limits, sends no FAIL line).
    """

    def __init__(self, desc: str, hint: str | None = None, *, refused: bool = True) -> None:
        # A wrong password already reads "handshake rejected": don't say it
        # twice; ``refused=False``: our reading of the reply failed instead.
        prefix = "" if desc.startswith(REJECTED) or not refused else "handshake rejected: "
        super().__init__(prefix + desc + (f": {hint}" if hint else ""))
        self.desc = desc


class HandshakeTimeout(TimeoutError):
    """Connected, but the handshake got no answer in time: the address is not
    a fwd-server, or one that does not handshake (broadcast mode without a
    password takes an hs1 it cannot read for payload, and stays silent)."""

    def __init__(self, seconds: float | None) -> None:
        within = "" if seconds is None else f" within {seconds:g}s"
        super().__init__(f"connected, but the server did not answer the handshake{within} "
                         "(is it a fwd-server, in chan mode or with a password?)")


PASSWORD_HINT = "the server has a password: give --password or set FWD_PASSWORD"
NO_PASSWORD_HINT = "our handshake is encrypted: the server may have no password, or another one"
"""A server without a password reads an encrypted hs1 as a line that is not JSON."""


def password_hint(desc: str, encrypted: bool) -> str | None:
    """The likely password mismatch behind an hs4 FAIL, if any."""
    if not encrypted and desc == REJECTED:  # what a password server tells a stranger
        return PASSWORD_HINT
    if encrypted and desc == "not JSON":
        return NO_PASSWORD_HINT
    return None


def refused_hint(desc: str, handshake_options: str) -> str:
    """Why a server refused a client that sent no handshake, and the option to
    give: a password server (either mode) refuses it as a stranger, a chan
    server as a client with no chid."""
    if desc.startswith(REJECTED):
        return PASSWORD_HINT
    if desc in REFUSED_AT_ACCEPT:  # the connection itself: not a question of chan mode
        return (f"the server refused the connection ({desc}), and it wants a handshake "
                f"(chan mode, or a password): give {handshake_options}")
    return f"the server is in chan mode and wants a handshake ({desc}): give {handshake_options}"


# -- the handshake, shared by both front ends ---------------------------------------


def _recvers_tuple(recvers: Iterable[str] | str | None) -> tuple[str, ...]:
    if recvers is None:
        return ()
    if isinstance(recvers, str):  # one chid, not its characters
        return (recvers,)
    return tuple(recvers)


@functools.lru_cache(maxsize=8)
def _password_key(password: str) -> bytes:
    """scrypt once per password and process (PROTOCOL.md §7.2), not per connection."""
    try:
        from .crypto import derive_key
    except ImportError:  # pragma: no cover - depends on the installation
        raise FwdError("password mode needs fwd.crypto, which this fwd lacks") from None
    return derive_key(password)


def _password_codec(key: bytes) -> LineCodec:
    from .crypto import AeadLineCodec

    codec: LineCodec = AeadLineCodec(key, Role.CLIENT)
    return codec


class _ClientHandshake:
    """Drives ``Handshake(Role.CLIENT)``; the I/O layer only moves bytes.

    hs3 is sent after hs2 arrives, not pipelined with hs1: with a password the
    server's hs2 carries a nonce that hs3 must echo.
    """

    def __init__(self, chid: str | None, recvers: tuple[str, ...], timeout: int | None,
                 codec: LineCodec, senders: tuple[str, ...] | None = None) -> None:
        try:  # the server's own checks, so a bad argument is a ValueError, not a FAIL
            self.hs1 = Hs1(chid or None)
            Hs3(recvers, timeout, senders=senders)
        except RemoteProtocolError as exc:
            raise ValueError(exc.desc) from None
        self.recvers = recvers
        self.timeout = timeout
        self.senders = senders
        self.hs = Handshake(Role.CLIENT, codec)
        self.plain = codec is PLAIN
        self.chid: str | None = None
        self.done = False

    def hello(self) -> bytes:
        return self.hs.send(self.hs1)

    def receive(self, data: bytes) -> bytes:
        """Feed received bytes (``b""`` = EOF); return bytes to send; raise on refusal."""
        hs = self.hs
        hs.receive_data(data)
        out = b""
        try:
            while True:
                event = hs.next_event()
                if event is NEED_DATA or event is PAUSED:
                    return out
                if isinstance(event, Hs2):
                    self.chid = event.chid
                    # With a password hs2 carries a nonce, and hs3 echoes it.
                    out += hs.send(Hs3(self.recvers, self.timeout, event.nonce, self.senders))
                elif isinstance(event, Hs4):
                    if not event.ok:
                        hint = password_hint(event.desc or "", encrypted=not self.plain)
                        raise HandshakeError(event.desc or "(no reason given)", hint)
                    self.done = True
                    return out
        except RemoteProtocolError as exc:
            if exc.desc == SERVER_CLOSED:
                raise HandshakeError(exc.desc) from None
            # Not the server's word but our reading of its reply, which may
            # not be a fwd-server's at all (not its "not JSON" refusal).
            raise HandshakeError(f"the server's reply is not a fwd handshake line ({exc.desc}): "
                                 "is it a fwd-server?", refused=False) from None

    def trailing(self) -> bytes:
        """Stream bytes that came in the same read as the hs4 line."""
        return self.hs.trailing_data


def _check_mode(handshake: bool, chid: str | None, recvers: tuple[str, ...],
                timeout: int | None, password: str | None,
                senders: tuple[str, ...] | None) -> None:
    if not handshake and (chid or recvers or timeout is not None or password is not None
                          or senders is not None):
        raise ValueError("chid, recvers, senders, timeout and password need the handshake "
                         "(handshake=False is a plain broadcast client)")


# -- asyncio ---------------------------------------------------------------------------


class SessionReader(Protocol):
    """What ``open_session`` returns to read with: the asyncio.StreamReader subset."""

    async def read(self, n: int = -1) -> bytes: ...

    async def readexactly(self, n: int) -> bytes: ...

    async def readuntil(self, separator: bytes = b"\n") -> bytes: ...

    async def readline(self) -> bytes: ...

    def at_eof(self) -> bool: ...


class SessionWriter(Protocol):
    """What ``open_session`` returns to write with: the asyncio.StreamWriter subset."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None: ...

    def write_eof(self) -> None: ...

    def can_write_eof(self) -> bool: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    def is_closing(self) -> bool: ...

    async def wait_closed(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


async def open_session(
    host: str, port: int, chid: str | None = None, recvers: Iterable[str] | str | None = None,
    timeout: int | None = None, password: str | None = None,
    e2e_key: E2EKey | str | bytes | None = None, *, handshake: bool = True,
    connect_timeout: float | None = CONNECT_TIMEOUT,
    senders: Iterable[str] | str | None = None,
) -> tuple[SessionReader, SessionWriter, str | None]:
    """Connect, handshake, and return ``(reader, writer, chid)`` ready for raw data.

    ``chid=None`` lets the server pick one (returned); ``recvers`` empty means
    every other live session; ``timeout`` is the idle timeout the server
    applies. ``password`` encrypts the handshake (server ``--password``).
    ``e2e_key`` (an ``E2EKey`` or the shared secret) encrypts the stream end to
    end. ``handshake=False``: plain broadcast client, ``chid`` is ``None``.
    ``senders``: receive only from these chids (None: from anyone; an exposed
    service would otherwise hear every sender to "everyone else"). Slow key
    derivations run in the default executor, before connecting, so the event
    loop keeps running and hs1 still goes out right after connect (broadcast
    mode gives it 50 ms).
    """
    recv = _recvers_tuple(recvers)
    send = None if senders is None else _recvers_tuple(senders)
    _check_mode(handshake, chid, recv, timeout, password, send)
    loop = asyncio.get_running_loop()
    driver: _ClientHandshake | None = None
    if handshake:
        codec: LineCodec = PLAIN
        if password is not None:
            codec = _password_codec(await loop.run_in_executor(None, _password_key, password))
        driver = _ClientHandshake(chid, recv, timeout, codec, send)
    key: E2EKey | None = None
    if e2e_key is not None:
        key = await loop.run_in_executor(None, as_key, e2e_key)

    connected = False

    async def establish() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        nonlocal connected
        reader, writer = await asyncio.open_connection(host, port)
        connected = True
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                set_keepalive(sock)
            if driver is not None:
                await _handshake_async(driver, reader, writer)
        except BaseException:
            writer.close()
            raise
        return reader, writer

    try:
        reader, writer = await asyncio.wait_for(establish(), connect_timeout)
    except asyncio.TimeoutError:
        if connected:
            raise HandshakeTimeout(connect_timeout) from None
        raise TimeoutError(f"cannot connect within {connect_timeout:g}s") from None
    chid_out = driver.chid if driver is not None else None
    if key is None:
        return reader, writer, chid_out
    enc = Encoder(key)
    return E2EStreamReader(reader, Decoder(key, enc.salt)), E2EStreamWriter(writer, enc), chid_out


async def _handshake_async(driver: _ClientHandshake, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
    # Read one line at a time: whatever follows the hs4 line stays in the
    # StreamReader's buffer, so held stream bytes reach the caller's reads.
    writer.write(driver.hello())
    while not driver.done:
        eof = False
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            line, eof = exc.partial, True
        except asyncio.LimitOverrunError:
            raise HandshakeError(f"line longer than {MAX_LINE} bytes") from None
        out = driver.receive(line)
        if eof and not driver.done:
            driver.receive(b"")  # raises: closed during the handshake
        if out:
            writer.write(out)
    assert not driver.trailing()  # nothing was read past the hs4 line


LINE_LIMIT = 1 << 16
"""E2EStreamReader.readuntil's limit, asyncio.StreamReader's default."""


class E2EStreamReader:
    """Decrypting stand-in for ``asyncio.StreamReader``.

    It reads from the transport only when its caller wants data, so TCP flow
    control works as with a plain reader. A read returns only authenticated
    plaintext; EOF comes after the peer's FINAL record, and an E2EError
    replaces EOF when the stream was cut short or changed.
    """

    def __init__(self, raw: asyncio.StreamReader, decoder: Decoder,
                 limit: int = LINE_LIMIT) -> None:
        self.raw = raw
        self.decoder = decoder
        self.limit = limit  # readuntil's, as asyncio.StreamReader's
        self._buf = bytearray()
        self._eof = False

    async def _fill(self) -> None:
        self.decoder.check()
        if self.decoder.finished:
            self._eof = True
            return
        try:
            data = await self.raw.read(READ_SIZE)
        except ConnectionResetError:  # a reset before FINAL is a truncation too
            data = b""
        if data:
            self._buf += self.decoder.feed(data)
            if self.decoder.finished:
                self._eof = True
        else:
            self.decoder.feed_eof()  # raises (again on every read) if the stream was cut
            self._eof = True

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        if n < 0:
            while not self._eof:
                await self._fill()
            return self._take(len(self._buf))
        while not self._buf and not self._eof:
            await self._fill()
        return self._take(n)

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n and not self._eof:
            await self._fill()
        if len(self._buf) < n:
            raise asyncio.IncompleteReadError(self._take(len(self._buf)), n)
        return self._take(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        start = 0
        while (i := self._buf.find(separator, start)) < 0:
            if len(self._buf) > self.limit:  # the bytes stay, as with asyncio
                raise asyncio.LimitOverrunError(
                    "Separator is not found, and chunk exceed the limit", len(self._buf))
            if self._eof:
                raise asyncio.IncompleteReadError(self._take(len(self._buf)), None)
            start = max(0, len(self._buf) - len(separator) + 1)
            await self._fill()
        if i + len(separator) > self.limit:
            raise asyncio.LimitOverrunError(
                "Separator is found, but chunk is longer than limit", i)
        return self._take(i + len(separator))

    async def readline(self) -> bytes:
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError as exc:  # as asyncio.StreamReader.readline
            i = self._buf.find(b"\n")
            del self._buf[:i + 1 if i >= 0 else len(self._buf)]
            raise ValueError(exc.args[0]) from None

    def at_eof(self) -> bool:
        return self._eof and not self._buf

    def __aiter__(self) -> E2EStreamReader:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class E2EStreamWriter:
    """Encrypting stand-in for ``asyncio.StreamWriter``.

    ``write_eof`` and ``close`` send the FINAL record first, so the peer can
    tell a finished stream from a cut one; ``transport.abort()`` does not.
    """

    def __init__(self, raw: asyncio.StreamWriter, encoder: Encoder) -> None:
        self.raw = raw
        self.encoder = encoder

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self.raw.transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        out = self.encoder.encode(data)
        if out:
            self.raw.write(out)

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in data:
            self.write(chunk)

    def _finish(self) -> None:
        if not self.encoder.finished and not self.raw.is_closing():
            self.raw.write(self.encoder.finish())

    def write_eof(self) -> None:
        self._finish()
        self.raw.write_eof()

    def can_write_eof(self) -> bool:
        return self.raw.can_write_eof()

    async def drain(self) -> None:
        await self.raw.drain()

    def close(self) -> None:
        try:
            self._finish()
        except RuntimeError:  # the raw writer was already half-closed: nothing more to say
            pass
        self.raw.close()

    def is_closing(self) -> bool:
        return self.raw.is_closing()

    async def wait_closed(self) -> None:
        await self.raw.wait_closed()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.raw.get_extra_info(name, default)


# -- blocking ------------------------------------------------------------------------------


class Connection:
    """A live session over a blocking socket: ``sendall``/``recv`` carry stream data.

    ``recv`` first returns the bytes that arrived together with the hs4 line,
    then reads the socket; with end-to-end encryption it returns only
    authenticated plaintext, ``b""`` after the peer's FINAL record, and raises
    E2EError for a truncated or altered stream. ``sendall`` from one thread
    while another ``recv``s is fine (as with a socket). Since those bytes wait
    here, not in the socket, a program that polls ``fileno()`` checks
    ``pending()`` first, as with ``ssl.SSLSocket``.

    ``close()`` (and leaving a ``with`` block normally) ends the session as
    finished: with encryption it sends the FINAL record first. ``abort()``
    (and leaving a ``with`` block by an exception) resets it instead, so the
    peer cannot take a cut stream for a whole one.
    """

    def __init__(self, sock: socket.socket, chid: str | None, pending: bytes = b"",
                 key: E2EKey | None = None) -> None:
        self.sock = sock
        self.chid = chid
        self._pending = bytearray(pending)
        self._plain = bytearray()
        """Encrypted mode: authenticated plaintext not returned yet."""
        self._encoder: Encoder | None = None
        self._decoder: Decoder | None = None
        if key is not None:
            self._encoder = Encoder(key)
            self._decoder = Decoder(key, self._encoder.salt)
        self._write_closed = False
        self._send_lock = threading.Lock()
        """Encrypted mode: encode-and-send is one step, so records leave in counter order
        and two threads can never draw the same nonce."""
        self._send_error: OSError | None = None  # see _send_records

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        if self._encoder is None:
            self.sock.sendall(data)
            return
        if self._write_closed:  # what the socket itself says after shutdown(SHUT_WR)
            raise BrokenPipeError(errno.EPIPE, "send after shutdown_write()")
        with self._send_lock:
            self._send_records(self._encoder.encode(data))

    def _send_records(self, out: bytes) -> None:
        """A record cut by a failed send (a timeout, say) leaves the stream
        broken for good: every later send raises that failure again, rather
        than sending records the peer can only refuse."""
        if self._send_error is not None:
            raise self._send_error
        try:
            if out:
                self.sock.sendall(out)
        except OSError as exc:
            self._send_error = exc
            raise

    def recv(self, bufsize: int = READ_SIZE) -> bytes:
        """Up to ``bufsize`` bytes of stream data; ``b""`` at the end of the stream."""
        if bufsize <= 0:
            return b""
        dec = self._decoder
        if dec is None:
            if self._pending:
                data = bytes(self._pending[:bufsize])
                del self._pending[:bufsize]
                return data
            return self.sock.recv(bufsize)
        plain = self._plain
        while not plain:
            dec.check()
            if dec.finished:
                return b""
            if self._pending:  # bytes that came with the hs4 line, not decoded yet
                raw = bytes(self._pending)
                self._pending.clear()
            else:
                try:
                    raw = self.sock.recv(max(bufsize, READ_SIZE))
                except ConnectionResetError:  # a reset before FINAL is a truncation too,
                    if not dec.started:       # but before any stream byte, just a reset
                        raise
                    raw = b""
                if not raw:
                    dec.feed_eof()  # raises unless the stream ended with its FINAL record
                    return b""
            plain += dec.feed(raw)
        data = bytes(plain[:bufsize])
        del plain[:bufsize]
        return data

    @property
    def write_closed(self) -> bool:
        """Our direction has ended (``shutdown_write``)."""
        return self._write_closed

    def pending(self) -> int:
        """Stream bytes ``recv`` can return at once, held here rather than in
        the socket (those that came with the hs4 line; decrypted plaintext)."""
        return len(self._plain) if self._decoder is not None else len(self._pending)

    def shutdown_write(self, final: bool = True) -> None:
        """Half-close: no more data from us (in a chan pair the partner gets the FIN).

        With encryption the FINAL record goes first; ``final=False`` sends no
        stream at all if nothing was sent yet (a receive-only session in a
        one-sender room must not add a second encrypted sender)."""
        if self._write_closed:
            return
        self._write_closed = True
        enc = self._encoder
        if enc is not None and (final or enc.started):
            with self._send_lock:
                self._send_records(enc.finish())
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise
            # The server reset the connection (a refusal at accept, a cut
            # stream): say that, not the socket's "not connected".
            raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)) from None
        # The server's FIN came first: its reset of what we sent since may
        # still be on its way.
        await_fin_answer(self.sock)

    def shutdown(self, how: int) -> None:
        """``socket.shutdown``, ending the encrypted stream properly first."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self.shutdown_write()
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self.sock.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        """Close as finished; an encrypted stream gets its FINAL record first if
        it can be sent now (after a failure, ``abort``).

        If another thread is stuck sending (the peer is not reading), the FINAL
        record is skipped rather than waiting: the peer then reports truncation.
        """
        enc = self._encoder
        try:
            if enc is not None and not self._write_closed and self.sock.fileno() >= 0 \
                    and self._send_lock.acquire(blocking=False):
                try:
                    if not enc.finished:
                        self.sock.setblocking(False)  # a full send buffer must not block close
                        self.sock.send(enc.finish())
                finally:
                    self._send_lock.release()
        except OSError:
            pass
        finally:
            self._close()

    def abort(self) -> None:
        """Reset the session (RST): what we sent may be cut, and the peer
        must not take it for a finished stream, as a FIN (or the FINAL
        record) would say. For every exit that is not a normal end. Threads
        blocked in ``recv`` or ``sendall`` wake up with an error."""
        sock = self.sock
        if sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            _disconnect(sock)
        sock.close()

    def _close(self) -> None:
        sock = self.sock
        if sock.fileno() >= 0 and _unread(sock):
            self.abort()  # the kernel resets anyway: no FIN first, to pass for an end
            return
        with contextlib.suppress(OSError):  # wakes threads blocked in recv() or sendall()
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def settimeout(self, value: float | None) -> None:
        self.sock.settimeout(value)

    def fileno(self) -> int:
        return self.sock.fileno()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _unread(sock: socket.socket) -> int:
    """Bytes received that nobody read (FIONREAD)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def _disconnect(sock: socket.socket) -> None:
    """Reset a connection at once, waking threads blocked on it: connect()
    to AF_UNSPEC (Linux's tcp_disconnect sends the RST). Closing alone would
    wait for a thread blocked in send() to let go of the socket."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        unspec = ctypes.create_string_buffer(16)  # a sockaddr with sa_family 0
        libc.connect(sock.fileno(), unspec, ctypes.sizeof(unspec))
    except (OSError, AttributeError):  # pragma: no cover - no libc: the close resets
        pass


def connect(
    host: str, port: int, chid: str | None = None, recvers: Iterable[str] | str | None = None,
    timeout: int | None = None, password: str | None = None,
    e2e_key: E2EKey | str | bytes | None = None, *, handshake: bool = True,
    connect_timeout: float | None = CONNECT_TIMEOUT,
    senders: Iterable[str] | str | None = None,
) -> Connection:
    """Blocking ``open_session``: same arguments, returns a ``Connection``.

    For scripts and threads that do not run an event loop. ``connect_timeout``
    bounds connect plus handshake; the returned socket is blocking.
    """
    recv = _recvers_tuple(recvers)
    send = None if senders is None else _recvers_tuple(senders)
    _check_mode(handshake, chid, recv, timeout, password, send)
    driver: _ClientHandshake | None = None
    if handshake:
        codec: LineCodec = PLAIN
        if password is not None:
            codec = _password_codec(_password_key(password))  # slow: before connecting
        driver = _ClientHandshake(chid, recv, timeout, codec, send)
    key = as_key(e2e_key) if e2e_key is not None else None
    # One deadline for both steps (though create_connection gives each address
    # of a name that resolves to several the whole timeout).
    deadline = None if connect_timeout is None else time.monotonic() + connect_timeout
    sock = socket.create_connection((host, port), timeout=connect_timeout)
    pending = b""
    try:
        set_keepalive(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if driver is not None:
            _handshake_blocking(driver, sock, deadline, connect_timeout)
            pending = driver.trailing()
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return Connection(sock, driver.chid if driver is not None else None, pending, key)


def _handshake_blocking(driver: _ClientHandshake, sock: socket.socket,
                        deadline: float | None, seconds: float | None) -> None:
    sock.sendall(driver.hello())
    while not driver.done:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandshakeTimeout(seconds)
            sock.settimeout(left)
        try:
            data = sock.recv(READ_SIZE)
        except TimeoutError:
            raise HandshakeTimeout(seconds) from None
        out = driver.receive(data)  # b"" (EOF) raises in receive
        if out:
            sock.sendall(out)


def splice_stdio(conn: Connection, in_fd: int | None = 0, out_fd: int = 1,
                 linger: float = STDIN_LINGER) -> None:
    """Copy ``in_fd`` to the session and the session to ``out_fd`` (what fwd-cat does).

    Each direction ends on its own, as TCP's half-close allows: EOF on
    ``in_fd`` half-closes the session (in a chan pair the server passes the FIN
    on to the partner) and reading goes on. When the relay ends the stream
    toward us (the partner's FIN, or its FINAL record), the partner may still
    be reading: what ``in_fd`` still delivers is sent, a file to its end, a
    pipe or terminal until it has been quiet for ``linger`` seconds; then our
    direction ends too (FIN, and the FINAL record with end-to-end encryption)
    and this returns. What ``in_fd`` delivers after that stays unread (the
    thread that reads it stops). It also returns when nobody reads ``out_fd``
    any more (``fwd-cat ... | head -c 10``), as cat would stop. With
    ``in_fd`` None nothing is sent, and our direction ends only when the
    relay's does (``nc -d``: a receiver whose stdin is not a terminal), and
    with encryption it sends no stream of its own (in a one-sender room that
    would be a second sender) but requires one: an end with no stream byte is
    a truncation. A reader of ``in_fd`` takes such an end for a peer that sent
    no stream (a ``-d`` receiver, a room). Raises the first error of either
    direction (OSError, StdioError for ``in_fd`` or ``out_fd``, E2EError), or
    HandshakeError when a connection made without a handshake meets a
    chan-mode server that refuses it. Returns normally with our direction
    ended (``write_closed``) unless nobody read ``out_fd``: a caller then
    ``abort()``s, as after an error, since our stream was cut.
    """
    errors: list[BaseException] = []
    wake_r, wake_w = os.pipe()  # tells the stdin thread to finish (_DRAIN) or stop

    def upstream() -> None:
        poller = select.poll()
        if in_fd is not None:
            poller.register(in_fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        quiet: int | None = None  # poll's timeout in ms once draining, else none
        try:
            while True:
                events = poller.poll(quiet)
                if not events:  # draining, and in_fd has nothing more for now
                    conn.shutdown_write(final=in_fd is not None)
                    return
                if any(fd == wake_r for fd, _ in events):
                    if os.read(wake_r, 1) != _DRAIN:
                        return
                    quiet = min(max(0, round(linger * 1000)), _MAX_POLL_MS)
                    continue
                assert in_fd is not None  # only in_fd and wake_r are polled
                try:
                    data = os.read(in_fd, READ_SIZE)
                except OSError as exc:
                    raise StdioError(exc.errno, f"reading stdin: {exc.strerror}") from None
                if not data:
                    conn.shutdown_write()
                    return
                conn.sendall(data)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            try:  # wake the reader; no FIN: our stream is cut (the caller aborts)
                conn.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    thread = threading.Thread(target=upstream, name="fwd-stdin", daemon=True)
    thread.start()
    try:
        if _downstream(conn, out_fd, need_stream=in_fd is None) and not errors:
            os.write(wake_w, _DRAIN)
            thread.join()  # ended by in_fd's EOF, its quiet, or an error
    except (OSError, E2EError):
        if errors:  # the first failure explains the second
            raise errors[0] from None
        raise
    finally:
        os.write(wake_w, b"x")
        thread.join(1.0)  # longer only while a send waits for the peer: close() ends it
        if not thread.is_alive():
            os.close(wake_r)
            os.close(wake_w)
    if errors:
        raise errors[0]


def _closes_after(sock: socket.socket, n: int) -> bool:
    """Whether the peer ends the connection after the ``n`` bytes it has sent,
    within REFUSAL_WAIT (False as soon as more bytes come)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n + 1)
    try:  # readable: a byte more, or the end
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLRDHUP)
        if not poller.poll(REFUSAL_WAIT * 1000):
            return False
        try:
            return len(sock.recv(n + 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)) <= n
        except BlockingIOError:
            return False
        except OSError:  # reset right after the line
            return True
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _downstream(conn: Connection, out_fd: int, need_stream: bool) -> bool:
    """Copy the session to ``out_fd``: True when the relay ended the stream,
    False when nobody reads ``out_fd`` any more. Without ``need_stream`` an
    end before any byte of an encrypted stream is no error (splice_stdio)."""
    if conn.chid is None and not conn._pending:
        # No handshake: a chan server's refusal (its hs4 FAIL line, plain even
        # on an encrypted stream) must not pass for data, nor for a bad stream.
        first = conn.sock.recv(READ_SIZE, socket.MSG_PEEK)
        desc = refusal(first)
        if desc is not None and _closes_after(conn.sock, len(first)):
            raise HandshakeError(refused_hint(desc, "--chid or --to"))
    while True:
        try:
            data = conn.recv(READ_SIZE)
        except E2EError:
            dec = conn._decoder
            if need_stream or dec is None or dec.started:
                raise
            return True  # the peer sent no stream: a receive-only session, a room
        if not data:
            return True
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(out_fd, view):]
        except BrokenPipeError:  # the reader of out_fd is gone: not an error of ours
            return False
        except OSError as exc:
            raise StdioError(exc.errno, f"writing stdout: {exc.strerror}") from None
