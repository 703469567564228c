"""Sans-I/O tests for the chan handshake (fwd/protocol.py): no sockets, no clock."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwd.errors import LocalProtocolError, RemoteProtocolError
from fwd.protocol import (
    MAX_CHID_BYTES,
    MAX_LINE,
    MAX_RECVERS,
    MAX_TIMEOUT,
    NEED_DATA,
    PAUSED,
    PLAIN,
    Handshake,
    Hs1,
    Hs2,
    Hs3,
    Hs4,
    PlainCodec,
    Role,
    Sniff,
    State,
    check_chid,
    decode_json_line,
    from_message,
    refusal,
    sniff,
    to_message,
)

FAST = settings(max_examples=150)
SLOW = settings(max_examples=60)


# -- helpers --------------------------------------------------------------------------


def compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def spaced(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def server_at(state: State) -> Handshake:
    """A server Handshake driven to ``state`` by a normal exchange."""
    hs = Handshake(Role.SERVER)
    if state is State.AWAIT_HS1:
        return hs
    hs.receive_data(compact({"req": "hs1", "chid": "ch0"}))
    assert hs.next_event() == Hs1("ch0")
    if state is State.SEND_HS2:
        return hs
    hs.send(Hs2("ch0"))
    if state is State.AWAIT_HS3:
        return hs
    hs.receive_data(compact({"req": "hs3"}))
    assert hs.next_event() == Hs3()
    if state is State.SEND_HS4:
        return hs
    hs.send(Hs4(True))
    assert state is State.DONE
    return hs


def client_at(state: State) -> Handshake:
    hs = Handshake(Role.CLIENT)
    if state is State.SEND_HS1:
        return hs
    hs.send(Hs1("ch0"))
    if state is State.AWAIT_HS2:
        return hs
    hs.receive_data(compact({"rsp": "hs2", "chid": "ch0"}))
    assert hs.next_event() == Hs2("ch0")
    if state is State.SEND_HS3:
        return hs
    hs.send(Hs3())
    if state is State.AWAIT_HS4:
        return hs
    hs.receive_data(compact({"rsp": "hs4", "result": "OK"}))
    assert hs.next_event() == Hs4(True)
    assert state is State.DONE
    return hs


def server_error(data: bytes, eof: bool = False) -> RemoteProtocolError:
    """Feed ``data`` to a fresh server, answer normally, return the error it raises."""
    hs = Handshake(Role.SERVER)
    if data:
        hs.receive_data(data)
    if eof:
        hs.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        for _ in range(10):
            event = hs.next_event()
            if isinstance(event, Hs1):
                hs.send(Hs2(event.chid or "picked"))
            elif isinstance(event, Hs3):
                hs.send(Hs4(True))
            else:
                break
    assert hs.state is State.FAILED
    return info.value


def drive_server(chunks, eof: bool = False):
    """Run a server machine over ``chunks`` like the I/O layer does.

    Returns (events, trailing bytes, error desc or None, final state).
    """
    hs = Handshake(Role.SERVER)
    events: list = []
    trailing = bytearray()
    error = None
    feeds = [bytes(c) for c in chunks] + ([b""] if eof else [])
    for chunk in feeds:
        hs.receive_data(chunk)
        try:
            while True:
                event = hs.next_event()
                if event is NEED_DATA:
                    break
                if event is PAUSED:
                    assert hs.state is State.DONE
                    trailing += hs.trailing_data
                    break
                events.append(event)
                if isinstance(event, Hs1):
                    assert hs.state is State.SEND_HS2
                    assert hs.next_event() is PAUSED
                    hs.send(Hs2(event.chid or "picked"))
                else:
                    assert isinstance(event, Hs3)
                    assert hs.state is State.SEND_HS4
                    hs.send(Hs4(True))
                    trailing += hs.trailing_data
        except RemoteProtocolError as exc:
            assert isinstance(exc.desc, str) and exc.desc
            assert hs.state is State.FAILED
            # Sticky: the same error comes back, whatever arrives afterwards.
            with pytest.raises(RemoteProtocolError) as again:
                hs.next_event()
            assert again.value is exc
            error = exc.desc
            break
    return events, bytes(trailing), error, hs.state


def split_at(data: bytes, cuts) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return [c for c in out if c]  # an empty chunk would mean EOF


# -- check_chid -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "chid",
    [
        "ch0",
        "a",
        "a" * MAX_CHID_BYTES,
        "\u00e9" * (MAX_CHID_BYTES // 2),  # 2 bytes each: exactly 128
        "with space",
        "~",
        "\u00a0nbsp",  # first code point after C1
        "\U0001f600",
        "line\u2028sep",  # not C0/C1: allowed
    ],
)
def test_check_chid_accepts_printable_text_up_to_128_bytes(chid):
    assert check_chid(chid) is chid


@pytest.mark.parametrize("value", [None, 1, 1.5, True, b"ch0", ["ch0"], {"c": 1}])
def test_check_chid_rejects_non_strings(value):
    with pytest.raises(RemoteProtocolError) as info:
        check_chid(value)
    assert info.value.desc == "chid must be a string"


def test_check_chid_rejects_empty():
    with pytest.raises(RemoteProtocolError) as info:
        check_chid("")
    assert info.value.desc == "chid must not be empty"


@pytest.mark.parametrize("chid", ["a" * (MAX_CHID_BYTES + 1), "\u00e9" * 65, "\U0001f600" * 33])
def test_check_chid_limit_is_in_utf8_bytes_not_characters(chid):
    """65 two-byte characters are 130 bytes: too long although only 65 chars."""
    with pytest.raises(RemoteProtocolError) as info:
        check_chid(chid)
    assert info.value.desc == "chid longer than 128 bytes"


@pytest.mark.parametrize(
    "chid", ["\x00", "a\x01", "tab\there", "nl\n", "\x1f", "del\x7f", "\x80", "c1\x85", "\x9f"]
)
def test_check_chid_rejects_c0_del_and_c1_controls(chid):
    with pytest.raises(RemoteProtocolError) as info:
        check_chid(chid)
    assert info.value.desc == "chid contains control characters"


@pytest.mark.parametrize("chid", ["\ud800", "a\udfff", "\udc80b"])
def test_check_chid_rejects_lone_surrogates(chid):
    with pytest.raises(RemoteProtocolError) as info:
        check_chid(chid)
    assert info.value.desc == "chid is not valid Unicode"


def test_check_chid_names_the_field_in_its_desc():
    with pytest.raises(RemoteProtocolError) as info:
        check_chid("", "recver")
    assert info.value.desc == "recver must not be empty"


def _chid_ok(s: str) -> bool:
    """Independent statement of the chid rule, used as an oracle."""
    if not s or any(0xD800 <= ord(c) <= 0xDFFF for c in s):
        return False
    if len(s.encode("utf-8")) > MAX_CHID_BYTES:
        return False
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in s)


@FAST
@given(st.text(max_size=140) | st.text(st.characters(max_codepoint=0x2FF), max_size=140))
def test_check_chid_matches_the_rule(s):
    if _chid_ok(s):
        assert check_chid(s) == s
    else:
        with pytest.raises(RemoteProtocolError):
            check_chid(s)


# -- event constructors ---------------------------------------------------------------


def test_event_constructors_validate():
    assert Hs1().chid is None
    with pytest.raises(RemoteProtocolError):
        Hs1("")
    with pytest.raises(RemoteProtocolError):
        Hs2("bad\n")
    with pytest.raises(RemoteProtocolError):
        Hs3(("ok", "\x00"))
    with pytest.raises(RemoteProtocolError) as info:
        Hs3(tuple(f"r{i}" for i in range(MAX_RECVERS + 1)))
    assert info.value.desc == f"more than {MAX_RECVERS} recvers"
    assert len(Hs3(tuple(f"r{i}" for i in range(MAX_RECVERS))).recvers) == MAX_RECVERS


@pytest.mark.parametrize("timeout", [0, 1, 30, MAX_TIMEOUT, None])
def test_hs3_accepts_timeouts_in_range(timeout):
    assert Hs3((), timeout).timeout == timeout


@pytest.mark.parametrize("timeout", [-1, MAX_TIMEOUT + 1, 2**64, True, False, 1.0, "5", [5]])
def test_hs3_rejects_bad_timeouts(timeout):
    with pytest.raises(RemoteProtocolError) as info:
        Hs3((), timeout)
    assert info.value.desc == f"timeout must be an integer from 0 to {MAX_TIMEOUT}"


# -- decode_json_line and PlainCodec -------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"\xff",
        b'{"req":"hs1","chid":"\xc3"}',  # truncated 2-byte sequence
        b'{"req":"hs1","chid":"\xc0\xaf"}',  # overlong encoding of "/"
        b'{"req":"hs1","chid":"\xed\xa0\x80"}',  # UTF-8-encoded surrogate
        b'{"req":"hs1","chid":"\xf4\x90\x80\x80"}',  # above U+10FFFF
    ],
)
def test_decode_rejects_invalid_utf8(line):
    with pytest.raises(RemoteProtocolError) as info:
        decode_json_line(line)
    assert info.value.desc == "invalid UTF-8"


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"   ",
        b"{",
        b"hello",
        b"{'req': 'hs1'}",
        b'{"req":"hs1"} x',
        b'{"req":"hs1"}{"req":"hs3"}',
        b"NaN",
        b'{"req":"hs3","timeout":NaN}',
        b'{"req":"hs3","timeout":Infinity}',
        b'{"req":"hs3","timeout":-Infinity}',
        b"[" * 4000 + b"]" * 4000,
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
        b"\xef\xbb\xbf{}",  # BOM
    ],
)
def test_decode_rejects_non_json(line):
    with pytest.raises(RemoteProtocolError) as info:
        decode_json_line(line)
    assert info.value.desc == "not JSON"


def test_decode_accepts_compact_and_spaced():
    want = {"req": "hs1", "chid": "ch0"}
    assert decode_json_line(b'{"req":"hs1","chid":"ch0"}') == want
    assert decode_json_line(b'{"req": "hs1", "chid": "ch0"}') == want
    assert decode_json_line(b' \t{ "req" : "hs1" ,\r "chid":"ch0" } \r') == want
    assert PlainCodec().decode(b'{"req": "hs1", "chid": "ch0"}') == want


def test_plain_codec_encodes_compact_utf8_lines():
    line = PLAIN.encode({"rsp": "hs2", "chid": "\u00e9\U0001f600"})
    assert line == '{"rsp":"hs2","chid":"\u00e9\U0001f600"}\n'.encode()
    fail = PLAIN.encode({"rsp": "hs4", "result": "FAIL", "desc": "two\nlines"})
    assert fail.count(b"\n") == 1 and fail.endswith(b"\n")
    assert PLAIN.decode(fail[:-1])["desc"] == "two\nlines"


@FAST
@given(st.binary(max_size=200))
def test_decode_only_ever_raises_remote_errors(data):
    try:
        decode_json_line(data)
    except RemoteProtocolError as exc:
        assert exc.desc in ("invalid UTF-8", "not JSON")


# -- to_message / from_message -------------------------------------------------------


def test_to_message_shapes():
    assert to_message(Hs1()) == {"req": "hs1"}
    assert to_message(Hs1("ch0")) == {"req": "hs1", "chid": "ch0"}
    assert to_message(Hs2("ch0")) == {"rsp": "hs2", "chid": "ch0"}
    assert to_message(Hs3()) == {"req": "hs3", "recvers": []}
    assert to_message(Hs3(("a", "b"), 7)) == {"req": "hs3", "recvers": ["a", "b"], "timeout": 7}
    assert to_message(Hs4(True)) == {"rsp": "hs4", "result": "OK"}
    assert to_message(Hs4(False, "why")) == {"rsp": "hs4", "result": "FAIL", "desc": "why"}


@pytest.mark.parametrize(
    "msg",
    [{"req": "hs1"}, {"req": "hs1", "chid": None}, {"req": "hs1", "chid": ""}],
)
def test_hs1_without_chid_lets_the_server_pick(msg):
    assert from_message(msg, Role.SERVER) == Hs1(None)


@pytest.mark.parametrize(
    ("msg", "desc"),
    [
        ({"req": "hs1", "chid": "ch0", "future": {"x": [1]}, "version": 9},
         "unknown key 'future' in hs1"),
        ({"req": "hs1", "nonce": "n"}, "unknown key 'nonce' in hs1"),
        ({"req": "hs3", "recever": ["b"]}, "unknown key 'recever' in hs3"),
        ({"req": "hs3", "recvers": ["b"], "timout": 5}, "unknown key 'timout' in hs3"),
        # before the fields are checked, and cut like an unknown req
        ({"req": "hs3", "recvers": 1, "k" * 40: 1}, f"unknown key {'k' * 32!r} in hs3"),
    ],
)
def test_requests_with_unknown_keys_fail(msg, desc):
    with pytest.raises(RemoteProtocolError) as info:
        from_message(msg, Role.SERVER)
    assert info.value.desc == desc


@pytest.mark.parametrize(
    "msg", [{"req": "hs3"}, {"req": "hs3", "recvers": None}, {"req": "hs3", "recvers": []}]
)
def test_hs3_without_recvers_means_everyone(msg):
    assert from_message(msg, Role.SERVER) == Hs3((), None)


def test_hs3_dedupes_recvers_keeping_first_order():
    msg = {"req": "hs3", "recvers": ["b", "a", "b", "c", "a"], "timeout": 5}
    assert from_message(msg, Role.SERVER) == Hs3(("b", "a", "c"), 5)


def test_hs3_accepts_max_recvers_and_timeout_bounds():
    recvers = [f"r{i}" for i in range(MAX_RECVERS)]
    ev = from_message({"req": "hs3", "recvers": recvers, "timeout": MAX_TIMEOUT}, Role.SERVER)
    assert ev.recvers == tuple(recvers) and ev.timeout == MAX_TIMEOUT
    assert from_message({"req": "hs3", "timeout": 0}, Role.SERVER).timeout == 0
    assert from_message({"req": "hs3", "timeout": None}, Role.SERVER).timeout is None


def test_hs3_senders_absent_null_or_a_list():
    assert from_message({"req": "hs3"}, Role.SERVER).senders is None
    assert from_message({"req": "hs3", "senders": None}, Role.SERVER).senders is None
    assert from_message({"req": "hs3", "senders": []}, Role.SERVER).senders == ()
    ev = from_message({"req": "hs3", "senders": ["u", "v", "u"]}, Role.SERVER)
    assert ev.senders == ("u", "v")
    assert to_message(Hs3(("a",), senders=("u",))) == {"req": "hs3", "recvers": ["a"],
                                                       "senders": ["u"]}
    assert "senders" not in to_message(Hs3(("a",)))


@pytest.mark.parametrize(
    ("senders", "desc"),
    [
        ("u", "senders must be a list"),
        ({"u": 1}, "senders must be a list"),
        ([1], "sender must be a string"),
        ([""], "sender must not be empty"),
        (["a\x01"], "sender contains control characters"),
        (["x" * 129], "sender longer than 128 bytes"),
        ([f"s{i}" for i in range(MAX_RECVERS + 1)], f"more than {MAX_RECVERS} senders"),
        # Checked before repeats are dropped: as many entries, and unhashable ones.
        ([1] * (MAX_RECVERS + 1), f"more than {MAX_RECVERS} senders"),
        ([[]], "sender must be a string"),
        (["a", {"b": 1}], "sender must be a string"),
    ],
)
def test_hs3_bad_senders_fail(senders, desc):
    with pytest.raises(RemoteProtocolError) as info:
        from_message({"req": "hs3", "senders": senders}, Role.SERVER)
    assert info.value.desc == desc


@pytest.mark.parametrize("obj", [[], ["req", "hs1"], "hs1", 1, 1.5, None, True])
def test_from_message_rejects_non_objects(obj):
    with pytest.raises(RemoteProtocolError) as info:
        from_message(obj, Role.SERVER)
    assert info.value.desc == "not a JSON object"


@pytest.mark.parametrize(
    "msg", [{}, {"chid": "x"}, {"req": None}, {"req": 1}, {"req": ["hs1"]}, {"rsp": "hs1"}]
)
def test_from_message_rejects_missing_req(msg):
    with pytest.raises(RemoteProtocolError) as info:
        from_message(msg, Role.SERVER)
    assert info.value.desc == "missing 'req'"


@pytest.mark.parametrize("kind", ["hs2", "hs4", "HS1", "", "hs1 ", "x" * 100])
def test_from_message_rejects_unknown_req(kind):
    with pytest.raises(RemoteProtocolError) as info:
        from_message({"req": kind}, Role.SERVER)
    assert info.value.desc == f"unknown req {kind[:32]!r}"
    assert len(info.value.desc) < 60  # a huge req is not echoed back in full


@pytest.mark.parametrize(
    "chid, desc",
    [
        (5, "chid must be a string"),
        (False, "chid must be a string"),
        (["ch0"], "chid must be a string"),
        ("x" * 129, "chid longer than 128 bytes"),
        ("a\x00b", "chid contains control characters"),
        ("a\x7fb", "chid contains control characters"),
        ("a\x9bb", "chid contains control characters"),
        ("\ud800", "chid is not valid Unicode"),
    ],
)
def test_hs1_rejects_bad_chids(chid, desc):
    with pytest.raises(RemoteProtocolError) as info:
        from_message({"req": "hs1", "chid": chid}, Role.SERVER)
    assert info.value.desc == desc


@pytest.mark.parametrize(
    "recvers, desc",
    [
        ("ch0", "recvers must be a list"),
        ({"ch0": 1}, "recvers must be a list"),
        (5, "recvers must be a list"),
        (["ok", 5], "recver must be a string"),
        (["ok", None], "recver must be a string"),
        (["ok", ""], "recver must not be empty"),
        (["x" * 129], "recver longer than 128 bytes"),
        (["a\nb"], "recver contains control characters"),
        (["\udfff"], "recver is not valid Unicode"),
        ([f"r{i}" for i in range(MAX_RECVERS + 1)], f"more than {MAX_RECVERS} recvers"),
    ],
)
def test_hs3_rejects_bad_recvers(recvers, desc):
    with pytest.raises(RemoteProtocolError) as info:
        from_message({"req": "hs3", "recvers": recvers}, Role.SERVER)
    assert info.value.desc == desc


@pytest.mark.parametrize(
    "timeout", [True, False, -1, MAX_TIMEOUT + 1, 1.5, 10.0, float("inf"), "10", [10], {}]
)
def test_hs3_rejects_bad_timeout(timeout):
    with pytest.raises(RemoteProtocolError) as info:
        from_message({"req": "hs3", "timeout": timeout}, Role.SERVER)
    assert info.value.desc == f"timeout must be an integer from 0 to {MAX_TIMEOUT}"


def test_client_side_messages():
    assert from_message({"rsp": "hs2", "chid": "ch0", "x": 1}, Role.CLIENT) == Hs2("ch0")
    assert from_message({"rsp": "hs4", "result": "OK"}, Role.CLIENT) == Hs4(True)
    assert from_message({"rsp": "hs4", "result": "FAIL", "desc": "d"}, Role.CLIENT) == Hs4(
        False, "d"
    )
    assert from_message({"rsp": "hs4", "result": "FAIL"}, Role.CLIENT) == Hs4(False, "")
    assert from_message({"rsp": "hs4", "result": "FAIL", "desc": 3}, Role.CLIENT) == Hs4(False, "")


@pytest.mark.parametrize(
    "msg, desc",
    [
        ({"req": "hs2", "chid": "x"}, "missing 'rsp'"),
        ({"rsp": "hs1"}, "unknown rsp 'hs1'"),
        ({"rsp": "hs2"}, "chid must be a string"),
        ({"rsp": "hs2", "chid": ""}, "chid must not be empty"),
        ({"rsp": "hs4"}, "hs4 result must be OK or FAIL"),
        ({"rsp": "hs4", "result": "ok"}, "hs4 result must be OK or FAIL"),
        ({"rsp": "hs4", "result": True}, "hs4 result must be OK or FAIL"),
    ],
)
def test_client_side_rejections(msg, desc):
    with pytest.raises(RemoteProtocolError) as info:
        from_message(msg, Role.CLIENT)
    assert info.value.desc == desc


# -- round trips (hypothesis) -------------------------------------------------------

chids = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=24
)  # Cc is exactly C0 + DEL + C1; 24 chars * 4 bytes < 128
recver_lists = st.lists(chids, max_size=6, unique=True).map(tuple)
timeouts = st.none() | st.integers(0, MAX_TIMEOUT)
descs = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # may hold "\n"
events = st.one_of(
    st.builds(Hs1, st.none() | chids),
    st.builds(Hs2, chids),
    st.builds(Hs3, recver_lists, timeouts),
    st.builds(Hs4, st.just(True)),
    st.builds(Hs4, st.just(False), descs),
)
_ROLE_OF = {Hs1: Role.SERVER, Hs3: Role.SERVER, Hs2: Role.CLIENT, Hs4: Role.CLIENT}


@FAST
@given(events)
def test_events_round_trip_through_message_and_codec(event):
    role = _ROLE_OF[type(event)]
    msg = to_message(event)
    assert from_message(msg, role) == event
    line = PLAIN.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line == compact(msg)
    assert PLAIN.decode(line[:-1]) == msg
    assert from_message(PLAIN.decode(line[:-1]), role) == event
    # A peer that writes spaced JSON is understood the same way.
    assert from_message(decode_json_line(spaced(msg)[:-1]), role) == event


# -- server Handshake ---------------------------------------------------------------


def test_server_happy_path_states_and_replies():
    hs = Handshake(Role.SERVER)
    assert hs.state is State.AWAIT_HS1
    assert hs.next_event() is NEED_DATA
    hs.receive_data(b'{"req": "hs1", ')
    assert hs.next_event() is NEED_DATA
    hs.receive_data(b'"chid": "ch0"}\n')
    assert hs.next_event() == Hs1("ch0")
    assert hs.state is State.SEND_HS2
    assert hs.next_event() is PAUSED
    assert hs.send(Hs2("ch0")) == b'{"rsp":"hs2","chid":"ch0"}\n'
    assert hs.state is State.AWAIT_HS3
    assert hs.next_event() is NEED_DATA
    hs.receive_data(b'{"req":"hs3","recvers":["a"],"timeout":9}\n')
    assert hs.next_event() == Hs3(("a",), 9)
    assert hs.state is State.SEND_HS4
    assert hs.next_event() is PAUSED
    assert hs.send(Hs4(True)) == b'{"rsp":"hs4","result":"OK"}\n'
    assert hs.state is State.DONE
    assert hs.next_event() is PAUSED
    assert hs.trailing_data == b""


def test_server_pipelined_hs1_hs3_and_data_in_one_read():
    data = b"\x00raw\nstream {not json}\n"
    hs = Handshake(Role.SERVER)
    hs.receive_data(compact({"req": "hs1"}) + spaced({"req": "hs3", "recvers": ["b"]}) + data)
    assert hs.next_event() == Hs1(None)
    assert hs.next_event() is PAUSED  # hs3 waits until hs2 is sent
    hs.send(Hs2("picked"))
    assert hs.next_event() == Hs3(("b",))
    with pytest.raises(LocalProtocolError):
        hs.trailing_data  # noqa: B018 - not DONE until hs4 is sent
    hs.send(Hs4(True))
    assert hs.trailing_data == data
    assert hs.trailing_data == b"", "trailing data must be handed out exactly once"


def test_server_data_arriving_after_done_is_trailing_data():
    hs = server_at(State.DONE)
    assert hs.trailing_data == b""
    hs.receive_data(b"more")
    assert hs.next_event() is PAUSED
    assert hs.trailing_data == b"more"


@pytest.mark.parametrize(
    "state", [State.AWAIT_HS1, State.SEND_HS2, State.AWAIT_HS3, State.SEND_HS4]
)
def test_server_may_send_fail_in_any_state_before_done(state):
    hs = server_at(state)
    assert hs.refusable
    assert hs.send(Hs4(False, "chid in use: ch0")) == (
        b'{"rsp":"hs4","result":"FAIL","desc":"chid in use: ch0"}\n'
    )
    assert hs.state is State.FAILED


def test_server_fail_after_a_remote_error():
    hs = Handshake(Role.SERVER)
    hs.receive_data(b"garbage\n")
    with pytest.raises(RemoteProtocolError) as info:
        hs.next_event()
    line = hs.send(Hs4(False, info.value.desc))
    assert json.loads(line) == {"rsp": "hs4", "result": "FAIL", "desc": "not JSON"}


def test_server_cannot_fail_after_done():
    hs = server_at(State.DONE)
    assert not hs.refusable
    with pytest.raises(LocalProtocolError):
        hs.send(Hs4(False, "too late"))
    assert hs.state is State.DONE


@pytest.mark.parametrize(
    "state, event",
    [
        (State.AWAIT_HS1, Hs2("ch0")),
        (State.AWAIT_HS1, Hs4(True)),
        (State.SEND_HS2, Hs4(True)),
        (State.SEND_HS2, Hs1("ch0")),
        (State.AWAIT_HS3, Hs2("ch0")),
        (State.AWAIT_HS3, Hs4(True)),
        (State.SEND_HS4, Hs2("ch0")),
        (State.SEND_HS4, Hs3()),
        (State.DONE, Hs4(True)),
        (State.DONE, Hs2("ch0")),
    ],
)
def test_server_send_out_of_turn_is_a_local_error(state, event):
    hs = server_at(state)
    with pytest.raises(LocalProtocolError) as info:
        hs.send(event)
    assert state.name in info.value.desc
    assert hs.state is state, "a refused send must not move the machine"


@pytest.mark.parametrize(
    "data, desc",
    [
        (compact({"req": "hs3"}), "unexpected hs3, expected hs1"),
        (compact({"req": "hs1"}) + compact({"req": "hs1"}), "unexpected hs1, expected hs3"),
        (compact({"req": "hs2", "chid": "x"}), "unknown req 'hs2'"),
        (compact({"req": "hs9"}), "unknown req 'hs9'"),
        (compact({"rsp": "hs1"}), "missing 'req'"),
        (compact({"chid": "ch0"}), "missing 'req'"),
        (compact([1, 2]), "not a JSON object"),
        (b'"hs1"\n', "not a JSON object"),
        (b"null\n", "not a JSON object"),
        (b"\n", "not JSON"),
        (b"{\n", "not JSON"),
        (b'{"req":"hs1","x":NaN}\n', "not JSON"),
        (b'{"req":"hs1","x":Infinity}\n', "not JSON"),
        (b'{"req":"hs1","x":' + b"[" * 2000 + b"]" * 2000 + b"}\n", "not JSON"),
        (b'{"req":"hs1","chid":"\xff"}\n', "invalid UTF-8"),
        (compact({"req": "hs1", "chid": 7}), "chid must be a string"),
        (compact({"req": "hs1", "chid": "c" * 129}), "chid longer than 128 bytes"),
        (compact({"req": "hs1", "chid": "a\u0085"}), "chid contains control characters"),
        (b'{"req":"hs1","chid":"\\ud800"}\n', "chid is not valid Unicode"),
        (b'{"req":"hs1","chid":"a\\udc00b"}\n', "chid is not valid Unicode"),
        (compact({"req": "hs1"}) + compact({"req": "hs3", "recvers": "b"}),
         "recvers must be a list"),
        (compact({"req": "hs1"}) + compact({"req": "hs3", "recvers": ["\x7f"]}),
         "recver contains control characters"),
        (compact({"req": "hs1"}) + compact({"req": "hs3", "timeout": True}),
         f"timeout must be an integer from 0 to {MAX_TIMEOUT}"),
        (compact({"req": "hs1"}) + compact({"req": "hs3", "timeout": -5}),
         f"timeout must be an integer from 0 to {MAX_TIMEOUT}"),
        (compact({"req": "hs1"}) + compact({"req": "hs3", "timeout": 2**31}),
         f"timeout must be an integer from 0 to {MAX_TIMEOUT}"),
        (compact({"req": "hs1"}) + b'{"req":"hs3","timeout":1e400}\n',
         f"timeout must be an integer from 0 to {MAX_TIMEOUT}"),
    ],
)
def test_server_failures(data, desc):
    assert server_error(data).desc == desc


def test_fields_are_validated_before_the_step_order():
    """Documented order: a malformed hs3 sent first fails with its field error."""
    assert server_error(compact({"req": "hs3", "recvers": "x"})).desc == "recvers must be a list"


def test_duplicate_keys_last_one_wins():
    events, _, error, _ = drive_server([b'{"req":"hs3","req":"hs1","chid":"a","chid":"b"}\n'])
    assert error is None and events == [Hs1("b")]


def test_server_too_many_recvers_cannot_fit_in_one_line():
    """1025 recvers need more than MAX_LINE bytes, so the line limit already stops them."""
    big = compact({"req": "hs3", "recvers": [chr(65 + i % 26) for i in range(MAX_RECVERS + 1)]})
    assert len(big) > MAX_LINE
    assert server_error(compact({"req": "hs1"}) + big).desc == f"line longer than {MAX_LINE} bytes"


def test_server_recvers_deduplicated_in_order():
    events, _, error, _ = drive_server(
        [compact({"req": "hs1"}) + compact({"req": "hs3", "recvers": ["x", "y", "x", "z", "y"]})]
    )
    assert error is None
    assert events[1] == Hs3(("x", "y", "z"))


def _padded_hs1(total: int) -> bytes:
    """A valid hs1 line of exactly ``total`` bytes, without its newline."""
    head = b'{"req":"hs1"'
    line = head + b" " * (total - len(head) - 1) + b"}"
    assert len(line) == total
    return line


def test_server_line_of_exactly_max_line_is_accepted():
    events, _, error, _ = drive_server([_padded_hs1(MAX_LINE) + b"\n"])
    assert error is None and events == [Hs1(None)]


def test_server_line_one_byte_too_long_is_rejected():
    assert server_error(_padded_hs1(MAX_LINE + 1) + b"\n").desc == "line longer than 4096 bytes"


def test_server_rejects_long_line_before_its_newline_arrives():
    """The buffer must not grow without bound waiting for a newline."""
    hs = Handshake(Role.SERVER)
    hs.receive_data(b"{" + b" " * (MAX_LINE - 1))
    assert hs.next_event() is NEED_DATA  # 4096 bytes: still possibly a valid line
    hs.receive_data(b" ")
    with pytest.raises(RemoteProtocolError) as info:
        hs.next_event()
    assert info.value.desc == f"line longer than {MAX_LINE} bytes"


def test_long_hs3_line_rejected_too():
    hs = server_at(State.AWAIT_HS3)
    hs.receive_data(b"x" * (MAX_LINE + 10))
    with pytest.raises(RemoteProtocolError) as info:
        hs.next_event()
    assert info.value.desc == "line longer than 4096 bytes"


@pytest.mark.parametrize(
    "data",
    [b"", b'{"req":"hs1"', compact({"req": "hs1"}), compact({"req": "hs1"}) + b'{"req":'],
)
def test_server_eof_mid_handshake(data):
    err = server_error(data, eof=True)
    assert err.desc == "connection closed during handshake"


def test_client_eof_mid_handshake_is_the_servers_close():
    """A client reading EOF knows who closed: not "connection closed during
    handshake", the server's words for a client's own EOF."""
    hs = Handshake(Role.CLIENT)
    hs.send(Hs1("a"))
    hs.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        hs.next_event()
    assert info.value.desc == "the server closed the connection during the handshake"


def test_complete_lines_before_eof_are_still_delivered():
    hs = Handshake(Role.SERVER)
    hs.receive_data(compact({"req": "hs1", "chid": "a"}))
    hs.receive_data(b"")
    assert hs.next_event() == Hs1("a")
    hs.send(Hs2("a"))
    with pytest.raises(RemoteProtocolError):
        hs.next_event()


def test_eof_after_done_is_not_an_error():
    hs = server_at(State.DONE)
    hs.receive_data(b"")
    assert hs.next_event() is PAUSED


def test_receive_after_eof_is_a_local_error():
    hs = Handshake(Role.SERVER)
    hs.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        hs.receive_data(b"x")


def test_failure_is_sticky():
    hs = Handshake(Role.SERVER)
    hs.receive_data(b"[]\n")
    with pytest.raises(RemoteProtocolError) as first:
        hs.next_event()
    assert first.value.desc == "not a JSON object"
    hs.receive_data(compact({"req": "hs1"}))
    for _ in range(3):
        with pytest.raises(RemoteProtocolError) as again:
            hs.next_event()
        assert again.value is first.value
    assert hs.state is State.FAILED


def test_server_with_custom_codec():
    """The line codec is pluggable: decode and encode go through it."""

    class Upper(PlainCodec):
        def decode(self, line):
            return super().decode(line.lower())

        def encode(self, message):
            return super().encode(message).upper()

    hs = Handshake(Role.SERVER, Upper())
    hs.receive_data(b'{"REQ":"HS1","CHID":"AB"}\n')
    assert hs.next_event() == Hs1("ab")
    assert hs.send(Hs2("ab")) == b'{"RSP":"HS2","CHID":"AB"}\n'


# -- client Handshake ---------------------------------------------------------------


def test_client_happy_path():
    hs = Handshake(Role.CLIENT)
    assert hs.state is State.SEND_HS1
    assert hs.next_event() is PAUSED
    assert hs.send(Hs1()) == b'{"req":"hs1"}\n'
    assert hs.state is State.AWAIT_HS2
    assert hs.next_event() is NEED_DATA
    hs.receive_data(b'{"rsp": "hs2", "chid": "abc"}\n{"rsp":"hs4",')
    assert hs.next_event() == Hs2("abc")
    assert hs.state is State.SEND_HS3
    assert hs.next_event() is PAUSED
    assert hs.send(Hs3(("x",), 3)) == b'{"req":"hs3","recvers":["x"],"timeout":3}\n'
    assert hs.state is State.AWAIT_HS4
    assert hs.next_event() is NEED_DATA
    hs.receive_data(b'"result":"OK"}\nhello')
    assert hs.next_event() == Hs4(True)
    assert hs.state is State.DONE
    assert hs.next_event() is PAUSED
    assert hs.trailing_data == b"hello"
    assert hs.trailing_data == b""


@pytest.mark.parametrize("state", [State.AWAIT_HS2, State.AWAIT_HS4])
def test_client_receives_fail(state):
    hs = client_at(state)
    hs.receive_data(compact({"rsp": "hs4", "result": "FAIL", "desc": "chid in use: ch0"}))
    assert hs.next_event() == Hs4(False, "chid in use: ch0")
    assert hs.state is State.FAILED
    with pytest.raises(LocalProtocolError):
        hs.trailing_data  # noqa: B018


def test_client_rejects_early_hs4_ok():
    """An hs4 OK before hs2 is out of order, not a success and not a silent FAILED."""
    hs = client_at(State.AWAIT_HS2)
    hs.receive_data(compact({"rsp": "hs4", "result": "OK"}))
    with pytest.raises(RemoteProtocolError) as info:
        hs.next_event()
    assert info.value.desc == "unexpected hs4, expected hs2"
    assert hs.state is State.FAILED


def test_client_rejects_second_hs2():
    hs = client_at(State.AWAIT_HS4)
    hs.receive_data(compact({"rsp": "hs2", "chid": "ch0"}))
    with pytest.raises(RemoteProtocolError) as info:
        hs.next_event()
    assert info.value.desc == "unexpected hs2, expected hs4"


@pytest.mark.parametrize(
    "state, event",
    [
        (State.SEND_HS1, Hs3()),
        (State.SEND_HS1, Hs2("x")),
        (State.SEND_HS1, Hs4(False, "client may not send hs4")),
        (State.AWAIT_HS2, Hs1()),
        (State.AWAIT_HS2, Hs3()),
        (State.SEND_HS3, Hs1()),
        (State.AWAIT_HS4, Hs3()),
        (State.DONE, Hs1()),
    ],
)
def test_client_send_out_of_turn_is_a_local_error(state, event):
    hs = client_at(state)
    with pytest.raises(LocalProtocolError):
        hs.send(event)
    assert hs.state is state


# -- hypothesis: the parser never crashes and is split-invariant ---------------------

_json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
)
_json_values = st.recursive(
    _json_scalars,
    lambda kids: st.lists(kids, max_size=3)
    | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=6,
)
_messages = st.fixed_dictionaries(
    {},
    optional={
        "req": st.sampled_from(["hs1", "hs3", "hs2", "hs4", "", "x"]) | _json_values,
        "chid": st.none() | chids | _json_values,
        "recvers": st.none() | st.lists(chids | _json_values, max_size=4) | _json_values,
        "timeout": st.none() | st.integers(-3, 2**32) | _json_values,
        "senders": st.none() | st.lists(chids | _json_values, max_size=4) | _json_values,
        "nonce": st.none() | st.text(max_size=40) | _json_values,
        "extra": _json_values,
    },
)


def _encode_any(msg, style):
    if style == 0:
        return compact(msg)
    if style == 1:
        return spaced(msg)
    return json.dumps(msg, ensure_ascii=True).encode() + b"\n"


_lines = st.builds(_encode_any, _messages | _json_values, st.integers(0, 2))
_chunks = st.lists(_lines | st.binary(max_size=40), max_size=5).map(b"".join)
_inputs = _chunks | st.binary(max_size=300)


@FAST
@given(_inputs, st.lists(st.integers(0, 10_000), max_size=8), st.booleans())
def test_server_never_raises_anything_but_remote_errors(data, cuts, eof):
    """Any bytes, in any split: events or RemoteProtocolError, and the same outcome."""
    whole = drive_server([data] if data else [], eof)
    assert drive_server(split_at(data, cuts), eof) == whole
    events, _trailing, error, state = whole
    assert [type(e) for e in events] in ([], [Hs1], [Hs1, Hs3])
    if state is State.DONE:
        assert error is None and len(events) == 2
    if error is not None:
        assert state is State.FAILED


@SLOW
@given(_inputs, st.booleans())
def test_server_byte_by_byte_matches_all_at_once(data, eof):
    whole = drive_server([data] if data else [], eof)
    assert drive_server([data[i : i + 1] for i in range(len(data))], eof) == whole


@SLOW
@given(st.binary(min_size=MAX_LINE - 5, max_size=MAX_LINE + 300), st.booleans())
def test_server_long_inputs_never_crash(data, eof):
    _events, _trailing, error, state = drive_server([data], eof)
    if b"\n" not in data[: MAX_LINE + 1] and len(data) > MAX_LINE:
        assert error == "line longer than 4096 bytes"
        assert state is State.FAILED


@FAST
@given(
    st.none() | chids,
    recver_lists,
    timeouts,
    st.integers(0, 1),
    st.binary(max_size=60),
    st.lists(st.integers(0, 10_000), max_size=10),
)
def test_pipelined_handshake_is_split_invariant(chid, recvers, timeout, style, tail, cuts):
    hs1 = {"req": "hs1"} if chid is None else {"req": "hs1", "chid": chid}
    hs3 = {"req": "hs3", "recvers": list(recvers)}
    if timeout is not None:
        hs3["timeout"] = timeout
    enc = compact if style == 0 else spaced
    data = enc(hs1) + enc(hs3) + tail
    want = ([Hs1(chid), Hs3(recvers, timeout)], tail, None, State.DONE)
    assert drive_server([data]) == want
    assert drive_server(split_at(data, cuts)) == want
    # EOF right after the stream data changes nothing: the handshake already ended.
    assert drive_server(split_at(data, cuts), eof=True) == want


@SLOW
@given(chids, st.binary(max_size=40), st.lists(st.integers(0, 1000), max_size=6))
def test_client_pipelined_replies_are_split_invariant(chid, tail, cuts):
    data = compact({"rsp": "hs2", "chid": chid}) + compact({"rsp": "hs4", "result": "OK"}) + tail
    hs = Handshake(Role.CLIENT)
    hs.send(Hs1(chid))
    got, trailing = [], bytearray()
    for chunk in split_at(data, cuts):
        hs.receive_data(chunk)
        while (event := hs.next_event()) is not NEED_DATA:
            if event is PAUSED:
                if hs.state is State.SEND_HS3:
                    hs.send(Hs3())
                    continue
                trailing += hs.trailing_data
                break
            got.append(event)
    assert got == [Hs2(chid), Hs4(True)]
    assert hs.state is State.DONE
    assert bytes(trailing) == tail


# -- sniff ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix, verdict",
    [
        (b"", Sniff.UNDECIDED),
        (b"x", Sniff.DATA),
        (b"\n", Sniff.DATA),
        (b" {", Sniff.DATA),
        (b"\xff", Sniff.DATA),
        (b'[{"req":"hs1"}]\n', Sniff.DATA),
        (b"{", Sniff.UNDECIDED),
        (b'{"req":"hs1"', Sniff.UNDECIDED),
        (b"{" + b"x" * (MAX_LINE - 1), Sniff.UNDECIDED),
        (b"{" + b"x" * MAX_LINE, Sniff.DATA),
        (b'{"req":"hs1"}\n', Sniff.HANDSHAKE),
        (b'{"req": "hs1", "chid": "ch0"}\n', Sniff.HANDSHAKE),
        (b'{"req":"hs1","chid":7}\n', Sniff.HANDSHAKE),  # req decides; the handshake rejects
        (b'{"req":"hs1"}\nstream bytes', Sniff.HANDSHAKE),
        (b'{"req":"hs3"}\n', Sniff.DATA),
        (b'{"rsp":"hs1"}\n', Sniff.DATA),
        (b'{"req":"HS1"}\n', Sniff.DATA),
        (b"{}\n", Sniff.DATA),
        (b"{not json}\n", Sniff.DATA),
        (b'{"req":"hs1","x":NaN}\n', Sniff.DATA),
        (b'{"req":"hs1","c":"\xff"}\n', Sniff.DATA),
        (b'{"req":"hs1","x":' + b"[" * 3000 + b"]" * 3000 + b"}\n", Sniff.DATA),
        (b'{"req":"hs1"}' + b"\nmore\n", Sniff.HANDSHAKE),
    ],
)
def test_sniff_examples(prefix, verdict):
    assert sniff(prefix) is verdict


def test_sniff_line_length_boundary():
    assert sniff(_padded_hs1(MAX_LINE) + b"\n") is Sniff.HANDSHAKE
    assert sniff(_padded_hs1(MAX_LINE + 1) + b"\n") is Sniff.DATA


@FAST
@given(st.binary(max_size=200) | st.binary(max_size=200).map(b"{".__add__), st.binary(max_size=50))
def test_sniff_never_raises_and_a_verdict_is_final(prefix, more):
    """Once sniff has decided, more bytes must not change its mind."""
    verdict = sniff(prefix)
    assert isinstance(verdict, Sniff)
    if verdict is not Sniff.UNDECIDED:
        assert sniff(prefix + more) is verdict


@FAST
@given(_chunks)
def test_sniff_never_raises_on_json_like_input(data):
    assert isinstance(sniff(data), Sniff)
    assert isinstance(sniff(b"{" + data), Sniff)


@FAST
@given(st.none() | chids, st.integers(0, 1), st.binary(max_size=30))
def test_sniff_recognises_every_hs1_and_waits_for_its_newline(chid, style, tail):
    msg = {"req": "hs1"} if chid is None else {"req": "hs1", "chid": chid}
    line = (compact if style == 0 else spaced)(msg)
    assert sniff(line + tail) is Sniff.HANDSHAKE
    for i in range(1, len(line)):
        assert sniff(line[:i]) is Sniff.UNDECIDED


# -- a plain client meeting a chan server -----------------------------------------------


def test_refusal_is_the_servers_own_fail_line():
    line = PLAIN.encode(to_message(Hs4(False, "handshake timeout")))
    assert refusal(line) == "handshake timeout"
    assert refusal(line[:40]) == "hs4 FAIL"  # cut short: still the server's refusal
    assert refusal(b'{"rsp":"hs4","result":"OK"}\n') is None
    assert refusal(b'{"rsp": "hs4", "result": "FAIL"}\n') is None  # not how fwd writes it
    assert refusal(b"hello") is None
    assert refusal(line + b"x") is None  # bytes after it: payload that looks like one


@FAST
@given(st.binary(max_size=100))
def test_refusal_of_any_bytes_is_none_or_a_reason(data: bytes):
    got = refusal(b'{"rsp":"hs4","result":"FAIL"' + data)
    assert (isinstance(got, str) and got) or (got is None and data.partition(b"\n")[2])
    assert refusal(data) is None or data.startswith(b'{"rsp":"hs4","result":"FAIL"')
