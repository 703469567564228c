"""fwd.client and fwd.e2e: the client library against real fwd-server processes, and the
end-to-end encrypted stream format as a sans-I/O unit (test vector, tampering).

Synchronisation is by the server's log lines (a raw broadcast client is live once
the server logged ``session start chid=None peer=...``) and by bytes on sockets. A few
tests put a test-owned listening socket in the server's place, to control
exactly which bytes share a segment with the hs4 line.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib.util
import json
import os
import random
import re
import select
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from fwd import client as fc
from fwd.client import HandshakeError, HandshakeTimeout, connect, open_session
from fwd.e2e import (
    FINAL_BIT,
    HEADER_SIZE,
    MAX_RECORD,
    TAG_SIZE,
    Decoder,
    E2EError,
    E2EKey,
    Encoder,
    as_key,
)
from fwd.errors import FwdError
from helpers import read_line, recv_exact, wait_until

MiB = 1 << 20
WAIT = 60.0
T = TypeVar("T")

HAVE_CRYPTO = importlib.util.find_spec("fwd.crypto") is not None
needs_crypto = pytest.mark.skipif(
    not HAVE_CRYPTO, reason="fwd/crypto.py (password-encrypted handshake) is not there yet")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run one async test body with an overall limit, so a bug fails instead of hanging."""
    async def limited() -> T:
        return await asyncio.wait_for(coro_fn(), WAIT)
    return asyncio.run(limited())


def live_pattern(port: int, chid: str = "None") -> str:
    return rf"session start chid={re.escape(chid)} peer=127\.0\.0\.1:{port} "


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def key() -> E2EKey:
    return E2EKey.from_secret("shared secret for the tests")


# -- e2e: sans-I/O unit tests ----------------------------------------------------------

VECTOR_SECRET = "correct horse battery staple"
VECTOR_SALT = bytes(range(16))
VECTOR_PLAIN = b"hello, fwd\n"
VECTOR_MASTER = "534f67adcaf6e7c05d9eb0cdeb15ff8b134fc6e73fefba1a95f2082b66c34ef7"
VECTOR_STREAM_KEY = "1867e5495e6e8de40d0ec247ee3a5282fa2b36524b64b24158e705604082edbd"
VECTOR_STREAM = (
    "46574531" "000102030405060708090a0b0c0d0e0f"  # "FWE1" || salt
    "0000001b"  # record 0: 11 plaintext bytes + 16 tag
    "48e96399ff1a4631a2eab3f4ce465c4ece998ad1d20aa1d4279aa0"
    "80000010"  # record 1: FINAL, empty plaintext
    "ebcd1e17bc859f7f89d4224493e9cb20"
)


def test_vector_matches_the_spec_and_an_independent_derivation():
    k = E2EKey.from_secret(VECTOR_SECRET)
    assert k.master.hex() == VECTOR_MASTER
    assert k.stream_key(VECTOR_SALT).hex() == VECTOR_STREAM_KEY
    enc = Encoder(k, VECTOR_SALT)
    assert (enc.encode(VECTOR_PLAIN) + enc.finish()).hex() == VECTOR_STREAM
    # The same numbers from the standard library alone (scrypt; HKDF = RFC 5869 by hand).
    master = hashlib.scrypt(VECTOR_SECRET.encode(), salt=b"fwd-e2e-v1", n=2**15, r=8, p=1,
                            dklen=32, maxmem=64 * MiB)
    prk = hmac.new(VECTOR_SALT, master, hashlib.sha256).digest()
    okm = hmac.new(prk, b"fwd-e2e-v1 stream key\x01", hashlib.sha256).digest()
    assert master.hex() == VECTOR_MASTER and okm.hex() == VECTOR_STREAM_KEY
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    stream = bytes.fromhex(VECTOR_STREAM)
    word, body = stream[20:24], stream[24:24 + 27]
    assert AESGCM(okm).decrypt(bytes(12), body, word) == VECTOR_PLAIN
    dec = Decoder(k)
    assert dec.feed(stream) == VECTOR_PLAIN and dec.finished
    dec.feed_eof()


def test_round_trip_in_any_split(key):
    rnd = random.Random(7)
    enc = Encoder(key)
    writes = [os.urandom(n) for n in (1, 0, 1000, MAX_RECORD, MAX_RECORD + 1, 3 * MAX_RECORD + 5)]
    stream = b"".join(enc.encode(w) for w in writes) + enc.finish()
    for _ in range(5):
        dec = Decoder(key)
        out = bytearray()
        pos = 0
        while pos < len(stream):
            step = rnd.choice((1, 3, 19, 4096, 70000))
            out += dec.feed(stream[pos:pos + step])
            pos += step
        assert bytes(out) == b"".join(writes)
        assert dec.finished
        dec.feed_eof()


def test_records_are_capped_and_counted(key):
    enc = Encoder(key)
    stream = enc.encode(bytes(MAX_RECORD + 1))
    first = int.from_bytes(stream[HEADER_SIZE:HEADER_SIZE + 4], "big")
    assert first == MAX_RECORD + TAG_SIZE
    second_at = HEADER_SIZE + 4 + first
    assert int.from_bytes(stream[second_at:second_at + 4], "big") == 1 + TAG_SIZE
    # Each stream has its own salt, hence its own key: same plaintext, other bytes.
    assert Encoder(key).encode(b"x" * 100) != Encoder(key).encode(b"x" * 100)


def _sample(key: E2EKey) -> bytes:
    enc = Encoder(key)
    return enc.encode(b"attack at dawn") + enc.encode(b"bring snacks") + enc.finish()


@pytest.mark.parametrize("where", ["magic", "salt", "length", "ciphertext", "tag", "final-word"])
def test_any_flipped_bit_is_detected(key, where):
    stream = bytearray(_sample(key))
    second_record = HEADER_SIZE + 4 + len(b"attack at dawn") + TAG_SIZE
    index = {"magic": 0, "salt": 7, "length": HEADER_SIZE + 3, "ciphertext": HEADER_SIZE + 6,
             "tag": second_record - 1, "final-word": len(stream) - TAG_SIZE - 4}[where]
    stream[index] ^= 0x01
    dec = Decoder(key)
    with pytest.raises(E2EError):
        dec.feed(bytes(stream))
        dec.feed_eof()
    with pytest.raises(E2EError):  # the error is sticky
        dec.feed(b"more")


def test_no_forged_plaintext_is_released(key):
    stream = bytearray(_sample(key))
    stream[-1] ^= 0x80  # only the FINAL record's tag is wrong
    dec = Decoder(key)
    out = b""
    with pytest.raises(E2EError, match="authentication failed"):
        for i in range(len(stream)):
            out += dec.feed(stream[i:i + 1])
    assert out == b"attack at dawnbring snacks"  # the authentic records only


def test_wrong_key_reordering_dropping_and_truncation_are_detected(key):
    stream = _sample(key)
    with pytest.raises(E2EError, match="wrong key"):
        Decoder(E2EKey.from_secret("another secret")).feed(stream)
    rec1 = HEADER_SIZE + 4 + 14 + TAG_SIZE
    rec2 = rec1 + 4 + 12 + TAG_SIZE
    swapped = stream[:HEADER_SIZE] + stream[rec1:rec2] + stream[HEADER_SIZE:rec1] + stream[rec2:]
    with pytest.raises(E2EError):
        Decoder(key).feed(swapped)
    dropped = stream[:HEADER_SIZE] + stream[rec1:]
    with pytest.raises(E2EError):
        Decoder(key).feed(dropped)
    for cut in (0, 5, HEADER_SIZE, rec1, rec2, len(stream) - 1):
        dec = Decoder(key)
        dec.feed(stream[:cut])
        with pytest.raises(E2EError, match="truncated"):
            dec.feed_eof()
    dec = Decoder(key)
    dec.feed(stream)
    with pytest.raises(E2EError, match="after the end"):
        dec.feed(b"\x00")


def test_a_refused_stream_stays_refused(key):
    """Every later read raises the same error; none reports a clean end."""
    dec = Decoder(E2EKey.from_secret("another secret"))
    with pytest.raises(E2EError, match="wrong key"):
        dec.feed(_sample(key))
    for _ in range(2):
        with pytest.raises(E2EError, match="wrong key"):
            dec.check()
    dec = Decoder(key)
    assert dec.feed(_sample(key) + b"more") == b"attack at dawnbring snacks"  # authentic
    assert not dec.finished  # complete, but not clean: not "finished"
    with pytest.raises(E2EError, match="after the end"):
        dec.check()


@pytest.mark.parametrize("call", ["feed", "feed_eof", "check"])
def test_records_that_verified_before_a_bad_one_are_released_in_any_split(key, call):
    """Record by record (PROTOCOL.md §8.2): a tampered second record arriving
    in the same read as a good first one does not take the first one with it;
    the next call raises."""
    stream = bytearray(_sample(key))
    stream[HEADER_SIZE + 4 + 14 + TAG_SIZE + 6] ^= 0x01  # in the second record
    dec = Decoder(key)
    assert dec.feed(bytes(stream)) == b"attack at dawn"
    with pytest.raises(E2EError, match="authentication failed"):
        getattr(dec, call)(*([b"x"] if call == "feed" else []))


def test_writing_after_the_end_is_our_misuse_not_a_bad_stream(key):
    enc = Encoder(key)
    enc.finish()
    with pytest.raises(RuntimeError):  # as asyncio's write() after write_eof()
        enc.encode(b"late")


def test_a_secret_is_text_or_bytes():
    with pytest.raises(TypeError):
        as_key(1234)  # type: ignore[arg-type]  # bytes(1234) would be 1234 zero bytes


def test_bad_lengths_and_reflection_are_refused_early(key):
    enc = Encoder(key)
    head = enc.encode(b"x")[:HEADER_SIZE]
    huge = (MAX_RECORD + TAG_SIZE + 1).to_bytes(4, "big")
    with pytest.raises(E2EError, match="bad record length"):
        Decoder(key).feed(head + huge)  # refused before a byte of the body arrives
    with pytest.raises(E2EError, match="bad record length"):
        Decoder(key).feed(head + (FINAL_BIT | (TAG_SIZE + 1)).to_bytes(4, "big"))
    with pytest.raises(E2EError, match="bad record length"):  # empty, but not final
        Decoder(key).feed(head + TAG_SIZE.to_bytes(4, "big"))
    with pytest.raises(E2EError, match="reflected"):
        Decoder(key, forbid_salt=enc.salt).feed(head)
    with pytest.raises(E2EError, match="bad header"):
        Decoder(key).feed(b"GET / HTTP/1.1\r\n\r\n")
    assert issubclass(E2EError, FwdError)
    assert key.master.hex() not in repr(key) and "shared" not in repr(key)


# -- a fake server, to control what shares a segment with hs4 ------------------------------


@pytest.fixture
def fake_server() -> Iterator[Callable[[bytes], tuple[str, int]]]:
    """``start(tail)``: a one-shot server that answers hs1/hs3 and sends ``hs4 OK + tail``
    in one write, then waits for the client to close."""
    listeners: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(tail: bytes) -> tuple[str, int]:
        lst = socket.create_server(("127.0.0.1", 0))
        listeners.append(lst)

        def serve() -> None:
            conn, _ = lst.accept()
            with conn:
                assert b'"hs1"' in read_line(conn)
                conn.sendall(b'{"rsp":"hs2","chid":"fake"}\n')
                assert b'"hs3"' in read_line(conn)
                conn.sendall(b'{"rsp":"hs4","result":"OK"}\n' + tail)
                while conn.recv(65536):
                    pass

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        threads.append(t)
        return "127.0.0.1", lst.getsockname()[1]

    yield start
    for t in threads:
        t.join(10)
    for lst in listeners:
        lst.close()


def test_bytes_in_the_hs4_segment_reach_the_async_reader(fake_server):
    host, port = fake_server(b"first stream bytes")

    async def body() -> None:
        reader, writer, chid = await open_session(host, port, "me")
        assert chid == "fake"
        assert await reader.readexactly(18) == b"first stream bytes"
        writer.close()
        await writer.wait_closed()

    run(body)


def test_bytes_in_the_hs4_segment_reach_the_blocking_recv(fake_server):
    host, port = fake_server(b"first stream bytes")
    with connect(host, port) as conn:
        assert conn.chid == "fake"
        assert conn.recv(5) == b"first"
        assert recv_exact(conn, 13) == b" stream bytes"


def test_encrypted_bytes_in_the_hs4_segment_are_decrypted(fake_server, key):
    enc = Encoder(key)
    host, port = fake_server(enc.encode(b"sealed") + enc.finish())
    with connect(host, port, e2e_key=key) as conn:
        assert conn.recv(100) == b"sealed"
        assert conn.recv(100) == b""


@pytest.mark.parametrize("e2e", [False, True], ids=["plain", "e2e"])
def test_pending_tells_what_recv_has_that_the_socket_does_not(fake_server, key, e2e):
    """Bytes that came with hs4 (and, encrypted, a record's rest after a small
    recv) wait in the Connection: select() on fileno() cannot see them, so a
    select loop asks pending() first, as with ssl.SSLSocket."""
    enc = Encoder(key)
    data = enc.encode(b"0123456789") + enc.finish() if e2e else b"0123456789"
    host, port = fake_server(data)
    with connect(host, port, e2e_key=key if e2e else None) as conn:
        assert conn.recv(4) == b"0123"
        assert conn.pending() == 6
        assert select.select([conn], [], [], 0)[0] == []  # all of it is in conn already
        assert conn.recv(100) == b"456789"
        assert conn.pending() == 0


def test_a_service_that_is_not_a_fwd_server_is_named_as_such():
    """An SSH server's banner line read as "handshake rejected: not JSON",
    the words a fwd-server without a password answers to an encrypted hs1:
    a refusal it never sent."""
    lst = socket.create_server(("127.0.0.1", 0))

    def banner() -> None:
        conn, _ = lst.accept()
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            conn.recv(1024)
    t = threading.Thread(target=banner, daemon=True)
    t.start()
    try:
        with pytest.raises(HandshakeError) as info:
            connect("127.0.0.1", lst.getsockname()[1], "me")
        assert str(info.value) == ("the server's reply is not a fwd handshake line (not JSON): "
                                   "is it a fwd-server?")
    finally:
        t.join(10)
        lst.close()


def test_connect_timeout_covers_a_silent_server():
    lst = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never answers
    try:
        port = lst.getsockname()[1]
        said = r"connected, but the server did not answer the handshake within 0.3s \(is it"
        with pytest.raises(HandshakeTimeout, match=said):
            connect("127.0.0.1", port, connect_timeout=0.3)

        async def body() -> None:
            with pytest.raises(HandshakeTimeout, match=said):
                await open_session("127.0.0.1", port, connect_timeout=0.3)

        run(body)
    finally:
        lst.close()


def test_arguments_are_checked_before_connecting():
    with pytest.raises(ValueError, match="control characters"):
        connect("127.0.0.1", 1, "bad\nchid")
    with pytest.raises(ValueError, match="handshake"):
        connect("127.0.0.1", 1, "a", handshake=False)
    with pytest.raises(ValueError, match="timeout"):
        asyncio.run(open_session("127.0.0.1", 1, timeout=-1))


# -- against a real server -------------------------------------------------------------------


def test_chan_pair_exchanges_mib_byte_exact_and_half_closes(chan_server):
    a_data, b_data = os.urandom(6 * MiB + 123), os.urandom(5 * MiB + 7)

    async def exchange(session: tuple[Any, Any, str | None], data: bytes) -> bytes:
        reader, writer, _ = session

        async def send() -> None:
            view = memoryview(data)
            for i in range(0, len(view), 100_000):
                writer.write(view[i:i + 100_000])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        received = await reader.read()  # until the partner's FIN, passed on by the server
        await sender
        writer.close()
        return received

    async def body() -> None:
        # Both live before any byte moves: nothing has to wait in the hold buffer.
        b = await open_session(chan_server.host, chan_server.port, "b", ["a"])
        a = await open_session(chan_server.host, chan_server.port, "a", ["b"])
        assert (a[2], b[2]) == ("a", "b")
        got_a, got_b = await asyncio.gather(exchange(a, a_data), exchange(b, b_data))
        assert sha(got_a) == sha(b_data) and len(got_a) == len(b_data)
        assert sha(got_b) == sha(a_data) and len(got_b) == len(a_data)

    run(body)


def test_held_bytes_arrive_right_behind_hs4(chan_server):
    async def body() -> None:
        wr, ww, _ = await open_session(chan_server.host, chan_server.port, "watch")
        ar, aw, _ = await open_session(chan_server.host, chan_server.port, "a", ["watch", "late"])
        aw.write(b"held for late")
        # watch has it, so the copy for the absent "late" is certainly held.
        assert await wr.readexactly(13) == b"held for late"
        lr, lw, chid = await open_session(chan_server.host, chan_server.port, "late", ["a"])
        assert chid == "late"
        assert await lr.readexactly(13) == b"held for late"
        for w in (ww, aw, lw):
            w.close()

    run(body)
    # The blocking client too.
    watch, _ = chan_server.handshake("watch2")
    a, _ = chan_server.handshake("a2", ["watch2", "late2"])
    a.sendall(b"for late2")
    assert recv_exact(watch, 9) == b"for late2"
    with connect(chan_server.host, chan_server.port, "late2") as conn:
        assert recv_exact(conn, 9) == b"for late2"


def test_handshake_fail_raises_with_the_servers_desc(chan_server):
    holder, _ = chan_server.handshake("dup")

    async def body() -> None:
        with pytest.raises(HandshakeError) as info:
            await open_session(chan_server.host, chan_server.port, "dup", ["x"])
        assert info.value.desc == "chid in use: dup"
        assert str(info.value) == "handshake rejected: chid in use: dup"

    run(body)
    with pytest.raises(HandshakeError, match="chid in use: dup") as info:
        connect(chan_server.host, chan_server.port, "dup")
    assert isinstance(info.value, FwdError)
    # A chan server refuses a client that skips the handshake; the raw bytes are data.
    conn = connect(chan_server.host, chan_server.port, handshake=False)
    conn.sendall(b"hello\n")
    assert b'"desc":"not JSON"' in recv_exact(conn, 48)
    conn.close()


def test_blocking_pair_with_threads_and_half_close(chan_server):
    data = os.urandom(3 * MiB)
    b = connect(chan_server.host, chan_server.port, "tb", "ta")
    a = connect(chan_server.host, chan_server.port, "ta", ["tb"])
    assert (a.chid, b.chid) == ("ta", "tb")

    def send() -> None:
        a.sendall(data)
        a.shutdown_write()

    t = threading.Thread(target=send, daemon=True)
    t.start()
    got = bytearray()
    while chunk := b.recv(1 << 20):
        got += chunk
    t.join(WAIT)
    assert sha(bytes(got)) == sha(data)
    b.sendall(b"thanks")  # b can still answer after a's FIN
    b.shutdown_write()
    assert recv_exact(a, 6) == b"thanks"
    assert a.recv(10) == b""
    a.close()
    b.close()


def test_an_e2e_send_cut_by_a_timeout_breaks_the_stream_for_good(chan_server, key):
    """Part of a record went out: any later record would only be refused by
    the peer, so every later send raises the same failure."""
    a = connect(chan_server.host, chan_server.port, "ta2", ["tb2"], e2e_key=key)
    b = connect(chan_server.host, chan_server.port, "tb2", ["ta2"], e2e_key=key)
    try:
        a.settimeout(0.2)  # b reads nothing: 64 MiB cannot all go out
        with pytest.raises(TimeoutError):
            a.sendall(b"x" * (64 * MiB))
        a.settimeout(None)
        with pytest.raises(TimeoutError):
            a.sendall(b"later")
        with pytest.raises(TimeoutError):
            a.shutdown_write()
        with pytest.raises(BrokenPipeError):  # as a plain socket after shutdown(SHUT_WR)
            a.sendall(b"after the end")
        assert b.recv(0) == b""  # at once, as a socket's
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("e2e", [False, True], ids=["plain", "e2e"])
def test_a_with_block_left_by_an_exception_cuts_the_stream(chan_server, key, e2e):
    """Leaving ``with connect(...)`` by an exception resets the session: its
    partner must not take what it got for the whole stream. close() used to
    send the FINAL record and a FIN (shutdown) first, so the partner read a
    clean, authentic end."""
    secret = key if e2e else None
    b = connect(chan_server.host, chan_server.port, "wb", ["wa"], e2e_key=secret)
    with pytest.raises(RuntimeError), connect(chan_server.host, chan_server.port, "wa", ["wb"],
                                              e2e_key=secret) as a:
        a.sendall(b"part 1 of 3")
        assert recv_exact(b, 11) == b"part 1 of 3"
        raise RuntimeError("the writer failed")
    with b, pytest.raises(E2EError if e2e else ConnectionResetError):
        b.recv(100)


def test_close_from_another_thread_wakes_its_recv_and_ends_the_session(chan_server):
    conn = connect(chan_server.host, chan_server.port, "closing", ["nobody"])
    got: list[object] = []

    def read() -> None:
        try:
            got.append(conn.recv(10))
        except OSError as exc:  # closed just before its recv() started: EBADF
            got.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    wait_until(lambda: _blocked_in_recv(reader), WAIT, "the reader in recv")
    conn.close()
    reader.join(WAIT)
    assert not reader.is_alive()  # it used to stay blocked, and the session open
    assert got == [b""] or isinstance(got[0], OSError)
    wait_until(lambda: _claimable(chan_server, "closing"), WAIT, "its chid free again")


async def open_bcast_session(server: Any, chid: str, **kwargs: Any) -> tuple[Any, Any, list[bytes]]:
    """``open_session(chid)`` on a broadcast-mode server, on a new connection
    again while its hs1 comes too late for the sniff window (PROTOCOL §4.1;
    helpers.bcast_hs1 says why a client must retry). Such an attempt is a
    plain client, which the server logs live; no other plain client may
    connect meanwhile. The attempt's hs1 went to every live session as data:
    returns the reader, the writer and those hs1 lines (fwd.client sends
    compact JSON), for ``read_skipping`` and ``helpers.recv_skipping``."""
    line = json.dumps({"req": "hs1", "chid": chid}, separators=(",", ":")).encode() + b"\n"
    plain = re.compile(r"session start chid=None (peer=127\.0\.0\.1:\d+ )")
    loop = asyncio.get_running_loop()
    late: list[bytes] = []
    for _attempt in range(5):
        mark = server.mark()
        task = asyncio.ensure_future(open_session(server.host, server.port, chid, **kwargs))
        while not task.done():  # watch the log as well (every 20 ms) while it waits
            await asyncio.wait([task], timeout=0.02)
            with server.cond:
                m = next((m for ln in server.lines[mark:] if (m := plain.search(ln))), None)
            if m is not None and not task.done():
                task.cancel()  # closes the connection
                await asyncio.gather(task, return_exceptions=True)
                # Its hs1, if it left before the cancel, has been dealt with
                # once its session ended: the server counted it in.
                end = await loop.run_in_executor(
                    None, server.wait_log, rf"session end chid=None {m.group(1)}.* in=(\d+) ",
                    15.0, mark)
                if end.group(1) != "0":
                    assert end.group(1) == str(len(line)), end.group(0)
                    late.append(line)
                break
        else:
            reader, writer, got = task.result()
            assert got == chid
            return reader, writer, late
    raise AssertionError(f"no hs1 in 5 attempts was taken for a handshake: {line!r}")


async def read_skipping(reader: Any, n: int, late: list[bytes]) -> bytes:
    """helpers.recv_skipping for an asyncio reader: ``n`` bytes of payload
    (without ``{``), taking out each whole line of ``late`` once, wherever."""
    buf = b""
    while len(buf) < n:
        b = await reader.readexactly(1)
        if b != b"{":
            buf += b
            continue
        line = b + await reader.readuntil(b"\n")
        assert line in late, f"{line!r} (not one of {late}) after {buf!r}"
        late.remove(line)
    return buf


def _blocked_in_recv(thread: threading.Thread) -> bool:
    """The thread is alive and its top frame is Connection.recv."""
    frame = sys._current_frames().get(thread.ident or 0)
    return thread.is_alive() and frame is not None and frame.f_code.co_name == "recv"


def _claimable(server: Any, chid: str) -> bool:
    try:
        connect(server.host, server.port, chid).close()
    except HandshakeError:
        return False
    return True


def test_splice_stdio_returns_leaving_the_rest_of_its_input_unread(chan_server):
    """The thread that reads in_fd stops when splice_stdio returns: what the
    application writes there next is still there for it."""
    a = connect(chan_server.host, chan_server.port, "sa", ["sb"])
    b = connect(chan_server.host, chan_server.port, "sb", ["sa"])
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        b.sendall(b"hello")
        b.shutdown_write()  # b is done: the relay passes its FIN on to a
        fc.splice_stdio(a, in_r, out_w)
        assert os.read(out_r, 100) == b"hello"
        assert not any(t.name == "fwd-stdin" for t in threading.enumerate())
        os.write(in_w, b"next input")
        assert os.read(in_r, 100) == b"next input"
    finally:
        a.close()
        b.close()
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)


def test_broadcast_raw_clients_without_handshake(bcast_server):
    mark = bcast_server.mark()
    x = connect(bcast_server.host, bcast_server.port, handshake=False)
    bcast_server.wait_log(live_pattern(x.sock.getsockname()[1]), start=mark)
    assert x.chid is None

    async def body() -> None:
        mark = bcast_server.mark()
        reader, writer, chid = await open_session(bcast_server.host, bcast_server.port,
                                                  handshake=False)
        assert chid is None
        bcast_server.wait_log(live_pattern(writer.get_extra_info("sockname")[1]), start=mark)
        x.sendall(b"to everyone")
        assert await reader.readexactly(11) == b"to everyone"
        writer.write(b"{not a handshake}\n")
        await writer.drain()
        assert await asyncio.get_running_loop().run_in_executor(
            None, recv_exact, x.sock, 18) == b"{not a handshake}\n"
        # A handshake client in the same room hears the raw ones. An hs1 too
        # late for the sniff window (retried) was data for everyone. With
        # several workers the line above may still be on its way to H's.
        hr, hw, late = await open_bcast_session(bcast_server, "H")
        x.sendall(b"hi H")
        assert await read_skipping(hr, 4, [b"{not a handshake}\n", *late]) == b"hi H"
        assert await read_skipping(reader, 4, late) == b"hi H"
        for w in (writer, hw):
            w.close()

    run(body)
    x.close()


def test_e2e_the_wire_carries_only_ciphertext(bcast_server, key):
    plain = b"TOP SECRET payload, do not relay in clear. " * 5000  # ~215 KiB, 4 records
    mark = bcast_server.mark()
    spy = bcast_server.connect()  # a third, raw client: sees what the relay sees
    bcast_server.wait_log(live_pattern(spy.getsockname()[1]), start=mark)

    records = -(-len(plain) // MAX_RECORD)
    a_size = HEADER_SIZE + records * (4 + TAG_SIZE) + len(plain) + 4 + TAG_SIZE
    parts: list[bytes] = []

    async def body() -> None:
        ar, aw, late = await open_bcast_session(bcast_server, "A", e2e_key=key)
        br, bw, late_b = await open_bcast_session(bcast_server, "B", e2e_key=key)
        aw.write(plain)
        await aw.drain()
        assert await br.readexactly(len(plain)) == plain
        aw.close()  # FINAL record: b sees a clean end of a's stream
        assert await br.read() == b""
        # With several workers the spy gets a's and b's streams over different
        # pipes, in no promised order: it reads all of a's before b sends. And
        # the hs1s of attempts too late for the sniff window (retried), data
        # for everyone, which come in whole anywhere in it.
        late += late_b
        wire = await asyncio.get_running_loop().run_in_executor(
            None, recv_exact, spy, a_size + sum(map(len, late)))
        for line in late:
            assert line in wire, (line, late)
            wire = wire.replace(line, b"", 1)
        parts.append(wire)
        bw.close()  # b sent nothing: its header and FINAL record only

    run(body)
    wire = parts[0] + recv_exact(spy, HEADER_SIZE + 4 + TAG_SIZE)
    # The spy got a's whole stream, then b's, and never the plaintext.
    assert b"TOP SECRET" not in wire and b"relay in clear" not in wire
    assert wire.startswith(b"FWE1") and wire[a_size:].startswith(b"FWE1")
    with pytest.raises(E2EError):
        Decoder(E2EKey(bytes(32))).feed(wire[:a_size])
    dec = Decoder(key)
    assert dec.feed(wire[:a_size]) == plain and dec.finished  # it was the real stream


def test_e2e_chan_pair_both_ways_and_truncation_detected(chan_server, key):
    data = os.urandom(2 * MiB + 5)

    async def body() -> None:
        br, bw, _ = await open_session(chan_server.host, chan_server.port, "eb", ["ea"],
                                       e2e_key=key)
        ar, aw, _ = await open_session(chan_server.host, chan_server.port, "ea", ["eb"],
                                       e2e_key=key)
        aw.write(data)
        aw.write_eof()  # FINAL record, then FIN: passed on to b
        got = await br.read()
        assert sha(got) == sha(data) and br.at_eof()
        bw.write(b"reply after your EOF\n")
        assert await ar.readline() == b"reply after your EOF\n"
        bw.write_eof()
        assert await ar.read() == b""
        for w in (aw, bw):
            w.close()
        # A FIN without the FINAL record is a cut stream, not an end.
        cr, cw, _ = await open_session(chan_server.host, chan_server.port, "ec", ["ed"],
                                       e2e_key=key)
        dr, dw, _ = await open_session(chan_server.host, chan_server.port, "ed", ["ec"],
                                       e2e_key=key)
        cw.write(b"partial")
        assert isinstance(cw, fc.E2EStreamWriter)
        cw.raw.write_eof()  # bypass the wrapper: no FINAL record
        assert await dr.readexactly(7) == b"partial"
        for _ in range(2):  # and it stays an error, never a clean EOF
            with pytest.raises(E2EError, match="truncated"):
                await dr.read(100)
        for w in (cw, dw):
            w.close()
        # A line longer than the limit is refused as by asyncio.StreamReader,
        # not buffered without end.
        er, ew, _ = await open_session(chan_server.host, chan_server.port, "ee", ["ef"],
                                       e2e_key=key)
        fr, fw, _ = await open_session(chan_server.host, chan_server.port, "ef", ["ee"],
                                       e2e_key=key)
        ew.write(b"x" * (fc.LINE_LIMIT + 1))
        with pytest.raises(ValueError):
            await fr.readline()
        ew.write(b"\nnext\n")
        tail = await fr.readline()  # what was not read of the long line yet
        assert tail.strip(b"x") == b"\n"
        assert await fr.readline() == b"next\n"
        for w in (ew, fw):
            w.close()

    run(body)


def test_e2e_blocking_and_async_interoperate_and_wrong_key_fails(chan_server, key):
    async def body() -> None:
        ar, aw, _ = await open_session(chan_server.host, chan_server.port, "ka", ["kb"],
                                       e2e_key=key)
        b = await asyncio.get_running_loop().run_in_executor(
            None, lambda: connect(chan_server.host, chan_server.port, "kb", ["ka"], e2e_key=key))
        aw.write(b"from async")
        await aw.drain()
        got = await asyncio.get_running_loop().run_in_executor(None, b.recv, 100)
        assert got == b"from async"
        b.sendall(b"from blocking")
        assert await ar.readexactly(13) == b"from blocking"
        b.close()  # sends b's FINAL record
        assert await ar.read() == b""
        aw.close()

        xr, xw, _ = await open_session(chan_server.host, chan_server.port, "kx", ["ky"],
                                       e2e_key="the wrong secret")
        yr, yw, _ = await open_session(chan_server.host, chan_server.port, "ky", ["kx"],
                                       e2e_key=key)
        xw.write(b"hello?")
        with pytest.raises(E2EError, match="wrong key"):
            await yr.read(10)
        for w in (xw, yw):
            w.close()

    run(body)


# -- password-encrypted handshake -------------------------------------------------------------


@needs_crypto
def test_password_right_one_works_wrong_one_is_rejected(start_server):
    server = start_server("--mode", "chan", "--password", "open sesame")

    async def body() -> None:
        br, bw, b = await open_session(server.host, server.port, "pb", ["pa"],
                                       password="open sesame")
        ar, aw, a = await open_session(server.host, server.port, "pa", ["pb"], timeout=60,
                                       password="open sesame")
        assert (a, b) == ("pa", "pb")
        aw.write(b"knock knock")
        assert await br.readexactly(11) == b"knock knock"
        for w in (aw, bw):
            w.close()
        with pytest.raises(HandshakeError, match="handshake rejected"):
            await open_session(server.host, server.port, "pc", password="open barley")
        with pytest.raises(HandshakeError, match="handshake rejected"):
            await open_session(server.host, server.port, "pd")  # no password at all

    run(body)
    with connect(server.host, server.port, "pe", password="open sesame") as conn:
        assert conn.chid == "pe"
    with pytest.raises(HandshakeError, match="handshake rejected"):
        connect(server.host, server.port, "pf", password="wrong")


@needs_crypto
def test_a_password_the_server_does_not_have_is_named_as_the_likely_cause(start_server):
    """A server without a password reads our encrypted hs1 as a line that is
    not JSON; "not JSON" alone sent users looking at their data."""
    server = start_server("--mode", "chan")
    with pytest.raises(HandshakeError, match="not JSON: our handshake is encrypted: the "
                                             "server may have no password, or another one"):
        connect(server.host, server.port, "pg", password="unneeded")


@needs_crypto
def test_password_and_e2e_together(start_server, key):
    server = start_server("--mode", "chan", "--password", "pw")

    async def body() -> None:
        br, bw, _ = await open_session(server.host, server.port, "qb", ["qa"], password="pw",
                                       e2e_key=key)
        ar, aw, _ = await open_session(server.host, server.port, "qa", ["qb"], password="pw",
                                       e2e_key=key)
        aw.write(b"double wrapped")
        aw.write_eof()
        assert await br.read() == b"double wrapped"
        for w in (aw, bw):
            w.close()

    run(body)



def test_bytes_sent_after_the_servers_close_end_in_a_reset_not_a_clean_end():
    """The server closed (a refusal at accept): its FIN came first, then what
    we send meets a reset. That reset may be processed after our own FIN went
    out (a loaded machine); shutdown_write waits for the answer to our FIN
    instead of taking the end for a clean one."""
    lst = socket.create_server(("127.0.0.1", 0))
    try:
        conn = connect("127.0.0.1", lst.getsockname()[1], handshake=False)
        lst.accept()[0].close()
        conn.sock.settimeout(10)
        assert conn.recv(1) == b""  # its FIN
        conn.sendall(b"hello\n")
        with pytest.raises(ConnectionResetError):
            conn.shutdown_write()
        conn.close()
    finally:
        lst.close()


@pytest.mark.parametrize("how", ["close", "abort"])
def test_close_and_abort_wake_a_thread_blocked_in_sendall(chan_server, how):
    """b reads nothing, so a's sendall blocks in another thread. abort()
    (and close(), when nothing unread waits) must end the connection and
    wake it: shutting down only the reading side left the thread blocked
    and the connection open."""
    b = connect(chan_server.host, chan_server.port, "wb2", ["wa2"])
    a = connect(chan_server.host, chan_server.port, "wa2", ["wb2"])
    failed: list[BaseException] = []

    def flood() -> None:
        try:
            a.sendall(bytes(256 * 1024 * 1024))
        except OSError as exc:
            failed.append(exc)
    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    wait_until(lambda: _blocked_in(sender, "sendall"), WAIT, "the sender blocked")
    getattr(a, how)()
    sender.join(10)  # at once, in fact; it stayed blocked for good
    assert not sender.is_alive() and failed
    b.close()


def _blocked_in(thread: threading.Thread, name: str) -> bool:
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False
