"""A worker: one event loop, its listening sockets, its sessions and the state
they share (routing table, backpressure marks, the one read buffer, counters).

With ``--workers 1`` this is the whole server. Sessions reach shared state only
through the Hub, so that a multi-process layer can replace what is behind it.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import os
import resource
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import control, fdpass
from .config import Config
from .crypto import derive_key
from .fastpath import Pump, bind, fanout
from .mesh import STUCK_AFTER, Mesh
from .metrics import FLUSH_EVERY
from .protocol import FULL, SHUTDOWN, refusal_line
from .pumps import Pumps
from .ratelimit import RateMeter
from .registry import TOKEN_BITS
from .routing import Backpressure, Route, Router
from .runtime import FD_RESERVE, die_with_parent, set_title, setup_logging
from .session import HANDSHAKE_READ, Session, St
from .sockopts import ResetWhenSent, congestion_of_new_sockets, paces

if TYPE_CHECKING:
    from .metrics import WorkerMetrics

log = logging.getLogger("fwd.worker")

READ_SIZE = 256 * 1024
"""One read's maximum: large enough for bulk streams, shared by all sessions."""
MIN_METERED_READ = 4096
"""With --max-rate, the smallest read size read_size picks (for rates below it)."""
PIPES = 1024
"""Splice pipes per worker at most (streams beyond it are copied as before)."""
HOLD_TICK = 1.0
"""How often held bytes are checked for expiry (``--hold-seconds`` precision)."""
SLEEP_AFTER = 0.25
"""Chan mode, several workers: seconds without a live session before a worker
tells the others to leave it out of "everyone" bytes."""
WAKE_WAIT = 0.5
"""How long a session's hs4 may wait for the others to acknowledge that its
worker is awake again (a stopped or dead worker does not answer)."""
DROP_REASONS = ("no_receiver", "sniff_window", "hold_full", "hold_expired",
                "receiver_closed", "worker_gone", "worker_stuck", "discarded")
"""Why stream bytes were dropped (Hub.drop), the labels of
fwd_dropped_bytes_total: docs/PROTOCOL.md §9.4 says when each applies."""
GONE_PER_NOTE = 4096
"""Ended connections told per note: the parent reads a note as one packet of
at most 64 KiB (a larger one would be cut, and its connections never counted out)."""
GONE_PEERS_PER_NOTE = 800
"""The same with --max-conns-per-ip, where each carries its peer and a line
end: at most 54 bytes (``[IPv6]:port``), 70 with an interface zone."""
SETTLE_EVERY = 0.005
"""Seconds between looks at what receivers took of their held bytes when the
hold is full (Hub._settle_all): a hold refused meanwhile may have fit."""
HELD_WAIT = 2.0
"""Seconds a session that just went live waits at most for what other workers
held for it, before its stream may end (a worker that died sends nothing)."""
BEAT = 1.0
"""Seconds between the notes that show the parent this worker's loop turns:
it stops sending new connections to a silent worker, and kills one silent
for --worker-timeout (arbiter.Arbiter._watch)."""


@dataclasses.dataclass
class HeldWait:
    """A session waiting for the ``sent`` of the workers told it went live."""

    session: Session
    timer: asyncio.TimerHandle
    missing: int = 0  # sent notices still to come, once counted
    counted: bool = False  # the coordinator said how many (expect)


class Hub:
    """What the sessions of one worker share."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        # scrypt is slow on purpose: once per process, never per connection.
        self.key: bytes | None = None if config.password is None else derive_key(config.password)
        self.router: Router[Session] = Router(
            hold_bytes=config.hold_bytes,
            hold_seconds=config.hold_seconds,
            hold_total=config.hold_total // config.workers,  # a server-wide cap
        )
        self.router.settle = self._settle_all
        self._settled = -1e9
        # Senders wait on local sessions, or on keys for other workers:
        # ("chid", c) a remote receiver, ("worker", w) any receiver there
        # (for "everyone" routes), ("pipe", w) a full ZeroMQ pipe.
        self.backpressure: Backpressure[Any] = Backpressure()
        self.mesh: Mesh | None = None
        self.wid = 0
        self.channel: socket.socket | None = None
        self._gone = 0  # connections ended, not yet told to the parent
        self._gone_peers: list[str] = []  # their peers, with --max-conns-per-ip
        self._confirm = bytearray()  # fdpass.Handoff.confirm's note, not sent yet
        self._adopting: list[fdpass.Received] = []  # sockets waiting for that note to leave
        # What takes a socket from the parent once the note about it left (serve).
        self.adopt: Callable[[socket.socket, dict[str, Any], bytes], None] = lambda *_: None
        self._tokens = itertools.count(1)
        self.own_token = 0
        # Receivers on other workers above their mark: how many per worker, the
        # chids of those that have one, and per worker those that hear anyone
        # (no hs3 senders); a filtered one holds up only the senders it hears.
        self.remote_full_chids: dict[str, int] = {}
        self.remote_full_count: collections.Counter[int] = collections.Counter()
        self.remote_full_open: collections.Counter[int] = collections.Counter()
        self.remote_full_senders: dict[str, frozenset[str]] = {}
        self.buffer = bytearray(read_size(config.max_rate))
        self.view = memoryview(self.buffer)
        pipes = pipe_budget(config.max_conns)
        if config.splice_min and not pipes:
            log.warning("no splice pipes: the file descriptor limit leaves none beside "
                        "--max-conns %d, so bulk pairs are copied", config.max_conns)
        # Fan-out rounds by tee(2) unless the sockets' congestion control paces.
        congestion = congestion_of_new_sockets(config.tcp_congestion)
        tee = not paces(congestion)
        log.debug("bulk fan-out: %s (congestion control %s)",
                  "tee(2)" if tee else "copied, since it paces", congestion or "unknown")
        # --max-rate meters every read and splice round; pumped pairs would
        # bypass the loop altogether, so they are off.
        splice_min = config.splice_min
        self.meters: dict[Session, RateMeter] = {}
        self.throttled: set[Session] = set()  # not reading until their debt is paid
        self.pumps: Pumps | None = None
        if Pump is not None and config.pump_pairs and splice_min and pipes \
                and not config.max_rate:
            self.pumps = Pumps(self, Pump, config.pump_pairs)
        bind(self.buffer, HANDSHAKE_READ, self.router, splice_min, pipes, tee,
             None if self.pumps is None else self.pumps.offer,
             self.meter if config.max_rate else None)
        # A dict, not a set: at 10,000 entries a set's table is about four
        # times larger (measured: about 75 bytes per idle session).
        self.sessions: dict[Session, None] = {}
        self.pending: set[Session] = set()
        self._channel_waits: dict[object, Callable[[], None]] = {}  # when_channel_free
        # Half-closed sessions waiting for the one chid they name to go live
        # (Session._await_partner), by that chid, with when they stop waiting.
        self.awaiting: dict[str, dict[Session, float]] = {}
        # When each session's bytes were first held (Session._route_rest).
        # Live sessions whose queue starts with held bytes (Router.join): where
        # they end in its stream (bytes_out), and how many still count (settle_held).
        self.held_queued: dict[Session, tuple[int, int]] = {}
        # Sessions that just announced they are live, by chid, until what other
        # workers held for them has arrived (await_held).
        self.held_waits: dict[str, HeldWait] = {}
        # Totals since the worker started (bytes of sessions that ended: a live
        # session counts its own until it is released).
        self.stats: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()  # by reason
        self.ends: collections.Counter[str] = collections.Counter()  # live sessions, by reason
        # Ended sessions still flushing to their clients: their end lines wait
        # for what that flush wrote (Session.connection_lost).
        self.flushing: dict[Session, tuple[str, str]] = {}
        # Bytes our resets destroyed in the kernel, per session, until its
        # connection_lost counts them as discarded (Session.reset_connection).
        self.reset_lost: dict[Session, int] = {}
        self.drops: collections.Counter[str] = collections.Counter()  # bytes, by DROP_REASONS
        self.started = loop.time()
        self.closed = asyncio.Event()
        self.hurry = asyncio.Event()  # a second SIGTERM: cut the drain short
        self.stopping = False
        self._hold_timer: asyncio.TimerHandle | None = None
        self._last_reject_log = -1e9
        self.metrics: WorkerMetrics | None = None
        # Sleep protocol (chan mode, several workers): "everyone" bytes skip a
        # worker that has said it has no live session; before its next hs4 it
        # wakes the others and waits for their answers, so that a client that
        # got OK gets what is sent after it (see when_awake).
        self.sleeping: set[int] = set()  # peers that said they sleep
        self._stuck: set[int] = set()  # peers whose bytes the mesh drops (overflow_dropped)
        self._wants: set[str] = set()  # chids asked about for bytes held here (sync_wants)
        self.asleep = False  # we said so
        self._waking: set[int] | None = None  # peers whose answer we await
        self._woken_callbacks: list[Callable[[], None]] = []
        self._sleep_timer: asyncio.TimerHandle | None = None
        self._wake_timer: asyncio.TimerHandle | None = None

    def start_tokens(self, incarnation: int) -> None:
        """Session tokens unique for the server's life (registry.TOKEN_BITS)."""
        self._tokens = itertools.count((incarnation << TOKEN_BITS) + 1)
        self.own_token = incarnation << TOKEN_BITS  # no session's: for wants

    def new_token(self) -> int:
        return next(self._tokens)

    def connection_gone(self, session: Session | None = None, peer: str = "?") -> None:
        """Tell the parent, which counts connections per worker (--max-conns,
        placement), and per address (--max-conns-per-ip): once per
        connection, once it is closed (a session that ended may still flush
        its queue for CLOSE_LINGER, and that memory is what the limits bound)."""
        if session is not None:
            if session.counted_out or session.moved:  # a moved one is counted by the parent
                return
            session.counted_out = True
            peer = session.peer
        if self.channel is not None:
            if not self._gone:
                self.loop.call_soon(self._send_notes)
            self._gone += 1
            if self.config.max_conns_per_ip:
                self._gone_peers.append(peer)

    def took(self, word: bytes, batch: list[fdpass.Received]) -> None:
        """Tell the parent which sockets arrived before using any of them:
        until it knows, it keeps its copies, and gives them to another worker
        if this one dies. Were one used first, a worker dying before its note
        left would have the same connection start over elsewhere mid-session.
        So a full channel holds the sockets back with the note."""
        self._confirm += word
        self._adopting.extend(batch)
        self._send_notes()

    def _send_notes(self) -> None:
        """Send what the parent waits for: first the note about sockets taken
        (then they are adopted), then one note for every connection that ended
        since the last note. A full channel (the parent is behind: its send
        buffer holds about 270 notes) keeps them for when it drains, since a
        lost note would hold a --max-conns slot for good. A note is one
        packet the parent reads whole, so a large count goes in several."""
        channel = self.channel
        while channel is not None and self._confirm:
            note = fdpass.CONFIRM + self._confirm[:GONE_PER_NOTE]
            try:
                channel.send(note)
            except BlockingIOError:
                self.loop.add_writer(channel, self._writable)
                return
            except OSError:  # the parent is gone: we stop
                self._confirm.clear()
                break
            del self._confirm[:GONE_PER_NOTE]
        if self._adopting:
            adopting, self._adopting = self._adopting, []
            for received in adopting:
                self.adopt(*received)
        peers = self._gone_peers
        while channel is not None and self._gone:
            if peers:  # one per line, so that the parent can count each address down
                n = min(len(peers), GONE_PEERS_PER_NOTE)
                note = b"g" + "\n".join(peers[:n]).encode()
            else:
                n = min(self._gone, GONE_PER_NOTE)
                note = b"x" * n
            try:
                channel.send(note)
            except BlockingIOError:
                self.loop.add_writer(channel, self._writable)
                return
            except OSError:  # the parent is gone
                self._gone = 0
                peers.clear()
                return
            self._gone -= n
            del peers[:n]

    def _writable(self) -> None:
        assert self.channel is not None
        self.loop.remove_writer(self.channel)
        self._send_notes()
        waits, self._channel_waits = self._channel_waits, {}
        for then in waits.values():  # each may find it full again, and wait again
            then()

    def beat(self) -> None:
        """Show the parent that the event loop runs, once a BEAT until the drain
        (the parent stops watching then). A note that cannot go now is
        skipped: a full channel means the parent is behind, not us."""
        if self.stopping or self.channel is None:
            return
        self.loop.call_later(BEAT, self.beat)
        if self._gone or self._confirm:
            return  # a note is on its way: it counts too
        try:
            self.channel.send(b"b")
        except OSError:  # full, or the parent is gone (receive_into sees that)
            pass

    def place_locally(self, recvers: tuple[str, ...],
                      hint: int | None) -> tuple[bool, int | None]:
        """Where a session naming ``recvers`` belongs, from what this worker knows:
        (False, None) if a receiver is unknown here (the coordinator must say,
        and tells where the receivers are: a session never goes live before its
        worker knows where they are), else (True, the worker, or None to stay)."""
        assert self.mesh is not None
        votes: collections.Counter[int] = collections.Counter()
        here = False
        for chid in recvers:
            if self.router.live(chid) is not None:
                here = True
                continue
            where = self.router.where(chid)
            if where is None:
                return False, None
            votes[where] += 1
        if here:
            return True, None  # a receiver is here already: stay
        if hint is not None:
            votes[hint] += 1
        return True, (votes.most_common(1)[0][0] if votes else None)

    def send_to_parent(self, fd: int, meta: dict[str, Any], data: bytes) -> bool | None:
        """Pass a socket to the parent (which forwards it): True if it went,
        None if the channel is full now (when_channel_free), False if it
        cannot go (the parent is gone)."""
        assert self.channel is not None
        try:
            fdpass.send_socket(self.channel, fd, meta, data)
        except BlockingIOError:
            return None
        except OSError:
            return False
        return True

    def when_channel_free(self, key: object, then: Callable[[], None]) -> None:
        """Call ``then`` once the channel to the parent takes a message again
        (a burst of sessions moving, with the parent behind), unless ``key``
        waits again meanwhile (the new ``then`` replaces it) or forgets it."""
        assert self.channel is not None
        self._channel_waits[key] = then
        self.loop.add_writer(self.channel, self._writable)

    def forget_channel_wait(self, key: object) -> None:
        """``key`` no longer waits (a timer went first): a call left behind
        could act on a state that only looks like the one it waited in."""
        self._channel_waits.pop(key, None)

    # -- other workers (called by the Mesh) ------------------------------------------

    def awake_peers(self) -> list[int] | tuple[int, ...]:
        """The other workers that "everyone" bytes go to: in chan mode those
        that do not sleep; in broadcast mode all, since a sleeping worker may
        hold connections in their sniff window, which get every byte."""
        assert self.mesh is not None
        peers = self.mesh.peers
        if not self.sleeping or self.config.mode != "chan":
            return peers
        return [w for w in peers if w not in self.sleeping]

    def peers_live(self) -> bool:
        """Whether another worker may have a live session: one has not said it
        sleeps. Without, "everyone" bytes with no receiver here are dropped."""
        return self.mesh is not None and len(self.sleeping) < len(self.mesh.peers)

    def reaches_peers(self) -> bool:
        """Whether "everyone" bytes concern another worker now: one is awake, or
        one has a full receiver this sender must wait for."""
        return bool(self.awake_peers()) or any(n > 0 for n in self.remote_full_count.values())

    def all_local(self, route: Route[Session]) -> bool:
        """Whether the local targets of ``route`` are all its bytes reach now:
        an "everyone" route may also reach other workers and sessions still
        in their sniff window."""
        if route.local:
            return True
        if not route.to_all or route.missing or route.remote or self.pending:
            return False
        return self.mesh is None or not self.reaches_peers()

    def forward_remote(self, route: Route[Session], chunk: bytes,
                       sender: str | None) -> list[Any]:
        """Send ``chunk`` from chid ``sender`` to the other workers ``route``
        reaches; return what to wait on."""
        mesh = self.mesh
        assert mesh is not None
        waits: list[Any] = []
        stuck = mesh.stuck
        if route.to_all:
            peers = self.awake_peers()
            waits.extend(("pipe", w) for w in mesh.send_all(chunk, sender, peers))
            waits.extend(("worker", w) for w, n in self.remote_full_open.items()
                         if n > 0 and w not in stuck)
            for chid, heard in self.remote_full_senders.items():
                if sender in heard and self.remote_full_chids.get(chid) not in stuck:
                    waits.append(("chid", chid))
        for worker, chid in route.remote:
            if not mesh.send_to(worker, chid, chunk, sender):
                waits.append(("pipe", worker))
            if chid in self.remote_full_chids and worker not in stuck \
                    and sender in self.remote_full_senders.get(chid, (sender,)):
                waits.append(("chid", chid))
        return waits

    def remote_live(self, chid: str, worker: int, just_live: bool = False,
                    senders: list[str] | None = None) -> None:
        """``chid`` lives on ``worker``. If it ``just_live``d there, hearing only
        ``senders`` if given (hs3): sessions here that half-closed waiting for
        it end, with a FIN if it heard them, a reset if their held bytes are
        dropped there; and ``sent`` follows what was held here for it, so that
        its session does not end its stream before that arrived (held_sent)."""
        assert self.mesh is not None
        for sender, chunk in self.router.set_remote(chid, worker):  # older than anything new
            self.mesh.send_held(worker, chid, chunk, sender)
        self.sync_wants()
        for session in list(self.awaiting.pop(chid, ())):  # a pair forms in one worker only
            if senders is not None and session.chid not in senders:
                session.not_heard()
            else:
                session.no_partner()
        if just_live:
            self.mesh.sent(worker, chid)

    def await_held(self, session: Session) -> None:
        """``session`` announced it is live: the workers that hold bytes for it
        (or have sessions naming it) send them now, then ``sent``. Until the
        coordinator has said how many (expect_sent) and they all came, or
        HELD_WAIT passed, its stream does not end (Session.held_pending): on
        one worker, held bytes are written right after hs4, before an EOF the
        client sent behind its hs3 is read."""
        assert session.chid is not None
        old = self.held_waits.pop(session.chid, None)
        if old is not None:
            old.timer.cancel()
        self.held_waits[session.chid] = HeldWait(
            session, self.loop.call_later(HELD_WAIT, self._held_done, session.chid))

    def expect_sent(self, chid: str, told: int) -> None:
        wait = self.held_waits.get(chid)
        if wait is not None:
            wait.missing += told
            wait.counted = True
            if wait.missing <= 0:
                self._held_done(chid)

    def held_sent(self, chid: str) -> None:
        wait = self.held_waits.get(chid)
        if wait is not None:
            wait.missing -= 1  # may come before expect_sent: another pipe
            if wait.counted and wait.missing <= 0:
                self._held_done(chid)

    def _held_done(self, chid: str) -> None:
        wait = self.held_waits.pop(chid, None)
        if wait is not None:
            wait.timer.cancel()
            wait.session.held_arrived()

    def forget_held_wait(self, session: Session) -> None:
        """``session`` ended: nothing waits for its held bytes any more."""
        chid = session.chid
        if chid is None:
            return
        wait = self.held_waits.get(chid)
        if wait is not None and wait.session is session:
            del self.held_waits[chid]
            wait.timer.cancel()

    def want_held(self, chids: Iterable[str]) -> None:
        """Bytes held here for ``chids`` must follow them to the worker where
        they go live: ask the coordinator to say where (and to draw them here),
        once per chid (sync_wants withdraws it when nothing is held any more)."""
        assert self.mesh is not None
        for chid in chids:
            if chid not in self._wants and self.router.holding(chid) \
                    and self.router.live(chid) is None:
                self._wants.add(chid)
                self.mesh.want(chid, True, self.own_token)

    def sync_wants(self) -> None:
        """Withdraw the interest in chids this worker no longer holds bytes for."""
        if self._wants:
            assert self.mesh is not None
            for chid in [c for c in self._wants if not self.router.holding(c)]:
                self._wants.discard(chid)
                self.mesh.want(chid, False, self.own_token)

    def remote_gone(self, chid: str, worker: int) -> None:
        self.router.drop_remote(chid, worker)

    def worker_dead(self, worker: int) -> None:
        assert self.mesh is not None
        self._stuck.discard(worker)  # before forget: it is gone, it does not "read again"
        self.drop("worker_gone", self.mesh.forget(worker))
        self.sleeping.discard(worker)  # its successor starts awake
        self.peer_awake(worker)
        self.router.drop_worker(worker)
        for chid in [c for c, w in self.remote_full_chids.items() if w == worker]:
            self.remote_full(worker, chid, False, self.remote_full_senders.get(chid))
        self.remote_full_count.pop(worker, None)
        self.remote_full_open.pop(worker, None)
        self.resume_senders(self.backpressure.release(("worker", worker)))

    def watch(self, chid: str, token: int) -> None:
        """Sessions elsewhere name this one's chid: it must say when it is live."""
        session = self.router.owner(chid)
        if session is not None and session.token == token:
            session.wanted()

    def evict(self, chid: str, token: int, by: str) -> None:
        session = self.router.owner(chid)
        if session is not None and session.token == token:
            session.evict(by)

    def deliver(self, chid: str, chunk: bytes, sender: str | None, held: bool = False) -> None:
        """Bytes from another worker's chid ``sender`` for a local receiver
        (held if it is not here); ``held``: that worker held them for it, so
        here too they count against --hold-total until written (dropped if
        they do not fit), or a receiver that reads nothing could take every
        worker's holds, again and again."""
        now = self.loop.time()
        target = self.router.live(chid)
        if target is not None:
            if not self.router.accepts(target, sender):
                return  # for it, they were never sent (hs3 "senders")
            self.router.expose((target,))
        if target is None:
            owner = self.router.owner(chid)
            if owner is not None and owner.write_closed:  # its write side is shut
                self.drop("receiver_closed", len(chunk))
                return
        if target is None or target.transport is None:
            self.drop("hold_full", self.router.hold(chid, chunk, now, sender))
            self.watch_holds()
            if target is None:
                # Sent here as its chid's home, which it has left (or not reached):
                # where it goes live next, these bytes must follow. A session here
                # that names it would say so; bytes from elsewhere must ask.
                self.want_held((chid,))
            return
        if held and not self.router.queue_held(len(chunk)):
            self.drop("hold_full", len(chunk))
            return
        full = fanout(chunk, (target,), None, now)  # a reset peer is learnt there
        if held:
            self.queued_held(target, len(chunk))
        if full:
            target.tell_full()

    def deliver_all(self, chunk: bytes, sender: str | None) -> None:
        """Bytes from another worker's "everyone" route, from chid ``sender``."""
        everyone = self.router.everyone(sender)
        self.router.expose(everyone)
        for target in fanout(chunk, everyone, None, self.loop.time()) or ():
            target.tell_full()
        for p in self.pending:
            p._queue_pending(chunk)

    def remote_full(self, worker: int, chid: str | None, full: bool,
                    senders: frozenset[str] | None = None) -> None:
        """A receiver on ``worker`` crossed its high-water mark (or came back
        under); ``senders``: the only chids it hears (hs3), if it names them."""
        step = 1 if full else -1
        self.remote_full_count[worker] = max(self.remote_full_count[worker] + step, 0)
        if chid is not None:
            if full:
                self.remote_full_chids[chid] = worker
                if senders is None:
                    self.remote_full_senders.pop(chid, None)
                else:
                    self.remote_full_senders[chid] = senders
            elif self.remote_full_chids.get(chid) == worker:  # not a newer session's elsewhere
                del self.remote_full_chids[chid]
                self.remote_full_senders.pop(chid, None)
                self.resume_senders(self.backpressure.release(("chid", chid)))
        if senders is None:  # "everyone" bytes wait on the worker for it
            count = self.remote_full_open[worker] + step
            self.remote_full_open[worker] = max(count, 0)
            if count <= 0:
                self.resume_senders(self.backpressure.release(("worker", worker)))

    def pipe_drained(self, worker: int) -> None:
        assert self.mesh is not None
        if worker in self._stuck or worker in self.mesh.stuck:
            self._stuck.discard(worker)
            log.warning("worker %d reads again", worker)
        self.resume_senders(self.backpressure.release(("pipe", worker)))

    def peer_stuck(self, worker: int) -> None:
        """``worker`` has left its full pipe unread for mesh.STUCK_AFTER
        (stopped, hung): the senders waiting for it, or for its receivers,
        go on without it until it reads again."""
        assert self.mesh is not None
        log.warning("worker %d has not read for %g s: senders here no longer wait for it, and "
                    "stream bytes for it beyond %d queued are dropped", worker,
                    self.mesh.stuck_after, self.config.max_buffer)
        self.resume_senders(self.backpressure.release(("pipe", worker)))
        self.resume_senders(self.backpressure.release(("worker", worker)))
        for chid in [c for c, w in self.remote_full_chids.items() if w == worker]:
            self.resume_senders(self.backpressure.release(("chid", chid)))

    def overflow_dropped(self, worker: int, nbytes: int) -> None:
        """The mesh dropped bytes for a worker that does not read its pipe."""
        self.drop("worker_stuck", nbytes)
        if worker not in self._stuck:
            self._stuck.add(worker)
            log.warning("worker %d does not read: dropping bytes for it beyond %d queued",
                        worker, self.config.max_buffer)

    # -- the sleep protocol ------------------------------------------------------------

    def live_changed(self) -> None:
        """A session left: with none live for SLEEP_AFTER, tell the others."""
        if (self.mesh is not None and not self.asleep
                and self._sleep_timer is None and self.router.live_count() == 0):
            self._sleep_timer = self.loop.call_later(SLEEP_AFTER, self._maybe_sleep)

    def _maybe_sleep(self) -> None:
        self._sleep_timer = None
        if (self.mesh is not None and not self.asleep and self._waking is None
                and not self.stopping and self.router.live_count() == 0):
            self.asleep = True
            self.mesh.sleep(True)
            if self.config.mode == "chan":
                log.debug("no live session: the other workers leave this one out")
            else:
                log.debug("no live session: the other workers count bytes none of their "
                          "sessions receive as dropped")

    def went_live(self) -> None:
        """A session goes live in broadcast mode: if we said we sleep, say we
        do not, without waiting (the others send us every byte anyway in
        broadcast mode; this only keeps their count of dropped bytes right)."""
        if self.asleep and self._waking is None:
            assert self.mesh is not None
            self.asleep = False
            self.mesh.sleep(False)

    def when_awake(self, then: Callable[[], None]) -> bool:
        """Before a session's hs4: if we said we sleep, wake the others and call
        ``then`` once each has answered (or WAKE_WAIT passed); True if ``then``
        is deferred, False if the caller may go on at once."""
        if not self.asleep:
            return False
        if self.config.mode != "chan":  # nobody leaves us out: no need to wait
            self.went_live()
            return False
        assert self.mesh is not None
        self._woken_callbacks.append(then)
        if self._waking is None:
            log.debug("waking the other workers before an hs4")
            self._waking = set(self.mesh.peers)
            self.mesh.sleep(False)
            self._wake_timer = self.loop.call_later(WAKE_WAIT, self._woken)
        return True

    def peer_asleep(self, worker: int, asleep: bool) -> None:
        assert self.mesh is not None
        if asleep:
            self.sleeping.add(worker)
        else:
            self.sleeping.discard(worker)
            self.mesh.awake(worker)

    def peer_awake(self, worker: int) -> None:
        if self._waking is not None:
            self._waking.discard(worker)
            if not self._waking:
                self._woken()

    def _woken(self) -> None:
        if self._wake_timer is not None:
            self._wake_timer.cancel()
            self._wake_timer = None
        self._waking = None
        self.asleep = False
        callbacks, self._woken_callbacks = self._woken_callbacks, []
        for then in callbacks:
            then()

    # -- what fwd-ctl and /metrics see (asked by the parent) ---------------------------

    def snapshot(self) -> dict[str, Any]:
        """This worker's counters and gauges, as fwd-ctl status and the metrics show them."""
        self._settle_all(force=True)  # held_memory as of now, not of the last hold tick
        totals = dict(self.stats)
        if self.mesh is not None:
            totals["cross_worker_bytes"] = self.mesh.stream_bytes
        live: collections.Counter[str] = collections.Counter()
        buffered = spliced = 0
        for s in self.sessions:
            queued = s.transport.get_write_buffer_size() if s.transport is not None else 0
            buffered += queued
            totals["bytes_in"] = totals.get("bytes_in", 0) + s.bytes_in
            # Written: what is still queued may yet be dropped (Session.connection_lost).
            totals["bytes_out"] = totals.get("bytes_out", 0) + s.bytes_out - queued
            if s.state is St.LIVE:
                live["broadcast" if s.chid is None else "chan"] += 1
            spliced += s.pipe_r >= 0
        return {"worker": self.wid, "pid": os.getpid(),
                "uptime": round(self.loop.time() - self.started, 3),
                "open_connections": len(self.sessions), "live": dict(live),
                "held_bytes": self.router.held,
                "held_memory": self.router.held + self.router.overhead + self.router.queued,
                "buffered_bytes": buffered,
                "spliced_sessions": spliced,
                "pumped_pairs": 0 if self.pumps is None else len(self.pumps),
                "totals": totals, "failures": dict(self.failures), "ends": dict(self.ends),
                "drops": dict(self.drops)}

    def session_rows(self) -> list[dict[str, Any]]:
        now = self.loop.time()
        rows = []
        for s in self.sessions:
            queued = s.transport.get_write_buffer_size() if s.transport else 0
            rows.append({"chid": s.chid, "peer": s.peer, "worker": self.wid,
                         "state": s.state.value,
                         "recvers": list(s.recvers) if s.recvers else None,
                         "bytes_in": s.bytes_in, "bytes_out": s.bytes_out - queued,
                         "buffered": queued, "idle": round(max(now - s.last_active, 0.0), 3),
                         "age": round(now - s.started, 3)})
        return rows

    def kick(self, chid: str | None = None, peer: str | None = None) -> int:
        """Close the session holding ``chid`` here, or the one connected from
        ``peer`` (a plain broadcast client has no chid); how many were closed."""
        if chid is not None:
            session = self.router.owner(chid)
        else:
            session = next((s for s in self.sessions if s.peer == peer), None)
        if session is None or session.state is St.CLOSED:
            return 0
        self.stats["kicked"] += 1
        session.end("kicked by fwd-ctl")
        return 1

    async def serve_control(self, request: control.Request) -> dict[str, Any]:
        """The parent's requests, over this worker's control socket."""
        if request.cmd == "status":
            return control.ok(**self.snapshot())
        if request.cmd == "sessions":
            return control.ok(sessions=self.session_rows())
        if request.cmd == "kick":
            return control.ok(kicked=self.kick(request.args["chid"]))
        if request.cmd == "kick-peer":
            return control.ok(kicked=self.kick(peer=request.args["peer"]))
        assert request.cmd == "flush"
        self.flush_metrics()
        return control.ok()

    def flush_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.flush(self.snapshot())

    def _metrics_tick(self) -> None:
        self.flush_metrics()
        self.loop.call_later(FLUSH_EVERY, self._metrics_tick)

    def start_metrics(self) -> None:
        from .metrics import WorkerMetrics

        self.metrics = WorkerMetrics()
        self._metrics_tick()

    # -- connections -------------------------------------------------------------------

    def admit(self, session: Session, limit: bool = True) -> bool:
        """Count a new connection in, or refuse it (``--max-conns``, shutdown;
        ``refusal`` says why)."""
        if limit and (self.stopping or len(self.sessions) >= self.config.max_conns):
            self.stats["rejected"] += 1
            now = self.loop.time()
            if now - self._last_reject_log >= 1.0:
                self._last_reject_log = now
                why = ("the server stops" if self.stopping
                       else f"{len(self.sessions)} connections (--max-conns)")
                log.warning("refusing connection from %s: %s, %d refused so far", session.peer,
                            why, self.stats["rejected"])
            return False
        self.sessions[session] = None
        if limit:  # a moved session was counted where it connected
            self.stats["connections"] += 1
        return True

    def tell_refused(self, fd: int) -> None:
        """Write the line a refused connection gets, where clients expect a
        handshake line first (chan mode, a password); nothing elsewhere. To
        the descriptor: uvloop's socket object has no send()."""
        if self.config.mode != "chan" and self.key is None:
            return
        with contextlib.suppress(OSError):
            os.write(fd, refusal_line(SHUTDOWN if self.stopping else FULL))

    def note_failure(self, reason: str) -> None:
        """Count a failed handshake under its label (protocol.FAILURE_REASONS)."""
        self.stats["handshake_failures"] += 1
        self.failures[reason] += 1

    def release(self, session: Session) -> None:
        self.connection_gone(session)
        if session in self.sessions:
            del self.sessions[session]
            self.stats["bytes_in"] += session.bytes_in
            self.stats["bytes_out"] += session.bytes_out
        if self.stopping and not self.sessions:
            self.closed.set()

    def resume_senders(self, senders: list[Session]) -> None:
        now = self.loop.time()
        for s in senders:
            if s.state is St.LIVE and s.transport is not None and s not in self.throttled \
                    and (self.pumps is None or s not in self.pumps.running):
                s.last_active = now  # held back until now: its idle time starts here
                s.transport.resume_reading()

    def meter(self, s: Session, nbytes: int, now: float, inside: bool = False) -> bool:
        """--max-rate: a live session's read or splice round. Past its budget
        it reads nothing until the debt is paid, and TCP pushes back on its
        client. ``inside`` uvloop's buffer callback (a splice round), reading
        must not stop there (libuv would call a cleared read callback): it
        stops right after. True while the session is in debt."""
        m = self.meters.get(s)
        if m is None:
            m = self.meters[s] = RateMeter(self.config.max_rate, self.config.max_rate, now)
        wait = m.take(nbytes, now)
        if wait > 0 and s.transport is not None:
            if s not in self.throttled:
                self.throttled.add(s)
                self.stats["throttled"] += 1
                self.loop.call_later(wait, self._unthrottle, s)
            # Also when a pause is on its way: libuv reads on in this event.
            if inside:
                self.loop.call_soon(self._throttle, s)
            else:
                s.transport.pause_reading()
        return wait > 0

    def _throttle(self, s: Session) -> None:
        if s in self.throttled and s.transport is not None:
            s.transport.pause_reading()

    def _unthrottle(self, s: Session) -> None:
        # What it read after the pause was set (the rest of that event) is
        # owed too: resume only once everything is paid.
        m = self.meters.get(s)
        wait = m.take(0, self.loop.time()) if m is not None else 0.0
        if wait > 0 and s.state is St.LIVE:
            self.loop.call_later(wait, self._unthrottle, s)
            return
        self.throttled.discard(s)
        if s.state is St.LIVE and s.transport is not None \
                and not self.backpressure.is_paused(s):
            s.last_active = self.loop.time()  # as in resume_senders
            s.transport.resume_reading()

    def drop(self, reason: str, nbytes: int) -> None:
        """Count stream bytes that reach nobody, by why (DROP_REASONS)."""
        if nbytes:
            self.stats["dropped_bytes"] += nbytes
            self.drops[reason] += nbytes

    def watch_holds(self) -> None:
        if self._hold_timer is None and (self.router.has_holds() or self.awaiting
                                         or self.held_queued):
            self._hold_timer = self.loop.call_later(HOLD_TICK, self._expire_holds)

    def queued_held(self, session: Session, nbytes: int) -> None:
        """``session`` just queued ``nbytes`` of held bytes (at the end of its queue)."""
        if nbytes:
            self.settle_held(session)
            _, left = self.held_queued.get(session, (0, 0))
            self.held_queued[session] = (session.bytes_out, left + nbytes)
            self.watch_holds()

    def settle_held(self, session: Session) -> None:
        """What of ``session``'s held bytes has left its queue no longer counts
        against --hold-total (all of it once the connection is gone)."""
        entry = self.held_queued.get(session)
        if entry is None:
            return
        end, charged = entry
        transport = session.transport
        left = 0
        if transport is not None:
            written = session.bytes_out - transport.get_write_buffer_size()
            left = min(charged, max(end - written, 0))
        if left < charged:
            self.router.written_held(charged - left)
            if left:
                self.held_queued[session] = (end, left)
            else:
                del self.held_queued[session]

    def _settle_all(self, force: bool = False) -> None:
        """The hold looks full: what receivers took of their held bytes since
        the last look is free again (Router.settle). At most once per
        SETTLE_EVERY, unless ``force``d: a flood to absent chids asks on
        every read, and the walk is over every such receiver."""
        now = self.loop.time()
        if not force and now - self._settled < SETTLE_EVERY:
            return
        self._settled = now
        for session in list(self.held_queued):
            self.settle_held(session)

    def _expire_holds(self) -> None:
        self._hold_timer = None
        now = self.loop.time()
        self._settle_all(force=True)
        dropped = self.router.expire(now)
        expired, self.router.expired = self.router.expired, {}
        for sender, (nbytes, when) in expired.items():  # their streams were cut there
            owner = self.router.owner(sender)
            if owner is not None and owner.live_since <= when:  # not a later session's
                owner.dropped += nbytes
        if dropped:
            self.drop("hold_expired", dropped)
            log.info("dropped %d held bytes older than %gs (--hold-seconds)",
                     dropped, self.config.hold_seconds)
        # In the same tick as their bytes: a partner coming before it gets them.
        for waiting in list(self.awaiting.values()):
            for session, until in list(waiting.items()):
                if until <= now:
                    session.partner_never_came()
        if self.mesh is not None:
            self.sync_wants()
        self.watch_holds()

    async def shutdown(self) -> None:
        """Close every session, letting queued bytes flush for a bounded time."""
        self.stopping = True
        queued = sum(s.transport.get_write_buffer_size() for s in self.sessions if s.transport)
        log.info("draining %d sessions with %d queued bytes", len(self.sessions), queued)
        for s in list(self.sessions):
            if isinstance(s.linger, ResetWhenSent):
                continue  # a cut stream: it ends with its reset, as it would have
            if s.awaiting_partner():  # its held bytes die with us: its stream is cut
                s.close("server shutdown", cut=True, linger=self.config.drain_timeout)
                continue
            if s.linger is not None:  # --drain-timeout bounds every flush now
                s.linger.cancel()
                s.linger = None
            s.end("server shutdown", linger=None)
        if self.sessions:
            waits = [asyncio.ensure_future(e.wait()) for e in (self.closed, self.hurry)]
            await asyncio.wait(waits, timeout=self.config.drain_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if self.sessions:
                log.warning("%d sessions did not drain within %gs%s: resetting them",
                            len(self.sessions), self.config.drain_timeout,
                            " (told twice to stop)" if self.hurry.is_set() else "")
                for s in list(self.sessions):
                    if s.transport is not None:
                        s.reset_connection(s.transport)
                await asyncio.sleep(0)  # their connection_lost: end lines and counts


def read_size(max_rate: int) -> int:
    """One read's maximum: READ_SIZE, or with --max-rate a second's worth
    (MIN_METERED_READ at least), since a read that overdraws the bucket is
    forwarded whole and the session then waits it off: at 1 KiB/s a 256 KiB
    read would stop it for minutes, and hide its FIN or reset as long."""
    return READ_SIZE if not max_rate else min(READ_SIZE, max(max_rate, MIN_METERED_READ))


def pipe_budget(max_conns: int) -> int:
    """Splice pipes this worker may hold: two descriptors each, out of what the
    descriptor limit leaves beside --max-conns connections, and at most PIPES."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return PIPES
    return max(0, min(PIPES, (soft - max_conns - FD_RESERVE) // 2))


async def serve(config: Config, wid: int, channel: socket.socket, rundir: str,
                incarnation: int) -> bool:
    """Serve the client sockets the parent sends on ``channel`` until SIGTERM
    (or until the parent is gone), then drain. True if the parent is gone."""
    loop = asyncio.get_running_loop()
    hub = Hub(config, loop)
    hub.wid, hub.channel = wid, channel
    hub.start_tokens(incarnation)
    if config.workers > 1:
        # --slow-timeout 0: nobody is dropped for being slow, a stuck worker neither.
        hub.mesh = Mesh(loop, wid, config.workers, rundir, hub, config.max_buffer,
                        STUCK_AFTER if config.slow_timeout else 0.0)
        await hub.mesh.connected()
        hub.live_changed()  # no session yet: the others may leave us out
    stop = asyncio.Event()

    def on_sigterm() -> None:
        if stop.is_set():  # a second one, sent to this worker by hand
            hub.hurry.set()
        stop.set()

    def on_hurry() -> None:  # the parent was told twice to stop
        hub.hurry.set()
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    loop.add_signal_handler(signal.SIGUSR1, on_hurry)
    last_loss_log = -1e9

    async def adopt(sock: socket.socket, moved: tuple[dict[str, Any], bytes] | None,
                    peer: str) -> None:
        try:
            fd = sock.fileno()
            await loop.connect_accepted_socket(lambda: Session(hub, moved, fd, peer), sock)
        except OSError as exc:  # the client left during the hand-off
            log.debug("could not adopt a connection: %s", exc)
            sock.close()
            hub.connection_gone(peer=peer)

    def on_socket(sock: socket.socket, meta: dict[str, Any], data: bytes) -> None:
        peer = fdpass.peer_of(meta)
        if hub.stopping:
            if "adopt" not in meta:
                hub.tell_refused(sock.fileno())
            sock.close()
            hub.connection_gone(peer=peer)
            return
        moved = (meta["adopt"], data) if "adopt" in meta else None
        loop.create_task(adopt(sock, moved, peer))

    parent_gone = False

    def on_parent_gone() -> None:
        nonlocal parent_gone
        parent_gone = True
        if not stop.is_set():
            log.warning("the parent process is gone: stopping")
            stop.set()

    def on_loss(exc: OSError) -> None:
        nonlocal last_loss_log
        hub.stats["rejected"] += 1
        meta = exc.meta if isinstance(exc, fdpass.LostSocket) else {}
        moved = meta.get("adopt")
        if moved is not None and hub.mesh is not None:
            # Its chid came along: take it, and let it go, or nobody may claim it again.
            token = hub.new_token()
            hub.mesh.move(moved["chid"], moved["from"], moved["token"], token)
            hub.mesh.release(moved["chid"], token)
        hub.connection_gone(peer=fdpass.peer_of(meta))
        if loop.time() - last_loss_log >= 1.0:
            last_loss_log = loop.time()
            log.warning("a connection was lost in the hand-off (%s): %d so far",
                        exc, hub.stats["rejected"])

    # libuv opens a reserve descriptor (for its EMFILE trick) with a loop's first
    # stream; open it now, so that an idle worker holds as many descriptors
    # before its first client as after its last one.
    a, b = socket.socketpair()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
    transport.close()
    b.close()
    # uvloop closes that socket on its next loop iteration: let it, so that the
    # descriptors counted once the parent logs "ready" are the idle set.
    while a.fileno() != -1:
        await asyncio.sleep(0)

    ctl = control.ControlServer(control.worker_path(rundir, wid), hub.serve_control,
                                control.WORKER_COMMANDS)
    await ctl.start()
    if config.metrics is not None:
        hub.start_metrics()
    hub.adopt = on_socket
    fdpass.receive_into(loop, channel, hub.took, on_parent_gone, on_loss)
    loop.add_signal_handler(PARENT_GONE, on_parent_gone)
    channel.send(b"ready")
    loop.call_later(BEAT, hub.beat)
    await stop.wait()
    loop.remove_reader(channel)
    await hub.shutdown()
    if hub.pumps is not None:
        hub.pumps.close()
    hub.flush_metrics()
    await ctl.close()
    if hub.mesh is not None:
        hub.mesh.close()
    loop.remove_writer(channel)  # a note still waiting (_send_gone): the parent is stopping
    channel.close()
    return parent_gone


PARENT_GONE = signal.SIGUSR2
"""What the kernel sends a worker when its parent dies (PR_SET_PDEATHSIG).
Not SIGTERM: the parent's own stop must not read as its death. The kernel
sends it when the parent's thread that started the worker ends, so that
getppid() may still name the parent then."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of a worker process: ``python -m fwd.worker WID FD``."""
    import uvloop

    wid, fd = (int(a) for a in (sys.argv[1:] if argv is None else argv))
    # Until serve() serves, this ends the process through the ``finally``
    # below; from then on it drains, as when the channel says the parent is gone.
    signal.signal(PARENT_GONE, _parent_gone)
    die_with_parent(PARENT_GONE)
    channel = socket.socket(fileno=fd)
    message = channel.recv(65536)
    if not message:  # the parent died before it sent anything
        sys.exit(1)
    meta, _ = fdpass.unpack(message)
    parent = meta.pop("parent")
    rundir = meta.pop("rundir")
    if os.getppid() != parent:  # it died before we asked to hear of it
        shutil.rmtree(rundir, ignore_errors=True)
        sys.exit(1)
    incarnation = meta.pop("incarnation")
    meta["listen"] = [tuple(a) for a in meta["listen"]]
    if meta.get("metrics") is not None:
        meta["metrics"] = tuple(meta["metrics"])
    config = Config(**meta)
    setup_logging(config.log_level, f"w{wid}", config.log_format)
    set_title(f"fwd-server: worker {wid}")
    # Ctrl-C and a closed terminal reach the parent too, which drains us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    gone = False
    try:
        gone = uvloop.run(serve(config, wid, channel, rundir, incarnation))
    except _ParentGone:
        gone = True
        raise
    finally:
        if gone:  # killed: nobody else removes its run directory
            shutil.rmtree(rundir, ignore_errors=True)


class _ParentGone(SystemExit):
    pass


def _parent_gone(*_: object) -> None:
    raise _ParentGone(1)


if __name__ == "__main__":
    main()
