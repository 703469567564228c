"""Blocking socket helpers for talking to a real fwd-server in tests."""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any


def send_json(sock: socket.socket, obj: Any) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


def read_line(sock: socket.socket, limit: int = 65536) -> bytes:
    """One ``\\n``-terminated line, read byte by byte so no stream data is eaten."""
    buf = bytearray()
    while len(buf) < limit:
        b = sock.recv(1)
        if not b:
            raise EOFError(f"connection closed after {bytes(buf)!r}")
        buf += b
        if b == b"\n":
            return bytes(buf)
    raise AssertionError("line too long")


def read_json(sock: socket.socket) -> Any:
    return json.loads(read_line(sock))


def handshake(sock: socket.socket, chid: str | None = None, recvers: list[str] | None = None,
              timeout: int | None = None, senders: list[str] | None = None) -> str:
    """Run hs1..hs4 and return the chid the server granted; fail the test on FAIL."""
    hs1: dict[str, Any] = {"req": "hs1"}
    if chid is not None:
        hs1["chid"] = chid
    send_json(sock, hs1)
    hs2 = read_json(sock)
    assert hs2.get("rsp") == "hs2", hs2
    finish_handshake(sock, recvers, timeout, senders)
    return hs2["chid"]


def finish_handshake(sock: socket.socket, recvers: list[str] | None = None,
                     timeout: int | None = None, senders: list[str] | None = None) -> None:
    """hs3 and its hs4 OK, after the hs2."""
    hs3: dict[str, Any] = {"req": "hs3"}
    if recvers is not None:
        hs3["recvers"] = recvers
    if timeout is not None:
        hs3["timeout"] = timeout
    if senders is not None:
        hs3["senders"] = senders
    send_json(sock, hs3)
    hs4 = read_json(sock)
    assert hs4 == {"rsp": "hs4", "result": "OK"}, hs4


def bcast_hs1(server: Any, hs1: dict[str, Any],
              before: Callable[[list[bytes]], None] | None = None,
              attempts: int = 5) -> tuple[socket.socket, Any, list[bytes]]:
    """Send ``hs1`` first thing on a new connection to a broadcast-mode server,
    on new connections until the server takes it for a handshake. Returns the
    socket, the server's first line to it (parsed: hs2, or an hs4 FAIL), and
    the hs1 lines of the attempts that failed.

    PROTOCOL §4.1: an hs1 must reach the server within 50 ms
    (SNIFF_CONNECT_WINDOW) of the worker adopting the connection; a late one
    makes the connection a plain client, and its hs1 goes to every live
    session as data. On a loaded machine the test or the worker may be
    descheduled that long, so a client must retry, as this helper does. A
    failed attempt is closed and its session's end awaited (its hs1 has been
    dealt with then: with one worker, handed to every session live then), and
    its hs1 line is returned: read those sessions with ``recv_skipping``.
    ``before`` runs on each attempt between the connect and the hs1, given
    the hs1 lines of the attempts that failed so far. A server
    that never takes the hs1 for a handshake fails the test."""
    line = json.dumps(hs1).encode() + b"\n"
    late: list[bytes] = []
    for _attempt in range(attempts):
        mark = server.mark()
        sock = server.connect()
        peer = rf"peer=127\.0\.0\.1:{sock.getsockname()[1]} "
        if before is not None:
            before(late)
        sock.sendall(line)
        reply = _first_reply(server, sock, mark, rf"session start chid=None {peer}")
        if reply is not None:
            return sock, reply, late
        sock.close()
        server.wait_log(rf"session end chid=None {peer}", start=mark)
        late.append(line)
    raise AssertionError(f"no hs1 in {attempts} attempts was taken for a handshake: {line!r}")


def _first_reply(server: Any, sock: socket.socket, mark: int, plain: str) -> Any:
    """The server's first line to a connection that sent an hs1, parsed; None
    if the connection became a plain client instead: the server logged it live
    (``plain``) or sent it bytes that are not a server line. Either may come
    first, so both are watched (the socket every 20 ms, within 15 s)."""
    rx = re.compile(plain)
    deadline = time.monotonic() + 15
    while not select.select([sock], [], [], 0.02)[0]:
        with server.cond:
            if any(rx.search(ln) for ln in server.lines[mark:]):
                return None
        if time.monotonic() > deadline:
            raise AssertionError(f"no reply to the hs1 and no {plain!r} within 15 s")
    first = sock.recv(1, socket.MSG_PEEK)
    if not first:
        raise EOFError("closed before any reply to the hs1")
    if first != b"{":
        return None
    try:
        reply = json.loads(read_line(sock))
    except ValueError:
        return None
    return reply if isinstance(reply, dict) and "rsp" in reply else None


def bcast_handshake(server: Any, chid: str | None = None, recvers: list[str] | None = None,
                    timeout: int | None = None, senders: list[str] | None = None,
                    ) -> tuple[socket.socket, str, list[bytes]]:
    """``handshake`` on a new connection to a broadcast-mode server, through
    ``bcast_hs1``: the socket, the chid granted, and failed attempts' hs1 lines."""
    hs1: dict[str, Any] = {"req": "hs1"}
    if chid is not None:
        hs1["chid"] = chid
    sock, hs2, late = bcast_hs1(server, hs1)
    assert hs2.get("rsp") == "hs2", hs2
    finish_handshake(sock, recvers, timeout, senders)
    return sock, hs2["chid"], late


def recv_skipping(sock: socket.socket, n: int, late: list[bytes]) -> bytes:
    """``n`` bytes of payload (which must hold no ``{``) from a broadcast-mode
    session, taking out any whole line of ``late`` (failed attempts' hs1 lines
    from ``bcast_hs1``) on the way. With several workers such a line may come
    any time later, so each is allowed once wherever it comes: pass the same
    list (one per socket) to every read; the lines found are removed from it."""
    buf = bytearray()
    while len(buf) < n:
        b = recv_exact(sock, 1)
        if b != b"{":
            buf += b
            continue
        line = b + read_line(sock)
        assert line in late, f"{line!r} (not a failed attempt's hs1) after {bytes(buf)!r}"
        late.remove(line)
    return bytes(buf)


def expect_fail(sock: socket.socket, msg: Any = None) -> str:
    """Read the hs4 FAIL line (unless ``msg`` is it, read already), check the
    server then closes, and return its desc."""
    if msg is None:
        msg = read_json(sock)
    assert msg.get("rsp") == "hs4" and msg.get("result") == "FAIL", msg
    assert isinstance(msg.get("desc"), str) and msg["desc"], msg
    assert_closed(sock)
    return msg["desc"]


def assert_closed(sock: socket.socket) -> None:
    """The server closed the connection and sent nothing more."""
    try:
        rest = sock.recv(65536)
    except ConnectionResetError:
        return
    assert rest == b"", f"unexpected bytes before close: {rest[:100]!r}"


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_hash(sock: socket.socket, n: int) -> str:
    """sha256 of exactly ``n`` received bytes, without keeping them all."""
    h = hashlib.sha256()
    left = n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError(f"closed with {left} of {n} bytes missing")
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def reset_close(sock: socket.socket) -> None:
    """Close with a reset (RST), as a crashed or killed peer's kernel may."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def flood_until_stalled(sock: socket.socket, quiet: float = 0.5) -> int:
    """Send until nothing more leaves for ``quiet`` seconds (every buffer on
    the way is full); returns how many bytes the peer's kernel acknowledged."""
    sock.setblocking(False)
    block = os.urandom(64 * 1024)
    sent = 0
    while True:
        try:
            sent += sock.send(block)
        except BlockingIOError:
            if not select.select([], [sock], [], quiet)[1]:
                break
    unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return sent - unacked


def read_until_reset(sock: socket.socket) -> int:
    """How many bytes arrive before the reset; a clean EOF fails the test."""
    n = 0
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return n
        assert chunk, f"EOF after {n} bytes: a cut stream must end in a reset"
        n += len(chunk)


class Sender(threading.Thread):
    """Send ``size`` random bytes in the background; ``digest`` is their sha256."""

    def __init__(self, sock: socket.socket, size: int, block: int = 1 << 16) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = os.urandom(size)
        self.block = block
        self.digest = hashlib.sha256(self.data).hexdigest()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            view = memoryview(self.data)
            for i in range(0, len(view), self.block):
                self.sock.sendall(view[i:i + self.block])
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float = 60.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "sender did not finish"
        if self.error is not None:
            raise self.error


def stream_both_ways(sa: socket.socket, sb: socket.socket, size: int) -> None:
    """``size`` random bytes each way at once; each side gets exactly the other's."""
    up, down = Sender(sa, size), Sender(sb, size)
    up.start()
    down.start()
    assert recv_hash(sb, size) == up.digest
    assert recv_hash(sa, size) == down.digest
    up.finish()
    down.finish()


def claim_again(server: Any, chid: str, recvers: list[str],
                before: Callable[[], None] | None = None) -> socket.socket:
    """Handshake as ``chid`` right after its session ended. With several
    workers, the release reaches the coordinator a moment after the worker
    logs the end (messages go out in a batch when the loop is next idle), so
    the first claim may still find the chid in use: each retry is a new
    handshake, within 10 s. ``before`` runs before each attempt (to wait until
    the last one's connection is counted out, say)."""
    deadline = time.monotonic() + 10
    while True:
        if before is not None:
            before()
        sock = server.connect()
        try:
            handshake(sock, chid, recvers)
            return sock
        except AssertionError as exc:
            if f"chid in use: {chid}" not in str(exc) or time.monotonic() > deadline:
                raise
            sock.close()


def pair(server: Any, a: str = "a", b: str = "b") -> tuple[socket.socket, socket.socket]:
    """Two chan sessions that list each other as their only receiver."""
    sa, _ = server.handshake(a, [b])
    sb, _ = server.handshake(b, [a])
    return sa, sb


def assert_pair_works(server: Any) -> None:
    """The server still serves a fresh chan pair, both ways."""
    import secrets

    a, b = "ok-" + secrets.token_hex(4), "ok-" + secrets.token_hex(4)
    sa, sb = pair(server, a, b)
    sa.sendall(b"ping")
    assert recv_exact(sb, 4) == b"ping"
    sb.sendall(b"pong")
    assert recv_exact(sa, 4) == b"pong"
    sa.close()
    sb.close()


TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_LISTEN = 0x01, 0x08, 0x0A


@dataclasses.dataclass(frozen=True)
class TcpSocket:
    """One row of /proc/net/tcp{,6}: what the kernel says about a TCP socket."""

    local_port: int
    remote_port: int
    state: int
    tx_queue: int
    rx_queue: int
    inode: str


def tcp_sockets() -> list[TcpSocket]:
    """Every TCP socket on this machine (IPv4 and IPv6), from the kernel's tables."""
    rows = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    p = line.split()
                    txq, rxq = p[4].split(":")
                    rows.append(TcpSocket(int(p[1].rsplit(":", 1)[1], 16),
                                          int(p[2].rsplit(":", 1)[1], 16), int(p[3], 16),
                                          int(txq, 16), int(rxq, 16), p[9]))
        except FileNotFoundError:  # pragma: no cover - no IPv6
            pass
    return rows


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def wait_until(cond: Any, timeout: float, what: str) -> None:
    """Poll ``cond`` while the server cleans up (fd counts, kernel queues): bounded,
    and never a timing assertion."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)
