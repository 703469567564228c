"""Socket options every fwd connection gets, server side and fwd-client alike,
and the one way they end abruptly."""
from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

KEEPALIVE = (30, 10, 3)
"""TCP keepalive: idle seconds, probe interval, probes. A vanished peer (or a NAT
that forgot us) is found in about a minute, not the kernel's two hours."""


def set_keepalive(sock: socket.socket) -> None:
    idle, interval, count = KEEPALIVE
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    except (OSError, AttributeError):  # pragma: no cover - non-Linux
        pass


_LINGER_RESET = struct.pack("ii", 1, 0)
_TCP_CLOSE = 7  # tcp_info.tcpi_state, linux/tcp_states.h
_TCP_LAST_ACK = 9
FIN_ANSWER_WAIT = 1.0
"""Seconds a client waits for the peer to answer its FIN sent after the peer's own."""


def reset(transport: asyncio.WriteTransport) -> int:
    """Abort with a TCP reset. A plain close, even transport.abort(), lets the
    kernel send what it holds and then a FIN, so a receiver whose queued bytes
    were dropped (slow consumer, expired linger) would take the cut stream for
    a finished one; a reset says it was cut, as RFC 793's ABORT does. Returns
    what the reset destroys in the kernel: bytes written, not acknowledged
    (the transport's own buffer the caller can read itself)."""
    sock = transport.get_extra_info("socket")
    lost = 0
    # uvloop's transport socket reads fileno -1 once the handle is closed, so
    # this cannot reach a reused descriptor.
    if sock is not None and sock.fileno() >= 0:
        lost = _outq(sock)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:  # already closed by the peer: nothing to tell it
            pass
    transport.abort()
    return lost


RESET_BY_PEER = ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))


def _state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def await_fin_answer(sock: socket.socket, timeout: float = FIN_ANSWER_WAIT) -> None:
    """After our FIN behind the peer's (LAST_ACK), wait for the peer's answer:
    an ACK, or a reset if it had closed for good, which then refused what we
    sent after its FIN. Raises ConnectionResetError for a reset, which would
    otherwise come after we took the end for a clean one. Loopback answers at
    once, a remote peer within a round trip; past ``timeout``, nothing is said."""
    deadline = time.monotonic() + timeout
    try:
        while _state(sock) == _TCP_LAST_ACK:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.001)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:  # not TCP, or closed meanwhile
        return
    if err == errno.ECONNRESET:
        raise ConnectionResetError(err, os.strerror(err))


def reset_by_peer(transport: asyncio.BaseTransport) -> bool:
    """Whether an EOF just read from ``transport`` is really a reset (or
    another fatal error), if we have not sent our own FIN. A splice(2) or
    send(2) done outside the transport (the fast path, a pump's thread) takes
    the socket's pending error, and a read then returns 0 as for a FIN; but
    after their FIN alone the connection is still open for our sending
    (CLOSE_WAIT), after a reset it is CLOSE. (After both FINs it is CLOSE too:
    Linux hands TIME_WAIT to a stand-in socket.)"""
    sock = transport.get_extra_info("socket")
    try:
        return sock is not None and sock.fileno() >= 0 and _state(sock) == _TCP_CLOSE
    except OSError:
        return False


def error_reset(transport: asyncio.BaseTransport) -> bool:
    """Whether the socket's pending error is a reset, which tells one apart
    from a clean close after our own FIN, where reset_by_peer cannot (both
    are CLOSE). Reading the error clears it: for a connection being closed."""
    sock = transport.get_extra_info("socket")
    try:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if sock is not None else 0
    except OSError:
        return False
    return err in (errno.ECONNRESET, errno.EPIPE)


def unacked(transport: asyncio.WriteTransport) -> int:
    """Bytes written to ``transport`` that its peer has not acknowledged yet:
    the transport's own buffer plus the kernel's send queue (SIOCOUTQ)."""
    queued = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return queued
    try:
        if _state(sock) == _TCP_CLOSE:
            return 0  # reset by the peer: nothing more will be acknowledged
    except OSError:
        return queued
    return queued + _outq(sock)


def _outq(sock: socket.socket) -> int:
    """The kernel's send queue (SIOCOUTQ): written, not acknowledged; 0 once
    the peer reset."""
    try:
        if _state(sock) == _TCP_CLOSE:
            return 0
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # = SIOCOUTQ
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


class ResetWhenSent:
    """Reset a connection once its peer holds everything written to it, or
    after ``limit`` seconds. This is how a relay passes on a cut stream
    (its other half was reset): the bytes that did arrive are delivered, and
    the reset still tells the client the stream was cut. A reset sent at once
    would destroy them; a close would end with a FIN that reads as a finished
    stream. Reading is paused meanwhile. ``cancel`` stops it, like a timer.
    With ``acked``, a peer that took everything in time gets that instead
    (a close: fwd-client's stop, where a cut is known only at the limit)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                 limit: float, abort: Callable[[asyncio.Transport], Any] = reset,
                 acked: Callable[[asyncio.Transport], Any] | None = None) -> None:
        self.loop = loop
        self.transport = transport
        self.abort = abort  # the reset, by whoever counts what it destroys
        self.acked = abort if acked is None else acked
        self.deadline = loop.time() + limit
        self.delay = 0.001
        transport.pause_reading()
        self.handle: asyncio.Handle = loop.call_soon(self._check)

    def _check(self) -> None:
        t = self.transport
        if t.is_closing():
            return
        if not unacked(t):  # also 0 once the peer reset: that is no delivery
            (self.abort if reset_by_peer(t) else self.acked)(t)
            return
        if self.loop.time() >= self.deadline:
            self.abort(t)
            return
        self.delay = min(self.delay * 2, 0.05)  # loopback acks in microseconds, a WAN in ms
        self.handle = self.loop.call_later(self.delay, self._check)

    def hurry(self, limit: float) -> None:
        """Reset within ``limit`` seconds at the latest (a shutdown)."""
        self.deadline = min(self.deadline, self.loop.time() + limit)

    def cancel(self) -> None:
        self.handle.cancel()


def set_congestion(sock: socket.socket, name: str) -> None:
    """Use TCP congestion control ``name`` on ``sock`` (and on the sockets a
    listener accepts). Why a relay may want this: BBR, a common default, paces
    every send with a timer, which costs a relay that sends to many receivers
    on a LAN or loopback about twice the CPU per byte at times (bench/README.md,
    "Congestion control"); cubic and reno do not pace."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            why = "the kernel has no such module (net.ipv4.tcp_available_congestion_control)"
        elif exc.errno == errno.EPERM:
            why = ("not allowed without CAP_NET_ADMIN "
                   "(net.ipv4.tcp_allowed_congestion_control)")
        else:
            why = exc.strerror or str(exc)
        raise OSError(f"--tcp-congestion {name}: {why}") from None


def congestion_of_new_sockets(name: str | None) -> str:
    """What the sockets fwd accepts get: ``name`` (--tcp-congestion), else the
    system default, as a fresh socket reports it ("" where unknown)."""
    if name:
        return name
    try:
        with socket.socket() as probe:
            raw = probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    except (OSError, AttributeError):  # pragma: no cover - non-Linux
        return ""
    return raw.split(b"\0", 1)[0].decode()


def paces(congestion: str) -> bool:
    """Whether TCP paces each send with a timer under this congestion control
    (BBR does; cubic and reno do not). Fan-out by tee(2) makes the relay
    faster than BBR lets bytes out, and on a VM every throttled send then
    costs a timer: fan-out 1->10 measured 4,297 MiB/s copied against 2,840
    with tee under BBR, and 6,727 against 9,736 under cubic
    (docs/ARCHITECTURE.md, "Fan-out through tee")."""
    return congestion.startswith("bbr")
