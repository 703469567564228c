"""Latency and session costs: 64 B ping-pong (p50/p99) through fwd, socat and
ncat against the same ping-pong direct; server RSS per idle chan session;
handshake rate (connect + hs1..hs4 + close) from several client processes."""
from __future__ import annotations

from typing import Any

import pytest

from bench import scenarios as sc


@pytest.mark.benchmark(group="ping-pong 64B")
@pytest.mark.parametrize("kind", ["direct", "fwd", "socat", "ncat"])
def test_pingpong(benchmark: Any, kind: str, request: pytest.FixtureRequest,
                  sizes: sc.Sizes) -> None:
    """The timed figure includes setup; p50/p99 (µs) are in extra_info."""
    relay = request.getfixturevalue("fwd") if kind == "fwd" else None
    broker = request.getfixturevalue("ncat") if kind == "ncat" else None
    if kind == "socat":
        request.getfixturevalue("need_socat")
    results: list[dict[str, Any]] = []

    def target() -> None:
        results.append(sc.run_pingpong(kind, 64, sizes.pings, sizes.ping_warmup,
                                       fwd=relay, ncat=broker))

    benchmark.pedantic(target, rounds=3)
    benchmark.extra_info.update(sc.summarize(results))


@pytest.mark.benchmark(group="idle sessions")
def test_idle_sessions(benchmark: Any, workers: int) -> None:
    """10,000 hand-shaken idle chan sessions: server RSS growth per session."""
    results: list[dict[str, Any]] = []

    def target() -> None:
        results.append(sc.run_idle(10_000, workers=workers))

    try:
        benchmark.pedantic(target, rounds=1)
    except sc.WorkersUnsupported as exc:
        pytest.skip(str(exc))
    r = results[0]
    benchmark.extra_info.update(r)
    assert r["sessions"] >= 9000, r


@pytest.mark.benchmark(group="handshakes")
def test_handshake_rate(benchmark: Any, fwd: sc.Fwd, sizes: sc.Sizes) -> None:
    results: list[dict[str, Any]] = []

    def target() -> None:
        results.append(sc.run_handshakes(fwd, sizes.hs_procs, sizes.hs_seconds,
                                           inflight=sizes.hs_inflight))

    benchmark.pedantic(target, rounds=2)
    benchmark.extra_info.update(sc.summarize(results))
    assert all(r["sessions"] > 0 for r in results)
