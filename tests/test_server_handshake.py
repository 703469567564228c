"""The chan handshake over real sockets: every rejection, every accepted form,
pipelining, late receivers, chid reuse and takeover, idle timeouts, startup.

Synchronisation is by events only: bytes on sockets and the server's log lines.
The only sleeps pace the traffic that keeps a session busy, or let a timeout
pass (the subject of the test), never stand in for an event.
"""
from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
from typing import Any

import pytest

from conftest import WORKERS
from fwd.runtime import logval
from helpers import (
    Sender,
    assert_closed,
    assert_pair_works,
    claim_again,
    expect_fail,
    handshake,
    read_json,
    read_line,
    recv_exact,
    recv_hash,
    reset_close,
    send_json,
)

MiB = 1 << 20
EOF_WAIT = 10.0
"""Generous bound for a close the server is expected to make on its own."""


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def padded(obj: Any, size: int) -> bytes:
    """A JSON line of exactly ``size`` bytes before its newline (padded with spaces)."""
    text = compact(obj)[:-1]
    assert len(text) <= size
    return text + b" " * (size - len(text)) + b"\n"


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def read_eof(sock: socket.socket, timeout: float = EOF_WAIT) -> None:
    """The server closes ``sock`` (without sending anything) within ``timeout``."""
    sock.settimeout(timeout)
    assert_closed(sock)


def hs1_ok(sock: socket.socket, chid: str | None = None) -> str:
    send_json(sock, {"req": "hs1"} if chid is None else {"req": "hs1", "chid": chid})
    hs2 = read_json(sock)
    assert hs2.get("rsp") == "hs2", hs2
    return hs2["chid"]


TIMEOUT_DESC = r"^timeout must be an integer from 0 to 2147483647$"

# id, send a valid hs1 first?, the bad bytes, the desc the FAIL line must carry
BAD_INPUTS: list[tuple[str, bool, bytes, str]] = [
    ("not-json", False, b"hello\n", r"^not JSON$"),
    ("empty-line", False, b"\n", r"^not JSON$"),
    ("utf8-bom", False, b"\xef\xbb\xbf" + compact({"req": "hs1"}), r"^not JSON$"),
    ("http-request", False, b"GET / HTTP/1.1\r\n", r"^not JSON$"),
    ("truncated-json", False, b'{"req":"hs1"\n', r"^not JSON$"),
    ("nan", True, b'{"req":"hs3","timeout":NaN}\n', r"^not JSON$"),
    ("array", False, b"[1]\n", r"^not a JSON object$"),
    ("string", False, b'"hs1"\n', r"^not a JSON object$"),
    ("null", False, b"null\n", r"^not a JSON object$"),
    ("invalid-utf8", False, b'{"req":"hs1","chid":"\xff\xfe"}\n', r"^invalid UTF-8$"),
    ("empty-object", False, b"{}\n", r"^missing 'req'$"),
    ("req-not-string", False, b'{"req":1}\n', r"^missing 'req'$"),
    ("unknown-req", False, compact({"req": "hs9"}), r"^unknown req 'hs9'$"),
    ("req-hs2", False, compact({"req": "hs2"}), r"^unknown req 'hs2'$"),
    ("unknown-req-truncated", False, compact({"req": "q" * 40}),
     r"^unknown req '" + "q" * 32 + "'$"),
    ("unknown-req-after-hs1", True, compact({"req": "bye"}), r"^unknown req 'bye'$"),
    ("hs3-first", False, compact({"req": "hs3", "recvers": []}),
     r"^unexpected hs3, expected hs1$"),
    ("bad-hs3-first", False, compact({"req": "hs3", "recvers": "b"}),
     r"^recvers must be a list$"),
    ("hs1-twice", True, compact({"req": "hs1"}), r"^unexpected hs1, expected hs3$"),
    ("chid-int", False, compact({"req": "hs1", "chid": 5}), r"^chid must be a string$"),
    ("chid-list", False, compact({"req": "hs1", "chid": ["a"]}), r"^chid must be a string$"),
    ("chid-false", False, compact({"req": "hs1", "chid": False}), r"^chid must be a string$"),
    ("chid-129-bytes", False, compact({"req": "hs1", "chid": "c" * 129}),
     r"^chid longer than 128 bytes$"),
    ("chid-130-utf8-bytes", False, line({"req": "hs1", "chid": "\u00e9" * 65}),
     r"^chid longer than 128 bytes$"),
    ("chid-ctrl-01", False, line({"req": "hs1", "chid": "a\x01b"}),
     r"^chid contains control characters$"),
    ("chid-newline", False, line({"req": "hs1", "chid": "a\nb"}),
     r"^chid contains control characters$"),
    ("chid-del", False, line({"req": "hs1", "chid": "a\x7fb"}),
     r"^chid contains control characters$"),
    ("chid-c1", False, line({"req": "hs1", "chid": "a\x85b"}),
     r"^chid contains control characters$"),
    ("chid-lone-surrogate", False, b'{"req":"hs1","chid":"\\ud800"}\n',
     r"^chid is not valid Unicode$"),
    ("recvers-string", True, compact({"req": "hs3", "recvers": "b"}),
     r"^recvers must be a list$"),
    ("recvers-object", True, compact({"req": "hs3", "recvers": {"b": 1}}),
     r"^recvers must be a list$"),
    ("recvers-non-string", True, compact({"req": "hs3", "recvers": ["b", 1]}),
     r"^recver must be a string$"),
    ("recvers-null-entry", True, compact({"req": "hs3", "recvers": [None]}),
     r"^recver must be a string$"),
    ("recvers-empty-string", True, compact({"req": "hs3", "recvers": [""]}),
     r"^recver must not be empty$"),
    ("recvers-long", True, compact({"req": "hs3", "recvers": ["r" * 129]}),
     r"^recver longer than 128 bytes$"),
    ("recvers-ctrl", True, line({"req": "hs3", "recvers": ["a\tb"]}),
     r"^recver contains control characters$"),
    # 1025 string entries cannot fit in one 4096-byte line, so the count limit is
    # shown with short non-string entries (it is checked before the entries are);
    # 1024 of them get past the count and fail on the first entry instead.
    ("recvers-lone-surrogate", True, b'{"req":"hs3","recvers":["\\udfff"]}\n',
     r"^recver is not valid Unicode$"),
    ("recvers-1025", True, compact({"req": "hs3", "recvers": [0] * 1025}),
     r"^more than 1024 recvers$"),
    ("recvers-1024-non-strings", True, compact({"req": "hs3", "recvers": [0] * 1024}),
     r"^recver must be a string$"),
    ("timeout-negative", True, compact({"req": "hs3", "timeout": -1}), TIMEOUT_DESC),
    ("timeout-float", True, compact({"req": "hs3", "timeout": 1.5}), TIMEOUT_DESC),
    ("timeout-float-integral", True, b'{"req":"hs3","timeout":2.0}\n', TIMEOUT_DESC),
    ("timeout-exponent", True, b'{"req":"hs3","timeout":1e3}\n', TIMEOUT_DESC),
    ("timeout-string", True, compact({"req": "hs3", "timeout": "5"}), TIMEOUT_DESC),
    ("timeout-true", True, compact({"req": "hs3", "timeout": True}), TIMEOUT_DESC),
    ("timeout-false", True, compact({"req": "hs3", "timeout": False}), TIMEOUT_DESC),
    ("timeout-too-big", True, compact({"req": "hs3", "timeout": 2**31}), TIMEOUT_DESC),
    ("line-4097", False, padded({"req": "hs1"}, 4097), r"^line longer than 4096 bytes$"),
    ("line-5000-garbage", False, b"x" * 5000 + b"\n", r"^line longer than 4096 bytes$"),
    ("line-4097-no-newline", False, b"{" + b" " * 4096, r"^line longer than 4096 bytes$"),
    ("line-64k-no-newline", True, b"y" * 65536, r"^line longer than 4096 bytes$"),
]


def run_bad_input(server: Any, after_hs1: bool, data: bytes) -> str:
    sock = server.connect()
    if after_hs1:
        hs1_ok(sock)
    sock.sendall(data)
    return expect_fail(sock)


@pytest.mark.parametrize(
    "after_hs1,data,desc", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_one_fail_line_then_close(chan_server, after_hs1, data, desc):
    mark = chan_server.mark()
    got = run_bad_input(chan_server, after_hs1, data)
    assert re.search(desc, got), got
    chan_server.wait_log(r"handshake failed peer=127\.0\.0\.1:\d+ desc=" + re.escape(logval(got)),
                         start=mark)


@pytest.mark.parametrize("after_hs1", [False, True], ids=["bad-hs1", "bad-hs3"])
def test_a_fail_line_is_followed_by_a_fin_even_when_more_bytes_came(chan_server, after_hs1):
    """A client that sent more behind a bad line: closing with those bytes
    unread would reset the connection, and some stacks drop the FAIL line
    with the reset. The server sends its FIN behind the line and discards
    the rest until the client's EOF (docs/PROTOCOL.md §2.5)."""
    sock = chan_server.connect()
    sock.settimeout(EOF_WAIT)
    if after_hs1:
        hs1_ok(sock)
    bad = compact({"req": "hs3", "timeout": -1} if after_hs1 else {"req": "hs1", "chid": 5})
    sock.sendall(bad + os.urandom(300 * 1024))
    msg = read_json(sock)
    assert msg["rsp"] == "hs4" and msg["result"] == "FAIL", msg
    assert sock.recv(65536) == b""  # a FIN: a reset would raise here
    sock.close()


def test_line_of_exactly_4096_bytes_is_accepted(chan_server):
    sock = chan_server.connect()
    sock.sendall(padded({"req": "hs1", "chid": "edge"}, 4096))
    assert read_json(sock) == {"rsp": "hs2", "chid": "edge"}
    sock.sendall(padded({"req": "hs3", "recvers": []}, 4096))
    assert read_json(sock) == {"rsp": "hs4", "result": "OK"}


def test_limits_at_their_edges_are_accepted(chan_server):
    chid128 = "\u00e9" * 64  # 128 bytes of UTF-8
    sock = chan_server.connect()
    assert handshake(sock, chid128, ["x" * 128], timeout=2**31 - 1) == chid128
    peer = chan_server.connect()
    assert handshake(peer, "x" * 128, [chid128], timeout=0) == "x" * 128
    sock.sendall(b"edge")
    assert recv_exact(peer, 4) == b"edge"
    peer.sendall(b"egde")
    assert recv_exact(sock, 4) == b"egde"


def test_duplicate_recvers_get_one_copy(chan_server):
    b, _ = chan_server.handshake("b")
    a, _ = chan_server.handshake("a", ["b", "b", "b"])
    a.sendall(b"once")
    a.sendall(b"|")
    assert recv_exact(b, 5) == b"once|"


def test_handshake_timeout_fails_silent_and_stalled_clients(start_server):
    # The stalled client's hs1 and hs2 must fit in the timeout, counted from
    # the accept: 2 s leave a loaded machine room for that.
    server = start_server("--mode", "chan", "--handshake-timeout", "2")
    silent = server.connect()
    stalled = server.connect()
    hs1_ok(stalled, "stalled")
    for sock in (silent, stalled):
        sock.settimeout(EOF_WAIT)
        assert "timeout" in expect_fail(sock)
    # The stalled session's chid was freed with it (its release reaches the
    # coordinator a moment after the FAIL, with several workers).
    claim_again(server, "stalled", [])


def test_chid_in_use(chan_server):
    holder, _ = chan_server.handshake("taken", [])
    dup = chan_server.connect()
    send_json(dup, {"req": "hs1", "chid": "taken"})
    assert expect_fail(dup).startswith("chid in use")
    # A chid is held from hs1 on, not only once the session is live.
    half = chan_server.connect()
    hs1_ok(half, "half")
    dup2 = chan_server.connect()
    send_json(dup2, {"req": "hs1", "chid": "half"})
    assert expect_fail(dup2).startswith("chid in use")
    # The holders are untouched.
    send_json(half, {"req": "hs3", "recvers": ["taken"]})
    assert read_json(half) == {"rsp": "hs4", "result": "OK"}
    half.sendall(b"still here")
    assert recv_exact(holder, 10) == b"still here"


@pytest.mark.parametrize("before", [b"", compact({"req": "hs1"}), b'{"req":"hs1"'],
                         ids=["nothing", "after-hs1", "mid-line"])
def test_eof_mid_handshake_is_a_handshake_failure(chan_server, before):
    mark = chan_server.mark()
    sock = chan_server.connect()
    port = port_of(sock)
    sock.sendall(before)
    if before.endswith(b"\n"):
        assert json.loads(read_line(sock))["rsp"] == "hs2"
    sock.shutdown(socket.SHUT_WR)
    chan_server.wait_log(
        rf'handshake failed peer=127\.0\.0\.1:{port} desc="connection closed during handshake"',
        start=mark)
    assert expect_fail(sock) == "connection closed during handshake"


def padded_crlf(obj: Any) -> bytes:
    return b" \t" + compact(obj)[:-1] + b" \r\n"


@pytest.mark.parametrize("form", [compact, line, padded_crlf],
                         ids=["compact", "spaced", "whitespace-crlf"])
def test_both_json_forms_work(chan_server, form):
    b, _ = chan_server.handshake("b-" + form.__name__)
    a = chan_server.connect()
    a.sendall(form({"req": "hs1", "chid": "x"}))
    assert read_json(a) == {"rsp": "hs2", "chid": "x"}
    a.sendall(form({"req": "hs3", "recvers": ["b-" + form.__name__], "timeout": 0}))
    assert read_json(a) == {"rsp": "hs4", "result": "OK"}
    a.sendall(b"form ok")
    assert recv_exact(b, 7) == b"form ok"


def test_a_misspelt_key_fails_instead_of_making_a_broadcast(chan_server):
    """Ignored, "recever" would leave recvers empty: everyone else."""
    other, _ = chan_server.handshake("other", [])
    sock = chan_server.connect()
    sock.sendall(compact({"req": "hs1", "chid": "k"}))
    assert read_json(sock) == {"rsp": "hs2", "chid": "k"}
    sock.sendall(compact({"req": "hs3", "recever": ["b"]}) + b"private")
    assert read_json(sock) == {"rsp": "hs4", "result": "FAIL",
                               "desc": "unknown key 'recever' in hs3"}
    assert_closed(sock)
    sock2, _ = chan_server.handshake("k2", ["other"])
    sock2.sendall(b"!")
    assert recv_exact(other, 1) == b"!"  # and not "private" first


@pytest.mark.parametrize("hs1", [b'{"req":"hs1"}\n', b'{"req":"hs1","chid":""}\n',
                                 b'{"req":"hs1","chid":null}\n'],
                         ids=["absent", "empty", "null"])
def test_server_generates_a_chid(chan_server, hs1):
    chids = set()
    for _ in range(2):
        sock = chan_server.connect()
        sock.sendall(hs1)
        hs2 = read_json(sock)
        assert hs2.get("rsp") == "hs2" and set(hs2) == {"rsp", "chid"}, hs2
        chid = hs2["chid"]
        assert isinstance(chid, str) and len(chid) >= 8, chid
        send_json(sock, {"req": "hs3"})
        assert read_json(sock) == {"rsp": "hs4", "result": "OK"}
        chids.add(chid)
    assert len(chids) == 2
    # The generated chid is really held: nobody else can claim it.
    dup = chan_server.connect()
    send_json(dup, {"req": "hs1", "chid": chid})
    assert expect_fail(dup).startswith("chid in use")


def test_pipelined_handshake_and_stream_bytes(chan_server):
    b, _ = chan_server.handshake("pipe-b", ["pipe-a"])
    payload = b'{"req":"hs1","chid":"evil"}\n' + os.urandom(200_000) + b"\nend"
    a = chan_server.connect()
    a.sendall(compact({"req": "hs1", "chid": "pipe-a"})
              + compact({"req": "hs3", "recvers": ["pipe-b"]}) + payload)
    assert read_json(a) == {"rsp": "hs2", "chid": "pipe-a"}
    assert read_json(a) == {"rsp": "hs4", "result": "OK"}
    assert recv_exact(b, len(payload)) == payload
    b.sendall(b"back")
    assert recv_exact(a, 4) == b"back"


def test_pipelined_short_tail_in_one_segment(chan_server):
    b, _ = chan_server.handshake("tail-b")
    a = chan_server.connect()
    a.sendall(b'{"req":"hs1"}\n{"req":"hs3","recvers":["tail-b"]}\nxy')
    assert read_json(a)["rsp"] == "hs2"
    assert read_json(a) == {"rsp": "hs4", "result": "OK"}
    assert recv_exact(b, 2) == b"xy"


def test_receivers_resolved_at_data_time(chan_server):
    # "late" is absent when a sends; "watch" is live and shows when each chunk
    # has been handled, so the copies for "late" were certainly held.
    watch, _ = chan_server.handshake("watch")
    a, _ = chan_server.handshake("a", ["watch", "late"])
    for part in (b"one,", b"two,", b"three,"):
        a.sendall(part)
        assert recv_exact(watch, len(part)) == part
    late, _ = chan_server.handshake("late")  # read_line: nothing was mixed into hs2/hs4
    assert recv_exact(late, 14) == b"one,two,three,"
    a.sendall(b"live")
    assert recv_exact(late, 4) == b"live"
    assert recv_exact(watch, 4) == b"live"


def test_held_bytes_are_capped_by_hold_bytes(start_server):
    server = start_server("--mode", "chan", "--hold-bytes", "1000")
    watch, _ = server.handshake("watch")
    a, _ = server.handshake("a", ["watch", "late"])
    data = os.urandom(1500)
    a.sendall(data)
    assert recv_exact(watch, 1500) == data
    server.wait_log(r"dropping bytes for absent receiver chid=late from chid=a")
    late, _ = server.handshake("late")
    a.sendall(b"|after")
    assert recv_exact(late, 1006) == data[:1000] + b"|after"


@pytest.mark.parametrize("recvers", [None, []], ids=["absent", "empty"])
def test_no_recvers_means_everyone_else(chan_server, recvers):
    b, _ = chan_server.handshake("b", ["a"])
    c, _ = chan_server.handshake("c", ["a"])
    a, _ = chan_server.handshake("a", recvers)
    a.sendall(b"to all")
    assert recv_exact(b, 6) == b"to all"
    assert recv_exact(c, 6) == b"to all"
    # Had a got its own bytes, they would come before b's.
    b.sendall(b"from b")
    assert recv_exact(a, 6) == b"from b"
    d, _ = chan_server.handshake("d")  # joins later: included from now on
    a.sendall(b"again")
    for s in (b, c, d):
        assert recv_exact(s, 5) == b"again"
    c.sendall(b"from c")
    assert recv_exact(a, 6) == b"from c"


def test_sender_listing_itself_does_not_get_its_bytes(chan_server):
    b, _ = chan_server.handshake("b", ["a"])
    a, _ = chan_server.handshake("a", ["a", "b"])
    a.sendall(b"mine")
    assert recv_exact(b, 4) == b"mine"
    b.sendall(b"yours")
    assert recv_exact(a, 5) == b"yours"


def test_chid_free_again_right_after_close(chan_server):
    """With one worker at once; with several once the release reached the
    coordinator, a moment after the end is logged (claim_again retries)."""
    for _ in range(3):
        mark = chan_server.mark()
        if WORKERS == 1:
            a, chid = chan_server.handshake("again")
            assert chid == "again"
        else:
            a = claim_again(chan_server, "again", [])
        a.close()
        chan_server.wait_log(r"session end chid=again peer=\S+ .*reason=\"client closed",
                             start=mark)


def test_takeover_replaces_the_old_session(start_server):
    server = start_server("--mode", "chan", "--takeover")
    src, _ = server.handshake("src", ["t"])
    old, _ = server.handshake("t", ["src"])
    src.sendall(b"1")
    assert recv_exact(old, 1) == b"1"
    mark = server.mark()
    new, chid = server.handshake("t", ["src"])
    assert chid == "t"
    read_eof(old)
    server.wait_log(r"session end chid=t peer=\S+ .*reason=\"taken over by 127\.0\.0\.1:"
                    + str(port_of(new)) + r"\b", start=mark)
    src.sendall(b"2")
    assert recv_exact(new, 1) == b"2"
    new.sendall(b"3")
    assert recv_exact(src, 1) == b"3"


def test_takeover_of_a_session_still_in_its_handshake(start_server):
    server = start_server("--mode", "chan", "--takeover")
    old = server.connect()
    hs1_ok(old, "t")
    new, chid = server.handshake("t")
    assert chid == "t"
    read_eof(old)  # closed with no FAIL line
    src, _ = server.handshake("src", ["t"])
    src.sendall(b"to new t")
    assert recv_exact(new, 8) == b"to new t"


def test_without_takeover_a_held_chid_is_refused(chan_server):
    src, _ = chan_server.handshake("src", ["t"])
    old, _ = chan_server.handshake("t", ["src"])
    new = chan_server.connect()
    send_json(new, {"req": "hs1", "chid": "t"})
    assert expect_fail(new) == "chid in use: t"
    src.sendall(b"still old")
    assert recv_exact(old, 9) == b"still old"


def keep_busy(sender: socket.socket, receiver: socket.socket, seconds: float,
              every: float = 0.25) -> None:
    """Traffic from ``sender`` to ``receiver`` every ``every`` s for ``seconds``."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        msg = b"tick%04d" % n
        sender.sendall(msg)
        assert recv_exact(receiver, len(msg)) == msg
        n += 1
        time.sleep(every)  # pacing the traffic, not waiting for the server


def test_hs3_timeout_closes_idle_session_but_not_busy_one(chan_server):
    # Timeouts of 2 s, traffic every 0.25 s for 3 s: busy outlives its timeout
    # only by its traffic, and has most of 2 s left for the checks after it
    # (a loaded machine may take a while over them).
    peer, _ = chan_server.handshake("peer", ["busy"])
    busy, _ = chan_server.handshake("busy", ["peer"], timeout=2)
    mark = chan_server.mark()
    idle, _ = chan_server.handshake("idle", ["peer"], timeout=2)
    keep_busy(busy, peer, 3.0)
    # idle went live after busy, with the same timeout: it is gone, busy is not.
    read_eof(idle)
    chan_server.wait_log(r"session end chid=idle .*reason=\"idle timeout", start=mark)
    peer.sendall(b"still open")
    assert recv_exact(busy, 10) == b"still open"
    busy.sendall(b"yes")
    assert recv_exact(peer, 3) == b"yes"


def test_a_sender_held_back_by_a_stuck_receiver_outlives_its_idle_timeout(start_server):
    """It has bytes to send: we stopped reading them, so it is not idle. Its
    receiver's --slow-timeout (off here) bounds that wait, not its own timeout."""
    server = start_server("--mode", "chan", "--slow-timeout", "0")
    sb, _ = server.handshake("b", ["a"], timeout=0)
    sb.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    mark = server.mark()
    sa, _ = server.handshake("a", ["b"], timeout=1)
    sa.settimeout(None)
    up = Sender(sa, 8 * MiB)
    up.start()
    server.wait_log(r"paused chid=a\b", start=mark)
    time.sleep(2.5)  # the subject: outlast a's idle timeout while held back
    assert recv_hash(sb, 8 * MiB) == up.digest
    up.finish()
    sb.sendall(b"still there?")
    assert recv_exact(sa, 12) == b"still there?"


def test_a_receiver_that_keeps_reading_outlives_its_idle_timeout(start_server):
    """a sends to b and c; c reads nothing, so a waits and nothing new is
    queued for b. b reads what is queued for it, slowly: bytes move, so it
    is not idle. It used to be closed at its idle timeout."""
    server = start_server("--mode", "chan", "--max-buffer", "256KiB", "--slow-timeout", "0")
    sb, _ = server.handshake("b", ["nobody"], timeout=1)
    sb.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sc, _ = server.handshake("c", ["nobody"], timeout=0)
    sc.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    mark = server.mark()
    sa, _ = server.handshake("a", ["b", "c"], timeout=0)
    up = Sender(sa, 8 * MiB)
    up.start()
    server.wait_log(r"paused chid=a\b", start=mark)
    got = 0
    deadline = time.monotonic() + 4  # four idle timeouts
    while time.monotonic() < deadline:
        got += len(sb.recv(8192))
        time.sleep(0.25)  # the subject: a slow, steady reader
    states = {r["chid"]: r["state"] for r in server.ctl_json("sessions")["sessions"]}
    assert states["b"] == "live", "b was ended (it flushes now) though it kept reading"


def test_a_sender_paused_by_max_rate_outlives_its_idle_timeout(start_server):
    """Below the rate's next read it waits 2 s, twice its idle timeout: its
    bytes wait in our socket, so it is not idle."""
    server = start_server("--mode", "chan", "--max-rate", "2KiB")
    sb, _ = server.handshake("b", ["a"], timeout=0)
    sa, _ = server.handshake("a", ["b"], timeout=1)
    data = os.urandom(8 * 1024)  # a second's worth (2 KiB), then reads of 4 KiB
    sa.sendall(data)
    assert recv_exact(sb, len(data)) == data
    sb.sendall(b"still there?")
    assert recv_exact(sa, 12) == b"still there?"


def test_idle_timeout_default_and_timeout_zero(start_server):
    server = start_server("--mode", "chan", "--idle-timeout", "1")
    never, _ = server.handshake("never", ["peer"], timeout=0)
    peer, _ = server.handshake("peer", ["never"], timeout=0)
    mark = server.mark()
    dflt, _ = server.handshake("dflt", ["peer"])  # no timeout in hs3: --idle-timeout
    read_eof(dflt)
    server.wait_log(r"session end chid=dflt .*reason=\"idle timeout", start=mark)
    # never and peer were idle longer than dflt, but timeout 0 switched it off.
    never.sendall(b"alive")
    assert recv_exact(peer, 5) == b"alive"
    peer.sendall(b"too")
    assert recv_exact(never, 3) == b"too"


def test_hs3_timeout_overrides_idle_timeout_default(start_server):
    server = start_server("--mode", "chan", "--idle-timeout", "600")
    mark = server.mark()
    short, _ = server.handshake("short", timeout=1)
    read_eof(short)
    server.wait_log(r"session end chid=short .*reason=\"idle timeout", start=mark)


def test_startup_log_line(chan_server):
    m = chan_server.wait_log(r"listening on (\S+) mode=(\w+) workers=(\d+) password=(\w+)")
    assert m.groups() == (f"127.0.0.1:{chan_server.port}", "chan", str(WORKERS), "off")


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_listen_on_ipv6_loopback(start_server):
    server = start_server("--mode", "chan", "--listen", "[::1]:0")
    m = server.wait_log(r"listening on 127\.0\.0\.1:\d+,\[::1\]:(\d+) mode=chan")
    v6 = socket.create_connection(("::1", int(m.group(1))), timeout=10)
    server.sockets.append(v6)
    mark = server.mark()
    assert handshake(v6, "six", ["four"]) == "six"
    port = v6.getsockname()[1]
    server.wait_log(rf"session start chid=six peer=\[::1\]:{port} ", start=mark)
    four, _ = server.handshake("four", ["six"])
    v6.sendall(b"over v6")
    assert recv_exact(four, 7) == b"over v6"
    four.sendall(b"over v4")
    assert recv_exact(v6, 7) == b"over v4"


def test_fwd_mode_environment_variable(start_server):
    server = start_server(env={"FWD_MODE": "chan"})
    server.wait_log(r"listening on \S+ mode=chan workers=\d+ password=off")
    # In broadcast mode these bytes would be relayed; in chan mode they are rejected.
    sock = server.connect()
    sock.sendall(b"hello\n")
    assert expect_fail(sock) == "not JSON"


def test_sigterm_right_after_the_startup_line_is_a_clean_stop(start_server):
    # "listening on" means ready: a SIGTERM right after it must find the signal
    # handlers installed (exit 0 after "stopped"), not kill the process (-15).
    for _ in range(10):
        server = start_server("--mode", "chan")
        server.stop()
        assert server.proc.returncode == 0
        server.wait_log(r"stopped$")


def test_default_mode_is_broadcast(start_server):
    server = start_server()
    server.wait_log(r"listening on \S+ mode=broadcast workers=\d+ password=off")


def test_server_still_serves_a_fresh_pair_after_all_bad_inputs(start_server):
    server = start_server("--mode", "chan", "--handshake-timeout", "3")
    failures: list[tuple[str, str]] = []

    def check(name: str, desc: str, pattern: str) -> None:
        if not re.search(pattern, desc):
            failures.append((name, desc))

    for name, after_hs1, data, pattern in BAD_INPUTS:
        check(name, run_bad_input(server, after_hs1, data), pattern)
    # chid in use
    holder, _ = server.handshake("held")
    dup = server.connect()
    send_json(dup, {"req": "hs1", "chid": "held"})
    check("chid-in-use", expect_fail(dup), r"^chid in use")
    # EOF mid-handshake
    eof = server.connect()
    eof.sendall(b'{"req":"hs1"')
    eof.shutdown(socket.SHUT_WR)
    check("eof", expect_fail(eof), r"^connection closed during handshake$")
    # A peer that resets the connection mid-handshake.
    rst = server.connect()
    hs1_ok(rst)
    rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    mark = server.mark()
    port = port_of(rst)
    rst.close()
    server.wait_log(rf"session end chid=\S+ peer=127\.0\.0\.1:{port} .*reason=\"handshake "
                    r"failed: connection closed during handshake \(", start=mark)
    # handshake timeout (last: the others must finish well within it)
    slow = server.connect()
    hs1_ok(slow)
    slow.settimeout(EOF_WAIT)
    check("timeout", expect_fail(slow), r"timeout")
    assert not failures, failures
    assert_pair_works(server)
    holder.close()



def test_a_reset_during_the_handshake_is_a_failed_handshake(chan_server):
    """hs1, then a reset: it was logged as the end of a live session
    ("connection lost", end label reset) and counted as no failure, where a
    FIN there is "connection closed during handshake" (§9.5)."""
    mark = chan_server.mark()
    s = chan_server.connect()
    send_json(s, {"req": "hs1", "chid": "gone"})
    assert read_json(s)["rsp"] == "hs2"
    reset_close(s)
    chan_server.wait_log(r"session end chid=gone .*reason=\"handshake failed: connection "
                         r"closed during handshake \(\[Errno 104\]", start=mark)
    chan_server.wait_log(r"handshake failed peer=\S+ desc=", start=mark)
    assert chan_server.ctl_json("status")["failures"] == {"closed": 1}
