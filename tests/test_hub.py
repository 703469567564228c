"""The worker's Hub on its own, talking to a real parent channel (a
SOCK_SEQPACKET pair, as the arbiter makes), with no clients."""
from __future__ import annotations

import asyncio

import uvloop

from fwd import fdpass
from fwd.config import Config
from fwd.worker import Hub


def test_every_ended_connection_reaches_the_parent_however_many() -> None:
    """The parent reads each note as one packet of at most 64 KiB, as
    Arbiter._one_from_worker does; a count of 100,000 in one note was cut to
    65,536, and the rest held --max-conns slots for good."""
    loop = uvloop.new_event_loop()
    parent, child = fdpass.channel_pair()
    parent.setblocking(False)
    child.setblocking(False)
    try:
        hub = Hub(Config(), loop)
        hub.channel = child
        ended = 100_000
        for _ in range(ended):
            hub.connection_gone()
        counted = 0

        async def parent_reads() -> None:
            nonlocal counted
            while counted < ended:
                try:
                    note = parent.recv(65536)
                except BlockingIOError:
                    await asyncio.sleep(0)  # let the hub send what did not fit
                    continue
                assert note.strip(b"x") == b""
                counted += len(note)

        loop.run_until_complete(asyncio.wait_for(parent_reads(), 10))
        assert counted == ended
        assert hub._gone == 0
    finally:
        loop.close()
        parent.close()
        child.close()


def test_a_parent_that_is_gone_ends_the_notes() -> None:
    loop = uvloop.new_event_loop()
    parent, child = fdpass.channel_pair()
    child.setblocking(False)
    parent.close()
    try:
        hub = Hub(Config(), loop)
        hub.channel = child
        hub.connection_gone()
        loop.run_until_complete(asyncio.sleep(0))
        assert hub._gone == 0
    finally:
        loop.close()
        child.close()


def test_with_a_per_address_limit_every_ended_connection_names_its_peer() -> None:
    """--max-conns-per-ip: the parent counts each address down from these notes,
    so each peer must arrive, once, in notes it reads whole."""
    loop = uvloop.new_event_loop()
    parent, child = fdpass.channel_pair()
    parent.setblocking(False)
    child.setblocking(False)
    try:
        hub = Hub(Config(max_conns_per_ip=10), loop)
        hub.channel = child
        sent = [f"[2001:db8::{i:x}]:{40000 + i % 20000}" for i in range(5000)]
        for peer in sent:
            hub.connection_gone(peer=peer)
        got: list[str] = []

        async def parent_reads() -> None:
            while len(got) < len(sent):
                try:
                    note = parent.recv(65536)
                except BlockingIOError:
                    await asyncio.sleep(0)
                    continue
                assert note[:1] == b"g" and len(note) < 65536
                got.extend(note[1:].decode().split("\n"))

        loop.run_until_complete(asyncio.wait_for(parent_reads(), 10))
        assert got == sent
    finally:
        loop.close()
        parent.close()
        child.close()


def test_a_late_drain_from_a_chids_old_worker_keeps_its_new_sessions_full() -> None:
    """x was full on worker 2, ended there, and came back full on worker 1.
    The two notices travel on different pipes: worker 2's DRAIN may come
    after worker 1's FULL, and it used to clear x's flag, so senders stopped
    waiting for a receiver that reads nothing and its queue grew unbounded."""
    loop = uvloop.new_event_loop()
    try:
        hub = Hub(Config(), loop)
        hub.remote_full(2, "x", True)
        hub.remote_full(1, "x", True)   # the new x
        hub.remote_full(2, "x", False)  # the old one's, late
        assert hub.remote_full_chids == {"x": 1}
        hub.remote_full(1, "x", False)
        assert hub.remote_full_chids == {}
    finally:
        loop.close()


def test_a_channel_wait_that_was_forgotten_or_replaced_is_not_called() -> None:
    """A session waits for the parent's channel and for a timer, whichever
    comes first. The channel's call, left behind when the timer went first,
    found the session waiting for the other workers' wake-up (it looks the
    same) and could send its hs4 OK a second time."""
    loop = uvloop.new_event_loop()
    parent, child = fdpass.channel_pair()
    child.setblocking(False)
    try:
        hub = Hub(Config(), loop)
        hub.channel = child
        called: list[str] = []
        hub.when_channel_free("timer went first", lambda: called.append("forgotten"))
        hub.when_channel_free("waits again", lambda: called.append("replaced"))
        hub.when_channel_free("waits again", lambda: called.append("latest"))
        hub.when_channel_free("plain", lambda: called.append("plain"))
        hub.forget_channel_wait("timer went first")

        async def until_called() -> None:
            while len(called) < 2:
                await asyncio.sleep(0)

        loop.run_until_complete(asyncio.wait_for(until_called(), 10))
        loop.run_until_complete(asyncio.sleep(0))
        assert sorted(called) == ["latest", "plain"]
    finally:
        loop.close()
        parent.close()
        child.close()
