"""The address helpers of fwd.config: what --max-conns-per-ip counts by, and
which clients --allow and --deny (and their files) take."""
from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwd.config import (
    AddressFilter,
    Config,
    NetworkSet,
    address_key,
    format_hostport,
    read_networks,
)

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


@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_an_ipv4_mapped_entry_is_its_ipv4_network(ip: ipaddress.IPv4Address,
                                                  prefix: int) -> None:
    """A mapped peer counts as IPv4, so a mapped entry must too, or a --deny
    written that way would refuse nobody."""
    net = ipaddress.IPv4Network((ip, prefix), strict=False)
    mapped = f"::ffff:{net.network_address}/{prefix + 96}"
    assert AddressFilter(deny=[mapped]).refuses(str(ip)) == "in --deny"
    assert AddressFilter(allow=[mapped]).refuses(f"::ffff:{ip}") is None


def test_an_empty_filter_takes_everyone_and_bad_entries_are_named() -> None:
    assert not AddressFilter() and AddressFilter(deny=["10.0.0.0/8"])
    assert AddressFilter().refuses("192.0.2.1") is None
    assert AddressFilter(allow=["10.0.0.0/8"]).refuses("not-an-ip") == "not an IP address"
    for bad in ("10.0.0.256", "10.0.0.0/33", "example.org", ""):
        with pytest.raises(ValueError, match="not an address or network"):
            AddressFilter(allow=[bad])


networks = st.one_of(
    st.builds(lambda ip, p: ipaddress.IPv4Network((ip, p), strict=False),
              st.ip_addresses(v=4), st.integers(0, 32)),
    st.builds(lambda ip, p: ipaddress.IPv6Network((ip, p), strict=False),
              st.ip_addresses(v=6), st.integers(0, 128)))


@given(st.lists(networks, max_size=20), st.lists(st.ip_addresses(), max_size=20))
def test_a_network_set_answers_as_a_scan_of_its_networks(nets, ips) -> None:
    """The prefix-indexed lookup, against the obvious linear one; each
    network's first and last addresses are probed too."""
    table = NetworkSet(nets)
    assert len(table) == len(nets)
    edges = [a for n in nets for a in (n.network_address, n.broadcast_address)]
    for ip in [*ips, *edges]:
        assert (ip in table) == any(ip in n for n in nets), (ip, nets)


def test_an_allow_or_deny_file_lists_networks_with_comments(tmp_path) -> None:
    path = tmp_path / "nets"
    path.write_text("# blocklist\n10.0.0.0/8, 192.0.2.7  # a host\n\n  2001:db8::/32\n")
    assert read_networks(str(path)) == [ipaddress.ip_network(n) for n in (
        "10.0.0.0/8", "192.0.2.7", "2001:db8::/32")]
    path.write_text("10.0.0.0/8\n# fine\n10.0.0.300\n")
    with pytest.raises(ValueError, match=r"nets line 3: not an address or network: '10.0.0.300'"):
        read_networks(str(path))
    with pytest.raises(ValueError, match=r"cannot read .*missing: No such file"):
        read_networks(str(tmp_path / "missing"))
    path.write_bytes(b"\xff")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_networks(str(path))


def test_only_a_newline_ends_a_line_of_an_allow_or_deny_file(tmp_path) -> None:
    """str.splitlines() also breaks at form feeds, U+2028 and more: a
    commented-out network after one was live, and errors named the wrong line."""
    path = tmp_path / "nets"
    path.write_text("# off for now\f 10.0.0.0/8\n192.0.2.0/24\u2028\n")
    assert read_networks(str(path)) == [ipaddress.ip_network("192.0.2.0/24")]
    path.write_text("192.0.2.1 \x1c\n127.0.0.300\n")
    with pytest.raises(ValueError, match="line 2: "):
        read_networks(str(path))


def test_files_add_to_the_options_and_an_empty_allow_file_takes_nobody(tmp_path) -> None:
    allow, deny = tmp_path / "allow", tmp_path / "deny"
    allow.write_text("10.1.0.0/16\n")
    deny.write_text("10.1.2.0/24\n")
    both = Config(allow=("10.2.0.0/16",), allow_file=str(allow), deny_file=str(deny))
    f = both.address_filter()
    assert f.refuses("10.1.9.9") is None and f.refuses("10.2.9.9") is None
    assert f.refuses("10.1.2.3") == "in --deny" and f.refuses("10.3.0.1") == "not in --allow"
    allow.write_text("# nobody for now\n")
    assert Config(allow_file=str(allow)).address_filter().refuses("10.1.9.9") == "not in --allow"
    assert Config(deny_file=str(allow)).address_filter().refuses("10.1.9.9") is None
    allow.write_text("nonsense\n")
    with pytest.raises(ValueError, match="allow line 1"):
        Config(allow_file=str(allow)).address_filter()
