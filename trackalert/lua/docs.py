"""Generate docs/lua-api.md from the registry: `python -m trackalert.lua.docs > docs/lua-api.md`."""

from __future__ import annotations

import inspect
from collections import defaultdict

from trackalert.lua.registry import LuaGlobal, Where, load_all

TOPICS = {
    "web": "REST API",
    "lua": "Policies and Lua states",
    "eventlog": "Event log",
    "helpers": "Long-term helpers",
    "geoip": "GeoIP and enrichment",
    "logging": "Logging",
    "addresses": "Addresses and netmasks",
    "stats": "Statistics",
    "schedule": "Background functions",
    "webhooks": "Custom webhooks",
    "console": "Console commands",
    "json": "JSON",
    "general": "General",
}


def _where(spec: LuaGlobal) -> str:
    places = []
    if Where.CONFIG in spec.where:
        places.append("config")
    if Where.WORKER in spec.where:
        places.append("report/background/custom functions")
    if Where.CLIENT in spec.where:
        places.append("console client")
    return ", ".join(places)


def render() -> str:
    by_topic: dict[str, list[LuaGlobal]] = defaultdict(list)
    for spec in load_all().values():
        by_topic[spec.topic].append(spec)
    lines = [
        "# Lua API reference",
        "",
        "Generated from the registry of Lua globals (`trackalert/lua/registry.py`); do not edit by",
        "hand: run `make docs`. A global used where it does not apply is a silent no-op, so one",
        "config file runs in the config state and in every worker state, as in the C++ daemon.",
        "",
    ]
    for topic in sorted(by_topic, key=lambda t: list(TOPICS).index(t) if t in TOPICS else 99):
        lines += [f"## {TOPICS.get(topic, topic.title())}", ""]
        for spec in sorted(by_topic[topic], key=lambda s: s.name.lower()):
            lines += [f"### `{spec.signature}`", "", f"Works in: {_where(spec)}.", "", inspect.cleandoc(spec.doc), ""]
            if spec.example:
                lines += ["```lua", spec.example, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
