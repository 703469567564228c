"""The measurements themselves, shared by ``python -m bench.compare`` and the
pytest-benchmark cases, so that both measure exactly the same thing.

Every scenario function sets up the relay path (fwd, socat, ncat --broker, or
nothing for the direct baselines), starts its generator processes
(``bench.gen``), waits until every socket is really usable (hs4 OK, an accepted
connection, or the ncat sync byte), snapshots the relay's CPU time, says "go",
and returns one sample as a plain dict (JSON-ready). Setup is never inside the
measured interval; the interval runs from the sender's first write to the last
byte arriving at the last receiver (CLOCK_MONOTONIC is shared by all processes).
"""
from __future__ import annotations

import importlib.util
import itertools
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any

from bench import gen
from bench.gen import Addr, Ends

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = float(1 << 30)
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL_CPUS = os.sched_getaffinity(0)

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["bench.gen"])
_TAGS = itertools.count()


def fixtures() -> ModuleType:
    """tests/conftest.py as a module: its ``Server`` class is how every test
    starts a real fwd-server (ephemeral port, ready-worker wait, pids, RSS,
    CPU), and the benchmarks must start it the same way."""
    name = "fwd_test_fixtures"
    if name in sys.modules:
        return sys.modules[name]
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    spec = importlib.util.spec_from_file_location(name, os.path.join(tests, "conftest.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Sizes:
    """How much each scenario moves. The defaults are what ``bench.compare``
    runs (about a minute per repetition on 2 cores); ``small()`` is for pytest."""

    stream_bytes: int = 1024 << 20
    small_bytes: int = 192 << 20
    msgs: int = 2_000_000
    fanout_bytes: int = 2048 << 20
    """Bytes *delivered* per fan-out run (all receivers together)."""
    fanout_min_each: int = 1 << 20
    pings: int = 20000  # 5000 until 2026-11-27: too short a run on a noisy machine
    ping_warmup: int = 500
    idle_sessions: int = 10_000
    hs_procs: int = 2
    hs_inflight: int = 32
    """Sessions each handshake process keeps going at once: the rate is the
    server's capacity only once more sessions wait than it can serve."""
    hs_seconds: float = 2.0

    @classmethod
    def small(cls) -> Sizes:
        return cls(stream_bytes=64 << 20, small_bytes=8 << 20, msgs=50_000,
                   fanout_bytes=64 << 20, fanout_min_each=256 << 10, pings=1000,
                   ping_warmup=100, idle_sessions=2000, hs_procs=2, hs_inflight=8,
                   hs_seconds=1.0)

    def scaled(self, k: float) -> Sizes:
        d = asdict(self)
        for key in ("stream_bytes", "small_bytes", "msgs", "fanout_bytes", "pings"):
            d[key] = max(1, int(d[key] * k))
        d["hs_seconds"] = self.hs_seconds * max(k, 0.25)
        return Sizes(**d)

    def fanout_each(self, n: int) -> int:
        """Bytes the sender writes in a 1->n run (a multiple of 64 KiB)."""
        each = max(self.fanout_bytes // n, self.fanout_min_each)
        return max(1, each >> 16) << 16


class Child:
    """One generator process and the pipe to it."""

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        self.conn, theirs = _CTX.Pipe()
        self.proc = _CTX.Process(target=target, args=(theirs, *args), daemon=True)
        self.proc.start()
        theirs.close()

    def expect(self, kind: str, timeout: float = 120.0) -> tuple[Any, ...]:
        conn: Connection = self.conn
        if not conn.poll(timeout):
            raise TimeoutError(f"{self.proc.name}: no {kind!r} within {timeout}s")
        try:
            msg = conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.proc.name} died (exit {self.proc.exitcode}) "
                               f"before {kind!r}") from None
        if msg[0] == "error":
            raise RuntimeError(f"generator failed:\n{msg[1]}")
        if msg[0] != kind:
            raise RuntimeError(f"expected {kind!r}, got {msg!r}")
        return tuple(msg)

    def send(self, *msg: Any) -> None:
        self.conn.send(msg)

    def close(self) -> None:
        try:
            self.conn.send(("close",))
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def proc_cpu(pids: list[int]) -> float:
    """user + system seconds of these processes (fields 14 and 15 of stat)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def free_port() -> int:
    """A port for socat/ncat, which cannot report the one they got."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkersUnsupported(Exception):
    """fwd-server refused this --workers count (a usage error, exit 2)."""


class Fwd:
    """A real fwd-server (``tests/conftest.py:Server``) on 127.0.0.1:0."""

    name = "fwd"

    def __init__(self, mode: str = "chan", workers: int = 1, extra: tuple[str, ...] = ()) -> None:
        self.workers = workers
        args = ["--listen", "127.0.0.1:0", "--mode", mode, "--workers", str(workers),
                "--log-level", "info", *extra]
        try:
            self.server = fixtures().Server(args)
        except AssertionError as exc:
            text = str(exc)
            if "server exited (2)" in text:
                why = [ln for ln in text.splitlines() if ln.startswith("Error:")]
                raise WorkersUnsupported(
                    f"fwd-server --workers {workers}: "
                    + (why[-1] if why else "usage error (exit 2)")) from None
            raise

    @property
    def addr(self) -> Addr:
        return (self.server.host, self.server.port)

    def cpu(self) -> float:
        """Acceptor and workers: the server's own pid and its children."""
        return float(self.server.cpu_seconds())

    def stop(self) -> None:
        self.server.stop(check=False)


def workers_skip_reason(workers: int) -> str | None:
    """None if fwd-server starts with this many workers, else why not."""
    if workers == 1:
        return None
    try:
        Fwd(workers=workers).stop()
    except WorkersUnsupported as exc:
        return str(exc)
    return None


class Ncat:
    """One long-running ``ncat --broker`` (a fan-out hub: every client's bytes
    go to all other clients), shared by all runs like the fwd server is."""

    name = "ncat"

    def __init__(self) -> None:
        port = free_port()
        self.proc = subprocess.Popen(
            ["ncat", "--broker", "--listen", "--max-conns", "4000", "127.0.0.1", str(port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addr: Addr = ("127.0.0.1", port)
        deadline = time.monotonic() + 10
        while True:  # a probe client joins the broker and leaves again: harmless
            try:
                socket.create_connection(self.addr, timeout=1).close()
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("ncat --broker did not start") from None
                time.sleep(0.01)

    def cpu(self) -> float:
        return proc_cpu([self.proc.pid])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_socat(listen: int, target: int, nodelay: bool = False) -> subprocess.Popen[bytes]:
    """The 1:1 relay baseline, exactly as the issue names it (``-b 262144``);
    ``nodelay`` only for ping-pong, since fwd sets TCP_NODELAY on its sockets."""
    opt = ",nodelay" if nodelay else ""
    return subprocess.Popen(
        ["socat", "-b", "262144", f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr{opt}",
         f"TCP:127.0.0.1:{target}{opt}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def missing_tools() -> dict[str, str]:
    """Baselines whose program is not installed: skipped, never installed here."""
    return {tool: f"{tool} not found on PATH (install it to get this baseline)"
            for tool in ("socat", "ncat") if shutil.which(tool) is None}


def _stop_socat(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class StreamRun:
    """One sender writes ``total`` bytes in ``block``-byte writes; ``n``
    receivers must each get all of them. ``kind``: fwd (chan mode: a pair for
    n == 1, ``recvers=[]`` for fan-out), direct (the sender writes each chunk to
    the n sockets itself), socat (1:1 only) or ncat (--broker).

    Construction does all the setup (processes, connections, handshakes);
    ``go()`` is the measurement, so pytest-benchmark can time only that."""

    def __init__(self, kind: str, n: int, block: int, total: int, *, fwd: Fwd | None = None,
                 ncat: Ncat | None = None) -> None:
        self.kind, self.n, self.block = kind, n, block
        # Whole writes only, or the receivers would wait for bytes never sent.
        self.total = total = max(1, total // block) * block
        self.fwd = fwd
        self.children: list[Child] = []
        self.socat: subprocess.Popen[bytes] | None = None
        self.cpu: Callable[[], float] | None = None
        try:
            self._setup(kind, n, block, total, fwd, ncat)
        except BaseException:
            self.close()
            raise

    def _child(self, target: Callable[..., None], *args: Any) -> Child:
        c = Child(target, *args)
        self.children.append(c)
        return c

    def _setup(self, kind: str, n: int, block: int, total: int, fwd: Fwd | None,
               ncat: Ncat | None) -> None:
        tag = next(_TAGS)
        if kind == "fwd":
            assert fwd is not None
            src, rids = f"s{tag}", [f"r{tag}-{i}" for i in range(n)]
            self.rx = self._child(gen.receiver_main, Ends(n, fwd.addr, rids, [src]), total)
            self.rx.expect("connected")
            self.rx.expect("ready")  # all n receivers got hs4 OK: they are live
            self.tx = self._child(gen.sender_main,
                                  Ends(1, fwd.addr, [src], rids if n == 1 else []), block, total)
            self.tx.expect("connected")
            self.tx.expect("ready")
            self.cpu = fwd.cpu
        elif kind == "direct":
            self.tx = self._child(gen.sender_main, Ends(n), block, total)
            port = self.tx.expect("port")[1]
            self.rx = self._child(gen.receiver_main, Ends(n, ("127.0.0.1", port)), total)
            for c in (self.rx, self.tx):
                c.expect("connected")
                c.expect("ready")
        elif kind == "socat":
            assert n == 1
            self.rx = self._child(gen.receiver_main, Ends(1), total)
            port = self.rx.expect("port")[1]
            listen = free_port()
            self.socat = start_socat(listen, port)
            self.tx = self._child(gen.sender_main, Ends(1, ("127.0.0.1", listen)), block, total)
            for c in (self.tx, self.rx):
                c.expect("connected")
                c.expect("ready")
            pid = self.socat.pid
            self.cpu = lambda: proc_cpu([pid])
        elif kind == "ncat":
            assert ncat is not None
            self.rx = self._child(gen.receiver_main, Ends(n, ncat.addr, sync=True), total)
            self.rx.expect("connected")
            self.tx = self._child(gen.sender_main, Ends(1, ncat.addr, sync=True), block, total)
            self.tx.expect("connected")
            self.tx.expect("ready")
            self.rx.expect("ready")  # every receiver read the sync byte: all are in the broker
            self.cpu = ncat.cpu
        else:
            raise ValueError(kind)

    def go(self) -> dict[str, Any]:
        cpu = self.cpu
        c0 = cpu() if cpu else 0.0
        self.tx.send("go")
        _, t0, t_sent, tx_cpu, tx_loop = self.tx.expect("sent", gen.DEADLINE)
        _, t_done, counts, rx_cpu, timed_out = self.rx.expect("done", gen.DEADLINE + 5)
        relay_cpu = (cpu() - c0) if cpu else None
        delivered = sum(counts)
        secs = max(t_done - t0, 1e-9)
        bad = [i for i, c in enumerate(counts) if c != self.total]
        return {
            "kind": self.kind, "n": self.n, "block": self.block, "bytes_each": self.total,
            "delivered": delivered, "ok": not bad and not timed_out,
            "short_receivers": len(bad),
            "secs": secs,
            "rate": delivered / secs,
            "mib_s": delivered / secs / (1 << 20),
            "msgs_per_s": delivered / self.block / secs,
            "relay_cpu": relay_cpu,
            "cpu_per_gib": None if relay_cpu is None else relay_cpu / (delivered / GIB),
            "relay_cpu_share": None if relay_cpu is None else relay_cpu / secs,
            "sender_cpu_share": tx_cpu / max(t_sent - t0, 1e-9),
            "sender_loop": tx_loop,
            "receiver_cpu_share": rx_cpu / secs,
            "workers": self.fwd.workers if self.kind == "fwd" and self.fwd else None,
        }

    def close(self) -> None:
        for c in reversed(self.children):
            c.close()
        self.children.clear()
        _stop_socat(self.socat)
        self.socat = None


def run_stream(kind: str, n: int, block: int, total: int, *, fwd: Fwd | None = None,
               ncat: Ncat | None = None) -> dict[str, Any]:
    """Set up, measure once, tear down (see ``StreamRun``)."""
    run = StreamRun(kind, n, block, total, fwd=fwd, ncat=ncat)
    try:
        return run.go()
    finally:
        run.close()


def run_pingpong(kind: str, size: int, count: int, warmup: int, *, fwd: Fwd | None = None,
                 ncat: Ncat | None = None, cpu: int | None = None) -> dict[str, Any]:
    """``size``-byte ping-pong, one message in flight: a pinger process and an
    echo process, directly or through the relay. Returns p50/p99 in µs.
    ``cpu``: run pinger, echo and relay processes all on this CPU (see gen.pin)."""
    tag = next(_TAGS)
    extra = {"cpu": cpu}
    pinned: list[int] = []
    children: list[Child] = []
    socat: subprocess.Popen[bytes] | None = None
    try:
        if kind == "fwd":
            assert fwd is not None
            a, b = f"p{tag}", f"e{tag}"
            echo = Child(gen.echo_main, Ends(1, fwd.addr, [b], [a], extra=extra), size,
                         warmup + count)
            children.append(echo)
            echo.expect("connected")
            echo.expect("ready")
            ping = Child(gen.pinger_main, Ends(1, fwd.addr, [a], [b], extra=extra), size,
                         count, warmup)
            children.append(ping)
        elif kind in ("direct", "socat"):
            echo = Child(gen.echo_main, Ends(1, extra=extra), size, warmup + count)
            children.append(echo)
            port = echo.expect("port")[1]
            if kind == "socat":
                listen = free_port()
                socat = start_socat(listen, port, nodelay=True)
                port = listen
            ping = Child(gen.pinger_main, Ends(1, ("127.0.0.1", port), extra=extra), size,
                         count, warmup)
            children.append(ping)
            echo.expect("connected")
            echo.expect("ready")
        elif kind == "ncat":
            assert ncat is not None
            # The echo connects first; the broker accepts in backlog order, so
            # it is a member before the pinger's first byte is read.
            echo = Child(gen.echo_main, Ends(1, ncat.addr, extra=extra), size, warmup + count)
            children.append(echo)
            echo.expect("connected")
            echo.expect("ready")
            ping = Child(gen.pinger_main, Ends(1, ncat.addr, extra=extra), size, count, warmup)
            children.append(ping)
        else:
            raise ValueError(kind)
        ping.expect("connected")
        ping.expect("ready")
        if cpu is not None:
            pinned = {"fwd": lambda: fwd.server.pids() if fwd else [],
                      "socat": lambda: [socat.pid] if socat else [],
                      "ncat": lambda: [ncat.proc.pid] if ncat else []}.get(kind, list)()
            for p in pinned:
                os.sched_setaffinity(p, {cpu})
        relay = {"fwd": fwd, "ncat": ncat}.get(kind)
        relay_c0 = relay.cpu() if relay else 0.0
        ping.send("go")
        _, rtts, ping_cpu = ping.expect("done", gen.DEADLINE)
        relay_cpu = relay.cpu() - relay_c0 if relay else None
        echo.expect("done", gen.DEADLINE)
    finally:
        for p in pinned:
            try:
                os.sched_setaffinity(p, ALL_CPUS)
            except OSError:
                pass
        for c in reversed(children):
            c.close()
        _stop_socat(socat)
    rtts.sort()
    us = [r / 1000.0 for r in rtts]
    return {
        "kind": kind, "size": size, "count": count,
        "p50_us": us[len(us) // 2],
        "p99_us": us[min(len(us) - 1, int(len(us) * 0.99))],
        "mean_us": statistics.fmean(us),
        # The relay's CPU (all its processes) per round trip, warm-up included:
        # with every process on one CPU, what its share of the latency is made of,
        # and steadier than the latency from run to run.
        "relay_cpu_us": None if relay_cpu is None else relay_cpu / (count + warmup) * 1e6,
        "workers": fwd.workers if kind == "fwd" and fwd else None, "pinned_cpu": cpu,
    }


def run_idle(n: int, workers: int = 1, batch: int = 200) -> dict[str, Any]:
    """RSS of all server processes before and after ``n`` hand-shaken idle chan
    sessions held by one client process (its fd limit raised). A fresh server,
    so that earlier scenarios' heap growth does not hide or inflate the delta."""
    hard = gen.raise_nofile()
    n = min(n, hard - 200)
    fwd = Fwd(workers=workers, extra=("--max-conns", str(n + 100)))
    idle: Child | None = None
    try:
        # Warm-up: a few sessions first, so one-time allocations (first
        # session, first route) are not charged to the n idle ones.
        warm = Child(gen.idle_main, fwd.addr, 50, f"w{next(_TAGS)}-", 50)
        warm.expect("ready")
        warm.close()
        time.sleep(0.3)
        rss0, fd0 = fwd.server.rss(), fwd.server.fd_count()
        idle = Child(gen.idle_main, fwd.addr, n, f"i{next(_TAGS)}-", batch)
        _, opened, open_secs, gen_cpu = idle.expect("ready", 300)
        time.sleep(0.3)
        rss1, fd1 = fwd.server.rss(), fwd.server.fd_count()
        pids = len(fwd.server.pids())
    finally:
        if idle is not None:
            idle.close()
        fwd.stop()
    return {
        "sessions": opened, "rss_before": rss0, "rss_after": rss1,
        "bytes_per_session": (rss1 - rss0) / opened, "fds_added": fd1 - fd0,
        "server_processes": pids, "open_secs": open_secs, "workers": workers,
    }


def run_handshakes(fwd: Fwd, procs: int, seconds: float, drawn: bool = False,
                   inflight: int = 1) -> dict[str, Any]:
    """New chan sessions per second: ``procs`` client processes each keeping
    ``inflight`` sessions going (connect, hs1, hs2, hs3, hs4, close) for
    ``seconds``; with ``drawn`` their hs1 names no chid, so the server draws one."""
    tag = next(_TAGS)
    children = [Child(gen.handshake_main, fwd.addr, f"h{tag}-{p}-", drawn, inflight)
                for p in range(procs)]
    try:
        for c in children:
            c.expect("ready")
        c0 = fwd.cpu()
        until = time.monotonic() + seconds
        for c in children:
            c.send("go", until)
        reports = [c.expect("done", seconds + 60) for c in children]
        relay_cpu = fwd.cpu() - c0
    finally:
        for c in children:
            c.close()
    done = sum(r[1] for r in reports)
    failed = sum(r[2] for r in reports)
    t0 = min(r[3] for r in reports)
    t1 = max(r[4] for r in reports)
    secs = max(t1 - t0, 1e-9)
    return {
        "procs": procs, "inflight": inflight, "sessions": done, "failed": failed, "secs": secs,
        "rate": done / secs, "relay_cpu_share": relay_cpu / secs,
        "client_cpu_share": sum(r[5] for r in reports) / secs, "workers": fwd.workers,
    }


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the numeric fields of several samples (for extra_info)."""
    out: dict[str, Any] = {"runs": len(results)}
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            vals = [r[key] for r in results if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(vals)
        elif not isinstance(value, (list, dict)):
            out[key] = value
    return out
