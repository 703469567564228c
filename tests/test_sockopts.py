"""Socket options of client connections (--tcp-congestion), and how a
connection is told reset from finished, and reset once its bytes are out."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from typing import Any

import pytest
import uvloop

from fwd.acceptor import open_listeners
from fwd.sockopts import ResetWhenSent, reset_by_peer
from helpers import assert_pair_works, read_until_reset, reset_close

MiB = 1 << 20


def congestion(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


def test_accepted_sockets_get_the_listeners_congestion_control() -> None:
    # reno is built into every kernel and allowed to every user.
    (listener,) = open_listeners([("127.0.0.1", 0)], "reno")
    with listener, socket.create_connection(listener.getsockname()):
        listener.setblocking(True)
        accepted, _ = listener.accept()
        with accepted:
            assert congestion(accepted) == "reno"


def test_without_the_option_the_system_default_stays() -> None:
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        default = f.read().strip()
    (listener,) = open_listeners([("127.0.0.1", 0)])
    with listener:
        assert congestion(listener) == default


def test_an_unknown_congestion_control_stops_the_start_with_the_reason() -> None:
    with pytest.raises(OSError, match=r"--tcp-congestion nosuchcc: the kernel has no such module"):
        open_listeners([("127.0.0.1", 0)], "nosuchcc")
    done = subprocess.run([sys.executable, "-m", "fwd.cli", "--listen", "127.0.0.1:0",
                           "--workers", "1", "--tcp-congestion", "nosuchcc"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr == ("Error: cannot start: --tcp-congestion nosuchcc: the kernel has no "
                           "such module (net.ipv4.tcp_available_congestion_control)\n")


@pytest.mark.both_impls
def test_a_pair_relays_with_another_congestion_control(start_server) -> None:
    assert_pair_works(start_server("--mode", "chan", "--tcp-congestion", "reno"))


class _Holder:
    """What reset_by_peer reads of a transport: its socket (a real one)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None


def _connected() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def test_reset_by_peer_tells_a_reset_from_a_fin() -> None:
    client, server = _connected()
    with client, server:
        client.shutdown(socket.SHUT_WR)
        assert server.recv(1) == b""
        assert not reset_by_peer(_Holder(server))  # CLOSE_WAIT: we may still send
    client, server = _connected()
    with server:
        reset_close(client)
        with pytest.raises(ConnectionResetError):
            server.recv(1)  # takes the error, as a splice or send outside the loop may
        assert server.recv(1) == b""  # now it reads as EOF
        assert reset_by_peer(_Holder(server))


def test_reset_when_sent_delivers_what_was_written_then_resets() -> None:
    """The peer reads nothing until the reset is armed: every byte still
    arrives, then the reset (not a FIN)."""
    client, server = _connected()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    data = os.urandom(8 * MiB)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, server)
        transport.write(data)  # mostly queued: the peer's window is small
        ResetWhenSent(loop, transport, 30.0)
        return await asyncio.to_thread(read_until_reset, client)

    with client:
        assert uvloop.run(main()) == len(data)
