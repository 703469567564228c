"""Broadcast mode over real sockets: raw all-to-all relaying, first-line
sniffing (hs1 handshake or data), listen-only clients, bulk byte-exactness.

A raw client counts as registered once the server logged its
``session start chid=None peer=127.0.0.1:<port>`` line; that, and bytes on sockets, are
the only synchronisation used.
"""
from __future__ import annotations

import os
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from helpers import (
    Sender,
    expect_fail,
    handshake,
    read_json,
    read_line,
    recv_exact,
    recv_hash,
    send_json,
)

MiB = 1 << 20


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def live_pattern(sock: socket.socket, chid: str = "None") -> str:
    return rf"session start chid={re.escape(chid)} peer=127\.0\.0\.1:{port_of(sock)} "


def raw_client(server: Any) -> socket.socket:
    """A raw (no handshake) client, returned once the server has made it live."""
    mark = server.mark()
    sock = server.connect()
    server.wait_log(live_pattern(sock), start=mark)
    return sock


def log_index(server: Any, pattern: str, start: int) -> int:
    server.wait_log(pattern, start=start)
    rx = re.compile(pattern)
    with server.cond:
        return next(i for i in range(start, len(server.lines)) if rx.search(server.lines[i]))


class Pump(threading.Thread):
    """Sends ``chunk`` over and over until stopped (or the socket breaks)."""

    def __init__(self, sock: socket.socket, chunk: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.chunk = chunk
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.sock.sendall(self.chunk)
        except OSError:
            pass


class Drain(threading.Thread):
    """Reads and discards; ``seen`` is set once ``enough`` bytes arrived."""

    def __init__(self, sock: socket.socket, enough: int) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.enough = enough
        self.total = 0
        self.seen = threading.Event()
        self.bad = b""

    def run(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 16):
                if chunk.strip(b"r"):
                    self.bad = chunk
                self.total += len(chunk)
                if self.total >= self.enough:
                    self.seen.set()
        except OSError:
            pass


def test_raw_bytes_go_to_every_other_client(bcast_server):
    a, b, c = (raw_client(bcast_server) for _ in range(3))
    a.sendall(b"from-a")
    assert recv_exact(b, 6) == b"from-a"
    assert recv_exact(c, 6) == b"from-a"
    b.sendall(b"from-b")
    assert recv_exact(c, 6) == b"from-b"
    # a's own bytes, had they come back, would come before b's.
    assert recv_exact(a, 6) == b"from-b"
    c.sendall(b"from-c")
    assert recv_exact(a, 6) == b"from-c"
    # b got a's bytes and c's, never its own.
    assert recv_exact(b, 6) == b"from-c"


def test_bytes_are_dropped_when_nobody_else_is_connected(bcast_server):
    mark = bcast_server.mark()
    alone = raw_client(bcast_server)
    alone.sendall(b"nobody hears this")
    port = port_of(alone)
    alone.close()
    # Its EOF is handled after its bytes: once the session ended they were dealt with.
    bcast_server.wait_log(rf"session end chid=None peer=127\.0\.0\.1:{port} .*reason=client closed",
                          start=mark)
    late = raw_client(bcast_server)
    other = raw_client(bcast_server)
    other.sendall(b"first")
    assert recv_exact(late, 5) == b"first"


def test_hs1_client_does_the_handshake_and_routes_by_recvers(bcast_server):
    raw = raw_client(bcast_server)
    x = bcast_server.connect()
    assert handshake(x, "x") == "x"
    h = bcast_server.connect()
    assert handshake(h, "h", ["x"]) == "h"
    h.sendall(b"only for x")
    assert recv_exact(x, 10) == b"only for x"
    # Had raw got h's bytes, they would come before these.
    marker = raw_client(bcast_server)
    marker.sendall(b"marker")
    assert recv_exact(raw, 6) == b"marker"
    assert recv_exact(x, 6) == b"marker"
    assert recv_exact(h, 6) == b"marker"  # h still receives broadcasts
    # Raw clients' bytes reach h, and h's recvers do not include raw ones.
    raw.sendall(b"raw")
    assert recv_exact(h, 3) == b"raw"
    assert recv_exact(x, 3) == b"raw"
    assert recv_exact(marker, 3) == b"raw"


def test_hs1_client_fails_like_in_chan_mode(bcast_server):
    taken = bcast_server.connect()
    handshake(taken, "taken")
    dup = bcast_server.connect()
    send_json(dup, {"req": "hs1", "chid": "taken"})
    assert expect_fail(dup).startswith("chid in use")
    # Only "req":"hs1" is sniffed: a bad hs1 is a failed handshake, not data.
    watcher = raw_client(bcast_server)
    bad_chid = bcast_server.connect()
    send_json(bad_chid, {"req": "hs1", "chid": 5})
    assert expect_fail(bad_chid) == "chid must be a string"
    bad = bcast_server.connect()
    send_json(bad, {"req": "hs1"})
    assert read_json(bad)["rsp"] == "hs2"
    send_json(bad, {"req": "hs3", "timeout": -1})
    assert expect_fail(bad).startswith("timeout must be")
    # None of those lines reached the plain client: its first bytes are these.
    marker = raw_client(bcast_server)
    marker.sendall(b"marker")
    assert recv_exact(watcher, 6) == b"marker"


def test_hs1_client_gets_nothing_before_hs4_while_others_send(bcast_server):
    watcher = raw_client(bcast_server)
    drain = Drain(watcher, 256 * 1024)
    drain.start()
    pumping = raw_client(bcast_server)
    pump = Pump(pumping, b"r" * 512)
    pump.start()
    try:
        # The broadcast stream is flowing before the handshake client connects.
        assert drain.seen.wait(15), "pump never reached the watcher"
        h = bcast_server.connect()
        # helpers.handshake parses each reply line as JSON: an interleaved "r"
        # would break hs2 or hs4.
        assert handshake(h, "h") == "h"
        data = recv_exact(h, 64 * 1024)
        assert data == b"r" * len(data)
    finally:
        pump.stop.set()
        for s in (pumping, watcher):
            s.shutdown(socket.SHUT_RDWR)
        pump.join(15)
        drain.join(15)
    assert not pump.is_alive() and not drain.is_alive()
    assert drain.bad == b""


@pytest.mark.parametrize("first", [
    b'{"type":"chat"}\n',
    b'{"req":"hs3","recvers":[]}\n',
    b'{"req":"hs2"}\n{"req":"hs1"}\n',
    b'{"req": hs1}\n',
    b'{"req":"hs1"} trailing\n',
    b"[1]\n",
    b'{"req":"hs1","chid":"\xff"}\n',
], ids=["chat", "hs3", "hs2-then-hs1", "not-json", "trailing-garbage", "array", "bad-utf8"])
def test_first_line_that_is_not_hs1_is_data(bcast_server, first):
    recv = raw_client(bcast_server)
    sender = bcast_server.connect()
    sender.sendall(first)
    assert recv_exact(recv, len(first)) == first
    # The sender got no hs2: the first bytes it reads are recv's.
    recv.sendall(b"reply")
    assert recv_exact(sender, 5) == b"reply"


def test_brace_without_newline_is_forwarded_after_the_line_window(bcast_server):
    recv = raw_client(bcast_server)
    sender = bcast_server.connect()
    sender.sendall(b'{"req":"hs1"')  # no newline, and nothing more is sent
    recv.settimeout(10)
    assert recv_exact(recv, 12) == b'{"req":"hs1"'
    # The rest of what would have been an hs1 is now just data too.
    sender.sendall(b"}\n")
    assert recv_exact(recv, 2) == b"}\n"
    recv.sendall(b"reply")
    assert recv_exact(sender, 5) == b"reply"


def test_long_brace_line_without_newline_is_data(bcast_server):
    recv = raw_client(bcast_server)
    sender = bcast_server.connect()
    data = b"{" + b"z" * 8191
    sender.sendall(data)
    assert recv_exact(recv, len(data)) == data


@pytest.mark.parametrize("first", [b"h", b"hello\n", b"\x00\xff", b" {\"req\":\"hs1\"}\n"],
                         ids=["one-byte", "line", "binary", "space-then-hs1"])
def test_first_byte_not_brace_is_data(bcast_server, first):
    recv = raw_client(bcast_server)
    sender = bcast_server.connect()
    sender.sendall(first)
    assert recv_exact(recv, len(first)) == first
    recv.sendall(b"reply")
    assert recv_exact(sender, 5) == b"reply"


@pytest.mark.parametrize("first", [b'{"req":"hs1"', b"{"], ids=["hs1-prefix", "brace"])
def test_eof_while_undecided_forwards_what_was_sent(bcast_server, first):
    recv = raw_client(bcast_server)
    mark = bcast_server.mark()
    sender = bcast_server.connect()
    sender.sendall(first)
    sender.shutdown(socket.SHUT_WR)
    assert recv_exact(recv, len(first)) == first
    bcast_server.wait_log(
        rf"session end chid=None peer=127\.0\.0\.1:{port_of(sender)} .*reason=client closed",
        start=mark)
    sender.settimeout(10)
    assert sender.recv(100) == b""


def test_idle_timeout_applies_to_plain_clients(start_server):
    server = start_server("--mode", "broadcast", "--idle-timeout", "1")
    mark = server.mark()
    silent = raw_client(server)
    silent.settimeout(10)
    assert silent.recv(100) == b""
    server.wait_log(
        rf"session end chid=None peer=127\.0\.0\.1:{port_of(silent)} .*reason=idle timeout",
        start=mark)


def test_listen_only_client_receives_broadcasts(bcast_server):
    listener = raw_client(bcast_server)  # never sends a byte
    sender = raw_client(bcast_server)
    for msg in (b"one", b"two", b"three"):
        sender.sendall(msg)
        assert recv_exact(listener, len(msg)) == msg


def test_bytes_sent_during_a_new_clients_sniff_window_are_queued(start_server):
    # One worker: the FIFO accept order below says nothing about which of two
    # workers adopts its connection first (the sender's may go live before
    # the listener exists in the other worker, and nothing is queued for it).
    bcast_server = start_server("--mode", "broadcast", "--workers", "1")
    mark = bcast_server.mark()
    listener = bcast_server.connect()  # never sends
    # Accepted after the listener (one listening socket, FIFO accept queue), so
    # its bytes are handled after the listener exists.
    sender = bcast_server.connect()
    sender.sendall(b"early bytes")
    listener.settimeout(10)
    assert recv_exact(listener, 11) == b"early bytes"
    sender.sendall(b"+later")
    assert recv_exact(listener, 6) == b"+later"
    sent_at = log_index(bcast_server, live_pattern(sender), mark)
    live_at = log_index(bcast_server, live_pattern(listener), mark)
    # The sender went live (and forwarded) while the listener was still sniffing.
    assert sent_at < live_at, bcast_server.lines[mark:]


def test_bytes_queued_in_the_sniff_window_are_dropped_when_it_handshakes(bcast_server):
    # h is accepted before the sender (FIFO accept queue), so the sender's bytes
    # are handled while h sniffs and are queued for it; h's hs1 then makes it a
    # handshake client, which must not get them: its stream is hs2, hs4, "after".
    # h's hs1 must arrive within SNIFF_CONNECT_WINDOW (50 ms) of its accept; if a
    # loaded machine misses that, h is a raw client (it then gets the queued
    # line instead of hs2) and the attempt is repeated.
    watcher = raw_client(bcast_server)
    for _attempt in range(5):
        h = bcast_server.connect()
        sender = bcast_server.connect()
        sender.sendall(b"before h is live\n")
        assert recv_exact(watcher, 17) == b"before h is live\n"
        send_json(h, {"req": "hs1", "chid": "h"})
        first = read_line(h)
        if first == b"before h is live\n":
            h.close()
            sender.close()
            continue
        assert first == b'{"rsp":"hs2","chid":"h"}\n'
        send_json(h, {"req": "hs3"})
        assert read_line(h) == b'{"rsp":"hs4","result":"OK"}\n'
        sender.sendall(b"after")
        assert recv_exact(h, 5) == b"after"
        return
    pytest.fail("h never sent its hs1 within the sniff window")


@pytest.mark.both_impls
def test_mib_payload_byte_exact_to_three_receivers(bcast_server):
    receivers = [raw_client(bcast_server) for _ in range(3)]
    sender = raw_client(bcast_server)
    size = 8 * MiB
    pump = Sender(sender, size)
    with ThreadPoolExecutor(3) as pool:
        digests = [pool.submit(recv_hash, r, size) for r in receivers]
        pump.start()
        results = [d.result(timeout=120) for d in digests]
    pump.finish()
    assert results == [pump.digest] * 3
    # Nothing extra follows, and the sender never got its own bytes.
    receivers[0].sendall(b"end")
    assert recv_exact(sender, 3) == b"end"
    for r in receivers[1:]:
        assert recv_exact(r, 3) == b"end"


def test_random_first_bytes_survive_sniffing(bcast_server):
    recv = raw_client(bcast_server)
    for first in (b"{", b"{\n", b"{{{{", b"{" + os.urandom(100)):
        sender = bcast_server.connect()
        sender.sendall(first)
        assert recv_exact(recv, len(first)) == first
        sender.close()
