"""Sans-I/O tests for the chid registry, routes, hold buffers and backpressure."""
from __future__ import annotations

import gc
import re
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fwd.errors import ChidInUse
from fwd.protocol import check_chid
from fwd.routing import (
    HOLD_BOOKKEEPING_MIN,
    HOLD_CHID_COST,
    HOLD_ENTRY_COST,
    Backpressure,
    Router,
    new_chid,
)


class Sess:
    """A stand-in session: hashable by identity, readable in failure output."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.chid: str | None = None  # set by Router.claim

    def __repr__(self) -> str:
        return f"Sess({self.name})"


def make_router(hold_bytes=100, hold_seconds=10.0, hold_total=1000, chid_cost=0,
                entry_cost=0) -> Router:
    """Without the holds' own memory by default: the byte arithmetic stays plain."""
    return Router(hold_bytes=hold_bytes, hold_seconds=hold_seconds, hold_total=hold_total,
                  chid_cost=chid_cost, entry_cost=entry_cost)


def live(router: Router, name: str, chid: str | None = None, recvers=()) -> Sess:
    """Claim ``chid`` (if given) and join: a live session."""
    s = Sess(name)
    if chid is not None:
        router.claim(s, chid)
    router.join(s, recvers)
    return s


# -- claim ------------------------------------------------------------------------------


def test_claim_reserves_the_chid():
    r = make_router()
    a = Sess("a")
    assert r.claim(a, "x") == ("x", None)
    assert r.owner("x") is a
    assert r.chid_of(a) == "x"
    assert not r.is_live(a), "claim alone does not make a session live"
    assert len(r) == 0


def test_claim_without_chid_generates_unique_url_safe_ones():
    r = make_router()
    seen = set()
    for i in range(300):
        s = Sess(str(i))
        chid, evicted = r.claim(s, None)
        assert evicted is None
        assert re.fullmatch(r"[A-Za-z0-9_-]{16}", chid), chid  # 96 bits of URL-safe base64
        assert check_chid(chid) == chid
        assert r.owner(chid) is s
        seen.add(chid)
    assert len(seen) == 300


def test_new_chid_is_random():
    assert len({new_chid() for _ in range(100)}) == 100


@pytest.mark.parametrize("joined", [False, True])
def test_claim_of_held_chid_raises(joined):
    """Held means claimed, whether or not the holder is live yet."""
    r = make_router()
    a = Sess("a")
    r.claim(a, "x")
    if joined:
        r.join(a)
    b = Sess("b")
    with pytest.raises(ChidInUse) as info:
        r.claim(b, "x")
    assert info.value.chid == "x"
    assert r.owner("x") is a
    assert r.chid_of(b) is None
    assert r.is_live(a) is joined


def test_takeover_evicts_the_holder():
    r = make_router()
    a = live(r, "a", "x")
    gen = r.generation
    b = Sess("b")
    assert r.claim(b, "x", takeover=True) == ("x", a)
    assert r.owner("x") is b
    assert r.chid_of(b) == "x"
    assert r.chid_of(a) is None, "the evicted session no longer owns the chid"
    assert not r.is_live(a)
    assert r.generation > gen, "the live set changed, so routes must be rebuilt"


def test_takeover_of_a_free_chid_evicts_nobody():
    r = make_router()
    b = Sess("b")
    assert r.claim(b, "x", takeover=True) == ("x", None)
    assert r.owner("x") is b


def test_late_leave_of_evicted_session_keeps_the_new_owner():
    r = make_router()
    a = live(r, "a", "x")
    b = Sess("b")
    r.claim(b, "x", takeover=True)
    r.join(b)
    sender = live(r, "s", "s", recvers=("x",))
    before = r.route(sender)
    gen = r.generation
    r.leave(a)  # the I/O layer closes the evicted session later
    assert r.owner("x") is b
    assert r.chid_of(b) == "x"
    assert r.is_live(b)
    assert r.generation == gen
    assert r.route(sender).targets == (b,)
    assert before.targets == (b,)
    with pytest.raises(ChidInUse):
        r.claim(Sess("c"), "x")


def test_takeover_routes_go_to_the_new_owner():
    r = make_router()
    a = live(r, "a", "x")
    sender = live(r, "s", "s", recvers=("x",))
    assert r.route(sender).targets == (a,)
    b = Sess("b")
    r.claim(b, "x", takeover=True)
    assert r.route(sender).targets == ()
    assert r.route(sender).missing == ("x",)
    r.join(b)
    assert r.route(sender).targets == (b,)
    assert r.route(sender).missing == ()


# -- join / leave -------------------------------------------------------------------


def test_join_makes_live_and_bumps_generation():
    r = make_router()
    a = Sess("a")
    r.claim(a, "x")
    gen = r.generation
    assert r.join(a, ("y",)) == []
    assert r.is_live(a)
    assert len(r) == 1
    assert r.generation > gen


def test_join_without_claim_is_a_nameless_broadcaster():
    """Broadcast clients skip the handshake: live, in everyone(), but not addressable."""
    r = make_router()
    anon = live(r, "anon")
    assert r.is_live(anon)
    assert r.chid_of(anon) is None
    assert anon in r.everyone()
    named = live(r, "n", "n", recvers=("anon",))
    assert r.route(named).targets == ()
    assert r.route(named).missing == ("anon",)


def test_leave_frees_the_chid_at_once():
    r = make_router()
    a = live(r, "a", "x")
    gen = r.generation
    r.leave(a)
    assert not r.is_live(a)
    assert r.owner("x") is None
    assert r.chid_of(a) is None
    assert len(r) == 0
    assert r.generation > gen
    b = Sess("b")
    assert r.claim(b, "x") == ("x", None)


def test_leave_of_claimed_but_not_joined_frees_the_chid():
    r = make_router()
    a = Sess("a")
    r.claim(a, "x")
    r.leave(a)
    assert r.owner("x") is None
    r.claim(Sess("b"), "x")


def test_leave_is_idempotent():
    r = make_router()
    other = live(r, "o", "o")
    a = live(r, "a", "x")
    r.leave(a)
    gen = r.generation
    r.leave(a)
    r.leave(a)
    r.leave(Sess("never seen"))
    assert r.generation == gen
    assert r.is_live(other) and r.owner("o") is other
    assert len(r) == 1


# -- routes -----------------------------------------------------------------------------


def test_named_route_targets_and_missing_in_order():
    r = make_router()
    b = live(r, "b", "b")
    d = live(r, "d", "d")
    c = Sess("c")
    r.claim(c, "c")  # claimed, not live yet: still missing
    s = live(r, "s", "s", recvers=("d", "a", "b", "c"))
    route = r.route(s)
    assert route.targets == (d, b)
    assert route.missing == ("a", "c")
    assert route.to_all is False
    assert route.generation == r.generation


def test_named_route_never_targets_the_sender():
    r = make_router()
    b = live(r, "b", "b")
    s = live(r, "s", "s", recvers=("s", "b"))
    route = r.route(s)
    assert route.targets == (b,)
    assert route.missing == ()


def test_a_muted_receiver_gets_nothing_and_nothing_is_held_for_it():
    """Its write side is shut: bytes for it are dropped, not held or sent elsewhere."""
    r = make_router()
    b = live(r, "b", "b")
    r.set_remote("b", 1)  # a stale location from another worker must not win either
    s = live(r, "s", "s", recvers=("b",))
    r.mute(b)
    route = r.route(s)
    assert route.targets == () and route.missing == () and route.remote == ()
    assert r.live("b") is None and r.owner("b") is b


def test_everyone_route_includes_all_live_sessions_and_is_shared():
    r = make_router()
    a = live(r, "a", "a")
    b = live(r, "b", "b")
    anon = live(r, "anon")
    pending = Sess("p")
    r.claim(pending, "p")
    ra, rb = r.route(a), r.route(b)
    assert ra.to_all and rb.to_all
    assert set(ra.targets) == {a, b, anon}, "includes the sender; the writer skips it"
    assert pending not in ra.targets
    assert ra.missing == ()
    assert ra.targets is rb.targets, "one shared tuple for every broadcaster"
    assert r.everyone() is ra.targets


def test_route_is_cached_until_generation_changes():
    r = make_router()
    a = live(r, "a", "a")
    s = live(r, "s", "s", recvers=("a", "b"))
    first = r.route(s)
    assert r.route(s) is first
    r.claim(Sess("x"), "x")  # claims do not change who is live
    assert r.route(s) is first
    b = live(r, "b", "b")
    second = r.route(s)
    assert second is not first
    assert second.generation == r.generation > first.generation
    assert second.targets == (a, b) and second.missing == ()
    assert r.route(s) is second
    r.leave(a)
    third = r.route(s)
    assert third.targets == (b,) and third.missing == ("a",)


def test_everyone_route_follows_joins_and_leaves():
    r = make_router()
    a = live(r, "a", "a")
    assert r.route(a).targets == (a,)
    b = live(r, "b", "b")
    assert set(r.route(a).targets) == {a, b}
    r.leave(b)
    assert r.route(a).targets == (a,)
    r.leave(a)
    assert r.everyone() == ()


def test_route_after_sender_leaves_and_rejoins_is_fresh():
    r = make_router()
    b = live(r, "b", "b")
    s = Sess("s")
    r.claim(s, "s")
    r.join(s, ("b",))
    assert r.route(s).targets == (b,)
    r.leave(s)
    r.claim(s, "s")
    r.join(s, ())
    assert r.route(s).to_all


# -- sealed pairs -------------------------------------------------------------------


def sealed_pair(r: Router):
    exposed: list = []

    def unseal(s):
        exposed.append(s)
        r.unseal(s)

    r.on_sealed = unseal
    a = live(r, "a", "a", ["b"])
    b = live(r, "b", "b", ["a"])
    return a, b, exposed


def test_sealing_rebuilds_routes_cached_before_it():
    r = make_router()
    a, b, exposed = sealed_pair(r)
    c = live(r, "c", "c", ["b"])
    before = r.route(c)
    r.seal(a, b)
    assert r.route(c) is not before
    assert exposed == [b]


def test_a_route_from_outside_exposes_only_the_sealed_targets_it_reaches():
    r = make_router()
    a, b, exposed = sealed_pair(r)
    c = live(r, "c", "c", ["b", "d"])
    d = live(r, "d", "d", ["c"])
    r.seal(a, b)
    assert r.route(d).targets == (c,)
    assert exposed == []
    assert r.route(c).targets == (b, d)
    assert exposed == [b]
    r.unseal(a)
    assert r.route(c).targets == (b, d)  # cached: nothing exposed twice
    assert exposed == [b]


def test_everyone_routes_expose_every_sealed_session():
    r = make_router()
    a, b, exposed = sealed_pair(r)
    e = live(r, "e")  # nameless: "everyone else"
    r.seal(a, b)
    r.route(e)
    assert sorted(x.name for x in exposed) == ["a", "b"]


def test_the_pair_itself_and_a_leaving_session_expose_nothing():
    r = make_router()
    a, b, exposed = sealed_pair(r)
    r.seal(a, b)
    assert r.route(a).targets == (b,)
    r.leave(b)
    c = live(r, "c", "c", ["b"])
    r.route(c)
    r.expose([a, b, c])
    assert exposed == [a]  # b left: forgotten with it


# -- model-based check of routes ---------------------------------------------------

_NAMES = ["a", "b", "c", "d"]
_ops = st.lists(
    st.tuples(
        st.sampled_from(["claim", "takeover", "join", "leave", "route"]),
        st.integers(0, 5),  # session index
        st.sampled_from(_NAMES),
        st.lists(st.sampled_from(_NAMES), max_size=3, unique=True),
    ),
    max_size=40,
)


@settings(max_examples=150)
@given(_ops)
def test_routes_match_a_brute_force_model(ops):
    """Whatever the order of claims, takeovers, joins and leaves, every route is exact."""
    r = make_router()
    sessions = [Sess(str(i)) for i in range(6)]
    owner: dict[str, Sess] = {}
    live_recvers: dict[Sess, tuple[str, ...]] = {}
    for op, i, chid, recvers in ops:
        s = sessions[i]
        mine = next((c for c, o in owner.items() if o is s), None)
        if op in ("claim", "takeover"):
            if mine is not None or s in live_recvers:
                continue  # the I/O layer claims once, before joining
            holder = owner.get(chid)
            if holder is not None and op == "claim":
                with pytest.raises(ChidInUse):
                    r.claim(s, chid)
                continue
            assert r.claim(s, chid, takeover=op == "takeover") == (chid, holder)
            if holder is not None:
                live_recvers.pop(holder, None)
            owner[chid] = s
        elif op == "join":
            if s in live_recvers:
                continue
            r.join(s, tuple(recvers))
            live_recvers[s] = tuple(recvers)
        elif op == "leave":
            r.leave(s)
            live_recvers.pop(s, None)
            if mine is not None:
                del owner[mine]
        for c in _NAMES:
            assert r.owner(c) is owner.get(c)
        for x in sessions:
            assert r.is_live(x) == (x in live_recvers)
        live_by_chid = {c: o for c, o in owner.items() if o in live_recvers}
        for sender, want in live_recvers.items():
            route = r.route(sender)
            if want:
                assert route.targets == tuple(
                    live_by_chid[c]
                    for c in want
                    if c in live_by_chid and live_by_chid[c] is not sender
                )
                assert route.missing == tuple(c for c in want if c not in live_by_chid)
                assert not route.to_all
            else:
                assert set(route.targets) == set(live_recvers)
                assert len(route.targets) == len(live_recvers)
                assert route.to_all and route.missing == ()


# -- hold buffers -------------------------------------------------------------------


def test_hold_then_join_returns_bytes_in_order():
    r = make_router()
    assert r.hold("x", b"one", 0.0) == 0
    assert r.hold("x", b"two", 1.0) == 0
    assert r.hold("y", b"other", 1.0) == 0
    assert r.held == 11
    assert r.has_holds()
    a = Sess("a")
    r.claim(a, "x")
    assert r.join(a) == [b"one", b"two"]
    assert r.held == 5
    b = Sess("b")
    r.claim(b, "y")
    assert r.join(b) == [b"other"]
    assert r.held == 0
    assert not r.has_holds()


def test_held_bytes_are_handed_out_once():
    r = make_router()
    r.hold("x", b"data", 0.0)
    a = live(r, "a", "x")
    r.leave(a)
    b = Sess("b")
    r.claim(b, "x")
    assert r.join(b) == []


def test_hold_per_receiver_cap_is_tail_drop_with_partial_chunk():
    """A late receiver gets the first bytes sent to it, up to hold_bytes."""
    r = make_router(hold_bytes=10, hold_total=1000)
    assert r.hold("x", b"abcdef", 0.0) == 0
    assert r.hold("x", b"ghijkl", 0.0) == 2  # keeps "ghij"
    assert r.hold("x", b"mno", 0.0) == 3
    assert r.hold("x", b"", 0.0) == 0
    assert r.held == 12  # "ghij" is a view of "ghijkl", which stays whole in memory
    assert r.hold("y", b"0123456789", 0.0) == 0, "the cap is per receiver"
    assert r.hold("y", b"!", 0.0) == 1
    a = Sess("a")
    r.claim(a, "x")
    assert b"".join(r.join(a)) == b"abcdefghij"


def test_each_sender_gets_its_own_hold_bytes_for_an_absent_chid():
    """A stranger that floods an absent chid cannot crowd out the sender the
    receiver will accept (hs3 "senders"): each sender's stream gets its own
    first hold_bytes."""
    r = make_router(hold_bytes=10, hold_total=1000)
    assert r.hold("x", b"s" * 30, 0.0, "stranger") == 20
    assert r.hold("x", b"abcdef", 1.0, "friend") == 0
    assert r.hold("x", b"ghijkl", 2.0, "friend") == 2
    assert r.hold("x", b"s", 2.0, "stranger") == 1
    assert r.held == 42  # views of a 30-byte and a 6-byte read keep them whole
    r.expire(10.5)  # the stranger's bytes go first: they are the oldest
    assert r.hold("x", b"t" * 3, 11.0, "stranger") == 0
    assert r.hold("x", b"m", 11.0, "friend") == 1
    a = Sess("a")
    r.claim(a, "x")
    r.accept_only(a, ["friend"])
    assert b"".join(r.join(a)) == b"abcdefghij"


def test_hold_chunk_exactly_filling_the_cap_is_kept_whole():
    r = make_router(hold_bytes=8)
    assert r.hold("x", b"1234", 0.0) == 0
    assert r.hold("x", b"5678", 0.0) == 0
    assert r.held == 8
    a = Sess("a")
    r.claim(a, "x")
    assert r.join(a) == [b"1234", b"5678"]


def test_hold_global_cap():
    r = make_router(hold_bytes=8, hold_total=10)
    assert r.hold("a", b"x" * 8, 0.0) == 0
    assert r.hold("b", b"y" * 8, 0.0) == 6  # only 2 bytes of room left overall
    assert r.hold("c", b"z", 0.0) == 1
    assert r.held == 10
    s = Sess("s")
    r.claim(s, "a")
    r.join(s)  # its 8 bytes leave the holds, for its queue
    assert r.held == 2
    assert r.hold("c", b"z", 0.0) == 1  # and count until they are written
    r.written_held(8)
    assert r.hold("c", b"z" * 5, 0.0) == 0
    # b may take 6 more under its own cap but only 3 under the global one.
    assert r.hold("b", b"y" * 8, 0.0) == 5
    assert r.held == 10


def test_a_full_hold_asks_the_io_layer_what_was_written_before_it_refuses():
    """Held bytes a receiver took stopped counting only at the next
    once-a-second look: meanwhile a hold that fit was cut (explore23)."""
    r = make_router(hold_bytes=8, hold_total=10)
    r.hold("a", b"x" * 8, 0.0)
    s = Sess("s")
    r.claim(s, "a")
    r.join(s)
    written = [8]  # what the I/O layer finds out when it looks
    r.settle = lambda: r.written_held(written.pop()) if written else None
    assert r.hold("b", b"y" * 8, 0.0) == 0
    assert r.queued == 0 and not written
    assert r.hold("c", b"z" * 8, 0.0) == 6  # nothing more to settle: the cap holds
    assert r.queue_held(1) is False


def test_hold_global_cap_accounting_is_exact():
    r = make_router(hold_bytes=8, hold_total=10)
    r.hold("a", b"x" * 8, 0.0)
    r.hold("b", b"y" * 8, 0.0)
    assert r.held == 10
    s = Sess("s")
    r.claim(s, "a")
    assert r.join(s) == [b"x" * 8]
    assert r.held == 2
    r.written_held(8)
    # b holds 2 bytes: its own cap leaves 6, the global cap leaves 8.
    assert r.hold("b", b"y" * 7, 0.0) == 1
    assert r.held == 9  # 6 of 7 bytes are a view: the 7 are in memory
    t = Sess("t")
    r.claim(t, "b")
    assert b"".join(r.join(t)) == b"y" * 8


def test_held_bytes_count_against_the_total_until_written_out():
    """join() hands a receiver every byte held for it, into its queue at
    once: until the caller says they were written, they still count, so a
    receiver that never reads cannot let the holds fill up again behind it
    (a helper's run grew by --hold-total per such receiver)."""
    r = make_router(hold_bytes=8, hold_total=10)
    assert r.hold("a", b"x" * 8, 0.0) == 0
    s = Sess("s")
    r.claim(s, "a")
    assert r.join(s) == [b"x" * 8]
    assert (r.held, r.queued) == (0, 8)
    assert r.hold("b", b"y" * 8, 0.0) == 6
    r.written_held(5)
    assert r.hold("b", b"y" * 8, 0.0) == 3  # room for 5 of them now
    r.written_held(3)
    assert r.queued == 0
    assert r.hold("c", b"z" * 3, 0.0) == 0
    assert r.held == 10


def test_a_chunk_held_for_several_chids_counts_once_against_the_total():
    """One client naming many absent chids must not use up --hold-total for
    everyone with bytes that are in memory once."""
    r = make_router(hold_bytes=8, hold_total=10)
    chunk = b"x" * 8
    for chid in "abcdefgh":
        assert r.hold(chid, chunk, 0.0) == 0
    assert r.held == 8
    assert r.hold("z", b"y" * 2, 0.0) == 0  # the rest of the total is still there
    assert r.hold("z", b"y" * 2, 0.0) == 2
    s = Sess("s")
    r.claim(s, "a")
    assert r.join(s) == [chunk]
    assert r.held == 10  # the others still hold it
    for chid in "bcdefgh":
        t = Sess(chid)
        r.claim(t, chid)
        assert r.join(t) == [chunk]
    assert r.held == 2


def test_a_read_held_in_part_for_many_chids_is_in_memory_once():
    """A fast sender naming hundreds of absent chids: each chid keeps the part
    of a read that fits its hold_bytes. Copies of that part, one per chid,
    made one connection take hundreds of times its hold_bytes of the total."""
    r = make_router(hold_bytes=1000, hold_total=10**9)
    chids = [f"c{i}" for i in range(300)]
    reads = [bytes([i]) * 300 for i in range(5)]  # the fourth fits only in part
    for read in reads:
        for chid in chids:
            r.hold(chid, read, 0.0, "s")
    assert r.held == 4 * 300  # the fourth read whole, once; the fifth not at all
    a = Sess("a")
    r.claim(a, "c7")
    assert b"".join(r.join(a)) == b"".join(reads)[:1000]
    r.expire(100.0)
    assert (r.held, r.overhead) == (0, 0)
    # A view's own cost fits the total too, or the part is copied instead.
    r = make_router(hold_bytes=5, hold_total=60, entry_cost=10)
    read = b"x" * 8
    for chid in chids[:10]:
        r.hold(chid, read, 0.0, "s")
        assert r.held + r.overhead <= 60


def test_the_holds_own_memory_counts_against_the_total():
    """A hold's bookkeeping costs memory too: hundreds of absent chids, or a
    flood of small reads, must reach --hold-total long before their bytes
    would."""
    r = make_router(hold_bytes=1000, hold_total=1000, chid_cost=100, entry_cost=10)
    for i in range(8):  # 8 chids x (100 + 10 + 2) = 896
        assert r.hold(f"c{i}", b"x%d" % i, 0.0) == 0
    assert (r.held, r.overhead) == (16, 880)
    assert r.hold("c8", b"x8", 0.0) == 2  # a ninth chid does not fit
    for i in range(8):  # 8 more reads x (10 + 2): 992
        assert r.hold("c0", b"y%d" % i, 0.0) == 0
    assert r.hold("c0", b"z0", 0.0) == 2  # the 10 bytes of its entry do not fit
    r.expire(100.0)  # every hold expires: all its memory is free again
    assert (r.held, r.overhead) == (0, 0)
    for i in range(8):
        assert r.hold(f"c{i}", b"x%d" % i, 200.0) == 0
    a = Sess("a")
    r.claim(a, "c0")
    assert r.join(a) == [b"x0"]
    assert (r.held, r.overhead) == (14, 770)


def _allocated(work: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = work()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return after - before


def test_the_hold_costs_cover_the_memory_they_stand_for():
    """HOLD_CHID_COST and HOLD_ENTRY_COST are what --hold-total charges for
    memory it cannot see in len(): they must not fall behind the real thing."""
    n = 5000
    senders = [f"sender{i:05d}" for i in range(n)]
    chids = [f"chid{i:05d}" for i in range(n)]
    r = Router(hold_bytes=1 << 30, hold_seconds=30, hold_total=1 << 40)
    chunk = b"x"
    r.hold("warm", chunk, 0.0, "s")
    # A new chid each, from one sender: the chid's cost and one entry.
    per_chid = _allocated(lambda: [r.hold(c, chunk, 0.0, "s") for c in chids] and None) / n
    assert per_chid <= HOLD_CHID_COST + HOLD_ENTRY_COST
    # Two-byte reads (one-byte bytes are shared singletons), each a new object
    # from a new sender: the worst entry.
    per_read = _allocated(
        lambda: [r.hold("warm", i.to_bytes(2, "big"), 0.0, s) for i, s in enumerate(senders)]
        and None) / n
    assert per_read - 2 <= HOLD_ENTRY_COST
    # A part of a read, one read for all: a view each, charged as a second entry.
    r = Router(hold_bytes=1, hold_seconds=30, hold_total=1 << 40)
    read = b"xy"
    r.hold("warm", read, 0.0, "s")
    per_view = _allocated(lambda: [r.hold(c, read, 0.0, "s") for c in chids] and None) / n
    assert per_view <= HOLD_CHID_COST + 2 * HOLD_ENTRY_COST


def test_zero_caps_drop_everything():
    r = make_router(hold_bytes=0)
    assert r.hold("x", b"abc", 0.0) == 3
    assert r.held == 0
    r2 = make_router(hold_total=0)
    assert r2.hold("x", b"abc", 0.0) == 3
    assert r2.held == 0


def test_expire_drops_old_chunks_and_returns_bytes_dropped():
    r = make_router(hold_seconds=5.0)
    r.hold("x", b"old", 0.0)
    r.hold("x", b"newer", 3.0)
    r.hold("y", b"ancient", 0.5)
    assert r.expire(4.0) == 0
    assert r.held == 15
    assert r.expire(6.0) == len(b"old") + len(b"ancient")
    assert r.held == 5
    a = Sess("a")
    r.claim(a, "y")
    assert r.join(a) == []
    b = Sess("b")
    r.claim(b, "x")
    assert r.join(b) == [b"newer"]
    assert not r.has_holds()


def test_expire_everything_clears_holds():
    r = make_router(hold_seconds=1.0)
    r.hold("x", b"a", 10.0)
    r.hold("x", b"b", 10.5)
    assert r.expire(100.0) == 2
    assert r.held == 0
    assert not r.has_holds()
    assert r.expire(200.0) == 0


def test_expire_frees_room_under_both_caps():
    r = make_router(hold_bytes=4, hold_total=4, hold_seconds=1.0)
    r.hold("x", b"1234", 0.0)
    assert r.hold("x", b"5", 0.5) == 1
    assert r.hold("y", b"5", 0.5) == 1
    r.expire(2.0)
    assert r.hold("x", b"abcd", 2.0) == 0
    a = Sess("a")
    r.claim(a, "x")
    assert r.join(a) == [b"abcd"]


# chid -> (when, bytes, sender, the read they are part of)
Held = dict[str, list[tuple[float, bytes, str, bytes]]]


def unique(model: Held) -> dict[int, bytes]:
    return {id(b): b for v in model.values() for _, _, _, b in v}


def memory(model: Held) -> int:
    return sum(len(b) for b in unique(model).values())


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(1, 12), st.integers(0, 3), st.booleans(),
                  st.sampled_from("pq")),
        max_size=30,
    ),
    st.integers(0, 20),
    st.integers(0, 30),
)
def test_hold_accounting_model(ops, hold_bytes, hold_total):
    """held is always the memory of what is held (a chunk held for several chids
    once), within both caps (hold_bytes per sender and chid), and nothing is
    lost silently."""
    # hold_seconds is off the 0.5 s grid of chunk times: no chunk sits exactly on the
    # boundary, so this does not pin down whether "older than" is < or <=.
    r = make_router(hold_bytes=hold_bytes, hold_total=hold_total, hold_seconds=2.25)
    model: Held = {}
    now = 0.0
    last: tuple[bytes, str] | None = None
    for chid, size, step, share, sender in ops:
        now += step * 0.5
        dropped_old = r.expire(now)
        expected_old = 0
        for c in list(model):
            keep = [e for e in model[c] if now - e[0] < 2.25]
            expected_old += sum(len(b) for t, b, _, _ in model[c] if now - t > 2.25)
            model[c] = keep
        assert dropped_old == expected_old
        # A read routed to several absent chids is one object held by each.
        if share and last is not None:
            chunk, sender = last
        else:
            chunk = bytes([65 + size]) * size
            last = chunk, sender
        mine = sum(len(b) for _, b, who, _ in model.get(chid, []) if who == sender)
        room = hold_bytes - mine
        spare = hold_total - memory(model)
        # What fits of a read is the read itself, or a view of it, in memory
        # once, whole; or, where the whole read does not fit, a copy of a part.
        if id(chunk) in unique(model) or len(chunk) <= spare:
            kept, base = chunk[:room], chunk
        else:
            kept = base = chunk[:max(0, min(room, spare))]
        assert r.hold(chid, chunk, now, sender) == len(chunk) - len(kept)
        if kept:
            model.setdefault(chid, []).append((now, kept, sender, base))
        assert r.held == memory(model) <= hold_total
    for chid in "abc":
        s = Sess(chid)
        r.claim(s, chid)
        assert r.join(s) == [b for _, b, _, _ in model.get(chid, [])]
    assert r.held == 0


# -- backpressure -----------------------------------------------------------------------


def test_block_pauses_on_first_full_receiver_only():
    bp = Backpressure()
    s, r1, r2 = Sess("s"), Sess("r1"), Sess("r2")
    assert not bp.is_paused(s)
    assert bp.block(s, r1) is True
    assert bp.is_paused(s)
    assert bp.block(s, r1) is False, "already waiting on r1"
    assert bp.block(s, r2) is False, "already paused"
    assert bp.is_paused(s)


def test_sender_paused_until_every_receiver_it_waits_on_drains():
    bp = Backpressure()
    s, r1, r2 = Sess("s"), Sess("r1"), Sess("r2")
    bp.block(s, r1)
    bp.block(s, r2)
    assert bp.release(r1) == []
    assert bp.is_paused(s)
    assert bp.release(r2) == [s]
    assert not bp.is_paused(s)
    assert bp.block(s, r1) is True, "a new wait pauses again"


def test_duplicate_block_is_counted_once():
    bp = Backpressure()
    s, r = Sess("s"), Sess("r")
    bp.block(s, r)
    bp.block(s, r)
    assert bp.release(r) == [s]
    assert not bp.is_paused(s)


def test_release_frees_several_senders():
    bp = Backpressure()
    a, b, c, r, r2 = Sess("a"), Sess("b"), Sess("c"), Sess("r"), Sess("r2")
    bp.block(a, r)
    bp.block(b, r)
    bp.block(c, r)
    bp.block(c, r2)
    assert set(bp.release(r)) == {a, b}
    assert bp.is_paused(c)
    assert bp.release(r) == []
    assert bp.release(Sess("unknown")) == []


def test_forget_a_receiver_frees_its_senders():
    bp = Backpressure()
    s, r = Sess("s"), Sess("r")
    bp.block(s, r)
    assert bp.forget(r) == [s]
    assert not bp.is_paused(s)


def test_forget_a_sender_removes_it_everywhere():
    bp = Backpressure()
    s, other, r1, r2 = Sess("s"), Sess("o"), Sess("r1"), Sess("r2")
    bp.block(s, r1)
    bp.block(s, r2)
    bp.block(other, r1)
    assert bp.forget(s) == []
    assert not bp.is_paused(s)
    assert bp.release(r1) == [other], "a forgotten sender is never freed later"
    assert bp.release(r2) == []
    assert bp.block(s, r1) is True


def test_forget_a_session_that_is_both_sender_and_receiver():
    bp = Backpressure()
    a, b, c = Sess("a"), Sess("b"), Sess("c")
    bp.block(a, b)  # a waits on b
    bp.block(b, c)  # b waits on c
    assert bp.forget(b) == [a]
    assert not bp.is_paused(b)
    assert bp.release(c) == []
    bp.forget(b)  # idempotent
    assert bp.forget(Sess("never")) == []


@settings(max_examples=150)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["block", "release", "forget"]), st.integers(0, 4), st.integers(0, 4)
        ),
        max_size=40,
    )
)
def test_backpressure_matches_a_model(ops):
    """A sender is paused exactly while it waits on at least one receiver."""
    bp = Backpressure()
    ss = [Sess(str(i)) for i in range(5)]
    waits: dict[Sess, set[Sess]] = {}
    for op, i, j in ops:
        if op == "block":
            if i == j:
                continue  # the writer never waits on itself
            s, r = ss[i], ss[j]
            was = bool(waits.get(s))
            got = bp.block(s, r)
            waits.setdefault(s, set()).add(r)
            assert got == (not was)
        else:
            r = ss[i]
            paused_before = {s for s, w in waits.items() if w}
            if op == "forget":
                waits.pop(r, None)
            for w in waits.values():
                w.discard(r)
            paused_after = {s for s, w in waits.items() if w}
            freed = bp.release(r) if op == "release" else bp.forget(r)
            assert len(freed) == len(set(freed))
            assert set(freed) == paused_before - paused_after - {r}
        for s in ss:
            assert bp.is_paused(s) == bool(waits.get(s))


# -- senders (hs3) ------------------------------------------------------------------------


def test_a_session_with_senders_is_reached_only_by_them():
    r = make_router()
    svc = Sess("svc")
    r.claim(svc, "svc")
    r.accept_only(svc, ["user"])
    r.join(svc, ["user"])
    open_ = live(r, "open", "open")
    loud = live(r, "loud", "loud")  # to everyone else
    named = live(r, "named", "named", ["svc", "open"])
    user = live(r, "user", "user", ["svc"])
    plain = live(r, "plain")  # no chid: a broadcast-mode client
    assert svc not in r.route(loud).targets and open_ in r.route(loud).targets
    assert r.route(named).targets == (open_,) and r.route(named).missing == ()
    assert r.route(user).targets == (svc,)
    assert svc not in r.route(plain).targets
    assert svc in r.everyone("user") and svc not in r.everyone("loud")
    assert svc not in r.everyone(None)
    r.accept_only(svc, None)  # anyone again
    assert svc in r.route(loud).targets and svc in r.route(named).targets


def test_without_senders_everyone_is_one_shared_tuple():
    r = make_router()
    a, b = live(r, "a", "a"), live(r, "b", "b")
    assert r.everyone("a") is r.everyone("b") is r.everyone()
    assert set(r.everyone()) == {a, b}


def test_held_bytes_from_others_are_left_out_at_join():
    r = make_router()
    r.hold("svc", b"junk", 0.0, "stranger")
    r.hold("svc", b"good", 1.0, "user")
    r.hold("svc", b"anon", 2.0, None)
    svc = Sess("svc")
    r.claim(svc, "svc")
    r.accept_only(svc, ["user"])
    assert r.join(svc) == [b"good"]
    assert r.held == 0 and not r.has_holds()


def test_held_bytes_keep_their_sender_when_they_follow_a_chid_elsewhere():
    r = make_router()
    r.hold("svc", b"junk", 0.0, "stranger")
    r.hold("svc", b"good", 1.0, "user")
    assert r.set_remote("svc", 2) == [("stranger", b"junk"), ("user", b"good")]


def test_no_pair_unless_each_hears_the_other():
    r = make_router()
    a = Sess("a")
    r.claim(a, "a")
    r.accept_only(a, ["c"])
    r.join(a, ["b"])
    b = live(r, "b", "b", ["a"])
    assert r.pair_of(a) is None and r.pair_of(b) is None
    r.accept_only(a, ["b", "c"])
    assert r.pair_of(a) is b and r.pair_of(b) is a


def test_leave_forgets_the_senders():
    r = make_router()
    a = Sess("a")
    r.claim(a, "a")
    r.accept_only(a, ["c"])
    r.join(a)
    r.leave(a)
    assert r.senders_of(a) is None


def test_a_senders_bookkeeping_counts_against_its_hold_bytes():
    """Each held read costs HOLD_ENTRY_COST, per chid it is held for; only
    its bytes counted against the sender's hold_bytes, so one-byte reads
    named to many absent chids took the whole hold_total (700 chids, 100
    one-byte reads: 8 MiB), and everyone else's bytes for absent chids were
    dropped."""
    r = make_router(hold_bytes=4000, hold_total=10**9, entry_cost=200)
    chids = [f"c{i}" for i in range(700)]
    r.hold("x", b"small hold_bytes, yet a read for hundreds of chids:", 0.0, "fan")
    assert all(r.hold(c, b"hello", 0.0, "fan") == 0 for c in chids)
    for i in range(100):
        for chid in chids:
            r.hold(chid, bytes([i]), 0.0, "flood")
    assert r.overhead <= 2 * HOLD_BOOKKEEPING_MIN  # "fan"'s, and "flood"'s
    assert r.hold("c1", b"another sender's", 0.0, "other") == 0  # its own share
