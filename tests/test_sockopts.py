"""Socket options of client connections: --tcp-congestion."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from fwd.acceptor import open_listeners
from helpers import assert_pair_works


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
