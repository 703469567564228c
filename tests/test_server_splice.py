"""Bulk pairs through splice(2): the stream is byte-exact, a pipe is opened
only for a bulk stream and given back when its session ends, and a slow
receiver still gets every byte (the part of a round it cannot take is queued)."""
from __future__ import annotations

import hashlib
import os
import resource
import socket

import pytest

from helpers import Sender, pair, recv_hash, stream_both_ways, wait_until

pytestmark = pytest.mark.both_impls
MiB = 1 << 20


def pipes(pid: int) -> int:
    """Pipe descriptors the process holds now."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
        except FileNotFoundError:  # closed while we looked
            pass
    return count


def test_bulk_pair_is_spliced_both_ways_and_gives_its_pipes_back(chan_server):
    sa, sb = pair(chan_server)
    worker = chan_server.worker_of(sa)
    before = pipes(worker)
    stream_both_ways(sa, sb, 16 * MiB)
    assert pipes(worker) == before + 4  # one pipe (two descriptors) per direction
    assert chan_server.ctl_json("status")["totals"]["spliced_sessions"] == 2
    sa.close()
    sb.close()
    wait_until(lambda: pipes(worker) == before, 10, "the pipes to be closed")
    assert chan_server.ctl_json("status")["totals"]["spliced_sessions"] == 0


def test_small_writes_and_splice_min_zero_open_no_pipe(start_server):
    server = start_server("--mode", "chan", "--splice-min", "0")
    sa, sb = pair(server)
    worker = server.worker_of(sa)
    before = pipes(worker)
    up = Sender(sa, 8 * MiB)
    up.start()
    assert recv_hash(sb, 8 * MiB) == up.digest
    up.finish()
    assert pipes(worker) == before

    # (Without threads: a pair that lives that long gets them, and a pipe
    # while it has them, test_server_pumps.py.)
    small = start_server("--mode", "chan", "--pump-pairs", "0")
    sa, sb = pair(small)
    worker = small.worker_of(sa)
    before = pipes(worker)
    for i in range(200):  # interactive traffic: each read is one small message
        sa.sendall(b"%d\n" % i)
        assert sb.recv(64) == b"%d\n" % i
    assert pipes(worker) == before


def test_a_slow_receiver_gets_every_spliced_byte(start_server):
    """The receiver reads in small pieces through a small buffer (no
    autotuning), so splice rounds are often taken only in part and the rest
    goes through its queue (strace of the worker: 8 of 105 rounds)."""
    server = start_server("--mode", "chan", "--max-buffer", "256KiB", "--slow-timeout", "0")
    sa, sb = pair(server)
    sb.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    up = Sender(sa, 24 * MiB, block=1 << 18)
    up.start()
    h = hashlib.sha256()
    left = 24 * MiB
    while left:
        chunk = sb.recv(min(left, 4096))
        assert chunk, f"closed with {left} bytes missing"
        h.update(chunk)
        left -= len(chunk)
    up.finish()
    assert h.hexdigest() == up.digest


def test_pipes_stay_within_what_the_descriptor_limit_leaves(start_server):
    """--max-conns 100 under a limit of 166 descriptors leaves room for one
    pipe beside the connections and the reserve (64): of a pair streaming
    both ways, one direction is spliced and the other copied, both exact."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (166, 166))

    server = start_server("--mode", "chan", "--max-conns", "100", preexec=limit)
    sa, sb = pair(server)
    worker = server.worker_of(sa)
    before = pipes(worker)
    stream_both_ways(sa, sb, 8 * MiB)
    assert pipes(worker) == before + 2
    assert server.ctl_json("status")["totals"]["spliced_sessions"] == 1


def test_a_limit_that_leaves_no_pipe_is_logged_and_pairs_are_copied(start_server):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (165, 165))

    server = start_server("--mode", "chan", "--max-conns", "100", preexec=limit)
    server.wait_log(r"no splice pipes: the file descriptor limit leaves none beside "
                    r"--max-conns 100, so bulk pairs are copied")
    sa, sb = pair(server)
    worker = server.worker_of(sa)
    before = pipes(worker)
    stream_both_ways(sa, sb, 8 * MiB)
    assert pipes(worker) == before
    assert server.ctl_json("status")["totals"]["spliced_sessions"] == 0


def test_a_fin_after_spliced_bytes_arrives_behind_them(chan_server):
    """Half-close through a spliced pair: each side gets every byte, then the
    other's FIN, and the reverse direction, spliced too, still flows."""
    sa, sb = pair(chan_server)
    up = Sender(sa, 16 * MiB)
    up.start()
    assert recv_hash(sb, 16 * MiB) == up.digest
    up.finish()
    sa.shutdown(socket.SHUT_WR)
    assert sb.recv(1) == b""
    down = Sender(sb, 16 * MiB)
    down.start()
    assert recv_hash(sa, 16 * MiB) == down.digest
    down.finish()
    assert chan_server.ctl_json("status")["totals"]["spliced_sessions"] == 2
    sb.shutdown(socket.SHUT_WR)
    assert sa.recv(1) == b""
    chan_server.wait_log(r"session end chid=a .*reason=\"half-closed both ways")
