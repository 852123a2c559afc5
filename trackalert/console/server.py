"""The control socket: encrypted console connections on TCP (reference §9.2).

Per connection: read the client's 24-byte nonce, send ours, then answer each framed request with
one framed reply. A message that fails to authenticate means the client has another key (or is
not a console client): it is logged and the connection closed before anything is executed. There
is no ACL on the control socket, as in the original: the key is the access control.

Our own client opens with `protocol.HELLO`; on such connections long messages are chunked (see
`protocol`). A reply too long for one frame on any other connection (the C++ client) is replaced
by a clear error instead of the C++ daemon's corrupted length.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

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
from trackalert.netaddr import ComboAddress

if TYPE_CHECKING:
    from trackalert.console.executor import CommandExecutor
    from trackalert.lua.host import Host

#: A chunked request larger than this is refused (only an authenticated client can send one).
MAX_REQUEST = 16 * 1024 * 1024
LISTEN_BACKLOG = 5


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
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

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
        await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = format_address(writer.get_extra_info("peername"))
        log.logger.info("Got control connection from %s", peer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            await self._session(reader, writer, peer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        except asyncio.CancelledError:
            # stop() cancels idle connections. Ending quietly matters: asyncio's start_server
            # callback would report a cancelled task as an unhandled exception.
            pass
        finally:
            log.logger.info("Closed control connection from %s", peer)
            writer.close()
            self._connections.discard(task)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        key = self._host.settings.console_key
        problem = key_problem(key)
        if problem is not None:
            log.logger.error("Refusing control connection from %s: %s", peer, problem)
            return
        assert key is not None
        client_nonce = await reader.readexactly(NONCE_SIZE)
        server_nonce = random_nonce()
        writer.write(server_nonce)
        channel = Channel.for_server(key, client_nonce, server_nonce)
        first = True
        while True:
            try:
                request = await self._read_message(reader, channel)
            except DecryptError as exc:
                log.logger.error("Could not decrypt client command: %s", exc)
                return
            except ProtocolError as exc:
                log.logger.error("Control connection from %s: %s", peer, exc)
                return
            text = request.decode("utf-8", "replace")
            if first and text == HELLO:
                writer.write(channel.seal_message(HELLO_REPLY.encode()))
                channel.chunked = True
            else:
                await self._answer(writer, channel, text, peer)
            first = False

    async def _read_message(self, reader: asyncio.StreamReader, channel: Channel) -> bytes:
        pieces: list[bytes] = []
        size = 0
        while True:
            length = frame_length(await reader.readexactly(LENGTH_SIZE))
            piece = channel.open(await reader.readexactly(length))
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
            reply = (await self._executor.execute(text)).wire_text
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
