"""Connection churn against a real chan server: thousands of short sessions, clean
and unclean, must leave no file descriptor, no CLOSE_WAIT socket and no memory
behind, and lose no byte of the sessions that did finish their handshake."""
from __future__ import annotations

import random
import socket
import threading

import pytest

from helpers import (
    TCP_CLOSE_WAIT,
    TcpSocket,
    assert_pair_works,
    handshake,
    read_line,
    send_json,
    tcp_sockets,
    wait_until,
)

pytestmark = pytest.mark.slow

MiB = 1 << 20
WARMUP = 1000
CYCLES = 5000
THREADS = 4
KINDS = ("complete", "hs1-close", "hs2-close", "half-line", "half-close", "garbage-close",
         "garbage-read")


def close_wait_on_port(port: int) -> list[TcpSocket]:
    """CLOSE_WAIT sockets whose local port is ``port``."""
    return [t for t in tcp_sockets() if t.local_port == port and t.state == TCP_CLOSE_WAIT]


def read_to_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return bytes(data)


def one_session(addr: tuple[str, int], kind: str, rng: random.Random) -> int:
    """Run one short session of ``kind``; return the bytes it delivered to the sink."""
    sock = socket.create_connection(addr, timeout=30)
    try:
        if kind in ("complete", "half-close"):
            handshake(sock, None, ["sink"])
            payload = rng.randbytes(rng.randint(1, 20000))
            sock.sendall(payload)
            if kind == "half-close":
                sock.shutdown(socket.SHUT_WR)
                # The server ends the session on our EOF and closes its side.
                assert read_to_eof(sock) == b""
            return len(payload)
        if kind == "hs1-close":
            send_json(sock, {"req": "hs1"})
        elif kind == "hs2-close":
            send_json(sock, {"req": "hs1"})
            read_line(sock)
        elif kind == "half-line":
            sock.sendall(b'{"req": "hs1", "ch')
        elif kind == "garbage-close":
            sock.sendall(rng.randbytes(rng.randint(1, 9000)))
        elif kind == "garbage-read":
            # A line that is no handshake: the server answers FAIL and closes.
            sock.sendall(b"\x00" + rng.randbytes(rng.randint(0, 3000)).replace(b"\n", b"") + b"\n")
            rest = read_to_eof(sock)
            assert rest == b"" or b'"FAIL"' in rest, rest[:200]
        return 0
    finally:
        sock.close()


class Sink(threading.Thread):
    """The long-lived receiver: counts every byte it is sent."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.received = 0
        self.cond = threading.Condition()

    def run(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 20):
                with self.cond:
                    self.received += len(chunk)
                    self.cond.notify_all()
        except OSError:
            pass

    def wait_for(self, n: int, timeout: float = 60) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: self.received >= n, timeout)
        assert ok and self.received == n, f"sink got {self.received} of {n} bytes"


def churn(server, count: int, seed: int) -> tuple[int, int]:
    """``count`` sessions over THREADS threads; returns (bytes for the sink, sessions that
    should end with reason "client closed")."""
    addr = (server.host, server.port)
    kinds = [KINDS[i % len(KINDS)] for i in range(count)]
    random.Random(seed).shuffle(kinds)
    totals = [0] * THREADS
    errors: list[BaseException] = []

    def work(t: int) -> None:
        rng = random.Random(seed * 100 + t)
        try:
            for kind in kinds[t::THREADS]:
                totals[t] += one_session(addr, kind, rng)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads), "churn threads did not finish"
    if errors:
        raise errors[0]
    return sum(totals), sum(k in ("complete", "half-close") for k in kinds)


def test_churn_leaks_no_fds_sockets_or_memory(start_server):
    server = start_server("--mode", "chan", "--handshake-timeout", "30")
    sink_sock, _ = server.handshake("sink", ["nobody"])
    sink_sock.settimeout(None)
    sink = Sink(sink_sock)
    sink.start()
    fds_idle = server.fd_count()

    def settled() -> bool:
        return server.fd_count() <= fds_idle

    # Warm-up: let allocator arenas, caches and the routing tables reach their working size.
    mark = server.mark()
    expected, clean = churn(server, WARMUP, seed=1)
    sink.wait_for(expected)
    wait_until(settled, 30, "fd count back to idle after warm-up")
    server.wait_log(r"reason=\"client closed", start=mark, count=clean, timeout=60)
    rss_warm = server.rss()

    mark = server.mark()
    more, clean = churn(server, CYCLES, seed=2)
    expected += more
    # Every byte sent by a session that finished its handshake reached the sink.
    sink.wait_for(expected)
    # Every such session ended as a clean client close (and was logged so).
    server.wait_log(r"reason=\"client closed", start=mark, count=clean, timeout=60)
    wait_until(settled, 30, "fd count back to idle after churn")
    assert server.fd_count() == fds_idle, server.pids()
    # The last clients may have closed before the parent accepted them: such a
    # connection waits in the listen backlog (CLOSE_WAIT, no descriptor yet)
    # until it is accepted, handed over and closed.
    wait_until(lambda: close_wait_on_port(server.port) == [], 30, "no CLOSE_WAIT socket")
    assert server.fd_count() == fds_idle, server.pids()
    growth = server.rss() - rss_warm
    assert growth < 10 * MiB, f"server RSS grew {growth / MiB:.1f} MiB over {CYCLES} sessions"
    assert server.proc.poll() is None
    assert_pair_works(server)
