"""How a console command runs, and what it answers (reference §1.1, §9.3).

A command is a Lua chunk. It runs in every worker state first (that is how `setReport` or a new
`report` function reaches the states that run policies), then in the config state, whose result is
the reply: a returned string (numbers as Lua prints them), else the console output buffer that
the show*/stats/makeKey functions fill, else an `Error: ...` text. An error in a worker state stops
the command there, as in the C++ daemon.

Lua never runs on the event loop: worker states run in the pool's threads (each under its own
lock, so a report batch and a console command take turns), the config state in a thread of its
own. Commands are serialised — two consoles never interleave in the states or in the output
buffer — and a command is refused, rather than left hanging, while a worker state is stuck in a
call running longer than `setSlowLuaCallSeconds` (LuaJIT cannot interrupt it). A command that
was already waiting for a state when the state got stuck keeps waiting for it.
"""

from __future__ import annotations

import asyncio
import enum
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trackalert.lua.convert import describe, number_text, protected_call
from trackalert.lua.state import LuaError, LuaState, LuaSyntaxError

if TYPE_CHECKING:
    from trackalert.lua.host import Host
    from trackalert.lua.pool import LuaPool

CHUNK_NAME = "console"
#: How often a command waiting for the previous one checks whether a worker state is stuck.
LOCK_POLL_SECONDS = 0.5


class ReplyKind(enum.Enum):
    VALUE = "value"  # the chunk returned a string or a number
    OUTPUT = "output"  # the console output buffer
    ERROR = "error"


@dataclass(frozen=True)
class Reply:
    text: str
    kind: ReplyKind

    @property
    def wire_text(self) -> bytes:
        """What the control socket sends."""
        return self.text.encode("utf-8", "replace")


def error_reply(message: object) -> Reply:
    # The C++ daemon appends ": " and the nested C++ error, which we never have.
    return Reply(f"Error: {message}: ", ReplyKind.ERROR)


def _run_in_locked_state(state: LuaState, code: str) -> None:
    """Run `code` in a worker state whose lock the pool already holds (results are ignored)."""
    loaded = state.lua.globals().loadstring(code, "@" + CHUNK_NAME)
    if isinstance(loaded, tuple):
        raise LuaSyntaxError(loaded[1])
    result = protected_call(state, loaded)
    if not result[0]:
        raise LuaError(str(result[1]))


def run_in_config_state(host: "Host", state: LuaState, code: str) -> Reply:
    """Run `code` in the config state and build the reply (synchronous: call it in a thread)."""
    host.take_console_output()  # start from an empty buffer
    try:
        values = state.execute(code, CHUNK_NAME)
    except (LuaError, LuaSyntaxError) as exc:
        return error_reply(exc)
    except UnicodeDecodeError:
        host.take_console_output()
        return Reply("Command returned an object we can't print: a string that is not UTF-8\n", ReplyKind.ERROR)
    output = host.take_console_output()
    if values and values[0] is not None:
        return _value_reply(values[0])
    return Reply(output, ReplyKind.OUTPUT)


def _value_reply(value: Any) -> Reply:
    if isinstance(value, str):
        return Reply(value, ReplyKind.VALUE)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Reply(number_text(value), ReplyKind.VALUE)
    return Reply(f"Command returned an object we can't print: {describe(value)}\n", ReplyKind.ERROR)


class CommandExecutor:
    def __init__(self, host: "Host", config_state: LuaState, pool: "LuaPool") -> None:
        self._host = host
        self._config_state = config_state
        self._pool = pool
        self._lock = asyncio.Lock()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="console")

    async def execute(self, code: str) -> Reply:
        # Wait for the previous command in short steps: if it waits behind a stuck state, this
        # one is refused instead of queueing forever.
        while True:
            stuck = self._stuck_state()
            if stuck:
                return Reply(stuck, ReplyKind.ERROR)
            try:
                await asyncio.wait_for(self._lock.acquire(), LOCK_POLL_SECONDS)
                break
            except asyncio.TimeoutError:
                continue
        try:
            stuck = self._stuck_state()
            if stuck:
                return Reply(stuck, ReplyKind.ERROR)
            try:
                await self._pool.run_everywhere(lambda state: _run_in_locked_state(state, code))
            except (LuaError, LuaSyntaxError) as exc:
                return error_reply(exc)
            except Exception as exc:  # a Python error in a global: answer it, keep the console
                return error_reply(f"{type(exc).__name__}: {exc}")
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(
                    self._thread, run_in_config_state, self._host, self._config_state, code
                )
            except Exception as exc:
                return error_reply(f"{type(exc).__name__}: {exc}")
        finally:
            self._lock.release()

    def _stuck_state(self) -> str | None:
        limit = self._host.settings.slow_call_seconds
        for busy in self._pool.busy():
            elapsed = self._pool.elapsed(busy)
            if busy.kind != "console" and elapsed >= limit:
                return (
                    f"Error: worker state {busy.index} has been running a {busy.kind} function for "
                    f"{elapsed:.0f} s; the command was not run, so that it does not wait behind it. "
                    "Try again; if the state never frees, restart trackalert.\n"
                )
        return None

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
