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
was already waiting for a state when the state got stuck keeps waiting for it. Where `report`
runs in a policy process of its own, the command runs in its worker states too, after ours and
before the config state (`elsewhere`), so the console still changes the policy at runtime.

Our clients (those that announced themselves, and the local console) get a prompt that shows
values, as Python's does: a command that is one expression (`countReports{login="alice"}`) runs
as `return (<expression>)`, and a value the C++ console could not print (a table, a boolean) is
shown readably (`display`) after the console output. Whether a command is an expression is
decided by compiling it, never by running it, so it runs exactly once per state either way. The
C++ client keeps the C++ replies, byte for byte.
"""

from __future__ import annotations

import asyncio
import enum
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import lupa.luajit21 as luajit

from trackalert.console.display import show
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


def expression_chunk(compiler: "luajit.LuaRuntime", code: str) -> str | None:
    """`code` as a chunk that returns its value, when `code` is one expression; else None.

    Only compiled here. The parentheses keep one value and, unlike a bare `return f()`, are no
    tail call, so an error inside `f` still points at `console:1`; the newline ends a trailing
    `--` comment. A trailing `;` makes it a statement, which hides the value (as in IPython).
    """
    chunk = f"return ({code}\n)"
    try:
        compiler.compile(chunk)
    except LuaSyntaxError:
        return None
    return chunk


def run_in_config_state(host: "Host", state: LuaState, code: str, show_values: bool = False) -> Reply:
    """Run `code` in the config state and build the reply (synchronous: call it in a thread)."""
    host.take_console_output()  # start from an empty buffer
    try:
        values = state.execute(code, CHUNK_NAME)
        output = host.take_console_output()
        if not values or values[0] is None:
            return Reply(output, ReplyKind.OUTPUT)
        if show_values:
            return _shown_reply(values[0], output, state.values.text_of)
        return _value_reply(values[0])
    except (LuaError, LuaSyntaxError) as exc:
        return error_reply(exc)
    except UnicodeDecodeError:
        host.take_console_output()
        return Reply("Command returned an object we can't print: a string that is not UTF-8\n", ReplyKind.ERROR)


def _value_reply(value: Any) -> Reply:
    """The C++ console's reply to a returned value: strings and numbers only."""
    if isinstance(value, str):
        return Reply(value, ReplyKind.VALUE)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Reply(number_text(value), ReplyKind.VALUE)
    return Reply(f"Command returned an object we can't print: {describe(value)}\n", ReplyKind.ERROR)


def _shown_reply(value: Any, output: str, text_of: Callable[[Any], str | None]) -> Reply:
    """Our console's: a string or a number as the C++ one, anything else shown after the output."""
    reply = _value_reply(value)
    if reply.kind is ReplyKind.VALUE:
        return reply
    if output and not output.endswith("\n"):
        output += "\n"
    return Reply(output + show(value, text_of), ReplyKind.VALUE)


def stuck_state(pool: "LuaPool", limit: float, where: str = "") -> str | None:
    """The reply refusing a command now: a state stuck in a call past `limit` seconds (the
    command would wait behind it forever); None when every state will come free."""
    for busy in pool.busy():
        elapsed = pool.elapsed(busy)
        if busy.kind != "console" and elapsed >= limit:
            return (
                f"Error: worker state {busy.index}{where} has been running a {busy.kind} function for "
                f"{elapsed:.0f} s; the command was not run, so that it does not wait behind it. "
                "Try again; if the state never frees, restart trackalert.\n"
            )
    return None


async def run_in_worker_states(pool: "LuaPool", code: str) -> str | None:
    """Run `code` in every state of `pool`, in turn; the error that stopped it, or None."""
    try:
        await pool.run_everywhere(lambda state: _run_in_locked_state(state, code))
    except (LuaError, LuaSyntaxError) as exc:
        return str(exc)
    except Exception as exc:  # a Python error in a global: answer it, keep the console
        return f"{type(exc).__name__}: {exc}"
    return None


#: Runs a command in the worker states of another process (the policy process): the reply
#: that stopped it there (an error), or None.
Elsewhere = Callable[[str], Awaitable["str | None"]]


async def refusal_in(pool: "LuaPool", limit: float, code: str, where: str) -> str | None:
    """What runs a command for `Elsewhere` in that process: the error reply's text, or None."""
    stuck = stuck_state(pool, limit, where)
    if stuck is not None:
        return stuck
    error = await run_in_worker_states(pool, code)
    return None if error is None else error_reply(error).text


class CommandExecutor:
    def __init__(self, host: "Host", config_state: LuaState, pool: "LuaPool",
                 elsewhere: Elsewhere | None = None) -> None:
        self._host = host
        self._config_state = config_state
        self._pool = pool
        self._elsewhere = elsewhere
        self._lock = asyncio.Lock()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="console")
        #: Compiles commands to tell expressions from statements; used only in `_thread`, and
        #: a runtime of its own, so nothing a command does to its states can change the answer.
        self._compiler = luajit.LuaRuntime(register_eval=False, register_builtins=False)

    async def execute(self, code: str, show_values: bool = False) -> Reply:
        """Run a command everywhere and answer it; `show_values` for our clients (see above)."""
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
            loop = asyncio.get_running_loop()
            if show_values:
                code = await loop.run_in_executor(self._thread, expression_chunk, self._compiler, code) or code
            error = await run_in_worker_states(self._pool, code)
            if error is not None:
                return error_reply(error)
            if self._elsewhere is not None:
                refused = await self._elsewhere(code)
                if refused is not None:
                    return Reply(refused, ReplyKind.ERROR)
            try:
                return await loop.run_in_executor(
                    self._thread, run_in_config_state, self._host, self._config_state, code, show_values
                )
            except Exception as exc:
                return error_reply(f"{type(exc).__name__}: {exc}")
        finally:
            self._lock.release()

    def _stuck_state(self) -> str | None:
        return stuck_state(self._pool, self._host.settings.slow_call_seconds)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
