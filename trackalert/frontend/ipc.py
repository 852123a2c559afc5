"""The channel between the core process and its web workers.

Frames are a 4-byte big-endian length and a `marshal` payload. marshal is the fastest way to move
tuples of builtins between two processes running the same interpreter (a report's fields cross in
~1 µs each way, a pickled dataclass costs ~5 µs). marshal must never read untrusted bytes, so the
channel is a `socketpair` made by the core for each worker it spawns: there is no address anyone
else could connect to.

The messages sent during one event-loop iteration leave as one frame, `(BATCH, [messages])`:
one marshal call each way for all of them instead of one per message and frame. A receiver can
take each read's messages together (`on_batch`): the core appends all the reports of one read as
one group, with one callback for all of them instead of futures and callbacks per report.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import marshal
import os
import socket
import struct
from typing import Any, Callable, Coroutine

import trackalert
from trackalert import log

_LENGTH = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024

logger = logging.getLogger("trackalert")

# both ways
BATCH = 0  # (BATCH, [message, ...]): the messages of one flush, in order
# worker -> core
HELLO = 1  # (HELLO, pid)
#: (APPEND, request id, payload, delivery id, body fingerprint); the payload is what
#: trackalert.ingest.Handover makes of the report: its row and maps, or (None, its fields).
APPEND = 2
STATS = 3  # (STATS, {...}) see frontend.worker.StatsBuffer
# core -> worker
SETTINGS = 10  # (SETTINGS, {...}) see frontend.supervisor.settings_snapshot
APPENDED = 11  # (APPENDED, request id, seq, duplicate, error text or None): one that failed
#: (STORED, [request id, ...]): these appends are durable. The answers of one group in one
#: message: a list of ints, not a 5-tuple per report to build, marshal, unmarshal and dispatch
#: on both sides (0.80 against 0.08 µs a report for a group of 128, measured in one run).
STORED = 12


def encode(message: tuple[Any, ...]) -> bytes:
    payload = marshal.dumps(message)
    return _LENGTH.pack(len(payload)) + payload


#: Most messages one BATCH frame carries (a flush of more leaves as several frames).
BATCH_LIMIT = 1024


def encode_many(messages: list[tuple[Any, ...]]) -> bytes:
    """The frames for the messages of one flush: BATCH frames of up to BATCH_LIMIT messages,
    each under MAX_FRAME (a batch over it is halved); a lone message as a plain frame. A message
    marshal refuses is dropped, and logged, alone."""
    out: list[bytes] = []
    for start in range(0, len(messages), BATCH_LIMIT):
        _encode_batch(messages[start:start + BATCH_LIMIT], out)
    return b"".join(out)


def _encode_batch(messages: list[tuple[Any, ...]], out: list[bytes]) -> None:
    if len(messages) > 1:
        try:
            frame = encode((BATCH, messages))
        except ValueError:
            frame = b""
        if frame and len(frame) - _LENGTH.size <= MAX_FRAME:
            out.append(frame)
            return
        middle = len(messages) // 2
        _encode_batch(messages[:middle], out)
        _encode_batch(messages[middle:], out)
        return
    try:
        out.append(encode(messages[0]))
    except ValueError as exc:
        logger.error("IPC: cannot send a message of kind %r: %s", messages[0][0], exc)


class Channel(asyncio.Protocol):
    """One end of the socketpair, built for thousands of small messages a second.

    Every complete frame of a read is handled in one pass (no await per message), and messages
    sent during one event-loop iteration leave in one write and one frame: without that, each
    report would cost a system call and a marshal call for its append and again for its
    acknowledgement.
    """

    def __init__(
        self, on_message: Callable[[tuple[Any, ...]], None],
        on_batch: Callable[[list[tuple[Any, ...]]], None] | None = None,
    ) -> None:
        self._on_message = on_message
        self._on_batch = on_batch
        self._buffer = bytearray()
        self._outgoing: list[tuple[Any, ...]] = []
        self._transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, size = 0, len(buffer)
        received: list[tuple[Any, ...]] = []
        while size - offset >= 4:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if length > MAX_FRAME:
                self.close()
                return
            end = offset + 4 + length
            if end > size:
                break
            message = marshal.loads(buffer[offset + 4:end])
            if message[0] == BATCH:
                received.extend(message[1])
            else:
                received.append(message)
            offset = end
        if offset:
            del buffer[:offset]
        if not received:
            return
        if self._on_batch is not None:
            self._on_batch(received)
            return
        on_message = self._on_message
        for message in received:
            on_message(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.closed.set()

    def send(self, message: tuple[Any, ...]) -> None:
        if self._transport is None:
            return
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(message)

    def _flush(self) -> None:
        if self._transport is not None and self._outgoing:
            self._transport.write(encode_many(self._outgoing))
        self._outgoing = []

    def close(self) -> None:
        if self._transport is not None:
            self._flush()
            self._transport.close()


def inherit_env() -> dict[str, str]:
    """The environment for a worker: ours, without systemd's notify socket (only the core
    speaks to systemd), and with the directory our own `trackalert` package was imported from
    first on PYTHONPATH, so a child runs the same code as its core even when the interpreter
    would find another copy (bench/compare.py runs an older checkout with this venv)."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    ours = os.path.dirname(os.path.dirname(os.path.abspath(trackalert.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([ours, *filter(None, [env.get("PYTHONPATH")])])
    return env


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    """The logging options a child process is started with (supervisor.LogOptions.arguments),
    so that web workers and the policy process log as the core does."""
    parser.add_argument("--loglevel", type=int, default=6)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--timestamps", action="store_true")
    parser.add_argument("--console", action="store_true")
    parser.add_argument("--facility", default="daemon")


def run_child(args: argparse.Namespace, serve: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]) -> int:
    """A child process's main: its logging from `add_log_arguments`' options, then `serve` on
    uvloop (asyncio where uvloop is missing)."""
    log.configure(
        level=args.loglevel, verbose=args.verbose, console=args.console,
        timestamps=args.timestamps, facility=args.facility,
    )
    try:
        import uvloop

        return uvloop.run(serve(args))
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(serve(args))


async def open_channel(
    sock: socket.socket, on_message: Callable[[tuple[Any, ...]], None],
    on_batch: Callable[[list[tuple[Any, ...]]], None] | None = None,
) -> Channel:
    """The channel over `sock`: every message to `on_message`, or each read's messages together
    to `on_batch` when given."""
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_connection(lambda: Channel(on_message, on_batch), sock=sock)
    return channel
