"""The channel between the core process and its web workers.

Frames are a 4-byte big-endian length and a `marshal` payload. marshal is the fastest way to move
tuples of builtins between two processes running the same interpreter (a report's fields cross in
~1 µs each way, a pickled dataclass costs ~5 µs). marshal must never read untrusted bytes, so the
channel is a `socketpair` made by the core for each worker it spawns: there is no address anyone
else could connect to.
"""

from __future__ import annotations

import asyncio
import marshal
import os
import socket
import struct
from typing import Any

from trackalert.report import Report

_LENGTH = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024

# worker -> core
HELLO = 1  # (HELLO, pid)
APPEND = 2  # (APPEND, request id, report fields, delivery id)
STATS = 3  # (STATS, {...}) see frontend.worker.StatsBuffer
# core -> worker
SETTINGS = 10  # (SETTINGS, {...}) see frontend.supervisor.settings_snapshot
APPENDED = 11  # (APPENDED, request id, seq, duplicate, error text or None)


def encode(message: tuple[Any, ...]) -> bytes:
    payload = marshal.dumps(message)
    return _LENGTH.pack(len(payload)) + payload


async def read_message(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message, or None when the other side has gone."""
    try:
        header = await reader.readexactly(4)
        (length,) = _LENGTH.unpack(header)
        if length > MAX_FRAME:
            raise ValueError(f"IPC frame of {length} bytes")
        return marshal.loads(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


def report_from_fields(fields: tuple[Any, ...]) -> Report:
    return Report(*fields)


def inherit_env() -> dict[str, str]:
    """The environment for a worker: ours, without systemd's notify socket (only the core
    speaks to systemd)."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return env


async def open_channel(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock, limit=MAX_FRAME)
