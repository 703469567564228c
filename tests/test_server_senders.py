"""hs3 "senders" (docs/PROTOCOL.md §3.1): a session that names them hears only
them, whatever other sessions send to everyone or to it, live or held; and
two sessions form a pair only if each hears the other."""
from __future__ import annotations

import os
import socket

import pytest

from helpers import read_until_reset, recv_exact

pytestmark = pytest.mark.both_impls


def test_only_the_named_senders_reach_it(chan_server):
    svc, _ = chan_server.handshake("svc", ["user"], senders=["user"])
    probe, _ = chan_server.handshake("probe", ["nobody"])  # hears anyone
    loud, _ = chan_server.handshake("loud", [])  # sends to everyone else
    named, _ = chan_server.handshake("named", ["svc", "probe"])
    loud.sendall(b"loud")
    named.sendall(b"named")
    # Each read is routed to all its receivers at once: once the probe has
    # both, svc has been passed over.
    assert recv_exact(probe, 9) in (b"loudnamed", b"namedloud")
    user, _ = chan_server.handshake("user", ["svc"])
    user.sendall(b"good")
    assert recv_exact(svc, 4) == b"good"
    svc.sendall(b"reply")
    assert recv_exact(user, 5) == b"reply"
    # A pair: user's FIN reaches svc right behind its bytes, and nothing else came.
    user.shutdown(socket.SHUT_WR)
    svc.settimeout(10)
    assert svc.recv(100) == b""


def test_bytes_held_for_it_from_others_are_not_delivered(chan_server):
    """And the stranger, which half-closed waiting for svc, is reset: a FIN
    would tell it that its bytes were delivered."""
    stranger, _ = chan_server.handshake("stranger", ["svc"])
    user, _ = chan_server.handshake("user", ["svc"])
    mark = chan_server.mark()
    stranger.sendall(b"junk")
    stranger.shutdown(socket.SHUT_WR)  # its bytes are read (and held) before its FIN
    chan_server.wait_log(r"chid=stranger half-closed; waits for chid=svc", start=mark)
    user.sendall(b"good")
    svc, _ = chan_server.handshake("svc", ["user"], senders=["user"])
    assert recv_exact(svc, 4) == b"good"
    stranger.settimeout(10)
    assert read_until_reset(stranger) == 0
    chan_server.wait_log(r"session end chid=stranger .*reason=\"held bytes dropped", start=mark)
    user.shutdown(socket.SHUT_WR)
    svc.settimeout(10)
    assert svc.recv(100) == b""


def test_a_stranger_filling_its_hold_does_not_crowd_out_the_user(chan_server):
    """Each sender gets its own --hold-bytes for an absent chid: a stranger that
    sends svc more than that loses its own tail, not the user's bytes."""
    witness, _ = chan_server.handshake("w", ["nobody"])
    stranger, _ = chan_server.handshake("stranger", ["svc", "w"])
    flood = os.urandom(1536 * 1024)  # above the default --hold-bytes (1 MiB)
    stranger.sendall(flood)
    assert recv_exact(witness, len(flood)) == flood  # held for svc as far as it goes
    user, _ = chan_server.handshake("user", ["svc", "w"])
    good = os.urandom(5000)
    user.sendall(good)
    assert recv_exact(witness, len(good)) == good
    svc, _ = chan_server.handshake("svc", ["user"], senders=["user"])
    user.sendall(b"live")
    assert recv_exact(svc, len(good) + 4) == good + b"live"


def test_no_pair_with_a_session_that_does_not_hear_us(chan_server):
    """user and svc name each other, but svc hears only "other": user's FIN
    ends user as outside a pair, and svc gets neither its bytes nor its FIN."""
    svc, _ = chan_server.handshake("svc", ["user"], senders=["other"])
    user, _ = chan_server.handshake("user", ["svc"])
    other, _ = chan_server.handshake("other", ["svc"])
    mark = chan_server.mark()
    user.sendall(b"bad")
    user.shutdown(socket.SHUT_WR)
    chan_server.wait_log(r"session end chid=user .*reason=\"client closed", start=mark)
    other.sendall(b"ok!")
    assert recv_exact(svc, 3) == b"ok!"


def test_senders_is_checked_like_recvers(chan_server):
    sock = chan_server.connect()
    sock.sendall(b'{"req":"hs1","chid":"s"}\n{"req":"hs3","senders":"user"}\n')
    assert recv_exact(sock, 27) == b'{"rsp":"hs2","chid":"s"}\n{"'
    rest = sock.recv(200)
    assert b'"desc":"senders must be a list"' in rest


def test_everyone_bytes_delivered_are_not_counted_as_reaching_nobody(chan_server):
    """s hears only "nobody" and sends to everyone: r gets its bytes. The
    check for "nobody else anywhere" took the one receiver of its route for
    s itself (a route to everyone lists the sender, unless its own senders
    leave it out) and counted delivered bytes as dropped (no_receiver)."""
    r, _ = chan_server.handshake("r", ["nobody"])
    s, _ = chan_server.handshake("s", [], senders=["nobody"])
    s.sendall(b"x" * 1000)
    assert recv_exact(r, 1000) == b"x" * 1000
    status = chan_server.ctl_json("status")
    assert status["drops"].get("no_receiver", 0) == 0
    assert status["totals"]["dropped_bytes"] == 0
