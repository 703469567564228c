"""--metrics: Prometheus text served by the parent, summed over the workers,
read back with prometheus_client's own parser."""
from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import fwd
from conftest import WORKERS, Server
from fwd.metrics import MAX_CLIENTS
from fwd.session import END_LABELS, end_reason
from fwd.worker import DROP_REASONS
from helpers import (
    assert_pair_works,
    expect_fail,
    pair,
    read_line,
    read_until_reset,
    recv_exact,
    reset_close,
    wait_until,
)

N = max(WORKERS, 2)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_server(start_server: Callable[..., Server], *args: str, **kw: Any) -> Server:
    server = start_server("--workers", str(N), "--metrics", "127.0.0.1:0", *args, **kw)
    m = server.wait_log(r"metrics on http://(\S+)/metrics")
    server.metrics_url = f"http://{m.group(1)}/metrics"  # type: ignore[attr-defined]
    return server


def scrape(server: Server) -> Samples:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:  # type: ignore[attr-defined]
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_counters_move_with_traffic(start_server: Callable[..., Server]) -> None:
    server = metrics_server(start_server, "--mode", "chan")
    before = scrape(server)
    for name in ("fwd_connections_total", "fwd_received_bytes_total", "fwd_sent_bytes_total",
                 "fwd_held_bytes", "fwd_cross_worker_bytes_total",
                 "fwd_slow_consumer_disconnects_total", "fwd_open_connections",
                 "fwd_spliced_sessions"):
        assert value(before, name) == 0, name
    assert value(before, "fwd_workers") == N
    assert value(before, "fwd_build_info", version=fwd.__version__) == 1
    assert abs(value(before, "process_start_time_seconds") - time.time()) < 600

    sa, sb = pair(server)
    sa.sendall(b"m" * 123_456)
    recv_exact(sb, 123_456)
    bad = server.connect()
    bad.sendall(b'{"req": "hs3"}\n')
    expect_fail(bad)
    held, _ = server.handshake("h", ["absent"])
    held.sendall(b"kept")
    wait_until(lambda: value(scrape(server), "fwd_held_bytes") == 4, 10, "4 held bytes")
    after = scrape(server)
    assert value(after, "fwd_received_bytes_total") == 123_456 + 4
    assert value(after, "fwd_sent_bytes_total") == 123_456
    assert value(after, "fwd_connections_total") == 4
    assert value(after, "fwd_sessions_total", mode="chan") == 3
    assert value(after, "fwd_sessions_live", mode="chan") == 3
    assert value(after, "fwd_handshake_failures_total", reason="out_of_order") == 1
    assert value(after, "fwd_handshake_failures_total", reason="timeout") == 0

    sa.close()
    sb.close()
    wait_until(lambda: value(scrape(server), "fwd_sessions_live", mode="chan") == 1, 10,
               "the pair's sessions leave the gauge")


@pytest.mark.parametrize(("reason", "label"), [
    ("client closed", "closed"),
    ("half-closed both ways", "closed"),
    ("connection lost: [Errno 104] Connection reset by peer", "reset"),
    ("connection lost: [Errno 110] Connection timed out", "lost"),
    ("connection lost", "lost"),
    ("taken over by 127.0.0.1:5000", "taken_over"),
    ("pair partner lost", "partner_lost"),
    ("kicked by fwd-ctl", "kicked"),
    ("handshake failed: chid in use: a", "handshake_failed"),
    ("something new", "other"),
])
def test_end_reason_labels(reason: str, label: str) -> None:
    assert end_reason(reason) == label


def test_session_ends_are_counted_by_reason(start_server: Callable[..., Server]) -> None:
    server = metrics_server(start_server, "--mode", "chan")
    before = scrape(server)
    assert {labels for name, labels in before if name == "fwd_session_ends_total"} == {
        (("reason", label),) for label in END_LABELS}
    sa, sb = pair(server)
    reset_close(sa)  # a: reset; b: its pair partner lost
    read_until_reset(sb)
    lone, _ = server.handshake("lone", ["nobody"])
    lone.close()
    server.handshake("kicked", ["nobody"])
    server.ctl("kick", "kicked")
    halfway = server.connect()  # no end: it never went live
    halfway.sendall(b'{"req": "hs1", "chid": "h"}\n')
    read_line(halfway)
    halfway.close()
    expect = {"reset": 1, "partner_lost": 1, "closed": 1, "kicked": 1}

    def ends() -> dict[str, float]:
        got = scrape(server)
        return {label: value(got, "fwd_session_ends_total", reason=label)
                for label in END_LABELS}

    wait_until(lambda: sum(ends().values()) >= 4, 10, "four ends counted")
    wait_until(lambda: value(scrape(server), "fwd_handshake_failures_total",
                             reason="closed") == 1, 10, "the unfinished handshake's end")
    assert {k: v for k, v in ends().items() if v} == expect
    assert server.ctl_json("status")["ends"] == expect
    assert "session ends               closed 1, kicked 1, partner_lost 1, reset 1" \
        in server.ctl("status").stdout


def drops(server: Server) -> dict[str, float]:
    got = scrape(server)
    return {reason: value(got, "fwd_dropped_bytes_total", reason=reason)
            for reason in DROP_REASONS}


def test_dropped_bytes_are_counted_by_reason(start_server: Callable[..., Server]) -> None:
    server = metrics_server(start_server, "--mode", "chan", "--hold-bytes", "1000",
                            "--hold-seconds", "1")
    assert set(drops(server).values()) == {0}
    held, _ = server.handshake("h", ["absent"])
    held.sendall(b"h" * 1500)  # the first 1000 are held, then expire
    wait_until(lambda: drops(server)["hold_expired"] == 1000, 10, "the hold to expire")
    assert {k: v for k, v in drops(server).items() if v} == {"hold_full": 500,
                                                            "hold_expired": 1000}
    st = server.ctl_json("status")
    assert st["drops"] == {"hold_full": 500, "hold_expired": 1000}
    assert st["totals"]["dropped_bytes"] == 1500
    assert "dropped                    1.5 KiB (hold_expired 1000 B, hold_full 500 B)" \
        in server.ctl("status").stdout

    alone = metrics_server(start_server, "--mode", "broadcast", log_level="debug")
    # Until a worker says it has nobody, the others send it every byte.
    alone.wait_log(r"no live session", count=N)
    lone = alone.connect()
    alone.wait_log(r"session start chid=None")
    lone.sendall(b"x" * 300)  # nobody else is connected
    wait_until(lambda: drops(alone)["no_receiver"] == 300, 10, "300 bytes for nobody")
    assert sum(drops(alone).values()) == 300


def test_sums_over_workers_and_survives_a_worker_crash(
        start_server: Callable[..., Server]) -> None:
    server = metrics_server(start_server, "--mode", "broadcast")
    clients = [server.connect() for _ in range(2 * N)]
    server.wait_log(r"session start chid=None", count=2 * N)
    assert len({server.worker_of(c) for c in clients}) == N  # spread over every worker
    clients[0].sendall(b"b" * 10_000)
    for c in clients[1:]:
        recv_exact(c, 10_000)
    got = scrape(server)
    assert value(got, "fwd_sent_bytes_total") == 10_000 * (2 * N - 1)
    assert value(got, "fwd_cross_worker_bytes_total") == 10_000 * (N - 1)
    assert value(got, "fwd_sessions_live", mode="broadcast") == 2 * N

    victim = server.worker_of(clients[1])
    mark = server.mark()
    os.kill(victim, signal.SIGKILL)
    server.wait_log(r"worker \d+ ready", start=mark)
    after = scrape(server)
    # Counters do not go backwards; the dead worker's gauges are gone.
    assert value(after, "fwd_sent_bytes_total") == value(got, "fwd_sent_bytes_total")
    assert value(after, "fwd_worker_restarts_total") == 1
    assert value(after, "fwd_worker_timeouts_total") == 0  # it died; nobody killed it
    assert value(after, "fwd_sessions_live", mode="broadcast") < 2 * N


def healthz(server: Server) -> tuple[int, bytes]:
    url = server.metrics_url.rsplit("/", 1)[0] + "/healthz"  # type: ignore[attr-defined]
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_healthz_says_whether_every_worker_serves(start_server: Callable[..., Server]) -> None:
    """For load balancers and orchestrators (NATS has the same path): 200
    while every worker serves, 503 and why while one is restarting."""
    server = metrics_server(start_server)
    assert healthz(server) == (200, b"ok\n")
    mark = server.mark()
    os.kill(server.workers()[0], signal.SIGKILL)
    seen: list[tuple[int, bytes]] = []
    wait_until(lambda: seen.append(healthz(server)) or seen[-1][0] == 503, 10,
               "a 503 while the worker restarts")
    assert seen[-1] == (503, f"{N - 1} of {N} workers ready\n".encode())
    server.wait_log(r"worker \d+ ready", start=mark)
    assert healthz(server) == (200, b"ok\n")


def test_a_worker_that_stops_answering_is_avoided_then_restarted(
        start_server: Callable[..., Server]) -> None:
    """A hung worker (here: stopped) serves nobody, and a connection handed to
    it would wait with it. Silent for LATE seconds, it gets no new connection
    and /healthz names it; silent for --worker-timeout, it is killed and
    restarted, as gunicorn's --timeout does."""
    server = metrics_server(start_server, "--mode", "chan", "--worker-timeout", "10")
    server.expected_errors.append(r"silent for [\d.]+ s: killing it \(--worker-timeout\)")
    victim = server.workers()[0]
    mark = server.mark()
    os.kill(victim, signal.SIGSTOP)
    try:
        m = server.wait_log(rf"worker (\d+) \(pid {victim}\) has not answered for [\d.]+ s: new "
                            r"connections go to the others", start=mark)
        wid = m.group(1)
        assert healthz(server) == (
            503, f"{N - 1} of {N} workers ready (not answering: worker {wid})\n".encode())
        socks = [server.handshake(f"c{i}", [])[0] for i in range(2 * N)]
        assert victim not in {server.worker_of(s) for s in socks}
        server.wait_log(rf"worker {wid} \(pid {victim}\) silent for 1\d\.\d s: killing it",
                        start=mark)
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    server.wait_log(rf"worker {wid} ready pid=(?!{victim}\b)\d+", start=mark)
    assert healthz(server) == (200, b"ok\n")
    after = scrape(server)
    assert value(after, "fwd_worker_restarts_total") == 1
    assert value(after, "fwd_worker_timeouts_total") == 1
    assert_pair_works(server)


def test_only_get_metrics(start_server: Callable[..., Server]) -> None:
    server = metrics_server(start_server)
    base = server.metrics_url.rsplit("/", 1)[0]  # type: ignore[attr-defined]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/other", timeout=10)
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(server.metrics_url, data=b"x"), timeout=10)
    assert err.value.code == 405
    assert err.value.headers["Allow"] == "GET, HEAD"  # a 405 must say what is allowed
    # A client that never finishes its request costs nothing to the others.
    host, port = re.match(r"http://([^:]+):(\d+)", base).groups()  # type: ignore[union-attr]
    idle = socket.create_connection((host, int(port)))
    idle.sendall(b"GET /metrics HTTP/1.1\r\n")
    assert value(scrape(server), "fwd_workers") == N
    idle.close()
    # A flood of idle clients: each new one ends the oldest, a scrape still works.
    flood = [socket.create_connection((host, int(port))) for _ in range(MAX_CLIENTS + 8)]
    for s in flood:
        s.sendall(b"GET /metr")
    assert value(scrape(server), "fwd_workers") == N
    for s in flood[:8]:
        s.settimeout(10)
        assert s.recv(1) == b""  # closed, not served
    for s in flood:
        s.close()
    # Not HTTP, or a head too long: a status line saying so, then a FIN; what the
    # client still sends is read and dropped, so that no reset destroys the reply.
    for request, status in ((b"GARBAGE\r\n\r\n", b"400"),
                            (b"GET /metrics HTTP/1.1\r\nX: " + b"x" * 300_000, b"431")):
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(request)
            reply = b""
            while chunk := raw.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 " + status + b" "), reply
