"""The parent's side of the ZeroMQ layer: one chid registry for all workers.

Claims are serialised here, so a chid is unique server-wide however many
workers see the same hs1 at once. Each worker also learns from here where the
live chids its sessions name are, and when they end (one ordered pipe per
worker), which is what lets it route bytes to a receiver on another worker.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging

import zmq

from . import mesh
from .errors import ChidInUse
from .registry import Owner, Registry, Watch, incarnation
from .runtime import logval

log = logging.getLogger("fwd.coordinator")

_TOKEN_ARG = {mesh.CLAIM: 2, mesh.LIVE: 1, mesh.MOVE: 3, mesh.WANT: 2}
"""Where the sender's own session token is among a message's frames."""


class Coordinator:
    def __init__(self, loop: asyncio.AbstractEventLoop, workers: int, rundir: str) -> None:
        self.registry = Registry(workers)
        self.workers = workers
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker reuses its identity
        # A ROUTER drops what exceeds its high-water mark: location events must
        # never be lost, so the mark is far above any backlog a live worker has.
        sock.setsockopt(zmq.SNDHWM, mesh.CONTROL_HWM)
        sock.bind(mesh.registry_address(rundir))
        self.reader = mesh.Reader(loop, sock, self._handle)
        self._questions: list[tuple[int, bytes, list[bytes]]] = []
        self._outboxes = [mesh.Outbox(loop, functools.partial(self._send, b"w%d" % wid))
                          for wid in range(workers)]
        # The incarnation of each worker that runs now (None between a death and
        # the next start): what an earlier one still had on its way is stale.
        self._running: list[int | None] = [None] * workers
        # Sessions on their way to a worker (Arbiter._forward_moved), by that
        # worker: chid -> the owner that still holds it until its move arrives.
        self._transit: list[dict[str, Owner]] = [{} for _ in range(workers)]

    def _send(self, ident: bytes, frames: list[bytes]) -> None:
        try:
            self.reader.sock.send_multipart([ident, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:  # that worker is gone
            pass
        self.reader.kick()

    def _to(self, wid: int, *frames: bytes) -> None:
        self._outboxes[wid].put(*frames)

    def _others(self, wid: int, *frames: bytes) -> None:
        for w in range(self.workers):
            if w != wid:
                self._to(w, *frames)

    def _handle(self, frames: list[bytes]) -> None:
        wid = int(frames[0][1:])
        for kind, args in mesh.unbatch(frames, 1):
            self._one(wid, kind, args)

    def _stale(self, wid: int, kind: bytes, args: list[bytes]) -> bool:
        """Sent by a worker that died before this was acted on: its claims and
        moves must not hold chids for its successor."""
        token = _TOKEN_ARG.get(kind)
        if token is None or incarnation(int(args[token])) == self._running[wid]:
            return False
        log.debug("dropping %s from a dead worker %d", kind.decode(), wid)
        return True

    def _one(self, wid: int, kind: bytes, args: list[bytes]) -> None:
        if self._stale(wid, kind, args):
            return
        if kind in (mesh.CLAIM, mesh.PLACE):
            # Questions wait until what is already here is read: a release
            # sent before a competing claim, or a session's live notice sent
            # before its client opened the next session, but read after it
            # (ZeroMQ reads the workers' pipes in turn), must count.
            self._questions.append((wid, kind, args))
            if len(self._questions) == 1:
                self.reader.loop.call_soon(self._answer)
        elif kind == mesh.LIVE:
            log.debug("chid=%s live on worker %d", logval(args[0].decode()), wid)
            recvers = tuple(json.loads(args[2]))
            notices, watches = self.registry.go_live(args[0].decode(), Owner(wid, int(args[1])),
                                                     recvers)
            told = 0
            for to, chid, at in notices:
                # Where the new session lives, and whom it hears (hs3 senders).
                just_live = chid == args[0].decode()
                told += just_live
                self._to(to, mesh.LOC, chid.encode(), b"%d" % at,
                         args[3] if just_live else mesh.NOT_JUST_LIVE)
            # Each worker told answers its worker with ``sent`` behind what it held.
            self._to(wid, mesh.EXPECT, args[0], b"%d" % told)
            self._watch(watches)
        elif kind == mesh.RELEASE:
            self.release(args[0].decode(), wid, int(args[1]))
        elif kind == mesh.WANT:
            chid, delta = args[0].decode(), int(args[1])
            self.registry.want(wid, (chid,), delta)
            if delta > 0:  # it may be live elsewhere already
                where, watches = self.registry.locate(wid, (chid,))
                for c, at in where.items():
                    self._to(wid, mesh.LOC, c.encode(), b"%d" % at, mesh.NOT_JUST_LIVE)
                self._watch(watches)
        elif kind == mesh.MOVE:
            chid = args[0].decode()
            old = Owner(int(args[1]), int(args[2]))
            self._transit[wid].pop(chid, None)
            if not self.registry.move(chid, old, Owner(wid, int(args[3]))):
                # Taken over (or its worker died) while it moved: end it.
                self._to(wid, mesh.EVICT, args[0], args[3], b"a takeover")
        # HELLO only makes the ROUTER know the worker's identity: a new worker
        # has no session, so there is nothing to tell it yet.

    def _watch(self, watches: list[Watch]) -> None:
        for worker, chid, token in watches:
            self._to(worker, mesh.WATCH, chid.encode(), b"%d" % token)

    def _gone(self, chid: str, old: Owner) -> None:
        for w in self.registry.ended(chid, old):
            self._to(w, mesh.GONE, chid.encode(), b"%d" % old.worker)

    def _answer(self) -> None:
        self.reader.drain()  # take in every release and live notice already here
        questions, self._questions = self._questions, []
        for wid, kind, args in questions:
            if self._stale(wid, kind, args):  # it died while its question waited
                continue
            if kind == mesh.CLAIM:
                self._claim(wid, *args)
            else:
                self._place(wid, *args)

    def _claim(self, wid: int, req: bytes, chid: bytes, token: bytes, takeover: bytes,
               peer: bytes) -> None:
        owner = Owner(wid, int(token))
        try:
            got, evicted = self.registry.claim(chid.decode() or None, owner,
                                               takeover=takeover == b"1")
        except ChidInUse:
            self._to(wid, mesh.INUSE, req, chid)
            return
        if evicted is not None:
            self._gone(got, evicted)
            self._to(evicted.worker, mesh.EVICT, got.encode(), b"%d" % evicted.token, peer)
        # Where sessions that name it live: a hint for its placement at hs3.
        home = self.registry.wanted_home(got)
        self._to(wid, mesh.CLAIMED, req, got.encode(), b"%d" % (-1 if home is None else home))

    def _place(self, wid: int, req: bytes, chid: bytes, recvers_json: bytes) -> None:
        recvers = json.loads(recvers_json)
        name = chid.decode() or None
        home = self.registry.home(name, recvers, wid)
        if name is not None and home is not None and home != wid:
            self.registry.heading(name, home)
        # The asker learns where the named chids are before the session goes live.
        where, watches = self.registry.locate(wid, recvers)
        self._to(wid, mesh.PLACED, req, b"%d" % (-1 if home is None else home),
                 json.dumps(where).encode())
        self._watch(watches)

    def release(self, chid: str, wid: int, token: int) -> None:
        """Free a chid on a worker's behalf (its session died in transit)."""
        old = Owner(wid, token)
        if self.registry.release(chid, old):
            self._gone(chid, old)

    def worker_started(self, wid: int, incarnation: int) -> None:
        self._running[wid] = incarnation

    def moving(self, chid: str, old: Owner, to: int) -> None:
        """A session holding ``chid`` as ``old`` is on its way to worker ``to``."""
        self._transit[to][chid] = old

    def lost_on_the_way(self, chid: str, old: Owner, to: int) -> None:
        """A session moving to worker ``to`` lost its socket in the hand-off:
        free its chid now, and forget that it was on its way."""
        if self._transit[to].get(chid) == old:
            del self._transit[to][chid]
        self.release(chid, old.worker, old.token)

    def worker_lost(self, wid: int) -> None:
        """Free a dead worker's chids, and those of sessions that were on their
        way to it (they died with it), and tell the others."""
        self._running[wid] = None
        for chid, old in self._transit[wid].items():
            self.release(chid, old.worker, old.token)  # ignored if it moved meanwhile
        self._transit[wid].clear()
        self.registry.worker_lost(wid)
        self._outboxes[wid].drop()  # answers to the dead must not reach its successor
        self._others(wid, mesh.DEAD, b"%d" % wid)

    def close(self) -> None:
        self.reader.close()
        self.ctx.term()
