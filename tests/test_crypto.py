"""The encrypted handshake codec (fwd/crypto.py, docs/PROTOCOL.md §7), sans I/O:
the published test vectors, the codec's round trips and every way a line is
rejected, and the nonce fields it brings into protocol.py."""
from __future__ import annotations

import base64
import hashlib
import json

import pytest

from fwd.crypto import (
    AD_C2S,
    AD_S2C,
    HANDSHAKE_SALT,
    MAX_SEALED_LINE,
    REJECTED,
    AeadLineCodec,
    derive_key,
    seal_line,
)
from fwd.errors import LineRejected, RemoteProtocolError
from fwd.protocol import (
    MAX_LINE,
    NEED_DATA,
    PAUSED,
    Handshake,
    Hs1,
    Hs2,
    Hs3,
    Hs4,
    Role,
    from_message,
    to_message,
)

# -- test vectors (the same values as docs/PROTOCOL.md §7.7) ------------------------

VECTOR_PASSWORD = "correct horse battery staple"
VECTOR_KEY = "49c2d80a52cabad876472196b67686bd540e06ac18b6f0271af3a6cf56ceb258"
VECTOR_HS1_NONCE = "000102030405060708090a0b"
VECTOR_HS1_JSON = b'{"req":"hs1","chid":"alice"}'
VECTOR_HS1_LINE = b"AAECAwQFBgcICQoLOSI2v88C5/RtqqqVZj/phtfsHQo5NFB3Q/LKH7qMJWybPbH3fMZxs21wKq8=\n"
VECTOR_HS2_NONCE = "0c0d0e0f1011121314151617"
VECTOR_HS2_JSON = b'{"rsp":"hs2","chid":"alice","nonce":"00112233445566778899aabbccddeeff"}'
VECTOR_HS2_LINE = (b"DA0ODxAREhMUFRYXoGxmDtCfgyus9goC2BGVxxM16P4dL3OZqvYaGZaV8xka/2FUzICqPiMkmhy4"
                   b"mtArMlvQwk1ldwVWMrJXPqmfG/wNUPpQbFotyKHboUzclv/2VGxtS7RV\n")


@pytest.fixture(scope="module")
def key() -> bytes:
    """scrypt is slow on purpose: derive once for the whole module."""
    return derive_key(VECTOR_PASSWORD)


@pytest.fixture(scope="module")
def other_key() -> bytes:
    return derive_key("Correct horse battery staple")


def test_vector_key(key):
    assert key.hex() == VECTOR_KEY
    # A second, independent scrypt (OpenSSL's, through hashlib) agrees.
    assert hashlib.scrypt(VECTOR_PASSWORD.encode(), salt=HANDSHAKE_SALT, n=16384, r=8, p=1,
                          dklen=32).hex() == VECTOR_KEY


def test_vector_hs1_line(key):
    line = seal_line(key, AD_C2S, VECTOR_HS1_JSON, bytes.fromhex(VECTOR_HS1_NONCE))
    assert line == VECTOR_HS1_LINE
    raw = base64.b64decode(line)
    assert raw[:12].hex() == VECTOR_HS1_NONCE
    assert len(raw) == 12 + len(VECTOR_HS1_JSON) + 16
    assert AeadLineCodec(key, Role.SERVER).decode(line[:-1]) == {"req": "hs1", "chid": "alice"}


def test_vector_hs2_line(key):
    line = seal_line(key, AD_S2C, VECTOR_HS2_JSON, bytes.fromhex(VECTOR_HS2_NONCE))
    assert line == VECTOR_HS2_LINE
    got = AeadLineCodec(key, Role.CLIENT).decode(line[:-1])
    assert got == json.loads(VECTOR_HS2_JSON)
    assert from_message(got, Role.CLIENT) == Hs2("alice", "00112233445566778899aabbccddeeff")


def test_vectors_do_not_cross_directions(key):
    with pytest.raises(LineRejected):
        AeadLineCodec(key, Role.CLIENT).decode(VECTOR_HS1_LINE[:-1])
    with pytest.raises(LineRejected):
        AeadLineCodec(key, Role.SERVER).decode(VECTOR_HS2_LINE[:-1])


def test_constants():
    assert HANDSHAKE_SALT == b"fwd-handshake-v1"
    assert (AD_C2S, AD_S2C) == (b"fwd-hs-c2s", b"fwd-hs-s2c")
    assert MAX_SEALED_LINE == 4 * -(-(12 + 4096 + 16) // 3) == 5500


def test_derive_key_is_deterministic_and_password_sensitive(key, other_key):
    assert len(key) == 32 and key != other_key
    assert derive_key("p\u00e4ss") == hashlib.scrypt("p\u00e4ss".encode(), salt=HANDSHAKE_SALT,
                                                      n=16384, r=8, p=1, dklen=32)


# -- the codec --------------------------------------------------------------------------

HS1 = {"req": "hs1", "chid": "caf\u00e9"}


def test_round_trip_both_directions(key):
    server, client = AeadLineCodec(key, Role.SERVER), AeadLineCodec(key, Role.CLIENT)
    line = client.encode(HS1)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert not server.authenticated
    assert server.decode(line[:-1]) == HS1
    assert server.authenticated
    msg = {"rsp": "hs2", "chid": "caf\u00e9", "nonce": "ab" * 16}
    assert client.decode(server.encode(msg)[:-1]) == msg


def test_encode_is_compact_utf8_json_under_a_fresh_nonce(key):
    client = AeadLineCodec(key, Role.CLIENT)
    a, b = client.encode(HS1), client.encode(HS1)
    assert a != b
    raw_a, raw_b = base64.b64decode(a[:-1], validate=True), base64.b64decode(b[:-1], validate=True)
    assert raw_a[:12] != raw_b[:12]
    text = '{"req":"hs1","chid":"caf\u00e9"}'.encode()
    assert len(raw_a) == 12 + len(text) + 16
    assert seal_line(key, AD_C2S, text, raw_a[:12]) == a


def test_wrong_key(key, other_key):
    line = AeadLineCodec(other_key, Role.CLIENT).encode(HS1)
    server = AeadLineCodec(key, Role.SERVER)
    with pytest.raises(LineRejected) as info:
        server.decode(line[:-1])
    assert info.value.desc == REJECTED and info.value.reason == "authentication failed"
    assert isinstance(info.value, RemoteProtocolError)
    assert not server.authenticated


def test_server_line_reflected_back_as_a_client_line(key):
    server = AeadLineCodec(key, Role.SERVER)
    line = server.encode({"req": "hs1", "chid": "x"})  # sealed with the s2c AD
    with pytest.raises(LineRejected) as info:
        server.decode(line[:-1])
    assert info.value.reason == "authentication failed"
    client = AeadLineCodec(key, Role.CLIENT)
    with pytest.raises(LineRejected):
        client.decode(client.encode({"rsp": "hs4", "result": "OK"})[:-1])


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_tampered_byte(key, where):
    raw = bytearray(base64.b64decode(AeadLineCodec(key, Role.CLIENT).encode(HS1)))
    pos = {"nonce": 3, "ciphertext": 12 + 5, "tag": len(raw) - 1}[where]
    raw[pos] ^= 0x01
    with pytest.raises(LineRejected) as info:
        AeadLineCodec(key, Role.SERVER).decode(base64.b64encode(bytes(raw)))
    assert info.value.desc == REJECTED


def test_truncated_and_extended_lines(key):
    raw = base64.b64decode(AeadLineCodec(key, Role.CLIENT).encode(HS1))
    for bad in (raw[:-1], raw + b"\x00", raw[:27], b""):
        with pytest.raises(LineRejected):
            AeadLineCodec(key, Role.SERVER).decode(base64.b64encode(bad))


@pytest.mark.parametrize("line", [
    b"not base64!",
    b'{"req":"hs1"}',
    b"AAECAwQFBgcICQoLOSI2v88C5/RtqqqVZj/phtfsHQo5NFB3Q/LKH7qMJWybPbH3fMZxs21wKq8",  # no pad
    b"AAECAwQFBgcICQoLOSI2v88C5/RtqqqVZj/phtfsHQo5NFB3Q/LKH7qMJWybPbH3fMZxs21wKq8=\r",
    b" AAECAwQFBgcICQoLOSI2v88C5/RtqqqVZj/phtfsHQo5NFB3Q/LKH7qMJWybPbH3fMZxs21wKq8=",
    b"AAECAwQFBgcICQoLOSI2v88C5_RtqqqVZj_phtfsHQo5NFB3Q_LKH7qMJWybPbH3fMZxs21wKq8=",  # urlsafe
    b"\xff\xfe",
    b"",
], ids=["garbage", "plain-json", "no-padding", "trailing-cr", "leading-space", "urlsafe",
        "binary", "empty"])
def test_bad_base64_or_plain_text(key, line):
    server = AeadLineCodec(key, Role.SERVER)
    with pytest.raises(LineRejected) as info:
        server.decode(line)
    assert info.value.desc == REJECTED
    # The reference line itself is fine: only the changes above break it.
    assert server.decode(VECTOR_HS1_LINE[:-1]) == {"req": "hs1", "chid": "alice"}


def test_too_long(key):
    server, client = AeadLineCodec(key, Role.SERVER), AeadLineCodec(key, Role.CLIENT)
    # 4096 bytes of JSON is the limit, as in plain mode: its line fits exactly.
    fits = b'{"req":"hs1","chid":"a"}'.ljust(MAX_LINE)
    line = seal_line(key, AD_C2S, fits)
    assert len(line) - 1 == MAX_SEALED_LINE
    assert server.decode(line[:-1]) == {"req": "hs1", "chid": "a"}
    # 4097 bytes would still fit in 5500 base64 characters, but are refused.
    over = seal_line(key, AD_C2S, fits + b" ")
    assert len(over) - 1 == MAX_SEALED_LINE
    with pytest.raises(LineRejected) as info:
        server.decode(over[:-1])
    assert info.value.desc == REJECTED and "4096" in info.value.reason
    with pytest.raises(LineRejected):
        server.decode(b"A" * (MAX_SEALED_LINE + 4))
    assert len(client.encode({"req": "hs1", "chid": "x" * 128})) < MAX_SEALED_LINE


@pytest.mark.parametrize("text", [b"", b"hello", b"[1", b'{"a":NaN}', b"\xff"],
                         ids=["empty", "word", "broken", "nan", "utf8"])
def test_authentic_but_not_json(key, text):
    server = AeadLineCodec(key, Role.SERVER)
    with pytest.raises(LineRejected) as info:
        server.decode(seal_line(key, AD_C2S, text)[:-1])
    assert info.value.desc == REJECTED


def test_authentic_json_that_is_not_a_message_is_left_to_the_handshake(key):
    server = AeadLineCodec(key, Role.SERVER)
    assert server.decode(seal_line(key, AD_C2S, b"[1]")[:-1]) == [1]
    with pytest.raises(RemoteProtocolError, match="not a JSON object"):
        from_message([1], Role.SERVER)


def test_client_accepts_a_plain_fail_and_nothing_else_plain(key):
    client = AeadLineCodec(key, Role.CLIENT)
    fail = {"rsp": "hs4", "result": "FAIL", "desc": REJECTED}
    assert client.decode(json.dumps(fail).encode()) == fail
    assert not client.authenticated
    for plain in ({"rsp": "hs2", "chid": "a"}, {"rsp": "hs4", "result": "OK"}, [1]):
        with pytest.raises(LineRejected):
            client.decode(json.dumps(plain).encode())
    with pytest.raises(LineRejected):
        client.decode(b"{not json")
    # The server never accepts plain lines.
    with pytest.raises(LineRejected):
        AeadLineCodec(key, Role.SERVER).decode(json.dumps(fail).encode())


def test_bad_key_length():
    with pytest.raises(ValueError):
        AeadLineCodec(b"short", Role.SERVER)


# -- the nonce fields and the state machine with the codec -----------------------------


def test_nonce_fields_serialize_only_when_set():
    assert to_message(Hs2("a")) == {"rsp": "hs2", "chid": "a"}
    assert to_message(Hs2("a", "n1")) == {"rsp": "hs2", "chid": "a", "nonce": "n1"}
    assert to_message(Hs3(("b",), 5, "n1")) == {"req": "hs3", "recvers": ["b"], "timeout": 5,
                                                "nonce": "n1"}
    assert to_message(Hs3()) == {"req": "hs3", "recvers": []}
    assert from_message({"req": "hs3", "nonce": "n1"}, Role.SERVER) == Hs3((), None, "n1")
    assert from_message({"req": "hs3"}, Role.SERVER) == Hs3()
    assert from_message({"rsp": "hs2", "chid": "a", "nonce": "x" * 128}, Role.CLIENT) \
        == Hs2("a", "x" * 128)
    assert from_message({"rsp": "hs2", "chid": "a", "nonce": None}, Role.CLIENT) == Hs2("a")


@pytest.mark.parametrize("nonce", [5, ["a"], {"a": 1}, True, "x" * 129],
                         ids=["int", "list", "object", "bool", "129-chars"])
def test_bad_nonce_is_rejected_both_sides(nonce):
    want = "nonce must be a string of at most 128 characters"
    with pytest.raises(RemoteProtocolError, match=want):
        from_message({"req": "hs3", "nonce": nonce}, Role.SERVER)
    with pytest.raises(RemoteProtocolError, match=want):
        from_message({"rsp": "hs2", "chid": "a", "nonce": nonce}, Role.CLIENT)
    with pytest.raises(RemoteProtocolError, match=want):
        Hs3((), None, nonce)


def test_full_encrypted_exchange(key):
    client = Handshake(Role.CLIENT, AeadLineCodec(key, Role.CLIENT))
    server = Handshake(Role.SERVER, AeadLineCodec(key, Role.SERVER))
    server.receive_data(client.send(Hs1("me")))
    assert server.next_event() == Hs1("me")
    client.receive_data(server.send(Hs2("me", "t0ken")))
    hs2 = client.next_event()
    assert hs2 == Hs2("me", "t0ken")
    assert isinstance(hs2, Hs2)
    server.receive_data(client.send(Hs3(("you",), 9, hs2.nonce)) + b"stream bytes")
    assert server.next_event() == Hs3(("you",), 9, "t0ken")
    client.receive_data(server.send(Hs4(True)) + b"back")
    assert client.next_event() == Hs4(True)
    assert client.next_event() is PAUSED
    assert server.trailing_data == b"stream bytes"
    assert client.trailing_data == b"back"


def test_encrypted_handshake_line_limit(key):
    server = Handshake(Role.SERVER, AeadLineCodec(key, Role.SERVER))
    server.receive_data(b"A" * MAX_SEALED_LINE)
    assert server.next_event() is NEED_DATA
    server.receive_data(b"A")
    with pytest.raises(LineRejected) as info:
        server.next_event()
    assert info.value.desc == f"line longer than {MAX_SEALED_LINE} bytes"


def test_client_handshake_sees_a_plain_refusal(key):
    client = Handshake(Role.CLIENT, AeadLineCodec(key, Role.CLIENT))
    client.send(Hs1())
    client.receive_data(b'{"rsp":"hs4","result":"FAIL","desc":"handshake rejected"}\n')
    assert client.next_event() == Hs4(False, REJECTED)
