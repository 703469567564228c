"""``python -m bench.compare``: fwd against its baselines in one run.

Why one command and not just pytest-benchmark: the targets are *ratios* to
baselines (direct loopback, direct fan-out, socat, ncat --broker), and on a
shared, noisy 2-core machine a ratio is only meaningful when both sides are
measured close together. So every repetition runs every variant of a case back
to back, the order alternates between repetitions (fwd first, then baseline
first), and the table shows medians over the repetitions.

The command installs nothing: a baseline whose program is missing is skipped,
and the table says so. ``--json PATH`` writes every sample, the medians, the
target verdicts, the command line and the machine for the record.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench import gen
from bench import scenarios as sc

MIB = float(1 << 20)


@dataclass
class Case:
    """One scenario: its variants run back to back in every repetition."""

    name: str
    title: str
    variants: dict[str, Callable[[], dict[str, Any]]]
    skipped: dict[str, str]


@dataclass
class Row:
    """One line of the result table."""

    case: str
    fwd: str
    baseline: str
    ratio: str
    target: str
    met: str


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         model)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "tcp_congestion": tcp_congestion()}


def tcp_congestion() -> str:
    """The system's TCP congestion control, which every relay and baseline here
    uses: with BBR each send is paced by a timer, which changes the fan-out
    and CPU figures a lot (bench/README.md, "Congestion control")."""
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def build_cases(args: argparse.Namespace, sizes: sc.Sizes, fwd: sc.Fwd,
                ncat: sc.Ncat | None, missing: dict[str, str],
                fwd2: sc.Fwd | None, w2_reason: str | None) -> list[Case]:
    """The scenarios of the issue, each with the baselines it is judged against."""
    cases: list[Case] = []

    def stream(kind: str, n: int, block: int, total: int,
               relay: sc.Fwd | None = None) -> Callable[[], dict[str, Any]]:
        return lambda: sc.run_stream(kind, n, block, total, fwd=relay or fwd, ncat=ncat)

    def with_baselines(name: str, title: str, fwd_run: Callable[[], dict[str, Any]],
                       base: dict[str, Callable[[], dict[str, Any]]]) -> None:
        variants = {"fwd": fwd_run}
        skipped = {}
        for label, run in base.items():
            tool = label if label in ("socat", "ncat") else None
            if tool and tool in missing:
                skipped[label] = missing[tool]
            else:
                variants[label] = run
        cases.append(Case(name, title, variants, skipped))

    sel = set(args.only.split(",")) if args.only else None

    def want(name: str) -> bool:
        return sel is None or name in sel

    if want("stream"):
        with_baselines("stream64k", "1->1 stream, 64 KiB writes",
                       stream("fwd", 1, 65536, sizes.stream_bytes),
                       {"direct": stream("direct", 1, 65536, sizes.stream_bytes),
                        "socat": stream("socat", 1, 65536, sizes.stream_bytes)})
        with_baselines("stream512", "1->1 stream, 512 B writes",
                       stream("fwd", 1, 512, sizes.small_bytes),
                       {"direct": stream("direct", 1, 512, sizes.small_bytes),
                        "socat": stream("socat", 1, 512, sizes.small_bytes)})
    if want("msgs"):
        total = 64 * sizes.msgs
        with_baselines("msgs64", "64 B messages pipelined 1->1",
                       stream("fwd", 1, 64, total),
                       {"direct": stream("direct", 1, 64, total),
                        "socat": stream("socat", 1, 64, total)})
    if want("fanout"):
        for n in args.fanout:
            each = sizes.fanout_each(n)
            base = {"direct": stream("direct", n, 65536, each)}
            if n <= args.ncat_max:
                base["ncat"] = stream("ncat", n, 65536, each)
            with_baselines(f"fanout{n}", f"fan-out 1->{n}, 64 KiB writes",
                           stream("fwd", n, 65536, each), base)
            if n > args.ncat_max:
                cases[-1].skipped["ncat"] = (
                    f"ncat skipped above {args.ncat_max} receivers (--ncat-max): "
                    "connecting and closing 1000 broker clients takes over a minute")
    if want("pingpong"):
        def pp(kind: str) -> Callable[[], dict[str, Any]]:
            cpu = None if args.pingpong_cpu < 0 else args.pingpong_cpu
            return lambda: sc.run_pingpong(kind, 64, sizes.pings, sizes.ping_warmup,
                                           fwd=fwd, ncat=ncat, cpu=cpu)
        with_baselines("pingpong", "64 B ping-pong round trip", pp("fwd"),
                       {"direct": pp("direct"), "socat": pp("socat"), "ncat": pp("ncat")})
    if want("handshakes"):
        cases.append(Case("handshakes", "new chan sessions (connect+hs1..hs4+close)",
                          {"fwd": lambda: sc.run_handshakes(fwd, sizes.hs_procs,
                                                            sizes.hs_seconds,
                                                            inflight=sizes.hs_inflight),
                           "fwd-drawn": lambda: sc.run_handshakes(fwd, sizes.hs_procs,
                                                                  sizes.hs_seconds, True,
                                                                  sizes.hs_inflight),
                           # latency-bound: four clients, one session at a time each
                           "fwd-serial": lambda: sc.run_handshakes(fwd, 4, sizes.hs_seconds)},
                          {}))
    if want("workers"):
        n = args.workers_fanout
        each = sizes.fanout_each(n)
        variants: dict[str, Callable[[], dict[str, Any]]] = {}
        skipped: dict[str, str] = {}
        if fwd.workers == 1:
            variants["fwd-w1"] = stream("fwd", n, 65536, each)
        if fwd2 is not None:
            variants["fwd-w2"] = stream("fwd", n, 65536, each, relay=fwd2)
        else:
            skipped["fwd-w2"] = w2_reason or "not run"
        if fwd2 is not None or variants:
            cases.append(Case("workers", f"fan-out 1->{n}, --workers 1 vs 2", variants, skipped))
    return cases


def run_cases(cases: list[Case], reps: int, log: Callable[[str], None]
              ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every repetition runs every case; within a case the variant order is
    rotated each repetition so that fwd and its baselines alternate."""
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        c.name: {v: [] for v in c.variants} for c in cases}
    for rep in range(reps):
        for case in cases:
            order = list(case.variants)
            k = rep % len(order) if order else 0
            order = order[k:] + order[:k]
            if rep % 2:
                order.reverse()
            for variant in order:
                t = time.monotonic()
                try:
                    sample = case.variants[variant]()
                except Exception as exc:  # recorded, and the run goes on
                    sample = {"error": f"{type(exc).__name__}: {exc}"[-2000:], "ok": False}
                samples[case.name][variant].append(sample)
                log(f"rep {rep + 1}/{reps} {case.name:<10} {variant:<7} "
                    f"{summary(case.name, sample)} ({time.monotonic() - t:.1f}s)")
    return samples


def summary(case: str, s: dict[str, Any]) -> str:
    if "error" in s:
        return "ERROR " + s["error"].splitlines()[-1][:160]
    if case == "pingpong":
        cpu = s.get("relay_cpu_us")
        return (f"p50 {s['p50_us']:.1f} us p99 {s['p99_us']:.1f} us"
                + (f", relay CPU {cpu:.1f} us per round trip" if cpu is not None else ""))
    if case == "handshakes":
        return f"{s['rate']:.0f}/s (server CPU {s['relay_cpu_share']:.2f})"
    if case == "msgs64":
        return f"{s['msgs_per_s'] / 1e6:.2f} M msg/s ok={s['ok']}"
    cpu = s.get("cpu_per_gib")
    return (f"{s['rate'] / MIB:.0f} MiB/s" + (f", {cpu:.3f} CPU-s/GiB" if cpu else "")
            + f" ok={s['ok']}")


def median(samples: list[dict[str, Any]], key: str) -> float | None:
    vals = [s[key] for s in samples if s.get("ok", True) and s.get(key) is not None]
    return statistics.median(vals) if vals else None


def medians(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    keys = ("rate", "msgs_per_s", "cpu_per_gib", "relay_cpu_share", "sender_cpu_share",
            "receiver_cpu_share", "p50_us", "p99_us", "mean_us", "relay_cpu_us",
            "client_cpu_share", "bytes_per_session")
    out: dict[str, Any] = {}
    for case, by_variant in samples.items():
        out[case] = {}
        for variant, ss in by_variant.items():
            m = {k: v for k in keys if (v := median(ss, k)) is not None}
            m["runs"] = len(ss)
            m["failed"] = sum(1 for s in ss if not s.get("ok", True))
            out[case][variant] = m
    return out


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "MiB/s":
        return f"{v / MIB:,.0f} MiB/s"
    if unit == "msg/s":
        return f"{v / 1e6:.2f} M msg/s"
    if unit == "us":
        return f"{v:.1f} µs"
    if unit == "s/GiB":
        return f"{v:.3f} CPU-s/GiB"
    if unit == "/s":
        return f"{v:,.0f}/s"
    if unit == "KiB":
        return f"{v / 1024:.2f} KiB"
    return f"{v:.3g}"


def targets(med: dict[str, Any], skipped: dict[str, dict[str, str]]) -> list[Row]:
    """The issue's targets (and informative ratios without one) as table rows."""
    rows: list[Row] = []

    def get(case: str, variant: str, key: str) -> float | None:
        return med.get(case, {}).get(variant, {}).get(key)

    def why(case: str, variant: str) -> str:
        if case not in med:
            return "not run"
        return skipped.get(case, {}).get(variant, "no successful run")

    def ratio_row(title: str, case: str, key: str, unit: str, base: str,
                  op: str | None = None, goal: float | None = None,
                  fwd_case: str | None = None, base_case: str | None = None) -> None:
        a = get(fwd_case or case, "fwd", key)
        b = get(base_case or case, base, key)
        label = base if base_case is None else f"fwd {base_case}"
        if a is None or b is None or b == 0:
            missing = why(fwd_case or case, "fwd") if a is None else why(base_case or case, base)
            rows.append(Row(title, _fmt(a, unit), f"{label}: {_fmt(b, unit)}", "n/a",
                            f"{op} {goal}" if op else "", f"skipped: {missing}" if op else ""))
            return
        r = a / b
        met = "" if op is None or goal is None else _met(r, op, goal)
        rows.append(Row(title, _fmt(a, unit), f"{label}: {_fmt(b, unit)}", f"{r:.2f}x",
                        f"{op} {goal}x" if op else "(info)", met))

    ratio_row("1->1 64 KiB throughput", "stream64k", "rate", "MiB/s", "direct", ">=", 0.95)
    ratio_row("1->1 64 KiB throughput", "stream64k", "rate", "MiB/s", "socat")
    ratio_row("1->1 64 KiB relay CPU per GiB", "stream64k", "cpu_per_gib", "s/GiB", "socat",
              "<=", 0.5)
    ratio_row("1->1 512 B throughput", "stream512", "rate", "MiB/s", "socat", ">=", 1.0)
    ratio_row("1->1 512 B throughput", "stream512", "rate", "MiB/s", "direct")
    ratio_row("64 B pipelined msgs/s", "msgs64", "msgs_per_s", "msg/s", "socat", ">=", 1.0)
    ratio_row("64 B pipelined msgs/s", "msgs64", "msgs_per_s", "msg/s", "direct")
    ratio_row("fan-out 1->10 delivered", "fanout10", "rate", "MiB/s", "direct", ">=", 1.0)
    ratio_row("fan-out 1->10 delivered", "fanout10", "rate", "MiB/s", "ncat", ">=", 2.5)
    ratio_row("fan-out 1->10 relay CPU per GiB", "fanout10", "cpu_per_gib", "s/GiB", "ncat")
    ratio_row("fan-out 1->100 delivered", "fanout100", "rate", "MiB/s", "direct")
    ratio_row("fan-out 1->100 delivered", "fanout100", "rate", "MiB/s", "ncat")
    ratio_row("fan-out 1->1000 delivered", "fanout1000", "rate", "MiB/s", "direct")
    ratio_row("fan-out 1->1000 vs fwd 1->10", "fanout1000", "rate", "MiB/s", "fwd", ">=", 0.8,
              base_case="fanout10")

    # Ping-pong: what the relay adds to the direct round trip, against ncat's.
    d50 = get("pingpong", "direct", "p50_us")
    f50, f99 = get("pingpong", "fwd", "p50_us"), get("pingpong", "fwd", "p99_us")
    n50 = get("pingpong", "ncat", "p50_us")
    s50 = get("pingpong", "socat", "p50_us")
    for base, b50 in (("ncat", n50), ("socat", s50)):
        goal = base == "ncat"
        if None in (d50, f50, b50):
            rows.append(Row("ping-pong added p50", _fmt(None, "us"), f"{base}: n/a", "n/a",
                            "<= 1.0x" if goal else "(info)",
                            f"skipped: {why('pingpong', base)}" if goal else ""))
            continue
        fa, ba = f50 - d50, b50 - d50  # type: ignore[operator]
        r = fa / ba if ba > 0 else float("inf")
        rows.append(Row("ping-pong added p50 (over direct "
                        f"{d50:.1f} µs)", _fmt(fa, "us"), f"{base}: {_fmt(ba, 'us')}",
                        f"{r:.2f}x", "<= 1.0x" if goal else "(info)",
                        _met(r, "<=", 1.0) if goal else ""))
    if f50 is not None and f99 is not None:
        r = f99 / f50
        rows.append(Row("ping-pong p99 / p50 (fwd)", _fmt(f99, "us"), f"fwd p50: {_fmt(f50, 'us')}",
                        f"{r:.2f}x", "<= 2.0x", _met(r, "<=", 2.0)))
    else:
        rows.append(Row("ping-pong p99 / p50 (fwd)", "n/a", "", "n/a", "<= 2.0x",
                        f"skipped: {why('pingpong', 'fwd')}"))
    # Pinned to one CPU, the relay's CPU per round trip is its share of the
    # round trip, and moves less from run to run than the latency.
    ratio_row("ping-pong relay CPU per round trip", "pingpong", "relay_cpu_us", "us", "ncat")

    idle = get("idle", "fwd", "bytes_per_session")
    rows.append(Row("idle chan session, server RSS", _fmt(idle, "KiB") + "/session", "", "",
                    "<= 2 KiB", "n/a" if idle is None else ("yes" if idle <= 2048 else "NO")))
    hs = get("handshakes", "fwd", "rate")
    rows.append(Row("handshakes (new sessions)", _fmt(hs, "/s"), "", "", ">= 5,000/s",
                    "n/a" if hs is None else ("yes" if hs >= 5000 else "NO")))
    for variant, title in (("fwd-drawn", "handshakes, chid drawn by the server"),
                           ("fwd-serial", "handshakes, 4 clients one at a time")):
        rate = get("handshakes", variant, "rate")
        if rate is not None:
            rows.append(Row(title, _fmt(rate, "/s"), "", "", "(info)", ""))
    w1, w2 = get("workers", "fwd-w1", "rate"), get("workers", "fwd-w2", "rate")
    if w2 is None:
        rows.append(Row("fan-out --workers 2 vs 1", _fmt(w1, "MiB/s"), "", "n/a", "(info)",
                        f"skipped: {why('workers', 'fwd-w2')}"))
    elif w1 is not None:
        rows.append(Row("fan-out --workers 2 vs 1", _fmt(w2, "MiB/s"),
                        f"workers 1: {_fmt(w1, 'MiB/s')}", f"{w2 / w1:.2f}x", "(info)", ""))
    return rows


def _met(ratio: float, op: str, goal: float) -> str:
    """A ratio on the line counts as meeting it: CPU times come in whole ticks,
    and 9 ticks against 18 divide to 0.5000000000000001, not 0.5."""
    slack = goal * 1e-9
    ok = ratio >= goal - slack if op == ">=" else ratio <= goal + slack
    return "yes" if ok else "NO"


def markdown(rows: list[Row]) -> str:
    head = ["case", "fwd (median)", "baseline (median)", "fwd/baseline", "target", "met?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(asdict(r).values()) + " |")
    return "\n".join(lines)


def detail(med: dict[str, Any], cases: list[Case]) -> str:
    """Every variant's medians, generator CPU shares included (the evidence
    that the load generators were not the bottleneck)."""
    head = ["case", "variant", "runs", "throughput / latency", "relay CPU-s/GiB",
            "relay CPU", "sender CPU", "receiver CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    titles = {c.name: c.title for c in cases}
    for case, by_variant in med.items():
        for variant, m in by_variant.items():
            if case == "pingpong":
                main = f"p50 {_fmt(m.get('p50_us'), 'us')}, p99 {_fmt(m.get('p99_us'), 'us')}"
            elif case == "handshakes":
                main = _fmt(m.get("rate"), "/s")
            elif case == "idle":
                main = _fmt(m.get("bytes_per_session"), "KiB") + "/session"
            elif case == "msgs64":
                main = _fmt(m.get("msgs_per_s"), "msg/s")
            else:
                main = _fmt(m.get("rate"), "MiB/s")

            def share(k: str, m: dict[str, Any] = m) -> str:
                return f"{m[k]:.2f}" if k in m else ""
            runs = f"{m['runs']}" + (f" ({m['failed']} failed)" if m.get("failed") else "")
            cpu = m.get("cpu_per_gib")
            lines.append("| " + " | ".join([
                titles.get(case, case), variant, runs, main,
                f"{cpu:.3f}" if cpu is not None else "", share("relay_cpu_share"),
                share("sender_cpu_share") or share("client_cpu_share"),
                share("receiver_cpu_share")]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = sc.Sizes()
    p.add_argument("--reps", type=int, default=5, help="repetitions of every case (default 5)")
    p.add_argument("--json", metavar="PATH", help="write samples, medians and verdicts here")
    p.add_argument("--workers", type=int, default=1, help="fwd-server --workers for all fwd "
                   "cases (default 1)")
    p.add_argument("--fwd-args", default="", metavar="ARGS",
                   help="more fwd-server options for the fwd cases, e.g. '--tcp-congestion "
                   "cubic' (the baselines do not get them: the ratios then compare "
                   "differently configured relays)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every transfer size, message and ping count (0.1 = quick)")
    p.add_argument("--only", default="", help="comma list of: stream,msgs,fanout,pingpong,"
                   "handshakes,idle,workers (default: all)")
    p.add_argument("--fanout", type=lambda s: [int(x) for x in s.split(",")],
                   default=[10, 100, 1000], help="receiver counts (default 10,100,1000)")
    p.add_argument("--ncat-max", type=int, default=100,
                   help="largest fan-out run through ncat --broker (default 100)")
    p.add_argument("--workers-fanout", type=int, default=100,
                   help="receivers in the --workers 1 vs 2 case (default 100)")
    p.add_argument("--stream-mib", type=int, default=d.stream_bytes >> 20)
    p.add_argument("--small-mib", type=int, default=d.small_bytes >> 20,
                   help="MiB per 512 B-write run")
    p.add_argument("--msgs", type=int, default=d.msgs, help="64 B messages per run")
    p.add_argument("--fanout-mib", type=int, default=d.fanout_bytes >> 20,
                   help="MiB delivered (all receivers) per fan-out run")
    p.add_argument("--pings", type=int, default=d.pings)
    p.add_argument("--pingpong-cpu", type=int, default=0,
                   help="run ping-pong processes (relay included) on this one CPU; "
                   "-1 = unpinned (default 0)")
    p.add_argument("--idle", type=int, default=d.idle_sessions, help="idle sessions")
    p.add_argument("--idle-reps", type=int, default=1)
    p.add_argument("--hs-procs", type=int, default=d.hs_procs)
    p.add_argument("--hs-inflight", type=int, default=d.hs_inflight,
                   help="sessions each handshake process keeps going at once")
    p.add_argument("--hs-seconds", type=float, default=d.hs_seconds)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    sizes = sc.Sizes(stream_bytes=args.stream_mib << 20, small_bytes=args.small_mib << 20,
                     msgs=args.msgs, fanout_bytes=args.fanout_mib << 20, pings=args.pings,
                     idle_sessions=args.idle, hs_procs=args.hs_procs,
                     hs_inflight=args.hs_inflight,
                     hs_seconds=args.hs_seconds).scaled(args.scale)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    missing = sc.missing_tools()
    for why in missing.values():
        log(f"baseline skipped: {why}")
    sel = set(args.only.split(",")) if args.only else None
    reason = sc.workers_skip_reason(args.workers)
    if reason:
        print(f"cannot run fwd with --workers {args.workers}: {reason}", file=sys.stderr)
        return 2
    w2_reason = None if args.workers == 2 else sc.workers_skip_reason(2)
    if w2_reason:
        log(f"workers 2 case skipped: {w2_reason}")
    extra = tuple(shlex.split(args.fwd_args))
    fwd = sc.Fwd(workers=args.workers, extra=extra)
    fwd2 = None
    ncat = sc.Ncat() if "ncat" not in missing else None
    try:
        if w2_reason is None and (sel is None or "workers" in sel):
            fwd2 = fwd if args.workers == 2 else sc.Fwd(workers=2, extra=extra)
        cases = build_cases(args, sizes, fwd, ncat, missing, fwd2, w2_reason)
        samples = run_cases(cases, args.reps, log)
    finally:
        fwd.stop()
        if fwd2 is not None and fwd2 is not fwd:
            fwd2.stop()
        if ncat is not None:
            ncat.stop()
    skipped = {c.name: c.skipped for c in cases}
    if sel is None or "idle" in sel:
        samples["idle"] = {"fwd": []}
        for _ in range(args.idle_reps):
            try:
                s = sc.run_idle(sizes.idle_sessions, workers=args.workers)
            except Exception as exc:
                s = {"error": f"{type(exc).__name__}: {exc}"[-2000:], "ok": False}
            samples["idle"]["fwd"].append(s)
            log(f"idle: {s.get('bytes_per_session', 0) / 1024:.2f} KiB/session "
                f"({s.get('sessions')} sessions) {s.get('error', '')}")
        cases.append(Case("idle", f"{sizes.idle_sessions} idle chan sessions", {}, {}))
    med = medians(samples)
    rows = targets(med, skipped)
    table = markdown(rows)
    details = detail(med, cases)
    elapsed = time.monotonic() - started
    cmd = "python -m bench.compare" + ("" if not sys.argv[1:] else " "
                                       + shlex.join(sys.argv[1:]))
    m = machine()
    print(f"{cmd}\n{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, "
          f"nproc {m['nproc']}, {m['cpu_model']}, TCP {m['tcp_congestion']}, "
          f"fwd --workers {args.workers}{' ' + args.fwd_args if args.fwd_args else ''}, "
          f"{args.reps} reps, {elapsed:.0f} s\n")
    print(table)
    print()
    print(details)
    for case, why_map in skipped.items():
        for variant, why in why_map.items():
            print(f"- skipped {case}/{variant}: {why}")
    for note in sorted({f"- {case}: the sender wrote from Python ({s['sender_loop']}), which "
                        "may limit it" for case, by_variant in samples.items()
                        for ss in by_variant.values() for s in ss
                        if s.get("block", 1 << 20) < gen.SMALL_WRITE
                        and s.get("sender_loop", "c") != "c"}):
        print(note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "date": datetime.datetime.now().astimezone().isoformat(),
                       "machine": m, "workers": args.workers, "reps": args.reps,
                       "sizes": asdict(sizes), "elapsed_s": elapsed, "skipped": skipped,
                       "samples": samples, "medians": med,
                       "targets": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
