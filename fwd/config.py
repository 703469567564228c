"""Server settings and the small parsers for addresses and sizes.

Kept apart from the CLI so that workers, tests and the future control socket
can build a Config without click.
"""
from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

MODES = ("chan", "broadcast")
LOG_FORMATS = ("text", "json")

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str | int) -> int:
    """``"4MiB"``, ``"512k"``, ``"1048576"`` → bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 65536, 512KiB, 4MiB)")
    unit = (m.group(2) or "").lower()[:1]
    return int(m.group(1)) * _UNITS[unit]


def parse_hostport(text: str) -> tuple[str, int]:
    """``"0.0.0.0:8601"``, ``"[::]:8601"``, ``"localhost:0"`` → (host, port)."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", text.strip())
    if not m:
        raise ValueError(f"not HOST:PORT: {text!r} (IPv6 as [::1]:8601)")
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError(f"port out of range: {port}")
    return host or "0.0.0.0", port


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_key(peer: str) -> str:
    """What ``--max-conns-per-ip`` counts by, from a peer as ``format_hostport``
    writes it: the IPv4 address, or the /64 of an IPv6 address, which one host
    usually has whole (counting single addresses would let it open a slot per
    address). An IPv4-mapped address counts as IPv4 (fwd's IPv6 listeners are
    IPv6-only, so only another caller would bring one). Anything else is its
    own key."""
    host = peer.rpartition(":")[0] or peer
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])  # no zone: fe80::1%eth0
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """``"10.0.0.0/8"``, ``"192.0.2.7"``, ``"2001:db8::/32"`` → a network (host
    bits after the prefix are ignored, as ncat's --allow does). An
    IPv4-mapped network (``::ffff:10.0.0.0/104``) is its IPv4 network, as a
    mapped peer address counts as IPv4: else it would never match."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an address or network: {text!r} "
                         "(examples: 192.0.2.7, 10.0.0.0/8, 2001:db8::/32)") from None
    mapped = net.network_address.ipv4_mapped if net.version == 6 else None
    if mapped is not None and net.prefixlen >= 96:
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def read_networks(path: str) -> list[Network]:
    """The networks of an ``--allow-file`` or ``--deny-file``: separated by
    newlines, commas or blanks, ``#`` to the end of a line a comment (as
    ncat's --allowfile). Each is checked, so a typo names its line rather
    than letting the address through."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: "
                         f"{getattr(exc, 'strerror', None) or 'not UTF-8'}") from None
    nets: list[Network] = []
    # Lines end at \n only: splitlines() also breaks at \f, \v, \x1c, U+2028...,
    # which numbered lines wrong and ended a comment early (explore24).
    for n, line in enumerate(text.split("\n"), 1):
        for word in line.partition("#")[0].replace(",", " ").split():
            try:
                nets.append(parse_network(word))
            except ValueError as exc:
                raise ValueError(f"{path} line {n}: {exc}") from None
    return nets


class NetworkSet:
    """Networks to test an address against in O(prefix lengths), not O(networks):
    a blocklist may hold hundreds of thousands, and every accept asks."""

    def __init__(self, nets: Iterable[Network]) -> None:
        by_len: dict[tuple[int, int], set[int]] = {}
        self.count = 0
        for net in nets:
            shift = net.max_prefixlen - net.prefixlen
            by_len.setdefault((net.version, shift), set()).add(
                int(net.network_address) >> shift)
            self.count += 1
        # Per IP version: (shift, network prefixes), longest prefixes first.
        self._tables: dict[int, list[tuple[int, set[int]]]] = {4: [], 6: []}
        for (version, shift), prefixes in sorted(by_len.items()):
            self._tables[version].append((shift, prefixes))

    def __len__(self) -> int:
        return self.count

    def __contains__(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        n = int(ip)
        return any(n >> shift in prefixes for shift, prefixes in self._tables[ip.version])


def _network(net: str | Network) -> Network:
    return parse_network(net) if isinstance(net, str) else net


class AddressFilter:
    """``--allow`` and ``--deny``: which client addresses the server takes.
    A peer in a --deny network is refused; with an allow list (``allow`` not
    None), so is one in none of its networks, even when it is empty (an
    emptied --allow-file shuts the door rather than opening it). An
    IPv4-mapped IPv6 address counts as IPv4."""

    def __init__(self, allow: Iterable[str | Network] | None = None,
                 deny: Iterable[str | Network] = ()) -> None:
        self.allow = None if allow is None else NetworkSet(map(_network, allow))
        self.deny = NetworkSet(map(_network, deny))

    def __bool__(self) -> bool:
        return self.allow is not None or bool(self.deny)

    def refuses(self, host: str) -> str | None:
        """Why a client from ``host`` (an address, no port) is refused, for the
        log; None if it is taken."""
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return "not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip in self.deny:
            return "in --deny"
        if self.allow is not None and ip not in self.allow:
            return "not in --allow"
        return None


MAX_WORKERS = 256
"""Every worker keeps a ZeroMQ pipe to every other, and a ZeroMQ context has
at most 1023 sockets by default: some hundreds is the ceiling of this design."""
MIN_WORKER_TIMEOUT = 2.0
"""Workers report every second (worker.BEAT), and the parent looks every
second: a healthy worker may seem silent for almost two."""


def usable_cpus() -> int:
    """The CPUs this process may run on, as ``nproc`` counts them: a server
    started under ``taskset`` or in a cpuset gets that many workers, not one
    per CPU of the machine, which would only take turns on the same cores."""
    try:
        cpus = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return min(cpus, MAX_WORKERS)


@dataclass
class Config:
    """Every knob of one fwd-server; defaults match the CLI's."""

    listen: list[tuple[str, int]] = field(default_factory=lambda: [("0.0.0.0", 8601)])
    mode: str = "broadcast"
    workers: int = field(default_factory=usable_cpus)
    handshake_timeout: float = 30.0
    idle_timeout: float = 0.0
    max_buffer: int = 4 * 1024**2
    slow_timeout: float = 30.0
    hold_bytes: int = 1024**2
    hold_seconds: float = 30.0
    hold_total: int = 256 * 1024**2
    max_conns: int = 10000
    max_conns_per_ip: int = 0
    """Connections from one address (address_key) at most; 0: no limit."""
    allow: tuple[str, ...] = ()
    """Networks clients may come from (AddressFilter); empty: any (unless allow_file)."""
    deny: tuple[str, ...] = ()
    """Networks clients may not come from."""
    allow_file: str | None = None
    """More networks for ``allow`` (read_networks), read again by ``fwd-ctl reload``."""
    deny_file: str | None = None
    """More networks for ``deny``, read again by ``fwd-ctl reload``."""
    splice_min: int = 64 * 1024
    """A read this big for one local receiver moves that stream to splice(2); 0: never."""
    pump_pairs: int = 4
    """Bulk pairs per worker whose two directions get a thread each; 0: none."""
    max_rate: int = 0
    """Bytes per second each client may send into the relay (ratelimit); 0: no limit."""
    tcp_congestion: str | None = None
    """TCP congestion control of client connections; None: the system's default."""
    takeover: bool = False
    drain_timeout: float = 5.0
    worker_timeout: float = 60.0
    """Kill and restart a worker whose event loop has not turned this long; 0: never."""
    log_level: str = "info"
    log_format: str = "text"
    control: str | None = None
    """Control socket path; None: derived from the listen port; "none": no socket."""
    metrics: tuple[str, int] | None = None
    """Serve Prometheus metrics on this address."""
    password: str | None = field(default=None, repr=False)
    """Encrypted handshake (docs/PROTOCOL.md §7); never logged or shown."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
        if self.password == "":
            raise ValueError("the password must not be empty")
        self.allow, self.deny = tuple(self.allow), tuple(self.deny)
        AddressFilter(self.allow, self.deny)  # every entry parses (files: when read)

    def address_filter(self) -> AddressFilter:
        """--allow and --deny with what their files say now; ValueError names
        a file that cannot be read or its first bad line."""
        allow: list[str | Network] = [
            *self.allow, *(read_networks(self.allow_file) if self.allow_file else ())]
        deny: list[str | Network] = [
            *self.deny, *(read_networks(self.deny_file) if self.deny_file else ())]
        return AddressFilter(allow if allow or self.allow_file else None, deny)
