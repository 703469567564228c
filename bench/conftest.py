"""Fixtures for the benchmarks: the test suite's real-server fixtures (reused,
not copied, so that benchmarks start fwd-server exactly as the tests do) plus
long-lived relays shared by all cases of a session (starting a server per
round would add its boot to every measurement's setup)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench import scenarios as sc

_fixtures = sc.fixtures()

impl = _fixtures.impl
start_server = _fixtures.start_server
chan_server = _fixtures.chan_server
bcast_server = _fixtures.bcast_server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fwd-workers", type=int, default=1,
                     help="fwd-server --workers for every fwd benchmark (default 1)")


@pytest.fixture(scope="session")
def sizes() -> sc.Sizes:
    """Small sizes: the whole ``pytest bench --benchmark-only`` stays in minutes."""
    return sc.Sizes.small()


@pytest.fixture(scope="session")
def workers(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("--fwd-workers"))


def _fwd(workers: int) -> Iterator[sc.Fwd]:
    try:
        fwd = sc.Fwd(workers=workers)
    except sc.WorkersUnsupported as exc:
        pytest.skip(str(exc))
    yield fwd
    fwd.stop()


@pytest.fixture(scope="session")
def fwd(workers: int) -> Iterator[sc.Fwd]:
    """One chan-mode fwd-server with --workers from --fwd-workers."""
    yield from _fwd(workers)


@pytest.fixture(scope="session")
def fwd2() -> Iterator[sc.Fwd]:
    """A --workers 2 server; skipped while fwd-server refuses --workers 2."""
    yield from _fwd(2)


@pytest.fixture(scope="session")
def ncat() -> Iterator[sc.Ncat]:
    why = sc.missing_tools().get("ncat")
    if why:
        pytest.skip(why)
    broker = sc.Ncat()
    yield broker
    broker.stop()


@pytest.fixture
def need_socat() -> None:
    why = sc.missing_tools().get("socat")
    if why:
        pytest.skip(why)
