"""Load-generator processes: the code that runs *inside* each sender, receiver,
echo, pinger and handshake client.

Why a module of its own: the generators run in separate processes started by a
``forkserver`` (never threads of the measuring process, which would share its
GIL and its core), and a forkserver child can only run functions it can import.

Why it is written this way: the generators must not be the bottleneck, so
their loops spend their time in the kernel. A sender calls ``sendall`` on one
preallocated buffer (no per-write allocation); a receiver calls ``recv_into`` a
preallocated 1 MiB buffer; one receiver process serves many sockets through
``epoll``. Every process reports its own CPU time (``getrusage``) so that the
caller can show how busy the generators were next to the relay.

Every ``*_main`` function talks to its parent over a ``multiprocessing`` pipe:
it sends ``("port", p)`` if it listens, ``("connected",)`` once its sockets
are up (and hand-shaken), ``("ready",)`` once they may be used, then waits for
``"go"`` where it measures something, reports, and waits for ``"close"``. Any
exception is reported as ``("error", traceback)`` so the parent fails fast
instead of waiting for a report that never comes.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import resource
import select
import shutil
import socket
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

Addr = tuple[str, int]

DEADLINE = 120.0
"""Seconds after which a stuck measurement gives up (and says so) instead of hanging."""
RECV_BUF = 1 << 20
SMALL_WRITE = 4096
"""Writes below this size go through the C send loop, where Python's own cost
per call would show; larger ones spend their time in the kernel either way."""


@dataclass
class Ends:
    """The sockets of one generator process: ``n`` of them, either dialled to
    ``connect`` (then hand-shaken if ``chids`` is set) or accepted on a fresh
    127.0.0.1 listener (``connect is None``)."""

    n: int = 1
    connect: Addr | None = None
    chids: list[str] | None = None
    recvers: list[str] | None = None
    sync: bool = False
    """ncat --broker: the sender writes one byte to all once every receiver is
    connected, and a receiver counts as ready only once it has read it."""
    nodelay: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def raise_nofile() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one: 1000 receivers or 10,000
    idle sessions need more than the usual 1024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


SendLoop = Callable[[int, bytes, int, int], int]

_SENDLOOP_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sendloop.c")


def c_send_loop() -> tuple[SendLoop | None, str]:
    """``bench/sendloop.c`` built with the system's C compiler (once per
    source version, into the temp directory) and loaded through ctypes, or
    None and why not. Small writes need it: a Python call per 64 B write costs
    about a fifth of the sender's time, and the sender was the bottleneck."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc, gcc, $CC)"
    with open(_SENDLOOP_SRC, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    so = os.path.join(tempfile.gettempdir(), f"fwd-bench-sendloop-{digest}-{os.getuid()}.so")
    try:
        if not os.path.exists(so):
            tmp = f"{so}.{os.getpid()}"
            done = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, _SENDLOOP_SRC],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                return None, f"{cc} failed: {done.stderr.strip()[:200]}"
            os.replace(tmp, so)  # atomic: a concurrent build never loads half a file
        fn = ctypes.CDLL(so).send_loop
    except OSError as exc:
        return None, f"{cc}: {exc}"
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t]
    return fn, "c"


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def dial(addr: Addr, nodelay: bool = True, retry: float = 10.0) -> socket.socket:
    """Connect, retrying while the relay (socat, ncat) is not listening yet."""
    deadline = time.monotonic() + retry
    while True:
        try:
            sock = socket.create_connection(addr, timeout=60)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    sock.settimeout(None)
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_lines(sock: socket.socket, count: int, buf: bytearray) -> list[bytes]:
    """Read ``count`` handshake lines through ``buf``; what follows stays in it."""
    lines: list[bytes] = []
    while len(lines) < count:
        i = buf.find(b"\n")
        if i >= 0:
            lines.append(bytes(buf[:i]))
            del buf[:i + 1]
            continue
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"closed during handshake after {lines!r}")
        buf += chunk
    return lines


def hs_lines(chid: str | None, recvers: list[str] | None) -> tuple[bytes, bytes]:
    hs1: dict[str, Any] = {"req": "hs1"}
    if chid is not None:
        hs1["chid"] = chid
    hs3: dict[str, Any] = {"req": "hs3"}
    if recvers is not None:
        hs3["recvers"] = recvers
    return (json.dumps(hs1, separators=(",", ":")).encode() + b"\n",
            json.dumps(hs3, separators=(",", ":")).encode() + b"\n")


def handshake(sock: socket.socket, chid: str | None, recvers: list[str] | None) -> bytes:
    """hs1 -> hs2 -> hs3 -> hs4 OK, one step at a time as a plain client does;
    returns stream bytes that came behind the hs4 line (normally none)."""
    l1, l3 = hs_lines(chid, recvers)
    buf = bytearray()
    sock.sendall(l1)
    (hs2,) = read_lines(sock, 1, buf)
    if json.loads(hs2).get("rsp") != "hs2":
        raise RuntimeError(f"hs1 refused: {hs2!r}")
    sock.sendall(l3)
    (hs4,) = read_lines(sock, 1, buf)
    if json.loads(hs4).get("result") != "OK":
        raise RuntimeError(f"hs3 refused: {hs4!r}")
    return bytes(buf)


def open_ends(ctl: Connection, ends: Ends) -> tuple[list[socket.socket], list[int]]:
    """Open the sockets; returns them and the stream bytes already received on each."""
    socks: list[socket.socket] = []
    early = [0] * ends.n
    if ends.connect is None:
        lsock = socket.create_server(("127.0.0.1", 0), backlog=min(ends.n + 16, 4096))
        ctl.send(("port", lsock.getsockname()[1]))
        for _ in range(ends.n):
            s, _ = lsock.accept()
            if ends.nodelay:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(s)
        lsock.close()
    else:
        for i in range(ends.n):
            s = dial(ends.connect, ends.nodelay)
            if ends.chids is not None:
                early[i] = len(handshake(s, ends.chids[i], ends.recvers))
            socks.append(s)
    ctl.send(("connected",))
    return socks, early


def pin(ends: Ends) -> None:
    """Ping-pong may run with every process on one CPU: on a small VM a
    wake-up on the other CPU costs tens of µs (an IPI and an idle exit), which
    otherwise swamps the relay's own latency and changes from run to run."""
    if ends.extra.get("cpu") is not None:
        os.sched_setaffinity(0, {ends.extra["cpu"]})


def _child(body: Callable[[], None], ctl: Connection) -> None:
    try:
        raise_nofile()
        body()
    except BaseException:
        try:
            ctl.send(("error", traceback.format_exc()))
        except OSError:
            pass


def _wait(ctl: Connection, what: str) -> Any:
    msg = ctl.recv()
    if msg[0] != what:
        raise RuntimeError(f"expected {what!r} from the parent, got {msg!r}")
    return msg


def sender_main(ctl: Connection, ends: Ends, block: int, total: int) -> None:
    """Write ``total`` bytes to every socket in ``block``-byte writes from one
    preallocated buffer; reports start/end times and its CPU time."""

    def body() -> None:
        socks, _ = open_ends(ctl, ends)
        if ends.sync:
            for s in socks:
                s.sendall(b"S")
        ctl.send(("ready",))
        _wait(ctl, "go")
        view = memoryview(bytearray(b"x" * block))
        sends = [s.sendall for s in socks]
        loop, how = c_send_loop() if len(socks) == 1 and block < SMALL_WRITE else (None, "python")
        c0, t0 = cpu_self(), time.monotonic()
        if loop is not None:
            err = loop(socks[0].fileno(), bytes(view), block, total // block)
            if err:
                raise OSError(-err, os.strerror(-err))
        elif len(sends) == 1:
            send = sends[0]
            for _ in range(total // block):
                send(view)
        else:
            for _ in range(total // block):
                for send in sends:
                    send(view)
        t1 = time.monotonic()
        ctl.send(("sent", t0, t1, cpu_self() - c0, how))
        _wait(ctl, "close")
        for s in socks:
            s.close()

    _child(body, ctl)


def receiver_main(ctl: Connection, ends: Ends, expect: int) -> None:
    """Read until every socket has delivered ``expect`` bytes (or EOF); one
    process, one epoll set, one 1 MiB buffer for all sockets. Reports the time
    the last byte arrived and the per-socket byte counts, so that the caller
    can check 1->1000 delivered everything to everyone."""

    def body() -> None:
        socks, early = open_ends(ctl, ends)
        if ends.sync:
            for s in socks:
                if s.recv(1) != b"S":
                    raise RuntimeError("no sync byte")
        ctl.send(("ready",))
        counts = list(early)
        buf = bytearray(RECV_BUF)
        c0 = cpu_self()
        deadline = time.monotonic() + DEADLINE
        timed_out = False
        if len(socks) == 1:
            s = socks[0]
            s.settimeout(DEADLINE)
            recv_into = s.recv_into
            left = expect - counts[0]
            while left > 0:
                k = recv_into(buf)
                if not k:
                    break
                left -= k
            counts[0] = expect - left
        else:
            ep = select.epoll()
            index = {}
            for i, s in enumerate(socks):
                s.setblocking(False)
                if counts[i] < expect:
                    ep.register(s.fileno(), select.EPOLLIN)
                    index[s.fileno()] = i
            left = len(index)
            while left:
                events = ep.poll(1.0)
                if not events and time.monotonic() > deadline:
                    timed_out = True
                    break
                for fd, _ in events:
                    i = index[fd]
                    try:
                        k = socks[i].recv_into(buf)
                    except BlockingIOError:
                        continue
                    except ConnectionError:
                        k = 0
                    counts[i] += k
                    if k == 0 or counts[i] >= expect:
                        ep.unregister(fd)
                        left -= 1
            ep.close()
        t_done = time.monotonic()
        ctl.send(("done", t_done, counts, cpu_self() - c0, timed_out))
        _wait(ctl, "close")
        for s in socks:
            s.close()

    _child(body, ctl)


def _recv_exact(recv_into: Callable[..., int], view: memoryview, size: int) -> None:
    got = 0
    while got < size:
        k = recv_into(view[got:size])
        if not k:
            raise EOFError("peer closed during ping-pong")
        got += k


def echo_main(ctl: Connection, ends: Ends, size: int, count: int) -> None:
    """Send back each ``size``-byte message as soon as it is complete."""

    def body() -> None:
        pin(ends)
        socks, early = open_ends(ctl, ends)
        if early[0]:
            raise RuntimeError("unexpected bytes before the first ping")
        ctl.send(("ready",))
        s = socks[0]
        view = memoryview(bytearray(size))
        recv_into, sendall = s.recv_into, s.sendall
        c0 = cpu_self()
        for _ in range(count):
            _recv_exact(recv_into, view, size)
            sendall(view)
        ctl.send(("done", cpu_self() - c0))
        _wait(ctl, "close")
        s.close()

    _child(body, ctl)


def pinger_main(ctl: Connection, ends: Ends, size: int, count: int, warmup: int) -> None:
    """One message out, wait for it back, ``warmup + count`` times; reports the
    ``count`` round-trip times in nanoseconds (perf_counter_ns)."""

    def body() -> None:
        pin(ends)
        socks, _ = open_ends(ctl, ends)
        ctl.send(("ready",))
        _wait(ctl, "go")
        s = socks[0]
        msg = memoryview(bytearray(b"p" * size))
        view = memoryview(bytearray(size))
        recv_into, sendall, clock = s.recv_into, s.sendall, time.perf_counter_ns
        rtts = [0] * count
        c0 = cpu_self()
        for i in range(warmup + count):
            t = clock()
            sendall(msg)
            _recv_exact(recv_into, view, size)
            if i >= warmup:
                rtts[i - warmup] = clock() - t
        ctl.send(("done", rtts, cpu_self() - c0))
        _wait(ctl, "close")
        s.close()

    _child(body, ctl)


def idle_main(ctl: Connection, addr: Addr, n: int, prefix: str, batch: int) -> None:
    """Open ``n`` hand-shaken chan sessions and keep them idle until told to
    close. Batches of pipelined handshakes (hs1 and hs3 in one write, which the
    protocol allows) keep the opening fast without overflowing the backlog."""

    def body() -> None:
        socks: list[socket.socket] = []
        c0, t0 = cpu_self(), time.monotonic()
        for start in range(0, n, batch):
            group = []
            for i in range(start, min(n, start + batch)):
                s = dial(addr, nodelay=False)
                l1, l3 = hs_lines(f"{prefix}{i}", None)
                s.sendall(l1 + l3)
                group.append(s)
            for s in group:
                hs2, hs4 = read_lines(s, 2, bytearray())
                if json.loads(hs4).get("result") != "OK":
                    raise RuntimeError(f"idle session refused: {hs2!r} {hs4!r}")
            socks.extend(group)
        ctl.send(("ready", len(socks), time.monotonic() - t0, cpu_self() - c0))
        _wait(ctl, "close")
        for s in socks:
            s.close()

    _child(body, ctl)


def handshake_main(ctl: Connection, addr: Addr, prefix: str, drawn: bool = False,
                   inflight: int = 1) -> None:
    """New sessions back to back until the deadline the parent sends with "go":
    connect, hs1, wait hs2, hs3, wait hs4 OK, close; ``inflight`` of them at a
    time, driven by epoll, so one process keeps the server busy without a
    context switch per step. Counts completed sessions; sessions still open at
    the deadline are not counted. ``drawn``: hs1 names no chid."""

    def body() -> None:
        raise_nofile()
        ctl.send(("ready",))
        _, until = _wait(ctl, "go")
        _, l3 = hs_lines(None, None)
        ep = select.epoll()
        conns: dict[int, tuple[socket.socket, list[Any]]] = {}
        done = failed = started = 0

        def start() -> None:
            nonlocal failed, started
            l1, _ = hs_lines(None if drawn else f"{prefix}{started}", None)
            started += 1
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.connect(addr)  # loopback: done within the call
                s.setblocking(False)
                s.send(l1)
            except OSError as exc:
                s.close()
                _expected(exc)
                failed += 1
                return
            ep.register(s.fileno(), select.EPOLLIN)
            conns[s.fileno()] = (s, [1, b""])

        def end(fd: int) -> None:
            s, _ = conns.pop(fd)
            ep.unregister(fd)
            s.close()

        c0, t0 = cpu_self(), time.monotonic()
        for _ in range(inflight):
            start()
        now = t0
        while now < until:
            for fd, _ in ep.poll(0.5):
                s, state = conns[fd]
                try:
                    data = s.recv(4096)
                except OSError as exc:
                    _expected(exc)
                    data = b""
                buf = state[1] + data
                line, nl, rest = buf.partition(b"\n")
                if data and not nl:
                    state[1] = buf
                    continue
                state[1] = rest
                if nl and state[0] == 1 and json.loads(line).get("rsp") == "hs2":
                    state[0] = 2
                    s.send(l3)
                    continue
                if nl and state[0] == 2 and json.loads(line).get("result") == "OK":
                    done += 1
                else:
                    failed += 1
                end(fd)
                start()
            now = time.monotonic()
        for fd in list(conns):
            end(fd)
        ep.close()
        ctl.send(("done", done, failed, t0, now, cpu_self() - c0))
        _wait(ctl, "close")

    _child(body, ctl)


def _expected(exc: OSError) -> None:
    """A refused or reset connection counts as a failed session; anything
    else is a bug in the measurement."""
    if exc.errno not in (errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE, None):
        raise exc

