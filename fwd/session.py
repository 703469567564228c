"""One client connection: where a byte enters the server.

A Session is an asyncio BufferedProtocol: the event loop reads straight into
the worker's one shared buffer, and ``buffer_updated`` decides what the bytes
are: handshake lines (fed to protocol.Handshake), broadcast-mode sniffing, or
stream data, which goes to the receivers routing.Router names through the
compiled ``fanout`` loop. Timers, backpressure and closing live here too,
because they act on the transport.
"""
from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import secrets
from typing import TYPE_CHECKING

from .crypto import REJECTED, AeadLineCodec
from .errors import ChidInUse, LineRejected, RemoteProtocolError
from .fastpath import fanout
from .protocol import (
    NEED_DATA,
    PLAIN,
    Handshake,
    Hs1,
    Hs2,
    Hs3,
    Hs4,
    Role,
    Sniff,
    sniff,
    to_message,
)
from .sockopts import set_keepalive

if TYPE_CHECKING:
    from .worker import Hub

log = logging.getLogger("fwd.session")

SNIFF_CONNECT_WINDOW = 0.05
"""Broadcast mode: a silent new connection becomes a plain receiver after this long."""
SNIFF_LINE_WINDOW = 0.005
"""Broadcast mode: a first line starting with ``{`` must end within this long to be an hs1."""
CLOSE_LINGER = 5.0
"""How long a closing connection may take to flush before it is aborted."""


class St(enum.Enum):
    SNIFF = "sniff"
    HANDSHAKE = "handshake"
    LIVE = "live"
    CLOSED = "closed"


class Session(asyncio.BufferedProtocol):
    # The fan-out loop reads transport, last_active and writing_paused of every
    # receiver on every read: slots keep those lookups cheap.
    __slots__ = (
        "hub", "transport", "state", "peer", "chid", "hs", "sniffed", "pending_out",
        "pending_size", "timeout", "timer", "slow_timer", "linger", "last_active",
        "writing_paused", "bytes_in", "bytes_out", "started", "dropped", "end_reason",
        "read_closed", "write_closed", "partner", "nonce",
    )

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.state = St.SNIFF
        self.peer = "?"
        self.chid: str | None = None
        self.hs: Handshake | None = None
        self.sniffed = b""
        self.pending_out: list[bytes] | None = None
        self.pending_size = 0
        self.timeout = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.slow_timer: asyncio.TimerHandle | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.last_active = 0.0
        self.writing_paused = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = 0.0
        self.dropped = 0
        self.end_reason = ""
        # Half-close state of a chan pair (see eof_received).
        self.read_closed = False
        self.write_closed = False
        self.partner: Session | None = None
        self.nonce: str | None = None  # hs2's token, encrypted handshake only

    # -- asyncio callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        hub = self.hub
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if not hub.admit(self):
            self.state = St.CLOSED
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            set_keepalive(sock)
        transport.set_write_buffer_limits(high=hub.config.max_buffer)
        loop = hub.loop
        self.started = self.last_active = loop.time()
        self.timeout = hub.config.idle_timeout  # hs3 may override it
        if hub.config.mode == "chan" or hub.key is not None:
            # With a password there is no sniffing: everyone must handshake.
            self._start_handshake()
        else:
            self.pending_out = []
            hub.pending.add(self)
            self.timer = loop.call_later(SNIFF_CONNECT_WINDOW, self._sniff_expired)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.hub.view

    def buffer_updated(self, nbytes: int) -> None:
        chunk = bytes(self.hub.view[:nbytes])
        if self.state is St.LIVE:
            self._forward(chunk)
        elif self.state is St.HANDSHAKE:
            self._handshake_input(chunk)
        elif self.state is St.SNIFF:
            self._sniff_input(chunk)

    def eof_received(self) -> bool:
        # In a chan pair the FIN is passed on and the other direction keeps
        # flowing, as through socat. Anywhere else a client's EOF ends its
        # session (as with ncat --broker): its chid is freed now, and the
        # transport closes once queued bytes are flushed.
        if self.state is St.HANDSHAKE:
            self._fail("connection closed during handshake")
            return True
        if self.state is St.LIVE:
            partner = self.hub.router.pair_of(self)
            if partner is not None:
                self.read_closed = True
                self.partner, partner.partner = partner, self
                partner._shut_write()
                self._close_if_done()
                return True
        if self.state is St.SNIFF and self.sniffed:
            self._sniff_expired()
        self.close("client closed")
        return True

    def _shut_write(self) -> None:
        """Pass the partner's FIN on: nothing more will be written to us."""
        if self.write_closed or self.transport is None:
            return
        self.write_closed = True
        self.hub.router.mute(self)
        self.transport.write_eof()  # uvloop sends the FIN after queued bytes
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.read_closed and self.write_closed:
            self.close("half-closed both ways")

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave("connection lost" if exc is None else f"connection lost: {exc}")
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self.hub.release(self)
        self.transport = None

    def pause_writing(self) -> None:
        self.writing_paused = True
        slow = self.hub.config.slow_timeout
        if slow > 0 and self.state is St.LIVE:
            self.slow_timer = self.hub.loop.call_later(slow, self._slow_consumer)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.slow_timer is not None:
            self.slow_timer.cancel()
            self.slow_timer = None
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
            self.pending_out = None
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
        key = self.hub.key
        self.hs = Handshake(Role.SERVER, PLAIN if key is None else AeadLineCodec(key, Role.SERVER))
        limit = self.hub.config.handshake_timeout
        if limit > 0:
            remaining = self.started + limit - self.hub.loop.time()
            self.timer = self.hub.loop.call_later(
                max(remaining, 0), self._fail, "handshake timeout")

    def _handshake_input(self, chunk: bytes) -> None:
        hs = self.hs
        assert hs is not None and self.transport is not None
        hs.receive_data(chunk)
        try:
            while self.state is St.HANDSHAKE:
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
                    self.transport.write(hs.send(Hs4(True)))
                    if event.timeout is not None:
                        self.timeout = float(event.timeout)
                    self._go_live(event.recvers, hs.trailing_data)
        except LineRejected as exc:
            self._fail(exc.desc, rejected=exc.reason)
        except RemoteProtocolError as exc:
            self._fail(exc.desc)

    def _on_hs1(self, event: Hs1) -> None:
        hub = self.hub
        try:
            chid, evicted = hub.router.claim(self, event.chid, takeover=hub.config.takeover)
        except ChidInUse as exc:
            raise RemoteProtocolError(f"chid in use: {exc.chid}") from None
        self.chid = chid
        if evicted is not None:
            evicted.close(f"taken over by {self.peer}")
        assert self.hs is not None and self.transport is not None
        if hub.key is not None:
            self.nonce = secrets.token_hex(16)
        self.transport.write(self.hs.send(Hs2(chid, self.nonce)))

    def _fail(self, desc: str, rejected: str | None = None) -> None:
        """Answer with one hs4 FAIL line, then close.

        With a password, a peer that has not sent one authentic line, or whose
        line did not decode (``rejected`` holds why, for the log), gets the
        plain ``handshake rejected`` line; a key holder gets its real reason,
        encrypted (docs/PROTOCOL.md §7.5).
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
            line = hs.send(fail) if hs else PLAIN.encode(to_message(fail))
        self.hub.stats["handshake_failures"] += 1
        if rejected and rejected != desc:
            log.info("handshake failed peer=%s: %s (%s)", self.peer, desc, rejected)
        else:
            log.info("handshake failed peer=%s: %s", self.peer, desc)
        self.transport.write(line)
        self.close(f"handshake failed: {desc}")

    # -- live -------------------------------------------------------------------------

    def _go_live(self, recvers: tuple[str, ...], first: bytes) -> None:
        hub = self.hub
        transport = self.transport
        assert transport is not None
        self._cancel_timer()
        self.state = St.LIVE
        self.hs = None
        hub.pending.discard(self)
        for chunk in hub.router.join(self, recvers):
            self.bytes_out += len(chunk)
            transport.write(chunk)
        if self.pending_out:
            for chunk in self.pending_out:
                self.bytes_out += len(chunk)
                transport.write(chunk)
        self.pending_out = None
        self.last_active = hub.loop.time()
        log.debug("live chid=%s peer=%s recvers=%d", self.chid, self.peer, len(recvers))
        if self.timeout > 0:
            self.timer = hub.loop.call_later(self.timeout, self._idle_check)
        if first:
            self._forward(first)

    def _forward(self, chunk: bytes) -> None:
        hub = self.hub
        now = hub.loop.time()
        self.last_active = now
        self.bytes_in += len(chunk)
        route = hub.router.route(self)
        full = fanout(chunk, route.targets, self, now)
        if route.to_all:
            if hub.pending:
                for p in hub.pending:
                    p._queue_pending(chunk)
            elif len(route.targets) <= 1:
                hub.stats["dropped_bytes"] += len(chunk)
        elif route.missing:
            for chid in route.missing:
                dropped = hub.router.hold(chid, chunk, now)
                if dropped:
                    self._note_dropped(chid, dropped)
            hub.watch_holds()
        if full:
            pause = False
            for target in full:
                pause |= hub.backpressure.block(self, target)
            if pause and self.transport is not None:
                log.debug("paused chid=%s: a receiver is above --max-buffer", self.chid)
                self.transport.pause_reading()

    def _queue_pending(self, chunk: bytes) -> None:
        """Broadcast bytes for a connection still in its sniff window."""
        if self.pending_out is None:
            return
        if self.pending_size + len(chunk) > self.hub.config.max_buffer:
            self.hub.stats["dropped_bytes"] += len(chunk)
            return
        self.pending_out.append(chunk)
        self.pending_size += len(chunk)

    def _note_dropped(self, chid: str, nbytes: int) -> None:
        self.hub.stats["dropped_bytes"] += nbytes
        if not self.dropped:
            log.warning(
                "dropping bytes for absent receiver chid=%s from chid=%s (hold limit reached)",
                chid, self.chid,
            )
        self.dropped += nbytes

    def _idle_check(self) -> None:
        remaining = self.last_active + self.timeout - self.hub.loop.time()
        if remaining > 0:
            self.timer = self.hub.loop.call_later(remaining, self._idle_check)
        else:
            self.timer = None
            self.close("idle timeout")

    def _slow_consumer(self) -> None:
        self.slow_timer = None
        self.hub.stats["slow_disconnects"] += 1
        log.warning(
            "slow consumer disconnected chid=%s peer=%s: above %d buffered bytes for %gs",
            self.chid, self.peer, self.hub.config.max_buffer, self.hub.config.slow_timeout,
        )
        self.close("slow consumer", abort=True)

    # -- ending -----------------------------------------------------------------------

    def close(self, reason: str, abort: bool = False) -> None:
        """End the session: leave the routes now, then flush (or drop) and close."""
        transport = self.transport
        self._leave(reason)
        if transport is None:
            return
        if abort:
            transport.abort()
        elif not transport.is_closing():
            transport.close()
            self.linger = self.hub.loop.call_later(CLOSE_LINGER, transport.abort)

    def _leave(self, reason: str) -> None:
        if self.state is St.CLOSED:
            return
        hub = self.hub
        was_live = self.state is St.LIVE
        self.state = St.CLOSED
        self.end_reason = reason
        self._cancel_timer()
        if self.slow_timer is not None:
            self.slow_timer.cancel()
            self.slow_timer = None
        hub.pending.discard(self)
        self.pending_out = None
        hub.router.leave(self)
        hub.resume_senders(hub.backpressure.forget(self))
        partner, self.partner = self.partner, None
        if partner is not None and partner.read_closed:
            # It has sent its FIN and now has nobody left to hear from.
            partner.close("half-closed both ways" if partner.write_closed else "pair partner left")
        if was_live or self.chid is not None:
            log.info(
                "session end chid=%s peer=%s in=%d out=%d secs=%.1f reason=%s%s",
                self.chid, self.peer, self.bytes_in, self.bytes_out,
                hub.loop.time() - self.started, reason,
                f" dropped={self.dropped}" if self.dropped else "",
            )

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
