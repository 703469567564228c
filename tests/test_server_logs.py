"""Session start and end log lines, in text and in JSON (--log-format json)."""
from __future__ import annotations

import fcntl
import json
import socket
import struct
import termios
from collections.abc import Callable

from conftest import Server
from fwd.session import CLOSE_LINGER, end_reason
from helpers import (
    Sender,
    assert_pair_works,
    pair,
    read_json,
    recv_exact,
    send_json,
    wait_until,
)

MiB = 1 << 20


def exchange(server: Server) -> tuple[int, int]:
    """A pair where a sends 7000 bytes and b answers 300; both then close."""
    sa, sb = pair(server)
    sa.sendall(b"a" * 7000)
    recv_exact(sb, 7000)
    sb.sendall(b"b" * 300)
    recv_exact(sa, 300)
    ports = sa.getsockname()[1], sb.getsockname()[1]
    sa.close()
    sb.close()
    return ports


def test_text_lines_carry_bytes_and_reason(start_server: Callable[..., Server]) -> None:
    server = start_server("--mode", "chan", log_level="info")
    pa, pb = exchange(server)
    start = server.wait_log(rf"session start chid=a peer=127\.0\.0\.1:{pa} worker=(\d+) "
                            r"mode=chan recvers=b$")
    end = server.wait_log(rf"session end chid=a peer=127\.0\.0\.1:{pa} worker=(\d+) in=7000 "
                          r'out=300 secs=[\d.]+ reason="([^"]+)"$')
    assert start.group(1) == end.group(1)
    assert end.group(2) in ("half-closed both ways", "pair partner left", "client closed")
    server.wait_log(rf"session end chid=b peer=127\.0\.0\.1:{pb} worker=\d+ in=300 out=7000 ")


def test_a_chid_cannot_forge_fields_of_a_text_line(start_server: Callable[..., Server]) -> None:
    """Chids may hold spaces, "=" and ","; in text lines such a chid is a JSON
    string (logfmt), so every field a parser finds is the server's."""
    server = start_server("--mode", "chan", log_level="info")
    evil = "x peer=203.0.113.66:4444"
    sock, _ = server.handshake(evil, ["a,b", "*", "c"], senders=["None", "d e"])
    port = sock.getsockname()[1]
    server.wait_log(rf'session start chid="x peer=203\.0\.113\.66:4444" '
                    rf'peer=127\.0\.0\.1:{port} worker=\d+ mode=chan '
                    r'recvers="a,b","\*",c senders="None","d e"$')
    sock.close()
    server.wait_log(rf'session end chid="x peer=203\.0\.113\.66:4444" '
                    rf'peer=127\.0\.0\.1:{port} ')


def test_a_chid_cannot_forge_fields_of_a_failure_or_end_line(
        start_server: Callable[..., Server]) -> None:
    """A FAIL desc and an end reason may carry the client's chid: they are
    JSON strings in text lines too, and so is a reason of several words."""
    server = start_server("--mode", "chan", log_level="info")
    evil = "x peer=203.0.113.66:4444 reason=spoof"
    first, _ = server.handshake(evil, ["y"])
    again = server.connect()
    port = again.getsockname()[1]
    send_json(again, {"req": "hs1", "chid": evil})
    assert read_json(again)["desc"] == f"chid in use: {evil}"
    server.wait_log(rf'handshake failed peer=127\.0\.0\.1:{port} '
                    r'desc="chid in use: x peer=203\.0\.113\.66:4444 reason=spoof"$')
    first.close()
    server.wait_log(r'session end chid="x peer=203\.0\.113\.66:4444 reason=spoof" peer=\S+ '
                    r'worker=\d+ in=0 out=0 secs=[\d.]+ reason="client closed"$')
    again.close()


def test_json_lines(start_server: Callable[..., Server]) -> None:
    server = start_server("--mode", "chan", "--log-format", "json", log_level="info")
    pa, _ = exchange(server)
    for chid in "ab":
        server.wait_log(rf'"event": "session_end", "chid": "{chid}"')
    records = [json.loads(line) for line in server.lines]  # every line is one object
    assert all({"ts", "level", "proc", "logger", "msg"} <= r.keys() for r in records)
    (start,) = [r for r in records if r.get("event") == "session_start" and r["chid"] == "a"]
    (end,) = [r for r in records if r.get("event") == "session_end" and r["chid"] == "a"]
    assert start["peer"] == end["peer"] == f"127.0.0.1:{pa}"
    assert start["recvers"] == ["b"] and start["mode"] == "chan"
    assert start["worker"] == end["worker"] and end["proc"] == f"w{end['worker']}"
    assert (end["bytes_in"], end["bytes_out"]) == (7000, 300)
    assert end["secs"] >= 0 and end["reason"] and end["level"] == "INFO"
    assert end["end"] == end_reason(end["reason"]) and end["end"] in ("closed", "partner_left")
    assert start["ts"].endswith("Z")
    # A failed handshake is a record of its own too, with the chid it had claimed.
    bad = server.connect()
    bad.sendall(b'{"req":"hs1","chid":"c"}\n{"req":"hs3","recvers":7}\n')
    server.wait_log(r'"event": "handshake_failed"')
    (fail,) = [json.loads(line) for line in server.lines
               if '"event": "handshake_failed"' in line]
    assert (fail["chid"], fail["desc"], fail["reason"]) == ("c", "recvers must be a list",
                                                           "malformed")
    assert fail["peer"] == f"127.0.0.1:{bad.getsockname()[1]}"


def test_an_end_line_counts_what_its_flush_wrote_not_what_a_reset_discarded(chan_server):
    """b ends (its FIN, outside a pair) with bytes queued that it never reads:
    the close linger resets it after CLOSE_LINGER, dropping them. Its end line
    waits for that, so its out= is what was written (status counts the same
    way); logged at the close, it counted the dropped bytes too."""
    sb, _ = chan_server.handshake("b", ["x"])
    sb.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sa, _ = chan_server.handshake("a", ["b"])
    sa.settimeout(None)
    up = Sender(sa, 64 * MiB)  # after b left its bytes are held, then dropped
    mark = chan_server.mark()
    up.start()
    chan_server.wait_log(r"paused chid=a\b", start=mark)
    sb.shutdown(socket.SHUT_WR)
    end = chan_server.wait_log(r"session end chid=b .* out=(\d+)", start=mark,
                               timeout=CLOSE_LINGER + 15)
    wait_until(lambda: chan_server.ctl_json("status")["drops"].get("discarded", 0) > 0,
               CLOSE_LINGER + 15, "the linger's reset dropping what b did not take")
    ended = chan_server.ctl_json("status")["totals"]["bytes_out"]  # b's, the one session ended
    assert int(end.group(1)) == ended
    up.finish()


def test_a_log_reader_that_stalls_does_not_stall_the_server(
        start_server: Callable[..., Server]) -> None:
    """stderr is a pipe, and a log collector that stops reading it leaves the
    server's lines nowhere to go. Writing them anyway blocked the event loop:
    a helper froze every worker and the parent with about 500 bad
    handshakes, and then a pair could not connect. The lines now wait (past
    runtime.LOG_BACKLOG they are dropped and counted), and the relay goes on."""
    server = start_server("--mode", "chan", log_level="info")
    assert server.proc.stderr is not None
    fd = server.proc.stderr.fileno()
    size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    server.reading.clear()  # its reader may take one more pipe-full first

    def bad_handshake() -> None:
        sock = server.connect()
        send_json(sock, {"req": "hs1", "chid": 5})
        assert read_json(sock)["result"] == "FAIL"
        sock.close()

    for _ in range(20000):
        bad_handshake()
        queued = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
        if queued >= size - 8192:
            break
    else:
        raise AssertionError("the server's lines never filled its stderr")
    for _ in range(200):  # their lines find stderr full
        bad_handshake()
    assert_pair_works(server)
    mark = len(server.lines)
    server.reading.set()
    server.wait_log(r"session end chid=ok-", start=mark)  # what waited comes after all
