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
from typing import Any, Callable

from trackalert.report import Report

_LENGTH = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024

# worker -> core
HELLO = 1  # (HELLO, pid)
APPEND = 2  # (APPEND, request id, report fields, delivery id, body fingerprint)
STATS = 3  # (STATS, {...}) see frontend.worker.StatsBuffer
# core -> worker
SETTINGS = 10  # (SETTINGS, {...}) see frontend.supervisor.settings_snapshot
APPENDED = 11  # (APPENDED, request id, seq, duplicate, error text or None)


def encode(message: tuple[Any, ...]) -> bytes:
    payload = marshal.dumps(message)
    return _LENGTH.pack(len(payload)) + payload


class Channel(asyncio.Protocol):
    """One end of the socketpair, built for thousands of small messages a second.

    Every complete frame of a read is handled in one pass (no await per message), and messages
    sent during one event-loop iteration leave in one write: without that, each report would
    cost a system call for its append and another for its acknowledgement.
    """

    def __init__(self, on_message: Callable[[tuple[Any, ...]], None]) -> None:
        self._on_message = on_message
        self._buffer = bytearray()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, size = 0, len(buffer)
        while size - offset >= 4:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if length > MAX_FRAME:
                self.close()
                return
            end = offset + 4 + length
            if end > size:
                break
            self._on_message(marshal.loads(buffer[offset + 4:end]))
            offset = end
        if offset:
            del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.closed.set()

    def send(self, message: tuple[Any, ...]) -> None:
        if self._transport is None:
            return
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(encode(message))

    def _flush(self) -> None:
        if self._transport is not None and self._outgoing:
            self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
            self._transport.close()


def report_from_fields(fields: tuple[Any, ...]) -> Report:
    return Report(*fields)


def inherit_env() -> dict[str, str]:
    """The environment for a worker: ours, without systemd's notify socket (only the core
    speaks to systemd)."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return env


async def open_channel(sock: socket.socket, on_message: Callable[[tuple[Any, ...]], None]) -> Channel:
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_connection(lambda: Channel(on_message), sock=sock)
    return channel
