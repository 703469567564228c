"""Who receives a sender's bytes: the chid registry, routes, hold buffers and
backpressure bookkeeping, all without I/O.

Sessions are hashable objects whose ``chid`` the router sets when they claim
one (the session is the only table from session to chid: one entry less per
idle session); the I/O layer does the writing. The routing table answers
"which live sessions get this chunk, and which named receivers are absent" in
O(1) per read while nothing changes, because routes are cached and only rebuilt
after a join or leave (tracked by ``generation``).
"""
from __future__ import annotations

import secrets
from array import array
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, cast

from .errors import ChidInUse


class Member(Hashable, Protocol):
    chid: str | None


T = TypeVar("T", bound=Member)


def new_chid() -> str:
    """A short, URL-safe chid nobody can guess (96 random bits)."""
    return secrets.token_urlsafe(12)


@dataclass(frozen=True, slots=True)
class Route(Generic[T]):
    """Where one sender's bytes go right now.

    ``targets`` may include the sender itself (the shared "everyone" tuple is
    reused for all broadcasters), so the writer skips ``sender``. ``to_all`` is
    true for "everyone else" routes (which also reach every other worker);
    ``remote`` names receivers live on other workers, as (worker, chid);
    ``missing`` lists named receivers that are not live anywhere, whose bytes
    are to be held. ``closed`` counts named receivers live here whose write
    side is shut (§3.7): their share of each chunk is dropped, and counted.
    ``local`` says the targets are all there is (no holds, no other workers,
    not "everyone", nothing to count): the writer then has nothing else to do.
    """

    generation: int
    targets: tuple[T, ...]
    missing: tuple[str, ...]
    to_all: bool
    remote: tuple[tuple[int, str], ...] = ()
    closed: int = 0
    local: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "local", not (self.to_all or self.missing or self.remote
                                               or self.closed))


HOLD_CHID_COST = 1024
"""Memory of an absent chid's hold besides its bytes (its _Hold, deque, sizes
and dict entry: about 1,000 bytes measured with one sender), charged to
hold_total: one hs3 may name hundreds of absent chids."""
HOLD_BOOKKEEPING_MIN = 1 << 20
"""A sender's bookkeeping of its held reads, over all chids, may take its
hold_bytes, or this much if that is less: a small hold_bytes must still let
a read be held for a few hundred chids."""
HOLD_ENTRY_COST = 224
"""Memory of one held read besides its bytes (its (time, bytes, sender) tuple,
deque slot, reference count, sender's size and bookkeeping entries and the
bytes object's own header: 208 measured), charged to hold_total and to its
sender's hold_bytes: a flood of one-byte reads costs this each."""


@dataclass(slots=True)
class _Hold:
    # (when, bytes, sender's chid): the receiver may accept only some senders.
    chunks: deque[tuple[float, bytes | memoryview, str | None]] = field(default_factory=deque)
    # Bytes held per sender: each gets its own hold_bytes, so a stranger that
    # floods an absent chid cannot crowd out the sender it will accept.
    size: dict[str | None, int] = field(default_factory=dict)


class Router(Generic[T]):
    """The chid registry and route resolution of one worker.

    A session goes through ``claim`` (handshake step hs1; broadcast clients
    without a handshake skip it), then ``join`` (it becomes live: it can send
    and receive), then ``leave``.
    """

    def __init__(self, *, hold_bytes: int, hold_seconds: float, hold_total: int,
                 chid_cost: int = HOLD_CHID_COST, entry_cost: int = HOLD_ENTRY_COST) -> None:
        self.hold_bytes = hold_bytes
        self.hold_seconds = hold_seconds
        self.hold_total = hold_total
        self.chid_cost = chid_cost
        self.entry_cost = entry_cost
        self.bookkeeping_max = max(hold_bytes, HOLD_BOOKKEEPING_MIN)
        # The compiled read loop checks its cached route against this cell
        # on every read: a C load, where an attribute would be a dict lookup.
        self.generation_cell = array("q", [0])
        # sender -> what expire() dropped of its held bytes, and when the
        # newest of them was held
        self.expired: dict[str, tuple[int, float]] = {}
        self.held = 0  # bytes in memory: a chunk held for several chids counts once
        # Per sender, the bookkeeping of its held reads over all chids: it
        # counts against its hold_bytes too, or tiny reads named to many
        # chids would take hold_total at HOLD_ENTRY_COST each.
        self._entries: dict[str | None, int] = {}
        self.overhead = 0  # the holds' own memory; held + overhead + queued <= hold_total
        self.queued = 0  # held bytes join() gave a receiver, not written out yet (written_held)
        # Called when hold_total looks full while some of ``queued`` may have
        # been written already (the I/O layer learns that only when it looks):
        # a hold is not refused for bytes that are gone.
        self.settle: Callable[[], None] | None = None
        self._refs: dict[int, int] = {}  # id(held read) -> holds that have it, or a view of it
        self._owner: dict[str, T] = {}  # claimed chids; live ones have _recvers too
        self._muted: set[T] = set()
        self._recvers: dict[T, tuple[str, ...]] = {}
        self._everyone: tuple[T, ...] = ()
        self._everyone_gen = -1
        self._routes: dict[T, Route[T]] = {}
        self._holds: dict[str, _Hold] = {}
        self._remote: dict[str, int] = {}
        self._sealed: set[T] = set()
        self._senders: dict[T, frozenset[str]] = {}  # hs3 "senders": only these reach it
        self._everyone_for: dict[str | None, tuple[T, ...]] = {}
        self.on_sealed: Callable[[T], None] | None = None

    @property
    def generation(self) -> int:
        """Bumped by every change that may alter a route; a cached route of an
        older generation is stale."""
        return self.generation_cell[0]

    @generation.setter
    def generation(self, value: int) -> None:
        self.generation_cell[0] = value

    # -- registry ---------------------------------------------------------------

    def claim(
        self, session: T, chid: str | None, *, takeover: bool = False
    ) -> tuple[str, T | None]:
        """Reserve ``chid`` (or a fresh one) for ``session``.

        Returns the chid and, with ``takeover``, the session it was taken from
        (the caller closes that one). Raises ChidInUse otherwise.
        """
        if chid is None:
            chid = new_chid()
            while chid in self._owner:  # pragma: no cover - 96 random bits
                chid = new_chid()
        evicted = self._owner.get(chid)
        if evicted is not None:
            if not takeover or evicted is session:
                raise ChidInUse(chid)
            self.leave(evicted)
        self._owner[chid] = session
        session.chid = chid
        return chid, evicted

    def owner(self, chid: str) -> T | None:
        return self._owner.get(chid)

    def live(self, chid: str) -> T | None:
        """The live session holding ``chid`` here, unless its write side is shut."""
        session = self._owner.get(chid)
        if session is None or session not in self._recvers or session in self._muted:
            return None
        return session

    def chid_of(self, session: T) -> str | None:
        """The chid ``session`` holds here (None if it has none, or lost it)."""
        chid = session.chid
        return chid if chid is not None and self._owner.get(chid) is session else None

    def join(self, session: T, recvers: Iterable[str] = ()) -> list[bytes]:
        """Make ``session`` live; return the bytes held for its chid that it
        accepts, oldest first. They go into its queue whole, so they still
        count against hold_total until the caller says they were written
        (written_held): else a receiver that does not read could keep a full
        hold_total queued, and the holds fill up again behind it."""
        self._recvers[session] = tuple(recvers)
        self.generation += 1
        chid = session.chid
        if chid is None or self._owner.get(chid) is not session:
            return []
        chunks = [chunk for sender, chunk in self._take_hold(chid)
                  if self.accepts(session, sender)]
        self.queued += sum(map(len, chunks))
        return chunks

    def queue_held(self, nbytes: int) -> bool:
        """Held bytes from another worker are about to be queued for a live
        receiver: they count as join()'s do, if they fit hold_total."""
        if nbytes > self.hold_total - self.held - self.overhead - self.queued:
            if self.queued and self.settle is not None:
                self.settle()
            if nbytes > self.hold_total - self.held - self.overhead - self.queued:
                return False
        self.queued += nbytes
        return True

    def written_held(self, nbytes: int) -> None:
        """``nbytes`` of what join() returned have left their receiver's queue."""
        self.queued -= nbytes

    def accept_only(self, session: T, senders: Iterable[str] | None) -> None:
        """``session`` receives only from these chids (None: from anyone)."""
        if senders is None:
            self._senders.pop(session, None)
        else:
            self._senders[session] = frozenset(senders)
        self.generation += 1

    def accepts(self, receiver: T, sender: str | None) -> bool:
        """Whether bytes from chid ``sender`` may reach ``receiver``."""
        allowed = self._senders.get(receiver)
        return allowed is None or sender in allowed

    def senders_of(self, session: T) -> frozenset[str] | None:
        return self._senders.get(session)

    def leave(self, session: T) -> None:
        """Forget ``session``; its chid is free again at once. Idempotent."""
        chid = session.chid
        if chid is not None and self._owner.get(chid) is session:
            del self._owner[chid]
        if self._recvers.pop(session, None) is not None:
            self.generation += 1
        self._routes.pop(session, None)
        self._muted.discard(session)
        self._sealed.discard(session)
        if self._senders.pop(session, None) is not None:
            self.generation += 1

    def mute(self, session: T) -> None:
        """``session`` can no longer receive (its write side is shut) but may
        still send; bytes for its chid are dropped, not held."""
        if session in self._recvers and session not in self._muted:
            self._muted.add(session)
            self.generation += 1

    def pair_of(self, session: T) -> T | None:
        """The partner if ``session`` and it name each other as sole receivers.

        A pair is a 1:1 stream, so a FIN can be passed on (as socat does); in
        any larger room it could not, because others still write to the receiver.
        """
        recvers = self._recvers.get(session)
        if recvers is None or len(recvers) != 1:
            return None
        partner = self._owner.get(recvers[0])
        if partner is None or partner is session:
            return None
        if self._recvers.get(partner) != (session.chid,):
            return None
        if self._senders and not (self.accepts(partner, session.chid)
                                  and self.accepts(session, partner.chid)):
            return None  # one of them would not hear the other: no 1:1 stream
        return partner

    def seal(self, *sessions: T) -> None:
        """Another layer moves the bytes between ``sessions`` now (a pumped
        pair), and nothing else may write to them: a route from any other
        sender that reaches one of them calls ``on_sealed`` with it first,
        which must unseal it. Routes cached before this are rebuilt."""
        self._sealed.update(sessions)
        self.generation += 1

    def unseal(self, *sessions: T) -> None:
        self._sealed.difference_update(sessions)

    def expose(self, targets: Iterable[T]) -> None:
        """Bytes from outside are about to reach ``targets``: the sealed ones
        among them go to ``on_sealed`` first."""
        if self._sealed and self.on_sealed is not None:
            for target in [t for t in targets if t in self._sealed]:
                self.on_sealed(target)

    def is_live(self, session: T) -> bool:
        return session in self._recvers

    def __len__(self) -> int:
        return len(self._recvers)

    # -- routes -----------------------------------------------------------------

    def route(self, sender: T) -> Route[T]:
        """The receivers of ``sender``'s next chunk (``sender`` must be live)."""
        cached = self._routes.get(sender)
        if cached is not None and cached.generation == self.generation:
            return cached
        recvers = self._recvers[sender]
        if recvers:
            owner, joined, muted = self._owner, self._recvers, self._muted
            here = [s if (s := owner.get(c)) is not None and s in joined else None
                    for c in recvers]
            targets = tuple(s for s in here
                            if s is not None and s is not sender and s not in muted)
            closed = sum(1 for s in here if s is not None and s is not sender and s in muted)
            if self._senders:
                targets = tuple(t for t in targets if self.accepts(t, sender.chid))
            remote_of = self._remote
            elsewhere = [c for c, s in zip(recvers, here, strict=True) if s is None]
            remote = tuple((remote_of[c], c) for c in elsewhere if c in remote_of)
            missing = tuple(c for c in elsewhere if c not in remote_of)
            route = Route(self.generation, targets, missing, False, remote, closed)
        else:
            route = Route(self.generation, self.everyone(sender.chid), (), True)
        if self._sealed and sender not in self._sealed:
            self.expose(route.targets)
        self._routes[sender] = route
        return route

    def live_count(self) -> int:
        return len(self._recvers)

    def everyone(self, sender: str | None = None) -> tuple[T, ...]:
        """The live sessions that "everyone else" bytes from chid ``sender``
        reach: all of them unless some accept only certain senders. Shared by
        every such route (rebuilt after a join or leave)."""
        if self._everyone_gen != self.generation:
            muted = self._muted
            self._everyone = tuple(s for s in self._recvers if s not in muted)
            self._everyone_for.clear()
            self._everyone_gen = self.generation
        if not self._senders:
            return self._everyone
        reach = self._everyone_for.get(sender)
        if reach is None:
            if len(self._everyone_for) >= 1024:  # bound the cache: one per sender chid
                self._everyone_for.clear()
            reach = self._everyone_for[sender] = tuple(
                s for s in self._everyone if self.accepts(s, sender))
        return reach

    # -- other workers -----------------------------------------------------------

    def set_remote(self, chid: str, worker: int) -> list[tuple[str | None, bytes]]:
        """``chid`` went live on another worker; return what was held for it here
        (with each sender's chid), to be sent there before anything newer."""
        self._remote[chid] = worker
        self.generation += 1
        return self._take_hold(chid)

    def drop_remote(self, chid: str, worker: int | None = None) -> None:
        """``chid`` left its worker (or, with ``worker``, only if it lived there)."""
        if chid in self._remote and (worker is None or self._remote[chid] == worker):
            del self._remote[chid]
            self.generation += 1

    def drop_worker(self, worker: int) -> None:
        """A worker died: none of its chids are live any more."""
        for chid in [c for c, w in self._remote.items() if w == worker]:
            del self._remote[chid]
        self.generation += 1

    def where(self, chid: str) -> int | None:
        return self._remote.get(chid)

    # -- hold buffers ------------------------------------------------------------

    def hold(self, chid: str, chunk: bytes, now: float, sender: str | None = None) -> int:
        """Keep ``chunk`` from chid ``sender`` for the absent receiver ``chid``;
        return bytes dropped.

        Tail drop, per sender: a receiver that connects late gets the first
        bytes each sender sent it (up to the limit) and loses the rest, rather
        than a stream with a hole at its start. The part of a read that fits
        is a view of it, not a copy: a read held for hundreds of chids, whole
        or in part, is in memory once, and counts once, whole.
        """
        hold = self._holds.get(chid)
        cost = self.entry_cost + (self.chid_cost if hold is None else 0)
        spare = self.hold_total - self.held - self.overhead - self.queued - cost  # for the bytes
        if spare < len(chunk) and self.queued and self.settle is not None:
            self.settle()
            spare = self.hold_total - self.held - self.overhead - self.queued - cost
        room = self.hold_bytes - (hold.size.get(sender, 0) if hold is not None else 0)
        entries = self._entries.get(sender, 0)
        if room <= 0 or spare < 0 or entries + self.entry_cost > self.bookkeeping_max:
            return len(chunk)
        kept: bytes | memoryview
        if len(chunk) <= room and (id(chunk) in self._refs or len(chunk) <= spare):
            kept = base = chunk
        elif (id(chunk) in self._refs and spare >= self.entry_cost) \
                or len(chunk) + self.entry_cost <= spare:
            kept, base = memoryview(chunk)[:room], chunk
            cost += self.entry_cost  # the view object
        else:  # only a part fits the total: that part alone, copied
            kept = base = chunk[:min(room, spare)]
            if not kept:
                return len(chunk)
        if hold is None:
            hold = self._holds[chid] = _Hold()
        self.overhead += cost
        hold.chunks.append((now, kept, sender))
        self._entries[sender] = entries + self._entry(kept)
        hold.size[sender] = hold.size.get(sender, 0) + len(kept)
        refs = self._refs.get(id(base), 0)
        self._refs[id(base)] = refs + 1
        if not refs:
            self.held += len(base)
        return len(chunk) - len(kept)

    def _entry(self, kept: bytes | memoryview) -> int:
        return self.entry_cost * 2 if isinstance(kept, memoryview) else self.entry_cost

    def _release(self, kept: bytes | memoryview, sender: str | None) -> None:
        """One hold lets go of ``kept``: the read's memory is free with the last."""
        entry = self._entry(kept)
        self.overhead -= entry
        left = self._entries.get(sender, 0) - entry
        if left > 0:
            self._entries[sender] = left
        else:
            self._entries.pop(sender, None)
        base = cast(bytes, kept.obj) if isinstance(kept, memoryview) else kept
        key = id(base)
        refs = self._refs[key] - 1
        if refs:
            self._refs[key] = refs
        else:
            del self._refs[key]
            self.held -= len(base)

    def _take_hold(self, chid: str) -> list[tuple[str | None, bytes]]:
        hold = self._holds.pop(chid, None)
        if hold is None:
            return []
        for _, kept, sender in hold.chunks:
            self._release(kept, sender)
        self.overhead -= self.chid_cost
        # A view becomes bytes here, the one copy of its part, as it leaves.
        return [(sender, kept if isinstance(kept, bytes) else bytes(kept))
                for _, kept, sender in hold.chunks]

    def expire(self, now: float) -> int:
        """Drop held chunks older than ``hold_seconds``; return bytes dropped
        (and, in ``expired``, what each sender lost)."""
        deadline = now - self.hold_seconds
        dropped = 0
        for chid in list(self._holds):
            hold = self._holds[chid]
            while hold.chunks and hold.chunks[0][0] <= deadline:
                when, chunk, sender = hold.chunks.popleft()
                if sender is not None:
                    was, newest = self.expired.get(sender, (0, when))
                    self.expired[sender] = (was + len(chunk), max(newest, when))
                left = hold.size[sender] - len(chunk)
                if left:
                    hold.size[sender] = left
                else:
                    del hold.size[sender]
                dropped += len(chunk)
                self._release(chunk, sender)
            if not hold.chunks:
                del self._holds[chid]
                self.overhead -= self.chid_cost
        return dropped

    def held_from(self, chid: str, sender: str, since: float) -> float | None:
        """When the oldest bytes from ``sender`` held for ``chid`` at ``since``
        or later (from its session that went live then, not an earlier one
        of that chid) were held; None: none are (they went to a session of
        ``chid``, or expired)."""
        hold = self._holds.get(chid)
        if hold is None or sender not in hold.size:
            return None
        return next((when for when, _, s in hold.chunks if s == sender and when >= since), None)

    def held_since(self, chid: str) -> float | None:
        """When the oldest bytes held for ``chid`` were held (None: none are)."""
        hold = self._holds.get(chid)
        return hold.chunks[0][0] if hold is not None and hold.chunks else None

    def has_holds(self) -> bool:
        return bool(self._holds)

    def holding(self, chid: str) -> bool:
        return chid in self._holds


class Backpressure(Generic[T]):
    """Which senders are paused, and on which full receivers they wait.

    A sender stays paused while at least one receiver it wrote to is above its
    high-water mark; ``release`` names the senders that may read again.
    """

    def __init__(self) -> None:
        self._waiters: dict[T, set[T]] = {}
        self._waiting_on: dict[T, int] = {}

    def block(self, sender: T, receiver: T) -> bool:
        """Record that ``sender`` waits for ``receiver``; True if it must pause now."""
        waiters = self._waiters.setdefault(receiver, set())
        if sender in waiters:
            return False
        waiters.add(sender)
        count = self._waiting_on.get(sender, 0)
        self._waiting_on[sender] = count + 1
        return count == 0

    def release(self, receiver: T) -> list[T]:
        """``receiver`` drained (or left): the senders that are free again."""
        freed = []
        for sender in self._waiters.pop(receiver, ()):
            count = self._waiting_on[sender] - 1
            if count:
                self._waiting_on[sender] = count
            else:
                del self._waiting_on[sender]
                freed.append(sender)
        return freed

    def is_paused(self, sender: T) -> bool:
        return sender in self._waiting_on

    def forget(self, session: T) -> list[T]:
        """``session`` is gone, as a receiver and as a sender."""
        freed = self.release(session)
        if self._waiting_on.pop(session, None) is not None:
            for waiters in self._waiters.values():
                waiters.discard(session)
        return freed
