"""The index templates of elasticqueries/, named for one index prefix, and their installation.

The files name everything `trackalert-...` so that an operator can PUT them as they are; a log
configured with another prefix gets the same templates renamed, which is what `templates`
returns. Installed at start (composable templates are only consulted when an index is created,
so installing them first and then creating the indices gives every index its explicit mapping).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from elasticsearch import AsyncElasticsearch

DEFAULT_PREFIX = "trackalert"
#: The index kinds of one log: events (the log), state (seq counter and cursors), alerts.
KINDS = ("events", "state", "alerts")


def _load(name: str) -> dict[str, Any]:
    text = resources.files("trackalert.elasticqueries").joinpath("templates", name).read_text("utf-8")
    return json.loads(text)


def _renamed(value: Any, prefix: str) -> Any:
    if isinstance(value, str) and value.startswith(DEFAULT_PREFIX + "-"):
        return prefix + value[len(DEFAULT_PREFIX):]
    if isinstance(value, list):
        return [_renamed(v, prefix) for v in value]
    return value


def templates(prefix: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(kind "component"/"index", name, body) of every template, components first."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for kind in KINDS:
        component = _load(f"{DEFAULT_PREFIX}-{kind}-mappings.json")
        out.append(("component", f"{prefix}-{kind}-mappings", component))
    for kind in KINDS:
        body = _load(f"{DEFAULT_PREFIX}-{kind}.json")
        body["index_patterns"] = _renamed(body["index_patterns"], prefix)
        body["composed_of"] = _renamed(body["composed_of"], prefix)
        out.append(("index", f"{prefix}-{kind}", body))
    return out


async def install_templates(client: AsyncElasticsearch, prefix: str) -> None:
    """PUT every template (an update replaces the old version; existing indices keep theirs)."""
    for kind, name, body in templates(prefix):
        if kind == "component":
            await client.cluster.put_component_template(name=name, **body)
        else:
            await client.indices.put_index_template(name=name, **body)


async def remove_templates(client: AsyncElasticsearch, prefix: str) -> None:
    """Delete the templates of `prefix` (tests and `trackalert` tooling clean up after them)."""
    for kind, name, _ in reversed(templates(prefix)):
        if kind == "component":
            await client.options(ignore_status=404).cluster.delete_component_template(name=name)
        else:
            await client.options(ignore_status=404).indices.delete_index_template(name=name)

