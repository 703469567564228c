"""The read loop's session base, compiled and pure-Python, without sockets."""
from __future__ import annotations

import gc
import weakref
from types import ModuleType

import pytest

from fwd import _fastcopy, _fastcopy_py
from fwd.routing import Route


class Peer:
    """A stand-in receiver that can be watched for release."""


@pytest.fixture(params=["cython", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return _fastcopy if request.param == "cython" else _fastcopy_py


def test_a_dropped_route_lets_its_receivers_go(impl: ModuleType) -> None:
    # A session that ended keeps no receiver alive through what the loop
    # cached of its route.
    relay = impl.Relay()
    peer = Peer()
    watch = weakref.ref(peer)
    relay.route = Route(3, (relay, peer), (), False)
    assert relay.route.targets[1] is peer
    relay.route = None
    del peer
    gc.collect()
    assert watch() is None
