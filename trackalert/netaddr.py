"""Addresses, netmasks and netmask groups, parsed and printed the way the C++ daemon does.

Operators' configs and wforce's reports were written against the C++ parser (glibc `inet_aton`,
`inet_pton`, `inet_ntop`), so this module calls the same libc functions through `socket` instead of
re-implementing them; `ipaddress` objects are only the container. Parsing runs for every report
and the ACL check for every HTTP request, so the common cases take the shortest path.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import ClassVar, Iterable

__all__ = [
    "DEFAULT_ACL",
    "AddressError",
    "ComboAddress",
    "IPAddress",
    "Netmask",
    "NetmaskGroup",
    "parse_combo",
]

IPAddress = IPv4Address | IPv6Address

#: Private ranges the C++ daemon always re-adds to the ACL after the config ran (reference §3.3).
DEFAULT_ACL: tuple[str, ...] = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "192.168.0.0/16",
    "172.16.0.0/12",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)

_V4_WIDTH = 32
_V6_WIDTH = 128
_MAPPED_PREFIX = 0xFFFF  # value of bits 32..127 of an IPv4-mapped IPv6 address (::ffff:0:0/96)
_V4_MASK = 0xFFFFFFFF
# strtol saturates at LONG_MAX; the C++ port is that value taken modulo 65536.
_LONG_MAX = 2**63 - 1
# Interface names (Linux IFNAMSIZ - 1) or numeric scope ids. Anything else in a report's address
# is far more likely garbage than a real scope, and would end up in logs verbatim.
_SCOPE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,15}")

_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_inet_aton = socket.inet_aton
_inet_pton = socket.inet_pton
_inet_ntop = socket.inet_ntop


class AddressError(ValueError):
    """An address (or the address part of a netmask) that cannot be parsed."""

    @classmethod
    def presentation(cls, text: str) -> "AddressError":
        """The C++ daemon's exact wording, which operators grep their logs for."""
        return cls(f"Unable to convert presentation address '{text}'")


@dataclass(frozen=True, slots=True)
class ComboAddress:
    """An IP address with a port, as the C++ `ComboAddress` (and Lua's `newCA`) has it.

    The port is kept because listeners and the control socket need it, but Lua never sees it:
    `tostring()` is address only, exactly like the original.
    """

    #: What the Lua object of this class offers (trackalert.lua.values builds it; a test checks).
    LUA_METHODS: ClassVar[frozenset[str]] = frozenset(
        {"tostring", "isIPv4", "isIPv6", "isMappedIPv4"}
    )

    ip: IPAddress
    port: int = 0

    def __post_init__(self) -> None:
        # Cheap guards: a bad port or a non-address would otherwise surface far away, at bind time.
        if not isinstance(self.ip, (IPv4Address, IPv6Address)):
            raise TypeError(f"ComboAddress.ip must be an IPv4/IPv6Address, got {self.ip!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range 0..65535")

    def tostring(self) -> str:
        """glibc `inet_ntop` text, so `::ffff:1.2.3.4` prints as the C++ daemon prints it."""
        ip = self.ip
        if type(ip) is IPv4Address:
            return str(ip)
        text = _inet_ntop(_AF_INET6, ip.packed)
        scope = ip.scope_id
        return f"{text}%{scope}" if scope else text

    def isIPv4(self) -> bool:  # noqa: N802 - name fixed by the Lua API
        return self.ip.version == 4

    def isIPv6(self) -> bool:  # noqa: N802 - name fixed by the Lua API
        return self.ip.version == 6

    def isMappedIPv4(self) -> bool:  # noqa: N802 - name fixed by the Lua API
        return self.ip.version == 6 and (int(self.ip) >> 32) == _MAPPED_PREFIX

    def unmapped(self) -> "ComboAddress":
        """Reports store `::ffff:a.b.c.d` as plain IPv4 (reference §5.2 rule 5) so that one
        client has one identity whatever socket family wforce saw it on."""
        if self.isMappedIPv4():
            return ComboAddress(IPv4Address(int(self.ip) & _V4_MASK), self.port)
        return self

    def __str__(self) -> str:
        return endpoint_text(self.tostring(), self.port)


def endpoint_text(ip: str, port: int) -> str:
    """`ip:port`, with IPv6 in brackets, for log lines about sockets and peers."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# --------------------------------------------------------------------------------------------
# parse_combo (reference §5.2)


def parse_combo(text: str, default_port: int = 0) -> ComboAddress:
    """Parse `ip[:port]` with the C++ daemon's rules, so every report and config it accepted
    parses here to the same address.

    `default_port` applies only when the text carries no port at all; an explicit port (even
    `:0`, or the empty `[::1]:`) wins.
    """
    if not isinstance(text, str):
        raise TypeError(f"address must be a string, got {type(text).__name__}")
    colon = text.find(":")
    if colon < 0:
        packed = _aton(text)
        if packed is None:
            raise AddressError.presentation(text)
        return ComboAddress(IPv4Address(packed), default_port)
    parsed = _parse_v4_with_port(text, colon)
    if parsed is None:
        parsed = _parse_v6(text)
        if parsed is None:
            raise AddressError.presentation(text)
    ip, port = parsed
    return ComboAddress(ip, default_port if port is None else port)


def _aton(text: str) -> bytes | None:
    """`inet_aton`, which is what makes `127.1` and `0x7f.1` valid report addresses."""
    try:
        return _inet_aton(text)
    except (OSError, ValueError):  # ValueError: embedded NUL or unencodable text
        return None


def _is_decimal(text: str) -> bool:
    # str.isdigit alone accepts non-ASCII digits ('٣', '²') that C's strtol would not.
    return text.isascii() and text.isdigit()


def _port_from_digits(digits: str) -> int:
    """The C++ code stores the port with `htons`, i.e. modulo 65536 (70000 -> 4464)."""
    if len(digits) > 19:  # int() on thousands of digits is slow or refused; strtol saturates
        return _LONG_MAX % 65536
    return min(int(digits), _LONG_MAX) % 65536


def _parse_v4_with_port(text: str, colon: int) -> tuple[IPv4Address, int] | None:
    port_text = text[colon + 1 :]
    if not _is_decimal(port_text):  # also rejects the trailing-colon case
        return None
    packed = _aton(text[:colon])
    if packed is None:
        return None
    return IPv4Address(packed), _port_from_digits(port_text)


def _parse_v6(text: str) -> tuple[IPv6Address, int | None] | None:
    if not text.startswith("["):
        ip = _parse_v6_literal(text)
        return None if ip is None else (ip, None)
    close = text.find("]")
    if close < 0 or close + 1 >= len(text) or text[close + 1] != ":":
        return None
    port_text = text[close + 2 :]
    if port_text and not _is_decimal(port_text):
        return None
    ip = _parse_v6_literal(text[1:close])
    if ip is None:
        return None
    return ip, _port_from_digits(port_text) if port_text else 0


def _parse_v6_literal(text: str) -> IPv6Address | None:
    """glibc `inet_pton` for the address, plus the `%scope` that numeric getaddrinfo allows."""
    base, percent, scope = text.partition("%")
    if percent and _SCOPE_RE.fullmatch(scope) is None:
        return None
    try:
        packed = _inet_pton(_AF_INET6, base)
    except (OSError, ValueError):
        return None
    if not percent:
        return IPv6Address(packed)
    return IPv6Address(f"{_inet_ntop(_AF_INET6, packed)}%{scope}")


# --------------------------------------------------------------------------------------------
# Netmask


def _width(version: int) -> int:
    return _V4_WIDTH if version == 4 else _V6_WIDTH


def _parse_strict_ip(text: str) -> IPAddress | None:
    """Netmasks take a strict dotted quad (not inet_aton's `127.1`) or a plain IPv6 literal."""
    try:
        if ":" in text:
            return IPv6Address(_inet_pton(_AF_INET6, text))
        return IPv4Address(_inet_pton(_AF_INET, text))
    except (OSError, ValueError):
        return None


def _ip_from_int(version: int, value: int) -> IPAddress:
    return IPv4Address(value) if version == 4 else IPv6Address(value)


@dataclass(frozen=True)
class Netmask:
    """A network as the operator wrote it: the address is kept unmasked because `showACL()` prints
    it as given, while matching and equality use the masked network."""

    #: What the Lua object of this class offers (trackalert.lua.values builds it; a test checks).
    LUA_METHODS: ClassVar[frozenset[str]] = frozenset({"toStringNetwork", "match"})

    address: ComboAddress | None = field(compare=False)
    bits: int
    _version: int = field(init=False, repr=False)
    _key: int = field(init=False, repr=False)  # network int >> (width - bits)

    def __post_init__(self) -> None:
        if self.address is None:  # the empty netmask Lua's newNetmask returns on bad input
            object.__setattr__(self, "_version", 0)
            object.__setattr__(self, "_key", 0)
            return
        version = self.address.ip.version
        width = _width(version)
        if not 0 <= self.bits <= width:
            raise ValueError(f"netmask bits must be 0..{width} for IPv{version}, got {self.bits}")
        object.__setattr__(self, "_version", version)
        object.__setattr__(self, "_key", int(self.address.ip) >> (width - self.bits))

    @classmethod
    def parse(cls, text: str) -> "Netmask":
        """`addr[/bits]`; bits beyond the family's width are an error rather than the C++
        silent clamp, because `10.0.0.0/88` is a typo the operator wants to hear about."""
        if not isinstance(text, str):
            raise TypeError(f"netmask must be a string, got {type(text).__name__}")
        addr_text, slash, bits_text = text.partition("/")
        ip = _parse_strict_ip(addr_text)
        if ip is None:
            raise AddressError(f"Unable to convert '{addr_text}' to a netmask (in '{text}')")
        width = _width(ip.version)
        if not slash:
            bits = width
        elif _is_decimal(bits_text) and len(bits_text) <= 3 and int(bits_text) <= width:
            bits = int(bits_text)
        else:
            raise ValueError(
                f"Invalid netmask bits '{bits_text}' in '{text}': expected a number 0..{width}"
            )
        return cls(ComboAddress(ip), bits)

    @classmethod
    def from_address(cls, ca: ComboAddress, bits: int) -> "Netmask":
        """Lua's `newNetmaskFromCA`: 255 (or anything above the width) means the whole address."""
        if not isinstance(ca, ComboAddress):
            raise TypeError(f"expected a ComboAddress, got {type(ca).__name__}")
        if isinstance(bits, float) and bits.is_integer():  # Lua numbers arrive as floats
            bits = int(bits)
        if not isinstance(bits, int) or isinstance(bits, bool) or bits < 0:
            raise ValueError(f"netmask bits must be a non-negative integer, got {bits!r}")
        version = ca.ip.version
        # Drop port and scope: a network is neither bound to a port nor to an interface.
        ip = _ip_from_int(version, int(ca.ip))
        return cls(ComboAddress(ip), min(bits, _width(version)))

    @classmethod
    def empty(cls) -> "Netmask":
        """What Lua's `newNetmask` returns for a bad address: matches nothing, prints ""."""
        return cls(None, 0)

    @property
    def is_empty(self) -> bool:
        return self.address is None

    @property
    def version(self) -> int:
        """4 or 6; 0 for the empty netmask."""
        return self._version

    def network(self) -> IPv4Network | IPv6Network:
        """The masked network as an `ipaddress` object, for range queries."""
        if self.address is None:
            raise ValueError("the empty netmask has no network")
        shift = _width(self._version) - self.bits
        first = _ip_from_int(self._version, self._key << shift)
        if self._version == 4:
            return IPv4Network((first, self.bits))
        return IPv6Network((first, self.bits))

    def toStringNetwork(self) -> str:  # noqa: N802 - name fixed by the Lua API
        if self.address is None:
            return ""
        shift = _width(self._version) - self.bits
        first = ComboAddress(_ip_from_int(self._version, self._key << shift))
        return f"{first.tostring()}/{self.bits}"

    def match(self, ca: ComboAddress) -> bool:
        """An IPv4 netmask also matches the IPv4-mapped form of its addresses, so a dual-stack
        listener does not change what a policy's netmask means."""
        if not isinstance(ca, ComboAddress):
            raise TypeError(f"Netmask:match expects a ComboAddress, got {type(ca).__name__}")
        value = int(ca.ip)
        version = ca.ip.version
        if version == 6 and self._version == 4 and (value >> 32) == _MAPPED_PREFIX:
            value &= _V4_MASK
            version = 4
        if version != self._version:
            return False
        return value >> (_width(version) - self.bits) == self._key

    def __str__(self) -> str:
        if self.address is None:
            return ""
        return f"{self.address.tostring()}/{self.bits}"


# --------------------------------------------------------------------------------------------
# NetmaskGroup


# One family's table: (shift, {network >> shift: allow}) pairs, longest prefix first.
_Order = tuple[tuple[int, dict[int, bool]], ...]


def _lookup(order: _Order, value: int) -> bool | None:
    for shift, networks in order:
        allow = networks.get(value >> shift)
        if allow is not None:
            return allow
    return None


def _text_to_family_int(text: str) -> tuple[int, int] | None:
    """A peer address as the HTTP server reports it (may carry `%scope`)."""
    try:
        if ":" in text:
            return 6, int.from_bytes(_inet_pton(_AF_INET6, text.partition("%")[0]), "big")
        return 4, int.from_bytes(_inet_pton(_AF_INET, text), "big")
    except (OSError, ValueError):
        return None


class NetmaskGroup:
    """An ordered allow/deny list with longest-prefix semantics (the ACL, and Lua's
    `newNetmaskGroup`).

    Lookups are lock-free because the ACL is checked on the event loop while the console may change
    it from a Lua worker thread: readers only do `dict.get` (atomic) and iterate a tuple that
    writers replace whole, so a reader sees the old or the new entry, never a half-updated table.
    """

    #: What the Lua object of this class offers (trackalert.lua.values builds it; a test checks).
    LUA_METHODS: ClassVar[frozenset[str]] = frozenset({"addMask", "match", "size", "clear"})

    def __init__(self, masks: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._tables: dict[int, dict[int, dict[int, bool]]] = {4: {}, 6: {}}
        self._v4: _Order = ()
        self._v6: _Order = ()
        # (version, bits, key) -> (text as given, allow); insertion order is showACL's order.
        self._entries: dict[tuple[int, int, int], tuple[str, bool]] = {}
        for mask in masks:
            self.addMask(mask)

    # -- Lua API ---------------------------------------------------------------------------

    def addMask(self, text: str) -> None:  # noqa: N802 - name fixed by the Lua API
        """`!` marks a deny entry. Re-adding a network replaces it (and moves it last), which is
        how the default ACL overrides a config's `!10.0.0.0/8`."""
        if not isinstance(text, str):
            raise TypeError(f"addMask expects a string, got {type(text).__name__}")
        allow = not text.startswith("!")
        self.add(Netmask.parse(text if allow else text[1:]), allow)

    def match(self, ca: ComboAddress) -> bool:
        if not isinstance(ca, ComboAddress):
            raise TypeError(f"NetmaskGroup:match expects a ComboAddress, got {type(ca).__name__}")
        return self.match_ip(ca.ip)

    def size(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._tables = {4: {}, 6: {}}
            self._v4 = ()
            self._v6 = ()
            self._entries = {}

    # -- Python API ------------------------------------------------------------------------

    def add(self, netmask: Netmask, allow: bool = True) -> None:
        if netmask.is_empty:
            raise ValueError("cannot add the empty netmask to a NetmaskGroup")
        version, bits, key = netmask.version, netmask.bits, netmask._key
        text = str(netmask) if allow else f"!{netmask}"
        with self._lock:
            by_len = self._tables[version]
            networks = by_len.get(bits)
            if networks is None:
                by_len[bits] = {key: allow}
                self._publish(version)
            else:
                networks[key] = allow  # a single dict store: readers' dict.get stays consistent
            self._entries.pop((version, bits, key), None)
            self._entries[(version, bits, key)] = (text, allow)

    def _publish(self, version: int) -> None:
        by_len = self._tables[version]
        width = _width(version)
        order = tuple((width - bits, by_len[bits]) for bits in sorted(by_len, reverse=True))
        if version == 4:
            self._v4 = order
        else:
            self._v6 = order

    def match_ip(self, ip: IPAddress | str) -> bool:
        """The per-request ACL check. An IPv4-mapped address is matched against the IPv4 entries
        first (unlike the C++ daemon, a dual-stack listener must not lock out 127.0.0.1) and only
        falls back to the IPv6 entries, e.g. `::ffff:0:0/96`, when no IPv4 entry covers it.

        A string that is not an IP address (e.g. the empty peer name of a Unix socket) is not in
        any group: the answer is False rather than an exception in the request path."""
        kind = type(ip)
        if kind is IPv4Address:
            return _lookup(self._v4, int(ip)) or False
        if kind is IPv6Address:
            value = int(ip)
        elif kind is str:
            parsed = _text_to_family_int(ip)  # type: ignore[arg-type]
            if parsed is None:
                return False
            version, value = parsed
            if version == 4:
                return _lookup(self._v4, value) or False
        else:
            raise TypeError(f"expected an IP address, got {kind.__name__}")
        if (value >> 32) == _MAPPED_PREFIX:
            allow = _lookup(self._v4, value & _V4_MASK)
            if allow is not None:
                return allow
        return _lookup(self._v6, value) or False

    def entries(self) -> list[str]:
        """As `showACL()` prints them: insertion order, deny entries prefixed with `!`."""
        return [text for text, _allow in list(self._entries.values())]

    def copy(self) -> "NetmaskGroup":
        """An independent snapshot, e.g. to check a request against the ACL as it was."""
        clone = NetmaskGroup()
        with self._lock:
            clone._tables = {
                version: {bits: dict(nets) for bits, nets in by_len.items()}
                for version, by_len in self._tables.items()
            }
            clone._entries = dict(self._entries)
        clone._publish(4)
        clone._publish(6)
        return clone

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"NetmaskGroup({self.entries()!r})"
