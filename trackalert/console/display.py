"""How the console shows a value that is not a string or a number (our clients only).

The C++ console could print only strings and numbers; everything else was `Command returned an
object we can't print`. An operator asking the log a question gets tables back (`topValues`,
`recentReports`), so our console prints them the way a Python prompt would, readably:

* an array of records (tables with named fields) as aligned columns with a header, the columns
  in name order, leaving out fields that are empty in every row; when the columns would not fit
  in `WIDTH` characters, one record a line as `name=value` pairs (empty fields left out);
* any other array one element a line, any other table one `key  value` line per key (sorted);
* a table inside a row inline (`{a, b}`, `{k=v}`), at most `DEPTH` levels deep (`_G` contains
  itself);
* `true`/`false`, `nil`, an address or netmask as its text, and `<function>` (or the type's
  name) for what has no text of its own.

It walks the tables it is given without running operator code (no metamethods, no `tostring`).
The one call into Lua is `text_of`, the library's own text of its address, netmask and GeoIP
objects (`LuaValues.text_of`): they are Lua tables now that no Python object crosses into Lua.
"""

from __future__ import annotations

import contextvars
from typing import Any, Callable, Sequence

from trackalert.lua.convert import describe, is_table, lua_type, number_text

#: Rows wider than this are shown one record a line instead of as columns.
WIDTH = 120
#: Tables nested deeper than this are shown as `{...}`.
DEPTH = 3
_GAP = "  "


TextOf = Callable[[Any], "str | None"]
#: The `text_of` of the value being shown; a context variable, so consoles in several threads
#: each see their own.
_text_of: contextvars.ContextVar[TextOf] = contextvars.ContextVar("text_of")


def show(value: Any, text_of: TextOf | None = None) -> str:
    """The text of a returned value, possibly several lines (no trailing newline).

    `text_of` gives the text of the library's own objects (addresses, netmasks...), else None.
    """
    token = _text_of.set(text_of or _no_text)
    try:
        return _show(value)
    finally:
        _text_of.reset(token)


def _no_text(_value: Any) -> None:
    return None


def _object_text(value: Any) -> str | None:
    return _text_of.get(_no_text)(value) if is_table(value) else None


def _plain_table(value: Any) -> bool:
    return is_table(value) and _object_text(value) is None


def _show(value: Any) -> str:
    if not _plain_table(value):
        return _scalar(value)
    items = _items(value)
    if not items:
        return "{}"
    if _is_array(items):
        elements = [v for _, v in items]
        if all(_is_record(v) for v in elements):
            return _records([dict(_items(v)) for v in elements])
        return "\n".join(_inline(v, 1) for v in elements)
    return _aligned([(_inline(k, DEPTH), _inline(v, 1)) for k, v in _sorted(items)])


def _scalar(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return number_text(value)
    if isinstance(value, str):
        return value
    text = _object_text(value)
    if text is not None:
        return text
    if "tostring" in getattr(type(value), "LUA_METHODS", ()):
        return str(value.tostring())  # a ComboAddress as Lua prints it
    if lua_type(value) is None and type(value).__str__ is not object.__str__:
        return str(value)  # a Netmask, a NetmaskGroup: their own text
    return f"<{describe(value)}>"


def _items(table: Any) -> list[tuple[Any, Any]]:
    return list(table.items())


def _is_array(items: list[tuple[Any, Any]]) -> bool:
    keys = [k for k, _ in items]
    return all(isinstance(k, int) and not isinstance(k, bool) for k in keys) and sorted(keys) == list(
        range(1, len(keys) + 1)
    )


def _is_record(value: Any) -> bool:
    return _plain_table(value) and any(isinstance(k, str) for k, _ in _items(value))


def _sort_key(key: Any) -> tuple[int, float, str]:
    # numbers first, by value; then everything else by its text
    if _is_number(key):
        return (0, key, "")
    return (1, 0, _scalar(key) if not is_table(key) else "")


def _sorted(items: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    return sorted(items, key=lambda kv: _sort_key(kv[0]))


def _inline(value: Any, depth: int) -> str:
    """One line: a nested table as `{a, b}` or `{k=v, ...}`."""
    if not _plain_table(value):
        return _scalar(value)
    if depth > DEPTH:
        return "{...}"
    items = _items(value)
    if _is_array(items):
        inner = [_inline(v, depth + 1) for _, v in items]
    else:
        inner = [f"{_inline(k, DEPTH + 1)}={_inline(v, depth + 1)}" for k, v in _sorted(items)]
    return "{" + ", ".join(inner) + "}"


def _empty(value: Any) -> bool:
    if _plain_table(value):
        return not _items(value)
    return value is None or (isinstance(value, str) and not value)


def _records(rows: list[dict[Any, Any]]) -> str:
    names = sorted({k for row in rows for k in row}, key=_sort_key)
    names = [n for n in names if not all(_empty(row.get(n)) for row in rows)]
    cells = [[_inline(row[n], 2) if not _empty(row.get(n)) else "" for n in names] for row in rows]
    header = [_scalar(n) for n in names]
    widths = [max(len(text) for text in column) for column in zip(header, *cells)]
    if sum(widths) + len(_GAP) * (len(widths) - 1) > WIDTH:
        return "\n".join(
            " ".join(f"{name}={text}" for name, text in zip(header, row) if text) for row in cells
        )
    numeric = [all(_is_number(row.get(n)) or _empty(row.get(n)) for row in rows) for n in names]
    lines = [header] + cells
    return "\n".join(_columns(line, widths, numeric) for line in lines)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _columns(texts: Sequence[str], widths: Sequence[int], numeric: Sequence[bool]) -> str:
    padded = [t.rjust(w) if right else t.ljust(w) for t, w, right in zip(texts, widths, numeric)]
    return _GAP.join(padded).rstrip()


def _aligned(pairs: list[tuple[str, str]]) -> str:
    width = max(len(key) for key, _ in pairs)
    return "\n".join(f"{key.ljust(width)}{_GAP}{value}".rstrip() for key, value in pairs)
