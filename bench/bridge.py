"""``python -m bench.bridge [--mib 4096] [--reps 3]``: what fwd-client costs.

One 64 KiB-write stream, client -> fwd-server -> service, three ways,
alternating: ``pair`` (the service's end is a chan session itself: no
fwd-client), ``fwd-client`` (the service is reached through fwd-client, whose
bulk pair goes through a Pump) and ``fwd-client copying`` (the same with
``FWD_PURE_PYTHON=1`` for fwd-client only: no Pump, every read copied). Prints
throughput and CPU per GiB of fwd-server and of fwd-client, medians.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.scenarios import fixtures, proc_cpu

ROOT = Path(__file__).resolve().parent.parent
CLIENT = str(Path(sys.executable).with_name("fwd-client"))
BLOCK = 1 << 16


def _sink(sock: socket.socket, total: int, done: list[float]) -> None:
    buf = bytearray(1 << 20)
    got = 0
    while got < total:
        n = sock.recv_into(buf)
        if not n:
            break
        got += n
    done.append(time.monotonic() if got == total else float("nan"))


def run(kind: str, total: int) -> tuple[float, float, float]:
    """(MiB/s, fwd-server CPU-s/GiB, fwd-client CPU-s/GiB) of one stream."""
    server = fixtures().Server(["--listen", "127.0.0.1:0", "--mode", "chan", "--workers", "1",
                                "--log-level", "info"])
    client: subprocess.Popen[bytes] | None = None
    try:
        if kind == "pair":
            rx, _ = server.handshake("svc", ["user"])
        else:
            listener = socket.create_server(("127.0.0.1", 0))
            env = dict(os.environ, FWD_PURE_PYTHON="1") if kind.endswith("copying") else None
            client = subprocess.Popen(
                [CLIENT, "--server0", f"127.0.0.1:{server.port}",
                 "--server1", f"127.0.0.1:{listener.getsockname()[1]}",
                 "--chid", "svc", "--recvers", "user", "--connect", "eager"],
                stderr=subprocess.DEVNULL, env=env)
            rx, _ = listener.accept()
            listener.close()
        tx, _ = server.handshake("user", ["svc"])
        done: list[float] = []
        sink = threading.Thread(target=_sink, args=(rx, total, done))
        sink.start()
        pids = server.pids()
        c0 = proc_cpu(pids), proc_cpu([client.pid]) if client else 0.0
        block = memoryview(os.urandom(BLOCK))
        t0 = time.monotonic()
        for _ in range(total // BLOCK):
            tx.sendall(block)
        sink.join()
        c1 = proc_cpu(pids), proc_cpu([client.pid]) if client else 0.0
        gib = total / (1 << 30)
        return (total / (1 << 20) / (done[0] - t0), (c1[0] - c0[0]) / gib,
                (c1[1] - c0[1]) / gib)
    finally:
        if client is not None:
            client.terminate()
            client.wait()
        server.stop(check=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=4096, help="stream size (default 4096)")
    p.add_argument("--reps", type=int, default=3, help="runs of each kind (default 3)")
    args = p.parse_args()
    kinds = ["pair", "fwd-client", "fwd-client copying"]
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    for rep in range(args.reps):
        for kind in kinds:
            r = run(kind, args.mib << 20)
            results[kind].append(r)
            print(f"rep {rep + 1}/{args.reps} {kind:19} {r[0]:7,.0f} MiB/s  fwd-server "
                  f"{r[1]:.3f}  fwd-client {r[2]:.3f} CPU-s/GiB", flush=True)
    print()
    print("| kind | MiB/s | fwd-server CPU-s/GiB | fwd-client CPU-s/GiB |")
    print("|---|---|---|---|")
    for kind, rs in results.items():
        med = [statistics.median(r[i] for r in rs) for i in range(3)]
        client = f"{med[2]:.3f}" if kind != "pair" else ""
        print(f"| {kind} | {med[0]:,.0f} | {med[1]:.3f} | {client} |")


if __name__ == "__main__":
    main()
