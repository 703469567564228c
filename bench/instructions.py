"""``python -m bench.instructions``: user-space instructions a worker spends
per relayed message, counted by valgrind's callgrind.

Why: the latency figures of ``bench.compare`` move by tens of per cent with
the load of the machine they share, so a change worth a few per cent of the
relay's own work cannot be seen there. An instruction count is the same from
one run to the next. It leaves out the kernel (the system calls, which are
the same three per message: epoll_wait, read, send) and the cost of cache
misses, so it ranks changes to the loop's own code, not relays.

A 64-byte ping-pong runs through a chan pair on ``fwd-server --workers 1``
started under callgrind; the counters are zeroed after a warm-up and dumped
after ``--messages`` round trips, with the clients idle at both moments. By
the end of the warm-up the pair has its two threads (fwd/pumps.py), so the
count is theirs; ``--fwd-args "--pump-pairs 0"`` counts the event loop's path.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.gen import dial, handshake

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64


def _wait_line(log: Path, pattern: str, proc: subprocess.Popen[bytes],
               timeout: float = 300.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"fwd-server exited:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"no {pattern!r} in {log} within {timeout:.0f} s")


def _exchange(a: socket.socket, b: socket.socket, n: int) -> None:
    """n round trips a -> relay -> b -> relay -> a, one message in flight."""
    msg, buf = b"p" * SIZE, bytearray(SIZE)
    view = memoryview(buf)
    for _ in range(n):
        a.sendall(msg)
        for s in (b, a):
            got = 0
            while got < SIZE:
                k = s.recv_into(view[got:])
                if not k:
                    raise EOFError("the relay closed during the ping-pong")
                got += k
            if s is b:
                b.sendall(buf)


def _total(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def measure(messages: int, extra: list[str]) -> dict[str, float]:
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="fwd-cg-") as tmp:
        out, log = Path(tmp), Path(tmp) / "server.log"
        server = [sys.executable, "-m", "fwd.cli", "--listen", "127.0.0.1:0",
                  "--mode", "chan", "--workers", "1", "--control", "none",
                  "--worker-timeout", "0", "--handshake-timeout", "0", *extra]
        with open(log, "wb") as sink:
            proc = subprocess.Popen(
                ["valgrind", "--tool=callgrind", "--trace-children=yes",
                 f"--callgrind-out-file={out}/cg.%p", *server],
                stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            port = int(_wait_line(log, r"listening on 127\.0\.0\.1:(\d+)", proc).group(1))
            worker = int(_wait_line(log, r"worker 0 ready pid=(\d+)", proc).group(1))
            a, b = dial(("127.0.0.1", port)), dial(("127.0.0.1", port))
            handshake(a, "ping", ["echo"])
            handshake(b, "echo", ["ping"])
            _exchange(a, b, 200)
            subprocess.run(["callgrind_control", "-z", str(worker)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            t = time.monotonic()
            _exchange(a, b, messages)
            seconds = time.monotonic() - t
            subprocess.run(["callgrind_control", "-d", str(worker)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            a.close()
            b.close()
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        dumps = sorted(out.glob(f"cg.{worker}.*"))
        if not dumps:
            raise RuntimeError(f"callgrind wrote no dump for worker {worker}")
        total = _total(dumps[0])
    return {"messages": 2 * messages, "instructions": total,
            "per_message": total / (2 * messages), "seconds_under_valgrind": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=3000,
                   help="round trips counted (each is two relayed messages)")
    p.add_argument("--fwd-args", default="", help="more fwd-server options")
    args = p.parse_args()
    r = measure(args.messages, args.fwd_args.split())
    print(f"{r['per_message']:,.0f} instructions per relayed {SIZE} B message "
          f"(worker user space; {r['instructions']:,} over {r['messages']:,} messages)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
