"""fwd-client: splice one fwd-server session (server0) to one service (server1).

Both connections are outbound, so a service on a private LAN can be reached by
the relay's remote clients without opening any port: the bridge listens on
nothing.

Data path. Same style as the server (session.py): uvloop, one BufferedProtocol
per connection reading into one shared buffer, sent on with ``send_view``: a
plain non-blocking send straight from the buffer when the destination has
nothing queued, and only what the socket does not take copied into ``bytes``
for ``transport.write`` (which keeps a reference: a view of the reused buffer
would be overwritten). A send that meets the destination's reset drops the
bytes and lets the destination's own reads end it (``Link.peer_gone``). A side
whose destination is above ``MAX_BUFFER`` stops reading until the destination's
``resume_writing``, so TCP pushes back on the fast peer and memory per bridge
stays at about two write buffers plus one read.
A bulk pair (a read of ``PUMP_MIN`` or more), or one that lives ``PUMP_READS``
reads, is handed to a ``Pump`` as in fwd-server (fwd/pumps.py): two threads
copy or splice it both ways until a FIN, an error, a stuck side or the end of
the pair gives it back to the loop.

Lazy server1. By default server1 is connected only when the first bytes arrive
from server0 (``--connect lazy``). An idle relay session can last hours; holding
a LAN connection open for it would trip the service's own idle timeout, and
with ``--on-close both`` that would tear down and rebuild the relay session over
and over. It also means a service that is down costs nothing until someone
actually uses it. The price: a service that speaks first (SMTP, FTP, MySQL
greetings) is not reached until the remote side sends something; use
``--connect eager`` for those.

Close policy (``--on-close``):

* ``both`` (default): one pair of connections is one session. A FIN on one side
  is passed to the other (``write_eof``) and the other direction keeps
  flowing; the pair ends when both directions are done or either side is lost.
  Then both are closed (queued bytes flushed) and a fresh pair starts, server0
  first, server1 on demand. This is what makes "expose a LAN service" work
  session after session: a service that closes after its answer (HTTP/1.0,
  request/response protocols) gets a new connection for the next request, and
  its FIN reaches the relay: in a chan pair (our recvers name only the remote
  client, whose recvers name only us) fwd-server passes it on to the remote
  client; elsewhere it ends our relay session. A lost side (reset, error) is
  passed on as a reset, once the peer acknowledged what was read before it
  (``ResetWhenSent``), so the remote can tell a cut stream from a finished one.
* ``one``: a side that closes (FIN or loss) is closed and reconnected alone;
  the other side is kept, and a FIN is not passed on (it would end the kept
  side's write direction). Use it to keep the relay session, and its chid, up
  across restarts of the LAN service, or the LAN connection up across relay
  restarts. Bytes for an absent side wait (reading paused) until it is back.

Retries. Connecting (including the chan handshake) is retried with capped
exponential backoff (0.5 s doubling to 10 s, each delay scaled by a random
factor in [0.5, 1) so that many bridges do not reconnect in lockstep). A
connection that ends after carrying data (either way), after a handshake
server0 answered OK, after ``HEALTHY_AFTER`` seconds (or the ``--timeout``
we asked server0 for, if shorter), or because we ended it when its partner
went away, was healthy: the side
reconnects at once and its failure count resets, unless it ended within
``QUICK_END`` with nothing asked of it (server0 sent nothing, or nothing was
sent to server1): then the next attempt waits as after a failure. One that dies young and
silent counts as a failure, so a server that accepts and drops at once is not
hammered. ``--max-retries N`` gives up when
a side fails again after N retries in a row, so at its N+1st consecutive
failure (exit status 1). In ``both`` mode, bytes from the relay wait for
server1 at most ``--service-wait`` seconds (server1 is tried at once, then
after delays that start short again, each attempt bounded by what is left
of that wait): then the relay session is reset,
so that the remote client learns the service is not there instead of
hanging, and the next request tries again.

Handshake failures. These are retried: an hs4 FAIL saying ``chid in use``,
a handshake timeout, a connection closed during the handshake, and a refusal
(``server full``, ``server restarting``, ``server shutdown``, ``too many
connections from this address``). Each counts as a failure, but for a ``chid
in use``, ``server full`` or ``too many connections`` that our own previous
session may cause: the server frees its chid, and its place in the limits,
only once it has seen its connection close. So while that connection still
flushes (up to CLOSE_LINGER after its session's end), and within CLOSE_LINGER
of that end or of its close, those do not count.
Any other FAIL (a chid or recvers the server refuses) or a reply that is not
the protocol at all will fail the same way every time: the bridge exits with
status 3 and the server's reason.

Exit status: 0 after SIGINT/SIGTERM/SIGHUP, 1 when ``--max-retries`` ran out, 3 when
the server rejected the handshake for good (2 is click's usage error).

Known limit: outside a chan pair fwd-server does not tell a session that one of
its peers left (a pair ends with its other half, docs/PROTOCOL.md §3.7), so in
``both`` mode a LAN connection lives until the service, or the relay session,
closes it. One bridge carries one byte stream: concurrent remote clients share
it (as they share the chid).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from .client import HandshakeTimeout, password_hint, refused_hint
from .config import format_hostport
from .crypto import AeadLineCodec, derive_key
from .errors import FwdError, RemoteProtocolError
from .fastpath import PUMP_READS, Pump, Relay, bind, send_view
from .protocol import (
    NEED_DATA,
    PAUSED,
    PLAIN,
    REFUSAL_WAIT,
    SERVER_CLOSED,
    Handshake,
    Hs1,
    Hs2,
    Hs3,
    Hs4,
    Role,
    refusal,
)
from .pumps import RETRY, RETRY_SOON, STALL, hold_offers
from .sockopts import (
    RESET_BY_PEER,
    ResetWhenSent,
    error_reset,
    reset,
    reset_by_peer,
    set_keepalive,
    unacked,
)

log = logging.getLogger("fwd.bridge")

READ_SIZE = 256 * 1024
"""One read's maximum; the buffer is shared by both sides."""
PUMP_MIN = 64 * 1024
"""A read this big (a bulk stream) offers the pair to a Pump, as fwd-server's
--splice-min does."""
MAX_BUFFER = 1024 * 1024
"""High-water mark of each side's write buffer: above it the other side stops reading."""
BACKOFF_START = 0.5
BACKOFF_CAP = 10.0
HEALTHY_AFTER = 10.0
"""A connection that lived this long was not a failed attempt, even if it carried nothing."""
QUICK_END = 1.0
"""A connection that ended sooner with nothing asked of it waits before the
next, as after a failure, though it counts as none."""
ATTEMPT_MIN = 0.2
"""Least time a connect to server1 gets while a request waits, even when
less of --service-wait is left (0 included): a service that is up must not
be given up on because it took a millisecond to accept."""
CLOSE_LINGER = 5.0
"""How long a closing side may take to flush before it is aborted."""
SHUTDOWN_LINGER = 2.0
"""On SIGTERM, the wait for queued bytes before aborting what is left."""
SIDES = ("server0", "server1")
ON_CLOSE = ("both", "one")
CONNECT = ("lazy", "eager")
EXIT_OK = 0
EXIT_GAVE_UP = 1
EXIT_REJECTED = 3
_RETRYABLE_FAIL = ("chid in use", "handshake timeout", "connection closed", "server shutdown",
                   "server full", "server restarting", "too many connections",
                   "the server closed")
_OURS_FAIL = ("chid in use", "server full", "too many connections")
"""What our own previous session may cause while the server has not seen its
connection close: its chid is taken, its connection still counts for the
limits. Not counted as failures then."""


@dataclass(frozen=True)
class BridgeOptions:
    """Everything the CLI decides; plain data so tests and scripts can build it."""

    server0: tuple[str, int] = ("127.0.0.1", 8601)
    server1: tuple[str, int] = ("127.0.0.1", 8080)
    handshake: bool = False
    chid: str | None = None
    recvers: tuple[str, ...] = ()
    timeout: int | None = None
    senders: tuple[str, ...] | None = None
    """hs3 ``senders``: the only chids whose bytes reach the service (None: anyone)."""
    on_close: str = "both"
    connect: str = "lazy"
    max_retries: int | None = None
    connect_timeout: float = 10.0
    service_wait: float = 5.0
    """``both`` mode: how long bytes from the relay wait for server1 to accept
    a connection before the relay session is reset (0: at the first refusal)."""
    password: str | None = field(default=None, repr=False)
    """Encrypted handshake on server0 (docs/PROTOCOL.md §7); never logged."""

    def __post_init__(self) -> None:
        if self.on_close not in ON_CLOSE:
            raise ValueError(f"on_close must be one of {', '.join(ON_CLOSE)}")
        if self.connect not in CONNECT:
            raise ValueError(f"connect must be one of {', '.join(CONNECT)}")
        if self.password is not None and not self.handshake:
            raise ValueError("a password needs the handshake (drop --no-handshake)")
        if self.password == "":
            raise ValueError("the password must not be empty")
        if self.handshake:
            # Same checks the server applies, so a bad chid is a usage error, not a retry loop.
            try:
                Hs1(self.chid)
                Hs3(self.recvers, self.timeout, senders=self.senders)
            except RemoteProtocolError as exc:
                raise ValueError(exc.desc) from None

    def describe_handshake(self) -> str:
        if not self.handshake:
            return "off"
        return (f"chid={self.chid or '(server picks)'} recvers={','.join(self.recvers) or '(all)'}"
                f" timeout={'-' if self.timeout is None else self.timeout}"
                f" senders={'(any)' if self.senders is None else ','.join(self.senders)}"
                f" password={'off' if self.password is None else 'on'}")


class HandshakeFailed(FwdError):
    """The handshake did not complete; ``retryable`` says whether trying again can help."""

    def __init__(self, desc: str, retryable: bool) -> None:
        super().__init__(desc)
        self.desc = desc
        self.retryable = retryable


class GiveUp(FwdError):
    """Stop the bridge with a non-zero exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Stale(FwdError):
    """A connection finished after the pair it was made for had ended."""


def describe(exc: BaseException) -> str:
    """One line for a log: no tracebacks, no repr noise."""
    if isinstance(exc, HandshakeFailed):
        return f"handshake failed: {exc.desc}"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0 \
            and not isinstance(exc, (socket.gaierror, socket.herror)):
        # sock_connect's strerror names the address instead; a resolver's
        # errno is an EAI_ code, which os.strerror does not know
        return f"[Errno {exc.errno}] {os.strerror(exc.errno)}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def backoff_delay(failures: int) -> float:
    """Delay before attempt number ``failures + 1``; jitter spreads reconnect storms."""
    base = min(BACKOFF_CAP, BACKOFF_START * 2 ** min(failures - 1, 32))
    return base * (0.5 + random.random() / 2)


class Link(Relay, asyncio.BufferedProtocol):
    """One outbound connection. It only reports to the Bridge, which owns the policy.
    Its Relay base holds what a Pump reads and writes (fd, pipe, counters)."""

    def __init__(self, bridge: Bridge, side: int, gen: int) -> None:
        self.fd = self.pipe_r = self.pipe_w = -1
        self.pump_wait = False
        self.reads_sent = 0  # a pair that lives this long is offered too (PUMP_READS)
        self.bridge = bridge
        self.hub = bridge  # send_view tells hub.loop to call peer_gone
        self.side = side
        self.name = SIDES[side]
        self.gen = gen
        loop = bridge.loop
        self.transport: asyncio.Transport | None = None
        self.hs: Handshake | None = None
        if side == 0 and bridge.opts.handshake:
            key = bridge.key
            self.hs = Handshake(Role.CLIENT,
                                PLAIN if key is None else AeadLineCodec(key, Role.CLIENT))
        self.chid: str | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        # Mark a failed attempt's exception retrieved even if nobody awaits it any more.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.done: asyncio.Future[str] = loop.create_future()
        self.attached = False
        self.reading = True
        self.writing_paused = False
        self.eof_in = False
        self.eof_out = False
        self.gone = False
        """Its peer reset it: what is forwarded to it is dropped (see _unpump)."""
        self.peer_reset = False  # see Relay
        self.by_us = False
        """We ended it while it was fine (the other side of its pair went away)."""
        self.bytes_in = 0
        self.bytes_out = 0
        self.refused: str | None = None
        """Plain mode: server0 is in chan mode and sent its hs4 FAIL (the desc)."""
        self.suspect: asyncio.TimerHandle | None = None
        self.suspect_line = b""
        """Plain mode: server0's first read, a FAIL line; a refusal only if the
        server closes next (protocol.refusal), payload if it does not."""
        self.started = loop.time()
        self.linger: asyncio.TimerHandle | ResetWhenSent | None = None
        self.welcomed = False
        """server0 answered our handshake OK: what ends it later is no failed attempt."""
        self.reset_lost = 0  # what our resets destroyed in the kernel (reset_now)
        self.was_reset = False  # by reset_now: whatever the kernel still had is lost
        self.closing: str | None = None  # why it was detached
        self.after_flush: Link | None = None
        """Stopping: the other side, which sent what we still flush. It is
        closed when our peer has acknowledged all of it, with a FIN; if the
        linger ends first, both are reset, so that the other side's peer
        never takes a cut upload for a whole one."""

    # -- asyncio callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.bridge.links_all.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            set_keepalive(sock)
            self.fd = sock.fileno()
        transport.set_write_buffer_limits(high=MAX_BUFFER)
        if self.hs is None:
            self.bridge.attach(self)
        else:
            transport.write(self.hs.send(Hs1(self.bridge.opts.chid)))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.bridge.view

    def buffer_updated(self, nbytes: int) -> None:
        if self.attached:
            if self.suspect is not None:
                self._not_refused()  # bytes after the line: it was payload
            elif (self.side == 0 and not self.bytes_in and not self.bridge.opts.handshake
                    and refusal(first := bytes(self.bridge.view[:nbytes])) is not None):
                self.suspect_line = first
                self.bytes_in += nbytes
                self.suspect = self.bridge.loop.call_later(REFUSAL_WAIT, self._not_refused)
                log.debug("server0's first line reads as a refusal: held for %gs, in case "
                          "it closes", REFUSAL_WAIT)
                return
            self.bridge.forward(self, nbytes)
        elif self.hs is not None and not self.ready.done():
            self.hs.receive_data(bytes(self.bridge.view[:nbytes]))
            self._handshake_step()
        # else: a stale or closing connection; its bytes have nowhere to go.

    def _not_refused(self) -> None:
        if self.suspect is not None:
            self.suspect.cancel()
            self.suspect = None
            self.bridge.pass_on(self, self.suspect_line)

    def _refused(self) -> None:
        """The server closed after its FAIL line: a refusal, not for the service
        (the slot gives up)."""
        assert self.suspect is not None
        self.suspect.cancel()
        self.suspect = None
        self.refused = desc = refusal(self.suspect_line)
        self.bridge.detach(self, f"refused: {desc}")
        self.close()

    def eof_received(self) -> bool:
        if self.suspect is not None and self.attached:
            self._refused()
            return False
        self.eof_in = True
        self.reading = False
        t = self.transport
        if self.attached and t is not None and (self.gone or self.peer_reset or (
                not self.eof_out and reset_by_peer(t))):
            # A send or a pump's splice took the reset: a loss, not a FIN,
            # even after ours (reset_by_peer cannot tell then).
            self.close(abort=True)
            self.bridge.lost(self, f"connection lost: {describe(RESET_BY_PEER)}")
            return True
        if not self.attached:
            if self.hs is not None and not self.ready.done():
                self.hs.receive_data(b"")
                self._handshake_step()
            return False
        return self.bridge.on_eof(self)

    def peer_gone(self) -> None:
        """A send to this side failed: its peer reset. Its own reads end it,
        after what its kernel still holds from the peer (eof_received), unless
        none will come: the peer had sent its FIN already."""
        if not self.gone:
            log.debug("%s reset: reading what it still holds", self.name)
        self.gone = True
        if self.eof_in and self.attached and self.transport is not None:
            self.close(abort=True)
            self.bridge.lost(self, f"connection lost: {describe(RESET_BY_PEER)}")

    def connection_lost(self, exc: Exception | None) -> None:
        # What was still queued, and what a reset of ours destroyed, never
        # reached the peer: the closed line counts what did.
        queued = self.transport.get_write_buffer_size() if self.transport is not None else 0
        whole = exc is None and not queued and not self.reset_lost and not self.was_reset
        self.bytes_out -= queued + self.reset_lost
        self.reset_lost = 0
        if self.after_flush is not None:  # within stop()'s SHUTDOWN_LINGER
            left = max(self.bridge.stop_by - self.bridge.loop.time(), 0.0)
            self.after_flush.close(linger=left, cut=not whole)
            self.after_flush = None
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        if self.suspect is not None:
            if self.attached:  # reset right after the line: refused too
                self._refused()
            else:
                self.suspect.cancel()
        if not self.ready.done():
            what = SERVER_CLOSED if self.hs else "connection closed"
            self.ready.set_exception(
                HandshakeFailed(f"{what}: {describe(exc)}" if exc else what, retryable=True))
        if self.attached:
            self.bridge.lost(self, "connection lost" + (f": {describe(exc)}" if exc else ""))
        if self.pipe_r >= 0:
            self.close_pipe()
        self.bridge.links_all.discard(self)
        self.transport = None
        if self.welcomed:  # the server frees our chid only now ("chid in use")
            self.bridge.ended[self.side] = self.bridge.loop.time()
        if not self.done.done():
            self.done.set_result("closed")
        if self.closing is not None:
            self.log_closed()
        self.bridge.on_link_gone()

    def log_closed(self) -> None:
        """The closed line, once the counts are final: a side detached with
        bytes still queued logs it when its flush (or the reset) is over."""
        assert self.closing is not None
        log.info("%s closed after %.1fs: %s (%s)", self.name,
                 self.bridge.loop.time() - self.started, self.closing, self.stats())

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.bridge.update_reading(1 - self.side)

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.bridge.update_reading(1 - self.side)

    # -- handshake (server0 only) -------------------------------------------------------

    def _handshake_step(self) -> None:
        hs = self.hs
        assert hs is not None and self.transport is not None
        try:
            while True:
                event = hs.next_event()
                if event is NEED_DATA or event is PAUSED:
                    return
                if isinstance(event, Hs2):
                    self.chid = event.chid
                    opts = self.bridge.opts
                    # Echo hs2's nonce (encrypted handshake); plain servers send none.
                    hs3 = Hs3(opts.recvers, opts.timeout, event.nonce, opts.senders)
                    self.transport.write(hs.send(hs3))
                elif isinstance(event, Hs4):
                    if not event.ok:
                        desc = event.desc or "(no reason given)"
                        self._fail(HandshakeFailed(desc, desc.startswith(_RETRYABLE_FAIL)))
                        return
                    trailing = hs.trailing_data
                    self.hs = None
                    self.welcomed = True
                    self.bridge.attach(self)
                    view = self.bridge.view  # free again: what it held is in hs
                    for i in range(0, len(trailing), READ_SIZE):
                        if not self.attached:
                            break
                        piece = trailing[i:i + READ_SIZE]
                        view[:len(piece)] = piece
                        self.bridge.forward(self, len(piece))
                    return
        except RemoteProtocolError as exc:
            # EOF mid-handshake is a server going away; anything else is not a fwd-server.
            closed = exc.desc == SERVER_CLOSED
            self._fail(HandshakeFailed(exc.desc if closed else f"bad reply: {exc.desc}", closed))

    def _fail(self, exc: HandshakeFailed) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        self.close()

    # -- control ----------------------------------------------------------------------

    def set_reading(self, want: bool) -> None:
        t = self.transport
        if want == self.reading or self.eof_in or t is None or t.is_closing():
            return
        self.reading = want
        if self.bridge.pumping(self):
            return  # the pump's threads read it now; _unpump applies this
        if want:
            t.resume_reading()
        else:
            t.pause_reading()

    def close(self, abort: bool = False, linger: float = CLOSE_LINGER, cut: bool = False) -> None:
        """Close after queued bytes are flushed, or reset if that takes too long.
        ``cut``: the other side was lost, so reset, once the peer acknowledged
        what was sent to it (as fwd-server does for a pair, PROTOCOL.md §3.7)."""
        if self.suspect is not None:
            self.suspect.cancel()
            self.suspect = None
        t = self.transport
        if t is None:
            return
        if abort:
            self.reset_now(t)
            return
        if isinstance(self.linger, ResetWhenSent):
            self.linger.hurry(linger)  # a cut stream still ends with its reset
            return
        if t.is_closing():
            timer = self.linger  # flushing already: a shorter linger wins (stop)
            if timer is not None and timer.when() - self.bridge.loop.time() > linger:
                timer.cancel()
                self.linger = self.bridge.loop.call_later(linger, self.reset_now, t)
            return
        if cut:
            self.linger = ResetWhenSent(self.bridge.loop, t, linger, self.reset_now)
            return
        if self.after_flush is not None:  # closed once the peer has it all, or reset
            self.linger = ResetWhenSent(self.bridge.loop, t, linger, self.reset_now,
                                        acked=lambda tr: tr.close())
            return
        t.close()
        self.linger = self.bridge.loop.call_later(linger, self.reset_now, t)

    def reset_now(self, transport: asyncio.Transport) -> None:
        """Reset; what the kernel still held for the peer dies with it, and
        is not counted as sent (connection_lost)."""
        self.was_reset = True
        self.reset_lost += reset(transport)

    def write_eof(self) -> None:
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.eof_out = True
            self.transport.write_eof()

    def stats(self) -> str:
        return f"{self.name} in={self.bytes_in} out={self.bytes_out}"


class Bridge:
    """The two slots, the bytes waiting for an absent side, and the close policy."""

    def __init__(self, opts: BridgeOptions, loop: asyncio.AbstractEventLoop,
                 key: bytes | None = None) -> None:
        self.opts = opts
        self.loop = loop
        self.key = key  # derived from opts.password (bridge_main)
        self.addrs = (opts.server0, opts.server1)
        self.buffer = bytearray(READ_SIZE)
        self.view = memoryview(self.buffer)
        self.links: list[Link | None] = [None, None]
        self.links_all: set[Link] = set()
        # pending[i]: bytes read from the other side while side i was absent.
        self.pending: list[list[bytes]] = [[], []]
        self.pending_eof = [False, False]
        self.ended = [-1e9, -1e9]  # when each side's last connection ended
        self.quick = [0, 0]  # connections in a row that ended young, unasked (slot)
        self._tries: tuple[float | None, int] = (None, 0)  # server1 tries since waiting_since
        self.failures = [0, 0]
        self.waiting_since: float | None = None  # when bytes began to wait for server1
        self.gen = 0
        """Bumped when a pair ends (``both``): attempts started for the old pair are void."""
        self.pair_started = 0.0
        self.stopping = False
        self.stop_by = 0.0  # stop(): when every side should be closed
        self.poke = [asyncio.Event(), asyncio.Event()]
        self.gone = asyncio.Event()
        # A bulk pair's bytes can go through a Pump, as in fwd-server (fwd/pumps.py).
        self.pump: Any = None
        self._efd = -1
        if Pump is not None:
            bind(self.buffer, READ_SIZE, None, 0, 4)  # pipes: this pair's two, the next one's
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            loop.add_reader(self._efd, self._pump_stopped)

    # -- data -----------------------------------------------------------------------

    def drop(self, reason: str, nbytes: int) -> None:
        """What send_view tells the server's hub (bytes a reset peer never
        got): fwd-client counts no drops; its end line's in and out tell."""

    def forward(self, src: Link, n: int) -> None:
        """Pass on the ``n`` bytes just read into the buffer. A send that fails
        because the other side's peer reset drops them (send_view calls its
        peer_gone): writing them through its transport would close its socket
        before we read what its kernel still holds (PROTOCOL.md §3.7)."""
        src.bytes_in += n
        dst_side = 1 - src.side
        dst = self.links[dst_side]
        if dst is not None and dst.gone:
            return
        if dst is not None:
            assert dst.transport is not None
            # May call dst.pause_writing, and src stops reading.
            send_view(self.buffer, n, (dst,), None, self.loop.time())
            if self._efd >= 0 and not src.pump_wait:
                src.reads_sent += 1
                if n >= PUMP_MIN or src.reads_sent >= PUMP_READS:
                    src.pump_wait = True
                    self.loop.call_soon(self._offer, src)
        else:
            self._hold(src, bytes(self.view[:n]))

    def _hold(self, src: Link, data: bytes) -> None:
        """Hold ``data`` and stop reading ``src`` until the other side is back."""
        dst_side = 1 - src.side
        if dst_side == 1 and not self.pending[1]:
            self.waiting_since = self.loop.time()
        self.pending[dst_side].append(data)
        src.set_reading(False)
        self.poke[dst_side].set()

    def pass_on(self, src: Link, data: bytes) -> None:
        """Forward bytes that are not in the read buffer (a line held back,
        counted in ``src.bytes_in`` when it was read)."""
        dst = self.links[1 - src.side]
        if dst is None:
            self._hold(src, data)
        elif not dst.gone:
            assert dst.transport is not None and not self.pumping(dst)
            dst.bytes_out += len(data)
            dst.transport.write(data)

    # -- pumps ------------------------------------------------------------------------

    def pumping(self, link: Link) -> bool:
        return self.pump is not None and (link is self.pump.a or link is self.pump.b)

    def _offer(self, src: Link) -> None:
        """A bulk read, or many reads, went to the other side: pump the pair if
        nothing of either side is in flight in the loop."""
        a, b = self.links
        if self.pump is not None or a is None or b is None or src not in (a, b):
            hold_offers(self.loop, RETRY, src)
            return
        if self.pending[0] or self.pending[1] or not (self._quiet(a) and self._quiet(b)):
            hold_offers(self.loop, RETRY_SOON, src)
            return
        if not self.opts.handshake and not a.bytes_in:
            # server0 may still refuse us: right after our first bytes, or
            # at its handshake timeout (30 s by default) if they hold no line.
            # The loop must read that line; a feed only from the service is
            # copied by the loop, never pumped.
            hold_offers(self.loop, RETRY, src)
            return
        assert a.transport is not None and b.transport is not None
        a.transport.pause_reading()
        b.transport.pause_reading()
        try:
            self.pump = Pump(a, b, self._efd, STALL)  # type: ignore[misc]
        except OSError as exc:
            a.transport.resume_reading()
            b.transport.resume_reading()
            hold_offers(self.loop, RETRY, a, b)
            log.debug("not pumped: %s", exc)
            return
        a.pump_wait = b.pump_wait = True
        log.debug("pumping the pair in two threads")
        if self.pump.stopped is not None:  # the second thread did not start
            self._unpump()

    @staticmethod
    def _quiet(link: Link) -> bool:
        t = link.transport
        return (link.attached and link.fd >= 0 and t is not None and not t.is_closing()
                and not t.get_write_buffer_size() and not link.writing_paused
                and link.reading and not link.eof_in
                and link.suspect is None)  # its next bytes must wait behind that line

    def _unpump(self) -> None:
        """Take the pair back from its threads: what their pipes held goes out
        first, then the loop reads again (and meets any EOF or error)."""
        pump, self.pump = self.pump, None
        if pump is None:
            return
        why = pump.stopped
        ab, ba = pump.stop()
        a, b = pump.a, pump.b
        log.debug("the pair is back in the loop (%s)", why or "asked")
        hold_offers(self.loop, RETRY, a, b)
        for x in (a, b):
            t = x.transport
            if t is not None and not t.is_closing() and x.reading and not x.eof_in:
                t.resume_reading()
        for dst, rest in ((b, ab), (a, ba)):
            # A thread's splice to a side whose peer reset failed: writing to
            # it would make its transport close it before we read what it
            # holds (a reset is read as EOF after that: Link.eof_received).
            dst.gone = dst.transport is not None and reset_by_peer(dst.transport)
            if rest is not None and dst.transport is not None and not dst.gone:
                dst.bytes_out += len(rest)  # the threads count only what dst took
                dst.transport.write(rest)

    def _pump_stopped(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            return
        if self.pump is not None and self.pump.stopped is not None:
            self._unpump()

    def update_reading(self, side: int) -> None:
        """Read from ``side`` only while its bytes have somewhere to go."""
        link = self.links[side]
        if link is None:
            return
        dst = self.links[1 - side]
        link.set_reading(not dst.writing_paused if dst is not None
                         else not self.pending[1 - side])

    # -- events from links ------------------------------------------------------------

    def attach(self, link: Link) -> None:
        side = link.side
        stale = (self.stopping or link.gen != self.gen or self.links[side] is not None
                 or (side == 1 and self.opts.on_close == "both" and self.links[0] is None))
        if stale:
            if not link.ready.done():
                link.ready.set_exception(_Stale())
            link.close(abort=True)
            return
        assert link.transport is not None
        self.links[side] = link
        link.attached = True
        if self.links[1 - side] is None:
            self.pair_started = self.loop.time()
        if not link.ready.done():
            link.ready.set_result(None)
        extra = f" chid={link.chid}" if link.chid is not None else ""
        log.info("%s connected %s%s", link.name, format_hostport(*self.addrs[side]), extra)
        held = self.pending[side]
        if held:
            log.debug("%s: passing on %d held bytes", link.name, sum(map(len, held)))
            for chunk in held:
                link.bytes_out += len(chunk)
                link.transport.write(chunk)
            self.pending[side] = []
        if side == 1:
            self.waiting_since = None
        if self.pending_eof[side]:
            self.pending_eof[side] = False
            link.write_eof()
        self.update_reading(side)
        self.update_reading(1 - side)
        if side == 0:
            self.poke[1].set()  # eager mode wants server1 now

    def on_eof(self, link: Link) -> bool:
        """A FIN from ``link``; return True to keep its write direction open."""
        side = link.side
        log.debug("%s sent EOF", link.name)
        if self.opts.on_close == "one":
            self.detach(link, "closed by peer")
            link.close()
            return True
        other = self.links[1 - side]
        if other is not None:
            other.write_eof()
            if other.eof_in:
                self.end_pair("both sides closed")
        elif self.pending[1 - side]:
            self.pending_eof[1 - side] = True  # passed on once the other side connects
        else:
            self.end_pair(f"{link.name} closed")
        return True

    def lost(self, link: Link, reason: str) -> None:
        if self.opts.on_close == "both":
            self.end_pair(f"{link.name} {reason}", cut=True)
        else:
            self.detach(link, reason)

    def on_link_gone(self) -> None:
        if not self.links_all:
            self.gone.set()

    # -- policy -------------------------------------------------------------------------

    def detach(self, link: Link, reason: str) -> None:
        if not link.attached:
            return
        if self.pumping(link):
            self._unpump()
        link.attached = False
        self.links[link.side] = None
        link.closing = reason
        if link.transport is None:  # already gone: the counts are final
            link.log_closed()
        if not link.done.done():
            link.done.set_result(reason)
        self.update_reading(1 - link.side)
        self.poke[link.side].set()

    def end_pair(self, reason: str, cut: bool = False) -> None:
        """``both`` mode: close both sides and let the slots start a fresh pair.
        ``cut``: a side was lost, so the other is reset once its bytes are out."""
        links = [x for x in self.links if x is not None]
        if not links:
            return
        held = sum(len(c) for q in self.pending for c in q)
        held += sum(len(x.suspect_line) for x in links if x.suspect is not None)
        log.info("pair end after %.1fs: %s; %s%s", self.loop.time() - self.pair_started, reason,
                 ", ".join(x.stats() for x in links),
                 f"; dropped {held} held bytes" if held else "")
        self.gen += 1
        self.pending = [[], []]
        self.pending_eof = [False, False]
        self.waiting_since = None
        for x in links:
            # Ended for the other side's sake: not a failure of this one.
            x.by_us = not x.eof_in and x.transport is not None and not x.transport.is_closing()
            self.detach(x, reason)
            x.close(cut=cut)
        for ev in self.poke:
            ev.set()

    def wanted(self, side: int) -> bool:
        if self.stopping or self.links[side] is not None:
            return False
        if side == 0:
            return True
        return bool(self.pending[1] or self.pending_eof[1]
                    or (self.opts.connect == "eager" and self.links[0] is not None))

    # -- slots ------------------------------------------------------------------------------

    async def slot(self, side: int) -> None:
        """Keep one side connected while it is wanted; raises GiveUp to stop the bridge."""
        while not self.stopping:
            await self._until_wanted(side)
            link = await self._connect_retry(side)
            if link is None:
                continue
            reason = await link.done
            self.ended[side] = self.loop.time()
            if link.refused is not None:
                raise GiveUp(f"{SIDES[side]} {format_hostport(*self.addrs[side])} refused us "
                             f"without a handshake: "
                             f"{refused_hint(link.refused, '--chid or --recvers')}",
                             EXIT_REJECTED)
            age = self.loop.time() - link.started
            healthy = HEALTHY_AFTER
            if side == 0 and self.opts.timeout:  # the idle timeout we asked server0 for
                healthy = min(healthy, self.opts.timeout)
            if link.by_us or link.bytes_in or link.bytes_out or link.welcomed or age >= healthy:
                self.failures[side] = 0
                # No failure, but ended young with nothing asked of it (a
                # service that greets and closes, a chid taken over back and
                # forth): not a reconnect at once either, or it runs hot.
                if age < QUICK_END and not (link.bytes_in if side == 0 else link.bytes_out):
                    self.quick[side] += 1
                    await self._backoff(side, f"ended after {age:.1f}s before "
                                        + ("the relay sent anything" if side == 0
                                           else "anything was sent to it") + f": {reason}",
                                        self.gen, count=False, tries=self.quick[side])
                else:
                    self.quick[side] = 0
            else:
                await self._backoff(side, f"dropped after {age:.1f}s without data: {reason}",
                                    self.gen)

    async def _until_wanted(self, side: int) -> None:
        ev = self.poke[side]
        while not self.stopping:
            ev.clear()
            if self.wanted(side):
                return
            await ev.wait()

    async def _connect_retry(self, side: int) -> Link | None:
        gen = self.gen
        while True:
            if gen != self.gen or not self.wanted(side):
                return None
            try:
                return await self._connect_once(side, gen)
            except _Stale:
                return None
            except HandshakeFailed as exc:
                if not exc.retryable:
                    hint = password_hint(exc.desc, encrypted=self.key is not None)
                    raise GiveUp(f"{SIDES[side]} {format_hostport(*self.addrs[side])} rejected "
                                 f"the handshake: {exc.desc}" + (f": {hint}" if hint else ""),
                                 EXIT_REJECTED) from None
                # Our own session, the server still tearing it down: no failure.
                # Its connection may still flush, up to CLOSE_LINGER after its end.
                ours = exc.desc.startswith(_OURS_FAIL) and (
                    self.loop.time() - self.ended[side] < CLOSE_LINGER
                    or any(x.side == side and x.welcomed for x in self.links_all))
                if not await self._backoff(side, describe(exc), gen, count=not ours):
                    return None
            except (OSError, asyncio.TimeoutError) as exc:
                why = (str(exc) if isinstance(exc, HandshakeTimeout)
                       else f"cannot connect: {describe(exc)}")
                left = self._wait_left() if side == 1 else None
                if left is not None and left <= 0:
                    self._turn_away(why)
                    return None
                if not await self._backoff(side, why, gen, left):
                    return None

    def _wait_left(self) -> float | None:
        """Seconds the relay's bytes may still wait for server1 (None: no
        bytes wait, or ``one`` mode, where they wait as long as it takes)."""
        if self.opts.on_close != "both" or self.waiting_since is None:
            return None
        return self.waiting_since + self.opts.service_wait - self.loop.time()

    def _turn_away(self, why: str) -> None:
        """The service stayed down while a remote client waited: reset the
        relay session (a pair partner sees ``pair partner lost``), as socat
        or frp drop the connection of a client they cannot serve, rather
        than leave it hanging. The next request tries the service again."""
        self._count_failure(1, why)
        log.warning("server1 %s: %s; resetting the relay session that waited %.1fs for it",
                    format_hostport(*self.addrs[1]), why,
                    self.loop.time() - (self.waiting_since or self.loop.time()))
        self.end_pair(f"server1 {why}", cut=True)

    async def _connect_once(self, side: int, gen: int) -> Link:
        host, port = self.addrs[side]
        made: list[Link] = []

        def factory() -> Link:
            made.append(Link(self, side, gen))
            return made[-1]

        timeout = self.opts.connect_timeout
        left = self._wait_left() if side == 1 else None
        if left is not None:  # a request waits: --service-wait bounds the attempt
            timeout = min(timeout, max(left, ATTEMPT_MIN))
        deadline = self.loop.time() + timeout
        try:
            sock = await self._open(host, port, timeout)
            await self.loop.create_connection(factory, sock=sock)
            link = made[-1]
            # Not wait_for: since 3.12 it may raise even if the link became
            # ready in the same loop turn (attached, its pair going).
            done, _ = await asyncio.wait((link.ready,),
                                         timeout=max(deadline - self.loop.time(), 0.001))
            if not done:
                link.ready.cancel()
                if link.hs is None:  # nothing to answer: no handshake sent
                    raise asyncio.TimeoutError
                raise HandshakeTimeout(self.opts.connect_timeout)
            link.ready.result()  # its failure, if it failed
        except (asyncio.TimeoutError, TimeoutError):  # distinct classes before 3.11
            for x in made:
                x.close(abort=True)
            raise
        return link

    async def _open(self, host: str, port: int, timeout: float) -> socket.socket:
        """A socket connected within ``timeout``, before any transport exists.
        A timeout around create_connection could hit after connection_made:
        uvloop then closes the new transport without connection_lost, and
        the link, attached already (and sent the request), stays for good."""
        deadline = self.loop.time() + timeout
        infos = await asyncio.wait_for(
            self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        error: OSError | None = None
        for family, kind, proto, _, addr in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:  # a family this kernel lacks (IPv6): the next address
                error = exc
                continue
            try:
                sock.setblocking(False)
                await asyncio.wait_for(self.loop.sock_connect(sock, addr),
                                       max(deadline - self.loop.time(), 0.0))
                return sock
            except (asyncio.TimeoutError, TimeoutError):  # an OSError since 3.11
                sock.close()
                raise
            except OSError as exc:  # refused: the next address, as create_connection
                sock.close()
                error = exc
            except BaseException:  # cancelled
                sock.close()
                raise
        raise error or OSError(f"no address for {host}")

    def _count_failure(self, side: int, why: str) -> int:
        """One more failure in a row for ``side``; GiveUp past --max-retries."""
        self.failures[side] += 1
        n = self.failures[side]
        limit = self.opts.max_retries
        if limit is not None and n > limit:
            where = f"{SIDES[side]} {format_hostport(*self.addrs[side])}"
            raise GiveUp(f"giving up on {where} after {n} failed attempts: {why}", EXIT_GAVE_UP)
        return n

    async def _backoff(self, side: int, why: str, gen: int, cap: float | None = None,
                       count: bool = True, tries: int = 0) -> bool:
        """Count a failure (unless not ``count``: then wait as after ``tries``
        failures), give up past --max-retries, else wait (at most ``cap``
        seconds); False if the wait became moot.
        Bytes that start waiting for server1 meanwhile end the wait: the
        service gets one try at once, and --service-wait bounds the rest."""
        if self.stopping:
            return False
        n = self._count_failure(side, why) if count else max(self.failures[side], tries, 1)
        waited = side == 1 and self.waiting_since is not None
        where = f"{SIDES[side]} {format_hostport(*self.addrs[side])}"
        delay = backoff_delay(n)
        if waited:  # a request waits: the delays start short again, within --service-wait
            since, tries = self._tries
            tries = tries + 1 if since == self.waiting_since else 1
            self._tries = (self.waiting_since, tries)
            delay = backoff_delay(tries)
        if cap is not None:
            delay = min(delay, max(cap, 0.0))
        log.log(logging.WARNING if count else logging.INFO, "%s: %s (retry %d in %.1fs)",
                where, why, n, delay)
        deadline = self.loop.time() + delay
        ev = self.poke[side]
        while (left := deadline - self.loop.time()) > 0:
            ev.clear()
            try:
                await asyncio.wait_for(ev.wait(), left)
            except asyncio.TimeoutError:
                break
            if gen != self.gen or self.stopping:
                return False
            if side == 1 and not waited and self.waiting_since is not None:
                return True
        return True

    def stop(self) -> None:
        """Close every connection (queued bytes get SHUTDOWN_LINGER to flush) and wake
        every slot, so that none waits on a link that will never end. A side
        whose bytes are still held for the other is reset, not closed: its
        peer must not take the FIN for delivery. One whose bytes the other
        side still flushes is closed once that flush is over, and reset if
        the flush was cut (Link.after_flush)."""
        self.stopping = True
        self.stop_by = self.loop.time() + SHUTDOWN_LINGER
        held = sum(len(c) for q in self.pending for c in q)
        held += sum(len(x.suspect_line) for x in self.links_all if x.suspect is not None)
        if held:
            log.warning("dropped %d held bytes", held)
        live = [(x, x.transport) for x in self.links
                if x is not None and x.transport is not None and not x.transport.is_closing()]
        # A side whose peer reset (not read yet) lost what was sent to it.
        # After our own FIN, CLOSE is also the state of a clean close: the
        # socket's pending error tells.
        lost = {x.side for x, t in live if x.gone or x.peer_reset or (
            reset_by_peer(t) and (not x.eof_out or error_reset(t)))}
        flushing = [x for x, t in live if x.side not in lost and unacked(t)]
        waiting = None  # a side whose bytes the other still flushes: closed after it
        if len(flushing) == 1 and (waiting := self.links[1 - flushing[0].side]) is not None:
            flushing[0].after_flush = waiting
        for link in list(self.links_all):
            cut = link.attached and (bool(self.pending[1 - link.side])
                                     or link.suspect is not None  # its line is dropped
                                     or 1 - link.side in lost)
            self.detach(link, "shutting down")
            if link is not waiting or cut:
                link.close(linger=SHUTDOWN_LINGER, cut=cut)
            else:  # what it still sends is not read: closed with it unread, it is a reset
                link.set_reading(False)
        for ev in self.poke:
            ev.set()

    async def wait_closed(self) -> None:
        if self.links_all:
            self.gone.clear()
            try:
                await asyncio.wait_for(self.gone.wait(), SHUTDOWN_LINGER + 1)
            except asyncio.TimeoutError:
                # What is still queued dies with the process: a reset says
                # so, where the kernel's close would send a FIN after it.
                for link in list(self.links_all):
                    if link.transport is not None:
                        link.reset_now(link.transport)
                if self.links_all:  # their connection_lost logs their closed lines
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.gone.wait(), 1)


async def bridge_main(opts: BridgeOptions) -> int:
    """Run until a signal (0) or a reason to give up (non-zero)."""
    loop = asyncio.get_running_loop()
    # First: a signal while the Bridge is built (scrypt takes a while) must
    # find our handler, not Python's, which left the loop deaf to signals.
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    key = None
    if opts.password is not None:
        # scrypt is slow on purpose: once per process, not per connection,
        # and in a thread, so that a signal meanwhile is heard.
        log.debug("deriving the key from the password (scrypt)")
        key = await loop.run_in_executor(None, derive_key, opts.password)
    bridge = Bridge(opts, loop, key)
    log.info("fwd-client starting server0=%s server1=%s handshake=%s on-close=%s connect=%s "
             "max-retries=%s", format_hostport(*opts.server0), format_hostport(*opts.server1),
             opts.describe_handshake(), opts.on_close, opts.connect,
             "forever" if opts.max_retries is None else opts.max_retries)
    tasks: list[asyncio.Task[None]] = [loop.create_task(bridge.slot(i)) for i in (0, 1)]
    stopper: asyncio.Task[Any] = loop.create_task(stop.wait())
    waiting: list[asyncio.Task[Any]] = [*tasks, stopper]
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    code = EXIT_OK
    for t in tasks:
        if t.done() and not t.cancelled() and (exc := t.exception()) is not None:
            if not isinstance(exc, GiveUp):
                raise exc
            log.error("%s", exc)
            code = exc.code
    log.info("stopping" if code == EXIT_OK else "stopping after an error")
    # Cancelling alone is not enough: before Python 3.12, wait_for swallows a
    # cancel that races with its result, so the slots also see ``stopping``.
    bridge.stop()
    for t in waiting:
        t.cancel()
    await asyncio.wait(waiting, timeout=SHUTDOWN_LINGER)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: a late error during shutdown is not worth a traceback
    await bridge.wait_closed()
    log.info("stopped")
    return code


def run(opts: BridgeOptions) -> int:
    import uvloop

    return uvloop.run(bridge_main(opts))
