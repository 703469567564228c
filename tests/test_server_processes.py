"""The process structure: an acceptor that hands sockets to workers, supervision,
and clean stops. Real processes, signals and /proc; no mocks."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from conftest import WORKERS, Process
from fwd.session import CLOSE_LINGER
from helpers import (
    TCP_ESTABLISHED,
    TCP_LISTEN,
    Sender,
    assert_pair_works,
    bcast_handshake,
    expect_fail,
    pair,
    read_json,
    read_until_reset,
    recv_exact,
    recv_hash,
    reset_close,
    send_json,
    socket_inodes,
    tcp_sockets,
    wait_until,
)

MiB = 1 << 20


def _tcp_inodes(port: int, state: int) -> set[str]:
    return {t.inode for t in tcp_sockets() if t.local_port == port and t.state == state}


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def test_client_sockets_live_in_the_worker_not_the_acceptor(chan_server):
    sa, sb = pair(chan_server)
    sa.sendall(b"x")
    assert recv_exact(sb, 1) == b"x"
    established = _tcp_inodes(chan_server.port, TCP_ESTABLISHED)
    assert len(established) >= 2
    # The acceptor keeps its copy until the worker's note that it took the
    # socket, which the acceptor may read a moment after the session started.
    wait_until(lambda: not socket_inodes(chan_server.pid) & established, 10,
               "the acceptor closing its copies once the worker took them")
    in_workers = set().union(*(socket_inodes(w) for w in chan_server.workers()))
    assert established <= in_workers
    assert socket_inodes(chan_server.pid) & _tcp_inodes(chan_server.port, TCP_LISTEN), \
        "the acceptor owns the listener"


def test_process_titles_name_the_roles(chan_server):
    assert _cmdline(chan_server.pid) == "fwd-server: acceptor"
    assert sorted(_cmdline(p) for p in chan_server.workers()) == [
        f"fwd-server: worker {i}" for i in range(WORKERS)]


def _stream_elsewhere(server, victim: int) -> tuple[list[socket.socket], Sender | None]:
    """With several workers, a pair on a worker other than ``victim`` whose
    8 MiB stream has started: ([sender, receiver], its Sender); else ([], None)."""
    if WORKERS == 1:
        return [], None
    for i in range(WORKERS):
        sc, sd = pair(server, f"c{i}", f"d{i}")
        if server.worker_of(sc) != victim:
            up = Sender(sc, 8 * MiB)
            up.start()
            return [sc, sd], up
    raise AssertionError("no pair landed on another worker")


def test_killed_worker_is_replaced_and_its_chids_freed(chan_server):
    sa, sb = pair(chan_server)
    victim = chan_server.worker_of(sa)
    assert chan_server.worker_of(sb) == victim  # a pair lives on one worker
    # A pair on another worker must not lose a byte while its neighbour dies.
    others, up = _stream_elsewhere(chan_server, victim)
    mark = chan_server.mark()
    os.kill(victim, signal.SIGKILL)
    chan_server.wait_log(rf"worker \d+ \(pid {victim}\) exited with signal 9", start=mark)
    chan_server.wait_log(r"worker \d+ ready", start=mark)
    # The dead worker's clients see their connection end...
    for s in (sa, sb):
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
    if up is not None:
        assert recv_hash(others[1], 8 * MiB) == up.digest
        up.finish()
    # ...the acceptor never stopped, and the chids are free again.
    assert victim not in chan_server.workers()
    assert len(chan_server.workers()) == WORKERS
    pair(chan_server, "a", "b")
    assert_pair_works(chan_server)


def _inode(server, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    (inode,) = {t.inode for t in tcp_sockets()
                if t.remote_port == port and t.local_port == server.port}
    return inode


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """``pid`` stopped (SIGSTOP) inside the block, and continued after it."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        cont(pid)


def cont(pid: int) -> None:
    """SIGCONT ``pid``, which the block may have killed: the parent may have
    reaped it already."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def _unconfirmed(server) -> socket.socket:
    """A new connection whose worker (the one, stopped) has not confirmed it:
    the parent still holds its copy."""
    sock = server.connect()
    wait_until(lambda: _inode(server, sock) in socket_inodes(server.pid), 10,
               "the parent keeping the copy the stopped worker has not confirmed")
    return sock


def test_a_connection_a_dying_worker_never_read_goes_to_another(start_server):
    """A worker that dies (here stopped, then killed) had sockets handed to it
    that it never read: the parent kept its copies until the worker's word, so
    they go to another worker, whose handshake the client gets, instead of
    dying unused with the worker."""
    server = start_server("--mode", "chan", "--workers", "2")
    victim, other = server.workers()
    os.kill(victim, signal.SIGSTOP)
    try:
        # The parent places each on the worker with fewest: one on each.
        a, b = server.connect(), server.connect()
        held: list[socket.socket] = []

        def one_held_by_the_parent() -> bool:
            parent = socket_inodes(server.pid)
            held[:] = [s for s in (a, b) if _inode(server, s) in parent]
            return len(held) == 1 and _inode(server, ({a, b} - {held[0]}).pop()) in \
                socket_inodes(other)

        wait_until(one_held_by_the_parent, 10,
                   "the parent keeping the copy the stopped worker has not confirmed")
        mark = server.mark()
        os.kill(victim, signal.SIGKILL)
    finally:
        cont(victim)
    server.wait_log(rf"worker \d+ \(pid {victim}\) exited with signal 9", start=mark)
    for sock, chid, peer in ((a, "a", "b"), (b, "b", "a")):
        send_json(sock, {"req": "hs1", "chid": chid})
        assert read_json(sock)["chid"] == chid
        send_json(sock, {"req": "hs3", "recvers": [peer]})
    for sock in (a, b):
        assert read_json(sock) == {"rsp": "hs4", "result": "OK"}
    a.sendall(b"saved")
    assert recv_exact(b, 5) == b"saved"
    assert victim not in (server.worker_of(a), server.worker_of(b))
    a.close()
    b.close()


def test_a_connection_the_only_worker_never_read_waits_for_its_replacement(start_server):
    """No other worker to give it to: it waits for the one that takes the dead
    one's place (as in a listen backlog), instead of `server restarting`."""
    server = start_server("--mode", "chan", "--workers", "1")
    (victim,) = server.workers()
    with stopped(victim):
        sock = _unconfirmed(server)
        mark = server.mark()
        os.kill(victim, signal.SIGKILL)
    server.wait_log(rf"worker 0 \(pid {victim}\) exited with signal 9", start=mark)
    send_json(sock, {"req": "hs1", "chid": "waited"})
    assert read_json(sock) == {"rsp": "hs2", "chid": "waited"}
    assert server.worker_of(sock) != victim


def test_a_connection_a_worker_took_before_dying_is_not_served_twice(start_server):
    """The worker's note that it took a socket may still wait, unread, in the
    parent's channel when the worker dies (here the parent is stopped): the
    parent reads it first, so that the connection, which the dead worker may
    have begun to serve, ends with it instead of starting over elsewhere.
    (uvloop reports the exit two callbacks late, so the note's one read
    usually comes first anyway; a parent behind on its channel, one message
    per wake-up, would hand the socket on.)"""
    server = start_server("--mode", "chan", "--workers", "2")
    victim, _ = server.workers()
    os.kill(victim, signal.SIGSTOP)
    try:
        a, b = server.connect(), server.connect()  # one on each worker
        held: list[socket.socket] = []

        def one_held_by_the_parent() -> bool:
            parent = socket_inodes(server.pid)
            held[:] = [s for s in (a, b) if _inode(server, s) in parent]
            return len(held) == 1

        wait_until(one_held_by_the_parent, 10, "the parent keeping the unconfirmed copy")
        sock = held[0]
        os.kill(server.pid, signal.SIGSTOP)  # it will not read the worker's note in time
        try:
            os.kill(victim, signal.SIGCONT)
            # It took the socket, and said so (before it uses one, always).
            wait_until(lambda: _inode(server, sock) in socket_inodes(victim), 10,
                       "the victim taking the socket")
            mark = server.mark()
            os.kill(victim, signal.SIGKILL)
        finally:
            os.kill(server.pid, signal.SIGCONT)
    finally:
        cont(victim)
    server.wait_log(rf"worker \d+ \(pid {victim}\) exited with signal 9", start=mark)
    sock.settimeout(10)
    try:
        assert sock.recv(100) == b"", "the connection started over on another worker"
    except ConnectionResetError:
        pass


def test_sigterm_drains_queued_bytes_then_leaves_no_process(start_server):
    server = start_server("--mode", "chan", "--drain-timeout", "20", "--max-buffer", "2MiB")
    # a sends to b and to c, which reads nothing and is dropped at once: a 1->2
    # route, so that b gets --max-buffer rather than the smaller mark of a pair.
    sb, _ = server.handshake("b", ["a"])
    sc, _ = server.handshake("c", ["a"])
    sa, _ = server.handshake("a", ["b", "c"])
    sc.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    mark = server.mark()
    up = Sender(sa, 64 * MiB)
    up.start()
    # b does not read: the server queues for it until a is paused.
    server.wait_log(r"paused chid=a", start=mark)
    workers = server.workers()
    server.proc.send_signal(signal.SIGTERM)
    queued = max(int(server.wait_log(r"draining \d+ sessions with (\d+) queued bytes",
                                     start=mark, count=i + 1).group(1))
                 for i in range(WORKERS))
    assert queued >= 2 * MiB
    sc.close()  # c never reads: it leaves, and only b is waited for
    got = bytearray()
    while chunk := sb.recv(1 << 20):
        got += chunk
    assert server.proc.wait(30) == 0
    # What the server held for b when it was told to stop still arrived, intact, in order.
    assert len(got) >= queued // 2
    assert hashlib.sha256(got).digest() == hashlib.sha256(up.data[:len(got)]).digest()
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}"), "a worker outlived the server"


def _stopping_with_a_stalled_receiver(server, sig: int = signal.SIGTERM):
    """A pair whose receiver b reads nothing (its sender a is paused), then
    ``sig`` to the server; returns b, a's Sender and the log mark, once the
    server drains."""
    sa, sb = pair(server)
    mark = server.mark()
    up = Sender(sa, 64 * MiB)
    up.start()
    server.wait_log(r"paused chid=a", start=mark)
    server.proc.send_signal(sig)
    # The pair's worker (2 sessions), not just any worker: with several, an idle
    # one logs first, and a second signal forwarded to the pair's worker before
    # it handled the first merges with it (signals do not queue): no hurry.
    server.wait_log(r"draining 2 sessions", start=mark)
    return sb, up, mark


@pytest.mark.slow
def test_the_drain_timeout_outlasts_the_close_linger(start_server):
    """--drain-timeout, not the 5 s linger of an ordinary close, bounds the
    flush at shutdown: a receiver that reads only after CLOSE_LINGER still
    gets every byte queued for it."""
    server = start_server("--mode", "chan", "--drain-timeout", str(CLOSE_LINGER + 20))
    sb, up, mark = _stopping_with_a_stalled_receiver(server)
    up.join(30)  # the server stopped reading it: its sendall ends with the reset
    time.sleep(CLOSE_LINGER + 1)  # the subject: outlast the linger
    got = bytearray()
    while chunk := sb.recv(1 << 20):
        got += chunk
    assert server.proc.wait(30) == 0
    assert len(got) > 0
    assert hashlib.sha256(got).digest() == hashlib.sha256(up.data[:len(got)]).digest()
    # The exit does not mean the log reader has the last lines yet: wait for it.
    m = server.wait_log(r"session end chid=b .* out=(\d+)", start=mark)
    assert int(m.group(1)) == len(got), "b did not get all the server sent it"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_cuts_the_drain_short(start_server, sig):
    """As with gunicorn or a shell: told twice, the server stops now."""
    server = start_server("--mode", "chan", "--drain-timeout", "120")
    _, up, mark = _stopping_with_a_stalled_receiver(server, sig)  # the drain would wait
    server.proc.send_signal(sig)
    assert server.proc.wait(30) == 0
    server.wait_log(r"did not drain within 120s \(told twice to stop\): resetting them",
                    start=mark)
    up.join(30)


def test_a_receiver_still_stalled_after_the_drain_timeout_is_reset(start_server):
    """What the drain timeout cuts off must not look like the stream's end to
    the receiver: it gets the bytes its kernel holds, then a reset, not an EOF."""
    server = start_server("--mode", "chan", "--drain-timeout", "0.5")
    sb, up, mark = _stopping_with_a_stalled_receiver(server)
    server.wait_log(r"did not drain within", start=mark)
    assert server.proc.wait(30) == 0
    got = bytearray()
    with pytest.raises(ConnectionResetError):
        while chunk := sb.recv(1 << 20):
            got += chunk
    assert 0 < len(got) < len(up.data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(up.data[:len(got)]).digest()
    up.join(30)  # its sendall ends with the server's reset


@pytest.mark.both_impls
def test_a_stopping_server_still_resets_a_cut_pairs_partner(start_server):
    """b's partner was reset and b waits for its reset (its bytes are not all
    acknowledged: it reads nothing): a SIGTERM then must not turn it into a
    FIN, which would pass the cut stream off as finished."""
    server = start_server("--mode", "chan")
    sa, sb = pair(server)
    sb.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sa.sendall(os.urandom(32 * 1024))  # under PAIR_MARK: the server reads it all
    mark = server.mark()
    reset_close(sa)
    server.wait_log(r"session end chid=b .*reason=\"pair partner lost", start=mark)
    server.proc.send_signal(signal.SIGTERM)
    sb.settimeout(30)
    read_until_reset(sb)
    assert server.proc.wait(30) == 0


def test_shutdown_answers_a_handshake_in_progress_with_a_fail(start_server):
    server = start_server("--mode", "chan")
    sock = server.connect()
    send_json(sock, {"req": "hs1", "chid": "early"})
    assert read_json(sock)["rsp"] == "hs2"
    server.proc.send_signal(signal.SIGTERM)
    assert expect_fail(sock) == "server shutdown"
    assert server.proc.wait(30) == 0


def test_shutdown_answers_a_connection_its_worker_never_read(start_server):
    """A connection handed to a worker that stops before it reads it (here
    the worker was stopped) is never served: the parent, which kept its copy,
    or the worker says `server shutdown`, as to one that arrives during the
    drain, not a bare close."""
    server = start_server("--mode", "chan", "--workers", "1")
    (worker,) = server.workers()
    with stopped(worker):
        sock = _unconfirmed(server)
        server.proc.send_signal(signal.SIGTERM)
    assert expect_fail(sock) == "server shutdown"
    assert server.proc.wait(30) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_stop_cleanly_too(start_server, sig):
    server = start_server("--mode", "broadcast")
    workers = server.workers()
    server.proc.send_signal(sig)
    assert server.proc.wait(30) == 0
    server.wait_log(r"stopped")
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("mode", ["chan", "broadcast"])
def test_byte_exact_through_the_worker(start_server, mode):
    server = start_server("--mode", mode)
    if mode == "chan":
        sa, sb = pair(server)
    else:
        # bcast_handshake retries an hs1 too late for the sniff window (data
        # for everyone then); b hears only a, so never such an hs1.
        sa, _, _ = bcast_handshake(server, "a", ["b"])
        sb, _, _ = bcast_handshake(server, "b", ["a"], senders=["a"])
    up = Sender(sa, 4 * MiB)
    up.start()
    assert recv_hash(sb, 4 * MiB) == up.digest
    up.finish()


def _worker_hook(tmp_path, action: str) -> dict[str, str]:
    """The environment of a server whose worker processes run ``action``
    before anything else while the file ``tmp_path / "flag"`` exists."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys, time\n"
        f"if 'fwd.worker' in sys.orig_argv and os.path.exists({str(tmp_path / 'flag')!r}):\n"
        f"    {action}\n")
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


@pytest.mark.parametrize("action, how", [("os._exit(3)", "status 3"),
                                         ("time.sleep(3600)", "signal 9")])
def test_a_worker_that_cannot_start_stops_the_server(tmp_path, action, how):
    """A worker that dies before it is ready would die again if restarted: the
    server says so and exits 1 instead of restarting it in a loop. One that
    hangs is killed at --worker-timeout, and is the same case."""
    env = _worker_hook(tmp_path, action)
    (tmp_path / "flag").touch()
    done = subprocess.run([sys.executable, "-m", "fwd.cli", "--listen", "127.0.0.1:0",
                           "--workers", str(WORKERS), "--control", "none",
                           "--worker-timeout", "2"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert re.search(r"ERROR acceptor fwd\.arbiter: worker \d+ \(pid \d+\) exited with "
                     rf"{how} before it was ready: it cannot start, so the server stops",
                     done.stderr), done.stderr
    if how == "signal 9":
        assert re.search(r"worker \d+ \(pid \d+\) not ready for [\d.]+ s: killing it",
                         done.stderr), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("action, how", [("os._exit(3)", "status 3"),
                                         ("time.sleep(3600)", "signal 9")])
def test_a_replacement_that_cannot_start_is_started_again_later(start_server, tmp_path,
                                                                 action, how):
    """A worker that served and died is replaced; if the replacement dies (or
    hangs: --worker-timeout) before it is ready, the server does not stop,
    which would cut every other worker's sessions: it starts one again after
    a pause that grows, and the other workers serve meanwhile."""
    server = start_server("--mode", "chan", "--worker-timeout", "2",
                          env=_worker_hook(tmp_path, action))
    server.expected_errors += [r"before it was ready \(\d in a row\); starting it again",
                               r"not ready for [\d.]+ s: killing it"]
    victim = server.workers()[0]
    others, up = _stream_elsewhere(server, victim)
    (tmp_path / "flag").touch()
    mark = server.mark()
    os.kill(victim, signal.SIGKILL)
    server.wait_log(rf"exited with {how} before it was ready \(1 in a row\); "
                    r"starting it again in 1 s", start=mark)
    server.wait_log(rf"exited with {how} before it was ready \(2 in a row\); "
                    r"starting it again in 2 s", start=mark)
    status = server.ctl_json("status")
    assert [sorted(w) for w in status["workers"] if "error" in w] == [
        ["error", "pid", "worker"]], status  # pid: null, or the one starting
    if others:  # served all along
        assert_pair_works(server)
    (tmp_path / "flag").unlink()
    server.wait_log(r"worker \d+ ready", start=mark)
    assert server.proc.poll() is None
    if up is not None:
        assert recv_hash(others[1], 8 * MiB) == up.digest
        up.finish()
    assert len(server.workers()) == WORKERS
    assert_pair_works(server)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_do_not_outlive_a_parent_killed_while_they_start():
    """Once a worker serves, its channel tells it that the parent is gone;
    while it boots it waits for its peers, whose coordinator is in the
    parent, and nothing else would stop it. The kernel does
    (PR_SET_PDEATHSIG), and the run directory goes with the last of them."""
    proc = Process([sys.executable, "-m", "fwd.cli", "--listen", "127.0.0.1:0",
                    "--workers", "2", "--log-level", "debug", "--control", "none"])
    try:
        proc.wait_log(r"worker 1 started pid=\d+")
        os.kill(proc.pid, signal.SIGSTOP)  # its coordinator answers nobody now
        rundir = proc.wait_log(r"run directory (\S+)").group(1)
        pids = [int(p) for p in re.findall(r"worker \d started pid=(\d+)", "\n".join(proc.lines))]
        assert len(pids) == 2
        # Each binds its endpoint there, then waits for the others.
        wait_until(lambda: {"w0", "w1"} <= set(os.listdir(rundir)), 30, "the workers to boot")
        os.kill(proc.pid, signal.SIGKILL)
        proc.proc.wait(10)
        wait_until(lambda: not any(_running(p) for p in pids), 20, "the workers to exit")
        wait_until(lambda: not os.path.exists(rundir), 10, "the run directory to go")
    finally:
        proc.stop(check=False)
