"""The console as the daemon runs it: control sockets, the local console and the host hooks.

One object so the daemon needs three lines: bind the sockets before any fork
(`bind_control_sockets`), `start` once the event log and the pool are up, `stop` first on the
way down (so the reply to `shutdown()` is still delivered).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import TYPE_CHECKING, Any, Callable

from trackalert import log
from trackalert.console.executor import CommandExecutor, Elsewhere
from trackalert.console.protocol import key_problem
from trackalert.console.server import ControlServer, bind_control_socket, bind_control_sockets
from trackalert.netaddr import ComboAddress

if TYPE_CHECKING:
    from trackalert.eventlog.base import EventLog
    from trackalert.lua.host import Host
    from trackalert.lua.pool import LuaPool
    from trackalert.lua.state import LuaState

__all__ = ["ConsoleService", "bind_control_sockets"]

#: The longest showEventLog() waits for the event log to describe itself.
SUMMARY_TIMEOUT = 30.0


class ConsoleService:
    def __init__(
        self,
        host: "Host",
        config_state: "LuaState",
        pool: "LuaPool",
        eventlog: "EventLog",
        lag: Callable[[], tuple[int, float]],
        projection: Callable[[], dict[str, Any]] | None = None,
        elsewhere: Elsewhere | None = None,
    ) -> None:
        self.host = host
        self.executor = CommandExecutor(host, config_state, pool, elsewhere)
        self.server = ControlServer(host, self.executor)
        self._eventlog = eventlog
        self._lag = lag
        self._projection = projection
        self._loop: asyncio.AbstractEventLoop | None = None
        self._local: asyncio.Task[None] | None = None

    async def start(self, sockets: list[socket.socket], local_console: bool = False) -> None:
        """Serve the bound control sockets; with `local_console` and a terminal on stdin, also
        the interactive console of a foreground daemon (reference §9.5)."""
        self._loop = asyncio.get_running_loop()
        self.host.eventlog_summary = self._summary
        self.host.on_control_socket = self._add_at_runtime
        await self.server.start(sockets)
        problem = key_problem(self.host.settings.console_key)
        if sockets and problem:
            log.logger.error(
                "The control socket refuses every connection: %s. Add setKey(...) to the config "
                "(trackalert -e 'makeKey()' prints one)", problem,
            )
        if local_console and _stdin_is_terminal():
            from trackalert.console.local import run_local_console  # prompt_toolkit only when used

            self._local = asyncio.create_task(run_local_console(self.executor, self.host), name="local-console")

    async def stop(self) -> None:
        self.host.eventlog_summary = None
        self.host.on_control_socket = lambda address: None
        if self._local is not None:
            self._local.cancel()
            await asyncio.gather(self._local, return_exceptions=True)
        await self.server.stop()
        self.executor.close()

    def _add_at_runtime(self, address: ComboAddress) -> None:
        """`controlSocket()` from the console: bind here (an error reaches the operator as a Lua
        error), then serve it on the loop. Runs in the config state's thread."""
        assert self._loop is not None
        sock = bind_control_socket(address)
        asyncio.run_coroutine_threadsafe(self.server.add(sock), self._loop).result(SUMMARY_TIMEOUT)

    def _summary(self) -> dict[str, Any]:
        """`showEventLog()`'s data; called from the config state's thread, never from the loop."""
        assert self._loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError("the event log summary cannot be computed on the event loop")
        return asyncio.run_coroutine_threadsafe(self._describe(), self._loop).result(SUMMARY_TIMEOUT)

    async def _describe(self) -> dict[str, Any]:
        info = dict(await self._eventlog.describe())
        info["lag_events"], info["lag_seconds"] = self._lag()
        info["retention_seconds"] = self.host.settings.retention_seconds
        if self._projection is not None:
            info["projection"] = self._projection()
        return info


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):  # closed or detached stdin
        return False
