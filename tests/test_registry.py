"""The cross-worker chid registry and placement rules, without processes."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwd.errors import ChidInUse
from fwd.registry import Owner, Registry

A1, A2 = Owner(0, 1), Owner(0, 2)
B1 = Owner(1, 1)


def test_claim_is_exclusive_across_workers():
    reg = Registry(2)
    assert reg.claim("x", A1) == ("x", None)
    with pytest.raises(ChidInUse):
        reg.claim("x", B1)
    assert reg.where("x") == 0


def test_generated_chids_are_distinct():
    reg = Registry(1)
    chids = {reg.claim(None, Owner(0, i))[0] for i in range(100)}
    assert len(chids) == 100


def test_takeover_returns_the_evicted_owner_and_its_late_release_is_ignored():
    reg = Registry(2)
    reg.claim("x", A1)
    assert reg.claim("x", B1, takeover=True) == ("x", A1)
    assert not reg.release("x", A1)  # the old session ends after the takeover
    assert reg.owner("x") == B1
    assert reg.release("x", B1)
    assert reg.owner("x") is None


def test_release_by_another_session_of_the_same_worker_is_ignored():
    reg = Registry(1)
    reg.claim("x", A1)
    assert not reg.release("x", A2)
    assert reg.where("x") == 0


def test_worker_lost_frees_only_its_chids():
    reg = Registry(2)
    reg.claim("a", A1)
    reg.claim("b", B1)
    reg.want(0, ["b"])
    assert reg.worker_lost(0) == ["a"]
    assert reg.where("a") is None and reg.where("b") == 1
    assert reg.home("b", [], asking=1) is None  # the dead worker's wishes are gone too
    reg.claim("a", B1)  # free again at once


def test_move_follows_a_migrating_session():
    reg = Registry(2)
    reg.claim("a", A1)
    assert reg.move("a", A1, B1)
    assert reg.where("a") == 1
    assert not reg.move("a", A1, B1)  # stale


def test_home_is_next_to_the_named_receiver():
    reg = Registry(3)
    reg.claim("a", Owner(2, 1))
    assert reg.home("b", ["a"], asking=0) == 2


def test_home_is_next_to_sessions_that_name_it():
    """A sender on worker 1 names "b" before "b" exists: it may hold bytes for it."""
    reg = Registry(3)
    reg.want(1, ["b"])
    assert reg.home("b", [], asking=0) == 1
    reg.want(1, ["b"], -1)
    assert reg.home("b", [], asking=0) is None


def test_two_sessions_naming_each_other_are_not_sent_to_each_others_worker():
    """a (worker 0) and b (worker 1) name each other and ask at once: a is told
    to go to b's worker; b, asking next, must stay there, not go to a's."""
    reg = Registry(2)
    reg.claim("a", A1)
    reg.claim("b", B1)
    home_a = reg.home("a", ["b"], asking=0)
    assert home_a == 1
    reg.heading("a", home_a)  # what the coordinator notes with its answer
    assert reg.home("b", ["a"], asking=1) == 1
    # The move lands (or a goes live where it is): where is the truth again.
    assert reg.move("a", A1, Owner(1, 5))
    assert reg.where("a") == 1
    reg.heading("b", 0)
    reg.go_live("b", B1, ("a",))
    assert reg.where("b") == 1


def test_home_is_none_when_nothing_draws_it():
    reg = Registry(3)
    assert reg.home(None, ["absent"], asking=2) is None


def test_home_majority_wins_and_ties_stay_with_the_asking_worker():
    reg = Registry(3)
    reg.claim("x", Owner(0, 1))
    reg.claim("y", Owner(1, 1))
    reg.claim("z", Owner(1, 2))
    assert reg.home(None, ["x", "y", "z"], asking=0) == 1
    assert reg.home(None, ["x", "y"], asking=1) == 1
    assert reg.home(None, ["x", "y"], asking=0) == 0


@given(st.lists(st.tuples(st.sampled_from("cr"), st.sampled_from("abc"),
                          st.integers(0, 2), st.integers(0, 3)), max_size=60))
def test_at_most_one_owner_per_chid_matches_a_model(ops):
    reg = Registry(3)
    model: dict[str, Owner] = {}
    for op, chid, worker, token in ops:
        owner = Owner(worker, token)
        if op == "c":
            try:
                reg.claim(chid, owner)
                assert chid not in model or model[chid] == owner
                model[chid] = owner
            except ChidInUse:
                assert chid in model and model[chid] != owner
        else:
            assert reg.release(chid, owner) == (model.get(chid) == owner)
            if model.get(chid) == owner:
                del model[chid]
        assert len(reg) == len(model)
        for c, o in model.items():
            assert reg.owner(c) == o


def test_home_is_with_sessions_that_wait_for_the_same_absent_chid():
    """Viewers of a camera that is not up yet gather on one worker, so that the
    camera's fan-out, once it comes, never crosses processes."""
    reg = Registry(3)
    reg.want(2, ["cam"])
    reg.want(2, ["cam"])
    reg.want(1, ["cam"])
    assert reg.home("viewer", ["cam"], asking=0) == 2
    reg.claim("cam", Owner(0, 1))  # once it is claimed, its place decides
    assert reg.home("viewer", ["cam"], asking=1) == 0


# -- who is told where a chid lives -------------------------------------------------


def test_everyone_sessions_tell_nobody_anything():
    """The common case of a handshake costs no location message to any worker."""
    reg = Registry(3)
    for i in range(5):
        reg.claim(f"c{i}", Owner(i % 3, i))
        assert reg.go_live(f"c{i}", Owner(i % 3, i), ()) == ([], [])
    assert reg.release("c0", Owner(0, 0)) and reg.ended("c0", Owner(0, 0)) == []


def test_a_worker_that_names_a_chid_learns_where_it_lives_and_when_it_ends():
    reg = Registry(3)
    reg.claim("cam", Owner(0, 1))
    assert reg.go_live("cam", Owner(0, 1), ()) == ([], [])
    reg.claim("viewer", Owner(1, 1))
    assert reg.go_live("viewer", Owner(1, 1), ("cam",)) == ([(1, "cam", 0)], [])
    reg.claim("viewer2", Owner(1, 2))
    assert reg.go_live("viewer2", Owner(1, 2), ("cam",)) == ([], [])  # worker 1 knows already
    assert reg.release("cam", Owner(0, 1)) and reg.ended("cam", Owner(0, 1)) == [1]
    # Back on worker 2: the worker whose sessions wait for it hears at once.
    reg.claim("cam", Owner(2, 1))
    assert reg.go_live("cam", Owner(2, 1), ()) == ([(1, "cam", 2)], [])


def test_locate_tells_the_asker_and_remembers_it():
    reg = Registry(2)
    reg.claim("a", Owner(1, 1))
    # Claimed, not announced yet: its worker is asked to announce, once.
    assert reg.locate(0, ["a", "absent"]) == ({}, [(1, "a", 1)])
    assert reg.locate(2, ["a"]) == ({}, [])
    reg.go_live("a", Owner(1, 1), ())
    assert reg.locate(0, ["a", "absent"]) == ({"a": 1}, [])
    assert reg.locate(1, ["a"]) == ({}, [])  # its own worker needs no message
    assert reg.release("a", Owner(1, 1)) and reg.ended("a", Owner(1, 1)) == [0]


def test_a_takeover_tells_the_told_workers_the_old_location_ended():
    reg = Registry(2)
    reg.claim("a", Owner(1, 1))
    reg.go_live("a", Owner(1, 1), ())
    reg.locate(0, ["a"])
    chid, evicted = reg.claim("a", Owner(1, 2), takeover=True)
    assert evicted is not None and reg.ended(chid, evicted) == [0]
    assert reg.go_live("a", Owner(1, 1), ()) == ([], [])  # the evicted session's late notice


def test_an_ended_session_withdraws_its_wishes():
    reg = Registry(2)
    reg.claim("v", Owner(1, 1))
    reg.go_live("v", Owner(1, 1), ("cam",))
    assert reg.home("cam", [], asking=0) == 1
    assert reg.release("v", Owner(1, 1))
    reg.ended("v", Owner(1, 1))
    assert reg.home("cam", [], asking=0) is None
    reg.claim("cam", Owner(0, 1))
    assert reg.go_live("cam", Owner(0, 1), ()) == ([], [])


def test_a_lost_worker_is_told_nothing_more():
    reg = Registry(3)
    reg.claim("a", Owner(0, 1))
    reg.go_live("a", Owner(0, 1), ())
    reg.claim("v", Owner(1, 1))
    reg.go_live("v", Owner(1, 1), ("a",))
    reg.worker_lost(1)
    assert reg.release("a", Owner(0, 1)) and reg.ended("a", Owner(0, 1)) == []
    reg.claim("b", Owner(2, 1))
    reg.go_live("b", Owner(2, 1), ())
    reg.locate(0, ["b"])
    reg.worker_lost(2)  # its chids' listeners are told by the DEAD message
    assert reg.locate(0, ["b"]) == ({}, [])


def test_a_session_named_while_it_has_not_announced_is_asked_to():
    """Sessions that name nothing and that nobody names never announce; once a
    session names one, its worker is asked (once), and when it announces the
    namer's worker learns where it is."""
    reg = Registry(2)
    reg.claim("quiet", Owner(0, 7))
    reg.claim("namer", Owner(1, 1))
    notices, watches = reg.go_live("namer", Owner(1, 1), ("quiet",))
    assert notices == [] and watches == [(0, "quiet", 7)]
    reg.claim("namer2", Owner(1, 2))
    assert reg.go_live("namer2", Owner(1, 2), ("quiet",)) == ([], [])  # asked already
    assert reg.go_live("quiet", Owner(0, 7), ()) == ([(1, "quiet", 0)], [])


def test_a_takeover_or_move_forgets_that_the_old_session_was_asked():
    reg = Registry(2)
    reg.claim("q", Owner(0, 1))
    assert reg.locate(1, ["q"]) == ({}, [(0, "q", 1)])
    assert reg.move("q", Owner(0, 1), Owner(1, 5))
    assert reg.locate(0, ["q"]) == ({}, [(1, "q", 5)])  # the new owner is asked
    reg.claim("q", Owner(1, 6), takeover=True)
    assert reg.locate(0, ["q"]) == ({}, [(1, "q", 6)])


def test_a_move_of_a_chid_nobody_holds_is_refused():
    """Every chid is claimed here before its session can move (the
    coordinator draws the ones a client leaves out), so a move of a chid
    nobody holds comes from a session that lost it (its worker died): the
    coordinator ends it rather than hand it the chid."""
    reg = Registry(2)
    assert not reg.move("gone", Owner(0, 1), Owner(1, 9))
    assert reg.owner("gone") is None
