"""The --max-rate bucket, fed with reads and times, no sockets."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwd.ratelimit import RateMeter
from fwd.worker import MIN_METERED_READ, READ_SIZE, read_size

reads = st.lists(st.tuples(st.integers(1, 256 * 1024), st.floats(0, 2)), max_size=200)


@given(st.integers(1, 10**7), st.integers(1, 10**7), reads)
def test_a_reader_that_waits_as_told_never_gets_ahead(rate: int, burst: int,
                                                      steps: list[tuple[int, float]]) -> None:
    """Over any run, bytes read <= burst + rate * elapsed + the read that
    overdrew the bucket: whatever the read sizes and the pauses between them."""
    meter = RateMeter(rate, burst, 0.0)
    now, total, biggest = 0.0, 0, 0
    for nbytes, pause in steps:
        total += nbytes
        biggest = max(biggest, nbytes)
        wait = meter.take(nbytes, now)
        assert wait >= 0
        assert total <= burst + rate * now + biggest + 1e-6 * total
        now += wait + pause  # it reads again once the wait is over, or later


def test_a_burst_then_the_rate() -> None:
    meter = RateMeter(1000, 500, 10.0)
    assert meter.take(500, 10.0) == 0.0  # the burst, at once
    assert meter.take(250, 10.0) == pytest.approx(0.25)  # in debt: wait it off
    assert meter.take(0, 10.25) == 0.0
    assert meter.take(100, 10.35) == pytest.approx(0.0, abs=1e-9)  # refilled at the rate
    assert meter.take(1000, 20.0) == pytest.approx(0.5)  # the bucket holds one burst at most


def test_rate_and_burst_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RateMeter(0, 1, 0.0)
    with pytest.raises(ValueError):
        RateMeter(1, 0, 0.0)


def test_metered_reads_are_a_seconds_worth() -> None:
    """A read over the budget is forwarded whole and then waited off: with
    --max-rate it is at most about a second's worth, so that the wait is too."""
    assert read_size(0) == READ_SIZE
    assert read_size(100_000) == 100_000
    assert read_size(1024) == MIN_METERED_READ
    assert read_size(1 << 30) == READ_SIZE
