"""Coordinator message batches, without processes: what one side puts in an
event-loop iteration reaches the other as the same messages, in order."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwd import mesh

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
        box.put(mesh.MINT, b"b", b"3")
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
