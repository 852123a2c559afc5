"""Addresses as sortable bytes, so that an address or a whole network is one index range.

A version tag in front keeps IPv4 and IPv6 apart (SQLite compares blobs with memcmp, then by
length, so without it an IPv6 address could fall inside an IPv4 range).
"""

from __future__ import annotations

import functools
import ipaddress

V4, V6 = b"\x04", b"\x06"


@functools.lru_cache(maxsize=65536)
def ip_key(remote: str) -> bytes | None:
    """The key of a stored `remote` (normalised address text); None if it is not an address."""
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return None
    return (V4 if ip.version == 4 else V6) + ip.packed


def network_range(text: str) -> tuple[bytes, bytes]:
    """The (lowest, highest) keys of a network ``"192.0.2.0/24"`` (host bits are ignored)."""
    network = ipaddress.ip_network(text, strict=False)
    tag = V4 if network.version == 4 else V6
    return tag + network.network_address.packed, tag + network.broadcast_address.packed


def prefix_text(key: bytes, bits: int) -> str:
    """The network of `bits` bits containing the address of `key`, as ``"a.b.c.0/24"``."""
    version = 4 if key[:1] == V4 else 6
    address = ipaddress.ip_address(key[1:])
    bits = min(bits, 32 if version == 4 else 128)
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))
