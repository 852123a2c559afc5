"""Lua globals for logging, durations, addresses and the basic console commands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from trackalert import __version__, log
from trackalert.durations import DurationError, parse_hms
from trackalert.lua.convert import kv_pairs, scalar_text
from trackalert.lua.registry import Where, lua_global
from trackalert.netaddr import AddressError, ComboAddress, Netmask, parse_combo

if TYPE_CHECKING:
    from trackalert.lua.state import LuaState

ALL = Where.EVERYWHERE
CONFIG = Where.CONFIG | Where.CLIENT


def _logger(emit: Callable[[str], None], gate: Callable[[], bool] = lambda: True) -> Any:
    def factory(_state: "LuaState") -> Callable[..., None]:
        def log_fn(message: Any, kv: Any = None) -> None:
            if not gate():
                return
            text = scalar_text(message, "message")
            emit(log.format_kv(text, kv_pairs(kv, "log table") if kv is not None else ()))

        return log_fn

    return factory


_LOG_DOC = """Log `message` {level}. The optional table adds `key="value" ` pairs after `: `
(values must be strings or numbers), exactly like the C++ daemon's output."""

lua_global(
    "infoLog", ALL, "infoLog(message, {key=value, ...})", _LOG_DOC.format(level="at info level"),
    example='infoLog("Received report", {login=lt.login})', topic="logging",
)(_logger(log.logger.info))
lua_global(
    "warnLog", ALL, "warnLog(message, {key=value, ...})", _LOG_DOC.format(level="at warning level"),
    topic="logging",
)(_logger(log.logger.warning))
lua_global(
    "errorLog", ALL, "errorLog(message, {key=value, ...})", _LOG_DOC.format(level="at error level"),
    topic="logging",
)(_logger(log.logger.error))
lua_global(
    "vinfoLog", ALL, "vinfoLog(message, {key=value, ...})",
    _LOG_DOC.format(level="at info level, only when started with -v"), topic="logging",
)(_logger(log.logger.info, log.verbose))
lua_global(
    "debugLog", ALL, "debugLog(message, {key=value, ...})",
    _LOG_DOC.format(level="at debug level, only when started with -v"), topic="logging",
)(_logger(log.logger.debug, log.verbose))


@lua_global(
    "durationToSeconds", ALL, "durationToSeconds(duration) -> seconds",
    """Convert an `h[h][:mm][:ss]` duration (`"10"` is ten hours, `"00:00:30"` thirty seconds) to
    whole seconds. An unparseable string is logged as an error and gives 0.""",
    example='durationToSeconds("1:30") -- 5400', topic="general",
)
def _duration_to_seconds(_state: "LuaState") -> Callable[[Any], int]:
    def duration_to_seconds(text: Any) -> int:
        try:
            return parse_hms(scalar_text(text, "duration"))
        except DurationError as exc:
            log.logger.error("%s", exc)
            return 0

    return duration_to_seconds


@lua_global(
    "shutdown", Where.CONFIG | Where.WORKER, "shutdown()",
    """Stop the daemon with exit status 0. Unlike the C++ daemon the stop is graceful: reports
    already acknowledged stay in the log and the policy cursor is saved.""",
    topic="general",
)
def _shutdown(state: "LuaState") -> Callable[[], None]:
    return lambda: state.host.shutdown()


@lua_global(
    "showVersion", Where.CONFIG, "showVersion()",
    "Console output `trackalert <version>`.", topic="console",
)
def _show_version(state: "LuaState") -> Callable[[], None]:
    return lambda: state.host.console_replace(f"trackalert {__version__}\n")


@lua_global(
    "stats", Where.CONFIG, "stats()",
    "Console output `<n> reports`: the reports accepted since the daemon started.",
    topic="console",
)
def _stats(state: "LuaState") -> Callable[[], None]:
    return lambda: state.host.console_replace(f"{state.host.reports} reports\n")


@lua_global(
    "newCA", ALL, "newCA(address) -> ComboAddress",
    """Parse `ip`, `ip:port`, `ipv6` or `[ipv6]:port` into a ComboAddress with the methods
    `:tostring()`, `:isIPv4()`, `:isIPv6()` and `:isMappedIPv4()`. An invalid address is logged
    and gives `0.0.0.0`. Addresses (like `lt.remote`), netmasks, netmask groups and GeoIP
    databases and records are Lua values whose methods are called with `:`; an unknown member is
    an error naming the class.""",
    example='newCA("192.0.2.1"):isIPv4() -- true', topic="addresses",
)
def _new_ca(state: "LuaState") -> Callable[[Any], ComboAddress]:
    def new_ca(text: Any) -> ComboAddress:
        text = scalar_text(text, "address")
        try:
            return parse_combo(text)
        except AddressError as exc:
            log.logger.error(
                "newCA() error parsing address/port [%s]. Make sure to use IP addresses not hostnames",
                text,
            )
            state.host.console_append(
                "newCA(): error parsing address/port. Make sure to use IP addresses not "
                f"hostnames ({exc})\n"
            )
            return parse_combo("0.0.0.0")

    return new_ca


@lua_global(
    "newNetmask", ALL, "newNetmask(mask) -> Netmask",
    """Parse `addr[/bits]` into a Netmask with `:toStringNetwork()` (the masked network) and
    `:match(ca)`. An invalid address is logged and gives an empty netmask; invalid bits raise an
    error.""",
    example='newNetmask("198.51.100.200/25"):toStringNetwork() -- "198.51.100.128/25"',
    topic="addresses",
)
def _new_netmask(state: "LuaState") -> Callable[[Any], Netmask | None]:
    def new_netmask(text: Any) -> Netmask | None:
        text = scalar_text(text, "netmask")
        try:
            return Netmask.parse(text)
        except AddressError as exc:
            log.logger.error("newNetmask() error parsing netmask [%s]. Use x.x.x.x/y notation.", text)
            state.host.console_append(
                "newNetmask(): error parsing address/port. Make sure to use IP addresses not "
                f"hostnames ({exc})\n"
            )
            return Netmask.empty()

    return new_netmask


@lua_global(
    "newNetmaskFromCA", ALL, "newNetmaskFromCA(ca, bits) -> Netmask",
    """The network of `bits` bits around a ComboAddress (255 means the full length; larger
    values are clamped).""",
    example='newNetmaskFromCA(lt.remote, 24):toStringNetwork() -- "192.0.2.0/24"',
    topic="addresses",
)
def _new_netmask_from_ca(state: "LuaState") -> Callable[[Any, Any], Any]:
    def new_netmask_from_ca(ca: Any, bits: Any) -> Any:
        return state.values.netmask_around(ca, bits)

    return new_netmask_from_ca


@lua_global(
    "newNetmaskGroup", ALL, "newNetmaskGroup() -> NetmaskGroup",
    """An empty group of netmasks with `:addMask(mask)` (a `!` prefix makes a negative entry),
    `:match(ca)` (longest prefix wins), `:size()` and `:clear()` (in every state, unlike the
    original).""",
    example='local g = newNetmaskGroup(); g:addMask("10.0.0.0/8"); if g:match(lt.remote) then ... end',
    topic="addresses",
)
def _new_netmask_group(state: "LuaState") -> Callable[[], Any]:
    return lambda: state.values.lib.group()
