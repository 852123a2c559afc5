"""The console prompt, shared by `trackalert -c` and the local console of a foreground daemon.

Built on prompt_toolkit's `PromptSession` with ptpython's pieces where they fit: ptpython's ANSI
code style and UI style (completion menus), and its `auto_newline` for continuation lines.
ptpython's own `PythonInput`/`PythonRepl` are not used: they evaluate, validate, complete and
indent *Python* (jedi signatures, Python's notion of a complete statement), and the console speaks
Lua. What the operator gets:

* the `> ` prompt of the original, Lua syntax highlighting (Pygments' `LuaLexer`);
* completion of every Lua global from the registry (with its signature), the Lua keywords and
  `quit`; zero-argument commands complete with their `()` as the original's list did;
* multi-line input: Enter runs the chunk when it is complete Lua, otherwise opens a continuation
  line; Enter on an empty continuation line (or Meta+Enter) sends it as it is;
* history in `.history` in the config directory, one line per entry in the plain format the C++
  client (readline) reads and writes, so both clients share it; a multi-line chunk is written as
  its lines.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Any, Iterable, Iterator

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.enums import DEFAULT_BUFFER
from prompt_toolkit.filters import emacs_insert_mode, has_focus, has_selection, vi_insert_mode
from prompt_toolkit.history import History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.lexers import PygmentsLexer
from prompt_toolkit.shortcuts import CompleteStyle
from prompt_toolkit.styles import BaseStyle, Style
from ptpython.key_bindings import auto_newline
from ptpython.style import default_ansi_code_style, default_ui_style, generate_style
from pygments.lexers.scripting import LuaLexer

PROMPT = "> "
CONTINUATION = ". "
HISTORY_FILE = ".history"
QUIT = "quit"

LUA_KEYWORDS = (
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "if", "in",
    "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
)
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


# ---- history ------------------------------------------------------------------------------


class ReadlineHistory(History):
    """`.history` as the C++ client keeps it: one plain line per entry, appended as typed.

    prompt_toolkit's `FileHistory` writes `# timestamp` and `+line` records, which the C++
    client would show as commands; this format works for both.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__()

    def load_history_strings(self) -> Iterable[str]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                lines = [line.rstrip("\n") for line in handle]
        except OSError:
            return []
        return [line for line in reversed(lines) if line]

    def store_string(self, string: str) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                for line in string.splitlines():
                    if line:
                        handle.write(line + "\n")
        except OSError:
            pass  # an unwritable config directory must not break the console


# ---- completion ---------------------------------------------------------------------------


class LuaCompleter(Completer):
    """Completes the word before the cursor from `entries` (name -> (inserted text, meta))."""

    def __init__(self, entries: dict[str, tuple[str, str]]) -> None:
        self.entries = dict(sorted(entries.items()))

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        before = document.text_before_cursor
        match = _WORD.search(before)
        word = match.group(0) if match else ""
        start = len(before) - len(word)
        if start and before[start - 1] in ".:":
            return  # a field or method: not a global
        if not word and not complete_event.completion_requested:
            return
        for name, (text, meta) in self.entries.items():
            if name.startswith(word) and text != word:
                yield Completion(text, start_position=-len(word), display=name, display_meta=meta)


def completion_entries() -> dict[str, tuple[str, str]]:
    """Every registered Lua global, the Lua keywords and `quit`."""
    from trackalert.lua.registry import load_all

    entries: dict[str, tuple[str, str]] = {kw: (kw, "Lua keyword") for kw in LUA_KEYWORDS}
    for name, spec in load_all().items():
        takes_nothing = spec.signature.split(" ->")[0].strip() == f"{name}()"
        entries[name] = (f"{name}()" if takes_nothing else f"{name}(", spec.signature)
    entries[QUIT] = (QUIT, "leave the console")
    return entries


# ---- multi-line input ---------------------------------------------------------------------


@lru_cache(maxsize=1)
def _syntax_checker() -> Any:
    import lupa.luajit21 as luajit

    return luajit.LuaRuntime(register_eval=False, register_builtins=False).globals().loadstring


def chunk_is_complete(text: str) -> bool:
    """Whether `text` is a whole Lua chunk (or wrong in a way more lines cannot fix).

    As the Lua REPL decides: only a syntax error at the end of the input (`near '<eof>'`) means
    the chunk goes on. The check compiles, never runs, in a private LuaJIT runtime.
    """
    result = _syntax_checker()(text + "\n", "=console")
    if not isinstance(result, tuple):
        return True
    return not str(result[1]).endswith("'<eof>'")


def should_accept(text: str, cursor_on_last_line: bool = True, blank_line_sends: bool = True) -> bool:
    """What Enter does: run the input (True) or open a continuation line (False).

    At the prompt an empty continuation line sends the chunk as it is (the way out of a chunk
    that will never be complete); `blank_line_sends=False` is for scripts, where blank lines
    inside a function are just blank lines.
    """
    lines = text.split("\n")
    if len(lines) > 1 and not cursor_on_last_line:
        return False  # editing inside a multi-line chunk
    if not text.strip() or text.strip() == QUIT:
        return True
    if blank_line_sends and len(lines) > 1 and not lines[-1].strip():
        return True
    return chunk_is_complete(text)


def _key_bindings() -> KeyBindings:
    bindings = KeyBindings()
    insert = has_focus(DEFAULT_BUFFER) & ~has_selection & (emacs_insert_mode | vi_insert_mode)

    @bindings.add("enter", filter=insert)
    def _enter(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        document = buffer.document
        on_last_line = document.cursor_position_row == document.line_count - 1
        if should_accept(buffer.text, on_last_line):
            buffer.validate_and_handle()
        else:
            auto_newline(buffer)

    return bindings


# ---- the session --------------------------------------------------------------------------


def console_style() -> BaseStyle:
    """ptpython's default look: ANSI colours that suit dark and light terminals alike."""
    return generate_style(Style.from_dict(default_ansi_code_style), Style.from_dict(default_ui_style))


def history_path(directory: str = ".") -> str:
    return os.path.abspath(os.path.join(directory, HISTORY_FILE))


def make_session(history_file: str | None, **io: Any) -> "PromptSession[str]":
    """A prompt for Lua console input; `io` may pass prompt_toolkit `input`/`output` (tests)."""
    return PromptSession(
        message=PROMPT,
        multiline=True,
        prompt_continuation=CONTINUATION,
        history=ReadlineHistory(history_file) if history_file else InMemoryHistory(),
        completer=LuaCompleter(completion_entries()),
        complete_while_typing=True,
        complete_style=CompleteStyle.COLUMN,
        lexer=PygmentsLexer(LuaLexer),
        style=console_style(),
        include_default_pygments_style=False,
        key_bindings=_key_bindings(),
        **io,
    )
