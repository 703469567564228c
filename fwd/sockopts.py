"""Socket options every fwd connection gets, server side and fwd-client alike,
and the one way they end abruptly."""
from __future__ import annotations

import asyncio
import errno
import socket
import struct

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


def reset(transport: asyncio.WriteTransport) -> None:
    """Abort with a TCP reset. A plain close, even transport.abort(), lets the
    kernel send what it holds and then a FIN, so a receiver whose queued bytes
    were dropped (slow consumer, expired linger) would take the cut stream for
    a finished one; a reset says it was cut, as RFC 793's ABORT does."""
    sock = transport.get_extra_info("socket")
    # uvloop's transport socket reads fileno -1 once the handle is closed, so
    # this cannot reach a reused descriptor.
    if sock is not None and sock.fileno() >= 0:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:  # already closed by the peer: nothing to tell it
            pass
    transport.abort()


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
