"""The parent process: listeners, the acceptor, and supervision of workers.

Shaped after gunicorn's arbiter. Workers are started as fresh interpreters
(``python -m fwd.worker``), not forked, so they inherit no event loop, thread or
ZeroMQ context from the parent, and a worker restarted after a crash is built
exactly like the first one. Each worker gets one Unix SEQPACKET channel: the
parent sends the configuration on it first (never on the command line, where a
password would be visible), then one message per client socket; the worker
answers ``ready`` once it serves.

A worker that dies after ``ready`` is restarted at once. One of the first
workers that dies before it ever became ready cannot boot, and the server
stops with a clear message instead of restarting it in a loop; a
replacement that does (killed too, out of memory) is started again after a
growing pause, since stopping would cut the sessions of every other worker.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import functools
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import control, fdpass
from .acceptor import Acceptor, describe, open_listeners
from .config import Config, address_key, format_hostport
from .coordinator import Coordinator
from .protocol import FULL, NOT_ALLOWED, PER_IP, RESTARTING, SHUTDOWN, refusal_line
from .registry import Owner
from .sdnotify import Notifier

if TYPE_CHECKING:
    from .metrics import MetricsServer, ParentMetrics

log = logging.getLogger("fwd.arbiter")
T = TypeVar("T")

KILL_MARGIN = 3.0
"""Seconds past ``--drain-timeout`` before workers that still run are killed."""
WORKER_ANSWER = 2.0
"""How long a control request waits for each worker (a stopped one is reported, not waited on)."""
WATCH_EVERY = 1.0
"""Seconds between looks at how long each worker has been silent (worker.BEAT)."""
LATE = 3.0
"""Seconds of silence after which a worker gets no new connections while
another one answers, and /healthz says so: three beats missed."""
RESPAWN_PAUSE = 1.0
"""Seconds before a replacement that died before ``ready`` is started again;
doubled for each one after it, up to RESPAWN_PAUSE_MAX."""
RESPAWN_PAUSE_MAX = 30.0
PARK_WAIT = 10.0
"""Seconds a connection waits for a worker while every worker is being
restarted (a replacement starts in milliseconds); then it gets ``server
restarting``."""
_SUMMED = ("connections", "rejected", "bytes_in", "bytes_out", "dropped_bytes",
           "slow_disconnects", "handshake_failures", "cross_worker_bytes", "full_notices", "kicked",
           "sessions_chan", "sessions_broadcast", "pumped_pairs", "throttled")


class _WorkerProtocol(asyncio.SubprocessProtocol):
    def __init__(self, arbiter: Arbiter, wid: int) -> None:
        self.arbiter = arbiter
        self.wid = wid

    def process_exited(self) -> None:
        self.arbiter.loop.call_soon(self.arbiter.worker_exited, self.wid)


BUSIEST = 5
"""Addresses with the most connections that ``status`` names (--max-conns-per-ip)."""


@dataclasses.dataclass
class Worker:
    wid: int
    pid: int
    transport: asyncio.SubprocessTransport
    channel: socket.socket
    handoff: fdpass.Handoff
    ready: bool = False
    exited: bool = False
    conns: int = 0
    heard: float = 0.0  # loop time of its last note (worker.BEAT), or of its start
    late: bool = False  # silent for LATE: new connections go to the others
    killed: bool = False  # silent for --worker-timeout
    # --max-conns-per-ip: its connections by address_key; they go with it when it dies.
    addresses: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def count_out(self, peer: str) -> None:
        key = address_key(peer)
        if self.addresses[key] <= 1:
            del self.addresses[key]
        else:
            self.addresses[key] -= 1


class Arbiter:
    """Owns the listeners and keeps ``config.workers`` workers running."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.filter = config.address_filter()
        self.loop = asyncio.get_running_loop()
        self.workers: dict[int, Worker] = {}
        self.stopping = False
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._all_exited = asyncio.Event()
        # SIGHUP too: a closed terminal drains the server, as Ctrl-C does.
        # First of all: a signal from here on must remove the run directory.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self._signalled)
        self._rr = itertools.cycle(range(config.workers))
        self._incarnations = itertools.count(1)  # every start of a worker gets the next
        self._served: set[int] = set()  # worker slots that had a ready worker
        self._boot_failures: collections.Counter[int] = collections.Counter()  # in a row, per slot
        self.acceptor: Acceptor | None = None
        # Connections waiting while every worker restarts (_park).
        self._parked: list[tuple[socket.socket, tuple[str, int]]] = []
        self._park_timer: asyncio.TimerHandle | None = None
        self.refused = 0
        self._last_refusal_log = -1e9
        self._reloads = self._installed = 0  # reloads begun; the newest one installed
        # ZeroMQ ipc endpoints live here, private to this server, removed at exit.
        self.rundir = tempfile.mkdtemp(prefix="fwd-")
        self.coordinator: Coordinator | None = None
        self.control: control.ControlServer | None = None
        self.metrics: ParentMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        self.started = self.loop.time()
        self.listening: list[str] = []
        self._watched = self.started
        # Read now, before any worker starts: they must not inherit it.
        self.notifier = Notifier()
        self._announced = False

    async def run(self) -> int:
        try:
            return await self._run()
        finally:
            if self.coordinator is not None:
                self.coordinator.close()
            if self.control is not None:
                await self.control.close()
            if self.metrics_server is not None:
                await self.metrics_server.close()
            self.notifier.close()
            shutil.rmtree(self.rundir, ignore_errors=True)

    async def _run(self) -> int:
        listeners = open_listeners(self.config.listen, self.config.tcp_congestion)
        self.listening = describe(listeners).split(",")
        log.debug("run directory %s", self.rundir)
        path = self.config.control
        if path is None:
            path = control.default_path(listeners[0].getsockname()[1])
        if path != "none":
            self.control = control.ControlServer(path, self.serve_control)
            await self.control.start()  # OSError: in use by another server
        if self.config.metrics is not None:
            from .metrics import MetricsServer, ParentMetrics, prepare

            prepare(self.rundir)  # before any worker starts: they inherit it
            self.metrics = ParentMetrics(self.config.workers)
            self.metrics_server = MetricsServer(*self.config.metrics, self.render_metrics,
                                                self.health)
            host, port = await self.metrics_server.start()
            log.info("metrics on http://%s/metrics", format_hostport(host, port))
        if self.config.workers > 1:
            self.coordinator = Coordinator(self.loop, self.config.workers, self.rundir)
        for wid in range(self.config.workers):
            if self._stop.is_set():  # a signal while they start: stop at once
                break
            await self.spawn(wid)
        if not self._stop.is_set():
            self.acceptor = Acceptor(self.loop, listeners, self.dispatch)
            self.acceptor.start()
            self._announce()  # the workers may all be ready already
            self._watched = self.loop.time()
            self.loop.call_later(WATCH_EVERY, self._watch)
            log.info("listening on %s mode=%s workers=%d password=%s control=%s",
                     describe(listeners), self.config.mode, self.config.workers,
                     "on" if getattr(self.config, "password", None) else "off",
                     self.control.path if self.control is not None else "none")
        await self._stop.wait()
        await self._shutdown()
        return self.exit_code

    def stop(self) -> None:
        self._stop.set()

    def _signalled(self) -> None:
        """The first signal drains; a second one (Ctrl-C again) cuts the drain
        short: the workers reset what they still flush and exit. That one is
        SIGUSR1, not a second SIGTERM, which a worker that has not handled the
        first yet would merge with it (signals do not queue)."""
        if self.stopping:
            log.warning("second stop signal: not waiting for the drain")
            for w in self.workers.values():
                if not w.exited:
                    try:
                        w.transport.send_signal(signal.SIGUSR1)
                    except ProcessLookupError:  # pragma: no cover - exited meanwhile
                        pass
        self.stop()

    # -- workers ---------------------------------------------------------------

    async def spawn(self, wid: int) -> None:
        if self.stopping:  # a restart that came too late
            return
        parent, child = fdpass.channel_pair()
        try:
            transport, _ = await self.loop.subprocess_exec(
                lambda: _WorkerProtocol(self, wid),
                sys.executable, "-m", "fwd.worker", str(wid), str(child.fileno()),
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=None, stderr=None,
            )
        finally:
            child.close()
        incarnation = next(self._incarnations)
        if self.coordinator is not None:
            self.coordinator.worker_started(wid, incarnation)
        parent.send(fdpass.pack({**dataclasses.asdict(self.config), "rundir": self.rundir,
                                 "incarnation": incarnation, "parent": os.getpid()}))
        worker = Worker(wid, transport.get_pid(), transport, parent,
                        fdpass.Handoff(self.loop, parent), heard=self.loop.time())
        worker.handoff.on_drop = functools.partial(self._handoff_failed, worker)
        worker.handoff.on_gone = functools.partial(self._handed_back, worker)
        worker.handoff.on_lost = self._lost_on_arrival
        self.workers[wid] = worker
        self.loop.add_reader(parent, self._from_worker, worker)
        log.debug("worker %d started pid=%d", wid, worker.pid)
        if self._parked:
            self._unpark()
        if self.stopping:  # the drain began while it started: it drains too
            with contextlib.suppress(ProcessLookupError):
                transport.send_signal(signal.SIGTERM)

    def _from_worker(self, worker: Worker, drain: bool = False) -> None:
        for _ in range(fdpass.BATCH if drain else 1):
            if worker.exited or not self._one_from_worker(worker):
                return

    def _one_from_worker(self, worker: Worker) -> bool:
        try:
            message, fds, flags, _ = socket.recv_fds(worker.channel, 65536, 1)
        except BlockingIOError:
            return False
        except OSError:
            message, fds, flags = b"", [], 0
        if message:
            self._heard(worker)
        if flags & socket.MSG_CTRUNC:  # we are out of descriptors: a moving session is lost
            for fd in fds:
                os.close(fd)
            self._handoff_failed(worker, fdpass.unpack(message)[0],
                                 OSError(errno.EMFILE, "out of descriptors"))
        elif fds:
            self._forward_moved(worker, socket.socket(fileno=fds[0]), message)
        elif message[:1] == fdpass.CONFIRM:  # it took these: our copies may go
            worker.handoff.confirm(message[1:])
        elif message[:1] == b"x":  # one "x" per connection of it that ended
            worker.conns = max(worker.conns - len(message), 0)
        elif message[:1] == b"g":  # the same, one peer per line (--max-conns-per-ip)
            peers = message[1:].decode("utf-8", "replace").split("\n")
            worker.conns = max(worker.conns - len(peers), 0)
            for peer in peers:
                worker.count_out(peer)
        elif message == b"ready":
            worker.ready = True
            self._served.add(worker.wid)
            self._boot_failures.pop(worker.wid, None)
            log.info("worker %d ready pid=%d", worker.wid, worker.pid)
            self._announce()
        elif not message:
            self.loop.remove_reader(worker.channel)
            return False
        return True

    def _announce(self) -> None:
        """Tell systemd (Type=notify) the server is up, once: when every
        worker serves for the first time, not when the port opens, so that
        what it starts after fwd finds it serving."""
        if self._announced or not self.notifier or self.stopping or self.acceptor is None:
            return
        if sum(w.ready for w in self.workers.values()) < self.config.workers:
            return
        self._announced = True
        n = self.config.workers
        self.notifier.send("READY=1", f"MAINPID={os.getpid()}",
                           f"STATUS=listening on {','.join(self.listening)}, "
                           f"{n} worker{'s' if n != 1 else ''}")
        if self.notifier.watchdog:
            self._ping()

    def _ping(self) -> None:
        """WATCHDOG=1 while this loop turns: systemd restarts a server whose
        parent hangs (WatchdogSec=), which --worker-timeout cannot see."""
        if self.stopping:
            return
        self.notifier.send("WATCHDOG=1")
        assert self.notifier.watchdog is not None
        self.loop.call_later(self.notifier.watchdog, self._ping)

    def _heard(self, worker: Worker) -> None:
        now = self.loop.time()
        if worker.late and not worker.killed:
            log.warning("worker %d (pid %d) answers again after %.1f s", worker.wid, worker.pid,
                        now - worker.heard)
        worker.heard, worker.late = now, False

    def _watch(self) -> None:
        """Find workers whose event loop stopped turning (a hang, SIGSTOP, a
        debugger): a connection handed to one waits with it, so new ones go to
        the others; one silent for --worker-timeout is killed, and restarted
        as any worker that dies (gunicorn's --timeout does the same)."""
        if self.stopping:
            return
        self.loop.call_later(WATCH_EVERY, self._watch)
        now = self.loop.time()
        stalled, self._watched = now - self._watched > WATCH_EVERY + LATE / 2, now
        timeout = self.config.worker_timeout
        for w in self.workers.values():
            if w.exited or w.killed:
                continue
            self._from_worker(w, drain=True)  # their notes may wait behind ours
            if stalled:  # we did not run ourselves: their silence is ours
                w.heard = now
            silent = now - w.heard
            if timeout and silent >= timeout:
                log.error("worker %d (pid %d) %s for %.1f s: killing it (--worker-timeout)",
                          w.wid, w.pid, "silent" if w.ready else "not ready", silent)
                w.killed = True
                if self.metrics is not None:
                    self.metrics.timeouts.inc()
                with contextlib.suppress(ProcessLookupError):
                    w.transport.kill()
            elif w.ready and silent >= LATE and not w.late:
                w.late = True
                log.warning("worker %d (pid %d) has not answered for %.1f s: new connections "
                            "go to the others", w.wid, w.pid, silent)

    def _forward_moved(self, source: Worker, sock: socket.socket, message: bytes) -> None:
        """A worker hands a session to the worker its receivers live on."""
        meta, data = fdpass.unpack(message)
        moved = meta.get("adopt")
        peer = fdpass.peer_of(meta)
        source.conns = max(source.conns - 1, 0)
        if self.config.max_conns_per_ip:
            source.count_out(peer)
        target = self.workers.get(meta.pop("to", -1))
        if target is not None and target.late and not target.exited and not source.exited:
            # Silent (stopped, hung): it gets no new connections, nor sessions
            # that would wait there for it; this one stays where it was.
            target = source
        if target is None or target.exited:
            sock.close()  # that worker is restarting: the client sees the connection end
            if moved is not None and self.coordinator is not None:
                self.coordinator.release(moved["chid"], source.wid, moved["token"])
            return
        target.conns += 1
        if self.config.max_conns_per_ip:
            target.addresses[address_key(peer)] += 1
        if moved is not None and self.coordinator is not None:
            # Until its move arrives, the chid stays with its old owner: freed
            # if the target dies before (Coordinator.worker_lost).
            self.coordinator.moving(moved["chid"], Owner(source.wid, moved["token"]), target.wid)
        target.handoff.send(sock, meta, data)

    def _handoff_failed(self, worker: Worker, meta: dict[str, Any], exc: OSError) -> None:
        """A socket lost between us and a live worker: the kernel would not pass
        it (ETOOMANYREFS: the descriptors in flight to a stalled worker reached
        our RLIMIT_NOFILE), or dropped the one a worker moved to us (EMFILE: we
        are out of descriptors). Count it out, as refused, so that its slots
        come back, and free the chid of a session that was moving."""
        worker.conns = max(worker.conns - 1, 0)
        if self.config.max_conns_per_ip:
            worker.count_out(fdpass.peer_of(meta))
        moved = meta.get("adopt")
        if moved is not None and self.coordinator is not None:
            self.coordinator.lost_on_the_way(moved["chid"], Owner(moved["from"], moved["token"]),
                                             worker.wid)
        peer = fdpass.peer_of(meta)
        self._refused("lost connection from %s in a hand-off with worker %d (%s)", peer,
                      worker.wid, errno.errorcode.get(exc.errno or 0, exc), peer=peer)

    def _lost_on_arrival(self, sock: socket.socket, meta: dict[str, Any]) -> None:
        """A socket whose descriptor a worker could not take (it is out of
        descriptors): the worker counted it out and logged it. Our copy lets
        the client hear why, as when we are full. A session that was moving
        waits for its hs4, which with a password only its old worker could
        encrypt: it is only closed, as before the hand-off."""
        if "adopt" in meta:
            sock.close()
        else:
            self._refuse(sock, FULL)

    def _handed_back(self, worker: Worker, sock: socket.socket, meta: dict[str, Any],
                     data: bytes) -> None:
        """A socket that never reached ``worker``: it died (its exit may not be
        handled yet). A new connection goes to another worker, as if just
        accepted, instead of being reset without a word; a session that was
        moving there is lost, as with the worker's own sessions."""
        worker.conns = max(worker.conns - 1, 0)
        if self.config.max_conns_per_ip:
            worker.count_out(fdpass.peer_of(meta))
        moved = meta.get("adopt")
        if moved is not None:
            sock.close()
            if self.coordinator is not None:
                self.coordinator.lost_on_the_way(
                    moved["chid"], Owner(moved["from"], moved["token"]), worker.wid)
            return
        try:
            peer = sock.getpeername()[:2]
        except OSError:  # the client is gone too
            sock.close()
            return
        if self.stopping:  # never read: it may still hear why
            self._refuse(sock, SHUTDOWN)
            return
        log.debug("connection from %s goes to another worker: worker %d is gone",
                  format_hostport(*peer), worker.wid)
        self.dispatch(sock, peer)

    def _park(self, sock: socket.socket, peer: tuple[str, int]) -> bool:
        """No worker runs, but one is on its way (every worker died, or hung,
        at once): the connection waits for it, as it would in a listen
        backlog, up to PARK_WAIT and --max-conns of them. False: refuse it."""
        if self.stopping or len(self._parked) >= self.config.max_conns:
            return False
        self._parked.append((sock, peer))
        if self._park_timer is None:
            self._park_timer = self.loop.call_later(PARK_WAIT, self._unpark, True)
        return True

    def _unpark(self, expired: bool = False) -> None:
        """A worker runs again: the waiting connections go to it. ``expired``,
        or at shutdown, they are told why not."""
        if self._park_timer is not None:
            self._park_timer.cancel()
            self._park_timer = None
        parked, self._parked = self._parked, []
        for sock, peer in parked:
            if expired or self.stopping:
                name = format_hostport(*peer)
                self._refuse(sock, SHUTDOWN if self.stopping else RESTARTING)
                self._refused("refusing connection from %s: %s", name,
                              "the server stops" if self.stopping else
                              f"no worker came back within {PARK_WAIT:g}s", peer=name)
            else:
                self.dispatch(sock, peer)

    def _refuse(self, sock: socket.socket, desc: str) -> None:
        """Close a connection at once that nothing read. Every client of a chan
        server, or one with a password, expects a handshake line first: it
        gets the FAIL line that says why."""
        if self.config.mode == "chan" or self.config.password:
            with contextlib.suppress(OSError):
                sock.send(refusal_line(desc))
        sock.close()

    def _refused(self, line: str, *args: Any, peer: str) -> None:
        """Count a connection closed at once; log it at most once a second."""
        self.refused += 1
        if self.metrics is not None:
            self.metrics.refused.inc()
        now = self.loop.time()
        if now - self._last_refusal_log >= 1.0:
            self._last_refusal_log = now
            log.warning(line + ", %d refused so far", *args, self.refused,
                        extra={"fields": {"event": "connection_refused", "peer": peer,
                                          "refused": self.refused}})

    def worker_exited(self, wid: int) -> None:
        worker = self.workers.get(wid)
        if worker is None or worker.exited:
            return
        # What it sent before it died still counts, first of all its notes
        # about sockets it took: one it used must not go to another worker.
        worker.late = False  # its last notes are no sign of life
        while self._one_from_worker(worker):
            pass
        worker.exited = True
        if self.coordinator is not None:
            self.coordinator.worker_lost(wid)
        code = worker.transport.get_returncode()
        if self.metrics is not None:
            self.metrics.worker_gone(worker.pid)
        self.loop.remove_reader(worker.channel)
        worker.handoff.close()
        worker.transport.close()
        if self.stopping:
            if all(w.exited for w in self.workers.values()):
                self._all_exited.set()
            return
        how = f"signal {-code}" if code is not None and code < 0 else f"status {code}"
        if not worker.ready and wid not in self._served:
            log.error("worker %d (pid %d) exited with %s before it was ready: it cannot "
                      "start, so the server stops", wid, worker.pid, how)
            self.exit_code = 1
            self.stop()
            return
        if self.metrics is not None:
            self.metrics.restarts.inc()
        if worker.ready:
            log.warning("worker %d (pid %d) exited with %s; its sessions are gone; restarting",
                        wid, worker.pid, how)
            self.loop.create_task(self.spawn(wid))
            return
        # A replacement that did not boot: the other workers serve meanwhile.
        failures = self._boot_failures[wid] = self._boot_failures[wid] + 1
        pause = min(RESPAWN_PAUSE * 2 ** (failures - 1), RESPAWN_PAUSE_MAX)
        log.error("worker %d (pid %d) exited with %s before it was ready (%d in a row); "
                  "starting it again in %g s", wid, worker.pid, how, failures, pause)
        self.loop.call_later(pause, self._respawn, wid)

    def _respawn(self, wid: int) -> None:
        if not self.stopping:
            self.loop.create_task(self.spawn(wid))

    # -- connections -----------------------------------------------------------

    def dispatch(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Hand a new client socket to the running worker with the fewest."""
        running = [w for w in self.workers.values() if not w.exited and not w.handoff.gone]
        name = format_hostport(*peer)
        per_ip = self.config.max_conns_per_ip
        key = address_key(name) if per_ip else ""

        def over() -> tuple[str, str] | None:
            """Why not, for the log and for the client's FAIL line."""
            total = sum(w.conns for w in running)
            if total >= self.config.max_conns:
                return f"{total} connections (--max-conns)", FULL
            if per_ip and (mine := sum(w.addresses[key] for w in running)) >= per_ip:
                return f"{mine} connections from {key} (--max-conns-per-ip)", PER_IP
            return None

        denied = self.filter.refuses(peer[0]) if self.filter else None
        if denied is not None:
            refused: tuple[str, str] | None = (denied, NOT_ALLOWED)
        elif not running:
            if self._park(sock, peer):
                return
            refused = ("every worker is restarting", RESTARTING)
        else:
            if over():
                for w in running:  # take in the "gone" notes already waiting, then decide
                    self._from_worker(w, drain=True)
            refused = over()
        if refused is not None:
            why, desc = refused
            self._refuse(sock, desc)
            self._refused("refusing connection from %s: %s", name, why, peer=name)
            return
        start, n = next(self._rr), self.config.workers  # rotate among equals
        # One that does not answer, or still boots (a replacement), would
        # leave the client waiting with it.
        serving = ([w for w in running if w.ready and not w.late]
                   or [w for w in running if not w.late] or running)
        worker = min(serving, key=lambda w: (w.conns, (w.wid - start) % n))
        worker.conns += 1
        if per_ip:
            worker.addresses[key] += 1
        worker.handoff.send(sock, {"peer": name})

    # -- control and metrics -----------------------------------------------------

    async def ask_workers(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """Every worker's reply, in worker order; a worker that is restarting or
        does not answer within WORKER_ANSWER gets an ``error`` entry instead."""
        async def one(w: Worker) -> dict[str, Any]:
            if w.exited or not w.ready:
                return {"worker": w.wid, "pid": None if w.exited else w.pid, "ok": False,
                        "error": "restarting"}
            try:
                reply = await control.ask(control.worker_path(self.rundir, w.wid), request,
                                          WORKER_ANSWER)
            except asyncio.TimeoutError:
                reply = control.error(f"no answer within {WORKER_ANSWER:g}s")
            except (OSError, ValueError, control.ControlError) as exc:
                reply = control.error(f"cannot ask it: {exc}")
            return {"worker": w.wid, "pid": w.pid, **reply}

        async def unborn(wid: int) -> dict[str, Any]:  # at start-up, before its spawn
            return {"worker": wid, "pid": None, "ok": False, "error": "restarting"}

        return list(await asyncio.gather(*(
            one(self.workers[wid]) if wid in self.workers else unborn(wid)
            for wid in range(self.config.workers))))

    async def serve_control(self, request: control.Request) -> dict[str, Any]:
        """fwd-ctl's requests (docs/PROTOCOL.md §9)."""
        if request.cmd == "drain":
            self.loop.call_soon(self.stop)  # after this reply is written
            return control.ok(drain_timeout=self.config.drain_timeout)
        if request.cmd in ("kick", "kick-peer"):
            key = "chid" if request.cmd == "kick" else "peer"
            replies = await self.ask_workers({"cmd": request.cmd, key: request.args[key]})
            kicked = sum(r.get("kicked", 0) for r in replies if r["ok"])
            if kicked:
                return control.ok(kicked=kicked)
            silent = [r["worker"] for r in replies if not r["ok"]]
            note = f" (workers {silent} did not answer)" if silent else ""
            return control.error(f"no session with {key} {request.args[key]!r}{note}")
        if request.cmd == "reload":
            return await self._reload()
        if request.cmd == "sessions":
            replies = await self.ask_workers({"cmd": "sessions"})
            rows = [row for r in replies if r["ok"] for row in r["sessions"]]
            return control.ok(sessions=rows, errors=_errors(replies))
        assert request.cmd == "status"
        return control.ok(**self._status(await self.ask_workers({"cmd": "status"})))

    async def _reload(self) -> dict[str, Any]:
        """Read --allow-file and --deny-file again: an operator blocks a network
        without a restart, which would cut every session. Connections already
        served stay (``kick --peer`` ends them); a file that does not read or
        parse leaves the filter as it was, as nginx keeps its configuration."""
        files = [f for f in (self.config.allow_file, self.config.deny_file) if f]
        # A reload that began on an older file and took longer must not
        # replace what a later one installed; nor may one whose read hangs
        # (a FIFO, a dead NFS mount) hold up the next: no lock, an order.
        self._reloads += 1
        started = self._reloads
        try:  # a long blocklist parses off the loop, which keeps accepting
            new = await self._off_loop(self.config.address_filter)
        except ValueError as exc:
            log.warning("reload failed, address filter unchanged: %s", exc)
            return control.error(f"reload failed, nothing changed: {exc}")
        if started < self._installed:
            log.warning("reload superseded by a later one, address filter unchanged")
            return control.error("reload superseded by a later one, nothing changed")
        self._installed = started
        self.filter = new
        allow = None if new.allow is None else len(new.allow)
        log.info("reloaded %s: allow %s, deny %d networks", " and ".join(files) or "nothing",
                 "any" if allow is None else allow, len(new.deny))
        return control.ok(files=files, allow=allow, deny=len(new.deny))

    def _off_loop(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """``call()`` in a thread of its own, a daemon: a read that never
        returns (a FIFO, a dead mount) holds only that thread, where it would
        take one of the loop's few executor threads for good, and the process
        can still exit."""
        future: asyncio.Future[T] = self.loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            if not future.done():
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)

        def run() -> None:
            try:
                result = call()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                self.loop.call_soon_threadsafe(done, None, exc)
            else:
                self.loop.call_soon_threadsafe(done, result, None)

        threading.Thread(target=run, name="fwd-reload", daemon=True).start()
        return future

    def _status(self, replies: list[dict[str, Any]]) -> dict[str, Any]:
        totals: collections.Counter[str] = collections.Counter()
        failures: collections.Counter[str] = collections.Counter()
        ends: collections.Counter[str] = collections.Counter()
        drops: collections.Counter[str] = collections.Counter()
        workers: list[dict[str, Any]] = []
        for r in replies:
            if not r["ok"]:
                workers.append({k: r[k] for k in ("worker", "pid", "error") if k in r})
                continue
            live = sum(r["live"].values())
            for key in _SUMMED:
                totals[key] += r["totals"].get(key, 0)
            totals["sessions"] += live
            totals["open_connections"] += r["open_connections"]
            totals["held_bytes"] += r["held_bytes"]
            totals["held_memory"] += r["held_memory"]
            totals["buffered_bytes"] += r["buffered_bytes"]
            totals["spliced_sessions"] += r["spliced_sessions"]
            totals["pumped_pairs_now"] += r["pumped_pairs"]
            failures.update(r["failures"])
            ends.update(r["ends"])
            drops.update(r["drops"])
            workers.append({"worker": r["worker"], "pid": r["pid"], "sessions": live,
                            "connections": r["open_connections"],
                            "bytes_in": r["totals"].get("bytes_in", 0),
                            "bytes_out": r["totals"].get("bytes_out", 0),
                            "uptime": r["uptime"]})
        totals["rejected"] += self.refused
        # Ends reach the parent a moment after the workers see them.
        totals["counted_connections"] = sum(w.conns for w in self.workers.values()
                                            if not w.exited)
        per_address: collections.Counter[str] = collections.Counter()
        for w in self.workers.values():
            if not w.exited:
                per_address.update(w.addresses)
        busiest = [[key, n] for key, n in per_address.most_common(BUSIEST) if n > 0]
        totals["sessions_total"] = (totals.pop("sessions_chan", 0)
                                    + totals.pop("sessions_broadcast", 0))
        return {"pid": os.getpid(), "uptime": round(self.loop.time() - self.started, 3),
                "mode": self.config.mode, "listen": self.listening, "workers": workers,
                "totals": dict(totals), "failures": dict(failures), "ends": dict(ends),
                "drops": dict(drops),
                "busiest_addresses": busiest}

    def health(self) -> str | None:
        """/healthz: None while every worker serves; else why not, for a 503."""
        if self.stopping:
            return "stopping"
        ready = sum(w.ready and not w.exited and not w.late for w in self.workers.values())
        if ready < self.config.workers:
            late = [str(w.wid) for w in self.workers.values() if w.late and not w.exited]
            return f"{ready} of {self.config.workers} workers ready" + (
                f" (not answering: worker {', '.join(late)})" if late else "")
        return None

    async def render_metrics(self) -> bytes:
        """/metrics: the workers flush their counters first, so a scrape is current."""
        assert self.metrics is not None
        await self.ask_workers({"cmd": "flush"})
        return self.metrics.render()

    # -- shutdown --------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop accepting, let workers drain, then make sure they are gone."""
        self.stopping = True
        if self.acceptor is not None:
            self.acceptor.stop()
        self._unpark()  # told: the server stops
        live = [w for w in self.workers.values() if not w.exited]
        workers = f"{len(live)} worker{'s' if len(live) != 1 else ''}"
        self.notifier.send("STOPPING=1", f"STATUS=draining {workers}")
        log.info("stopping: draining %s (up to %gs)", workers, self.config.drain_timeout)
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


def _errors(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"worker": r["worker"], "error": r["error"]} for r in replies if not r["ok"]]


def run(config: Config) -> int:
    import uvloop

    from .runtime import raise_fd_limit

    raise_fd_limit(config.max_conns)

    async def main() -> int:
        return await Arbiter(config).run()

    code: Any = uvloop.run(main())
    return int(code)
