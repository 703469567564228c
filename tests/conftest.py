"""Fixtures that start real fwd-server processes on ephemeral loopback ports.

Synchronisation is by events the server really emits: its log lines (read by a
thread into a list) and the bytes on the sockets. Every socket a test opens
through a fixture is closed at teardown, and a server that logged a traceback
or an ERROR fails the test that used it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from helpers import handshake, socket_inodes, tcp_sockets, wait_until

# Property tests check correctness, never speed: on a shared, loaded machine a
# deadline or the "generation is slow" health check fails a correct build.
settings.register_profile("fwd", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fwd")

LOG_WAIT = 15.0
WORKERS = int(os.environ.get("FWD_TEST_WORKERS", "1"))
"""Worker processes of every server the tests start: CI runs the suite for 1 and 3."""


class Process:
    """A fwd command running as a child, with the log lines it writes on stderr."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        self.args = cmd
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.sockets: list[socket.socket] = []
        self.expected_errors: list[str] = []  # regexes of ERROR lines a test provokes
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=full_env, preexec_fn=preexec, text=True,
        )
        self.reading = threading.Event()  # clear it to play a log reader that stalls
        self.reading.set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Whole pipe-fulls at a time, not line by line: a busy server logs
        # thousands of lines a second, and benchmarks share the CPUs with us.
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        rest = b""
        while self.reading.wait() and (data := os.read(fd, 1 << 16)):
            *lines, rest = (rest + data).split(b"\n")
            if lines:
                with self.cond:
                    self.lines.extend(ln.decode("utf-8", "replace") for ln in lines)
                    self.cond.notify_all()
        with self.cond:
            if rest:
                self.lines.append(rest.decode("utf-8", "replace"))
            self.cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_log(self, pattern: str, timeout: float = LOG_WAIT, start: int = 0,
                 count: int = 1) -> re.Match[str]:
        """Wait until ``count`` log lines from index ``start`` match; return the last match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for line in self.lines[start:] if (m := rx.search(line))]
                if len(found) >= count:
                    return found[count - 1]
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"server exited ({self.proc.returncode}) before "
                                         f"{pattern!r}:\n" + "\n".join(self.lines[-30:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no log line {pattern!r} within {timeout}s:\n"
                                         + "\n".join(self.lines[-30:]))
                self.cond.wait(left)

    def mark(self) -> int:
        """Index to pass as ``start`` to wait only for lines logged from now on."""
        with self.cond:
            return len(self.lines)

    def pids(self) -> list[int]:
        """The parent process and its children (the workers), as of now."""
        pids = [self.pid]
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            with open(f"/proc/{self.pid}/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        return pids

    def rss(self) -> int:
        """Resident set size of all server processes together, in bytes."""
        total = 0
        for pid in self.pids():
            with open(f"/proc/{pid}/status") as f:
                total += next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
        return total

    def fd_count(self) -> int:
        """Open file descriptors of all server processes together."""
        return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in self.pids())

    def cpu_seconds(self) -> float:
        """User + system CPU time of all server processes together."""
        total = 0
        for pid in self.pids():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self, check: bool = True) -> None:
        self.reading.set()
        for s in self.sockets:
            s.close()
        self.sockets.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("server did not stop within 15 s of SIGTERM") from None
        self._reader.join(5)
        if check:
            assert self.proc.returncode == 0, f"server exit code {self.proc.returncode}"
            bad = [ln for ln in self.lines
                   if "Traceback" in ln or (" ERROR " in ln or '"level": "ERROR"' in ln)
                   and not any(re.search(p, ln) for p in self.expected_errors)]
            assert not bad, "server logged errors:\n" + "\n".join(self.lines)


class Server(Process):
    """A running fwd-server: ready once it listens and every worker said so."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        super().__init__([sys.executable, "-m", "fwd.cli", *args], env, preexec)
        m = self.wait_log(r"listening on (\S+) .*workers=(\d+) .*control=([^\s\"]+)")
        self.control = m.group(3)
        # Ready workers: fd and memory baselines taken from here on are stable.
        self.wait_log(r"worker \d+ ready", count=int(m.group(2)))
        addr = m.group(1).split(",")[0]
        host, _, port = addr.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)

    def connect(self, timeout: float = 10.0, source: str | None = None) -> socket.socket:
        """``source``: the client's own address (127.0.0.2, say: any of 127/8 works)."""
        sock = socket.create_connection((self.host, self.port), timeout=timeout,
                                        source_address=None if source is None else (source, 0))
        self.sockets.append(sock)
        return sock

    def handshake(self, chid: str | None = None, recvers: list[str] | None = None,
                  timeout: int | None = None, source: str | None = None,
                  senders: list[str] | None = None) -> tuple[socket.socket, str]:
        sock = self.connect(source=source)
        return sock, handshake(sock, chid, recvers, timeout, senders)

    def workers(self) -> list[int]:
        return self.pids()[1:]

    def ctl(self, *args: str, check: bool = True,
            preexec: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
        """Run fwd-ctl against this server's control socket."""
        done = subprocess.run([sys.executable, "-m", "fwd.ctl", "--control", self.control,
                               *args], capture_output=True, text=True, timeout=30,
                              preexec_fn=preexec)
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl(*args, "--json").stdout)

    def worker_of(self, sock: socket.socket) -> int:
        """The worker process that holds the server side of ``sock``'s connection.
        Right after a move the worker it left may not have closed its
        descriptor yet (it does on its next loop iteration): wait for one."""
        port = sock.getsockname()[1]
        inodes = {t.inode for t in tcp_sockets()
                  if t.remote_port == port and t.local_port == self.port}
        holders: list[int] = []

        def one() -> bool:
            holders[:] = [w for w in self.workers() if inodes & socket_inodes(w)]
            return len(holders) == 1

        wait_until(one, 10, f"one worker holding port {port}'s connection")
        return holders[0]


@pytest.fixture
def impl(request: pytest.FixtureRequest) -> str:
    """Which data path the server runs; tests marked ``both_impls`` run both."""
    return getattr(request, "param", "cython")


@pytest.fixture
def start_server(impl: str) -> Iterator[Callable[..., Server]]:
    """Factory: ``start_server("--mode", "chan", env=..., preexec=...)``."""
    servers: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None,
              preexec: Callable[[], None] | None = None, log_level: str = "debug") -> Server:
        env = dict(env or {})
        if impl == "python":
            env["FWD_PURE_PYTHON"] = "1"
        if "--workers" not in args:
            args = ("--workers", str(WORKERS), *args)
        server = Server(["--listen", "127.0.0.1:0", "--log-level", log_level, *args],
                        env=env, preexec=preexec)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def chan_server(start_server: Callable[..., Server]) -> Server:
    return start_server("--mode", "chan")


@pytest.fixture
def bcast_server(start_server: Callable[..., Server]) -> Server:
    return start_server("--mode", "broadcast")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Tests marked both_impls run against the compiled loop and its Python twin.
    if "impl" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_impls"):
        metafunc.parametrize("impl", ["cython", "python"], indirect=True)
