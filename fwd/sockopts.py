"""Socket options every fwd connection gets, server side and fwd-client alike."""
from __future__ import annotations

import socket

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
