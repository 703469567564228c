"""Listening sockets and the accept loop of the parent process.

The acceptor reads nothing from clients: it accepts and hands each socket to a
worker at once, so a slow or hostile client costs the parent one accept. It
owns the accept loop itself (rather than a uvloop server) because the sockets
leave the process, and because running out of file descriptors must shed new
connections instead of spinning or stopping the listener: a reserve descriptor
is given up to accept and close what waits, as libuv and nginx do.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable

from .config import format_hostport
from .sockopts import set_congestion, set_keepalive

log = logging.getLogger("fwd.acceptor")

ACCEPT_BATCH = 64
"""Accepts per readiness event: bounds the time one listener holds the loop."""
BACKLOG = 1024
EMFILE_PAUSE = 0.1
"""How long a listener rests when no descriptor at all can be freed to shed."""


def open_listeners(addresses: list[tuple[str, int]],
                   congestion: str | None = None) -> list[socket.socket]:
    """Bind every address (each name may resolve to several); IPv6 sockets are
    IPv6-only, so ``0.0.0.0`` and ``[::]`` can be listed together. Accepted
    sockets inherit the listener's ``congestion`` control (see set_congestion)."""
    sockets: list[socket.socket] = []
    try:
        for host, port in addresses:
            try:
                infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
            except socket.gaierror as exc:
                raise OSError(f"--listen {format_hostport(host, port)}: {exc.strerror}") from None
            seen = set()
            for family, type_, proto, _, addr in infos:
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                sock = socket.socket(family, type_, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                set_keepalive(sock)  # accepted sockets inherit it (Linux): no call per client
                if congestion is not None:
                    set_congestion(sock, congestion)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(addr)
                except OSError as exc:  # say which listener: there may be several
                    where = format_hostport(*addr[:2])
                    raise OSError(f"--listen {where}: {exc.strerror}") from None
                sock.listen(BACKLOG)
                sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def describe(listeners: list[socket.socket]) -> str:
    return ",".join(format_hostport(*s.getsockname()[:2]) for s in listeners)


class Acceptor:
    """Accept on every listener and pass each new socket to ``dispatch``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listeners: list[socket.socket],
                 dispatch: Callable[[socket.socket, tuple[str, int]], None]) -> None:
        self.loop = loop
        self.listeners = listeners
        self.dispatch = dispatch
        self.shed = 0
        self._reserve = -1
        self._last_shed_log = -1e9

    def start(self) -> None:
        self._reserve = os.open(os.devnull, os.O_RDONLY)
        for sock in self.listeners:
            self.loop.add_reader(sock, self._accept, sock)

    def stop(self) -> None:
        """Stop accepting; connections still in the backlog are reset."""
        for sock in self.listeners:
            self.loop.remove_reader(sock)
            sock.close()
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._shed_backlog(listener)
                else:
                    log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.dispatch(sock, addr[:2])

    def _resume(self, listener: socket.socket) -> None:
        if listener.fileno() >= 0:
            self.loop.add_reader(listener, self._accept, listener)

    def _shed_backlog(self, listener: socket.socket) -> None:
        """Out of descriptors: close what waits, so the listener stops firing."""
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1
        shed = 0
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                break
            sock.close()
            shed += 1
            if shed >= ACCEPT_BATCH:
                break
        try:
            self._reserve = os.open(os.devnull, os.O_RDONLY)
        except OSError:  # still out: the next EMFILE sheds without a reserve
            self._reserve = -1
        self.shed += shed
        if not shed:
            # Not even the reserve freed a slot: rest this listener briefly
            # rather than let a level-triggered readiness event spin the loop.
            self.loop.remove_reader(listener)
            self.loop.call_later(EMFILE_PAUSE, self._resume, listener)
        now = self.loop.time()
        if shed and now - self._last_shed_log >= 1.0:
            self._last_shed_log = now
            log.warning("out of file descriptors: closed %d new connections (%d so far)",
                        shed, self.shed)
