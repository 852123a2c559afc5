"""Lua globals of the console: the control socket, its key, and the operators' status commands."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any, Callable

import nacl.secret

from trackalert import log
from trackalert.console.protocol import (
    DEFAULT_SERVER_PORT,
    decode_key,
    decrypt,
    encrypt,
    increment_nonce,
    make_key_command,
    random_nonce,
)
from trackalert.durations import parse_span
from trackalert.lua.convert import scalar_text, table_items
from trackalert.lua.registry import Where, lua_global
from trackalert.netaddr import AddressError, parse_combo

if TYPE_CHECKING:
    from trackalert.lua.state import LuaState

CONFIG = Where.CONFIG | Where.CLIENT


@lua_global(
    "controlSocket", CONFIG, "controlSocket(address)",
    f"""Accept encrypted console connections (`trackalert -c`, or the C++ client) on `address`
    (`ip[:port]`, port {DEFAULT_SERVER_PORT} when omitted). Needs `setKey`. Bound at start
    (a busy port stops the daemon with an error), or at once when given from the console. In a
    client's config it is where the client connects (127.0.0.1:4005 when absent).""",
    example='controlSocket("127.0.0.1:4004")', topic="console",
)
def _control_socket(state: "LuaState") -> Callable[[Any], None]:
    def control_socket(address: Any) -> None:
        text = scalar_text(address, "address")
        try:
            combo = parse_combo(text, DEFAULT_SERVER_PORT)
        except AddressError:
            log.logger.error(
                "controlSocket() error parsing address/port [%s]. Make sure to use IP addresses not "
                "hostnames", text,
            )
            return
        if state.is_config:
            state.host.on_control_socket(combo)  # a no-op until the daemon runs
        state.host.settings.control_sockets.append(combo)

    return control_socket


@lua_global(
    "setKey", CONFIG, "setKey(base64key) -> boolean",
    """The console key, Base64 of 32 random bytes (`makeKey()` makes one); the daemon and its
    clients need the same. Returns false and outputs `Unable to decode <key> as Base64` when the
    text is not Base64. A new key applies to the connections made after it.""",
    example='setKey("paste the output of makeKey() here")', topic="console",
)
def _set_key(state: "LuaState") -> Callable[[Any], bool]:
    def set_key(text: Any) -> bool:
        text = scalar_text(text, "key")
        try:
            key = decode_key(text)
        except ValueError as exc:
            log.logger.error("%s", exc)
            state.host.console_replace(str(exc))
            return False
        if len(key) != nacl.secret.SecretBox.KEY_SIZE:
            log.logger.warning(
                "setKey(): the key is %d bytes long; the console needs %d (makeKey() makes one)",
                len(key), nacl.secret.SecretBox.KEY_SIZE,
            )
        state.host.settings.console_key = key
        return True

    return set_key


@lua_global(
    "makeKey", CONFIG, "makeKey()",
    """Console output `setKey("<base64>")` with a fresh random 32-byte key, ready to paste into
    the config. Works without a daemon: `trackalert -e 'makeKey()'`.""",
    topic="console",
)
def _make_key(state: "LuaState") -> Callable[[], None]:
    return lambda: state.host.console_replace(make_key_command())


def crypto_works(key: bytes | None, message: bytes) -> bool:
    """The C++ `testCrypto`: two encrypt/decrypt round trips on consecutive nonces."""
    if key is None:
        return False
    try:
        box = nacl.secret.SecretBox(key)
        nonce = random_nonce()
        for _ in range(2):
            if decrypt(box, encrypt(box, message, nonce), nonce) != message:
                return False
            nonce = increment_nonce(nonce)
    except Exception:
        return False
    return True


@lua_global(
    "testCrypto", CONFIG, "testCrypto(message)",
    "Console output `Everything is ok!` when the key encrypts and decrypts `message`, else `Crypto failed..`.",
    example='testCrypto("hello")', topic="console",
)
def _test_crypto(state: "LuaState") -> Callable[..., None]:
    def test_crypto(message: Any = "") -> None:
        ok = crypto_works(state.host.settings.console_key, scalar_text(message, "message").encode())
        state.host.console_replace("Everything is ok!\n" if ok else "Crypto failed..\n")

    return test_crypto


@lua_global(
    "reloadGeoIPDBs", Where.CONFIG, "reloadGeoIPDBs()",
    """Reopen the GeoIP databases (after a MaxMind update). Console output
    `reloadGeoIPDBs() successful`, or `reloadGeoIPDBs(): Error reloading GeoIP (<reason>)`.""",
    topic="console",
)
def _reload_geoip(state: "LuaState") -> Callable[[], None]:
    def reload() -> None:
        try:
            state.host.geoip.reload()
        except Exception as exc:
            log.logger.error("reloadGeoIPDBs(): Error reloading GeoIP (%s)", exc)
            state.host.console_append(f"reloadGeoIPDBs(): Error reloading GeoIP ({exc})\n")
            return
        state.host.console_append("reloadGeoIPDBs() successful\n")

    return reload


# ---- showEventLog -------------------------------------------------------------------------


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "none"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit} ({size} bytes)"
    return f"{size} bytes"


def _span(seconds: float | None) -> str:
    if not seconds:
        return "keep forever"
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale and seconds % scale == 0:
            return f"{int(seconds // scale)}{unit}"
    return f"{seconds:g}s"


def format_eventlog_summary(info: dict[str, Any]) -> str:
    """The `showEventLog()` text: one `Label: value` line per fact, labels aligned."""
    events = info.get("events", 0)
    rows = [
        ("Backend", str(info.get("backend", ""))),
        ("Location", str(info.get("location", ""))),
        ("Events", f"{events} (seq {info['first_seq']} to {info['last_seq']})" if events else "0"),
        ("Size", _size(int(info.get("size_bytes") or 0))),
        ("Oldest event", _when(info.get("oldest_received"))),
        ("Newest event", _when(info.get("newest_received"))),
        ("Retention", _span(info.get("retention_seconds"))),
        ("Policy lag", f"{info.get('lag_events', 0)} events, {info.get('lag_seconds', 0.0):.1f} s"),
    ]
    if "cluster" in info:
        rows.append(("Cluster", str(info["cluster"])))
    if "spool" in info:
        spool = info["spool"]
        rows.append(("Spool", f"{spool['depth']} reports, oldest {spool['age_seconds']:.1f} s "
                              f"({spool['path']})"))
    if "projection" in info:
        rows.append(("Projection", _projection(info["projection"])))
    return "".join(f"{label + ':':<14}{value}\n" for label, value in rows)


def _projection(summary: dict[str, Any]) -> str:
    """Shapes and their sizes, then per helper the report calls answered by it vs by SQL."""
    shapes = summary.get("shapes", [])
    keys = sum(s["key_tuples"] for s in shapes)
    pairs = sum(s["distinct_pairs"] for s in shapes)
    calls = "; ".join(f"{helper} {n['projection']} from it, {n['sql']} by SQL"
                      for helper, n in summary.get("calls", {}).items())
    foreign = summary.get("foreign")
    others = (f"; the other nodes' events: {foreign['absorbed']} added, {foreign['held']} held"
              + ("" if foreign["ready"] else " (not followed now)")) if foreign else ""
    return (f"{len(shapes)} shapes ({keys} keys, {pairs} distinct values), "
            f"{summary.get('building', 0)} building" + others + (f"; {calls}" if calls else ""))


@lua_global(
    "showEventLog", Where.CONFIG, "showEventLog()",
    """Console output: the event log's backend and location, how many events it holds (and
    their seq range), its size on disk, the oldest and newest event (UTC), the retention, how
    far the report policy lags behind (events and seconds), and the window projection: its
    shapes and their sizes, and how many helper calls in `report` it answered vs SQL. An
    Elasticsearch log with a spool adds the spool's depth and age, and whether the cluster
    is away (docs/elasticsearch.md).""",
    topic="console",
)
def _show_event_log(state: "LuaState") -> Callable[[], None]:
    def show_event_log() -> None:
        summary = state.host.eventlog_summary
        if summary is None:
            state.host.console_replace("showEventLog(): the event log is not open yet\n")
            return
        state.host.console_replace(format_eventlog_summary(summary()))

    return show_event_log


# ---- limits of the control socket ---------------------------------------------------------

#: `setConsoleTimeouts` keys and the `ConsoleSettings` attributes they set.
_TIMEOUT_KEYS = {
    "handshake": "handshake_timeout",
    "frame": "frame_timeout",
    "unauthenticated": "unauthenticated_timeout",
    "idle": "idle_timeout",
}


@lua_global(
    "setMaxConsoleConns", Where.CONFIG, "setMaxConsoleConns(n)",
    """The most console connections open at once (default 64). When all are in use, a new
    connection takes the place of the oldest one that has not yet sent a valid command (so a
    flood of idle connections cannot lock operators out); when all are authenticated sessions,
    it is closed at once. Either is logged (a few lines per 10 s however many). Applies to new
    connections.""",
    example="setMaxConsoleConns(16)", topic="console",
)
def _set_max_console_conns(state: "LuaState") -> Callable[[Any], None]:
    def set_max(count: Any) -> None:
        if isinstance(count, bool) or not isinstance(count, (int, float)) or count < 1 or count != int(count):
            raise ValueError(f"the console connection limit must be a whole number above 0, got {count!r}")
        state.host.settings.console.max_conns = int(count)

    return set_max


def _timeout_seconds(key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        seconds = parse_span(scalar_text(value, f"timeout {key}"))
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"timeout {key} must be 0 (no limit) or a positive span, got {value!r}")
    return seconds


@lua_global(
    "setConsoleTimeouts", Where.CONFIG, "setConsoleTimeouts({key=span, ...})",
    """How long the control socket waits for a client: `handshake` (its nonce after it
    connects, default `10s`), `frame` (the rest of a message once it has begun, `10s`),
    `unauthenticated` (the first command after the nonce exchange, `1m`: the C++ interactive
    client sends nothing until its first command, type it within this) and `idle` (between
    the commands of a session that has proved the key, `1d`, so an operator can leave
    `trackalert -c` at the prompt). Spans as `"30s"`, `"5m"`, `"1d"` or seconds; 0 is no
    limit. A client that exceeds one is disconnected and logged. Keys left out keep their
    value.""",
    example='setConsoleTimeouts({unauthenticated="5m", idle="8h"})', topic="console",
)
def _set_console_timeouts(state: "LuaState") -> Callable[[Any], None]:
    def set_timeouts(table: Any) -> None:
        chosen = {}
        for key, value in table_items(table, "console timeouts"):
            if key not in _TIMEOUT_KEYS:
                raise ValueError(f"unknown console timeout {key!r} (known: {', '.join(_TIMEOUT_KEYS)})")
            chosen[_TIMEOUT_KEYS[key]] = _timeout_seconds(key, value)
        for attribute, seconds in chosen.items():
            setattr(state.host.settings.console, attribute, seconds)

    return set_timeouts
