"""The address helpers of fwd.config: what --max-conns-per-ip counts by, and
which clients --allow and --deny take."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwd.config import AddressFilter, address_key, format_hostport

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


@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_allow_takes_its_network_and_nothing_else(ip: ipaddress.IPv4Address,
                                                  prefix: int) -> None:
    net = ipaddress.IPv4Network((ip, prefix), strict=False)
    allow = AddressFilter(allow=[f"{ip}/{prefix}"])  # host bits are ignored, as by ncat
    assert allow.refuses(str(net.network_address)) is None
    assert allow.refuses(str(net.broadcast_address)) is None
    assert allow.refuses(f"::ffff:{ip}") is None  # IPv4-mapped counts as IPv4
    if int(net.broadcast_address) < 2**32 - 1:
        assert allow.refuses(str(net.broadcast_address + 1)) == "not in --allow"
    if int(net.network_address) > 0:
        assert allow.refuses(str(net.network_address - 1)) == "not in --allow"
    assert allow.refuses("::1") == "not in --allow"  # another family
    both = AddressFilter(allow=[str(net)], deny=[str(ip)])
    assert both.refuses(str(ip)) == "in --deny"  # --deny wins


@given(st.ip_addresses(v=6), st.integers(0, 128))
def test_deny_refuses_its_ipv6_network_only(ip: ipaddress.IPv6Address, prefix: int) -> None:
    net = ipaddress.IPv6Network((ip, prefix), strict=False)
    deny = AddressFilter(deny=[str(net)])
    if ip.ipv4_mapped is None:
        assert deny.refuses(str(ip)) == "in --deny"
        assert deny.refuses(f"{ip}%eth0") == "in --deny"  # a zone does not matter
    assert deny.refuses("192.0.2.1") is None


def test_an_empty_filter_takes_everyone_and_bad_entries_are_named() -> None:
    assert not AddressFilter() and AddressFilter(deny=["10.0.0.0/8"])
    assert AddressFilter().refuses("192.0.2.1") is None
    assert AddressFilter(allow=["10.0.0.0/8"]).refuses("not-an-ip") == "not an IP address"
    for bad in ("10.0.0.256", "10.0.0.0/33", "example.org", ""):
        with pytest.raises(ValueError, match="not an address or network"):
            AddressFilter(allow=[bad])
