"""fwd-ctl against a real multi-worker server: status, sessions, kick, drain,
and the control socket's defences (mode 0600, peer credentials, bad requests).

Every test here runs two workers or more, whatever FWD_TEST_WORKERS says:
the point is that the parent gathers what its workers know.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import WORKERS, Server
from helpers import (
    Sender,
    claim_again,
    expect_fail,
    pair,
    read_json,
    read_line,
    recv_exact,
    send_json,
    wait_until,
)

N = max(WORKERS, 2)
NOBODY = 65534


def chan(start_server: Callable[..., Server], *args: str, **kw: Any) -> Server:
    return start_server("--mode", "chan", "--workers", str(N), *args, **kw)


def raw_request(server: Server, line: bytes) -> list[Any]:
    """Send raw bytes on the control socket; the replies until the server closes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(server.control)
        s.sendall(line)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(x) for x in data.splitlines()]


def test_status_sums_the_workers(start_server: Callable[..., Server]) -> None:
    server = chan(start_server)
    sa, sb = pair(server)
    sa.sendall(b"x" * 300_000)
    recv_exact(sb, 300_000)
    sb.sendall(b"y" * 1000)
    recv_exact(sa, 1000)
    bad = server.connect()
    bad.sendall(b"not json\n")
    expect_fail(bad)

    st = server.ctl_json("status")
    assert st["ok"] and st["mode"] == "chan" and st["pid"] == server.pid
    assert [w["worker"] for w in st["workers"]] == list(range(N))
    assert sorted(w["pid"] for w in st["workers"]) == sorted(server.workers())
    t = st["totals"]
    assert t["bytes_in"] == t["bytes_out"] == 301_000
    assert t["sessions"] == 2 and t["sessions_total"] == 2
    assert t["handshake_failures"] == 1 and st["failures"] == {"malformed": 1}
    assert sum(w["sessions"] for w in st["workers"]) == 2
    assert st["listen"] == [f"127.0.0.1:{server.port}"]

    text = server.ctl("status").stdout
    assert "handshake failures         1 (malformed 1)" in text
    header, *rows = text.split("\n\n")[1].splitlines()
    assert header.split() == ["WORKER", "PID", "SESSIONS", "CONNS", "BYTES", "IN", "BYTES",
                              "OUT", "UPTIME"]
    assert len(rows) == N
    # Aligned: every right-aligned PID ends in the same column as its header.
    end = header.index("PID") + 3
    assert all(r[:end].split()[-1].isdigit() and r[end] == " " for r in rows)


def test_sessions_lists_every_connection(start_server: Callable[..., Server]) -> None:
    server = chan(start_server, "--max-buffer", "64KiB", "--slow-timeout", "0")
    sa, sb = pair(server)
    sa.sendall(b"z" * 5000)
    recv_exact(sb, 5000)
    # A receiver that never reads: bytes queue in the server for it.
    stalled, _ = server.handshake("stalled", ["feeder"])
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    feeder, _ = server.handshake("feeder", ["stalled"])
    Sender(feeder, 64 << 20).start()  # blocks once the server stops reading it
    half = server.connect()  # in its handshake
    half.sendall(b'{"req": "hs1", "chid": "half"}\n')
    read_line(half)

    def rows() -> dict[str, Any]:
        return {r["chid"]: r for r in server.ctl_json("sessions")["sessions"]}

    wait_until(lambda: rows()["stalled"]["buffered"] > 0, 10, "bytes queued for 'stalled'")
    got = rows()
    assert set(got) == {"a", "b", "stalled", "feeder", "half"}
    assert got["a"]["bytes_in"] == 5000 and got["b"]["bytes_out"] == 5000
    assert got["a"]["recvers"] == ["b"] and got["a"]["state"] == "live"
    assert got["half"]["state"] == "handshake"
    assert got["a"]["peer"] == f"127.0.0.1:{sa.getsockname()[1]}"
    pids = {w["worker"]: w["pid"] for w in server.ctl_json("status")["workers"]}
    assert pids[got["a"]["worker"]] == server.worker_of(sa)
    assert all(r["idle"] >= 0 for r in got.values())

    text = server.ctl("sessions").stdout.splitlines()
    assert text[0].split() == ["CHID", "PEER", "WORKER", "STATE", "RECVERS", "IN", "OUT",
                               "QUEUED", "IDLE"]
    line_a = next(ln for ln in text if ln.startswith("a "))
    assert "4.9 KiB" in line_a and line_a.index("127.0.0.1") == text[0].index("PEER")


def test_kick_closes_the_session_and_its_pair_partner(
        start_server: Callable[..., Server]) -> None:
    """A pair is one stream: kicking one half closes the other (a FIN, since
    nothing was cut), instead of leaving it to stream into a hold."""
    server = chan(start_server)
    sa, sb = pair(server)
    sc, sd = pair(server, "c", "d")
    mark = server.mark()
    assert server.ctl("kick", "a").stdout == "kicked a\n"
    assert sa.recv(10) == b""
    assert sb.recv(10) == b""
    server.wait_log(r"session end chid=a .*reason=\"kicked by fwd-ctl", start=mark)
    server.wait_log(r"session end chid=b .*reason=\"pair partner left", start=mark)
    sc.sendall(b"still here")  # other sessions are untouched
    assert recv_exact(sd, 10) == b"still here"
    claim_again(server, "a", ["b"])  # the chids are free again
    claim_again(server, "b", ["a"])
    assert server.ctl_json("status")["totals"]["kicked"] == 1

    missing = server.ctl("kick", "nobody", check=False)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == "fwd-ctl: no session with chid 'nobody'\n"


def test_kick_by_peer_closes_a_client_that_has_no_chid(
        start_server: Callable[..., Server]) -> None:
    """A plain broadcast client has no chid: the address `sessions` shows for
    it names it instead."""
    server = start_server("--mode", "broadcast", "--workers", str(N))
    mark = server.mark()
    noisy, quiet = server.connect(), server.connect()
    server.wait_log(r"session start chid=None", start=mark, count=2)
    peer = f"127.0.0.1:{noisy.getsockname()[1]}"
    assert peer in {row["peer"] for row in server.ctl_json("sessions")["sessions"]}
    assert server.ctl("kick", "--peer", peer).stdout == f"kicked {peer}\n"
    noisy.settimeout(10)
    assert noisy.recv(10) == b""
    server.wait_log(rf"session end chid=None peer={re.escape(peer)} .*reason=\"kicked by fwd-ctl",
                    start=mark)
    assert server.ctl_json("status")["totals"]["kicked"] == 1
    missing = server.ctl("kick", "--peer", peer, check=False)
    assert missing.returncode == 1
    assert missing.stderr == f"fwd-ctl: no session with peer {peer!r}\n"
    usage = server.ctl("kick", "a", "--peer", peer, check=False)
    assert usage.returncode == 2 and "give a CHID or --peer, not both" in usage.stderr
    neither = server.ctl("kick", check=False)
    assert neither.returncode == 2 and "Error: give a CHID or --peer\n" in neither.stderr
    quiet.sendall(b"x")  # the other client is untouched
    assert server.ctl_json("status")["ok"]


def test_kick_during_the_handshake_answers_with_a_fail(
        start_server: Callable[..., Server]) -> None:
    """A client between hs2 and hs3 is owed an hs4: a kick gives it FAIL."""
    server = chan(start_server)
    sock = server.connect()
    send_json(sock, {"req": "hs1", "chid": "early"})
    assert read_json(sock)["rsp"] == "hs2"
    assert server.ctl("kick", "early").stdout == "kicked early\n"
    assert expect_fail(sock) == "kicked by fwd-ctl"
    status = server.ctl_json("status")["totals"]
    assert status["kicked"] == 1 and status["handshake_failures"] == 0  # not the client's


def test_drain_stops_the_server_after_flushing(start_server: Callable[..., Server]) -> None:
    server = chan(start_server)
    sa, sb = pair(server)
    sa.sendall(b"last words")
    assert recv_exact(sb, 10) == b"last words"
    done = server.ctl("drain")
    assert done.stdout == "drained\n"
    assert sb.recv(10) == b""
    assert server.proc.wait(15) == 0
    assert not os.path.exists(server.control)
    server.wait_log(r"stopping: draining")


def status_as_nobody(path: str) -> bytes:
    """Ask for the status as user nobody (a forked child: nobody may not be able
    to run this interpreter); the reply, or ``errno N`` if connecting failed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            with contextlib.suppress(BrokenPipeError):  # it may answer and close first
                s.sendall(b'{"cmd": "status"}\n')
            out = s.recv(65536)
        except OSError as exc:
            out = b"errno %d" % exc.errno
        os.write(w, out)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


def test_status_lists_every_worker_from_the_start(tmp_path: Any) -> None:
    """The control socket answers before every worker is spawned: those not
    spawned yet were left out, not listed as restarting (§9.2)."""
    path = str(tmp_path / "start.ctl")
    proc = subprocess.Popen([sys.executable, "-m", "fwd.cli", "--listen", "127.0.0.1:0",
                             "--workers", "3", "--control", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        reply = None
        while reply is None:  # the first answer the socket gives
            assert proc.poll() is None
            with contextlib.suppress(OSError, ValueError), \
                    socket.socket(socket.AF_UNIX) as c:
                c.settimeout(10)
                c.connect(path)
                c.sendall(b'{"cmd": "status"}\n')
                reply = json.loads(c.makefile("rb").readline())
            time.sleep(0.001)  # a poll: the socket appears when it appears
        assert [w["worker"] for w in reply["workers"]] == [0, 1, 2]
        assert all(w.get("error") in (None, "restarting") for w in reply["workers"])
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_control_socket_is_for_its_owner_only(start_server: Callable[..., Server]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    server = chan(start_server)
    st = os.stat(server.control)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert status_as_nobody(server.control) == b"errno %d" % errno.EACCES
    # Even with the file opened up, the server checks who is calling.
    os.chmod(server.control, 0o666)
    try:
        reply = status_as_nobody(server.control)
    finally:
        os.chmod(server.control, 0o600)
    assert json.loads(reply) == {"ok": False, "error": "permission denied: not the server's user"}
    assert server.ctl_json("status")["ok"]


def test_bad_requests_get_one_error_each(start_server: Callable[..., Server]) -> None:
    server = chan(start_server)
    replies = raw_request(server, b"nope\n[1]\n{\"cmd\": \"reboot\"}\n{\"cmd\": \"kick\"}\n"
                                  b"{\"cmd\": \"status\"}\n")
    assert [r["ok"] for r in replies] == [False, False, False, False, True]
    assert replies[0]["error"] == "request is not JSON"
    assert replies[1]["error"] == "request must be a JSON object"
    assert replies[2]["error"].startswith("unknown command 'reboot'")
    assert replies[3]["error"] == 'kick needs a non-empty "chid" string'
    (too_long,) = raw_request(server, b'{"cmd": "' + b"s" * 70_000 + b'"}\n')
    assert too_long == {"ok": False, "error": "request longer than 65536 bytes"}
    assert server.ctl_json("status")["ok"]


def test_a_stopped_worker_is_reported_not_waited_for(
        start_server: Callable[..., Server]) -> None:
    server = chan(start_server)
    stuck = server.workers()[0]
    os.kill(stuck, signal.SIGSTOP)
    try:
        st = server.ctl_json("status")
    finally:
        os.kill(stuck, signal.SIGCONT)
    row = next(w for w in st["workers"] if w["pid"] == stuck)
    assert row["error"] == "no answer within 2s"
    assert all("error" not in w for w in st["workers"] if w["pid"] != stuck)


def test_default_path_follows_the_port(start_server: Callable[..., Server],
                                       tmp_path: Any) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    server = start_server("--mode", "chan", env=env)
    assert server.control == str(tmp_path / f"fwd-{server.port}.ctl")
    found = subprocess.run([sys.executable, "-m", "fwd.ctl", "--port", str(server.port),
                            "status", "--json"], capture_output=True, text=True, timeout=30,
                           env={**os.environ, **env})
    assert json.loads(found.stdout)["pid"] == server.pid


def test_ctl_reads_fwd_control_as_the_server_does(start_server: Callable[..., Server],
                                                  tmp_path: Any) -> None:
    path = str(tmp_path / "mine.ctl")
    server = start_server("--mode", "chan", env={"FWD_CONTROL": path})
    assert server.control == path
    found = subprocess.run([sys.executable, "-m", "fwd.ctl", "status", "--json"],
                           capture_output=True, text=True, timeout=30,
                           env={**os.environ, "FWD_CONTROL": path, "FWD_PORT": "1"})
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["pid"] == server.pid


def test_control_path_conflicts(start_server: Callable[..., Server], tmp_path: Any) -> None:
    # A socket left by a server that was killed is replaced.
    stale = str(tmp_path / "stale.ctl")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()
    server = start_server("--control", stale)
    assert server.ctl_json("status")["ok"]
    # A live one belongs to another server: refuse to start, say why.
    for path, why in ((stale, "another server is using it "
                               "(give this one --control PATH, or --control none)"),
                      (str(tmp_path / "file"), "exists and is not a socket")):
        open(tmp_path / "file", "w").close()
        other = subprocess.run([sys.executable, "-m", "fwd.cli", "--listen", "127.0.0.1:0",
                                "--workers", "1", "--control", path],
                               capture_output=True, text=True, timeout=30)
        assert other.returncode == 1
        assert other.stderr == f"Error: cannot start: control socket {path}: {why}\n"
    assert server.ctl_json("status")["ok"]


def test_startup_errors_name_the_address_or_path(tmp_path: Any) -> None:
    """With several --listen, "Address already in use" alone does not say which."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cases = [
        (["--listen", "127.0.0.1:0", "--listen", f"127.0.0.1:{port}", "--control", "none"],
         1, f"Error: cannot start: --listen 127.0.0.1:{port}: Address already in use"),
        (["--listen", "127.0.0.1:0", "--control", str(tmp_path / "no" / "x.ctl")],
         1, f"Error: cannot start: control socket {tmp_path / 'no' / 'x.ctl'}: "
            "No such file or directory"),
        (["--listen", "127.0.0.1:0", "--control", ""],
         2, "Error: Invalid value for '--control': must not be empty"),
    ]
    with busy:
        for args, code, message in cases:
            done = subprocess.run([sys.executable, "-m", "fwd.cli", "--workers", "1", *args],
                                  capture_output=True, text=True, timeout=30)
            assert done.returncode == code
            assert done.stderr.splitlines()[-1] == message


@pytest.mark.parametrize("option", ["--handshake-timeout", "--idle-timeout", "--slow-timeout",
                                    "--hold-seconds", "--drain-timeout", "--worker-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_durations_must_be_finite(option: str, value: str) -> None:
    """nan compares false with everything: as a timeout it would mean "never"."""
    done = subprocess.run([sys.executable, "-m", "fwd.cli", "--listen", "127.0.0.1:0",
                           option, value], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert f"'{value}' is not a number of seconds" in done.stderr


def test_ctl_reads_its_own_timeout_variable_not_fwd_clients(tmp_path: Any) -> None:
    path = str(tmp_path / "none.ctl")

    def ctl(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fwd.ctl", "--control", path, "status"],
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, **env})

    assert ctl({"FWD_TIMEOUT": "0"}).returncode == 1  # fwd-client's: ignored (no server)
    assert ctl({"FWD_CTL_TIMEOUT": "0"}).returncode == 2
    huge = ctl({"FWD_CTL_TIMEOUT": "1e300"})  # overflowed the socket timeout: a traceback
    assert huge.returncode == 2 and "'1e300' is more than 1e+09 seconds" in huge.stderr


def test_ctl_without_a_server(tmp_path: Any) -> None:
    path = str(tmp_path / "none.ctl")
    done = subprocess.run([sys.executable, "-m", "fwd.ctl", "--control", path, "status"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr == (f"fwd-ctl: no control socket at {path}: is fwd-server running? "
                           "(--port or --control selects the server)\n")


def test_no_control_socket_when_disabled(start_server: Callable[..., Server]) -> None:
    server = start_server("--control", "none")
    assert server.control == "none"
    assert not os.path.exists(f"/tmp/fwd-{server.port}.ctl")


@pytest.mark.parametrize("command, reply", [
    ("status", b'{"ok": true}'),
    ("reload", b'{"ok": true, "files": ["f"]}'),
    ("drain", b'{"ok": true, "drain_timeout": "soon"}'),
    ("drain", b'{"ok": true, "drain_timeout": 1e300}'),
    ("drain", b'{"ok": true, "drain_timeout": NaN}'),
])
def test_a_reply_without_the_servers_fields_is_one_line_not_a_traceback(
        tmp_path: Any, command: str, reply: bytes) -> None:
    """Another program (or version) on the socket answers without the fields
    fwd-server sends (reload and drain said so with a traceback)."""
    path = str(tmp_path / "odd.ctl")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    lst.listen()

    def answer() -> None:
        conn, _ = lst.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(reply + b"\n")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        done = subprocess.run([sys.executable, "-m", "fwd.ctl", "--control", path, command],
                              capture_output=True, text=True, timeout=30)
    finally:
        lst.close()
    assert done.returncode == 1
    assert done.stderr.startswith("fwd-ctl: unexpected reply (not from this fwd-server "
                                  "version?): "), done.stderr
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("shared_dir", [True, False])
def test_root_uses_a_service_users_socket_only_where_no_stranger_could_make_it(
        tmp_path: Path, shared_dir: bool) -> None:
    """A socket of user nobody: in a directory anyone can write to (/tmp),
    anyone could have made it to read root's commands and fake the replies;
    in a directory of its own it is the socket of a server run as a service
    user, for which `sudo fwd-ctl` is the usual way in."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act for another user")
    where = tmp_path / "run"
    where.mkdir(mode=0o777 if shared_dir else 0o755)
    os.chmod(where, 0o1777 if shared_dir else 0o755)
    path = str(where / "fwd.ctl")
    fake = socket.socket(socket.AF_UNIX)
    fake.bind(path)
    fake.listen()
    os.chown(path, NOBODY, NOBODY)
    fake.settimeout(10)
    heard: list[bytes] = []

    def answer() -> None:
        with contextlib.suppress(OSError):
            conn, _ = fake.accept()
            heard.append(conn.recv(1000))
            conn.sendall(b'{"ok":true,"kicked":1}\n')
            conn.recv(10)

    t = threading.Thread(target=answer)
    if not shared_dir:
        t.start()
    done = subprocess.run([sys.executable, "-m", "fwd.ctl", "--control", path, "kick", "victim"],
                          capture_output=True, text=True, timeout=30)
    if shared_dir:
        fake.setblocking(False)
        with pytest.raises(BlockingIOError):  # fwd-ctl did not even connect
            fake.accept()
    else:
        t.join(15)
    fake.close()
    if shared_dir:
        assert done.returncode == 1 and not heard
        assert done.stderr == (f"fwd-ctl: {path} belongs to uid {NOBODY}, in {where}, which "
                               "others can write to: not using it (run fwd-ctl as that user, or "
                               "give the server a --control path in a directory of its own)\n")
    else:
        assert (done.returncode, done.stdout) == (0, "kicked victim\n"), done.stderr
        assert heard == [b'{"cmd":"kick","chid":"victim"}\n']
