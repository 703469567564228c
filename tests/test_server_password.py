"""The encrypted handshake (``--password``, docs/PROTOCOL.md §7) over real sockets:
round trips, every way an outsider is refused (wrong key, plain JSON, replay,
tampering, reflection, raw broadcast clients), FAILs a key holder can read, and
the password staying out of logs and the process's command line.
"""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fwd.crypto import AD_C2S, MAX_SEALED_LINE, AeadLineCodec, derive_key, seal_line
from fwd.protocol import Role
from helpers import assert_closed, read_line, recv_exact, send_json

PW = "fwd-test correct horse \u00e9"
REJECTED_LINE = b'{"rsp":"hs4","result":"FAIL","desc":"handshake rejected"}\n'
FAIL_LOG = r'handshake failed peer=127\.0\.0\.1:{port} desc="handshake rejected" why="{why}"'


@pytest.fixture(scope="module")
def key() -> bytes:
    """scrypt is slow on purpose: derive once for the module."""
    return derive_key(PW)


@pytest.fixture(scope="module")
def wrong_key() -> bytes:
    return derive_key(PW + "!")


@pytest.fixture
def pw_server(start_server):
    return start_server("--mode", "chan", "--password", PW)


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]


class Enc:
    """A test client's encrypted side of one connection; ``sent`` records its lines."""

    def __init__(self, sock: socket.socket, key: bytes) -> None:
        self.sock = sock
        self.key = key
        self.codec = AeadLineCodec(key, Role.CLIENT)
        self.sent: list[bytes] = []

    def send(self, obj: Any, tail: bytes = b"") -> bytes:
        line = self.codec.encode(obj)
        self.sent.append(line)
        self.sock.sendall(line + tail)
        return line

    def read(self) -> Any:
        line = read_line(self.sock, limit=MAX_SEALED_LINE + 1)
        assert not line.startswith(b"{"), f"plain line from the server: {line!r}"
        return self.codec.decode(line[:-1])

    def handshake(self, chid: str | None, recvers: list[str] | None = None) -> str:
        self.send({"req": "hs1", "chid": chid})
        hs2 = self.read()
        assert hs2["rsp"] == "hs2", hs2
        assert re.fullmatch(r"[0-9a-f]{32,}", hs2["nonce"]), hs2
        hs3: dict[str, Any] = {"req": "hs3", "nonce": hs2["nonce"]}
        if recvers is not None:
            hs3["recvers"] = recvers
        self.send(hs3)
        assert self.read() == {"rsp": "hs4", "result": "OK"}
        return str(hs2["chid"])

    def expect_fail(self) -> str:
        msg = self.read()
        assert msg["rsp"] == "hs4" and msg["result"] == "FAIL", msg
        assert_closed(self.sock)
        return str(msg["desc"])


def enc_handshake(server: Any, key: bytes, chid: str | None,
                  recvers: list[str] | None = None) -> Enc:
    enc = Enc(server.connect(), key)
    enc.handshake(chid, recvers)
    return enc


def enc_claim_again(server: Any, key: bytes, chid: str) -> Enc:
    """enc_handshake as ``chid`` right after its session ended: retried on
    "chid in use" for 10 s, as helpers.claim_again."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return enc_handshake(server, key, chid)
        except AssertionError as exc:
            if f"chid in use: {chid}" not in str(exc) or time.monotonic() > deadline:
                raise


def expect_rejected(sock: socket.socket) -> None:
    """The plain refusal, then the close, and nothing else."""
    assert read_line(sock) == REJECTED_LINE
    assert_closed(sock)


def test_round_trip_after_the_encrypted_handshake(pw_server, key):
    pw_server.wait_log(r"listening on \S+ mode=chan workers=\d+ password=on")
    a = enc_handshake(pw_server, key, "alice", ["bob"])
    b = Enc(pw_server.connect(), key)
    b.send({"req": "hs1", "chid": "bob"})
    hs2 = b.read()
    assert set(hs2) == {"rsp", "chid", "nonce"} and hs2["chid"] == "bob"
    # Stream bytes may follow the hs3 line in the same write, as in plain mode.
    b.send({"req": "hs3", "recvers": ["alice"], "nonce": hs2["nonce"]}, tail=b"early")
    assert b.read() == {"rsp": "hs4", "result": "OK"}
    assert recv_exact(a.sock, 5) == b"early"
    a.sock.sendall(b"hello bob")
    assert recv_exact(b.sock, 9) == b"hello bob"
    b.sock.sendall(b"hi alice")
    assert recv_exact(a.sock, 8) == b"hi alice"


def test_each_connection_gets_a_fresh_nonce(pw_server, key):
    nonces = set()
    for _ in range(3):
        enc = Enc(pw_server.connect(), key)
        enc.send({"req": "hs1"})
        nonces.add(enc.read()["nonce"])
    assert len(nonces) == 3


def test_wrong_password_gets_the_plain_refusal(pw_server, wrong_key):
    mark = pw_server.mark()
    sock = pw_server.connect()
    Enc(sock, wrong_key).send({"req": "hs1", "chid": "x"})
    expect_rejected(sock)
    pw_server.wait_log(FAIL_LOG.format(port=port_of(sock), why="authentication failed"),
                       start=mark)
    assert pw_server.ctl_json("status")["failures"] == {"rejected": 1}


@pytest.mark.parametrize("data", [
    b'{"req":"hs1","chid":"x"}\n',
    b'{"req":"hs1"}\n{"req":"hs3"}\nraw bytes',
    b"hello\n",
    b"\n",
], ids=["hs1", "pipelined", "text", "empty-line"])
def test_plain_client_gets_the_plain_refusal(pw_server, data):
    sock = pw_server.connect()
    sock.sendall(data)
    expect_rejected(sock)


def test_too_long_line_gets_the_plain_refusal(pw_server):
    mark = pw_server.mark()
    sock = pw_server.connect()
    sock.sendall(b"A" * (MAX_SEALED_LINE + 1))
    expect_rejected(sock)
    pw_server.wait_log(FAIL_LOG.format(port=port_of(sock),
                                       why=f"line longer than {MAX_SEALED_LINE} bytes"),
                       start=mark)


def test_replayed_handshake_is_refused(pw_server, key):
    mark = pw_server.mark()
    victim = enc_handshake(pw_server, key, "victim", [])
    recorded = list(victim.sent)
    assert len(recorded) == 2
    victim.sock.close()
    pw_server.wait_log(r"session end chid=victim .*reason=\"client closed", start=mark)
    # An eavesdropper replays the client's lines on a new connection. hs1 still
    # authenticates (it claims the chid until the handshake ends), but hs2
    # carries a new nonce, so the recorded hs3 no longer matches.
    mark = pw_server.mark()
    deadline = time.monotonic() + 10
    while True:
        sock = pw_server.connect()
        sock.sendall(recorded[0])
        hs2_line = read_line(sock)
        # What the replayer sees is opaque; the key holder can read it.
        reader = AeadLineCodec(key, Role.CLIENT)
        if reader.decode(hs2_line[:-1])["rsp"] == "hs2" or time.monotonic() > deadline:
            break
        sock.close()  # chid in use: with several workers victim's release comes a moment later
    reader = AeadLineCodec(key, Role.CLIENT)
    assert reader.decode(hs2_line[:-1])["rsp"] == "hs2"
    sock.sendall(recorded[1] + b"replayed stream bytes")
    fail_line = read_line(sock)
    assert_closed(sock)
    assert reader.decode(fail_line[:-1]) == {
        "rsp": "hs4", "result": "FAIL", "desc": "hs3 nonce does not match hs2"}
    pw_server.wait_log(rf"handshake failed peer=127\.0\.0\.1:{port_of(sock)} "
                       r'desc="hs3 nonce does not match hs2"$', start=mark)
    # The chid is free again, and nobody got the replayed bytes.
    enc_claim_again(pw_server, key, "victim")


@pytest.mark.parametrize("hs3_nonce,desc", [
    (None, "hs3 nonce does not match hs2"),
    ("", "hs3 nonce does not match hs2"),
    ("\ud800", "hs3 nonce does not match hs2"),
    ("\u00e9" * 32, "hs3 nonce does not match hs2"),
    (5, "nonce must be a string of at most 128 characters"),
    ("a" * 129, "nonce must be a string of at most 128 characters"),
], ids=["absent", "empty", "lone-surrogate", "non-ascii", "int", "too-long"])
def test_hs3_without_the_right_nonce_fails(pw_server, key, hs3_nonce, desc):
    enc = Enc(pw_server.connect(), key)
    enc.send({"req": "hs1"})
    assert enc.read()["rsp"] == "hs2"
    if isinstance(hs3_nonce, str) and "\ud800" in hs3_nonce:
        # json.dumps escapes the surrogate (ensure_ascii), so the line is encodable.
        enc.sock.sendall(seal_line(enc.key, AD_C2S,
                                   json.dumps({"req": "hs3", "nonce": hs3_nonce}).encode()))
    else:
        enc.send({"req": "hs3"} if hs3_nonce is None else {"req": "hs3", "nonce": hs3_nonce})
    assert enc.expect_fail() == desc


@pytest.mark.parametrize("which", ["hs1", "hs3"])
def test_tampered_line_gets_the_plain_refusal(pw_server, key, which):
    enc = Enc(pw_server.connect(), key)
    obj: dict[str, Any] = {"req": "hs1", "chid": "tamper"}
    if which == "hs3":
        enc.send(obj)
        obj = {"req": "hs3", "nonce": enc.read()["nonce"]}
    raw = bytearray(base64.b64decode(enc.codec.encode(obj)[:-1]))
    raw[-20] ^= 0x80
    enc.sock.sendall(base64.b64encode(bytes(raw)) + b"\n")
    # Even after an authentic hs1, a line that does not decode gets the plain line.
    expect_rejected(enc.sock)


@pytest.mark.parametrize("at", ["first", "after-hs1"])
def test_server_line_reflected_back_is_refused(pw_server, key, at):
    enc = Enc(pw_server.connect(), key)
    enc.send({"req": "hs1"})
    hs2_line = read_line(enc.sock)
    assert enc.codec.decode(hs2_line[:-1])["rsp"] == "hs2"
    if at == "first":
        sock = pw_server.connect()
        sock.sendall(hs2_line)
        expect_rejected(sock)
    else:
        enc.sock.sendall(hs2_line)
        expect_rejected(enc.sock)


def test_chid_in_use_and_bad_recvers_are_encrypted_fails(pw_server, key):
    holder = enc_handshake(pw_server, key, "taken")
    dup = Enc(pw_server.connect(), key)
    dup.send({"req": "hs1", "chid": "taken"})
    assert dup.expect_fail() == "chid in use: taken"
    bad = Enc(pw_server.connect(), key)
    bad.send({"req": "hs1"})
    nonce = bad.read()["nonce"]
    bad.send({"req": "hs3", "recvers": "taken", "nonce": nonce})
    assert bad.expect_fail() == "recvers must be a list"
    chid = Enc(pw_server.connect(), key)
    chid.send({"req": "hs1", "chid": 5})
    assert chid.expect_fail() == "chid must be a string"
    other = enc_handshake(pw_server, key, "other", ["taken"])
    other.sock.sendall(b"holder untouched")
    assert recv_exact(holder.sock, 16) == b"holder untouched"


def test_handshake_timeout_plain_for_strangers_encrypted_for_key_holders(start_server, key):
    # The stalled client's hs1 and hs2 must fit in the timeout, counted from
    # the accept: 2 s leave a loaded machine room for that.
    server = start_server("--mode", "chan", "--password", PW, "--handshake-timeout", "2")
    silent = server.connect()
    stalled = Enc(server.connect(), key)
    stalled.send({"req": "hs1", "chid": "stalled"})
    assert stalled.read()["chid"] == "stalled"
    silent.settimeout(10)
    stalled.sock.settimeout(10)
    expect_rejected(silent)
    assert stalled.expect_fail() == "handshake timeout"
    server.wait_log(FAIL_LOG.format(port=port_of(silent), why="handshake timeout"))
    # Counted as what happened: the stranger's silence is no wrong password.
    assert server.ctl_json("status")["failures"] == {"timeout": 2}


def test_eof_after_hs1_is_an_encrypted_fail(pw_server, key):
    enc = Enc(pw_server.connect(), key)
    enc.send({"req": "hs1"})
    enc.read()
    enc.sock.shutdown(socket.SHUT_WR)
    assert enc.expect_fail() == "connection closed during handshake"


def _bcast_password_server(start_server: Any) -> Any:
    """The silent connection is refused only at the timeout, so it is short;
    but each encrypted handshake must finish within it, on a loaded machine too."""
    return start_server("--mode", "broadcast", "--password", PW, "--handshake-timeout", "3")


def test_broadcast_with_password_refuses_raw_clients(start_server, key):
    server = _bcast_password_server(start_server)
    server.wait_log(r"listening on \S+ mode=broadcast workers=\d+ password=on")
    silent = server.connect()  # would be a plain receiver without a password
    a = enc_handshake(server, key, "a")
    b = enc_handshake(server, key, None)
    raw = server.connect()
    raw.sendall(b"raw data\n")
    expect_rejected(raw)
    a.sock.sendall(b"from a")
    assert recv_exact(b.sock, 6) == b"from a"
    b.sock.sendall(b"from b")
    assert recv_exact(a.sock, 6) == b"from b"
    # The silent connection heard nothing of it: its first bytes are the refusal.
    silent.settimeout(10)
    expect_rejected(silent)
    # Plain JSON is not a handshake either.
    plain = server.connect()
    send_json(plain, {"req": "hs1"})
    expect_rejected(plain)


def _assert_password_hidden(server: Any, also: str | None = None) -> None:
    secrets = [PW] + ([also] if also else [])
    for pid in [server.pid, *_children(server.pid)]:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        for s in secrets:
            assert s.encode() not in cmdline, cmdline
    _assert_not_logged(server, secrets)


def _children(pid: int) -> list[int]:
    """Worker processes too, where the kernel lists them."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found


def _assert_not_logged(server: Any, secrets: list[str]) -> None:
    server.stop()
    assert server.lines
    for s in secrets:
        for piece in (s, s.encode().hex(), json.dumps(s)):
            assert not any(piece in ln for ln in server.lines), piece


def _exercise(server: Any, key: bytes, wrong_key: bytes) -> None:
    """Successes and failures of every kind, so there is something to log."""
    a = enc_handshake(server, key, "x", ["y"])
    b = enc_handshake(server, key, "y", ["x"])
    a.sock.sendall(b"data")
    assert recv_exact(b.sock, 4) == b"data"
    bad = server.connect()
    Enc(bad, wrong_key).send({"req": "hs1"})
    expect_rejected(bad)
    dup = Enc(server.connect(), key)
    dup.send({"req": "hs1", "chid": "x"})
    assert dup.expect_fail() == "chid in use: x"
    mark = server.mark()
    a.sock.close()
    b.sock.close()
    server.wait_log(r"session end chid=y ", start=mark)


def test_password_file_keeps_the_password_out_of_cmdline_and_logs(
        start_server, key, wrong_key, tmp_path: Path):
    path = tmp_path / "pw"
    path.write_text(PW + "\n", encoding="utf-8")
    server = start_server("--mode", "chan", "--password-file", str(path))
    server.wait_log(r"password=on")
    _exercise(server, key, wrong_key)
    _assert_password_hidden(server)


def test_env_password_keeps_the_password_out_of_cmdline_and_logs(start_server, key, wrong_key):
    server = start_server("--mode", "chan", env={"FWD_PASSWORD": PW})
    server.wait_log(r"password=on")
    _exercise(server, key, wrong_key)
    _assert_password_hidden(server)


def test_password_option_is_not_logged(pw_server, key, wrong_key):
    _exercise(pw_server, key, wrong_key)
    _assert_not_logged(pw_server, [PW])


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fwd.cli", "--listen", "127.0.0.1:0", *args],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_password_usage_errors_do_not_show_the_password(tmp_path: Path):
    path = tmp_path / "pw"
    path.write_text("file-secret\n")
    both = _cli("--password", "cmdline-secret", "--password-file", str(path))
    assert both.returncode == 2 and "not both" in both.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    none = _cli("--password-file", str(empty))
    assert none.returncode == 2 and "must not be empty" in none.stderr
    env_both = _cli("--password-file", str(path), env={"FWD_PASSWORD": "env-secret"})
    assert env_both.returncode == 2
    # click takes an empty variable for an unset one: that must not mean "no password".
    for name in ("FWD_PASSWORD", "FWD_PASSWORD_FILE"):
        unset = _cli(env={name: ""})
        assert unset.returncode == 2 and f"{name} is set but empty" in unset.stderr
    for r in (both, none, env_both):
        for s in ("cmdline-secret", "file-secret", "env-secret"):
            assert s not in r.stderr + r.stdout


def test_config_repr_hides_the_password():
    from fwd.config import Config

    assert PW not in repr(Config(password=PW))
