"""Coordinator message batches, without processes: what one side puts in an
event-loop iteration reaches the other as the same messages, in order."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwd import mesh
from fwd.coordinator import Coordinator
from fwd.registry import TOKEN_BITS, Owner

messages = st.lists(st.sampled_from(sorted(mesh.ARITY)).flatmap(
    lambda kind: st.lists(st.binary(max_size=8), min_size=mesh.ARITY[kind],
                          max_size=mesh.ARITY[kind]).map(lambda args: (kind, args))))


@given(messages)
def test_a_batch_splits_into_the_messages_put_in(msgs: list[tuple[bytes, list[bytes]]]) -> None:
    frames = [f for kind, args in msgs for f in (kind, *args)]
    assert list(mesh.unbatch(frames)) == msgs
    assert list(mesh.unbatch([b"w0", *frames], 1)) == msgs


def test_one_send_per_loop_iteration_in_order() -> None:
    loop = asyncio.new_event_loop()
    sent: list[list[bytes]] = []
    box = mesh.Outbox(loop, sent.append)
    try:
        box.put(mesh.RELEASE, b"a", b"1")
        box.put(mesh.CLAIM, b"7", b"a", b"2", b"0", b"peer")
        assert sent == []  # nothing leaves before the loop runs
        loop.run_until_complete(asyncio.sleep(0))
        assert sent == [[mesh.RELEASE, b"a", b"1", mesh.CLAIM, b"7", b"a", b"2", b"0", b"peer"]]
        box.put(mesh.RELEASE, b"b", b"3")
        box.drop()  # its addressee died: nothing of it may reach a successor
        loop.run_until_complete(asyncio.sleep(0))
        assert len(sent) == 1
    finally:
        loop.close()


def test_a_message_with_the_wrong_frame_count_is_refused_where_it_is_made() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(AssertionError):
            mesh.Outbox(loop, lambda frames: None).put(mesh.CLAIM, b"7")
    finally:
        loop.close()


def _coordinator(tmp_path: object) -> tuple[asyncio.AbstractEventLoop, Coordinator]:
    loop = asyncio.new_event_loop()
    coord = Coordinator(loop, 2, str(tmp_path))
    return loop, coord


def test_what_a_dead_worker_sent_holds_no_chid_for_its_successor(tmp_path: object) -> None:
    """The coordinator reads a worker's messages when it gets to them: a claim
    or a move that a worker sent just before it died must not be applied for
    it afterwards (its chids are freed at its death, and its successor's
    session tokens differ: registry.TOKEN_BITS)."""
    loop, coord = _coordinator(tmp_path)
    try:
        old, new = (1 << TOKEN_BITS) + 5, (2 << TOKEN_BITS) + 5
        coord.worker_started(0, 1)
        coord.worker_started(1, 1)
        coord.worker_lost(0)
        coord._handle([b"w0", mesh.CLAIM, b"7", b"claimed", b"%d" % old, b"0", b"peer"])
        coord._handle([b"w0", mesh.CLAIM, b"8", b"", b"%d" % old, b"0", b"peer"])
        loop.run_until_complete(asyncio.sleep(0))  # questions are answered after a drain
        assert coord.registry.owner("claimed") is None
        assert not coord.registry._owner  # nothing drawn for it either
        coord.worker_started(0, 2)
        coord._handle([b"w0", mesh.CLAIM, b"9", b"claimed", b"%d" % new, b"0", b"peer"])
        loop.run_until_complete(asyncio.sleep(0))
        assert coord.registry.owner("claimed") == Owner(0, new)
    finally:
        coord.close()
        loop.close()


def test_a_want_a_dead_worker_sent_draws_nothing_to_its_successor(tmp_path: object) -> None:
    """A want (bytes held for a chid) is withdrawn by the worker that sent it;
    one read after that worker's death would draw the chid's sessions to its
    successor for good, which never withdraws it."""
    loop, coord = _coordinator(tmp_path)
    try:
        old, new = 1 << TOKEN_BITS, 2 << TOKEN_BITS
        coord.worker_started(0, 1)
        coord.worker_started(1, 1)
        coord.worker_lost(0)
        coord.worker_started(0, 2)
        coord._handle([b"w0", mesh.WANT, b"x", b"1", b"%d" % old])
        assert coord.registry.wanted_home("x") is None
        coord._handle([b"w0", mesh.WANT, b"x", b"1", b"%d" % new])
        assert coord.registry.wanted_home("x") == 0
    finally:
        coord.close()
        loop.close()


def test_a_session_on_its_way_to_a_worker_that_dies_frees_its_chid(tmp_path: object) -> None:
    loop, coord = _coordinator(tmp_path)
    try:
        a, b = (1 << TOKEN_BITS) + 1, (1 << TOKEN_BITS) + 2
        coord.worker_started(0, 1)
        coord.worker_started(1, 1)
        coord.registry.claim("a", Owner(0, a))
        coord.registry.claim("b", Owner(0, b))
        coord.moving("a", Owner(0, a), 1)
        coord.moving("b", Owner(0, b), 1)
        coord._handle([b"w1", mesh.MOVE, b"b", b"0", b"%d" % b, b"%d" % ((1 << TOKEN_BITS) + 9)])
        coord.worker_lost(1)  # "a" never arrived; "b" did, and died with worker 1
        assert coord.registry.owner("a") is None
        assert coord.registry.owner("b") is None
    finally:
        coord.close()
        loop.close()


def test_a_moving_session_lost_in_the_hand_off_frees_its_chid_at_once(tmp_path: object) -> None:
    """The kernel would not pass the socket on (ETOOMANYREFS): the chid is free
    now, and nothing of the move is kept until the target worker dies."""
    loop, coord = _coordinator(tmp_path)
    try:
        a = (1 << TOKEN_BITS) + 1
        coord.worker_started(0, 1)
        coord.worker_started(1, 1)
        coord.registry.claim("a", Owner(0, a))
        coord.moving("a", Owner(0, a), 1)
        coord.lost_on_the_way("a", Owner(0, a), 1)
        assert coord.registry.owner("a") is None
        assert not coord._transit[1]
    finally:
        coord.close()
        loop.close()


def test_a_message_whose_handler_fails_does_not_hold_up_the_ones_behind_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug met by one message (one client's odd handshake) must not stall
    the pipe: ZeroMQ signals input by edge, so a drain that stopped at the
    exception would leave the rest unread, and every session waiting on them
    (a claim's answer) would time out."""
    import zmq

    loop = asyncio.new_event_loop()
    ctx = zmq.Context()
    rx, tx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    rx.bind("inproc://reader-test")
    tx.connect("inproc://reader-test")
    got: list[bytes] = []
    done = asyncio.Event()

    def on_message(frames: list[bytes]) -> None:
        if frames[0] == b"bad":
            raise TypeError("a bug")
        got.append(frames[0])
        if len(got) == 3:
            done.set()

    async def main() -> None:
        reader = mesh.Reader(loop, rx, on_message)
        for m in (b"1", b"bad", b"2", b"3"):
            tx.send(m)
        await asyncio.wait_for(done.wait(), 10)
        reader.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        tx.close()
        rx.close()
        ctx.term()
    assert got == [b"1", b"2", b"3"]
    assert "handling a message (b'bad'...) failed" in caplog.text
