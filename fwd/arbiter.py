"""The parent process: listeners, the acceptor, and supervision of workers.

Shaped after gunicorn's arbiter. Workers are started as fresh interpreters
(``python -m fwd.worker``), not forked, so they inherit no event loop, thread or
ZeroMQ context from the parent, and a worker restarted after a crash is built
exactly like the first one. Each worker gets one Unix SEQPACKET channel: the
parent sends the configuration on it first (never on the command line, where a
password would be visible), then one message per client socket; the worker
answers ``ready`` once it serves.

A worker that dies after ``ready`` is restarted at once; one that dies before
it ever became ready cannot boot, and the server stops with a clear message
instead of restarting it in a loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import signal
import socket
import subprocess
import sys
from typing import Any

from . import fdpass
from .acceptor import Acceptor, describe, open_listeners
from .config import Config

log = logging.getLogger("fwd.arbiter")

KILL_MARGIN = 3.0
"""Seconds past ``--drain-timeout`` before workers that still run are killed."""


class _WorkerProtocol(asyncio.SubprocessProtocol):
    def __init__(self, arbiter: Arbiter, wid: int) -> None:
        self.arbiter = arbiter
        self.wid = wid

    def process_exited(self) -> None:
        self.arbiter.loop.call_soon(self.arbiter.worker_exited, self.wid)


@dataclasses.dataclass
class Worker:
    wid: int
    pid: int
    transport: asyncio.SubprocessTransport
    channel: socket.socket
    handoff: fdpass.Handoff
    ready: bool = False
    exited: bool = False


class Arbiter:
    """Owns the listeners and keeps ``config.workers`` workers running."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.workers: dict[int, Worker] = {}
        self.stopping = False
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._all_exited = asyncio.Event()
        self._rr = itertools.cycle(range(config.workers))
        self.acceptor: Acceptor | None = None

    async def run(self) -> int:
        listeners = open_listeners(self.config.listen)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self.stop)
        for wid in range(self.config.workers):
            await self.spawn(wid)
        self.acceptor = Acceptor(self.loop, listeners, self.dispatch)
        self.acceptor.start()
        log.info("listening on %s mode=%s workers=%d password=%s", describe(listeners),
                 self.config.mode, self.config.workers,
                 "on" if getattr(self.config, "password", None) else "off")
        await self._stop.wait()
        await self._shutdown()
        return self.exit_code

    def stop(self) -> None:
        self._stop.set()

    # -- workers ---------------------------------------------------------------

    async def spawn(self, wid: int) -> None:
        parent, child = fdpass.channel_pair()
        try:
            transport, _ = await self.loop.subprocess_exec(
                lambda: _WorkerProtocol(self, wid),
                sys.executable, "-m", "fwd.worker", str(wid), str(child.fileno()),
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=None, stderr=None,
            )
        finally:
            child.close()
        parent.send(fdpass.pack(dataclasses.asdict(self.config)))
        worker = Worker(wid, transport.get_pid(), transport, parent,
                        fdpass.Handoff(self.loop, parent))
        self.workers[wid] = worker
        self.loop.add_reader(parent, self._from_worker, worker)
        log.debug("worker %d started pid=%d", wid, worker.pid)

    def _from_worker(self, worker: Worker) -> None:
        try:
            message = worker.channel.recv(64)
        except BlockingIOError:
            return
        except OSError:
            message = b""
        if message == b"ready":
            worker.ready = True
            log.info("worker %d ready pid=%d", worker.wid, worker.pid)
        elif not message:
            self.loop.remove_reader(worker.channel)

    def worker_exited(self, wid: int) -> None:
        worker = self.workers.get(wid)
        if worker is None or worker.exited:
            return
        worker.exited = True
        code = worker.transport.get_returncode()
        self.loop.remove_reader(worker.channel)
        worker.handoff.close()
        worker.transport.close()
        if self.stopping:
            if all(w.exited for w in self.workers.values()):
                self._all_exited.set()
            return
        how = f"signal {-code}" if code is not None and code < 0 else f"status {code}"
        if not worker.ready:
            log.error("worker %d (pid %d) exited with %s before it was ready: it cannot "
                      "start, so the server stops", wid, worker.pid, how)
            self.exit_code = 1
            self.stop()
            return
        log.warning("worker %d (pid %d) exited with %s; its sessions are gone; restarting",
                    wid, worker.pid, how)
        self.loop.create_task(self.spawn(wid))

    # -- connections -----------------------------------------------------------

    def dispatch(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Hand a new client socket to the next worker that is running."""
        for _ in range(self.config.workers):
            worker = self.workers.get(next(self._rr))
            if worker is not None and not worker.exited:
                worker.handoff.send(sock, {"peer": list(peer)})
                return
        sock.close()  # every worker is restarting: the client may retry

    # -- shutdown --------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop accepting, let workers drain, then make sure they are gone."""
        self.stopping = True
        if self.acceptor is not None:
            self.acceptor.stop()
        live = [w for w in self.workers.values() if not w.exited]
        log.info("stopping: draining %d workers (up to %gs)", len(live),
                 self.config.drain_timeout)
        for w in live:
            try:
                w.transport.send_signal(signal.SIGTERM)
            except ProcessLookupError:  # pragma: no cover - exited meanwhile
                pass
        if live:
            try:
                await asyncio.wait_for(self._all_exited.wait(),
                                       self.config.drain_timeout + KILL_MARGIN)
            except asyncio.TimeoutError:
                for w in self.workers.values():
                    if not w.exited:
                        log.warning("worker %d did not stop in time: killing it", w.wid)
                        w.transport.kill()
                await self._all_exited.wait()
        log.info("stopped")


def run(config: Config) -> int:
    import uvloop

    from .runtime import raise_fd_limit

    raise_fd_limit(config.max_conns)

    async def main() -> int:
        return await Arbiter(config).run()

    code: Any = uvloop.run(main())
    return int(code)
