"""Fan-out 1->10, 1->100, 1->1000 (aggregate delivered throughput, every
receiver's byte count checked) through fwd (chan mode, sender ``recvers=[]``),
against direct fan-out and ncat --broker; and --workers 1 vs 2."""
from __future__ import annotations

from typing import Any

import pytest

from bench import scenarios as sc
from bench.test_bench_stream import bench_stream


@pytest.mark.parametrize("n", [10, 100, 1000])
@pytest.mark.parametrize("kind", ["direct", "fwd", "ncat"])
def test_fanout(benchmark: Any, kind: str, n: int, request: pytest.FixtureRequest,
                sizes: sc.Sizes) -> None:
    if kind == "ncat" and n > 100:
        pytest.skip("ncat --broker takes over a minute to connect and close 1000 clients")
    benchmark.group = f"fan-out 1-{n}"
    relay = request.getfixturevalue("fwd") if kind == "fwd" else None
    broker = request.getfixturevalue("ncat") if kind == "ncat" else None
    bench_stream(benchmark, kind, n, 65536, sizes.fanout_each(n), fwd=relay, ncat=broker)


@pytest.mark.benchmark(group="fan-out 1-100 workers")
@pytest.mark.parametrize("nworkers", [1, 2])
def test_fanout_workers(benchmark: Any, nworkers: int, request: pytest.FixtureRequest,
                        sizes: sc.Sizes) -> None:
    """Skipped for 2 while ``fwd-server --workers 2`` is a usage error."""
    relay = request.getfixturevalue("fwd2" if nworkers == 2 else "fwd")
    if relay.workers != nworkers:
        pytest.skip(f"the session's fwd runs --workers {relay.workers} (--fwd-workers)")
    bench_stream(benchmark, "fwd", 100, 65536, sizes.fanout_each(100), fwd=relay)
