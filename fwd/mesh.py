"""The ZeroMQ layer between processes: what a worker says to the coordinator
(chid claims, live/release notices) and to the other workers (bytes for their
receivers, and backpressure signals).

Topology, all over ipc:// sockets in a private run directory:

* worker DEALER (identity ``w<N>``) <-> coordinator ROUTER in the parent:
  requests, and the coordinator's answers and chid location events. One pipe
  per worker, so every worker sees location events in the order they happened.
* worker PUSH -> PULL of every other worker: stream bytes, backpressure signals
  and the sleep protocol (Hub.when_awake). One pipe per ordered
  pair of workers keeps each sender's bytes in order. Sends never block: a
  full pipe (high-water mark) pauses the senders that route through it.

Frames are bytes; the first names the message kind. Coordinator messages
travel in batches: every message one side has for the other in one event-loop
iteration goes out as one ZeroMQ message, kind after kind, each kind with a
fixed number of frames (ARITY). Under load that turns many sends, each waking
ZeroMQ's I/O threads on both sides, into one.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import zmq

log = logging.getLogger("fwd.mesh")

# worker -> coordinator
HELLO, CLAIM, LIVE, RELEASE, MOVE, PLACE, WANT = (
    b"hello", b"claim", b"live", b"release", b"move", b"place", b"want")
# coordinator -> worker
CLAIMED, INUSE, PLACED, EVICT, LOC, GONE, DEAD, WATCH, EXPECT = (
    b"claimed", b"inuse", b"placed", b"evict", b"loc", b"gone", b"dead", b"watch", b"expect")
# worker -> worker
TO, ALL, FULL, DRAIN, HELD = b"to", b"all", b"full", b"drain", b"held"
STREAM = (TO, ALL, HELD)
SLEEP, WAKE, AWAKE, SENT = b"sleep", b"wake", b"awake", b"sent"

ARITY = {HELLO: 0, CLAIM: 5, LIVE: 4, RELEASE: 2, MOVE: 4, PLACE: 3, WANT: 3,
         CLAIMED: 3, INUSE: 2, PLACED: 3, EVICT: 3, LOC: 3, GONE: 2, DEAD: 1, WATCH: 2,
         EXPECT: 2}
"""Frames after the kind, per coordinator message kind."""

PIPE_HWM = 64
"""Messages queued per worker-to-worker pipe (each at most one 256 KiB read)."""
CONTROL_HWM = 1_000_000
"""Coordinator <-> worker messages queued before ZeroMQ would drop (ROUTER) or
stall: small messages, so this bounds memory at tens of MB for a stuck worker."""
BATCH = 256
"""Messages handled per wake-up before yielding to the event loop."""
STUCK_AFTER = 3.0
"""Seconds a peer may leave its full pipe unread before the senders here stop
waiting for it (arbiter.LATE, after which the parent sends it no new
connection either): a stopped or hung worker would hold up, until
--worker-timeout, every sender that writes to everyone or to a chid of it."""


NOT_JUST_LIVE = b""
"""The last frame of a ``loc`` for a chid that did not just go live. For one
that did, it holds the session's hs3 senders (JSON, null for anyone): a
session waiting for that chid must know whether its bytes were heard, and the
worker answers ``sent`` once it has passed on what it held for it."""


def registry_address(rundir: str) -> str:
    return f"ipc://{rundir}/registry"


def worker_address(rundir: str, wid: int) -> str:
    return f"ipc://{rundir}/w{wid}"


def _ignore(frames: list[bytes]) -> None:
    """PUSH sockets receive nothing; their reader only watches writability."""


class Reader:
    """Feed a ZeroMQ socket's messages to a callback from an asyncio loop.

    ZeroMQ's FD is edge-triggered and also signals writability, so every
    wake-up drains until EVENTS says there is nothing more, in bounded batches.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket,
                 on_message: Callable[[list[bytes]], None],
                 on_writable: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.sock = sock
        self.on_message = on_message
        self.on_writable = on_writable
        self.fd: int = int(sock.getsockopt(zmq.FD))
        self._scheduled = False
        self.closed = False
        loop.add_reader(self.fd, self.drain)

    def drain(self) -> None:
        self._scheduled = False
        if self.closed:  # a look scheduled before close
            return
        sock = self.sock
        events = int(sock.getsockopt(zmq.EVENTS))
        if self.on_writable is not None and events & zmq.POLLOUT:
            self.on_writable()
        for _ in range(BATCH):
            if not events & zmq.POLLIN:
                return
            frames = sock.recv_multipart(zmq.NOBLOCK)
            try:
                self.on_message(frames)
            except Exception:  # a bug: the messages behind this one still go
                log.exception("handling a message (%r...) failed", frames[0][:16])
            events = int(sock.getsockopt(zmq.EVENTS))
        self.kick()

    def kick(self) -> None:
        """Look again soon: a send can consume the edge that announced input."""
        if not self._scheduled and not self.closed:
            self._scheduled = True
            self.loop.call_soon(self.drain)

    def close(self) -> None:
        self.closed = True
        self.loop.remove_reader(self.fd)
        self.sock.close(linger=0)


def unbatch(frames: list[bytes], start: int = 0) -> Iterator[tuple[bytes, list[bytes]]]:
    """The (kind, frames) of each message in a batch, in order."""
    end = len(frames)
    while start < end:
        kind = frames[start]
        nxt = start + 1 + ARITY[kind]
        yield kind, frames[start + 1:nxt]
        start = nxt


class Outbox:
    """Coordinator messages for one peer, sent as one batch when the event loop
    has run what is ready now: order is kept and no message waits for I/O."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 send: Callable[[list[bytes]], None]) -> None:
        self._loop = loop
        self._send = send
        self._frames: list[bytes] = []

    def put(self, *frames: bytes) -> None:
        assert len(frames) == 1 + ARITY[frames[0]], frames
        if not self._frames:
            self._loop.call_soon(self.flush)
        self._frames.extend(frames)

    def flush(self) -> None:
        frames, self._frames = self._frames, []
        if frames:
            self._send(frames)

    def drop(self) -> None:
        """Forget what waits (its addressee is gone)."""
        self._frames = []


class Mesh:
    """One worker's end of the ZeroMQ layer. The Hub decides; this moves messages."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wid: int, workers: int, rundir: str,
                 handler: Any, overflow_max: int, stuck_after: float = STUCK_AFTER) -> None:
        self.loop = loop
        self.wid = wid
        self.peers = tuple(w for w in range(workers) if w != wid)
        self.handler = handler
        self.ctx = zmq.Context()
        self._requests: dict[bytes, Callable[..., None]] = {}
        self._ids = itertools.count()
        self.full_pipes: set[int] = set()
        self.stuck_after = stuck_after  # 0: wait for a peer as long as it takes
        self.stuck: set[int] = set()  # full pipes unread for stuck_after: not waited for
        self._progress: dict[int, float] = {}  # full pipe -> when its peer last took some
        self.stream_bytes = 0  # stream bytes handed to ZeroMQ for other workers
        self._overflow: dict[int, list[list[bytes]]] = {}
        self._overflow_bytes: dict[int, int] = {}
        self.overflow_max = overflow_max
        """Bytes for a peer past its pipe's high-water mark kept before its
        further stream bytes are dropped (--max-buffer): a stopped worker must
        not grow us."""
        self._monitors: list[zmq.Socket] = []
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, b"w%d" % wid)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RCVHWM, CONTROL_HWM)
        dealer.setsockopt(zmq.SNDHWM, CONTROL_HWM)
        self._watch(dealer)
        dealer.connect(registry_address(rundir))
        self._backlog: collections.deque[list[bytes]] = collections.deque()
        self.coordinator = Reader(loop, dealer, self._from_coordinator,
                                  on_writable=self._coordinator_writable)
        self._outbox = Outbox(loop, self._send_batch)
        pull = self.ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, PIPE_HWM)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(worker_address(rundir, wid))
        self.inbox = Reader(loop, pull, self._from_peer)
        self.rundir = rundir
        self.pipes: dict[int, Reader] = {}
        for peer in self.peers:
            self.pipes[peer] = self._pipe(peer, watch=True)
        self._ask(HELLO)

    def _pipe(self, peer: int, watch: bool = False) -> Reader:
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, PIPE_HWM)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.RECONNECT_IVL, 10)  # peers start a few ms apart
        if watch:
            self._watch(push)
        push.connect(worker_address(self.rundir, peer))
        return Reader(self.loop, push, _ignore,
                      on_writable=functools.partial(self._pipe_writable, peer))

    def _watch(self, sock: zmq.Socket) -> None:
        self._monitors.append(sock.get_monitor_socket(zmq.EVENT_CONNECTED))

    async def connected(self, timeout: float = 10.0) -> None:
        """Wait until every outgoing connection is up, so that a worker that
        says "ready" can reach all the others (and holds all its descriptors)."""
        deadline = self.loop.time() + timeout
        waiting = list(self._monitors)
        while waiting:
            for mon in list(waiting):
                if mon.poll(0):
                    mon.recv_multipart()
                    mon.close(linger=0)
                    waiting.remove(mon)
            if waiting:
                if self.loop.time() > deadline:
                    raise TimeoutError("the other workers did not come up")
                await asyncio.sleep(0.005)  # startup only: ZeroMQ connects in its own thread
        for sock in (self.coordinator.sock, *(p.sock for p in self.pipes.values())):
            sock.disable_monitor()

    # -- coordinator ---------------------------------------------------------------

    def _ask(self, *frames: bytes) -> None:
        self._outbox.put(*frames)

    def _send_batch(self, frames: list[bytes]) -> None:
        if self.coordinator.closed:  # stopping: the coordinator stops too
            return
        if not self._backlog:
            try:
                self.coordinator.sock.send_multipart(frames, zmq.NOBLOCK)
                self.coordinator.kick()
                return
            except zmq.Again:  # the coordinator is behind: keep the order, never block
                pass
        self._backlog.append(frames)
        self.coordinator.kick()

    def _coordinator_writable(self) -> None:
        while self._backlog:
            try:
                self.coordinator.sock.send_multipart(self._backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            self._backlog.popleft()

    def claim(self, chid: str | None, token: int, takeover: bool, peer: str,
              done: Callable[[str | None, int | None], None]) -> None:
        """Ask for ``chid`` (None: a fresh one); ``done(chid, home)`` where ``home``
        is the worker whose sessions name it (or None), or ``done(None, None)`` if
        it is in use. ``peer`` is named in the log of a session this takes over."""
        req = b"%d" % next(self._ids)
        self._requests[req] = done
        self._ask(CLAIM, req, (chid or "").encode(), b"%d" % token, b"1" if takeover else b"0",
                  peer.encode())

    def place(self, chid: str | None, recvers: tuple[str, ...],
              done: Callable[[int | None], None]) -> None:
        """Ask where a session belongs (next to the chids it names and to the
        sessions that name it); ``done(worker)``, or ``done(None)``: anywhere.
        Where the named chids live is learnt first (Hub.remote_live)."""
        req = b"%d" % next(self._ids)
        self._requests[req] = done
        self._ask(PLACE, req, (chid or "").encode(), json.dumps(list(recvers)).encode())

    def live(self, chid: str, token: int, recvers: tuple[str, ...],
             senders: Iterable[str] | None = None) -> None:
        """Announce a live session (only when it names chids, or is named).
        Sent at once, with what waits before it: its client has its hs4 and may
        start the next session now, whose placement needs to know this one.
        Its hs3 ``senders`` go to the workers told where it lives: a session
        there that waits for it must know whether its bytes were heard."""
        self._ask(LIVE, chid.encode(), b"%d" % token, json.dumps(list(recvers)).encode(),
                  json.dumps(None if senders is None else sorted(senders)).encode())
        self._outbox.flush()

    def move(self, chid: str, old_worker: int, old_token: int, token: int) -> None:
        """A session moved here: its chid now belongs to ``token`` on this worker."""
        self._ask(MOVE, chid.encode(), b"%d" % old_worker, b"%d" % old_token, b"%d" % token)

    def release(self, chid: str, token: int) -> None:
        self._ask(RELEASE, chid.encode(), b"%d" % token)

    def want(self, chid: str, wanted: bool, token: int) -> None:
        """This worker holds bytes for ``chid`` that came from other workers
        (or no longer does): tell it where ``chid`` is live (``loc``).
        ``token``: any of this worker's, so that a want read after its death
        does not count for its successor."""
        self._ask(WANT, chid.encode(), b"1" if wanted else b"-1", b"%d" % token)

    def _from_coordinator(self, frames: list[bytes]) -> None:
        for kind, args in unbatch(frames):
            try:
                self._coordinator_says(kind, args)
            except Exception:  # a bug: the rest of the batch still goes
                log.exception("handling the coordinator's %r failed", kind)

    def _coordinator_says(self, kind: bytes, args: list[bytes]) -> None:
        h = self.handler
        if kind in (CLAIMED, INUSE):
            done = self._requests.pop(args[0], None)
            if done is not None:
                if kind == CLAIMED:
                    home = int(args[2])
                    done(args[1].decode(), home if home >= 0 else None)
                else:
                    done(None, None)
        elif kind == PLACED:
            for chid, at in json.loads(args[2]).items():
                h.remote_live(chid, at)
            done = self._requests.pop(args[0], None)
            if done is not None:
                worker = int(args[1])
                done(worker if worker >= 0 else None)
        elif kind == LOC:
            just_live = args[2] != NOT_JUST_LIVE
            h.remote_live(args[0].decode(), int(args[1]), just_live,
                          json.loads(args[2]) if just_live else None)
        elif kind == EXPECT:
            h.expect_sent(args[0].decode(), int(args[1]))
        elif kind == GONE:
            h.remote_gone(args[0].decode(), int(args[1]))
        elif kind == WATCH:
            h.watch(args[0].decode(), int(args[1]))
        elif kind == EVICT:
            h.evict(args[0].decode(), int(args[1]), args[2].decode())
        elif kind == DEAD:
            h.worker_dead(int(args[0]))

    # -- other workers -------------------------------------------------------------

    def send_to(self, worker: int, chid: str, chunk: bytes, sender: str | None) -> bool:
        """Bytes from chid ``sender`` for ``chid`` on ``worker``; False if the
        pipe is full (the chunk is still sent: ZeroMQ queues past the mark
        only for us here). The sender goes along: receivers may refuse it."""
        return self._send(worker, [TO, chid.encode(), (sender or "").encode(), chunk])

    def send_held(self, worker: int, chid: str, chunk: bytes, sender: str | None) -> None:
        """Bytes held here for ``chid``, which went live on ``worker``: there
        they count against --hold-total until written, as held bytes do."""
        self._send(worker, [HELD, chid.encode(), (sender or "").encode(), chunk])

    def send_all(self, chunk: bytes, sender: str | None,
                 to: Iterable[int] | None = None) -> list[int]:
        """Bytes from chid ``sender`` for every live session of the other
        workers (or of those in ``to``); returns the full pipes."""
        tag = (sender or "").encode()
        return [w for w in (self.peers if to is None else to)
                if not self._send(w, [ALL, tag, chunk])]

    def sleep(self, asleep: bool) -> None:
        """Tell the others this worker has no live session (they may skip it for
        "everyone" bytes), or, waking, that it is about to have one (each answers
        ``awake``)."""
        frames = [SLEEP if asleep else WAKE, b"%d" % self.wid]
        for w in self.peers:
            self._send(w, frames)

    def sent(self, worker: int, chid: str) -> None:
        """Tell ``worker``, where ``chid`` just went live, that what this worker
        held for it is on its way (behind it on the same pipe)."""
        self._send(worker, [SENT, chid.encode(), b"%d" % self.wid])

    def awake(self, worker: int) -> None:
        """Answer ``wake``: from now on ``worker`` gets our "everyone" bytes."""
        self._send(worker, [AWAKE, b"%d" % self.wid])

    def signal(self, full: bool, chid: str | None, senders: Iterable[str] | None) -> None:
        """Tell every other worker that a local receiver crossed its high-water
        mark; ``senders``, its hs3 filter: only they wait for it."""
        heard = b"" if senders is None else json.dumps(sorted(senders)).encode()
        frames = [FULL if full else DRAIN, (chid or "").encode(), b"%d" % self.wid, heard]
        for w in self.peers:
            self._send(w, frames)

    def _send(self, worker: int, frames: list[bytes]) -> bool:
        pipe = self.pipes[worker]
        queued = self._overflow.get(worker)
        stream = len(frames[-1]) if frames[0] in STREAM else 0
        if not queued:
            try:
                pipe.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                self.stream_bytes += stream
                return worker not in self.full_pipes
            except zmq.Again:
                self.full_pipes.add(worker)
                pipe.kick()
                if self.stuck_after and worker not in self._progress:
                    self._progress[worker] = self.loop.time()
                    self.loop.call_later(self.stuck_after, self._check_stuck, worker)
        # Past the high-water mark, and nothing overtakes what already waits:
        # keep the bytes (each sender waits for the pipe after one read, and
        # held bytes are bounded by the hold's limits), as a local receiver's
        # queue keeps them. Once the peer is stuck (stopped, hung) its stream
        # bytes beyond overflow_max are dropped, as for a slow consumer,
        # while the small control messages still queue. A peer that reads
        # loses nothing.
        size = sum(len(f) for f in frames)
        if stream and worker in self.stuck \
                and self._overflow_bytes.get(worker, 0) >= self.overflow_max:
            self.handler.overflow_dropped(worker, stream)
            return True
        self._overflow.setdefault(worker, []).append(frames)
        self._overflow_bytes[worker] = self._overflow_bytes.get(worker, 0) + size
        return worker in self.stuck  # nobody waits for a stuck peer

    def _check_stuck(self, worker: int) -> None:
        since = self._progress.get(worker)
        if since is None or worker in self.stuck:  # drained meanwhile
            return
        left = since + self.stuck_after - self.loop.time()
        if left > 0:  # it took some meanwhile: look again then
            self.loop.call_later(left, self._check_stuck, worker)
            return
        self.stuck.add(worker)
        self.handler.peer_stuck(worker)

    def forget(self, worker: int) -> int:
        """``worker`` died: what waited for it is not for its successor, in
        our overflow nor in ZeroMQ's pipe (a new socket: the old one would
        hand its queue to whoever binds the address next). Returns the
        stream bytes dropped from the overflow (the pipe's are not counted)."""
        self.stuck.discard(worker)
        self._progress.pop(worker, None)
        queued = self._overflow.pop(worker, None) or []
        self._overflow_bytes.pop(worker, None)
        self.pipes[worker].close()
        self.pipes[worker] = self._pipe(worker)
        if worker in self.full_pipes:
            self.full_pipes.discard(worker)
            self.handler.pipe_drained(worker)
        return sum(len(f[-1]) for f in queued if f[0] in STREAM)

    def _pipe_writable(self, worker: int) -> None:
        queued = self._overflow.get(worker)
        pipe = self.pipes[worker]
        while queued:
            try:
                pipe.sock.send_multipart(queued[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            sent = queued.pop(0)
            self._overflow_bytes[worker] -= sum(len(f) for f in sent)
            if sent[0] in STREAM:
                self.stream_bytes += len(sent[-1])
            if worker in self._progress:
                self._progress[worker] = self.loop.time()
        self._progress.pop(worker, None)
        if worker in self.full_pipes:
            self.full_pipes.discard(worker)
            self.handler.pipe_drained(worker)  # it may ask whether it was stuck
        self.stuck.discard(worker)

    def _from_peer(self, frames: list[bytes]) -> None:
        kind = frames[0]
        h = self.handler
        if kind == TO or kind == HELD:
            h.deliver(frames[1].decode(), frames[3], frames[2].decode() or None, kind == HELD)
        elif kind == ALL:
            h.deliver_all(frames[2], frames[1].decode() or None)
        elif kind in (FULL, DRAIN):
            heard = frozenset(json.loads(frames[3])) if frames[3] else None
            h.remote_full(int(frames[2]), frames[1].decode() or None, kind == FULL, heard)
        elif kind == SLEEP:
            h.peer_asleep(int(frames[1]), True)
        elif kind == WAKE:
            h.peer_asleep(int(frames[1]), False)
        elif kind == AWAKE:
            h.peer_awake(int(frames[1]))
        elif kind == SENT:
            h.held_sent(frames[1].decode())

    def close(self) -> None:
        self._outbox.flush()  # the last releases, if the coordinator still listens
        for reader in (self.coordinator, self.inbox, *self.pipes.values()):
            reader.close()
        self.ctx.term()
