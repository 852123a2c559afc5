"""`trackalert -c` and `trackalert -e`: the console client (reference §9.4).

The client runs the config once in a client state, only to learn `controlSocket` (where to
connect; 127.0.0.1:4005 without one, as the C++ client) and `setKey`, then talks the libsodium
build's protocol to our daemon or to the C++ one. After the nonce exchange it announces itself
(`protocol.HELLO`): our daemon then chunks long replies, the C++ daemon runs the Lua comment as a
no-op. That first round trip also proves the key: a daemon with another key drops the connection,
which we report at once instead of at the first command.

Unlike the C++ client, every failure (no daemon, wrong key, lost connection) is a message on
stderr and a non-zero exit status, and `-e` prints only the reply on stdout, so scripts can use it.
`makeKey()` given to `-e` is answered locally: making a key needs no daemon.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from typing import IO, TYPE_CHECKING

from trackalert import log
from trackalert.console.protocol import (
    DEFAULT_CLIENT_ADDRESS,
    HELLO,
    HELLO_REPLY,
    LENGTH_SIZE,
    MAX_TEXT,
    NONCE_SIZE,
    Channel,
    DecryptError,
    frame_length,
    key_problem,
    make_key_command,
    random_nonce,
)
from trackalert.netaddr import ComboAddress, parse_combo

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession

CONNECT_TIMEOUT = 10.0
#: Bounds the nonce exchange and the announcement; commands themselves may take their time.
HANDSHAKE_TIMEOUT = 30.0
_MAKE_KEY = re.compile(r"^\s*(return\s+)?makeKey\s*\(\s*\)\s*;?\s*$")


class ConsoleError(Exception):
    """A console failure, worded for the operator."""


class ConnectionClosed(ConsoleError):
    pass


class ConsoleConnection:
    """A blocking connection to a control socket, one command at a time."""

    def __init__(self, sock: socket.socket, channel: Channel, address: str) -> None:
        self._sock = sock
        self.channel = channel
        self.address = address

    @classmethod
    def open(
        cls,
        address: ComboAddress,
        key: bytes | None,
        timeout: float | None = None,
        announce: bool = True,
    ) -> "ConsoleConnection":
        """Connect, exchange nonces and (with `announce`) negotiate chunked replies.

        `timeout` bounds each wait for the daemon; None waits as long as a command runs.
        """
        problem = key_problem(key)
        if problem is not None:
            raise ConsoleError(f"Cannot use the console: {problem}")
        assert key is not None
        try:
            sock = socket.create_connection((address.tostring(), address.port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise ConsoleError(
                f"Cannot connect to the console at {address}: {exc.strerror or exc} (is trackalert "
                "running with this controlSocket?)"
            ) from None
        sock.settimeout(HANDSHAKE_TIMEOUT)  # something that is not a console must not hang us
        ours = random_nonce()
        connection = cls(sock, Channel(key, ours, ours), str(address))  # real nonces below
        try:
            connection._send(ours)
            theirs = connection._receive(NONCE_SIZE)
            connection.channel = Channel.for_client(key, ours, theirs)
            if announce and connection.command(HELLO) == HELLO_REPLY:
                connection.channel.chunked = True
        except ConsoleError:
            connection.close()
            raise
        sock.settimeout(timeout)
        return connection

    def command(self, text: str) -> str:
        """Send one Lua chunk, return the reply text."""
        data = text.encode("utf-8")
        if not self.channel.chunked and len(data) > MAX_TEXT:
            raise ConsoleError(
                f"The command is {len(data)} bytes long; this daemon takes at most {MAX_TEXT} per command"
            )
        self._send(self.channel.seal_message(data))
        return self._read_message().decode("utf-8", "replace")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "ConsoleConnection":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _read_message(self) -> bytes:
        pieces: list[bytes] = []
        while True:
            ciphertext = self._receive(frame_length(self._receive(LENGTH_SIZE)))
            try:
                piece = self.channel.open(ciphertext)
            except DecryptError as exc:
                raise ConsoleError(
                    f"{exc}: the reply from {self.address} did not authenticate (another key, or "
                    "a reply longer than the C++ daemon can send)"
                ) from None
            pieces.append(piece)
            if not self.channel.chunked or len(piece) < MAX_TEXT:
                return b"".join(pieces)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise self._closed(exc) from None

    def _receive(self, size: int) -> bytes:
        chunks: list[bytes] = []
        remaining = size
        while remaining:
            try:
                chunk = self._sock.recv(min(remaining, 1 << 20))
            except socket.timeout:
                raise ConsoleError(f"No answer from the console at {self.address}") from None
            except OSError as exc:
                raise self._closed(exc) from None
            if not chunk:
                raise self._closed(None)
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _closed(self, exc: OSError | None) -> ConnectionClosed:
        why = f" ({exc.strerror or exc})" if exc is not None else ""
        return ConnectionClosed(
            f"The console at {self.address} closed the connection{why}: the console key (setKey) "
            "is probably not the daemon's, the daemon stopped, all its console connections are in "
            "use (setMaxConsoleConns) or the session waited too long (setConsoleTimeouts); its "
            "log says which"
        )


# ---- the command line ---------------------------------------------------------------------


def client_settings(config_file: str) -> tuple[ComboAddress, bytes | None]:
    """Run the config in a client state: (address to connect to, key)."""
    from trackalert.lua.host import Host
    from trackalert.lua.state import LuaError, LuaState, StateKind

    host = Host()
    state = LuaState(StateKind.CLIENT, host)
    try:
        state.run_file(config_file, os.path.basename(config_file))
    except OSError:
        log.logger.warning("Unable to read configuration from '%s'", config_file)
    except LuaError as exc:
        raise ConsoleError(f"Error in the configuration {config_file}: {exc}") from None
    sockets = host.settings.control_sockets
    address = sockets[-1] if sockets else parse_combo(DEFAULT_CLIENT_ADDRESS)
    return address, host.settings.console_key


def is_make_key(command: str) -> bool:
    return bool(_MAKE_KEY.match(command))


def run_client(config_file: str, command: str | None, stdout: IO[str] = sys.stdout) -> int:
    """`-e command` when `command` is given, else the interactive console; the exit status."""
    if command is not None and is_make_key(command):
        stdout.write(make_key_command() + "\n")  # as the daemon's reply would print
        return 0
    try:
        address, key = client_settings(config_file)
        if command is not None:
            with ConsoleConnection.open(address, key) as connection:
                reply = connection.command(command)
            stdout.write(reply + "\n")
            stdout.flush()
            return 0
        stdout.write(f"Connecting to {address}\n")
        stdout.flush()
        with ConsoleConnection.open(address, key) as connection:
            return _interactive(connection, stdout)
    except ConsoleError as exc:
        stdout.flush()
        sys.stderr.write(f"trackalert: {exc}\n")
        return 1


def _interactive(connection: ConsoleConnection, stdout: IO[str]) -> int:
    if not sys.stdin.isatty():
        return _from_pipe(connection, sys.stdin, stdout)
    from trackalert.console.repl import QUIT, history_path, make_session

    session: PromptSession[str] = make_session(history_path())
    while True:
        try:
            text = session.prompt()
        except KeyboardInterrupt:
            continue  # discard the input, as ptpython does
        except EOFError:
            return 0
        if text.strip() == QUIT:
            return 0
        try:
            reply = connection.command(text)
        except KeyboardInterrupt:
            sys.stderr.write("trackalert: interrupted while the daemon ran the command; it may still run\n")
            return 130
        stdout.write(reply + "\n")
        stdout.flush()


def _from_pipe(connection: ConsoleConnection, stdin: IO[str], stdout: IO[str]) -> int:
    """Commands on a pipe (`trackalert -c < commands.lua`): chunks as the prompt would cut them."""
    from trackalert.console.repl import QUIT, should_accept

    pending: list[str] = []
    for line in stdin:
        if not pending and not line.strip():
            continue
        pending.append(line.rstrip("\n"))
        text = "\n".join(pending)
        if not should_accept(text, blank_line_sends=False):
            continue
        pending.clear()
        if text.strip() == QUIT:
            return 0
        stdout.write(connection.command(text) + "\n")
        stdout.flush()
    if pending and any(line.strip() for line in pending):
        stdout.write(connection.command("\n".join(pending)) + "\n")
    return 0
