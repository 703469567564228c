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
