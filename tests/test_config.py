"""The address helpers of fwd.config: what --max-conns-per-ip counts by."""
from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from fwd.config import address_key, format_hostport

ports = st.integers(0, 65535)


@given(st.ip_addresses(v=4), ports)
def test_an_ipv4_peer_counts_by_its_address(ip: ipaddress.IPv4Address, port: int) -> None:
    assert address_key(format_hostport(str(ip), port)) == str(ip)


@given(st.ip_addresses(v=4), ports)
def test_ipv4_mapped_on_an_ipv6_listener_counts_as_ipv4(ip: ipaddress.IPv4Address,
                                                         port: int) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    assert address_key(format_hostport(str(mapped), port)) == str(ip)


@given(st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None), ports,
       st.integers(0, 2**64 - 1), ports)
def test_an_ipv6_host_counts_by_its_slash_64(ip: ipaddress.IPv6Address, port: int,
                                             interface: int, port2: int) -> None:
    """One host usually has a whole /64: every address in it is one key, and
    the key names the network."""
    sibling = ipaddress.IPv6Address((int(ip) >> 64 << 64) | interface)
    if sibling.ipv4_mapped is not None:
        return
    key = address_key(format_hostport(str(ip), port))
    assert key == address_key(format_hostport(str(sibling), port2))
    assert ip in ipaddress.IPv6Network(key)


def test_other_peers_are_their_own_key() -> None:
    assert address_key("?") == "?"
    assert address_key("[fe80::1%eth0]:80") == "fe80::/64"
    assert address_key("example.org:80") == "example.org"
    assert address_key(format_hostport("2001:db8::1", 1)) != address_key(
        format_hostport("2001:db8:0:1::1", 1))
