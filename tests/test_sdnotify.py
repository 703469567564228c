"""systemd notifications (fwd/sdnotify.py): READY=1 once every worker serves,
WATCHDOG=1 while the parent's loop turns, STOPPING=1 at the drain. The server
runs for real, with a datagram socket of ours as its NOTIFY_SOCKET."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from conftest import WORKERS
from fwd.sdnotify import Notifier
from helpers import assert_pair_works


@pytest.fixture
def notify_socket(tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(30)
    yield sock, path
    sock.close()


def messages(sock: socket.socket, until: str) -> list[dict[str, str]]:
    """Datagrams up to and including the first that has ``until`` (KEY=value)."""
    got = []
    while True:
        fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
        got.append(fields)
        key, _, value = until.partition("=")
        if fields.get(key) == value:
            return got


def test_ready_after_every_worker_watchdog_while_running_stopping_at_drain(
        start_server, notify_socket):
    sock, path = notify_socket
    server = start_server("--mode", "chan",
                          env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    before = messages(sock, "READY=1")
    assert not any("WATCHDOG" in m for m in before[:-1]), "pinged before it was ready"
    ready = before[-1]
    assert ready["STATUS"].startswith(f"listening on 127.0.0.1:{server.port}, {WORKERS} worker")
    assert ready["MAINPID"] == str(server.pid)
    assert_pair_works(server)
    # Every 0.1 s (half of WATCHDOG_USEC): three in a row prove it is periodic.
    for _ in range(3):
        assert messages(sock, "WATCHDOG=1")
    # The workers got none of it: only the parent talks to systemd.
    for pid in server.workers():
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert b"NOTIFY_SOCKET" not in f.read()
    server.proc.send_signal(signal.SIGTERM)
    stopping = messages(sock, "STOPPING=1")[-1]
    assert stopping["STATUS"].startswith("draining")
    server.proc.wait(30)
    assert server.proc.returncode == 0


def test_a_missing_notify_socket_is_logged_once_and_harms_nothing(start_server, tmp_path):
    server = start_server("--mode", "chan",
                          env={"NOTIFY_SOCKET": str(tmp_path / "nobody"),
                               "WATCHDOG_USEC": "100000"})
    server.wait_log(r"WARNING .*cannot notify systemd at .*nobody")  # READY=1 was lost
    assert_pair_works(server)
    server.stop()  # STOPPING=1 is lost too, at least
    assert sum("cannot notify systemd" in ln for ln in server.lines) == 1


# -- the parser, without a server ----------------------------------------------------------


def test_environment_is_read_and_removed():
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000", "OTHER": "1"}
    n = Notifier(env)
    assert n.address == "/run/x" and n.watchdog == 15.0
    assert env == {"OTHER": "1"}


@pytest.mark.parametrize("env, address, watchdog", [
    ({}, "", None),
    ({"NOTIFY_SOCKET": "@fwd/notify"}, "\0fwd/notify", None),
    ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "0"}, "/s", None),
    ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "junk"}, "/s", None),
    ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, "/s", None),
    ({"NOTIFY_SOCKET": "/s", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())},
     "/s", 1.0),
    ({"WATCHDOG_USEC": "2000000"}, "", None),
])
def test_environment_variants(env, address, watchdog):
    n = Notifier(dict(env))
    assert (n.address, n.watchdog, bool(n)) == (address, watchdog, bool(address))
    n.send("READY=1")  # without a socket: nothing, and no error
    n.close()
