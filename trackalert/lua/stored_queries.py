"""The stored search bodies of elasticqueries/queries/ and their parameters (esQuery).

The parameter scheme: a JSON string value that is exactly ``"{{name}}"`` or ``"{{name:type}}"``
(type `string`, the default, `number`, `integer` or `boolean`) is a parameter. Binding replaces
that value in the *parsed* tree by the caller's value, as a JSON value: a parameter is data that
lands where the placeholder stood, so no value can change the query's shape (no text is ever
spliced, no JSON or Lucene syntax in a value is read as such). Any other string containing ``{{``
is refused when the file is read, so a placeholder that would silently not be one cannot ship.
Object keys are never parameters.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Mapping

from trackalert.lua.convert import describe

#: A query's name: the file name without `.json`; nothing that could leave the folder.
_NAME = re.compile(r"[a-z0-9_]+")
_PLACEHOLDER = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)(?::([a-z]+))?\}\}")


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_integer(value: Any) -> bool:
    return _is_number(value) and float(value).is_integer()


#: Each type: whether a value has it, and the JSON value it becomes (Lua numbers arrive as float
#: or int; an integer parameter is sent as an int, e.g. for `size`).
_TYPES: dict[str, tuple[Callable[[Any], bool], Callable[[Any], Any]]] = {
    "string": (lambda value: isinstance(value, str), str),
    "number": (_is_number, lambda value: value),
    "integer": (_is_integer, int),
    "boolean": (lambda value: isinstance(value, bool), bool),
}


class StoredQueryError(ValueError):
    """A stored query that does not exist, or parameters that do not fit it."""


@dataclass(frozen=True)
class StoredQuery:
    name: str
    body: Any
    #: Every parameter the body holds, with its type.
    params: Mapping[str, str]

    def bind(self, values: Mapping[str, Any]) -> dict:
        """The body with every placeholder replaced by its value (checked against its type)."""
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            raise StoredQueryError(
                f"esQuery {self.name!r}: unknown parameter {unknown[0]!r} "
                f"(it takes {_listing(self.params)})")
        missing = sorted(set(self.params) - set(values))
        if missing:
            raise StoredQueryError(
                f"esQuery {self.name!r}: missing parameter {missing[0]!r} "
                f"(a {self.params[missing[0]]})")
        bound: dict[str, Any] = {}
        for name, kind in self.params.items():
            accepts, convert = _TYPES[kind]
            value = values[name]
            if not accepts(value):
                raise StoredQueryError(
                    f"esQuery {self.name!r}: parameter {name!r} must be a {kind}, "
                    f"got {describe(value)}")
            bound[name] = convert(value)
        return _replace(self.body, bound)


def parse_query(name: str, text: str) -> StoredQuery:
    """A stored query from its file's text; a malformed placeholder is an error here."""
    body = json.loads(text)
    params: dict[str, str] = {}
    _collect(name, body, params)
    return StoredQuery(name, body, params)


def _collect(name: str, node: Any, params: dict[str, str]) -> None:
    if isinstance(node, dict):
        for item in node.values():
            _collect(name, item, params)
    elif isinstance(node, list):
        for item in node:
            _collect(name, item, params)
    elif isinstance(node, str) and "{{" in node:
        found = _PLACEHOLDER.fullmatch(node)
        if found is None or (found.group(2) or "string") not in _TYPES:
            raise StoredQueryError(
                f"stored query {name!r}: {node!r} is not a placeholder: a parameter is a whole "
                f"string value {{{{name}}}} or {{{{name:type}}}}, type one of {', '.join(_TYPES)}")
        kind = found.group(2) or "string"
        if params.setdefault(found.group(1), kind) != kind:
            raise StoredQueryError(
                f"stored query {name!r}: parameter {found.group(1)!r} given two types")


def _replace(node: Any, bound: Mapping[str, Any]) -> Any:
    if isinstance(node, dict):
        return {key: _replace(item, bound) for key, item in node.items()}
    if isinstance(node, list):
        return [_replace(item, bound) for item in node]
    if isinstance(node, str) and node.startswith("{{"):
        found = _PLACEHOLDER.fullmatch(node)
        if found is not None:
            return bound[found.group(1)]
    return node


def _listing(params: Mapping[str, str]) -> str:
    if not params:
        return "no parameters"
    return ", ".join(f"{name} ({kind})" for name, kind in sorted(params.items()))


_CACHE: dict[str, StoredQuery] = {}


def load_query(name: Any) -> StoredQuery:
    """The stored query `name` of elasticqueries/queries/ (read once per process)."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise StoredQueryError(f"esQuery: no stored query {name!r} ({_known()})")
    found = _CACHE.get(name)
    if found is None:
        path = _folder().joinpath(f"{name}.json")
        if not path.is_file():
            raise StoredQueryError(f"esQuery: no stored query {name!r} ({_known()})")
        found = _CACHE[name] = parse_query(name, path.read_text("utf-8"))
    return found


def query_names() -> list[str]:
    """The stored queries' names (the files of elasticqueries/queries/)."""
    return sorted(entry.name[:-5] for entry in _folder().iterdir() if entry.name.endswith(".json"))


def _known() -> str:
    return "known: " + ", ".join(query_names())


def _folder() -> Any:
    return resources.files("trackalert.elasticqueries").joinpath("queries")
