"""Pairs handed to threads, and taken back.

A chan pair costs the loop an epoll wake-up, two callbacks under the GIL and
a read and a send (or a few splices) per round. Handed to a ``Pump``, each
direction is a thread blocking outside the GIL, in splice(2) while the stream
is bulk, the shape of the cheapest relay there is (bench/README.md, "The
ceiling"), and in recv(2)/send(2) while its rounds are small, which is the
shortest round trip (64 B ping-pong). A pair is offered after a bulk splice
round, or after ``_PUMP_READS`` (64) reads that each went whole to the other
half. The loop keeps the sessions, their timers and counters, and
takes the sockets back before anything but the pair's own bytes must touch
them: another sender's route reaching one (Router.seal), bytes from another
worker, the end of either session, or a thread that stopped on EOF, an error,
a stuck receiver or a pair quiet for ``IDLE``. Its own reads then find out
what happened, as if the pair had never left (docs/ARCHITECTURE.md, "Pairs
get threads").
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from .runtime import logval
from .sockopts import reset_by_peer

if TYPE_CHECKING:
    from .session import Session
    from .worker import Hub

log = logging.getLogger("fwd.pumps")

RETRY = 1.0
"""Seconds before a pair taken back, or refused for what it is, is offered again."""
RETRY_SOON = 0.01
"""The same for a pair refused for what it has in flight now (a queue, a wait):
that passes, and a 1 GiB stream lasts a quarter of a second."""
STALL = 1.0
"""A pump whose receiver stays full this long (takes only part of each send,
or nothing) gives the pair back, so that the loop's backpressure and
--slow-timeout apply as usual. Not much
shorter: a receiver busy elsewhere for a moment would cost the pair its
threads (and they come back only with the next bulk round after RETRY)."""
IDLE = 2.0
"""A pumped pair quiet both ways for this long gives its threads back, so that
--pump-pairs counts pairs that move bytes: an idle terminal session does not
keep a bulk transfer that comes later out of the threads."""


def hold_offers(loop: asyncio.AbstractEventLoop, delay: float, *relays: Any) -> None:
    """No offer from ``relays`` for ``delay`` seconds (Relay.pump_wait), here
    and in fwd-client's bridge."""
    for r in relays:
        r.pump_wait = True
    loop.call_later(delay, _offers_again, relays)


def _offers_again(relays: tuple[Any, ...]) -> None:
    for r in relays:
        r.pump_wait = False


class Pumps:
    """The pumped pairs of one worker: at most ``pairs`` at a time."""

    def __init__(self, hub: Hub, pump: Any, pairs: int) -> None:
        self.hub = hub
        self._pump = pump  # the compiled Pump class
        self.limit = pairs
        self.running: dict[Session, Any] = {}  # both sessions of a pair -> its Pump
        # Receivers a thread gave up on -> (full since, when it gave up).
        self._stuck: dict[Session, tuple[float, float]] = {}
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        hub.loop.add_reader(self._efd, self._stopped)
        hub.router.on_sealed = self.release

    def offer(self, a: Session) -> None:
        """``a`` had a bulk round, or many reads, that went whole to its one
        receiver (Relay): pump the pair if it is a quiet 1:1 pair on both sides."""
        hub = self.hub
        if a in self.running:
            return
        router = hub.router
        b = router.pair_of(a)
        if b is None or b in self.running or len(self.running) >= 2 * self.limit \
                or not (self._only(a, b) and self._only(b, a)):
            hold_offers(hub.loop, RETRY, a)
            return
        if not (self._quiet(a) and self._quiet(b)):
            hold_offers(hub.loop, RETRY_SOON, a)
            return
        assert a.transport is not None and b.transport is not None
        a.transport.pause_reading()
        b.transport.pause_reading()
        router.seal(a, b)
        try:
            pump = self._pump(a, b, self._efd, STALL, IDLE)
        except OSError as exc:
            router.unseal(a, b)
            a.transport.resume_reading()
            b.transport.resume_reading()
            hold_offers(hub.loop, RETRY, a, b)
            log.debug("pair chid=%s chid=%s not pumped: %s", logval(a.chid), logval(b.chid),
                      exc)
            return
        self.running[a] = self.running[b] = pump
        b.pump_wait = True  # no offer from either while pumped
        hub.stats["pumped_pairs"] += 1
        log.debug("pumping chid=%s <-> chid=%s in two threads", logval(a.chid), logval(b.chid))
        if pump.stopped is not None:  # the second thread did not start
            self.release(a)

    def _only(self, s: Session, partner: Session) -> bool:
        """``s``'s bytes go to ``partner`` and nowhere else."""
        route = self.hub.router.route(s)
        return route.local and route.targets == (partner,)

    def _quiet(self, s: Session) -> bool:
        """Nothing of ``s`` is in flight in the loop: no queue, no wait, no
        half-close, no round owed to the rest of a route."""
        transport = s.transport
        return (s.live and transport is not None and not transport.is_closing()
                and not transport.get_write_buffer_size() and not s.writing_paused
                and s.unsent is None and not (s.read_closed or s.write_closed)
                and not self.hub.backpressure.is_paused(s))

    def release(self, s: Session) -> None:
        """Take ``s``'s pair back (a no-op if it is not pumped): join the
        threads, then send what their pipes held before anything else."""
        self._stuck.pop(s, None)
        pump = self.running.pop(s, None)
        if pump is None:
            return
        a, b = pump.a, pump.b
        self.running.pop(b if s is a else a, None)
        self.hub.router.unseal(a, b)
        why = pump.stopped
        ab, ba = pump.stop()
        bulk, stalled = pump.spliced, pump.stalled
        now = self.hub.loop.time()
        log.debug("pair chid=%s <-> chid=%s back in the loop (%s)", logval(a.chid), logval(b.chid),
                  why or "asked")
        hold_offers(self.hub.loop, RETRY, a, b)
        # A side whose peer reset (a thread's splice failed on it; no FIN was
        # passed on while pumped, so CLOSE is a reset) ends once its reads
        # find that out, and its partner with it. Meanwhile the partner is
        # not read, as a sender behind a full receiver: what it sent would
        # be read only to be thrown away (tens of MiB, explore22).
        gone = {x for x in (a, b)
                if x.transport is not None and reset_by_peer(x.transport)}
        for x in gone:
            x.peer_reset = True
        for x, dst in ((a, b), (b, a)):
            if x.transport is not None and not x.transport.is_closing() \
                    and (dst not in gone or x in gone):
                x.transport.resume_reading()
        for src, dst, rest, spliced, stuck in ((a, b, ab, bulk[0], stalled[0]),
                                               (b, a, ba, bulk[1], stalled[1])):
            # Not to a receiver whose peer reset: its transport would close
            # it before we read what it holds.
            transport = None if dst in gone else dst.transport
            if transport is None:
                if rest:
                    self.hub.drop("discarded", len(rest))
            elif rest is not None:
                if stuck is not None:  # --slow-timeout counts from then (pause_writing)
                    self._stuck[dst] = (stuck, now)
                dst.bytes_out += len(rest)  # the threads count only what dst took
                transport.write(rest)
                src._spliced_rest(dst, rest, now)
            # A way that moved only small rounds keeps no pipe in the loop,
            # which splices only bulk ones: --pump-pairs bounds its pipes too.
            if not (src.bulk or spliced):
                src.close_pipe()

    def full_since(self, s: Session) -> float | None:
        """When ``s`` became full, if a thread gave up on it (its queue in the
        loop is not the start of its wait, if it fills up at once); None
        otherwise."""
        since, when = self._stuck.pop(s, (None, 0.0))
        return since if since is not None and self.hub.loop.time() - when < STALL else None

    def _stopped(self) -> None:
        """A thread stopped on its own: its pair goes back to the loop."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            return
        for pump in {id(p): p for p in self.running.values()}.values():
            if pump.stopped is not None:
                self.release(pump.a)

    def close(self) -> None:
        for s in list(self.running):
            self.release(s)
        self.hub.loop.remove_reader(self._efd)
        os.close(self._efd)

    def __len__(self) -> int:
        """Pairs pumped now."""
        return len(self.running) // 2
