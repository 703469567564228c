"""Socket hand-off over SCM_RIGHTS, with real sockets and a real event loop."""
from __future__ import annotations

import asyncio
import errno
import os
import socket

import pytest
import uvloop

from fwd import fdpass


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    return a, b


def _confirming(handoff: fdpass.Handoff, on_socket):
    """A receiver that confirms each batch to ``handoff`` (as a worker does,
    through its channel) before it uses the sockets."""
    def on_batch(word: bytes, batch: list) -> None:
        handoff.confirm(word)
        for received in batch:
            on_socket(*received)
    return on_batch


def test_socket_metadata_and_bytes_arrive_together():
    tx, rx = fdpass.channel_pair()
    client, server_side = _tcp_pair()
    fdpass.send_socket(tx, server_side.fileno(), {"chid": "a", "recvers": ["b"]}, b"early")
    server_side.close()  # the receiver's copy keeps the connection open
    sock, meta, data = fdpass.recv_socket(rx)
    assert meta == {"chid": "a", "recvers": ["b"]} and data == b"early"
    client.sendall(b"through the passed fd")
    assert sock.recv(100) == b"through the passed fd"
    for s in (sock, client, tx, rx):
        s.close()


def test_eof_when_the_sender_is_gone():
    tx, rx = fdpass.channel_pair()
    tx.close()
    assert fdpass.recv_socket(rx) is None
    rx.close()


def test_too_much_data_is_refused():
    with pytest.raises(ValueError):
        fdpass.pack({}, bytes(fdpass.MAX_DATA + 1))
    meta, data = fdpass.unpack(fdpass.pack({"k": 1}, bytes(fdpass.MAX_DATA)))
    assert meta == {"k": 1} and len(data) == fdpass.MAX_DATA


def test_handoff_queues_when_the_channel_is_full_and_never_blocks():
    """A stalled receiver must not stall the acceptor: sends queue, then drain."""
    tx, rx = fdpass.channel_pair()
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    loop = uvloop.new_event_loop()
    pairs = [_tcp_pair() for _ in range(40)]
    fds_before = len(os.listdir("/proc/self/fd"))
    got: list[tuple[dict, bytes]] = []
    done = asyncio.Event()

    async def main() -> None:
        handoff = fdpass.Handoff(loop, tx)
        for i, (_, server_side) in enumerate(pairs):
            handoff.send(server_side, {"i": i}, bytes(2000))
        assert len(handoff) > 0  # some had to wait
        queued = len(handoff)

        def on_socket(sock, meta, data):
            got.append((meta, data))
            sock.close()
            if len(got) == len(pairs):
                done.set()

        fdpass.receive_into(loop, rx, _confirming(handoff, on_socket), lambda: None,
                            pytest.fail)
        await asyncio.wait_for(done.wait(), 10)
        assert len(handoff) == 0 and queued and handoff.unconfirmed == 0
        loop.remove_reader(rx)

    loop.run_until_complete(main())
    loop.close()
    assert [m["i"] for m, _ in got] == list(range(40))  # in order
    assert all(len(d) == 2000 for _, d in got)
    # Our copies were closed once confirmed: 40 fewer fds (the received ones were closed too).
    assert len(os.listdir("/proc/self/fd")) <= fds_before - 40 + 2
    for client, _ in pairs:
        client.close()
    tx.close()
    rx.close()


def test_handoff_to_a_process_that_is_gone_closes_the_sockets_and_raises_nothing():
    """The worker died and its channel end with it, but its exit is not handled
    yet: sending (now or from the queue) must not raise in the loop; the
    clients see their connections end."""
    tx, rx = fdpass.channel_pair()
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    loop = uvloop.new_event_loop()
    pairs = [_tcp_pair() for _ in range(40)]

    async def main() -> None:
        handoff = fdpass.Handoff(loop, tx, on_drop=lambda meta, exc: pytest.fail(
            f"a dead receiver's exit is handled apart, not per socket: {meta} {exc}"))
        for i, (_, server_side) in enumerate(pairs[:20]):
            handoff.send(server_side, {"i": i}, bytes(2000))
        assert len(handoff) > 0  # some wait in the queue
        rx.close()  # the receiving process dies
        for i, (_, server_side) in enumerate(pairs[20:]):
            handoff.send(server_side, {"i": i}, bytes(2000))
        for _ in range(10):  # the queue meets the closed channel too
            await asyncio.sleep(0)
        assert len(handoff) == 0

    loop.run_until_complete(main())
    loop.close()
    for client, _ in pairs:
        client.settimeout(10)
        assert client.recv(1) == b""  # its server side was closed: EOF
        client.close()
    tx.close()


def test_sockets_for_a_process_that_is_gone_come_back_to_the_owner():
    """The parent gives what a dead worker never confirmed to another one:
    each such socket comes back with its metadata and bytes, in order,
    whether it was sent and not read, its send failed, it waited in the
    queue, it came after, or the channel was closed with it still waiting.
    What the worker confirmed is its own, and does not come back."""
    tx, rx = fdpass.channel_pair()
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    loop = uvloop.new_event_loop()
    pairs = [_tcp_pair() for _ in range(40)]
    back: list[tuple[socket.socket, dict, bytes]] = []
    taken: list[socket.socket] = []

    async def main() -> None:
        handoff = fdpass.Handoff(loop, tx, on_gone=lambda sock, meta, data: back.append(
            (sock, meta, data)))
        for i, (_, server_side) in enumerate(pairs[:20]):
            handoff.send(server_side, {"i": i}, b"%d" % i)
        queued = len(handoff)
        assert queued > 0 and handoff.unconfirmed == 20 - queued  # some wait in the queue
        for _ in range(5):  # the worker takes five, and says so
            taken.append(fdpass.recv_socket(rx)[0])
        handoff.confirm(fdpass.TAKEN * 5)
        rx.close()  # the receiving process dies
        for i, (_, server_side) in enumerate(pairs[20:30], 20):
            handoff.send(server_side, {"i": i}, b"%d" % i)
        for _ in range(10):  # the queue meets the closed channel
            await asyncio.sleep(0)
        assert handoff.gone and len(handoff) == 0 and handoff.unconfirmed == 0
        assert [m["i"] for _, m, _ in back] == list(range(5, 30))
        assert [d for _, _, d in back] == [b"%d" % i for i in range(5, 30)]
        del back[:]
        tx2, rx2 = fdpass.channel_pair()
        tx2.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        handoff2 = fdpass.Handoff(loop, tx2, on_gone=lambda *a: back.append(a))
        for i, (_, server_side) in enumerate(pairs[30:], 30):
            handoff2.send(server_side, {"i": i}, bytes(2000))
        assert len(handoff2) > 0
        handoff2.close()  # its exit is handled with some still waiting
        assert [m["i"] for _, m, _ in back] == list(range(30, 40))
        rx2.close()

    loop.run_until_complete(main())
    loop.close()
    assert back and all(sock.fileno() >= 0 for sock, _, _ in back)  # open: the owner's now
    for sock in taken:
        sock.close()
    for client, server_side in pairs:
        client.close()
        server_side.close()
    tx.close()


def test_a_socket_the_kernel_will_not_pass_is_reported_and_the_rest_still_go():
    """Besides a receiver that is gone, the kernel may refuse one message to a
    live one (ETOOMANYREFS: too many descriptors in flight; here EMSGSIZE, a
    message larger than the channel's buffer, which any user can provoke).
    That socket is closed and ``on_drop`` tells the owner, who had counted it
    as handed on; the ones queued behind it still go, in order."""
    tx, rx = fdpass.channel_pair()
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel makes it 8 KiB
    loop = uvloop.new_event_loop()
    pairs = [_tcp_pair() for _ in range(41)]
    dropped: list[tuple[dict, int | None]] = []
    got: list[int] = []
    done = asyncio.Event()
    too_big = bytes(20_000)

    async def main() -> None:
        handoff = fdpass.Handoff(loop, tx, on_drop=lambda meta, exc: dropped.append(
            (meta, exc.errno)))
        handoff.send(pairs[0][1], {"i": "big, at once"}, too_big)
        for i in range(1, 21):
            handoff.send(pairs[i][1], {"i": i}, bytes(2000))
        assert len(handoff) > 0  # some wait in the queue
        handoff.send(pairs[21][1], {"i": "big, queued"}, too_big)
        for i in range(22, 41):
            handoff.send(pairs[i][1], {"i": i}, bytes(2000))

        def on_socket(sock, meta, data):
            got.append(meta["i"])
            sock.close()
            if len(got) == 39:
                done.set()

        fdpass.receive_into(loop, rx, _confirming(handoff, on_socket), lambda: None,
                            pytest.fail)
        await asyncio.wait_for(done.wait(), 10)
        assert len(handoff) == 0
        loop.remove_reader(rx)

    loop.run_until_complete(main())
    loop.close()
    assert dropped == [({"i": "big, at once"}, errno.EMSGSIZE),
                       ({"i": "big, queued"}, errno.EMSGSIZE)]
    assert got == [i for i in range(1, 41) if i != 21]
    for client, _ in (pairs[0], pairs[21]):
        client.settimeout(10)
        assert client.recv(1) == b""  # closed: the client sees its connection end
    for client, _ in pairs:
        client.close()
    tx.close()
    rx.close()


def test_a_lost_descriptor_still_says_whose_it_was():
    """The receiver is out of descriptors: the kernel drops the socket but
    delivers the message, whose meta the receiver needs to count it out."""
    import resource

    tx, rx = fdpass.channel_pair()
    client, server_side = _tcp_pair()
    fdpass.send_socket(tx, server_side.fileno(), {"peer": "127.0.0.1:5"}, b"")
    server_side.close()
    lowest_free = os.dup(0)
    os.close(lowest_free)
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, old[1]))
    try:
        with pytest.raises(fdpass.LostSocket) as lost:
            fdpass.recv_socket(rx)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
    assert fdpass.peer_of(lost.value.meta) == "127.0.0.1:5"
    client.settimeout(10)
    assert client.recv(1) == b""  # the kernel closed the socket it could not pass
    for s in (client, tx, rx):
        s.close()


def test_a_socket_whose_descriptor_the_receiver_lost_comes_back_to_tell_its_client():
    """The receiver ran out of descriptors for one socket of a batch: its note
    says which (LOST, in order), and the sender, which kept its copy, gets it
    back (``on_lost``) to tell the client why, instead of a silent close."""
    import resource

    tx, rx = fdpass.channel_pair()
    loop = uvloop.new_event_loop()
    pairs = [_tcp_pair() for _ in range(3)]
    lost: list[tuple[socket.socket, dict]] = []
    words: list[bytes] = []
    got: list[int] = []
    old = resource.getrlimit(resource.RLIMIT_NOFILE)

    async def main() -> None:
        handoff = fdpass.Handoff(loop, tx, on_lost=lambda sock, meta: lost.append((sock, meta)))
        for i, (_, server_side) in enumerate(pairs):
            handoff.send(server_side, {"i": i})
        assert handoff.unconfirmed == 3
        done = asyncio.Event()

        def on_batch(word: bytes, batch: list) -> None:
            words.append(word)
            handoff.confirm(word)
            for sock, meta, _ in batch:
                got.append(meta["i"])
                sock.close()
            done.set()

        def on_error(exc: OSError) -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, old)  # room for the third

        fdpass.receive_into(loop, rx, on_batch, pytest.fail, on_error)
        lowest_free = os.dup(0)
        os.close(lowest_free)
        # Room for one descriptor: the first takes it, the second is lost.
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 1, old[1]))
        try:
            await asyncio.wait_for(done.wait(), 10)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, old)
        assert handoff.unconfirmed == 0
        loop.remove_reader(rx)

    loop.run_until_complete(main())
    loop.close()
    assert words == [fdpass.TAKEN + fdpass.LOST + fdpass.TAKEN] and got == [0, 2]
    ((sock, meta),) = lost
    assert meta == {"i": 1}
    sock.sendall(b"server full\n")  # the owner's copy is open: it can still answer
    sock.close()
    client = pairs[1][0]
    client.settimeout(10)
    assert client.recv(100) == b"server full\n" and client.recv(1) == b""
    for client, _ in pairs:
        client.close()
    tx.close()
    rx.close()
