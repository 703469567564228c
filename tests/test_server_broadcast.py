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
    bcast_handshake,
    bcast_hs1,
    expect_fail,
    read_line,
    recv_exact,
    recv_hash,
    recv_skipping,
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
    """Reads and discards; ``seen`` is set once ``enough`` bytes arrived, and
    ``other`` keeps every byte that is not a pump's ``r``."""

    def __init__(self, sock: socket.socket, enough: int) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.enough = enough
        self.total = 0
        self.seen = threading.Event()
        self.other = b""

    def run(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 16):
                self.other += chunk.replace(b"r", b"")
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


def test_bytes_are_dropped_when_nobody_else_is_connected(start_server):
    # One worker: with several, alone's bytes for "everyone" may still be on
    # their way to another worker when late goes live there, and reach it.
    # Dropping across workers is test_server_sharding's
    # test_bytes_for_everyone_that_reach_nobody_count_as_dropped.
    bcast_server = start_server("--mode", "broadcast", "--workers", "1")
    mark = bcast_server.mark()
    alone = raw_client(bcast_server)
    alone.sendall(b"nobody hears this")
    port = port_of(alone)
    alone.close()
    # Its EOF is handled after its bytes: once the session ended they were dealt with.
    bcast_server.wait_log(
        rf"session end chid=None peer=127\.0\.0\.1:{port} .*reason=\"client closed", start=mark)
    late = raw_client(bcast_server)
    other = raw_client(bcast_server)
    other.sendall(b"first")
    assert recv_exact(late, 5) == b"first"


def test_hs1_client_does_the_handshake_and_routes_by_recvers(bcast_server):
    raw = raw_client(bcast_server)
    x, chid, late = bcast_handshake(bcast_server, "x")
    assert chid == "x"
    h, chid, late_h = bcast_handshake(bcast_server, "h", ["x"])
    assert chid == "h"
    # An hs1 too late for the sniff window (retried) was data for everyone.
    late += late_h
    left: dict[socket.socket, list[bytes]] = {}

    def recv(sock: socket.socket, n: int) -> bytes:
        return recv_skipping(sock, n, left.setdefault(sock, list(late)))

    h.sendall(b"only for x")
    assert recv(x, 10) == b"only for x"
    # Had raw got h's bytes, they would come before these.
    marker = raw_client(bcast_server)
    marker.sendall(b"marker")
    assert recv(raw, 6) == b"marker"
    assert recv(x, 6) == b"marker"
    assert recv(h, 6) == b"marker"  # h still receives broadcasts
    # Raw clients' bytes reach h, and h's recvers do not include raw ones.
    raw.sendall(b"raw")
    assert recv(h, 3) == b"raw"
    assert recv(x, 3) == b"raw"
    assert recv(marker, 3) == b"raw"


def test_hs1_client_fails_like_in_chan_mode(bcast_server):
    # bcast_hs1 retries an hs1 too late for the sniff window (then data for
    # everyone), and lists those: the watcher may get them, and nothing else.
    _taken, _, late = bcast_handshake(bcast_server, "taken")
    dup, reply, more = bcast_hs1(bcast_server, {"req": "hs1", "chid": "taken"})
    late += more
    assert expect_fail(dup, reply).startswith("chid in use")
    # Only "req":"hs1" is sniffed: a bad hs1 is a failed handshake, not data.
    watcher = raw_client(bcast_server)
    bad_chid, reply, more = bcast_hs1(bcast_server, {"req": "hs1", "chid": 5})
    late += more
    assert expect_fail(bad_chid, reply) == "chid must be a string"
    bad, reply, more = bcast_hs1(bcast_server, {"req": "hs1"})
    late += more
    assert reply["rsp"] == "hs2"
    send_json(bad, {"req": "hs3", "timeout": -1})
    assert expect_fail(bad).startswith("timeout must be")
    # None of those lines reached the plain client: its first bytes are these.
    marker = raw_client(bcast_server)
    marker.sendall(b"marker")
    assert recv_skipping(watcher, 6, late) == b"marker"


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
        # bcast_handshake parses each reply line as JSON: an interleaved "r"
        # would break hs2 or hs4. (An "r" instead of hs2 is also what an hs1
        # too late for the sniff window gets: it retries those.)
        h, chid, late = bcast_handshake(bcast_server, "h")
        assert chid == "h"
        # With several workers a failed attempt's hs1 may reach h after hs4.
        data = recv_skipping(h, 64 * 1024, list(late))
        assert data == b"r" * len(data)
    finally:
        pump.stop.set()
        for s in (pumping, watcher):
            s.shutdown(socket.SHUT_RDWR)
        pump.join(15)
        drain.join(15)
    assert not pump.is_alive() and not drain.is_alive()
    # The watcher got nothing but "r"s, but for the hs1s of attempts that were
    # too late (data then; the Drain took their "r" out too).
    allowed = {b"".join(late[:n]).replace(b"r", b"") for n in range(len(late) + 1)}
    assert drain.other in allowed, (drain.other, late)


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
        rf"session end chid=None peer=127\.0\.0\.1:{port_of(sender)} .*reason=\"client closed",
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
        rf"session end chid=None peer=127\.0\.0\.1:{port_of(silent)} .*reason=\"idle timeout",
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


def test_an_undecided_connection_that_sends_its_fin_gets_what_was_queued_for_it(start_server):
    """A FIN with no byte before it, inside the sniff window: the connection
    is a plain client after all, and gets what others sent it meanwhile
    before its end, as for any client's EOF (§3.7). Its queue used to be
    thrown away, and counted nowhere."""
    server = start_server("--mode", "broadcast", "--workers", "1")
    mark = server.mark()
    listener = server.connect()  # never sends a byte
    sender = server.connect()  # accepted after it: handled once it exists
    sender.sendall(b"early bytes")
    server.wait_log(live_pattern(sender), start=mark)  # it forwarded them as it went live
    listener.shutdown(socket.SHUT_WR)
    listener.settimeout(10)
    assert recv_exact(listener, 11) == b"early bytes"
    assert listener.recv(100) == b""


def test_an_undecided_connection_keeps_the_newest_bytes_its_queue_can_hold(start_server):
    """--max-buffer bounds what is queued for a connection in its sniff window:
    the oldest bytes go (cut inside a write), so that the queue runs on into
    the live bytes: one piece of the stream, never one with a hole."""
    server = start_server("--mode", "broadcast", "--workers", "1", "--max-buffer", "64KiB")
    parts = [os.urandom(3000), os.urandom(100_000), os.urandom(3000), b"+later"]
    stream = b"".join(parts)
    for _attempt in range(5):
        before = server.ctl_json("status")["drops"].get("sniff_window", 0)
        mark = server.mark()
        listener = server.connect()  # never sends
        sender = server.connect()  # accepted after it: handled once it exists
        for part in parts[:3]:
            sender.sendall(part)
        server.wait_log(live_pattern(listener), start=mark)
        sender.sendall(parts[3])
        got = b""
        while not got.endswith(parts[3]):
            chunk = listener.recv(1 << 16)
            assert chunk, "closed"
            got += chunk
        assert stream.endswith(got), "not one piece of the stream"
        dropped = server.ctl_json("status")["drops"].get("sniff_window", 0) - before
        if dropped:  # else its window ended before the queue was full: again
            assert len(got) == len(stream) - dropped >= 64 * 1024 + len(parts[3])
            return
        listener.close()
        sender.close()
    pytest.fail("the listener never was in its sniff window when the bytes came")


def test_bytes_queued_in_the_sniff_window_are_dropped_when_it_handshakes(bcast_server):
    # h is accepted before the sender (FIFO accept queue), so the sender's bytes
    # are handled while h sniffs and are queued for it; h's hs1 then makes it a
    # handshake client, which must not get them: its stream is hs2, hs4, "after".
    # h's hs1 must arrive within SNIFF_CONNECT_WINDOW (50 ms) of its accept; if a
    # loaded machine misses that, h is a raw client (it then gets the queued
    # line instead of hs2, and the watcher its hs1) and bcast_hs1 tries again.
    watcher = raw_client(bcast_server)
    senders: list[socket.socket] = []
    found = 0  # failed attempts' hs1 lines the watcher got so far

    def send_while_h_sniffs(late: list[bytes]) -> None:
        nonlocal found
        if senders:
            senders.pop().close()
        sender = bcast_server.connect()
        senders.append(sender)
        sender.sendall(b"before h is live\n")
        left = late[found:]
        assert recv_skipping(watcher, 17, left) == b"before h is live\n"
        found = len(late) - len(left)

    h, hs2, _ = bcast_hs1(bcast_server, {"req": "hs1", "chid": "h"}, send_while_h_sniffs)
    assert hs2 == {"rsp": "hs2", "chid": "h"}
    send_json(h, {"req": "hs3"})
    assert read_line(h) == b'{"rsp":"hs4","result":"OK"}\n'
    senders[0].sendall(b"after")
    assert recv_exact(h, 5) == b"after"
    # What h's queue held reached nobody: counted (it was not, before 2026-11-28).
    assert bcast_server.ctl_json("status")["drops"].get("sniff_window", 0) >= 17


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
