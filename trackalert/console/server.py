"""The control socket: encrypted console connections on TCP (reference §9.2).

Per connection: read the client's 24-byte nonce, send ours, then answer each framed request with
one framed reply. A message that fails to authenticate means the client has another key (or is
not a console client): it is logged and the connection closed before anything is executed. There
is no ACL on the control socket, as in the original: the key is the access control.

Our own client opens with `protocol.HELLO`; on such connections long messages are chunked (see
`protocol`) and expression values are shown (see `executor`). A reply too long for one frame on
any other connection (the C++ client) is replaced by a clear error instead of the C++ daemon's
corrupted length.

Unlike the C++ daemon, the socket has limits (`Settings.console`, see `limits`): a bounded number
of connections, and timeouts on the nonce exchange, on a frame that has begun, on the wait for
the first (authenticating) command and, much longer, between an operator's commands. The wire
protocol is unchanged: a refused or timed-out peer just sees the connection close, as it would
with a wrong key.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Awaitable, TypeVar

from trackalert import log
from trackalert.netaddr import endpoint_text
from trackalert.console.protocol import (
    HELLO,
    HELLO_REPLY,
    LENGTH_SIZE,
    MAX_TEXT,
    NONCE_SIZE,
    Channel,
    DecryptError,
    ProtocolError,
    frame_length,
    key_problem,
    random_nonce,
    too_long_reply,
)
from trackalert.console.limits import ConnectionTable, LogThrottle, Slot
from trackalert.netaddr import ComboAddress

if TYPE_CHECKING:
    from trackalert.console.executor import CommandExecutor
    from trackalert.lua.host import Host

T = TypeVar("T")

#: A chunked request larger than this is refused (only an authenticated client can send one).
MAX_REQUEST = 16 * 1024 * 1024
#: Room for a burst of connects: with the C++ daemon's 5, a flood of idle connections kept an
#: operator's connect waiting in the kernel's queue (SYN retries, seconds) instead of admitted.
LISTEN_BACKLOG = 128


class ConsoleTimeout(ProtocolError):
    """The peer did not send what the protocol expects in time."""


async def within(operation: Awaitable[T], seconds: float, what: str) -> T:
    """`operation`, or `ConsoleTimeout` naming `what` after `seconds` (0: no limit)."""
    if seconds <= 0:
        return await operation
    try:
        return await asyncio.wait_for(operation, seconds)
    except asyncio.TimeoutError:
        raise ConsoleTimeout(f"no {what} within {seconds:g} s") from None


def bind_control_socket(address: ComboAddress) -> socket.socket:
    """Bind and listen now, so a busy port is a start-up error (before any fork)."""
    family = socket.AF_INET6 if address.isIPv6() else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((address.tostring(), address.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(f"Unable to bind to control socket on {address}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def bind_control_sockets(addresses: list[ComboAddress]) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        for address in addresses:
            sockets.append(bind_control_socket(address))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def format_address(sockaddr: tuple) -> str:
    return endpoint_text(*sockaddr[:2])


class ControlServer:
    def __init__(self, host: "Host", executor: "CommandExecutor") -> None:
        self._host = host
        self._executor = executor
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._table = ConnectionTable(lambda: self._host.settings.console.max_conns)
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._log: dict[str, LogThrottle] = {}

    def _throttle(self, kind: str, what: str, level: int = logging.INFO) -> LogThrottle:
        """The throttled log of one kind of connection event."""
        if kind not in self._log:
            self._log[kind] = LogThrottle(self._host.clock, what, level)
        return self._log[kind]

    async def start(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            await self.add(sock)

    async def add(self, sock: socket.socket) -> None:
        server = await asyncio.start_server(self._serve, sock=sock)
        self._servers.append(server)
        log.notice(f"Accepting control connections on {format_address(sock.getsockname())}")

    def addresses(self) -> list[str]:
        """`ip:port` of every control socket, ephemeral ports resolved."""
        return [format_address(s.getsockname()) for server in self._servers for s in server.sockets]

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let a running command deliver its reply (`shutdown()` answers), close."""
        for server in self._servers:
            server.close()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.logger.warning("A console command is still running; closing its connection")
        for task in list(self._connections):
            task.cancel()
        for throttle in self._log.values():
            throttle.flush()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = format_address(writer.get_extra_info("peername"))
        slot = Slot(peer, task)
        if not self._admit(slot):
            writer.close()
            return
        self._connections.add(task)
        self._throttle("connected", "control connections made").log("Got control connection from %s", peer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            await self._session(reader, writer, slot)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        except asyncio.CancelledError:
            # stop() cancels idle connections, and a newcomer evicts an unauthenticated one.
            # Ending quietly matters: asyncio's start_server callback would report a cancelled
            # task as an unhandled exception.
            pass
        finally:
            self._throttle("closed", "control connections closed").log("Closed control connection from %s", peer)
            writer.close()
            self._table.release(task)
            self._connections.discard(task)

    def _admit(self, slot: Slot) -> bool:
        admitted, evicted = self._table.admit(slot)
        limit = self._host.settings.console.max_conns
        if not admitted:
            self._throttle("refused", "control connections refused", logging.WARNING).log(
                "Refusing control connection from %s: all %d console connections are in use by "
                "authenticated sessions (setMaxConsoleConns)", slot.peer, limit,
            )
        elif evicted is not None:
            self._throttle("evicted", "unauthenticated control connections closed", logging.WARNING).log(
                "Closing control connection from %s, which has not authenticated, to admit %s: "
                "all %d console connections are in use (setMaxConsoleConns)", evicted.peer, slot.peer, limit,
            )
            evicted.task.cancel()
        return admitted

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slot: Slot) -> None:
        peer = slot.peer
        key = self._host.settings.console_key
        problem = key_problem(key)
        if problem is not None:
            self._throttle("nokey", "control connections refused for want of a key", logging.ERROR).log(
                "Refusing control connection from %s: %s", peer, problem
            )
            return
        assert key is not None
        limits = self._host.settings.console
        try:
            client_nonce = await within(reader.readexactly(NONCE_SIZE), limits.handshake_timeout, "client nonce")
        except ConsoleTimeout as exc:
            self._timed_out(peer, exc)
            return
        server_nonce = random_nonce()
        writer.write(server_nonce)
        channel = Channel.for_server(key, client_nonce, server_nonce)
        while True:
            wait = limits.idle_timeout if slot.authenticated else limits.unauthenticated_timeout
            try:
                request = await self._read_message(reader, channel, wait)
            except DecryptError as exc:
                self._throttle("decrypt", "undecryptable control commands", logging.ERROR).log(
                    "Could not decrypt client command: %s", exc
                )
                return
            except ConsoleTimeout as exc:
                self._timed_out(peer, exc)
                return
            except ProtocolError as exc:
                log.logger.error("Control connection from %s: %s", peer, exc)
                return
            text = request.decode("utf-8", "replace")
            first, slot.authenticated = not slot.authenticated, True  # it decrypted: the key is proved
            if first and text == HELLO:
                writer.write(channel.seal_message(HELLO_REPLY.encode()))
                channel.chunked = True
            else:
                await self._answer(writer, channel, text, peer)

    def _timed_out(self, peer: str, exc: ConsoleTimeout) -> None:
        self._throttle("timeout", "control connections timed out").log(
            "Closing control connection from %s: %s (setConsoleTimeouts)", peer, exc
        )

    async def _read_message(self, reader: asyncio.StreamReader, channel: Channel, wait: float) -> bytes:
        """One message; `wait` bounds the wait for its first byte, the frame timeout the rest."""
        frame_timeout = self._host.settings.console.frame_timeout
        first = await within(reader.readexactly(1), wait, "command")
        pieces: list[bytes] = []
        size = 0
        while True:
            rest = await within(reader.readexactly(LENGTH_SIZE - len(first)), frame_timeout, "complete frame")
            length = frame_length(first + rest)
            piece = channel.open(await within(reader.readexactly(length), frame_timeout, "complete frame"))
            first = b""
            if not channel.chunked:
                return piece
            pieces.append(piece)
            size += len(piece)
            if size > MAX_REQUEST:
                raise ProtocolError(f"a request longer than {MAX_REQUEST} bytes was refused")
            if len(piece) < MAX_TEXT:
                return b"".join(pieces)

    async def _answer(self, writer: asyncio.StreamWriter, channel: Channel, text: str, peer: str) -> None:
        self._busy += 1
        self._idle.clear()
        try:
            # an announced client is ours: it shows values (see executor)
            reply = (await self._executor.execute(text, show_values=channel.chunked)).wire_text
            if not channel.chunked and len(reply) > MAX_TEXT:
                log.logger.warning(
                    "A console reply of %d bytes does not fit in one message for %s (a client "
                    "without chunked replies); it got an error message instead", len(reply), peer,
                )
                reply = too_long_reply(len(reply)).encode()
            writer.write(channel.seal_message(reply))
            await writer.drain()
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()
