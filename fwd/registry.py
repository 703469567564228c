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


class Registry:
    """The acceptor's view of every claimed chid and of each worker's load."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._owner: dict[str, Owner] = {}
        self._wanted_by: dict[str, Counter[int]] = {}

    def claim(self, chid: str | None, owner: Owner, *,
              takeover: bool = False) -> tuple[str, Owner | None]:
        """Give ``chid`` (or a fresh one) to ``owner``; return the evicted owner
        with ``takeover``, else raise ChidInUse if it is held."""
        if chid is None:
            chid = new_chid()
            while chid in self._owner:  # pragma: no cover - 96 random bits
                chid = new_chid()
        old = self._owner.get(chid)
        if old is not None and old != owner and not takeover:
            raise ChidInUse(chid)
        self._owner[chid] = owner
        return chid, (old if old != owner else None)

    def release(self, chid: str, owner: Owner) -> bool:
        """Free ``chid`` if ``owner`` still holds it; stale releases are ignored."""
        if self._owner.get(chid) != owner:
            return False
        del self._owner[chid]
        return True

    def where(self, chid: str) -> int | None:
        owner = self._owner.get(chid)
        return None if owner is None else owner.worker

    def owner(self, chid: str) -> Owner | None:
        return self._owner.get(chid)

    def move(self, chid: str, old: Owner, new: Owner) -> bool:
        """Record that a session migrated to another worker."""
        if self._owner.get(chid) != old:
            return False
        self._owner[chid] = new
        return True

    def worker_lost(self, worker: int) -> list[str]:
        """A worker died: free its chids (its sockets died with it)."""
        lost = [c for c, o in self._owner.items() if o.worker == worker]
        for chid in lost:
            del self._owner[chid]
        for counts in self._wanted_by.values():
            counts.pop(worker, None)
        return lost

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
