"""fwd-cat as a process against a real fwd-server: files through the relay byte-exact
in chan and broadcast mode, exit codes, and one-line errors.

Synchronisation: the server's ``session start chid=...`` log lines say when a fwd-cat is
in its session; after that only bytes and process exits are waited for.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import read_line, recv_exact, recv_hash

MiB = 1 << 20
WAIT = 60.0

_SCRIPT = Path(sys.executable).with_name("fwd-cat")
CAT_CMD = ([str(_SCRIPT)] if _SCRIPT.exists()
           else [sys.executable, "-c", "from fwd.cli import cat; cat()"])
needs_crypto = pytest.mark.skipif(
    importlib.util.find_spec("fwd.crypto") is None,
    reason="fwd/crypto.py (password-encrypted handshake) is not there yet")


@pytest.fixture
def fwd_cat() -> Iterator[Any]:
    """Factory: ``fwd_cat(server, *args, stdin=..., stdout=..., env=...)`` -> Popen."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(server: Any, *args: str, stdin: Any = subprocess.DEVNULL,
              stdout: Any = subprocess.DEVNULL, env: dict[str, str] | None = None,
              address: str | None = None) -> subprocess.Popen[bytes]:
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("FWD_PASSWORD", "FWD_PASSWORD_FILE", "FWD_E2E_KEY",
                                 "FWD_E2E_KEY_FILE")}
        full_env.update(env or {})
        addr = address or f"{server.host}:{server.port}"
        proc = subprocess.Popen([*CAT_CMD, addr, *args], stdin=stdin, stdout=stdout,
                                stderr=subprocess.PIPE, env=full_env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Exit code and stderr of a fwd-cat that is expected to end on its own."""
    assert proc.stderr is not None
    err = proc.stderr.read().decode()  # EOF when the process exits
    return proc.wait(WAIT), err


@pytest.fixture
def big_file(tmp_path: Path) -> tuple[Path, str, int]:
    data = os.urandom(3 * MiB + 4321)
    path = tmp_path / "in.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest(), len(data)


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("e2e", [None, "pass phrase"], ids=["plain", "e2e"])
def test_chan_file_transfer_byte_exact_both_exit_0(chan_server, fwd_cat, big_file, tmp_path,
                                                   e2e):
    src, digest, _ = big_file
    out = tmp_path / "out.bin"
    env = {"FWD_E2E_KEY": e2e} if e2e else None
    mark = chan_server.mark()
    # The receiver's stdin stays open (like a terminal): only a's FIN ends the transfer.
    with open(out, "wb") as fout:
        receiver = fwd_cat(chan_server, "--chid", "b", "--to", "a", stdin=subprocess.PIPE,
                           stdout=fout, env=env)
    # Start the sender once b is live, so its bytes go straight through, not via the hold.
    chan_server.wait_log(r"session start chid=b ", start=mark)
    with open(src, "rb") as fin:
        sender = fwd_cat(chan_server, "--chid", "a", "--to", "b", stdin=fin, env=env)
    assert finish(receiver) == (0, "")
    assert finish(sender) == (0, "")
    assert file_sha(out) == digest
    chan_server.wait_log(r"session end chid=a .*reason=\"half-closed both ways", start=mark)


@pytest.mark.parametrize("e2e", [None, "pass phrase"], ids=["plain", "e2e"])
def test_a_recv_only_receiver_with_no_stdin_gets_the_file(chan_server, fwd_cat, big_file,
                                                          tmp_path, e2e):
    """--recv-only (nc -d): stdin is /dev/null, as from a script or a service,
    and is not read, so b does not half-close before a has even come."""
    src, digest, _ = big_file
    out = tmp_path / "out.bin"
    env = {"FWD_E2E_KEY": e2e} if e2e else None
    mark = chan_server.mark()
    with open(out, "wb") as fout:
        receiver = fwd_cat(chan_server, "--chid", "b", "--to", "a", "--recv-only",
                           stdin=subprocess.DEVNULL, stdout=fout, env=env)
    chan_server.wait_log(r"session start chid=b ", start=mark)
    with open(src, "rb") as fin:
        sender = fwd_cat(chan_server, "--chid", "a", "--to", "b", stdin=fin, env=env)
    assert finish(sender) == (0, "")
    assert finish(receiver) == (0, "")
    assert file_sha(out) == digest
    chan_server.wait_log(r"session end chid=b .*reason=\"half-closed both ways", start=mark)


@pytest.mark.parametrize("given, heard", [
    (["--from", "a"], "a"),
    ([], "a"),  # by default, the --to chids
    (["--from", "a,loud"], "a,loud"),
    (["--from-anyone"], None),
])
def test_from_hears_only_those_chids(chan_server, fwd_cat, given, heard):
    """--from (hs3 "senders"), by default --to: a session sending to everyone
    else is heard only if named, or with --from-anyone."""
    mark = chan_server.mark()
    b = fwd_cat(chan_server, "--chid", "b", "--to", "a", *given, "-d", stdout=subprocess.PIPE)
    if heard is None:
        chan_server.wait_log(r"session start chid=b .*recvers=a$", start=mark)
    else:
        chan_server.wait_log(rf"session start chid=b .*recvers=a senders={heard}$", start=mark)
    loud, _ = chan_server.handshake("loud", [])
    probe, _ = chan_server.handshake("probe", [])
    loud.sendall(b"noise")
    assert recv_exact(probe, 5) == b"noise"
    if heard != "a":  # from another worker it may come late: wait for it
        assert read_within(b.stdout, 5) == b"noise"
    a, _ = chan_server.handshake("a", ["b"])
    a.sendall(b"signal")
    a.shutdown(socket.SHUT_WR)
    out, err = b.communicate(timeout=WAIT)
    assert (b.returncode, out, err) == (0, b"signal", b"")


def read_within(pipe: Any, n: int, timeout: float = WAIT) -> bytes:
    """n bytes from a child's pipe, or fewer if it stays quiet for timeout."""
    got = b""
    while len(got) < n and select.select([pipe], [], [], timeout)[0]:
        chunk = os.read(pipe.fileno(), n - len(got))
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("e2e", [None, "pass phrase"], ids=["plain", "e2e"])
def test_a_partner_that_ends_its_stream_first_still_gets_all_of_ours(chan_server, fwd_cat,
                                                                     tmp_path, e2e):
    """b answers and half-closes while a is still sending: in a pair b keeps
    reading, so a must send the rest of its input, and only then end its
    stream. Stopping at b's FIN (or its FINAL record) would cut a's stream and,
    with end-to-end encryption, still mark it complete."""
    env = {"FWD_E2E_KEY": e2e} if e2e else None
    out_b = tmp_path / "b.out"
    mark = chan_server.mark()
    with open(out_b, "wb") as fout:
        b = fwd_cat(chan_server, "--chid", "b", "--to", "a", stdin=subprocess.PIPE,
                    stdout=fout, env=env)
    chan_server.wait_log(r"session start chid=b ", start=mark)
    # A long --linger: the test's own pauses must not end a's stream.
    a = fwd_cat(chan_server, "--chid", "a", "--to", "b", "--linger", "60",
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    chan_server.wait_log(r"session start chid=a ", start=mark)
    assert a.stdin is not None and a.stdout is not None and b.stdin is not None
    data = os.urandom(3 * MiB)
    a.stdin.write(data[:MiB])
    a.stdin.flush()
    b.stdin.write(b"ok\n")
    b.stdin.close()  # b is done: its FIN (and FINAL) reach a
    assert a.stdout.read(3) == b"ok\n"
    a.stdin.write(data[MiB:])
    a.stdin.close()
    assert a.stdout.read() == b""
    assert finish(a) == (0, "")
    assert finish(b) == (0, "")
    assert out_b.read_bytes() == data
    chan_server.wait_log(r"session end chid=a .*reason=\"half-closed both ways", start=mark)


def test_a_sender_that_finished_before_the_receiver_came_exits_0_once_it_read(
        chan_server, fwd_cat, tmp_path):
    """a sends a small file and half-closes before b is there: its bytes and
    its FIN wait for b, and a exits 0 only once b has read them and ended its
    own stream (PROTOCOL.md §3.7, "A FIN before the partner came")."""
    data = os.urandom(100_000)  # within --hold-bytes
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    out = tmp_path / "out.bin"
    mark = chan_server.mark()
    with open(src, "rb") as fin:
        sender = fwd_cat(chan_server, "--chid", "a", "--to", "b", stdin=fin)
    chan_server.wait_log(r"chid=a half-closed; waits for chid=b", start=mark)
    assert sender.poll() is None
    with open(out, "wb") as fout:
        receiver = fwd_cat(chan_server, "--chid", "b", "--to", "a", stdin=subprocess.PIPE,
                           stdout=fout)
    assert finish(receiver) == (0, "")
    assert finish(sender) == (0, "")
    assert out.read_bytes() == data


RESET = "the server reset the connection"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("e2e", [None, "pass phrase"], ids=["plain", "e2e"])
def test_a_sender_stopped_by_a_signal_cuts_its_stream(chan_server, fwd_cat, e2e, sig):
    """Ctrl-C used to close with the FINAL record and a FIN, and SIGTERM with
    the kernel's FIN: the receiver took the part it got for the whole
    stream (exit 0). A stop is a reset now: exit 4 (truncated) with
    encryption, 1 without."""
    env = {"FWD_E2E_KEY": e2e} if e2e else None
    mark = chan_server.mark()
    receiver = fwd_cat(chan_server, "--chid", "b", "--to", "a", "-d", stdout=subprocess.PIPE,
                       env=env)
    chan_server.wait_log(r"session start chid=b ", start=mark)
    sender = fwd_cat(chan_server, "--chid", "a", "--to", "b", stdin=subprocess.PIPE, env=env)
    assert sender.stdin is not None and receiver.stdout is not None
    sender.stdin.write(b"part 1 of 2\n")
    sender.stdin.flush()
    assert read_within(receiver.stdout, 12) == b"part 1 of 2\n"
    sender.send_signal(sig)
    assert finish(sender)[0] == 128 + sig
    code, err = finish(receiver)
    assert receiver.stdout.read() == b""
    if e2e:
        assert (code, err) == (4, "fwd-cat: end-to-end decryption: encrypted stream truncated "
                                  "(connection ended before its final record)\n")
    else:
        assert code == 1 and RESET in err


@pytest.mark.parametrize("e2e", [None, "pass phrase"], ids=["plain", "e2e"])
def test_a_receiver_that_cannot_write_its_output_resets_the_sender(chan_server, fwd_cat,
                                                                   big_file, e2e):
    """A receiver whose stdout fails (a full disk) names stdout, not the
    server, and resets: its sender exits 1. It used to send a FIN first,
    which the server passed on, and the sender exited 0."""
    src, _, _ = big_file
    env = {"FWD_E2E_KEY": e2e} if e2e else None
    mark = chan_server.mark()
    with open("/dev/full", "wb") as full:
        receiver = fwd_cat(chan_server, "--chid", "b", "--to", "a", "-d", stdout=full, env=env)
    chan_server.wait_log(r"session start chid=b ", start=mark)
    with open(src, "rb") as fin:
        sender = fwd_cat(chan_server, "--chid", "a", "--to", "b", stdin=fin, env=env)
    assert finish(receiver) == (1, "fwd-cat: writing stdout: No space left on device\n")
    code, err = finish(sender)
    assert code == 1 and RESET in err


def test_a_receive_only_session_adds_no_stream_to_a_one_sender_room(bcast_server, fwd_cat,
                                                                    big_file):
    """Every fwd-cat sent an encrypted stream of its own at its end, -d ones
    too: in a room that is a second sender, and a receiver still reading the
    first one got "data after the end of the encrypted stream" (exit 4). A
    -d session sends nothing now, and the sender, which hears no stream,
    exits 0."""
    src, digest, _ = big_file
    env = {"FWD_E2E_KEY": "pass phrase"}
    mark = bcast_server.mark()
    fast = fwd_cat(bcast_server, "-d", stdout=subprocess.PIPE, env=env)
    slow = fwd_cat(bcast_server, "-d", stdout=subprocess.PIPE, env=env)
    bcast_server.wait_log(r"session start chid=None ", start=mark, count=2)
    with open(src, "rb") as fin:
        sender = fwd_cat(bcast_server, stdin=fin, env=env)
    assert fast.stdout is not None and slow.stdout is not None
    assert hashlib.sha256(fast.stdout.read()).hexdigest() == digest
    assert finish(fast) == (0, "")  # its end reaches slow, which has not read yet
    assert finish(sender) == (0, "")
    assert hashlib.sha256(slow.stdout.read()).hexdigest() == digest
    assert finish(slow) == (0, "")


@pytest.mark.parametrize("e2e", [None, "pass phrase"], ids=["plain", "e2e"])
def test_a_stream_the_hold_could_not_keep_is_a_reset_also_encrypted(start_server, fwd_cat,
                                                                    e2e):
    """Nobody came for a's bytes and they did not fit the hold: the server
    resets a at its FIN. With encryption that read as a truncated stream of
    the receiver's (exit 4), though a never got a byte from anyone."""
    server = start_server("--mode", "chan", "--hold-bytes", "1000")
    env = {"FWD_E2E_KEY": e2e} if e2e else None
    sender = fwd_cat(server, "--chid", "a", "--to", "b", stdin=subprocess.PIPE, env=env)
    assert sender.stdin is not None
    sender.stdin.write(os.urandom(5000))
    sender.stdin.close()
    code, err = finish(sender)
    assert code == 1 and RESET in err


def test_a_huge_linger_is_a_long_wait_not_a_crash(chan_server, fwd_cat):
    """--linger is poll()'s timeout in ms, a C int: 3,000,000 s overflowed it
    and the stdin thread died, cutting the stream."""
    mark = chan_server.mark()
    a = fwd_cat(chan_server, "--chid", "a", "--to", "b", "--linger", "3000000",
                stdin=subprocess.PIPE)
    chan_server.wait_log(r"session start chid=a ", start=mark)
    b = chan_server.connect()
    b.sendall(b'{"req":"hs1","chid":"b"}\n')
    read_line(b)
    b.sendall(b'{"req":"hs3","recvers":["a"]}\n')
    read_line(b)
    b.shutdown(socket.SHUT_WR)  # a now drains its stdin until it is quiet
    assert a.stdin is not None
    a.stdin.write(b"still sent")
    a.stdin.flush()
    assert recv_exact(b, 10) == b"still sent"
    a.stdin.close()
    assert b.recv(1) == b""
    assert finish(a) == (0, "")


def test_broadcast_file_transfer_byte_exact(bcast_server, fwd_cat, big_file):
    src, digest, size = big_file
    mark = bcast_server.mark()
    listener = fwd_cat(bcast_server, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    bcast_server.wait_log(r"session start chid=None ", start=mark)
    with open(src, "rb") as fin:
        sender = fwd_cat(bcast_server, stdin=fin)
    assert listener.stdout is not None and listener.stdin is not None
    got = recv_hash(_PipeSock(listener.stdout), size)
    assert got == digest
    # The sender's EOF ended its broadcast session: the server closed it, it exits 0.
    assert finish(sender) == (0, "")
    listener.stdin.close()  # now the listener half-closes, the server ends it too
    assert finish(listener) == (0, "")
    assert listener.stdout.read() == b""  # nothing but the file


@pytest.mark.parametrize("alone", [True, False], ids=["alone", "with-more"])
def test_a_fail_line_from_another_broadcast_client_is_only_data(bcast_server, fwd_cat, alone):
    """A refusal is the FAIL line and then the server's close; from a peer on
    a broadcast server the same bytes are data, printed (before, fwd-cat
    exited 3 on them)."""
    mark = bcast_server.mark()
    listener = fwd_cat(bcast_server, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    bcast_server.wait_log(r"session start chid=None ", start=mark)
    sender = bcast_server.connect()
    bcast_server.wait_log(r"session start chid=None ", start=mark, count=2)
    line = b'{"rsp":"hs4","result":"FAIL","desc":"gotcha"}\n'
    sender.sendall(line if alone else line + b"more")
    assert listener.stdout is not None and listener.stdin is not None
    assert read_within(listener.stdout, len(line)) == line  # alone: after REFUSAL_WAIT
    sender.sendall(b"tail")
    assert read_within(listener.stdout, 4 if alone else 8) == (b"tail" if alone else b"moretail")
    listener.stdin.close()
    assert finish(listener) == (0, "")


def test_a_closed_stdout_ends_fwd_cat_quietly(bcast_server, fwd_cat):
    """``fwd-cat HOST:PORT | head -c 10``: when head has its bytes, fwd-cat
    stops as cat would, without an error about the relay."""
    mark = bcast_server.mark()
    listener = fwd_cat(bcast_server, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    bcast_server.wait_log(r"session start chid=None ", start=mark)
    sender = bcast_server.connect()
    assert listener.stdout is not None
    sender.sendall(b"x" * 10)
    assert listener.stdout.read(10) == b"x" * 10
    listener.stdout.close()
    try:
        while listener.poll() is None:  # until its write meets the closed pipe
            sender.sendall(b"y" * 65536)
    except OSError:
        pass  # the server closed the session when fwd-cat left
    assert finish(listener) == (0, "")


class _PipeSock:
    """``recv`` over a pipe, for the socket helpers."""

    def __init__(self, f: Any) -> None:
        self.f = f

    def recv(self, n: int) -> bytes:
        return self.f.read1(n)


def test_unreachable_address_is_one_line_and_exit_1(fwd_cat):
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    proc = fwd_cat(None, address=f"127.0.0.1:{port}")
    code, err = finish(proc)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"fwd-cat: cannot connect to 127.0.0.1:{port}: ")
    assert "Traceback" not in err


def test_chid_in_use_exits_3_with_the_servers_desc(chan_server, fwd_cat):
    holder, _ = chan_server.handshake("dup")
    proc = fwd_cat(chan_server, "--chid", "dup")
    code, err = finish(proc)
    assert code == 3
    assert err == (f"fwd-cat: {chan_server.host}:{chan_server.port}: "
                   "handshake rejected: chid in use: dup\n")


@pytest.mark.parametrize("e2e", [None, "pass phrase"], ids=["plain", "e2e"])
def test_no_handshake_against_a_chan_server_exits_3_not_printing_its_fail(chan_server,
                                                                          fwd_cat, e2e):
    """The refusal is a plain line even where the stream would be encrypted."""
    proc = fwd_cat(chan_server, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                   env={"FWD_E2E_KEY": e2e} if e2e else None)
    out, err = proc.communicate(b"hello\n", timeout=WAIT)
    assert proc.returncode == 3 and out == b""
    # The server's reason depends on what it read: "not JSON" for the plain
    # line; for the encrypted bytes, whatever they look like as a line.
    assert re.fullmatch(rf"fwd-cat: {chan_server.host}:{chan_server.port}: handshake "
                        r"rejected: the server is in chan mode and wants a handshake "
                        r"\([^)]+\): give --chid or --to\n", err.decode()), err
    if not e2e:
        assert "(not JSON)" in err.decode()


@pytest.mark.parametrize("fd", [0, 1], ids=["stdin", "stdout"])
def test_a_closed_stdin_only_receives_and_a_closed_stdout_is_a_usage_error(chan_server, fd):
    """``fwd-cat ... <&-`` is ``-d``: nothing to send. ``>&-``: nowhere to
    write, said before connecting (both were tracebacks)."""
    mark = chan_server.mark()
    proc = subprocess.Popen([*CAT_CMD, f"{chan_server.host}:{chan_server.port}", "--chid", "b",
                             "--to", "a"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: os.close(fd))
    try:
        if fd == 1:
            out, err = proc.communicate(timeout=WAIT)
            assert proc.returncode == 2 and out == b""
            assert "Error: stdout is closed: nowhere to write what the relay sends" in err.decode()
            return
        chan_server.wait_log(r"session start chid=b ", start=mark)
        sender, _ = chan_server.handshake("a", ["b"])
        sender.sendall(b"hello")
        sender.shutdown(socket.SHUT_WR)
        out, err = proc.communicate(timeout=WAIT)
        assert (proc.returncode, out, err) == (0, b"hello", b"")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_a_full_chan_server_is_named_as_full(start_server, fwd_cat):
    """Refused at accept: the reason is the connection, not a missing chid."""
    server = start_server("--mode", "chan", "--max-conns", "1")
    server.handshake("holder")
    code, err = finish(fwd_cat(server))
    assert code == 3
    assert err == (f"fwd-cat: {server.host}:{server.port}: handshake rejected: the server "
                   "refused the connection (server full), and it wants a handshake (chan "
                   "mode, or a password): give --chid or --to\n")


def test_a_broadcast_server_refusing_at_accept_is_a_reset_not_a_socket_state(
        start_server, fwd_cat):
    """A plain client is refused by a close, and what it sends then meets a
    reset: that is what fwd-cat says, whichever of its reads or writes meets
    it first (not "Transport endpoint is not connected" from its half-close)."""
    server = start_server("--deny", "127.0.0.1")
    proc = fwd_cat(server, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(b"hello\n")
    proc.stdin.close()
    assert finish(proc) == (1, f"fwd-cat: {server.host}:{server.port}: the server reset the "
                            "connection; what was sent may not all have been delivered (the "
                            "server's log says why)\n")


def test_a_server_that_does_not_answer_the_handshake_is_named_as_such(fwd_cat):
    """Connected, but no hs2: not "cannot connect", which points at the network."""
    lst = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    try:
        where = f"127.0.0.1:{lst.getsockname()[1]}"
        code, err = finish(fwd_cat(None, "--chid", "x", "--connect-timeout", "0.5",
                                   address=where))
        assert code == 1
        assert err == (f"fwd-cat: {where}: connected, but the server did not answer the "
                       "handshake within 0.5s (is it a fwd-server, in chan mode or with a "
                       "password?)\n")
    finally:
        lst.close()


def test_usage_errors_exit_2(chan_server, fwd_cat):
    code, err = finish(fwd_cat(chan_server, "--chid", "x", "--no-handshake"))
    assert code == 2 and "need the handshake" in err
    code, err = finish(fwd_cat(chan_server, "--to", "a", "--from", "a", "--from-anyone"))
    assert code == 2 and "exclude each other" in err
    code, err = finish(fwd_cat(chan_server, "--chid", "bad\x01"))
    assert code == 2 and "control characters" in err
    code, err = finish(fwd_cat(None, address="no-port-here"))
    assert code == 2


def test_e2e_key_mismatch_exits_4(chan_server, fwd_cat, tmp_path):
    keyfile, other = tmp_path / "key", tmp_path / "other"
    keyfile.write_text("key one\n")
    other.write_text("key two\n")
    mark = chan_server.mark()
    receiver = fwd_cat(chan_server, "--chid", "mb", "--to", "ma", "--e2e-key-file", str(keyfile),
                       stdin=subprocess.PIPE)
    chan_server.wait_log(r"session start chid=mb ", start=mark)
    sender = fwd_cat(chan_server, "--chid", "ma", "--to", "mb",
                     env={"FWD_E2E_KEY_FILE": str(other)}, stdin=subprocess.PIPE)
    assert sender.stdin is not None
    sender.stdin.write(b"not for you")
    sender.stdin.close()
    code, err = finish(receiver)
    assert code == 4
    assert err.startswith("fwd-cat: end-to-end decryption: authentication failed")
    assert err.count("\n") == 1
    # The receiver failed, so it reset: the sender learns its stream was not taken.
    assert finish(sender)[0] == 1


@needs_crypto
def test_e2e_plaintext_that_verified_is_written_before_a_tampered_record_ends_it(
        bcast_server, fwd_cat):
    """Record by record (PROTOCOL.md §8.2), however TCP splits the stream: a
    good record and a tampered one in one segment still give the good one."""
    from fwd.e2e import E2EKey, Encoder

    mark = bcast_server.mark()
    receiver = fwd_cat(bcast_server, "-d", env={"FWD_E2E_KEY": "k"}, stdout=subprocess.PIPE)
    bcast_server.wait_log(r"session start chid=None ", start=mark)
    enc = Encoder(E2EKey.from_secret("k"))
    good, bad = enc.encode(b"hello "), bytearray(enc.encode(b"world"))
    bad[-1] ^= 0x01
    mark = bcast_server.mark()
    sender = bcast_server.connect()
    bcast_server.wait_log(r"session start chid=None ", start=mark)
    sender.sendall(good + bytes(bad))
    assert receiver.stdout is not None
    assert receiver.stdout.read() == b"hello "
    code, err = finish(receiver)
    assert (code, err) == (4, "fwd-cat: end-to-end decryption: authentication failed: wrong "
                              "key or tampered data\n")


@needs_crypto
@pytest.mark.parametrize("mode", ["chan", "broadcast"])
def test_no_password_for_a_password_server_is_told_to_give_one(start_server, fwd_cat, mode):
    """A stranger only hears "handshake rejected", in either mode and with or
    without a handshake of its own: fwd-cat says what that means."""
    server = start_server("--mode", mode, "--password", "s3cret")
    for args in ([], ["--chid", "x"]):
        proc = fwd_cat(server, *args, stdin=subprocess.PIPE)
        _, err = proc.communicate(b"hello\n", timeout=WAIT)
        assert proc.returncode == 3
        assert err.decode().endswith(": handshake rejected: the server has a password: "
                                     "give --password or set FWD_PASSWORD\n"), err


@needs_crypto
def test_password_from_env_or_file(start_server, fwd_cat, tmp_path):
    server = start_server("--mode", "chan", "--password", "s3cret")
    pwfile = tmp_path / "pw"
    pwfile.write_text("s3cret\n")
    mark = server.mark()
    receiver = fwd_cat(server, "--chid", "pb", "--to", "pa", "--password-file", str(pwfile),
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    server.wait_log(r"session start chid=pb ", start=mark)
    sender = fwd_cat(server, "--chid", "pa", "--to", "pb", env={"FWD_PASSWORD": "s3cret"},
                     stdin=subprocess.PIPE)
    assert sender.stdin is not None and receiver.stdout is not None
    sender.stdin.write(b"over an encrypted handshake\n")
    sender.stdin.close()
    assert receiver.stdout.read() == b"over an encrypted handshake\n"
    assert finish(receiver) == (0, "")
    assert finish(sender) == (0, "")

    code, err = finish(fwd_cat(server, "--chid", "pc", env={"FWD_PASSWORD": "wrong"}))
    assert code == 3 and "handshake rejected" in err
    assert "wrong" not in err and "s3cret" not in err  # never echoed
    # A password implies the handshake (no --chid needed).
    code, err = finish(fwd_cat(server, "--password", "wrong"))
    assert code == 3 and re.search(r"handshake rejected\n$", err)
