"""The control wire format and fwd-ctl's formatting, without sockets."""
from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwd import control
from fwd.ctl import format_sessions, format_status, human_seconds, human_size, table
from fwd.protocol import failure_reason

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8,
)


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_fail_cleanly(line: bytes) -> None:
    try:
        req = control.parse_request(line)
    except control.ControlError as exc:
        assert str(exc)
    else:
        assert req.cmd in control.COMMANDS


@given(st.dictionaries(st.sampled_from(["cmd", "chid", "peer", "x"]),
                       json_values | st.sampled_from([*control.COMMANDS, "flush"]), max_size=4))
def test_objects_parse_or_fail_cleanly(obj: dict[str, object]) -> None:
    cmd = obj.get("cmd")
    needs = control.COMMANDS.get(cmd, ()) if isinstance(cmd, str) else ()
    try:
        req = control.parse_request(json.dumps(obj).encode())
    except control.ControlError:
        ok = (isinstance(cmd, str) and cmd in control.COMMANDS
              and all(isinstance(obj.get(n), str) and obj[n] for n in needs))
        assert not ok
    else:
        assert req.cmd == cmd
        assert req.args == {n: obj[n] for n in needs}


def test_deep_nesting_is_not_json_not_an_internal_error() -> None:
    with pytest.raises(control.ControlError, match="request is not JSON"):
        control.parse_request(b"[" * 100_000)


def test_worker_commands_are_not_for_fwd_ctl() -> None:
    with pytest.raises(control.ControlError, match="unknown command 'flush'"):
        control.parse_request(b'{"cmd": "flush"}')
    assert control.parse_request(b'{"cmd": "flush"}', control.WORKER_COMMANDS).cmd == "flush"


def test_replies_are_one_line() -> None:
    line = control.encode(control.ok(rows=["a\nb"]))
    assert line.count(b"\n") == 1 and json.loads(line) == {"ok": True, "rows": ["a\nb"]}
    assert json.loads(control.encode(control.error("no"))) == {"ok": False, "error": "no"}


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert control.default_path(8601) == f"{tmp_path}/fwd-8601.ctl"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/does/not/exist")
    assert control.default_path(8601).endswith("/fwd-8601.ctl")
    assert not control.default_path(8601).startswith("/does")


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                         (5 * 1024**3, "5.0 GiB")])
def test_human_size(n: int, text: str) -> None:
    assert human_size(n) == text


@pytest.mark.parametrize(("secs", "text"), [(0.04, "0.0s"), (59.94, "59.9s"), (61, "1m01s"),
                                            (3723, "1h02m03s"), (90000, "1d1h00m00s")])
def test_human_seconds(secs: float, text: str) -> None:
    assert human_seconds(secs) == text


def test_table_aligns_columns() -> None:
    out = table(["A", "NUM"], [["long-name", 1], ["x", 12345]], [False, True])
    assert out.splitlines() == ["A            NUM", "long-name      1", "x          12345"]


def test_status_and_sessions_render_errors_of_workers() -> None:
    status = {"pid": 1, "uptime": 5.0, "mode": "chan", "listen": ["127.0.0.1:1"],
              "totals": {}, "failures": {"timeout": 2, "malformed": 0},
              "workers": [{"worker": 0, "pid": 2, "error": "no answer within 2s"}]}
    text = format_status(status)
    assert "handshake failures         0 (timeout 2)" in text
    assert text.splitlines()[-1].split() == ["0", "2", "-", "-", "-", "-", "no", "answer",
                                              "within", "2s"]
    sessions = {"sessions": [], "errors": [{"worker": 1, "error": "restarting"}]}
    assert format_sessions(sessions).splitlines()[-1] == "worker 1: restarting"


@pytest.mark.parametrize(("desc", "reason"), [
    ("handshake timeout", "timeout"), ("chid in use: x", "chid_in_use"),
    ("handshake rejected", "rejected"), ("unexpected hs3, expected hs1", "out_of_order"),
    ("line longer than 4096 bytes", "line_too_long"), ("not JSON", "malformed"),
    ("connection closed during handshake", "closed"),
    ("hs3 nonce does not match hs2", "bad_nonce"),
])
def test_failure_reasons(desc: str, reason: str) -> None:
    assert failure_reason(desc) == reason
