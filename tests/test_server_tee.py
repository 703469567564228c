"""Fan-out of a bulk stream through tee(2): each local receiver gets the same
pages, byte-exact, a receiver that falls behind gets the rest queued, and the
copy path stays where the congestion control paces (docs/ARCHITECTURE.md,
"Bulk streams go through a pipe")."""
from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from helpers import Sender, read_line, recv_exact, wait_until
from test_server_broadcast import raw_client
from test_server_splice import MiB, pipes

pytestmark = pytest.mark.both_impls


class Receiver(threading.Thread):
    """Reads ``size`` bytes (in pieces of ``piece``), keeping their sha256."""

    def __init__(self, sock: socket.socket, size: int, piece: int = 1 << 20) -> None:
        super().__init__(daemon=True)
        self.sock, self.size, self.piece = sock, size, piece
        self.hash = hashlib.sha256()
        self.got = 0

    def run(self) -> None:
        while self.got < self.size:
            chunk = self.sock.recv(min(self.piece, self.size - self.got))
            if not chunk:
                return
            self.hash.update(chunk)
            self.got += len(chunk)

    def digest(self, timeout: float = 60.0) -> str:
        self.join(timeout)
        assert not self.is_alive(), f"receiver stuck at {self.got} of {self.size} bytes"
        return self.hash.hexdigest()


def exact_stream(server, src: socket.socket, socks: list[socket.socket], size: int,
                 slow: int | None = None) -> tuple[int, str]:
    """``size`` random bytes from ``src``, which every one of ``socks`` must
    get exactly (the first reading ``slow`` bytes at a time, if given).
    Returns the pipe descriptors src's worker added meanwhile, and the
    bytes' sha256."""
    worker = server.worker_of(src)
    before = pipes(worker)
    readers = [Receiver(s, size, piece=slow if slow and i == 0 else 1 << 20)
               for i, s in enumerate(socks)]
    for r in readers:
        r.start()
    up = Sender(src, size, block=1 << 18)
    up.start()
    for r in readers:
        assert r.digest() == up.digest
    up.finish()
    return pipes(worker) - before, up.digest


def fan_out(server, recvers: list[str] | None, size: int, slow: int | None = None) -> int:
    """Three receivers, then a sender naming ``recvers`` (None: everyone else);
    ``slow``: the first receiver reads through a small buffer (exact_stream).
    Returns the worker's pipe descriptors added while the stream ran."""
    socks = [server.handshake(name, ["nobody"])[0] for name in ("r1", "r2", "r3")]
    if slow:
        socks[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sender, _ = server.handshake("src", recvers)
    added, _ = exact_stream(server, sender, socks, size, slow)
    sender.close()
    for s in socks:
        s.close()
    return added


@pytest.mark.parametrize("recvers", [None, ["r1", "r2", "r3"]], ids=["everyone", "named"])
def test_fan_out_is_teed_to_every_receiver(start_server, recvers):
    """reno does not pace: the sender gets a pipe and the worker its scratch
    pipe for tee(2) (two descriptors each), which it keeps."""
    server = start_server("--mode", "chan", "--workers", "1", "--tcp-congestion", "reno")
    server.wait_log(r"bulk fan-out: tee\(2\) \(congestion control reno\)")
    assert fan_out(server, recvers, 24 * MiB) == 4
    worker = server.workers()[0]
    wait_until(lambda: server.ctl_json("status")["totals"]["spliced_sessions"] == 0, 10,
               "the sender's pipe to be closed")
    assert server.ctl_json("status")["totals"]["spliced_sessions"] == 0
    assert pipes(worker) >= 2  # the scratch pipe stays


def test_a_receiver_that_falls_behind_gets_the_rest_queued(start_server):
    """The slow receiver takes rounds in part or not at all: its rest is read
    back out of the pipe and queued, while the others keep being teed."""
    server = start_server("--mode", "chan", "--workers", "1", "--tcp-congestion", "reno",
                          "--max-buffer", "256KiB", "--slow-timeout", "0")
    assert fan_out(server, None, 16 * MiB, slow=4096) == 4


def test_broadcast_fan_out_is_teed(start_server):
    server = start_server("--mode", "broadcast", "--workers", "1", "--tcp-congestion", "reno")
    socks = [raw_client(server) for _ in range(3)]
    src = raw_client(server)
    # Every client is out of its sniff window (bytes reach it) before the stream.
    src.sendall(b"x")
    for s in socks:
        assert s.recv(1) == b"x"
    assert exact_stream(server, src, socks, 16 * MiB)[0] == 4


def test_fan_out_is_copied_where_the_congestion_control_paces(start_server):
    available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    if "bbr" not in available:
        pytest.skip("this kernel has no BBR")
    server = start_server("--mode", "chan", "--workers", "1", "--tcp-congestion", "bbr")
    server.wait_log(r"bulk fan-out: copied, since it paces \(congestion control bbr\)")
    assert fan_out(server, None, 16 * MiB) == 0


def test_fan_out_over_workers_tees_to_the_local_receivers(start_server):
    """The sender's worker tees each round to its own receivers and gives one
    copy of it to the other workers."""
    server = start_server("--mode", "chan", "--workers", "3", "--tcp-congestion", "reno")
    socks = [server.handshake(f"r{i}", [f"nobody{i}"])[0] for i in range(6)]
    src, _ = server.handshake("src", [])  # everyone else
    worker = server.worker_of(src)
    assert len({server.worker_of(s) for s in socks}) == 3
    assert any(server.worker_of(s) == worker for s in socks)
    assert exact_stream(server, src, socks, 24 * MiB)[0] == 4


def test_held_bytes_get_every_spliced_round(start_server):
    """A sender names a live receiver and one not up yet: rounds are spliced to
    the first and held, copied once, for the other, which gets them all."""
    server = start_server("--mode", "chan", "--workers", "1", "--tcp-congestion", "reno",
                          "--hold-bytes", "32MiB")
    r1, _ = server.handshake("r1", ["nobody"])
    src, _ = server.handshake("src", ["r1", "late"])
    added, digest = exact_stream(server, src, [r1], 16 * MiB)
    assert added == 4
    late, _ = server.handshake("late", ["nobody"])
    late_reader = Receiver(late, 16 * MiB)
    late_reader.start()
    assert late_reader.digest() == digest


def test_a_receiver_that_vanishes_mid_stream_costs_the_others_nothing(start_server):
    """One receiver resets its connection while rounds are being teed: the
    other two still get every byte."""
    server = start_server("--mode", "chan", "--workers", "1", "--tcp-congestion", "reno")
    socks = [server.handshake(name, ["nobody"])[0] for name in ("r1", "r2", "r3")]
    src, _ = server.handshake("src", None)
    readers = [Receiver(s, 24 * MiB) for s in socks[1:]]
    for r in readers:
        r.start()
    gone = Receiver(socks[0], 4 * MiB)
    gone.start()
    up = Sender(src, 24 * MiB, block=1 << 18)
    up.start()
    gone.digest()  # it read 4 MiB of the stream: now it vanishes
    socks[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    socks[0].close()
    for r in readers:
        assert r.digest() == up.digest
    up.finish()
    server.wait_log(r"session end chid=r1 ")


def test_a_stalled_receiver_is_cut_off_and_the_others_get_every_byte(start_server):
    """One of three receivers never reads: what it does not take of the teed
    rounds queues up to --max-buffer, it is disconnected after
    --slow-timeout, and the sender flows again to the other two."""
    # --slow-timeout 3: only the stalled receiver must be cut, however late; a
    # healthy one held up that long by a loaded machine must not be.
    server = start_server("--mode", "chan", "--workers", "1", "--tcp-congestion", "reno",
                          "--max-buffer", "256KiB", "--slow-timeout", "3")
    stalled, _ = server.handshake("stalled", ["nobody"])
    healthy = [server.handshake(name, ["nobody"])[0] for name in ("r2", "r3")]
    src, _ = server.handshake("src", None)
    mark = server.mark()
    assert exact_stream(server, src, healthy, 48 * MiB)[0] == 4
    server.wait_log(r"slow consumer disconnected chid=stalled ", start=mark)
    src.sendall(b"after")
    for s in healthy:
        assert recv_exact(s, 5) == b"after"
    stalled.close()


def drain(sock: socket.socket) -> None:
    """Read and forget what ``sock`` gets, in the background, until it ends."""
    def run() -> None:
        with contextlib.suppress(OSError):
            while sock.recv(1 << 20):
                pass
    threading.Thread(target=run, daemon=True).start()


def test_a_receiver_that_goes_live_between_a_round_and_its_hold_gets_every_byte(start_server):
    """A teed round goes to the live receivers at once and to the rest of its
    route (the hold for an absent chid) later in the same loop turn. A
    receiver whose hs3 came in between took its hold without that round,
    which was then held for it though it was live: a hole in its stream,
    and the round expired later (in about 7 of 10 tries)."""
    server = start_server("--mode", "chan", "--workers", "1", "--tcp-congestion", "reno",
                          "--pump-pairs", "0", "--hold-bytes", "256MiB", "--hold-total", "1GiB")
    drain(server.handshake("c", ["nobody"])[0])
    piece = 128 * 1024
    data = b"".join(struct.pack(">Q", i) for i in range(8 * MiB // 8))
    for trial in range(10):
        s, _ = server.handshake(f"s{trial}", ["c", f"b{trial}"])
        b = server.connect()
        sent = 0
        for i in range(40):
            s.sendall(data[sent:sent + piece])
            sent += piece
            if i == 5 + trial:  # b goes live right behind a round
                b.sendall(b'{"req":"hs1","chid":"b%d"}\n{"req":"hs3","recvers":["nobody"]}\n'
                          % trial)
            time.sleep(0.001)  # the stream's pace: rounds, not one long read
        read_line(b)  # hs2
        read_line(b)  # hs4
        got = recv_exact(b, sent)
        assert got == data[:sent], f"try {trial}: a hole or a swap"
        s.close()
        b.close()


def test_a_sender_taken_over_mid_round_leaves_its_round_to_its_route(start_server):
    """A takeover ends the sender between a teed round and the moment the
    rest of its route gets it (the same loop turn): looking its route up
    again then raised (it had left the router), and the round was lost."""
    server = start_server("--mode", "chan", "--workers", "1", "--tcp-congestion", "reno",
                          "--takeover", "--pump-pairs", "0", "--hold-bytes", "256MiB",
                          "--hold-total", "1GiB")
    drain(server.handshake("c", ["nobody"])[0])
    piece = 128 * 1024
    data = bytes(4 * MiB)
    for trial in range(10):
        mark = server.mark()
        s, _ = server.handshake(f"s{trial}", ["c", f"b{trial}"])
        t = server.connect()
        with contextlib.suppress(OSError):
            for i in range(30):
                s.sendall(data[i * piece:(i + 1) * piece])
                if i == 5:  # the same chid again, right behind a round
                    t.sendall(b'{"req":"hs1","chid":"s%d"}\n{"req":"hs3","recvers":["nobody"]}\n'
                              % trial)
                time.sleep(0.001)  # the stream's pace: rounds, not one long read
        server.wait_log(rf"session end chid=s{trial} .*taken over", start=mark)
        s.close()
        t.close()
    assert not any("Traceback" in ln or "Exception in callback" in ln for ln in server.lines)
