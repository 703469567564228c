"""``python -m bench.ceiling``: how fast could *any* relay carry one stream here?

Why it exists: the issue asks for a 1->1 stream at 0.95x direct loopback.
That figure is only worth chasing if some relay can reach it on this machine,
so this command measures the two cheapest relays there are, next to direct,
with the same sender and receiver (one process each, 64 KiB ``sendall``,
``recv_into`` 1 MiB), alternating, several repetitions:

* ``splice``: a relay process that does nothing but two blocking
  ``splice(2)`` calls in a loop, socket -> pipe -> socket, with a 1 MiB pipe
  (the unprivileged maximum). No event loop, no poll, no copy: what any
  user-space relay (fwd, socat, haproxy) can at best become.
* ``sockmap``: no relay process at all. The sockets sit in a BPF sockhash
  whose ``sk_skb`` verdict program redirects every segment that reaches one
  socket to the other's send path, inside the kernel. Needs CAP_BPF and
  CAP_NET_ADMIN (skipped otherwise).

``--stall`` also measures what each variant lets a sender write while its
receiver reads nothing (for 2 s, at most 1 GiB): the memory a stalled peer
can make a relay hold. Machine CPU is read from ``/proc/stat`` (all cores,
so kernel workers count too), relay CPU from the relay process.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import os
import platform
import select
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

CHUNK = 64 << 10
PIPE = 1 << 20
F_SETPIPE_SZ = 1031
SO_COOKIE = 57
STALL_SECONDS = 2.0
STALL_CAP = 1 << 30
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())


@dataclass
class Sample:
    mib_s: float
    machine_cores: float
    relay_cpu_s_gib: float | None = None


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs; idle and iowait are not busy."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


# ---- the sockmap relay: a BPF sockhash and an sk_skb verdict program ------------------

def _bpf(cmd: int, attr: bytes) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr, 128)
    fd = libc.syscall(SYS_BPF, cmd, buf, 128)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf({cmd}): {os.strerror(e)}")
    return int(fd)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


class Sockhash:
    """Key: a socket's cookie; value: the socket its bytes go to.

    The verdict program is ``return bpf_sk_redirect_hash(skb, map,
    &cookie_of(skb->sk), 0)``, hand-assembled so that no compiler or
    libbpf is needed."""

    def __init__(self) -> None:
        if SYS_BPF is None:
            raise OSError(errno.ENOSYS, f"no bpf syscall number for {platform.machine()}")
        self.map = _bpf(0, struct.pack("<IIIII", 18, 8, 4, 64, 0))  # MAP_CREATE, SOCKHASH
        prog = b"".join([
            _insn(0xBF, 6, 1),                  # r6 = ctx
            _insn(0x85, imm=46),                # r0 = bpf_get_socket_cookie(ctx)
            _insn(0x7B, 10, 0, -8),             # *(u64 *)(fp - 8) = r0
            _insn(0xBF, 1, 6),                  # r1 = ctx
            _insn(0x18, 2, 1, imm=self.map), _insn(0),  # r2 = &map
            _insn(0xBF, 3, 10), _insn(0x07, 3, imm=-8),  # r3 = fp - 8
            _insn(0xB7, 4, imm=0),              # r4 = 0 (to the send path)
            _insn(0x85, imm=72),                # bpf_sk_redirect_hash
            _insn(0x95),                        # exit
        ])
        code = ctypes.create_string_buffer(prog, len(prog))
        lic = ctypes.create_string_buffer(b"GPL")
        self.prog = _bpf(5, struct.pack(  # PROG_LOAD, SK_SKB
            "<IIQQIIQII16s", 14, len(prog) // 8, ctypes.addressof(code), ctypes.addressof(lic),
            0, 0, 0, 0, 0, b"ceiling"))
        _bpf(8, struct.pack("<IIII", self.map, self.prog, 38, 0))  # PROG_ATTACH, SK_SKB_VERDICT

    def pair(self, a: socket.socket, b: socket.socket) -> None:
        for src, dst in ((a, b), (b, a)):
            key = ctypes.create_string_buffer(src.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), 8)
            val = ctypes.create_string_buffer(struct.pack("<I", dst.fileno()), 4)
            _bpf(2, struct.pack("<IIQQQ", self.map, 0, ctypes.addressof(key),
                                ctypes.addressof(val), 0))

    def close(self) -> None:
        os.close(self.prog)
        os.close(self.map)


def sockmap_skip_reason() -> str | None:
    try:
        Sockhash().close()
    except OSError as exc:
        return f"sockmap unavailable: {exc}"
    return None


# ---- one measurement ------------------------------------------------------------------

def _splice_relay(a: socket.socket, b: socket.socket, report: int) -> None:
    """Runs in its own process; writes its CPU seconds to ``report`` at EOF."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, PIPE)
    t = os.times()
    while n := os.splice(a.fileno(), w, PIPE, flags=os.SPLICE_F_MOVE):
        while n:
            n -= os.splice(r, b.fileno(), n, flags=os.SPLICE_F_MOVE)
    t2 = os.times()
    os.write(report, struct.pack("<d", t2.user + t2.system - t.user - t.system))


def _fork(body: Callable[[], None], *close: socket.socket) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        for s in close:
            s.close()
        body()
        os._exit(0)
    except BaseException:  # noqa: B036 - a child must never return into the parent's code
        import traceback
        traceback.print_exc()
        os._exit(1)


def run(kind: str, total: int, stall: bool = False) -> Sample:
    """One transfer of ``total`` bytes (or, with ``stall``, a sender facing a
    receiver that reads nothing) through ``kind``: direct, splice, sockmap."""
    ls = socket.create_server(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    src = socket.create_connection(("127.0.0.1", port))
    relay: list[socket.socket] = []
    hub = None
    if kind == "direct":
        dst, _ = ls.accept()
    else:
        a, _ = ls.accept()
        dst = socket.create_connection(("127.0.0.1", port))
        b, _ = ls.accept()
        relay = [a, b]
    ls.close()
    cpu_r, cpu_w = os.pipe()
    pids = []
    if kind == "sockmap":
        hub = Sockhash()
        hub.pair(*relay)
    elif kind == "splice":
        pids.append(_fork(lambda: _splice_relay(relay[0], relay[1], cpu_w), src, dst))
    if kind == "splice":  # the relay process has its own copies
        for s in relay:
            s.close()
    os.close(cpu_w)
    if stall:
        return _stall(src, dst, hub, pids, cpu_r, relay)
    busy0, all0 = machine_busy()
    t0 = time.monotonic()

    def send() -> None:
        buf = b"x" * CHUNK
        for _ in range(total // CHUNK):
            src.sendall(buf)

    def receive() -> None:
        buf = bytearray(1 << 20)
        got = 0
        while got < total:
            n = dst.recv_into(buf)
            if not n:
                raise EOFError(f"{got} of {total} bytes")
            got += n

    ends = [_fork(send, dst), _fork(receive, src)]
    src.close()
    dst.close()
    for pid in ends:
        _, status = os.waitpid(pid, 0)
        if status:
            raise RuntimeError(f"{kind}: a generator failed")
    dt = time.monotonic() - t0
    busy1, all1 = machine_busy()
    relay_cpu = None
    for pid in pids:
        os.waitpid(pid, 0)
        relay_cpu = struct.unpack("<d", os.read(cpu_r, 8))[0] / (total / 2**30)
    os.close(cpu_r)
    if hub:
        hub.close()
    for s in relay:
        s.close()
    cores = (busy1 - busy0) / max(1, all1 - all0) * (os.cpu_count() or 1)
    return Sample(total / dt / 2**20, cores, relay_cpu)


def _stall(src: socket.socket, dst: socket.socket, hub: Sockhash | None, pids: list[int],
           cpu_r: int, relay: list[socket.socket]) -> Sample:
    src.setblocking(False)
    buf = b"x" * CHUNK
    sent = 0
    deadline = time.monotonic() + STALL_SECONDS
    while sent < STALL_CAP and time.monotonic() < deadline:
        try:
            sent += src.send(buf)
        except BlockingIOError:
            if not select.select([], [src], [], 0.2)[1]:
                break
    for s in (src, dst, *relay):
        s.close()
    for pid in pids:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    os.close(cpu_r)
    if hub:
        hub.close()
    return Sample(sent / 2**20, 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=4.0, help="GiB per transfer (default 4)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, alternating (default 3)")
    p.add_argument("--stall", action="store_true", help="also measure a stalled receiver")
    args = p.parse_args(argv)
    kinds = ["direct", "splice", "sockmap"]
    skip = sockmap_skip_reason()
    if skip:
        kinds.remove("sockmap")
    total = int(args.gib * 2**30) // CHUNK * CHUNK
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        cc = f.read().strip()
    print(f"# {platform.node()} {platform.release()}, {os.cpu_count()} CPUs, "
          f"congestion control {cc}, {args.gib:g} GiB x {args.reps}")
    samples: dict[str, list[Sample]] = {k: [] for k in kinds}
    for rep in range(args.reps):
        for kind in kinds if rep % 2 == 0 else kinds[::-1]:
            samples[kind].append(run(kind, total))
    direct = statistics.median(s.mib_s for s in samples["direct"])
    print("| variant | MiB/s (median) | vs direct | machine busy (cores) | relay CPU-s/GiB |")
    print("|---|---|---|---|---|")
    for kind in kinds:
        mib = statistics.median(s.mib_s for s in samples[kind])
        busy = statistics.median(s.machine_cores for s in samples[kind])
        cpus = [s.relay_cpu_s_gib for s in samples[kind] if s.relay_cpu_s_gib is not None]
        cpu = f"{statistics.median(cpus):.3f}" if cpus else ""
        print(f"| {kind} | {mib:,.0f} | {mib / direct:.2f}x | {busy:.2f} | {cpu} |")
    if args.stall:
        print(f"\n| variant | MiB a sender wrote in {STALL_SECONDS:g} s to a receiver "
              "that reads nothing |\n|---|---|")
        for kind in kinds:
            print(f"| {kind} | {run(kind, 0, stall=True).mib_s:,.1f} |")
    if skip:
        print(f"- skipped sockmap: {skip}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
