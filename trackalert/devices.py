"""Device attributes derived from a report's `device_id` (reference §6, as wforce does it).

The C++ trackalert only ever stored the `device_attrs` wforce sent; we derive them when a report
has a `device_id` and none, so that policies keyed on the device family work whatever fed the
report. The parsing is pure (a string in, a dict out) and cached per (protocol kind, device_id):
the same few thousand clients report over and over, and a user-agent parse costs far more than
a dict lookup.
"""

from __future__ import annotations

import functools
import re
from typing import Callable

import ua_parser
from ua_parser import loaders

#: Distinct device ids whose parse is remembered.
CACHE_SIZE = 100_000

HTTP_KEYS = ("device.family", "device.model", "device.brand", "os.family", "os.major", "os.minor",
             "browser.family", "browser.major", "browser.minor")
IMAP_KEYS = ("imapc.family", "imapc.major", "imapc.minor", "os.family", "os.major", "os.minor")
MOBILEAPI_KEYS = ("os.family", "os.major", "os.minor", "app.name", "app.brand", "app.major",
                  "app.minor", "device.family")

# IMAP ID (RFC 2971) strings, e.g. "name" "Mac OS X Mail" "version" "10.0 (3226)" "os" "Mac OS X"
# "os-version" "10.12 (16A323)". Same expressions as wforce's IMAPClientIDParser.
_IMAP_NAME = re.compile(r'"name"\s?"(.*?)"')
_IMAP_OS = re.compile(r'"os"\s?"(.*?)"')
_IMAP_VERSION = re.compile(r'"version"\s?"(\d+)\.(\d+).*?"')
_IMAP_OS_VERSION = re.compile(r'"os-version"\s?"(\d+)\.(\d+).*?"')

# Mobile app ids: <brand>.<os>.<app name>/<major>.<minor>... (OS: <maj>.<min>; device: <name>)
_APP = re.compile(r"^(.*?)\.(.*?)\.(.*?)/(\d+)\.(\d+)")
_APP_OS = re.compile(r"OS:\s*(\d+)\.(\d+)")
_APP_DEVICE = re.compile(r"device:\s*([A-Za-z0-9\-._/ \t]+)")


def parse_imap(device_id: str) -> dict[str, str]:
    """The six IMAP keys (always all present, `""` when not found)."""
    attrs = dict.fromkeys(IMAP_KEYS, "")
    if m := _IMAP_NAME.search(device_id):
        attrs["imapc.family"] = m.group(1)
    if m := _IMAP_OS.search(device_id):
        attrs["os.family"] = m.group(1)
    if m := _IMAP_VERSION.search(device_id):
        attrs["imapc.major"], attrs["imapc.minor"] = m.group(1), m.group(2)
    if m := _IMAP_OS_VERSION.search(device_id):
        attrs["os.major"], attrs["os.minor"] = m.group(1), m.group(2)
    return attrs


def parse_mobileapi(device_id: str) -> dict[str, str]:
    """The eight mobile-app keys (always all present)."""
    attrs = dict.fromkeys(MOBILEAPI_KEYS, "")
    if m := _APP.search(device_id):
        (attrs["app.brand"], attrs["os.family"], attrs["app.name"], attrs["app.major"],
         attrs["app.minor"]) = m.groups()
    if m := _APP_OS.search(device_id):
        attrs["os.major"], attrs["os.minor"] = m.groups()
    if m := _APP_DEVICE.search(device_id):
        attrs["device.family"] = m.group(1)
    return attrs


def _user_agent_parser(regexes_file: str = "") -> Callable[[str], ua_parser.DefaultedResult]:
    """ua-parser's regex-accelerated resolver over the builtin regexes, or over `regexes_file`
    (the `-R` option: a uap-core regexes.yaml, or the same data as JSON)."""
    if not regexes_file:
        return lambda ua: ua_parser.parse(ua).with_defaults()
    from ua_parser.regex import Resolver

    if regexes_file.endswith(".json"):
        matchers = loaders.load_json(regexes_file)
    else:
        if loaders.load_yaml is None:  # pragma: no cover - PyYAML is a dependency
            raise RuntimeError("reading a regexes.yaml needs PyYAML")
        matchers = loaders.load_yaml(regexes_file)
    parser = ua_parser.Parser(Resolver(matchers))
    return lambda ua: parser.parse(ua).with_defaults()


class DeviceParser:
    """`device_attrs` for a (protocol, device_id), remembered per device id."""

    def __init__(self, regexes_file: str = "", cache_size: int = CACHE_SIZE) -> None:
        #: Kept so that a web worker can build the same parser (`Enricher.snapshot`).
        self.regexes_file = regexes_file
        self._parse_ua = _user_agent_parser(regexes_file)
        self._cached = functools.lru_cache(maxsize=cache_size)(self._parse)

    def attributes(self, protocol: str, device_id: str) -> dict[str, str]:
        """The derived attributes (empty for protocols wforce does not parse). A fresh dict each
        time: callers may keep or change it without touching the cache."""
        kind = _KINDS.get(protocol)
        if kind is None or not device_id:
            return {}
        return dict(self._cached(kind, device_id))

    def _parse(self, kind: str, device_id: str) -> dict[str, str]:
        if kind == "imap":
            return parse_imap(device_id)
        if kind == "mobileapi":
            return parse_mobileapi(device_id)
        return self.parse_http(device_id)

    def parse_http(self, user_agent: str) -> dict[str, str]:
        r = self._parse_ua(user_agent)
        return {
            "device.family": r.device.family or "Other",
            "device.model": r.device.model or "",
            "device.brand": r.device.brand or "",
            "os.family": r.os.family or "Other",
            "os.major": r.os.major or "",
            "os.minor": r.os.minor or "",
            "browser.family": r.user_agent.family or "Other",
            "browser.major": r.user_agent.major or "",
            "browser.minor": r.user_agent.minor or "",
        }

    def cache_info(self) -> "functools._CacheInfo":
        return self._cached.cache_info()


_KINDS = {"http": "http", "https": "http", "imap": "imap", "imaps": "imap", "mobileapi": "mobileapi"}
