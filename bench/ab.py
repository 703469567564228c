"""``python -m bench.ab REV``: this tree's fwd against an earlier revision's.

Why: a change's effect is often smaller than the spread between two runs on
this shared machine (a handshake rate of 5,200/s one hour, 4,000/s the next,
for the same build). Two builds measured alternately, in the same minutes,
give a difference that means something; two separate ``bench.compare`` runs
do not.

REV is built into a temporary directory (``pip install --no-deps --target``,
so it compiles its own ``_fastcopy``; pip fetches the build requirements) and
its servers run with that directory first on ``PYTHONPATH``. Every process
starts in that temporary directory: ``python -m`` puts the working directory
first on ``sys.path``, which would otherwise load this tree's ``fwd`` for both.
The load generators are this tree's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import scenarios as sc

ROOT = Path(__file__).resolve().parent.parent

# case -> (what to report, the first deciding; how to run it against a server with ``workers``)
CASES: dict[str, tuple[tuple[str, ...], Callable[[int], dict[str, Any]]]] = {}


def _with_server(run: Callable[[sc.Fwd], dict[str, Any]]) -> Callable[[int], dict[str, Any]]:
    def go(workers: int) -> dict[str, Any]:
        fwd = sc.Fwd(workers=workers)
        try:
            return run(fwd)
        finally:
            fwd.stop()
    return go


_SIZES = sc.Sizes()
CASES["handshakes"] = (("rate",), _with_server(
    lambda f: sc.run_handshakes(f, _SIZES.hs_procs, 3.0, inflight=_SIZES.hs_inflight)))
CASES["handshakes-drawn"] = (("rate",), _with_server(
    lambda f: sc.run_handshakes(f, _SIZES.hs_procs, 3.0, True, _SIZES.hs_inflight)))
CASES["handshakes-serial"] = (("rate",), _with_server(lambda f: sc.run_handshakes(f, 4, 3.0)))
CASES["stream"] = (("cpu_per_gib", "mib_s"), _with_server(
    lambda f: sc.run_stream("fwd", 1, 65536, 1 << 30, fwd=f)))
CASES["small"] = (("mib_s",), _with_server(
    lambda f: sc.run_stream("fwd", 1, 512, 192 << 20, fwd=f)))
CASES["fanout"] = (("cpu_per_gib", "mib_s"), _with_server(
    lambda f: sc.run_stream("fwd", 10, 65536, 205 << 20, fwd=f)))
CASES["msgs"] = (("msgs_per_s",), _with_server(
    lambda f: sc.run_stream("fwd", 1, 64, 64 * _SIZES.msgs, fwd=f)))
CASES["pingpong"] = (("p50_us", "relay_cpu_us"), _with_server(
    lambda f: sc.run_pingpong("fwd", 64, 20000, 2000, fwd=f, cpu=0)))
CASES["idle"] = (("bytes_per_session",), lambda workers: sc.run_idle(10_000, workers))


def build(rev: str, into: Path) -> None:
    """Install revision ``rev`` of this repository (not its dependencies) into ``into``."""
    src = into / "src"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(src), rev],
                   check=True, capture_output=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--target", str(into / "site"), str(src)], check=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(src)],
                       check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("rev", help="the earlier revision (anything git understands)")
    p.add_argument("--case", choices=sorted(CASES), default="handshakes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=6, help="runs of each build (default 6)")
    args = p.parse_args(argv)
    keys, run = CASES[args.case]
    with tempfile.TemporaryDirectory(prefix="fwd-ab-") as tmp:
        build(args.rev, Path(tmp))
        paths = {"old": f"{tmp}/site{os.pathsep}{ROOT}", "new": str(ROOT)}
        os.environ["PYTHONPATH"] = str(ROOT)  # the generators' processes import bench.*
        os.chdir(tmp)
        got: dict[str, dict[str, list[float]]] = {b: {k: [] for k in keys} for b in ("old", "new")}
        for rep in range(args.reps):
            for build_name in ("old", "new") if rep % 2 == 0 else ("new", "old"):
                os.environ["PYTHONPATH"] = paths[build_name]
                result = run(args.workers)
                for k in keys:
                    got[build_name][k].append(float(result[k]))
                shown = ", ".join(f"{k} {result[k]:,.3f}" for k in keys)
                print(f"rep {rep + 1}/{args.reps} {build_name}: {shown}", flush=True)
        print(f"\n{args.case}, --workers {args.workers}, {args.reps} runs each, alternating:")
        for k in keys:
            old, new = (statistics.median(got[b][k]) for b in ("old", "new"))
            print(f"  {args.rev}: {k} {old:,.3f} (median)")
            print(f"  this tree: {k} {new:,.3f} (median), {new / old:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
