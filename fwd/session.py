"""One client connection: where a byte enters the server.

A Session is an asyncio BufferedProtocol: the event loop reads straight into
the worker's one shared buffer. Its base class, the compiled ``Relay``, sends a
live session's reads to the receivers routing.Router names; what comes before
(handshake lines fed to protocol.Handshake, broadcast-mode sniffing) and what
a read sometimes needs besides (held bytes, other workers, backpressure) is
here. Timers and closing live here too, because they act on the transport.
"""
from __future__ import annotations

import asyncio
import collections
import enum
import functools
import hmac
import logging
import secrets
from typing import TYPE_CHECKING, Any

from . import fdpass
from .config import format_hostport
from .crypto import REJECTED, AeadLineCodec
from .errors import ChidInUse, LineRejected, RemoteProtocolError
from .fastpath import Relay, fanout
from .protocol import (
    NEED_DATA,
    PLAIN,
    Handshake,
    Hs1,
    Hs2,
    Hs3,
    Hs4,
    LineCodec,
    Role,
    Sniff,
    failure_reason,
    sniff,
    to_message,
)
from .runtime import logval, logvals
from .sockopts import (
    RESET_BY_PEER,
    ResetWhenSent,
    reset,
    reset_by_peer,
    set_keepalive,
    unacked,
)

if TYPE_CHECKING:
    from .routing import Route
    from .worker import Hub

log = logging.getLogger("fwd.session")

SNIFF_CONNECT_WINDOW = 0.05
"""Broadcast mode: a silent new connection becomes a plain receiver after this long."""
SNIFF_LINE_WINDOW = 0.005
"""Broadcast mode: a first line starting with ``{`` must end within this long to be an hs1."""
HANDSHAKE_READ = 16 * 1024
"""Largest read before a session is live (bounds what travels if it moves)."""
CLOSE_LINGER = 5.0
"""How long a closing connection may take to flush before it is aborted."""
FAIL_LINGER = 2.0
"""After an hs4 FAIL, how long the server discards what the client still sends
before it closes (see Session._close_failed)."""
FAIL_DISCARD = 1 << 20
"""...and how many bytes at most; a client that sends more is reset."""
END_REASONS: tuple[tuple[str, str], ...] = (
    ("client closed", "closed"),
    ("half-closed both ways", "closed"),
    (f"connection lost: {RESET_BY_PEER}", "reset"),
    ("connection lost", "lost"),
    ("idle timeout", "idle_timeout"),
    ("slow consumer", "slow_consumer"),
    ("held bytes dropped", "held_bytes_dropped"),
    ("pair partner never came", "partner_never_came"),
    ("pair partner left", "partner_left"),
    ("pair partner lost", "partner_lost"),
    ("taken over by", "taken_over"),
    ("kicked by fwd-ctl", "kicked"),
    ("server shutdown", "shutdown"),
    ("handshake failed", "handshake_failed"),
)
"""Session end reason prefix → the label metrics and fwd-ctl count it under."""
END_LABELS = tuple(dict.fromkeys(label for _, label in END_REASONS
                                 if label != "handshake_failed")) + ("other",)
"""What ends are counted under: a session that failed its handshake never
went live, and its end line alone has ``end=handshake_failed``."""


def end_reason(reason: str) -> str:
    """A small fixed set of names for why live sessions end: the reasons
    themselves carry a chid, a peer or an errno text, unfit as a metric label."""
    for prefix, label in END_REASONS:
        if reason.startswith(prefix):
            return label
    return "other"


MOVE_WAIT = 1.0
"""Seconds a just-handshaken session waits at most for the channel to the
parent to take its move (Session._try_move), before it stays where it is."""
PAIR_MARK = 64 * 1024
"""High-water mark for the receiver of a 1->1 route, instead of --max-buffer: its
sender waits early and its bytes stay in the kernel's socket buffers, so what the
relay does copy is still in the CPU cache when it is sent (socat-like)."""


class St(enum.Enum):
    SNIFF = "sniff"
    HANDSHAKE = "handshake"
    LIVE = "live"
    CLOSED = "closed"


def _flag(bit: int) -> Any:
    """A boolean attribute stored as one bit of ``Session.flags``."""

    def get(self: Session) -> bool:
        return bool(self.flags & bit)

    def put(self: Session, on: bool) -> None:
        self.flags = self.flags | bit if on else self.flags & ~bit

    return property(get, put)


class Session(Relay, asyncio.BufferedProtocol):
    # Relay holds hub, transport, route, fd, last_active, bytes_in, bytes_out,
    # writing_paused and live: what the hot path reads and writes.
    __slots__ = (
        "state", "peer", "chid", "hs", "sniffed", "pending_out",
        "pending_size", "timeout", "timer", "slow_timer", "linger",
        "started", "live_since", "dropped",
        "partner", "nonce", "token", "adopted", "home_hint", "recvers", "flags",
    )

    def __init__(self, hub: Hub, adopted: tuple[dict[str, Any], bytes] | None = None,
                 fd: int = -1, peer: str = "?") -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.route: Route[Session] | None = None
        self.live = False  # mirrors state is St.LIVE, for the compiled read path
        self.state = St.SNIFF
        self.peer = peer  # as the parent wrote it, [::1]:port
        self.chid: str | None = None
        self.hs: Handshake | None = None
        self.sniffed = b""
        self.pending_out: collections.deque[bytes | memoryview] | None = None
        self.pending_size = 0
        self.timeout = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.slow_timer: asyncio.TimerHandle | None = None
        self.linger: asyncio.TimerHandle | ResetWhenSent | None = None
        self.last_active = 0.0
        self.writing_paused = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = 0.0
        self.dropped = 0
        self.flags = 0  # the flag properties below: one slot, not six (idle memory)
        self.partner: Session | None = None
        self.nonce: str | None = None  # hs2's token, encrypted handshake only
        # Names this session to the coordinator (several workers only).
        self.token = 0 if hub.mesh is None else hub.new_token()
        self.home_hint: int | None = None  # where sessions that name our chid live
        self.fd = fd  # the socket, for send() straight from the read buffer
        self.bulk = False
        self.pipe_r = self.pipe_w = -1  # a splice pipe, once a bulk stream needs one
        self.unsent = None  # see Relay.flush_rest
        self.pump_wait = False  # see Pumps.offer
        self.peer_reset = False  # see Relay; its EOF is a reset then, even after our FIN
        self.recvers: tuple[str, ...] = ()  # as named in hs3; () is everyone else
        self.adopted = adopted

    # Half-close state of a chan pair (see eof_received).
    read_closed = _flag(1)
    write_closed = _flag(2)
    claiming = _flag(4)  # waiting on the other processes (claim, place, wake)
    moved = _flag(8)  # handed to another worker: its chid goes with it
    counted_out = _flag(16)  # the parent was told this connection is gone
    tight = _flag(32)  # PAIR_MARK applies (see _tighten)
    named = _flag(64)  # sessions elsewhere name our chid: announce when live
    announced = _flag(128)  # the coordinator knows we are live
    told_full = _flag(256)  # the other workers know we are above our mark
    eof_early = _flag(512)  # its client's EOF waits: for its hs4 (moved here), or held_pending
    shut_pending = _flag(1024)  # its partner's FIN waits to be passed on (held_pending)

    # -- asyncio callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        hub = self.hub
        if self.peer == "?":  # not from the parent's hand-off
            peer = transport.get_extra_info("peername")
            if peer:
                self.peer = format_hostport(peer[0], peer[1])
        # A moved session was admitted already (and its chid travels with it:
        # refusing it here would strand that chid).
        if not hub.admit(self, limit=self.adopted is None):
            self.state = St.CLOSED
            hub.tell_refused(self.fd if self.fd >= 0
                             else transport.get_extra_info("socket").fileno())
            transport.abort()
            return
        if self.fd < 0:
            # Not from a worker's hand-off (whose listener already set keepalive).
            # uvloop keeps the socket object this creates: about 70 bytes, the
            # reason the worker passes the descriptor in instead.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                set_keepalive(sock)
                self.fd = sock.fileno()
        transport.set_write_buffer_limits(high=hub.config.max_buffer)
        loop = hub.loop
        self.started = self.last_active = loop.time()
        self.live_since = 0.0  # when it went live: held bytes of its chid's are its own since
        self.timeout = hub.config.idle_timeout  # hs3 may override it
        if self.adopted is not None:
            adopted, self.adopted = self.adopted, None  # keep no bytes for the session's life
            self._adopt(*adopted)
            return
        if hub.config.mode == "chan" or hub.key is not None:
            # With a password there is no sniffing: everyone must handshake.
            self._start_handshake()
        else:
            self.pending_out = collections.deque()
            hub.pending.add(self)
            self.timer = loop.call_later(SNIFF_CONNECT_WINDOW, self._sniff_expired)

    def _read_early(self, nbytes: int) -> None:
        """A read before the session is live (Relay.buffer_updated)."""
        if self.state is St.CLOSED:  # after an hs4 FAIL (_close_failed)
            self.dropped += nbytes
            if self.dropped > FAIL_DISCARD:
                self._discarded()
            return
        chunk = bytes(self.hub.view[:nbytes])
        if self.state is St.HANDSHAKE:
            if self.hs is None:  # moved here, its hs4 still to come (_adopt)
                self._keep_early(chunk)
            else:
                self._handshake_input(chunk)
        elif self.state is St.SNIFF:
            self._sniff_input(chunk)

    def _queued(self, route: Route[Session], chunk: bytes, nbytes: int, now: float) -> None:
        """Part of a read had to be queued: the only receiver of a 1->1 route
        gets PAIR_MARK (see _tighten)."""
        if len(route.targets) == 1 and not route.targets[0].tight:
            target = route.targets[0]
            target._tighten()
            if target.writing_paused:  # already above the new mark: wait now
                self._wait_for([target])

    def _spliced_rest(self, target: Session, rest: bytes, now: float) -> None:
        """What a receiver did not take of a splice round is in its queue: the
        same rules as for a queued read, once uvloop is out of its callback.
        The rest of the route had the round already (flush_rest)."""
        route = self.route
        if self.transport is None or target.transport is None or route is None \
                or target not in route.targets:
            return
        if target.writing_paused:
            self._wait_for([target])
        else:
            self._queued(route, rest, len(rest), now)

    def eof_received(self) -> bool:
        # In a chan pair the FIN is passed on and the other direction keeps
        # flowing, as through socat. Anywhere else a client's EOF ends its
        # session (as with ncat --broker): its chid is freed now, and the
        # transport closes once queued bytes are flushed.
        self.flush_rest()
        transport = self.transport
        if transport is not None and (self.peer_reset or (
                not self.write_closed and reset_by_peer(transport))):
            self._lost_to_reset(transport)
            return True
        if self.state is St.HANDSHAKE and self.hs is None:  # moved here (_keep_early)
            self.eof_early = True
            return True
        if self.state is St.HANDSHAKE:
            self._fail("connection closed during handshake", drain=False)
            return True
        if self.state is St.CLOSED:  # the client's EOF after our hs4 FAIL
            self._discarded()
            return True
        if self.state is St.LIVE and self.held_pending():
            self.eof_early = True  # our end waits for what other workers held for us
            return True
        if self.state is St.LIVE:
            partner = self.hub.router.pair_of(self)
            if partner is not None and self.dropped:
                # What the hold dropped of ours (full, or expired before the
                # partner came) is missing from its stream: a cut, not an end.
                self.close("held bytes dropped", cut=True)
                return True
            if partner is not None:
                self.read_closed = True
                self.partner, partner.partner = partner, self
                partner._shut_write()
                self._close_if_done()
                return True
            if self._await_partner():
                return True
        if self.state is St.SNIFF and (self.sniffed or self.pending_out):
            # A plain client after all: what others sent it meanwhile is
            # written before its end, as for any client's EOF (§3.7).
            self._sniff_expired()
        self.close("client closed")
        return True

    def peer_gone(self) -> None:
        """A send to us failed: our client reset. Our reads end the session,
        after what our kernel still holds from the client (even if they wait
        for a receiver to drain), unless none will come: the client had sent
        its FIN already. The send took the reset, so that the read finds an
        EOF; after our own FIN (its partner's, passed on) that EOF would pass
        for its client's FIN, and the partner would take a cut stream for a
        whole one: ``peer_reset`` says it is none."""
        self.peer_reset = True
        transport = self.transport
        if self.read_closed and transport is not None and self.state is not St.CLOSED:
            self._lost_to_reset(transport)

    def _lost_to_reset(self, transport: asyncio.Transport) -> None:
        """Our client reset, and the fast path took the error: end as uvloop
        would have on reading it (connection_lost), a cut for a pair partner."""
        self._leave(f"connection lost: {RESET_BY_PEER}", cut=True)
        reset(transport)

    def _await_partner(self) -> bool:
        """Our FIN came while the one chid we name is not live: if it is the
        partner of a pair to be (it names only us when it comes), it gets our
        FIN after the bytes held for it, as in a pair (§3.7). So we stay,
        half-closed, as long as our bytes wait for it (--hold-seconds from the
        oldest held). If the hold dropped some of our bytes, we are reset
        instead: our stream was cut. False: no pair can form, or nothing of
        ours waits for it; the FIN ends us as elsewhere."""
        hub = self.hub
        router = hub.router
        if len(self.recvers) != 1 or self.chid is None:
            return False  # no pair
        chid = self.recvers[0]
        owner = router.owner(chid)
        if (chid == self.chid or (owner is not None and owner.state is St.LIVE)
                or router.where(chid) is not None or hub.config.hold_seconds <= 0):
            return False  # live and not naming us (no pair), or elsewhere
        if self.dropped:  # the hold dropped some: its partner to be gets a cut stream
            self.close("held bytes dropped", cut=True)
            return True
        first = router.held_from(chid, self.chid, self.live_since)
        if first is None:
            return False  # nothing of ours waits for it (an earlier session took it)
        self.read_closed = True
        # Until our oldest held byte expires.
        hub.awaiting.setdefault(chid, {})[self] = first + hub.config.hold_seconds
        hub.watch_holds()
        log.debug("chid=%s half-closed; waits for chid=%s", logval(self.chid), logval(chid))
        return True

    def partner_never_came(self) -> None:
        """Our bytes for the partner to be expire (Hub._expire_holds, in the
        tick that drops them): our stream was cut."""
        if self.state is St.LIVE and self.partner is None:
            self.close("pair partner never came", cut=True)

    def awaiting_partner(self) -> bool:
        """Half-closed, waiting for our partner to be (_await_partner)."""
        return (self.read_closed and self.partner is None and bool(self.recvers)
                and self in self.hub.awaiting.get(self.recvers[0], ()))

    def _stop_awaiting(self) -> None:
        """Leave Hub.awaiting."""
        waiting = self.hub.awaiting.get(self.recvers[0]) if self.recvers else None
        if waiting is not None and waiting.pop(self, None) is not None and not waiting:
            del self.hub.awaiting[self.recvers[0]]

    def _pair_waiting(self) -> None:
        """We just went live: sessions that half-closed while we were not here
        (_await_partner) had their bytes held for us. The one that names only
        us, if we name only it, is our pair partner now, and its FIN is ours
        (after those bytes); for any other their FIN ends them now, or a reset
        if we do not hear them (hs3 senders): their bytes were dropped."""
        hub = self.hub
        assert self.chid is not None
        waiting = hub.awaiting.pop(self.chid, None)
        if not waiting:
            return
        partner = hub.router.pair_of(self)
        for w in list(waiting):
            if w is partner and w.state is St.LIVE and w.partner is None:
                self.partner, w.partner = w, self
                self._shut_write()
            elif not hub.router.accepts(self, w.chid):
                w.not_heard()
            else:
                w.no_partner()

    def no_partner(self) -> None:
        """The chid we wait for (_await_partner) went live, not as our pair
        partner, or on another worker: our bytes went to it, and our FIN
        ends us now, as outside a pair."""
        if self.state is St.LIVE and self.partner is None and self.read_closed:
            self.close("client closed")

    def not_heard(self) -> None:
        """The chid we wait for (_await_partner) went live, here or on another
        worker, refusing our bytes (its hs3 senders): they were dropped, so our
        stream was cut."""
        if self.state is St.LIVE and self.partner is None and self.read_closed:
            self.close("held bytes dropped", cut=True)

    def _shut_write(self) -> None:
        """Pass the partner's FIN on: nothing more will be written to us."""
        if self.write_closed or self.transport is None:
            return
        if self.held_pending():
            self.shut_pending = True  # after what other workers held for us
            return
        self.write_closed = True
        self.hub.router.mute(self)
        self.transport.write_eof()  # uvloop sends the FIN after queued bytes
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.read_closed and self.write_closed:
            self.close("half-closed both ways")

    def connection_lost(self, exc: Exception | None) -> None:
        transport = self.transport
        discarded = transport.get_write_buffer_size() if transport is not None else 0
        discarded += self.hub.reset_lost.pop(self, 0)
        if discarded:  # a reset (ours) dropped what was still queued: never delivered
            self.bytes_out -= discarded
            self.hub.drop("discarded", discarded)
        ending = self.hub.flushing.pop(self, None)
        if ending is not None:  # its flush is over
            self._log_end(*ending)
        if self.hub.pumps is not None:
            self.hub.pumps.release(self)
        self.flush_rest()  # what was read before the end still goes out
        self.close_pipe()
        reason = "connection lost" if exc is None else f"connection lost: {exc}"
        if self.state is St.HANDSHAKE and self.hs is not None:  # not moved here
            # A failed handshake (a reset, where a FIN is _fail's), as §9.5 says.
            desc = "connection closed during handshake" + (f" ({exc})" if exc else "")
            self.hub.note_failure(failure_reason(desc))
            log.info("handshake failed peer=%s desc=%s", self.peer, logval(desc),
                     extra={"fields": {"event": "handshake_failed", "peer": self.peer,
                                       "chid": self.chid, "desc": desc,
                                       "reason": failure_reason(desc)}})
            reason = f"handshake failed: {desc}"
        self._leave(reason, cut=True, lost=True)
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self.hub.release(self)
        self.transport = None
        self.hub.settle_held(self)

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.state is St.LIVE:
            hub = self.hub
            slow = hub.config.slow_timeout
            if slow > 0:
                since = hub.pumps.full_since(self) if hub.pumps is not None else None
                if since is not None:  # a pump thread waited on us first
                    slow = max(since + slow - hub.loop.time(), 0.0)
                self.slow_timer = hub.loop.call_later(slow, self._slow_consumer)
            self.tell_full()

    def tell_full(self) -> None:
        """Senders on other workers wait while we are above --max-buffer. A
        tight receiver (see _tighten) pauses its local sender at PAIR_MARK
        already, and only bytes from other workers can take it past
        --max-buffer: it tells them then (Hub.deliver), not at each crossing
        of PAIR_MARK, which in a bulk pair is over a thousand notices a second
        to every other worker."""
        if self.told_full or self.hub.mesh is None or self.state is not St.LIVE:
            return
        if self.tight and self.transport is not None \
                and self.transport.get_write_buffer_size() <= self.hub.config.max_buffer:
            return
        self.told_full = True
        self.hub.stats["full_notices"] += 1
        self.hub.mesh.signal(True, self.chid, self.hub.router.senders_of(self))

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.hub.settle_held(self)
        if self.slow_timer is not None:
            self.slow_timer.cancel()
            self.slow_timer = None
        if self.told_full:
            self.told_full = False
            self.hub.mesh.signal(False, self.chid, self.hub.router.senders_of(self))
        self.hub.resume_senders(self.hub.backpressure.release(self))

    # -- broadcast sniffing ---------------------------------------------------------

    def _sniff_input(self, chunk: bytes) -> None:
        first = not self.sniffed
        self.sniffed += chunk
        verdict = sniff(self.sniffed)
        if verdict is Sniff.DATA:
            self._sniff_expired()
        elif verdict is Sniff.HANDSHAKE:
            self._cancel_timer()
            self.hub.pending.discard(self)
            self._drop_pending()  # a handshake client gets no broadcast from before
            data, self.sniffed = self.sniffed, b""
            self._start_handshake()
            self._handshake_input(data)
        elif first:
            self._cancel_timer()
            self.timer = self.hub.loop.call_later(SNIFF_LINE_WINDOW, self._sniff_expired)

    def _sniff_expired(self) -> None:
        """Not a handshake: a plain broadcast client from now on."""
        if self.state is not St.SNIFF:
            return
        data, self.sniffed = self.sniffed, b""
        self._go_live((), data)

    # -- handshake --------------------------------------------------------------------

    def _start_handshake(self) -> None:
        self._cancel_timer()
        self.state = St.HANDSHAKE
        self.hs = Handshake(Role.SERVER, self._codec())
        limit = self.hub.config.handshake_timeout
        if limit > 0:
            remaining = self.started + limit - self.hub.loop.time()
            self.timer = self.hub.loop.call_later(
                max(remaining, 0), self._fail, "handshake timeout")

    def _codec(self) -> LineCodec:
        """How handshake lines are written here. A moved session (no ``hs``)
        gets an encrypted FAIL with a password: its client was authentic."""
        key = self.hub.key
        return PLAIN if key is None else AeadLineCodec(key, Role.SERVER)

    def _handshake_input(self, chunk: bytes) -> None:
        hs = self.hs
        assert hs is not None and self.transport is not None
        hs.receive_data(chunk)
        self._pump()

    def _pump(self) -> None:
        """Act on every handshake line already received."""
        hs = self.hs
        assert hs is not None and self.transport is not None
        try:
            while self.state is St.HANDSHAKE and not self.claiming:
                event = hs.next_event()
                if event is NEED_DATA:
                    return
                if isinstance(event, Hs1):
                    self._on_hs1(event)
                elif isinstance(event, Hs3):
                    # surrogatepass: a client's nonce may hold a lone surrogate.
                    if self.nonce is not None and not (
                            event.nonce is not None and hmac.compare_digest(
                                event.nonce.encode("utf-8", "surrogatepass"),
                                self.nonce.encode())):
                        raise RemoteProtocolError("hs3 nonce does not match hs2")
                    if event.timeout is not None:
                        self.timeout = float(event.timeout)
                    if event.senders is not None:
                        self.hub.router.accept_only(self, event.senders)
                    mesh = self.hub.mesh
                    home = None
                    if mesh is not None and self.chid is not None:
                        known, home = self.hub.place_locally(event.recvers, self.home_hint)
                        if not known:
                            # A receiver this worker has not heard of may have just
                            # gone live elsewhere: ask where it belongs.
                            self.claiming = True
                            self.transport.pause_reading()
                            mesh.place(self.chid, event.recvers,
                                       functools.partial(self._on_placed, event.recvers))
                            return
                    self._finish_handshake(event.recvers, home)
        except LineRejected as exc:
            self._fail(exc.desc, rejected=exc.reason)
        except RemoteProtocolError as exc:
            self._fail(exc.desc)

    def _on_hs1(self, event: Hs1) -> None:
        hub = self.hub
        if hub.mesh is not None:
            # Several workers: only the coordinator can say whether the chid
            # is free, and only it may draw one: a chid a worker drew and
            # recorded without waiting could reach a client, and through it
            # another worker, before the record. Read nothing more until it
            # answers.
            self.claiming = True
            assert self.transport is not None
            self.transport.pause_reading()
            hub.mesh.claim(event.chid, self.token, hub.config.takeover, self.peer,
                           functools.partial(self._on_claimed, event.chid))
            return
        try:
            chid, evicted = hub.router.claim(self, event.chid, takeover=hub.config.takeover)
        except ChidInUse as exc:
            raise RemoteProtocolError(f"chid in use: {exc.chid}") from None
        if evicted is not None:
            evicted.evict(self.peer)
        self._send_hs2(chid)

    def _on_claimed(self, asked: str | None, chid: str | None, home: int | None) -> None:
        hub = self.hub
        self.claiming = False
        self.home_hint = home
        if self.state is not St.HANDSHAKE:
            if chid is not None and hub.mesh is not None:
                hub.mesh.release(chid, self.token)  # we left while it was being decided
            return
        if chid is None:
            self._fail(f"chid in use: {asked}")
            return
        _, evicted = hub.router.claim(self, chid, takeover=True)
        if evicted is not None:  # the coordinator already evicted it; be sure locally
            evicted.evict(self.peer)
        self._send_hs2(chid)
        assert self.transport is not None
        self.transport.resume_reading()
        self._pump()

    def _send_hs2(self, chid: str) -> None:
        self.chid = chid
        assert self.hs is not None and self.transport is not None
        if self.hub.key is not None:
            self.nonce = secrets.token_hex(16)
        self.transport.write(self.hs.send(Hs2(chid, self.nonce)))

    def _on_placed(self, recvers: tuple[str, ...], home: int | None) -> None:
        self.claiming = False
        if self.state is not St.HANDSHAKE:
            return
        self._finish_handshake(recvers, home)
        if self.state is St.LIVE and self.transport is not None:
            self.transport.resume_reading()

    def _finish_handshake(self, recvers: tuple[str, ...], home: int | None) -> None:
        hs = self.hs
        assert hs is not None and self.transport is not None
        # The client is done in time; what remains (waking the other workers,
        # a move) is the server's own bounded wait, and OK is decided.
        self._cancel_timer()
        ok = hs.send(Hs4(True))
        trailing = hs.trailing_data
        # A moving session gets its hs4 from its new worker, once it is live
        # there: a client never sees OK before its receivers can reach it.
        if home is not None and home != self.hub.wid:
            self._try_move(home, recvers, ok, trailing, self.hub.loop.time() + MOVE_WAIT)
            return
        self._send_hs4(ok, recvers, trailing)

    def _try_move(self, home: int, recvers: tuple[str, ...], ok: bytes, trailing: bytes,
                  deadline: float) -> None:
        """Move to ``home``, or stay and go live here. A full channel to the
        parent (a burst of handshakes, the parent behind) is waited for, up
        to MOVE_WAIT: a pair split between two workers passes no FIN on."""
        self.claiming = False
        self._cancel_timer()
        self.hub.forget_channel_wait(self)  # whichever came first, the other is moot
        if self.state is St.CLOSED or self.transport is None:
            return
        moved = None
        if not any(self.hub.router.live(c) is not None for c in recvers):
            moved = self._move(home, recvers, ok, trailing)
            now = self.hub.loop.time()
            if moved is None and now < deadline:
                log.debug("chid=%s peer=%s waits for the channel to the parent to move",
                          logval(self.chid), self.peer)
                self.claiming = True  # nothing more from the client meanwhile
                self.transport.pause_reading()
                again = functools.partial(self._move_again, home, recvers, ok, trailing,
                                          deadline)
                self.hub.when_channel_free(self, again)  # whichever comes first
                self.timer = self.hub.loop.call_later(deadline - now, again)
                return
        if not moved:
            self.transport.resume_reading()
            self._send_hs4(ok, recvers, trailing)

    def _move_again(self, home: int, recvers: tuple[str, ...], ok: bytes, trailing: bytes,
                    deadline: float) -> None:
        """The channel took messages again, or MOVE_WAIT passed: the first of
        the two tries once more (or goes live here), and drops the other."""
        if self.claiming and self.state is St.HANDSHAKE:
            self._try_move(home, recvers, ok, trailing, deadline)

    def _send_hs4(self, ok: bytes, recvers: tuple[str, ...], first: bytes) -> None:
        """hs4 OK and live, once the other workers know this one has live
        sessions (Hub.when_awake): a client that got OK then gets every
        "everyone" byte sent after it."""
        if self.hub.when_awake(functools.partial(self._woken, ok, recvers, first)):
            self.claiming = True  # nothing more from the client meanwhile
            assert self.transport is not None
            self.transport.pause_reading()
            return
        assert self.transport is not None
        self.transport.write(ok)
        self._go_live(recvers, first)

    def _woken(self, ok: bytes, recvers: tuple[str, ...], first: bytes) -> None:
        if self.state is not St.HANDSHAKE or self.transport is None:  # OK is sent once
            return
        self.claiming = False
        self.transport.write(ok)
        self._go_live(recvers, first)
        self.transport.resume_reading()

    def _move(self, home: int, recvers: tuple[str, ...], ok: bytes,
              trailing: bytes) -> bool | None:
        """Hand this just-handshaken session to worker ``home``, where its
        receivers live, so that its bytes never cross processes. False if it
        cannot move (it then stays here, and its bytes cross); None if the
        channel to the parent is full now. Reading is paused unless it went."""
        transport = self.transport
        assert transport is not None and self.chid is not None
        if transport.get_write_buffer_size() or len(trailing) > fdpass.MAX_DATA:
            return False  # what we wrote must be on the wire before the socket moves
        sock = transport.get_extra_info("socket")
        senders = self.hub.router.senders_of(self)
        meta = {"adopt": {"chid": self.chid, "token": self.token, "from": self.hub.wid,
                          "recvers": list(recvers), "timeout": self.timeout,
                          "senders": None if senders is None else sorted(senders),
                          "peer": self.peer, "hs4": ok.decode("ascii")}, "to": home}
        transport.pause_reading()
        sent = self.hub.send_to_parent(sock.fileno(), meta, trailing)
        if not sent:
            return sent
        log.debug("moving chid=%s peer=%s to worker %d", logval(self.chid), self.peer, home)
        self.moved = True
        self._leave("moved")
        transport.abort()  # our descriptor only: the parent holds the socket now
        return True

    def _adopt(self, meta: dict[str, Any], first: bytes) -> None:
        """A session another worker handshook and moved here. Until its hs4 it
        is still in its handshake, whose reads were paused on its old worker:
        what its client sends meanwhile, EOF included, waits for its hs4
        (_keep_early), and a shutdown or a kick owes it an hs4 FAIL (end)."""
        hub = self.hub
        self.state = St.HANDSHAKE
        chid = meta["chid"]
        self.peer = meta["peer"]
        self.timeout = meta["timeout"]
        _, evicted = hub.router.claim(self, chid, takeover=True)
        if evicted is not None:
            evicted.evict(self.peer)
        self.chid = chid
        if meta.get("senders") is not None:
            hub.router.accept_only(self, meta["senders"])
        assert hub.mesh is not None and self.transport is not None
        hub.mesh.move(chid, meta["from"], meta["token"], self.token)
        self.named = True  # it moved here to be near sessions: they must hear of it
        ok, recvers = meta["hs4"].encode("ascii"), tuple(meta["recvers"])
        if not hub.place_locally(recvers, None)[0]:
            # This worker does not know where all its receivers are yet.
            self.claiming = True
            self.transport.pause_reading()
            hub.mesh.place(chid, recvers, functools.partial(self._located, ok, recvers, first))
            return
        self._send_hs4(ok, recvers, first)

    def _keep_early(self, chunk: bytes) -> None:
        """A moved session's stream before its hs4 (pipelined, §2.4): kept for
        _go_live, and reading stops (its EOF waits too: eof_early). uvloop
        starts reading a socket after connection_made even if it was paused
        there (asyncio did too, until CPython gh-103607), so _adopt's pause
        does not hold: this one does."""
        self.sniffed += chunk
        assert self.transport is not None
        self.transport.pause_reading()

    def _located(self, ok: bytes, recvers: tuple[str, ...], first: bytes,
                 _home: int | None) -> None:
        self.claiming = False
        if self.state is St.CLOSED or self.transport is None:
            return
        self._send_hs4(ok, recvers, first)
        if self.state is St.LIVE and self.transport is not None:
            self.transport.resume_reading()

    def _fail(self, desc: str, rejected: str | None = None, count: bool = True,
              drain: bool = True) -> None:
        """Answer with one hs4 FAIL line, then close (after _close_failed's
        discarding, for a failure of the client's that may send on: ``drain``).

        With a password, a peer that has not sent one authentic line, or whose
        line did not decode (``rejected`` holds why, for the log), gets the
        plain ``handshake rejected`` line; a key holder gets its real reason,
        encrypted (docs/PROTOCOL.md §7.5). ``count``: a failure of the
        client's, for the metrics (not a shutdown or a kick).
        """
        if self.state is St.CLOSED or self.transport is None:
            return
        hs = self.hs
        codec = hs.codec if hs is not None else None
        if isinstance(codec, AeadLineCodec) and (rejected or not codec.authenticated):
            line = PLAIN.encode(to_message(Hs4(False, REJECTED)))
            if desc != REJECTED:
                rejected = desc
            desc = REJECTED
        else:
            fail = Hs4(False, desc)
            if hs is not None and hs.refusable:
                line = hs.send(fail)
            else:  # moved here, or its OK decided but never written (end)
                line = (hs.codec if hs is not None else self._codec()).encode(to_message(fail))
        reason = failure_reason(desc)
        if rejected and failure_reason(rejected) in ("timeout", "closed"):
            reason = failure_reason(rejected)  # the client's silence, not its password
        if count:
            self.hub.note_failure(reason)
        fields = {"event": "handshake_failed", "peer": self.peer, "chid": self.chid,
                  "desc": desc, "reason": reason}
        if rejected and rejected != desc:
            fields["why"] = rejected
            log.info("handshake failed peer=%s desc=%s why=%s", self.peer, logval(desc),
                     logval(rejected), extra={"fields": fields})
        else:
            log.info("handshake failed peer=%s desc=%s", self.peer, logval(desc),
                     extra={"fields": fields})
        self.transport.write(line)
        if count and drain:
            self._close_failed(f"handshake failed: {desc}")
        else:
            self.close(f"handshake failed: {desc}")

    def _close_failed(self, reason: str) -> None:
        """Closing a socket with unread bytes resets it, and a client's stack
        may then drop the FAIL line it has not read yet (Windows does): send
        our FIN behind the line, and read and discard what the client still
        sends until its EOF, FAIL_LINGER seconds or FAIL_DISCARD bytes, then
        close (nginx's lingering close). The connection counts against the
        limits until then."""
        transport = self.transport
        assert transport is not None
        self._leave(reason)
        self.write_closed = True  # our FIN: the client's EOF is no reset (reset_by_peer)
        transport.write_eof()
        transport.resume_reading()
        self.linger = self.hub.loop.call_later(FAIL_LINGER, self._discarded)

    def _discarded(self) -> None:
        """The end of _close_failed's discarding: close, reset if unread bytes
        are left (the kernel does that) or the line is not out in CLOSE_LINGER."""
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            self.linger = self.hub.loop.call_later(CLOSE_LINGER, reset, transport)

    # -- live -------------------------------------------------------------------------

    def _go_live(self, recvers: tuple[str, ...], first: bytes) -> None:
        hub = self.hub
        transport = self.transport
        assert transport is not None
        self._cancel_timer()
        self.state = St.LIVE
        self.live = True
        self.live_since = hub.loop.time()
        self.hs = None
        self.recvers = recvers
        hub.pending.discard(self)
        held = hub.router.join(self, recvers)
        for chunk in held:
            self.bytes_out += len(chunk)
            transport.write(chunk)
        hub.queued_held(self, sum(map(len, held)))
        if hub.mesh is not None:
            hub.went_live()
            hub.sync_wants()  # what was held for it here is its now
        if (hub.mesh is not None and self.chid is not None
                and (recvers or self.named or self.home_hint is not None)):
            self._announce()
        if self.pending_out:
            for chunk in self.pending_out:
                self.bytes_out += len(chunk)
                transport.write(chunk)
        self.pending_out = None
        if self.sniffed:  # what a moved session's client sent before its hs4
            first, self.sniffed = first + self.sniffed, b""
        self.last_active = hub.loop.time()
        mode = "broadcast" if self.chid is None else "chan"
        hub.stats[f"sessions_{mode}"] += 1
        allowed = hub.router.senders_of(self)
        senders = None if allowed is None else sorted(allowed)
        log.info("session start chid=%s peer=%s worker=%d mode=%s recvers=%s%s",
                 logval(self.chid), self.peer, hub.wid, mode, logvals(recvers) or "*",
                 "" if senders is None else " senders=" + logvals(senders),
                 extra={"fields": {"event": "session_start", "chid": self.chid,
                                   "peer": self.peer, "worker": hub.wid, "mode": mode,
                                   "recvers": list(recvers) or None, "senders": senders}})
        if self.timeout > 0:
            self.timer = hub.loop.call_later(self.timeout, self._idle_check, self._written())
        if self.chid is not None and hub.awaiting:
            self._pair_waiting()
        if first:
            self._forward(first)
        if self.eof_early and self.state is St.LIVE:
            self.eof_early = False
            self.eof_received()

    def wanted(self) -> None:
        """The coordinator asks: sessions elsewhere name our chid (Hub.watch)."""
        if self.state is St.LIVE:
            if not self.announced:
                self._announce()
        elif self.state is not St.CLOSED:
            self.named = True

    def _announce(self) -> None:
        """Tell the coordinator we are live: it registers what we name, and tells
        the workers whose sessions name us where we are. Sessions that name
        nothing and that nobody names skip this (one message less per handshake)."""
        assert self.hub.mesh is not None and self.chid is not None
        self.announced = True
        self.hub.await_held(self)
        self.hub.mesh.live(self.chid, self.token, self.recvers,
                           self.hub.router.senders_of(self))

    def held_pending(self) -> bool:
        """Other workers are still sending what they held for us (Hub.await_held):
        our stream must not end before it arrived."""
        wait = self.hub.held_waits.get(self.chid) if self.chid is not None else None
        return wait is not None and wait.session is self

    def held_arrived(self) -> None:
        """What other workers held for us is here (or HELD_WAIT passed): the
        ends that waited for it go on."""
        if self.state is not St.LIVE:
            return
        if self.shut_pending:
            self.shut_pending = False
            self._shut_write()
        if self.eof_early:
            self.eof_early = False
            self.eof_received()

    def _forward(self, chunk: bytes) -> None:
        """Route bytes the session already holds (the first bytes after hs3);
        the same steps as the hot path in buffer_updated, from a bytes object.
        They were read before the meter saw the session: --max-rate charges
        them now (inside: this may run in the read callback of hs3)."""
        hub = self.hub
        now = self.last_active = hub.loop.time()
        self.bytes_in += len(chunk)
        if hub.config.max_rate:
            hub.meter(self, len(chunk), now, inside=True)
        route = hub.router.route(self)
        full = fanout(chunk, route.targets, self, now)
        self._route_rest(route, chunk, len(chunk), now, full)

    def _route_unsent(self, route: Route[Session], chunk: bytes, now: float,
                      served: list[Session]) -> None:
        """A tee round went to ``served``, the local receivers when it was
        read; the rest of its route gets it now (Relay.flush_rest). Sessions
        that went live since, in the same loop turn, took their hold or
        their sniff queue without it: it goes to them now, as live bytes,
        not into a hold (or a queue) nobody reads any more."""
        full = None
        if route.generation != self.hub.router.generation and self.state is St.LIVE:
            self.route = route = self.hub.router.route(self)
            late = tuple(t for t in route.targets if t not in served)
            if late:
                full = fanout(chunk, late, self, now)
        self._route_rest(route, chunk, len(chunk), now, full)

    def _route_rest(self, route: Route[Session], chunk: bytes | None, n: int, now: float,
                    full: list[Any] | None) -> None:
        """Everything but the local receivers: other workers, sessions still in
        their sniff window, held bytes; then pause this sender if it must wait."""
        hub = self.hub
        # "Everyone" bytes skip the other workers while they all sleep (chan
        # mode): then there is nothing to copy for them either.
        remote = hub.mesh is not None and bool(route.remote or (
            route.to_all and hub.reaches_peers()))
        if chunk is None and (route.missing or remote or (route.to_all and hub.pending)):
            chunk = bytes(hub.view[:n])  # these keep the bytes: one copy for all of them
        if remote:
            assert chunk is not None
            waits = hub.forward_remote(route, chunk, self.chid)
            if waits:
                full = (full or []) + waits
        if route.closed:  # named, but they sent their FIN: nothing reaches them
            hub.drop("receiver_closed", n * route.closed)
        if route.to_all:
            if hub.pending:
                assert chunk is not None
                for p in hub.pending:
                    p._queue_pending(chunk)
            elif (not route.targets or (len(route.targets) == 1 and route.targets[0] is self)) \
                    and not hub.peers_live():
                hub.drop("no_receiver", n)  # nobody else anywhere
        elif route.missing:
            assert chunk is not None
            for chid in route.missing:
                dropped = hub.router.hold(chid, chunk, now, self.chid)
                if dropped:
                    self._note_dropped(chid, dropped)
            hub.watch_holds()
        if full:
            self._wait_for(full)

    def _wait_for(self, full: list[Any]) -> None:
        """Pause this sender until every one of ``full`` has drained."""
        pause = False
        for target in full:
            pause |= self.hub.backpressure.block(self, target)
        if pause and self.transport is not None:
            log.debug("paused chid=%s: a receiver is above its high-water mark",
                      logval(self.chid))
            self.transport.pause_reading()

    def _tighten(self) -> None:
        """Bytes queued for us as the one receiver of a 1->1 route: from now on
        our sender waits above PAIR_MARK. Only bulk transfers get here, and for
        them the kernel's buffers are slack enough; fan-out keeps --max-buffer,
        so that one receiver's hiccup does not stop the others as soon."""
        self.tight = True
        if self.transport is not None:
            self.transport.set_write_buffer_limits(high=min(PAIR_MARK, self.hub.config.max_buffer))

    def _drop_pending(self) -> None:
        """What was queued for this connection while it was undecided reaches
        nobody: it turned out a handshake client, or ended undecided (a
        reset, a kick, the server's shutdown)."""
        if self.pending_out:
            self.hub.drop("sniff_window", self.pending_size)
        self.pending_out = None

    def _queue_pending(self, chunk: bytes) -> None:
        """Broadcast bytes for a connection still in its sniff window: the last
        --max-buffer of them. Dropping the oldest, cut inside a read if need
        be, leaves one piece of the stream that runs on into what comes live
        after, as if the client had connected a little later; dropping the
        newest would leave a hole between the queue and the live bytes."""
        out = self.pending_out
        if out is None:
            return
        out.append(chunk)
        self.pending_size += len(chunk)
        over = self.pending_size - self.hub.config.max_buffer
        if over <= 0:
            return
        self.hub.drop("sniff_window", over)
        self.pending_size -= over
        while over >= len(out[0]):
            over -= len(out.popleft())
        if over:
            out[0] = memoryview(out[0])[over:]  # no copy

    def _note_dropped(self, chid: str, nbytes: int) -> None:
        self.hub.drop("hold_full", nbytes)
        if not self.dropped:
            log.warning(
                "dropping bytes for absent receiver chid=%s from chid=%s (hold limit reached)",
                logval(chid), logval(self.chid),
            )
        self.dropped += nbytes

    def _written(self) -> int:
        """Bytes our client's kernel acknowledged (our queue and our kernel's
        send queue, autotuned to megabytes, hold the rest)."""
        transport = self.transport
        return self.bytes_out - (unacked(transport) if transport is not None else 0)

    def _idle_check(self, written_before: int) -> None:
        """``written_before``: _written() at the last check. More now means
        our client read some (its kernel took more): bytes moved, though
        none were queued for it meanwhile (its senders wait for it)."""
        now = self.hub.loop.time()
        written = self._written()
        if written > written_before:
            self.last_active = now
        remaining = self.last_active + self.timeout - now
        if remaining <= 0 and (self.awaiting_partner() or self._held_back()):
            remaining = self.timeout  # waiting is no idling: the hold bounds it
        if remaining > 0:
            self.timer = self.hub.loop.call_later(remaining, self._idle_check, written)
        else:
            self.timer = None
            self.close("idle timeout")

    def _held_back(self) -> bool:
        """We do not read what our client sends, for its receivers (whose
        --slow-timeout bounds that) or --max-rate: its bytes wait in our
        socket, so it is not idle."""
        hub = self.hub
        if hub.backpressure.is_paused(self) or self in hub.throttled:
            return True
        pump = hub.pumps.running.get(self) if hub.pumps is not None else None
        return pump is not None and pump.sending(self)

    def _slow_consumer(self) -> None:
        self.slow_timer = None
        self.hub.stats["slow_disconnects"] += 1
        mark = self.hub.config.max_buffer
        log.warning(
            "slow consumer disconnected chid=%s peer=%s: above %d buffered bytes for %gs",
            logval(self.chid), self.peer, min(PAIR_MARK, mark) if self.tight else mark,
            self.hub.config.slow_timeout,
        )
        self.close("slow consumer", abort=True)

    # -- ending -----------------------------------------------------------------------

    def end(self, reason: str, linger: float | None = CLOSE_LINGER) -> None:
        """End on the server's side (shutdown, fwd-ctl kick). A client still in
        its handshake is owed an hs4: it gets FAIL with the reason."""
        hs = self.hs
        # hs None: moved here; claiming after the OK was decided: it waits
        # for a move or the other workers' wake-up, its OK still unwritten.
        if self.state is St.HANDSHAKE and (hs is None or hs.refusable or self.claiming):
            self._fail(reason, count=False)
        else:
            self.close(reason, linger=linger)

    def close(self, reason: str, abort: bool = False,
              linger: float | None = CLOSE_LINGER, cut: bool = False) -> None:
        """End the session: leave the routes now, then flush and close (reset
        after ``linger`` seconds; None: the caller bounds it), or with
        ``abort`` drop what is queued and reset the connection. ``cut``: the
        stream it was reading was cut (its pair partner was reset), so it is
        reset too, but only once its client acknowledged what was queued."""
        transport = self.transport
        self._leave(reason, cut=abort, resets=cut)
        if transport is None:
            return
        if abort:
            self.reset_connection(transport)
        elif isinstance(self.linger, ResetWhenSent):
            pass  # its stream was cut: it still ends with the reset
        elif not transport.is_closing():
            if cut:
                self.linger = ResetWhenSent(self.hub.loop, transport, linger or CLOSE_LINGER,
                                            self.reset_connection)
                return
            transport.close()
            if linger is not None:
                self.linger = self.hub.loop.call_later(linger, self.reset_connection, transport)

    def reset_connection(self, transport: asyncio.Transport) -> None:
        """Reset our connection. What its kernel still held for the client
        dies with it: counted as discarded, not sent (connection_lost)."""
        lost = reset(transport)
        if lost:
            self.hub.reset_lost[self] = self.hub.reset_lost.get(self, 0) + lost

    def evict(self, by: str) -> None:
        """Another session took our chid (--takeover): it is the same client
        back, so a pair partner stays for it."""
        self._leave(f"taken over by {by}", keep_pair=True)
        self.close(f"taken over by {by}")

    def _leave(self, reason: str, cut: bool = False, keep_pair: bool = False,
               lost: bool = False, resets: bool = False) -> None:
        """Leave every route at once. ``cut``: the connection was reset or
        aborted, not closed. A chan pair is one stream, so its other half ends
        too (reset if this end was a cut, §3.7), unless the chid lives on:
        ``keep_pair`` (takeover), a move, or a server shutdown. The
        connection is counted out when it closes (Hub.release), not now: while
        it flushes, it holds its queue, which --max-conns and
        --max-conns-per-ip bound. ``lost``: the connection is gone already
        (connection_lost); ``resets``: it will end with a reset (ResetWhenSent)."""
        if self.state is St.CLOSED:
            return
        hub = self.hub
        if hub.pumps is not None:
            hub.pumps.release(self)  # what its pipes hold still goes out
        was_live = self.state is St.LIVE
        keep_pair = keep_pair or self.moved or hub.stopping
        partner, self.partner = self.partner, None
        if partner is None and self.read_closed:
            self._stop_awaiting()
        hub.forget_held_wait(self)
        hub.forget_channel_wait(self)
        hub.meters.pop(self, None)
        hub.throttled.discard(self)
        if partner is None and was_live and not keep_pair:
            partner = hub.router.pair_of(self)
        self.state = St.CLOSED
        self.live = False
        self.route = None  # it names other sessions: let them go
        self._cancel_timer()
        if self.slow_timer is not None:
            self.slow_timer.cancel()
            self.slow_timer = None
        hub.pending.discard(self)
        self._drop_pending()
        heard = hub.router.senders_of(self)  # for its drain notice, below
        hub.router.leave(self)
        if was_live:
            hub.live_changed()
        hub.resume_senders(hub.backpressure.forget(self))
        if hub.mesh is not None:
            if self.told_full:
                self.told_full = False
                hub.mesh.signal(False, self.chid, heard)
            if self.chid is not None and not self.moved:
                hub.mesh.release(self.chid, self.token)
                if self.recvers:  # its bytes held here wait on: someone must ask
                    hub.want_held(self.recvers)
        if partner is not None and partner.state is not St.CLOSED:
            if partner.read_closed and partner.write_closed:
                partner.close("half-closed both ways")
            elif partner.read_closed or not keep_pair:
                # One stream: it ends with its other half (if that half had sent
                # its FIN, it has nobody left to hear from anyway).
                lost = cut or resets  # our stream to it was cut either way
                partner.close("pair partner lost" if lost else "pair partner left", cut=lost)
        end = end_reason(reason)
        if was_live and not self.moved:
            hub.ends[end] += 1
        if (was_live or self.chid is not None) and not self.moved:
            transport = None if lost else self.transport
            if was_live and transport is not None \
                    and (cut or resets or transport.get_write_buffer_size()):
                # Its out= is what reaches the client: what is queued may
                # still go, and a reset (this cut, a linger's, a drain's)
                # destroys what is left, here and in the kernel (connection_lost).
                hub.flushing[self] = (reason, end)
            else:
                self._log_end(reason, end)

    def _log_end(self, reason: str, end: str) -> None:
        hub = self.hub
        secs = hub.loop.time() - self.started
        out = self.bytes_out
        log.info(
            "session end chid=%s peer=%s worker=%d in=%d out=%d secs=%.3f reason=%s%s",
            logval(self.chid), self.peer, hub.wid, self.bytes_in, out, secs, logval(reason),
            f" dropped={self.dropped}" if self.dropped else "",
            extra={"fields": {"event": "session_end", "chid": self.chid, "peer": self.peer,
                              "worker": hub.wid, "bytes_in": self.bytes_in, "bytes_out": out,
                              "secs": round(secs, 3), "reason": reason, "end": end,
                              "dropped": self.dropped}})

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
