"""Chid ownership and session placement across worker processes, without I/O.

With several workers, one process (the acceptor) keeps this table so that a
chid is unique server-wide even when many workers see the same hs1 at once:
claims are serialised here. Each entry names the worker and a per-worker
session token, so that a late release from a session that was taken over, or
from a worker that was restarted, can never free a chid that changed hands.

Placement serves co-location: a pair A<->B should live on one worker, so its
bytes never cross processes. A new session goes where the chids it names
live, or where sessions that name it live (they may hold bytes for it), or,
for a chid nobody has claimed yet, where other sessions that name it wait (the
viewers of a camera that is not up yet, so that its fan-out stays in one
worker); otherwise it stays where the parent put it (the least-loaded worker).

Locations are told by interest: a worker learns where a live chid is only
when one of its sessions names it (or asks where to go), and then hears when
it ends. A worker serving "everyone" sessions learns nothing of the other
workers' chids, which keeps the per-session cost of a handshake and the memory
of every worker independent of how many sessions the others have.

Likewise a session announces that it is live only when that matters: when it
names chids, or when sessions name its chid (known at its claim, or later: the
registry then asks its worker, "watch"). A handshake of an "everyone" session
nobody names costs the coordinator a claim and a release, nothing more.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ChidInUse
from .routing import new_chid


@dataclass(frozen=True, slots=True)
class Owner:
    worker: int
    token: int


TOKEN_BITS = 32
"""A session token is its worker process's incarnation (the parent numbers
every start of a worker) above TOKEN_BITS, and a counter below: a restarted
worker's tokens never repeat its predecessor's, so an owner (worker, token)
names one session for the server's life."""


def incarnation(token: int) -> int:
    return token >> TOKEN_BITS


Notice = tuple[int, str, int]
"""(worker to tell, chid, worker it lives on)."""
Watch = tuple[int, str, int]
"""(worker, chid, token): that session must announce when it is live."""


class Registry:
    """The acceptor's view of every claimed chid and of each worker's load.

    Each chid's entry is one int (token, worker, whether its session is live
    and whether its worker was asked to say so, packed): an idle server holds
    one per session, so it is kept small.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        # bit 0: live (announced); bit 1: watched; then the worker; then the token
        self._shift = workers.bit_length() + 2
        self._owner: dict[str, int] = {}
        self._named: dict[str, tuple[str, ...]] = {}  # live chid -> the chids its session names
        self._wanted_by: dict[str, Counter[int]] = {}
        self._told: dict[str, set[int]] = {}  # live chid -> workers that know where
        # chid -> the worker its session was just told to move to (heading)
        self._heading: dict[str, int] = {}

    def _pack(self, owner: Owner) -> int:
        return owner.token << self._shift | owner.worker << 2

    def _unpack(self, packed: int) -> Owner:
        return Owner((packed & ((1 << self._shift) - 1)) >> 2, packed >> self._shift)

    def _holds(self, chid: str, owner: Owner) -> bool:
        packed = self._owner.get(chid)
        return packed is not None and packed >> 2 == self._pack(owner) >> 2

    def claim(self, chid: str | None, owner: Owner, *,
              takeover: bool = False) -> tuple[str, Owner | None]:
        """Give ``chid`` (or a fresh one) to ``owner``; return the evicted owner
        with ``takeover`` (then call ``ended``), else raise ChidInUse if it is held."""
        if chid is None:
            chid = new_chid()
            while chid in self._owner:  # pragma: no cover - 96 random bits
                chid = new_chid()
        packed = self._owner.get(chid)
        old = None if packed is None else self._unpack(packed)
        if old is not None and old != owner and not takeover:
            raise ChidInUse(chid)
        self._owner[chid] = self._pack(owner)
        self._heading.pop(chid, None)
        return chid, (old if old != owner else None)

    def release(self, chid: str, owner: Owner) -> bool:
        """Free ``chid`` if ``owner`` still holds it (then call ``ended``);
        stale releases are ignored."""
        if not self._holds(chid, owner):
            return False
        del self._owner[chid]
        self._heading.pop(chid, None)
        return True

    def where(self, chid: str) -> int | None:
        """The worker of ``chid``'s session, or the one it is moving to."""
        heading = self._heading.get(chid)
        if heading is not None:
            return heading
        packed = self._owner.get(chid)
        return None if packed is None else self._unpack(packed).worker

    def heading(self, chid: str, worker: int) -> None:
        """``chid``'s session was told to move to ``worker``: place the sessions
        that name it there from now on, not where it still is. Two sessions
        that name each other and ask at once would otherwise each be sent to
        the other's worker, and their pair would be split."""
        if chid in self._owner:
            self._heading[chid] = worker

    def owner(self, chid: str) -> Owner | None:
        packed = self._owner.get(chid)
        return None if packed is None else self._unpack(packed)

    def move(self, chid: str, old: Owner, new: Owner) -> bool:
        """Record that a session migrated to another worker (before it is live)."""
        if not self._holds(chid, old):
            return False
        self._owner[chid] = self._pack(new)
        self._heading.pop(chid, None)
        return True

    def worker_lost(self, worker: int) -> list[str]:
        """A worker died: free its chids (its sockets died with it). The others
        forget its locations by themselves (they are told it died)."""
        lost = [c for c, p in self._owner.items() if self._unpack(p).worker == worker]
        for chid in lost:
            del self._owner[chid]
            self._named.pop(chid, None)
            self._told.pop(chid, None)
            self._heading.pop(chid, None)
        for chid in [c for c, counts in self._wanted_by.items()
                     if counts.pop(worker, None) is not None and not counts]:
            del self._wanted_by[chid]
        for told in self._told.values():
            told.discard(worker)
        return lost

    # -- who knows where a chid lives ----------------------------------------------

    def go_live(self, chid: str, owner: Owner,
                recvers: tuple[str, ...]) -> tuple[list[Notice], list[Watch]]:
        """``owner``'s session announced it is live, naming ``recvers``: where
        each worker must now be told that a chid lives, and which sessions it
        names must be asked to announce. Its own worker learns where the chids
        it names are; workers whose sessions name ``chid`` learn where it is.
        Stale (``owner`` lost the chid meanwhile): nothing."""
        if not self._holds(chid, owner):
            return [], []
        self._owner[chid] |= 1
        self._heading.pop(chid, None)  # it lives where it is (a move may not happen)
        worker = owner.worker
        notices: list[Notice] = []
        watches: list[Watch] = []
        for c in recvers:
            at = self._live_elsewhere(c, worker)
            if at is not None:
                if self._tell(c, worker):
                    notices.append((worker, c, at))
            elif (watch := self._watch(c)) is not None:
                watches.append(watch)
        if recvers:  # an "everyone" session draws nothing: keep nothing for it
            self._named[chid] = recvers
            self.want(worker, recvers)
        counts = self._wanted_by.get(chid)
        if counts:
            for w in counts:
                if w != worker and self._tell(chid, w):
                    notices.append((w, chid, worker))
        return notices, watches

    def locate(self, worker: int, chids: Iterable[str]) -> tuple[dict[str, int], list[Watch]]:
        """Where the live ones among ``chids`` are, if not on ``worker`` (from
        now on ``worker`` is told when they end, see ``ended``), and which of
        the others must be asked to announce."""
        found: dict[str, int] = {}
        watches: list[Watch] = []
        for chid in chids:
            at = self._live_elsewhere(chid, worker)
            if at is not None:
                self._tell(chid, worker)
                found[chid] = at
            elif (watch := self._watch(chid)) is not None:
                watches.append(watch)
        return found, watches

    def _watch(self, chid: str) -> Watch | None:
        """A claimed chid whose session has not announced: ask it, once."""
        packed = self._owner.get(chid)
        if packed is None or packed & 3:  # absent, announced, or asked already
            return None
        self._owner[chid] = packed | 2
        owner = self._unpack(packed)
        return owner.worker, chid, owner.token

    def _live_elsewhere(self, chid: str, worker: int) -> int | None:
        packed = self._owner.get(chid)
        if packed is None or not packed & 1:
            return None
        at = self._unpack(packed).worker
        return at if at != worker else None

    def _tell(self, chid: str, worker: int) -> bool:
        told = self._told.setdefault(chid, set())
        if worker in told:
            return False
        told.add(worker)
        return True

    def ended(self, chid: str, old: Owner) -> list[int]:
        """``old``'s session no longer holds ``chid`` (released, or taken over):
        withdraw what it named, and return the workers that must hear it is gone."""
        recvers = self._named.pop(chid, None)
        if recvers:
            self.want(old.worker, recvers, -1)
        return sorted(self._told.pop(chid, ()))

    # -- placement -------------------------------------------------------------

    def want(self, worker: int, recvers: Iterable[str], delta: int = 1) -> None:
        """Note that a session on ``worker`` names ``recvers`` (delta -1 when it ends)."""
        for chid in recvers:
            counts = self._wanted_by.setdefault(chid, Counter())
            counts[worker] += delta
            if counts[worker] <= 0:
                del counts[worker]
                if not counts:
                    del self._wanted_by[chid]

    def wanted_home(self, chid: str) -> int | None:
        """The worker whose live sessions name ``chid`` most, if any do."""
        counts = self._wanted_by.get(chid)
        return max(counts, key=lambda w: (counts[w], -w)) if counts else None

    def votes(self, chid: str | None, recvers: Iterable[str]) -> Counter[int]:
        """Per worker: how many of the chids this session names live there (or,
        for one not claimed yet, how many sessions there name it too), plus how
        many sessions there name this session's chid."""
        votes: Counter[int] = Counter()
        for r in recvers:
            where = self.where(r)
            if where is not None:
                votes[where] += 1
            elif r in self._wanted_by:
                # Absent, and sessions elsewhere wait for it too: join them, so
                # that its fan-out stays inside one worker once it comes.
                votes.update(self._wanted_by[r])
        if chid is not None and chid in self._wanted_by:
            votes.update(self._wanted_by[chid])
        return votes

    def home(self, chid: str | None, recvers: Iterable[str], asking: int) -> int | None:
        """The worker a session should live on, or None when nothing draws it
        anywhere; on a tie the asking worker wins (no move needed)."""
        votes = self.votes(chid, recvers)
        if not votes:
            return None
        return max(votes, key=lambda w: (votes[w], w == asking, -w))

    def __len__(self) -> int:
        return len(self._owner)
