"""1->1 streams (64 KiB and 512 B writes) and 64 B pipelined messages through
a chan pair, against direct loopback and socat.

The timed part is only the transfer (``StreamRun.go``); setup (generator
processes, handshakes) happens in pytest-benchmark's untimed ``setup``. The
figures to compare are in ``extra_info`` (throughput, relay CPU per GiB,
generator CPU shares); ``python -m bench.compare`` gives the ratios.
"""
from __future__ import annotations

from typing import Any

import pytest

from bench import scenarios as sc


def bench_stream(benchmark: Any, kind: str, n: int, block: int, total: int, *,
                 fwd: sc.Fwd | None = None, ncat: sc.Ncat | None = None,
                 rounds: int = 3) -> None:
    """Time ``rounds`` transfers; record the medians and check every byte arrived."""
    runs: list[sc.StreamRun] = []
    results: list[dict[str, Any]] = []

    def setup() -> tuple[tuple[sc.StreamRun], dict[str, Any]]:
        while runs:
            runs.pop().close()
        runs.append(sc.StreamRun(kind, n, block, total, fwd=fwd, ncat=ncat))
        return (runs[-1],), {}

    def target(run: sc.StreamRun) -> None:
        results.append(run.go())

    try:
        benchmark.pedantic(target, setup=setup, rounds=rounds)
    finally:
        while runs:
            runs.pop().close()
    bad = [r for r in results if not r["ok"]]
    assert not bad, f"bytes missing: {bad[0]}"
    benchmark.extra_info.update(sc.summarize(results))
    if kind == "fwd" and fwd is not None:
        benchmark.extra_info["workers"] = fwd.workers


@pytest.mark.parametrize("kind", ["direct", "fwd", "socat"])
@pytest.mark.parametrize(("write", "total"), [
    pytest.param(65536, lambda z: z.stream_bytes, id="64KiB-writes"),
    pytest.param(512, lambda z: z.small_bytes, id="512B-writes"),
    pytest.param(64, lambda z: 64 * z.msgs, id="64B-pipelined-messages"),
])
def test_stream(benchmark: Any, kind: str, write: int, total: Any,
                request: pytest.FixtureRequest, sizes: sc.Sizes) -> None:
    """One 1->1 stream of ``write``-byte writes, through fwd or a baseline."""
    benchmark.group = f"1-1 stream, {write} B writes"
    relay = request.getfixturevalue("fwd") if kind == "fwd" else None
    if kind == "socat":
        request.getfixturevalue("need_socat")
    bench_stream(benchmark, kind, 1, write, total(sizes), fwd=relay)
