"""The happy paths of both modes, over real sockets, on both data paths."""
from __future__ import annotations

import pytest

from helpers import Sender, assert_pair_works, pair, recv_exact, recv_hash

pytestmark = pytest.mark.both_impls
MiB = 1 << 20


def test_chan_pair_byte_exact_both_ways(chan_server):
    sa, sb = pair(chan_server)
    up, down = Sender(sa, 8 * MiB), Sender(sb, 8 * MiB)
    up.start()
    down.start()
    assert recv_hash(sb, 8 * MiB) == up.digest
    assert recv_hash(sa, 8 * MiB) == down.digest
    up.finish()
    down.finish()


def test_generated_chid_is_unique_and_url_safe(chan_server):
    chids = {chan_server.handshake()[1] for _ in range(20)}
    assert len(chids) == 20
    for c in chids:
        assert 8 <= len(c) <= 32 and all(ch.isalnum() or ch in "-_" for ch in c)


def test_broadcast_without_handshake_reaches_every_other_client(bcast_server):
    mark = bcast_server.mark()
    receivers = [bcast_server.connect() for _ in range(3)]
    bcast_server.wait_log(r"live chid=None", start=mark, count=3)
    sender = bcast_server.connect()
    sender.sendall(b"hello everyone")
    for r in receivers:
        assert recv_exact(r, 14) == b"hello everyone"


def test_fresh_pair_after_start(chan_server):
    assert_pair_works(chan_server)
