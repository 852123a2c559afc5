"""Addresses, netmasks and netmask groups (reference §3.3, §4.5, §5.2)."""

from __future__ import annotations

import dataclasses
import threading
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from trackalert.netaddr import (
    DEFAULT_ACL,
    AddressError,
    ComboAddress,
    Netmask,
    NetmaskGroup,
    parse_combo,
)


def ca(text: str) -> ComboAddress:
    return parse_combo(text)


# --------------------------------------------------------------------------------------------
# parse_combo: IPv4 without a port (inet_aton)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("0.0.0.0", "0.0.0.0"),
        ("255.255.255.255", "255.255.255.255"),
        ("127.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("010.0.0.1", "8.0.0.1"),  # octal part
        ("1.2.3", "1.2.0.3"),
        ("16909060", "1.2.3.4"),  # a single 32-bit number
        ("0xc0000201", "192.0.2.1"),
        ("1.2.3.4 trailing words", "1.2.3.4"),  # inet_aton stops at whitespace
    ],
)
def test_ipv4_without_port_follows_inet_aton(text: str, expected: str) -> None:
    address = parse_combo(text)
    assert address.tostring() == expected
    assert address.ip == IPv4Address(expected)
    assert address.port == 0
    assert address.isIPv4() and not address.isIPv6()


@pytest.mark.parametrize(
    "text",
    ["", "256.0.0.1", "1.2.3.4.5", "localhost", "example.com", "1.2.3.4x", "08.0.0.1", " ", "1..2"],
)
def test_unparseable_without_colon_fails_with_the_original_message(text: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_combo(text)
    assert str(info.value) == f"Unable to convert presentation address '{text}'"


def test_address_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_combo("not an address")


def test_default_port_applies_when_no_port_is_given() -> None:
    assert parse_combo("127.0.0.1", 4004) == ComboAddress(IPv4Address("127.0.0.1"), 4004)
    assert parse_combo("::1", 4004).port == 4004


def test_explicit_port_wins_over_default_even_zero() -> None:
    assert parse_combo("127.0.0.1:5199", 4004).port == 5199
    assert parse_combo("127.0.0.1:0", 4004).port == 0
    assert parse_combo("[::1]:", 4004).port == 0


# --------------------------------------------------------------------------------------------
# parse_combo: IPv4 with a port


@pytest.mark.parametrize(
    ("text", "ip", "port"),
    [
        ("1.2.3.4:80", "1.2.3.4", 80),
        ("1.2.3.4:0", "1.2.3.4", 0),
        ("1.2.3.4:65535", "1.2.3.4", 65535),
        ("1.2.3.4:65536", "1.2.3.4", 0),
        ("1.2.3.4:70000", "1.2.3.4", 4464),
        ("1.2.3.4:0080", "1.2.3.4", 80),
        ("127.1:53", "127.0.0.1", 53),
        ("0x7f.1:8084", "127.0.0.1", 8084),
        # strtol saturates at LONG_MAX, whose low 16 bits are all ones
        ("1.2.3.4:" + "9" * 40, "1.2.3.4", 65535),
        ("1.2.3.4:9223372036854775807", "1.2.3.4", 65535),
        ("1.2.3.4:4294967376", "1.2.3.4", 80),  # 2**32 + 80
    ],
)
def test_ipv4_with_port(text: str, ip: str, port: int) -> None:
    address = parse_combo(text)
    assert address.ip == IPv4Address(ip)
    assert address.port == port
    assert address.tostring() == ip  # the port is never part of tostring()


@pytest.mark.parametrize(
    "text",
    [
        "1.2.3.4:",
        "1.2.3.4:8x",
        "1.2.3.4:x8",
        "1.2.3.4:-1",
        "1.2.3.4:+80",
        "1.2.3.4: 80",
        "1.2.3.4:80 ",
        "1.2.3.4:٣",  # non-ASCII digit: not a decimal port for strtol
        "1.2.3.4:80:90",
        ":80",
        "host.example:80",
        "256.1.1.1:80",
        "1.2.3.4x:80",
    ],
)
def test_ipv4_with_bad_port_or_host_fails(text: str) -> None:
    with pytest.raises(AddressError, match="Unable to convert presentation address"):
        parse_combo(text)


def test_a_colon_after_an_inet_aton_number_is_read_as_ipv4_and_port() -> None:
    # The C++ parser tries IPv4 first: "1:2" is address 1 (0.0.0.1), port 2.
    address = parse_combo("1:2")
    assert address == ComboAddress(IPv4Address("0.0.0.1"), 2)


# --------------------------------------------------------------------------------------------
# parse_combo: IPv6


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("::1", "::1"),
        ("::", "::"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),  # first longest zero run compressed
        ("2001:db8:0:1:1:1:1:1", "2001:db8:0:1:1:1:1:1"),  # single zero field not compressed
        ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"),
        ("::ffff:1.2.3.4", "::ffff:1.2.3.4"),  # glibc prints mapped addresses dotted
        ("::ffff:102:304", "::ffff:1.2.3.4"),
        ("::1.2.3.4", "::1.2.3.4"),
    ],
)
def test_bare_ipv6_literal(text: str, expected: str) -> None:
    address = parse_combo(text)
    assert address.isIPv6() and not address.isIPv4()
    assert address.tostring() == expected
    assert address.port == 0


@pytest.mark.parametrize(
    ("text", "expected", "port"),
    [
        ("[::1]:53", "::1", 53),
        ("[2001:db8::1]:8084", "2001:db8::1", 8084),
        ("[::1]:", "::1", 0),
        ("[::1]:70000", "::1", 4464),
        ("[fe80::1%lo]:53", "fe80::1%lo", 53),
    ],
)
def test_bracketed_ipv6_with_port(text: str, expected: str, port: int) -> None:
    address = parse_combo(text)
    assert address.tostring() == expected
    assert address.port == port


@pytest.mark.parametrize(
    "text",
    [
        "[::1]",  # no port after ]
        "[::1]53",  # ] not followed by :
        "[::1",
        "[::1]:5x",
        "[::1]:-1",
        "[1.2.3.4]:80",  # brackets hold IPv6 only
        "[]:80",
        "::1:",
        "1::2::3",
        "2001:db8::g",
        "1:2:3:4:5:6:7:8:9",
        "::ffff:01.2.3.4",
        "fe80::1%",  # empty scope
        "fe80::1%a b",
        "fe80::1%eth0/64",
        "fe80::1%" + "x" * 16,  # longer than any interface name
        "localhost:80",
        "[localhost]:80",
    ],
)
def test_bad_ipv6_fails(text: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_combo(text)
    assert str(info.value) == f"Unable to convert presentation address '{text}'"


def test_scope_id_is_kept() -> None:
    address = parse_combo("fe80::1%lo")
    assert address.tostring() == "fe80::1%lo"
    assert address.ip.scope_id == "lo"
    assert str(address) == "[fe80::1%lo]:0"
    numeric = parse_combo("fe80::abcd%2")
    assert numeric.tostring() == "fe80::abcd%2"
    assert parse_combo("fe80::1%lo") != parse_combo("fe80::1%eth0")


def test_mapped_ipv4_is_detected_and_unmapped() -> None:
    mapped = parse_combo("::ffff:1.2.3.4")
    assert mapped.isMappedIPv4()
    assert mapped.isIPv6()
    plain = mapped.unmapped()
    assert plain == ComboAddress(IPv4Address("1.2.3.4"), 0)
    assert plain.isIPv4() and not plain.isMappedIPv4()
    assert parse_combo("[::ffff:10.0.0.1]:443").unmapped() == ComboAddress(
        IPv4Address("10.0.0.1"), 443
    )


@pytest.mark.parametrize("text", ["1.2.3.4", "::1", "2001:db8::1", "::1.2.3.4", "::fffe:1.2.3.4"])
def test_not_mapped_addresses_unmap_to_themselves(text: str) -> None:
    address = parse_combo(text)
    assert not address.isMappedIPv4()
    assert address.unmapped() is address


def test_str_shows_port_with_brackets_for_ipv6() -> None:
    assert str(parse_combo("1.2.3.4:80")) == "1.2.3.4:80"
    assert str(parse_combo("[2001:db8::1]:53")) == "[2001:db8::1]:53"
    assert str(parse_combo("127.0.0.1")) == "127.0.0.1:0"


def test_parse_combo_rejects_non_strings() -> None:
    with pytest.raises(TypeError):
        parse_combo(b"1.2.3.4")  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["1.2.3.4\x00", "1.2.3.4:8\x000", "::1\x00", "\udcff"])
def test_unusual_characters_fail_cleanly(text: str) -> None:
    with pytest.raises(AddressError):
        parse_combo(text)


# --------------------------------------------------------------------------------------------
# ComboAddress as a value


def test_combo_address_is_frozen_and_hashable() -> None:
    address = parse_combo("1.2.3.4:80")
    with pytest.raises(dataclasses.FrozenInstanceError):
        address.port = 81  # type: ignore[misc]
    assert {address, parse_combo("1.2.3.4:80")} == {address}
    assert address != parse_combo("1.2.3.4:81")


def test_combo_address_validates_its_fields() -> None:
    with pytest.raises(ValueError):
        ComboAddress(IPv4Address("1.2.3.4"), 65536)
    with pytest.raises(ValueError):
        ComboAddress(IPv4Address("1.2.3.4"), -1)
    with pytest.raises(TypeError):
        ComboAddress("1.2.3.4")  # type: ignore[arg-type]


def test_lua_methods_are_exactly_the_documented_ones() -> None:
    assert ComboAddress.LUA_METHODS == {"tostring", "isIPv4", "isIPv6", "isMappedIPv4"}
    assert Netmask.LUA_METHODS == {"toStringNetwork", "match"}
    assert NetmaskGroup.LUA_METHODS == {"addMask", "match", "size", "clear"}
    for cls in (ComboAddress, Netmask, NetmaskGroup):
        for name in cls.LUA_METHODS:
            assert callable(getattr(cls, name)), f"{cls.__name__}.{name}"


# --------------------------------------------------------------------------------------------
# Netmask


@pytest.mark.parametrize(
    ("address", "bits", "network"),
    [
        ("192.0.2.129", 24, "192.0.2.0/24"),
        ("2001:db8:abcd:1234::1", 48, "2001:db8:abcd::/48"),
        ("192.0.2.129", 255, "192.0.2.129/32"),
        ("192.0.2.129", 33, "192.0.2.129/32"),
        ("2001:db8::1", 255, "2001:db8::1/128"),
        ("2001:db8::1", 129, "2001:db8::1/128"),
        ("192.0.2.129", 0, "0.0.0.0/0"),
        ("10.1.2.3", 31, "10.1.2.2/31"),
    ],
)
def test_netmask_from_address(address: str, bits: int, network: str) -> None:
    assert Netmask.from_address(parse_combo(address), bits).toStringNetwork() == network


def test_netmask_from_address_drops_port_and_scope() -> None:
    from_port = Netmask.from_address(parse_combo("192.0.2.1:8080"), 32)
    assert str(from_port) == "192.0.2.1/32"
    scoped = Netmask.from_address(parse_combo("fe80::1%lo"), 64)
    assert scoped.toStringNetwork() == "fe80::/64"
    assert str(scoped) == "fe80::1/64"


def test_netmask_from_address_accepts_integral_lua_numbers() -> None:
    mask = Netmask.from_address(parse_combo("192.0.2.129"), 24.0)  # type: ignore[arg-type]
    assert mask.toStringNetwork() == "192.0.2.0/24"


@pytest.mark.parametrize("bits", [-1, 1.5, "24", True])
def test_netmask_from_address_rejects_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="bits"):
        Netmask.from_address(parse_combo("192.0.2.129"), bits)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "network", "as_given"),
    [
        ("198.51.100.200/25", "198.51.100.128/25", "198.51.100.200/25"),
        ("10.0.0.1/8", "10.0.0.0/8", "10.0.0.1/8"),
        ("10.0.0.1", "10.0.0.1/32", "10.0.0.1/32"),
        ("0.0.0.0/0", "0.0.0.0/0", "0.0.0.0/0"),
        ("2001:DB8::1/32", "2001:db8::/32", "2001:db8::1/32"),
        ("::1", "::1/128", "::1/128"),
        ("fe80::1/10", "fe80::/10", "fe80::1/10"),
        ("::ffff:1.2.3.4/120", "::ffff:1.2.3.0/120", "::ffff:1.2.3.4/120"),
    ],
)
def test_netmask_parse(text: str, network: str, as_given: str) -> None:
    mask = Netmask.parse(text)
    assert mask.toStringNetwork() == network
    assert str(mask) == as_given


@pytest.mark.parametrize(
    "text",
    ["127.1/8", "0x7f.0.0.1/8", "010.0.0.1/8", "1.2.3.4:80/32", "[::1]:53/128", "fe80::1%lo/64",
     "host/24", "", "/24"],
)
def test_netmask_parse_rejects_non_strict_addresses(text: str) -> None:
    with pytest.raises(AddressError, match="netmask"):
        Netmask.parse(text)


@pytest.mark.parametrize(
    "text", ["10.0.0.0/33", "10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/8x", "10.0.0.0/ 8", "::/129",
             "10.0.0.0/8/8", "10.0.0.0/0008"],
)
def test_netmask_parse_rejects_bad_bits(text: str) -> None:
    with pytest.raises(ValueError, match="Invalid netmask bits") as info:
        Netmask.parse(text)
    assert not isinstance(info.value, AddressError)
    assert text in str(info.value)


def test_netmask_match() -> None:
    mask = Netmask.parse("198.51.100.200/25")
    assert mask.match(ca("198.51.100.128"))
    assert mask.match(ca("198.51.100.255:80"))
    assert not mask.match(ca("198.51.100.127"))
    assert not mask.match(ca("2001:db8::1"))
    v6 = Netmask.parse("2001:db8::/32")
    assert v6.match(ca("2001:db8:ffff::1"))
    assert not v6.match(ca("2001:db9::1"))
    assert not v6.match(ca("32.1.13.184"))  # same leading bits, other family
    assert Netmask.parse("0.0.0.0/0").match(ca("203.0.113.9"))
    assert not Netmask.parse("0.0.0.0/0").match(ca("::1"))
    assert Netmask.parse("::/0").match(ca("::1"))


def test_ipv4_netmask_matches_mapped_address_and_ipv6_netmask_still_can() -> None:
    assert Netmask.parse("1.2.3.0/24").match(ca("::ffff:1.2.3.4"))
    assert not Netmask.parse("1.2.4.0/24").match(ca("::ffff:1.2.3.4"))
    assert Netmask.parse("::ffff:0:0/96").match(ca("::ffff:1.2.3.4"))
    assert not Netmask.parse("::ffff:0:0/96").match(ca("1.2.3.4"))


def test_netmask_match_rejects_non_addresses() -> None:
    with pytest.raises(TypeError):
        Netmask.parse("10.0.0.0/8").match("10.0.0.1")  # type: ignore[arg-type]


def test_netmask_equality_is_by_network() -> None:
    assert Netmask.parse("10.0.0.1/8") == Netmask.parse("10.0.0.0/8")
    assert hash(Netmask.parse("10.0.0.1/8")) == hash(Netmask.parse("10.0.0.0/8"))
    assert Netmask.parse("10.0.0.0/8") != Netmask.parse("10.0.0.0/9")
    assert Netmask.parse("0.0.0.0/0") != Netmask.parse("::/0")


def test_netmask_network_and_version() -> None:
    mask = Netmask.parse("198.51.100.200/25")
    assert mask.version == 4
    assert str(mask.network()) == "198.51.100.128/25"
    assert Netmask.parse("2001:db8::1/48").network().num_addresses == 2**80


def test_empty_netmask() -> None:
    empty = Netmask.empty()
    assert empty.is_empty
    assert empty.toStringNetwork() == ""
    assert str(empty) == ""
    assert not empty.match(ca("0.0.0.0"))
    assert not empty.match(ca("::"))
    with pytest.raises(ValueError):
        empty.network()


# --------------------------------------------------------------------------------------------
# NetmaskGroup


def group(*masks: str) -> NetmaskGroup:
    nmg = NetmaskGroup()
    for mask in masks:
        nmg.addMask(mask)
    return nmg


def test_empty_group_matches_nothing() -> None:
    nmg = NetmaskGroup()
    assert not nmg.match(ca("127.0.0.1"))
    assert not nmg.match(ca("::1"))
    assert nmg.size() == 0
    assert nmg.entries() == []


def test_longest_prefix_wins_in_both_directions() -> None:
    nmg = group("10.0.0.0/8", "!10.1.0.0/16", "10.1.2.0/24", "!10.1.2.3")
    assert nmg.match(ca("10.9.9.9"))
    assert not nmg.match(ca("10.1.9.9"))
    assert nmg.match(ca("10.1.2.4"))
    assert not nmg.match(ca("10.1.2.3"))
    assert not nmg.match(ca("11.0.0.1"))


def test_result_does_not_depend_on_insertion_order() -> None:
    nmg = group("!10.1.2.3", "10.1.2.0/24", "!10.1.0.0/16", "10.0.0.0/8")
    assert nmg.match(ca("10.9.9.9"))
    assert not nmg.match(ca("10.1.9.9"))
    assert nmg.match(ca("10.1.2.4"))
    assert not nmg.match(ca("10.1.2.3"))


def test_families_are_separate() -> None:
    nmg = group("0.0.0.0/0")
    assert nmg.match(ca("203.0.113.1"))
    assert not nmg.match(ca("2001:db8::1"))
    nmg = group("::/0")
    assert nmg.match(ca("2001:db8::1"))
    assert not nmg.match(ca("203.0.113.1"))


def test_ipv6_longest_prefix() -> None:
    nmg = group("2001:db8::/32", "!2001:db8:bad::/48", "2001:db8:bad:1::/64")
    assert nmg.match(ca("2001:db8:1::1"))
    assert not nmg.match(ca("2001:db8:bad:2::1"))
    assert nmg.match(ca("2001:db8:bad:1::1"))
    assert not nmg.match(ca("2001:db9::1"))


def test_negative_entry_alone_denies_and_unlisted_is_false() -> None:
    nmg = group("!192.0.2.0/24")
    assert not nmg.match(ca("192.0.2.1"))
    assert not nmg.match(ca("198.51.100.1"))


def test_mapped_ipv4_is_matched_as_ipv4() -> None:
    nmg = group("127.0.0.0/8", "!10.0.0.0/8")
    assert nmg.match(ca("::ffff:127.0.0.1"))
    assert not nmg.match(ca("::ffff:10.0.0.1"))
    assert nmg.match_ip(ip_address("::ffff:127.0.0.1"))
    assert nmg.match_ip("::ffff:127.0.0.1")


def test_mapped_ipv4_falls_back_to_ipv6_entries() -> None:
    nmg = group("::ffff:0:0/96", "!1.2.3.0/24")
    assert nmg.match(ca("::ffff:9.9.9.9"))  # no IPv4 entry covers it
    assert not nmg.match(ca("::ffff:1.2.3.4"))  # the IPv4 entry decides
    assert not nmg.match(ca("9.9.9.9"))  # plain IPv4 is not mapped


def test_same_network_added_again_replaces_and_moves_last() -> None:
    nmg = group("!10.0.0.0/8", "192.168.0.0/16")
    assert not nmg.match(ca("10.1.1.1"))
    nmg.addMask("10.0.0.0/8")
    assert nmg.match(ca("10.1.1.1"))
    assert nmg.size() == 2
    assert nmg.entries() == ["192.168.0.0/16", "10.0.0.0/8"]
    nmg.addMask("!10.255.255.255/8")  # same network, written differently
    assert not nmg.match(ca("10.1.1.1"))
    assert nmg.entries() == ["192.168.0.0/16", "!10.255.255.255/8"]


def test_entries_keep_order_and_text_as_given() -> None:
    nmg = group("10.0.0.1/8", "!192.0.2.7", "2001:DB8::1/32", "!::1")
    assert nmg.entries() == ["10.0.0.1/8", "!192.0.2.7/32", "2001:db8::1/32", "!::1/128"]
    assert nmg.size() == 4
    assert len(nmg) == 4


def test_default_acl() -> None:
    assert DEFAULT_ACL == (
        "127.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "192.168.0.0/16",
        "172.16.0.0/12", "::1/128", "fc00::/7", "fe80::/10",
    )
    acl = NetmaskGroup(DEFAULT_ACL)
    assert acl.entries() == list(DEFAULT_ACL)
    for allowed in ["127.0.0.1", "10.255.0.1", "100.127.255.255", "169.254.1.1", "192.168.1.1",
                    "172.31.255.255", "::1", "fd00::1", "fc00::1", "fe80::1", "febf::1"]:
        assert acl.match_ip(allowed), allowed
        assert acl.match(ca(allowed)), allowed
    for denied in ["8.8.8.8", "100.128.0.1", "100.63.255.255", "172.32.0.1", "172.15.255.255",
                   "192.169.0.1", "::2", "fe00::1", "fec0::1", "2001:db8::1", "0.0.0.0"]:
        assert not acl.match_ip(denied), denied
        assert not acl.match(ca(denied)), denied


def test_config_deny_of_a_default_range_is_overridden_by_the_defaults() -> None:
    acl = group("!10.0.0.0/8", "!192.168.1.0/24")
    for mask in DEFAULT_ACL:
        acl.addMask(mask)
    assert acl.match_ip("10.0.0.1")
    assert not acl.match_ip("192.168.1.1")  # more specific than the default /16
    assert acl.match_ip("192.168.2.1")


def test_match_ip_accepts_address_objects_and_strings() -> None:
    acl = group("203.0.113.0/24", "2001:db8::/32")
    assert acl.match_ip(IPv4Address("203.0.113.5"))
    assert acl.match_ip(IPv6Address("2001:db8::5"))
    assert acl.match_ip("203.0.113.5")
    assert acl.match_ip("2001:db8::5")
    assert acl.match_ip("2001:db8::5%eth0")  # peer names may carry a scope
    assert not acl.match_ip("198.51.100.1")
    assert acl.match_ip(IPv6Address("2001:db8::5%eth0"))


@pytest.mark.parametrize("bad", ["127.1", "not-an-ip", "127.0.0.1:80", "", "0.0.0.0/0", "::1/128"])
def test_match_ip_does_not_match_strings_that_are_not_addresses(bad: str) -> None:
    acl = NetmaskGroup(("0.0.0.0/0", "::/0"))  # would match any real address
    assert acl.match_ip(bad) is False


def test_match_rejects_non_addresses() -> None:
    with pytest.raises(TypeError):
        NetmaskGroup().match("127.0.0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        NetmaskGroup().match_ip(2130706433)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad", ["10.0.0.0/33", "!", "!!10.0.0.0/8", "10.0.0.0/8 ", "bogus", "127.1/8", ""]
)
def test_add_mask_rejects_invalid_entries_and_leaves_group_unchanged(bad: str) -> None:
    nmg = group("10.0.0.0/8")
    with pytest.raises(ValueError) as info:
        nmg.addMask(bad)
    assert str(info.value)
    assert nmg.entries() == ["10.0.0.0/8"]


def test_add_mask_rejects_non_strings() -> None:
    with pytest.raises(TypeError):
        NetmaskGroup().addMask(None)  # type: ignore[arg-type]


def test_add_refuses_the_empty_netmask() -> None:
    with pytest.raises(ValueError):
        NetmaskGroup().add(Netmask.empty())


def test_add_with_netmask_objects() -> None:
    nmg = NetmaskGroup()
    nmg.add(Netmask.from_address(ca("192.0.2.77"), 24))
    nmg.add(Netmask.parse("192.0.2.77"), allow=False)
    assert nmg.match(ca("192.0.2.1"))
    assert not nmg.match(ca("192.0.2.77"))
    assert nmg.entries() == ["192.0.2.77/24", "!192.0.2.77/32"]


def test_clear() -> None:
    nmg = group("10.0.0.0/8", "::1")
    nmg.clear()
    assert nmg.size() == 0
    assert nmg.entries() == []
    assert not nmg.match(ca("10.0.0.1"))
    assert not nmg.match(ca("::1"))
    nmg.addMask("::1")
    assert nmg.match(ca("::1"))
    assert not nmg.match(ca("10.0.0.1"))


def test_copy_is_independent() -> None:
    original = group("10.0.0.0/8", "!10.1.0.0/16")
    snapshot = original.copy()
    original.addMask("10.1.0.0/16")
    original.addMask("192.0.2.0/24")
    assert original.match(ca("10.1.0.1"))
    assert not snapshot.match(ca("10.1.0.1"))
    assert not snapshot.match(ca("192.0.2.1"))
    assert snapshot.entries() == ["10.0.0.0/8", "!10.1.0.0/16"]
    snapshot.clear()
    assert original.size() == 3


def test_many_entries_many_prefix_lengths() -> None:
    nmg = NetmaskGroup()
    for bits in range(8, 33):
        nmg.addMask(f"{'!' if bits % 2 else ''}10.0.0.0/{bits}")
    # 10.0.0.0 itself is covered by every entry: the /32 (even, allow) wins.
    assert nmg.match_ip("10.0.0.0")
    # 10.0.0.1 first leaves the chain at /32, so /31 (odd, deny) is the longest match.
    assert not nmg.match_ip("10.0.0.1")
    # 10.128.0.0 only matches /8 (even, allow).
    assert nmg.match_ip("10.128.0.0")
    # 10.64.0.0 matches /8 and /9 -> /9 is odd, deny.
    assert not nmg.match_ip("10.64.0.0")
    assert nmg.size() == 25


def test_concurrent_writers_and_readers() -> None:
    """The ACL is read on the event loop while the console changes it from another thread."""
    nmg = NetmaskGroup(DEFAULT_ACL)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(2000):
                nmg.addMask(f"198.51.{i % 256}.0/{16 + i % 17}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def read() -> None:
        try:
            for _ in range(5000):
                assert nmg.match_ip("127.0.0.1")
                assert not nmg.match_ip("8.8.8.8")
                nmg.entries()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=target) for target in (write, write, read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert nmg.match_ip("198.51.7.1")
