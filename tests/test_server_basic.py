"""The happy paths of both modes, over real sockets, on both data paths."""
from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Server
from helpers import (
    assert_pair_works,
    claim_again,
    flood_until_stalled,
    handshake,
    pair,
    read_until_reset,
    recv_exact,
    reset_close,
    stream_both_ways,
    wait_until,
)

pytestmark = pytest.mark.both_impls
MiB = 1 << 20


def test_chan_pair_byte_exact_both_ways(chan_server):
    stream_both_ways(*pair(chan_server), 8 * MiB)


def test_generated_chid_is_unique_and_url_safe(chan_server):
    chids = {chan_server.handshake()[1] for _ in range(20)}
    assert len(chids) == 20
    for c in chids:
        assert 8 <= len(c) <= 32 and all(ch.isalnum() or ch in "-_" for ch in c)


def test_broadcast_without_handshake_reaches_every_other_client(bcast_server):
    mark = bcast_server.mark()
    receivers = [bcast_server.connect() for _ in range(3)]
    bcast_server.wait_log(r"session start chid=None", start=mark, count=3)
    sender = bcast_server.connect()
    sender.sendall(b"hello everyone")
    for r in receivers:
        assert recv_exact(r, 14) == b"hello everyone"


def test_fresh_pair_after_start(chan_server):
    assert_pair_works(chan_server)


def test_chan_pair_passes_half_close_on_both_ways(chan_server):
    """A FIN from one side of a pair reaches the other, and the reverse direction
    keeps flowing until it too is closed (socat semantics)."""
    sa, sb = pair(chan_server)
    sa.sendall(b"request")
    sa.shutdown(socket.SHUT_WR)
    assert recv_exact(sb, 7) == b"request"
    assert sb.recv(1) == b""  # A's FIN, passed on
    sb.sendall(b"response after EOF")
    sb.shutdown(socket.SHUT_WR)
    assert recv_exact(sa, 18) == b"response after EOF"
    assert sa.recv(1) == b""
    chan_server.wait_log(r"session end chid=a .*reason=\"half-closed both ways")
    chan_server.wait_log(r"session end chid=b .*reason=\"half-closed both ways")


def half_closed_before_b(server: Server, data: bytes) -> socket.socket:
    """a names b, which is not there yet, sends ``data`` and half-closes."""
    sa, _ = server.handshake("a", ["b"])
    sa.sendall(data)
    sa.shutdown(socket.SHUT_WR)
    sa.settimeout(30)
    return sa


def test_a_fin_sent_before_the_partner_came_reaches_it_after_the_held_bytes(chan_server):
    """a names b, sends, and half-closes before b is there: a waits, half-closed,
    for its pair partner to be, which then gets a's bytes and a's FIN, and can
    still answer (§3.7)."""
    mark = chan_server.mark()
    sa = half_closed_before_b(chan_server, b"early")
    chan_server.wait_log(r"chid=a half-closed; waits for chid=b", start=mark)
    sb, _ = chan_server.handshake("b", ["a"])
    assert recv_exact(sb, 5) == b"early"
    assert sb.recv(1) == b""  # a's FIN
    sb.sendall(b"answer")
    sb.shutdown(socket.SHUT_WR)
    assert recv_exact(sa, 6) == b"answer"
    assert sa.recv(1) == b""
    chan_server.wait_log(r"session end chid=a .*reason=\"half-closed both ways", start=mark)
    chan_server.wait_log(r"session end chid=b .*reason=\"half-closed both ways", start=mark)


def test_a_half_closed_session_whose_partner_never_comes_is_reset(start_server):
    """Its bytes expired unread (--hold-seconds): its stream was cut."""
    server = start_server("--mode", "chan", "--hold-seconds", "1")
    assert read_until_reset(half_closed_before_b(server, b"lost")) == 0
    server.wait_log(r"session end chid=a .*reason=\"pair partner never came")


def test_a_half_closed_session_waits_as_long_as_its_own_bytes_are_held(start_server):
    """Older bytes from another sender for b expire first: a, whose bytes came
    later, still waits, and b coming then pairs with it."""
    server = start_server("--mode", "chan", "--hold-seconds", "3")
    mark = server.mark()
    sc, _ = server.handshake("c", ["b", "x"])  # no pair: its bytes are just held
    sc.sendall(b"from c")
    sc.close()
    time.sleep(1.5)  # the subject: a's bytes are held well after c's
    half_closed_before_b(server, b"from a")
    server.wait_log(r"dropped 12 held bytes older than 3s", start=mark)  # c's, for b and x
    sb, _ = server.handshake("b", ["a"])
    assert recv_exact(sb, 6) == b"from a"
    assert sb.recv(1) == b""  # a's FIN: a still waited
    sb.close()


def test_a_half_closed_session_waits_longer_than_its_idle_timeout(chan_server):
    """Waiting for its partner is no idling: the hold bounds it."""
    mark = chan_server.mark()
    sa, _ = chan_server.handshake("a", ["b"], timeout=1)
    sa.sendall(b"early")
    sa.shutdown(socket.SHUT_WR)
    chan_server.wait_log(r"chid=a half-closed; waits for chid=b", start=mark)
    time.sleep(2)  # the subject: outlast a's idle timeout
    sb, _ = chan_server.handshake("b", ["a"])
    assert recv_exact(sb, 5) == b"early"
    assert sb.recv(1) == b""  # a's FIN: a still waited
    sb.close()


def test_a_half_closed_session_whose_held_bytes_were_dropped_is_reset(start_server):
    """The hold for its partner to be was full (--hold-bytes): that partner
    would get a cut stream, so the sender learns it at its FIN."""
    server = start_server("--mode", "chan", "--hold-bytes", "1000")
    assert read_until_reset(half_closed_before_b(server, os.urandom(5000))) == 0
    server.wait_log(r"session end chid=a .*reason=\"held bytes dropped\" dropped=4000")


def test_a_fin_after_its_bytes_were_delivered_ends_the_sender_though_others_are_held(
        start_server):
    """b came, read a's held bytes and left; then c left bytes for b. a's FIN
    used to find the hold for b not empty and a's first hold time, so a
    waited for b half-closed and was reset ("pair partner never came")."""
    server = start_server("--mode", "chan", "--hold-seconds", "2")
    sa, _ = server.handshake("a", ["b"])
    sa.sendall(b"from a")
    wait_until(lambda: server.ctl_json("status")["totals"]["held_bytes"] == 6, 10, "held")
    sb, _ = server.handshake("b", ["nobody"])  # no pair
    assert recv_exact(sb, 6) == b"from a"
    mark = server.mark()
    sb.close()
    server.wait_log(r"session end chid=b ", start=mark)
    sc, _ = server.handshake("c", ["b"])
    sc.sendall(b"from c")
    wait_until(lambda: server.ctl_json("status")["totals"]["held_bytes"] == 6, 10, "held")
    sa.shutdown(socket.SHUT_WR)
    sa.settimeout(30)
    assert sa.recv(1) == b""  # a FIN: nothing of a's waits for b
    server.wait_log(r"session end chid=a .*reason=\"client closed\"", start=mark)


def test_a_senders_fin_ignores_what_an_earlier_session_of_its_chid_left_held(start_server):
    """a's first session sent, and was reset: its bytes stay held for b. A
    new session of a that sends nothing and half-closes has nothing of its
    own waiting for b: its FIN ends it at once. It used to take the old
    session's bytes for its own and wait, half-closed, for b."""
    server = start_server("--mode", "chan", "--hold-seconds", "30")
    first, _ = server.handshake("a", ["b"])
    first.sendall(b"first try, cut")
    wait_until(lambda: server.ctl_json("status")["totals"]["held_bytes"] == 14, 10, "held")
    mark = server.mark()
    reset_close(first)
    server.wait_log(r"session end chid=a ", start=mark)
    again, _ = server.handshake("a", ["b"])
    again.shutdown(socket.SHUT_WR)
    again.settimeout(30)
    assert again.recv(1) == b""
    server.wait_log(r"session end chid=a .*reason=\"client closed\"", start=mark)


def test_a_sender_whose_held_bytes_expired_in_part_is_reset_at_its_fin(start_server):
    """a's first bytes for b expired before b came: b would get a stream
    without its start. a's FIN used to wait for b, which then got the rest
    and a's FIN, and a a clean end."""
    server = start_server("--mode", "chan", "--hold-seconds", "1")
    mark = server.mark()
    sa, _ = server.handshake("a", ["b"])
    sa.sendall(b"part 1;")
    server.wait_log(r"dropped 7 held bytes older than", start=mark)
    sa.sendall(b"part 2")
    sa.shutdown(socket.SHUT_WR)
    server.wait_log(r"chid=a half-closed; waits|session end chid=a ", start=mark)
    sb, _ = server.handshake("b", ["a"])  # the pair it waited for, if it did
    sb.shutdown(socket.SHUT_WR)
    sa.settimeout(30)
    assert read_until_reset(sa) == 0
    server.wait_log(r"session end chid=a .*reason=\"held bytes dropped\" dropped=7", start=mark)


def test_a_sender_whose_hold_overflowed_is_reset_at_its_fin_in_the_pair_it_forms(start_server):
    """a's bytes for b did not all fit the hold; b then came as a's pair
    partner. a's FIN used to be passed on to b, which took its cut stream
    for a whole one, and a got a clean end."""
    server = start_server("--mode", "chan", "--hold-bytes", "1000")
    mark = server.mark()
    sa, _ = server.handshake("a", ["b"])
    sa.sendall(os.urandom(5000))
    server.wait_log(r"dropping bytes for absent receiver chid=b", start=mark)
    sb, _ = server.handshake("b", ["a"])
    assert len(recv_exact(sb, 1000)) == 1000
    sa.shutdown(socket.SHUT_WR)
    sa.settimeout(30)
    assert read_until_reset(sa) == 0
    assert read_until_reset(sb) == 0  # pair partner lost
    server.wait_log(r"session end chid=a .*reason=\"held bytes dropped\" dropped=4000",
                    start=mark)


def test_a_sender_waiting_for_its_partner_is_reset_when_the_server_stops(start_server):
    """a's bytes wait in the hold for b when the server stops: they die with
    it, so a's stream was cut; it used to end with a FIN."""
    server = start_server("--mode", "chan")
    mark = server.mark()
    sa = half_closed_before_b(server, b"important")
    server.wait_log(r"chid=a half-closed; waits for chid=b", start=mark)
    server.proc.send_signal(signal.SIGTERM)
    assert read_until_reset(sa) == 0
    server.wait_log(r"session end chid=a .*reason=\"server shutdown\"", start=mark)


def test_a_half_closed_session_ends_when_its_receiver_comes_but_is_no_partner(chan_server):
    """b comes, naming someone else: no pair, a's FIN ends a as anywhere else;
    b gets a's bytes but no FIN (b still hears from others)."""
    mark = chan_server.mark()
    sa = half_closed_before_b(chan_server, b"early")
    chan_server.wait_log(r"chid=a half-closed; waits for chid=b", start=mark)
    sb, _ = chan_server.handshake("b", ["c"])
    assert recv_exact(sb, 5) == b"early"
    assert sa.recv(1) == b""  # the server closed a
    chan_server.wait_log(r"session end chid=a .*reason=\"client closed", start=mark)
    sc, _ = chan_server.handshake("c", ["b"])
    sc.sendall(b"more")
    assert recv_exact(sb, 4) == b"more"


def test_half_closed_side_is_closed_when_its_partner_leaves(chan_server):
    sa, sb = pair(chan_server)
    sa.shutdown(socket.SHUT_WR)
    assert sb.recv(1) == b""
    # B vanishes without a FIN (RST): A can neither send nor hear from anyone
    # now, and B's stream to A was cut, so A is reset too.
    reset_close(sb)
    assert read_until_reset(sa) == 0
    chan_server.wait_log(r"session end chid=a .*reason=\"pair partner lost")


def test_a_reset_in_a_pair_resets_the_partner_after_what_got_through(chan_server):
    """A pair is one stream: when one half is cut, the other gets every byte the
    server had read, then a reset, and its chid is freed; nothing is held for
    whoever claims the lost chid next."""
    sa, sb = pair(chan_server)
    # A small window keeps bytes for b in the server's buffers when a goes.
    sb.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    mark = chan_server.mark()
    with ThreadPoolExecutor(1) as pool:
        got_b = pool.submit(read_until_reset, sb)
        sa.sendall(os.urandom(8 * MiB))
        reset_close(sa)  # what is still in a's kernel is lost with it
        got_a = chan_server.wait_log(
            r"session end chid=a .* in=(\d+) .*reason=\"connection lost", start=mark)
        chan_server.wait_log(r"session end chid=b .*reason=\"pair partner lost", start=mark)
        assert got_b.result(timeout=30) == int(got_a.group(1))
    again = claim_again(chan_server, "b", ["a"])  # b's chid is free
    new_a = claim_again(chan_server, "a", ["b"])
    again.sendall(b"fresh")
    assert recv_exact(new_a, 5) == b"fresh"  # first bytes: nothing old was held


def test_a_reset_after_a_half_close_resets_the_partner(chan_server):
    """A has sent its FIN, B still streams to A, and A is reset: B's stream was
    cut, so B is reset too instead of streaming into a hold for A's chid."""
    sa, sb = pair(chan_server)
    sa.shutdown(socket.SHUT_WR)
    assert sb.recv(1) == b""
    sb.sendall(b"to a")
    assert recv_exact(sa, 4) == b"to a"
    mark = chan_server.mark()
    reset_close(sa)  # the server meets the reset when it next writes to a
    sb.settimeout(30)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        sb.sendall(b"x" * (64 * MiB))
    chan_server.wait_log(r"session end chid=b .*reason=\"pair partner lost", start=mark)


def _cut_mid_stream(server: Server, n: int) -> tuple[bool, str]:
    """B (a small window) sends A 100 KiB, which A reads last; A streams
    12 MiB to B, then its FIN; B reads 2 MiB of it and resets. Returns
    whether A's sending went through, and how A's stream from B ended."""
    sa, _ = server.handshake(f"a{n}", [f"b{n}"])
    # Set before connecting, so that B's kernel cannot take megabytes that B
    # never reads ("acknowledged is not read": after that, B's reset would
    # come after the server's FIN, and read as B's FIN).
    sb = socket.socket()
    server.sockets.append(sb)
    sb.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sb.settimeout(30)
    sb.connect((server.host, server.port))
    handshake(sb, f"b{n}", [f"a{n}"])
    sb.sendall(b"b" * 100 * 1024)

    def b_side() -> None:
        recv_exact(sb, 2 * MiB)
        reset_close(sb)

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(b_side)
        try:
            sa.settimeout(30)
            sa.sendall(os.urandom(12 * MiB))
            sa.shutdown(socket.SHUT_WR)
            sent = True
        except OSError:  # A met the reset itself
            sent = False
        done.result(timeout=30)
    try:
        while sa.recv(65536):
            pass
        return sent, "EOF"
    except ConnectionResetError:
        return sent, "reset"


def test_a_reset_met_by_a_send_is_not_taken_for_a_fin_later(chan_server):
    """A send to B that meets B's reset takes the socket's error, and B's
    read then finds 0, as for a FIN. Once A's FIN was passed on to B, B's
    socket is closed either way (reset_by_peer cannot tell), so only the
    failed send can: A must not get a clean end for a stream B never read."""
    for n in range(6):  # the send meets the reset first in some tries only
        sent, end = _cut_mid_stream(chan_server, n)
        # After a reset met while sending, A's read finds 0 too: A saw it.
        assert end == "reset" or not sent, f"try {n}: a clean end for a cut stream"


@pytest.mark.parametrize("opts", [(), ("--pump-pairs", "0"), ("--splice-min", "0")],
                         ids=["default", "no-pumps", "no-splice"])
def test_what_a_reset_receiver_missed_is_counted_as_dropped(start_server, opts):
    """Once every session ended, each byte read from a client was written to
    a socket (bytes_out) or dropped (dropped_bytes), once, whichever way B's
    reset met A's stream: a send that met it counted its bytes as neither."""
    server = start_server("--mode", "chan", "--hold-bytes", "0", *opts)
    for n in range(4):
        _cut_mid_stream(server, n)

    def settled() -> bool:
        totals = server.ctl_json("status")["totals"]
        return totals["open_connections"] == 0 and totals["buffered_bytes"] == 0

    wait_until(settled, 30, "every connection closed")
    totals = server.ctl_json("status")["totals"]
    assert totals["bytes_in"] == totals["bytes_out"] + totals["dropped_bytes"], totals


def test_eof_outside_a_pair_ends_the_session(chan_server):
    """In a room (recvers naming several, or everyone) a FIN cannot be passed on:
    the session ends, as with ncat --broker, and its chid is free at once."""
    sa, _ = chan_server.handshake("a", ["b", "c"])
    sb, _ = chan_server.handshake("b", [])
    sa.shutdown(socket.SHUT_WR)
    assert sa.recv(1) == b""
    chan_server.wait_log(r"session end chid=a .*reason=\"client closed")
    claim_again(chan_server, "a", ["b"])


def test_muted_receiver_gets_nothing_more_from_third_parties(chan_server):
    """After a pair partner's FIN the receiver's write side is shut; bytes from a
    third session are dropped for it, not written after the FIN or held."""
    sa, sb = pair(chan_server)
    sc, _ = chan_server.handshake("c", ["b", "w"])
    sw, _ = chan_server.handshake("w", ["c"])
    sa.shutdown(socket.SHUT_WR)
    assert sb.recv(1) == b""
    sc.sendall(b"late")
    assert recv_exact(sw, 4) == b"late"  # c's bytes were routed
    sb.sendall(b"still")
    assert recv_exact(sa, 5) == b"still"
    # b's share is counted as dropped (it was only when c lived on another worker)
    wait_until(lambda: chan_server.ctl_json("status")["drops"].get("receiver_closed") == 4,
               10, "c's bytes for b counted as dropped")


def test_a_reset_client_is_read_to_its_last_acknowledged_byte(start_server):
    """b resets while the server, paused on a's full queue, has not read all
    b sent; then a's bytes for b meet the reset. The server must not let that
    failed send close b's socket: b's acknowledged bytes still reach a, then
    the reset (docs/PROTOCOL.md §3.7, "Acknowledged is not read")."""
    server = start_server("--mode", "chan", "--pump-pairs", "0")
    sa, sb = pair(server)
    sa.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a reads nothing yet
    acked = flood_until_stalled(sb)  # the server stops reading b, every buffer is full
    mark = server.mark()
    reset_close(sb)
    sa.sendall(b"to b")  # meets b's reset
    sa.settimeout(30)
    assert read_until_reset(sa) == acked
    m = server.wait_log(r"session end chid=b .* in=(\d+) .*reason=\"connection lost", start=mark)
    assert int(m.group(1)) == acked
