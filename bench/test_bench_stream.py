"""Throughput of one 1->1 stream through a chan pair, against direct loopback.

Run with ``pytest bench --benchmark-only``; compare the two rows of the table
(they run in the same session, so machine noise hits both alike).
"""
from __future__ import annotations

import socket
import threading

import pytest

from helpers import pair

TOTAL = 64 << 20
BLOCK = 64 << 10
PAYLOAD = memoryview(bytes(BLOCK))


def _pump(src: socket.socket, dst: socket.socket) -> None:
    def send() -> None:
        for _ in range(TOTAL // BLOCK):
            src.sendall(PAYLOAD)

    t = threading.Thread(target=send)
    t.start()
    buf = bytearray(1 << 20)
    left = TOTAL
    while left:
        n = dst.recv_into(buf, min(left, len(buf)))
        assert n
        left -= n
    t.join()


@pytest.mark.benchmark(group="stream-64KiB")
def test_direct_loopback(benchmark):
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    benchmark.extra_info["bytes"] = TOTAL
    benchmark.pedantic(_pump, args=(a, b), rounds=5)
    for s in (a, b, lsock):
        s.close()


@pytest.mark.benchmark(group="stream-64KiB")
def test_fwd_chan_pair(benchmark, chan_server):
    a, b = pair(chan_server)
    benchmark.extra_info["bytes"] = TOTAL
    benchmark.pedantic(_pump, args=(a, b), rounds=5)
