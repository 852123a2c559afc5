"""Lua globals that configure the REST API: listeners, ACL, password, endpoints and statistics."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from trackalert import log
from trackalert.lua.convert import describe, is_table, scalar_text, string_list, string_map
from trackalert.lua.registry import Where, lua_global
from trackalert.netaddr import AddressError, NetmaskGroup, parse_combo
from trackalert.settings import Listener

if TYPE_CHECKING:
    from trackalert.lua.state import LuaState

CONFIG = Where.CONFIG | Where.CLIENT


@lua_global(
    "addACL", CONFIG, "addACL(netmask)",
    """Allow (or, with a `!` prefix, deny) REST clients from `netmask`. The private ranges
    (127/8, 10/8, 100.64/10, 169.254/16, 192.168/16, 172.16/12, ::1, fc00::/7, fe80::/10) are
    added after the config has run; a runtime `setACL` from the console can remove them.""",
    example='addACL("192.0.2.0/24")', topic="web",
)
def _add_acl(state: "LuaState") -> Callable[[Any], None]:
    return lambda mask: state.host.settings.acl.addMask(scalar_text(mask, "netmask"))


@lua_global(
    "setACL", CONFIG, "setACL({netmask, ...})",
    "Replace the whole REST ACL with the given netmasks (takes effect immediately).",
    example='setACL({"127.0.0.0/8", "192.0.2.0/24"})', topic="web",
)
def _set_acl(state: "LuaState") -> Callable[[Any], None]:
    def set_acl(masks: Any) -> None:
        group = NetmaskGroup()
        for mask in string_list(masks, "ACL"):
            group.addMask(mask)  # validate every entry before replacing anything
        state.host.settings.acl = group

    return set_acl


@lua_global(
    "showACL", Where.CONFIG, "showACL()",
    "Console output: one line per ACL entry, `!` for denied networks.", topic="console",
)
def _show_acl(state: "LuaState") -> Callable[[], None]:
    def show_acl() -> None:
        for entry in state.host.settings.acl.entries():
            state.host.console_append(entry + "\n")

    return show_acl


def _check_tls_file(kind: str, path: str) -> bool:
    if not os.path.exists(path) or not os.access(path, os.R_OK):
        log.logger.error("addListener() %s file [%s] does not exist or cannot be read", kind, path)
        return False
    if not os.path.isfile(path):
        log.logger.error("addListener() %s file [%s] is not a regular file", kind, path)
        return False
    return True


@lua_global(
    "addListener", Where.CONFIG,
    "addListener(address, useSSL, certFile, keyFile, {option=value, ...})",
    """Serve the REST API on `address` (`ip:port`). With `useSSL` both files must exist; the
    options table takes OpenSSL configuration names (`MinProtocol`, `CipherString`,
    `Ciphersuites`, `Options`). The minimum TLS version is 1.2. A listener that cannot be set up
    is logged and skipped; a port that cannot be bound stops the daemon with an error.""",
    example='addListener("127.0.0.1:8085", false, "", "", {})', topic="web",
)
def _add_listener(state: "LuaState") -> Callable[..., None]:
    def add_listener(
        address: Any, use_ssl: Any = False, cert: Any = "", key: Any = "", opts: Any = None
    ) -> None:
        address = scalar_text(address, "address")
        try:
            combo = parse_combo(address)
        except AddressError:
            log.logger.error(
                "addListener() error parsing address/port [%s]. Make sure to use IP addresses "
                "not hostnames",
                address,
            )
            return
        cert = "" if cert is None else scalar_text(cert, "certFile")
        key = "" if key is None else scalar_text(key, "keyFile")
        use_ssl = bool(use_ssl)
        if use_ssl and not (_check_tls_file("certificate", cert) and _check_tls_file("key", key)):
            return
        options = string_map(opts, "options") if is_table(opts) else {}
        log.logger.info(
            "Adding webserver listener on %s with SSL=%d, cert_file=%s, key_file=%s",
            combo, int(use_ssl), cert, key,
        )
        state.host.settings.listeners.append(Listener(combo, use_ssl, cert, key, options))

    return add_listener


@lua_global(
    "webserver", Where.CONFIG, "webserver(address, password)",
    "Deprecated: a plain listener on `address` plus `setWebserverPassword(password)`.",
    topic="web",
)
def _webserver(state: "LuaState") -> Callable[[Any, Any], None]:
    def webserver(address: Any, password: Any) -> None:
        log.logger.warning(
            "Warning - webserver() configuration command is deprecated in favour of "
            "addListener() and will be removed in a future version"
        )
        address = scalar_text(address, "address")
        state.host.settings.password = scalar_text(password, "password")
        try:
            combo = parse_combo(address)
        except AddressError:
            log.logger.error(
                "webserver() error parsing address/port [%s]. Make sure to use IP addresses not "
                "hostnames",
                address,
            )
            return
        log.logger.info("Adding webserver listener on %s", combo)
        state.host.settings.listeners.append(Listener(combo))

    return webserver


def _setter(attribute: str, convert: Callable[[Any], Any]) -> Callable[["LuaState"], Any]:
    def factory(state: "LuaState") -> Callable[[Any], None]:
        return lambda value: setattr(state.host.settings, attribute, convert(value))

    return factory


def _count(what: str, minimum: int = 1) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) < minimum:
            raise ValueError(f"{what} must be a number of at least {minimum}, got {describe(value)} {value!r}")
        return int(value)

    return convert


lua_global(
    "setWebserverPassword", CONFIG, "setWebserverPassword(password)",
    """The Basic-auth password of the REST API (the user name is ignored). Unlike the C++
    daemon, a password may contain `:` and a change from the console takes effect at once.""",
    example='setWebserverPassword("secret")', topic="web",
)(_setter("password", lambda v: scalar_text(v, "password")))

def _seconds(what: str) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 86400:
            raise ValueError(f"{what} must be a number of seconds above 0, got {describe(value)} {value!r}")
        return float(value)

    return convert


lua_global(
    "setWebserverReadTimeout", CONFIG, "setWebserverReadTimeout(seconds)",
    """How long a REST client may take to send one whole request, headers and body (default
    5 s, counted from its first byte, or from the connection for the first request; it also
    bounds a TLS handshake). A slower request gets a 408 JSON answer, or, still in its headers
    (or handshake), is closed, so a slow client cannot
    hold a connection slot (`setMaxWebserverConns`). wforce sends each report at once and gives
    up after its 2 s webhook timeout. Applies to new connections.""",
    example="setWebserverReadTimeout(5)", topic="web",
)(_setter("read_timeout", _seconds("setWebserverReadTimeout")))

lua_global(
    "setWebserverIdleTimeout", CONFIG, "setWebserverIdleTimeout(seconds)",
    """How long an idle keep-alive REST connection stays open between requests (default 60 s,
    as in the C++ daemon). Applies to new connections.""",
    example="setWebserverIdleTimeout(60)", topic="web",
)(_setter("idle_timeout", _seconds("setWebserverIdleTimeout")))


@lua_global(
    "setReportSecret", CONFIG, "setReportSecret(secret | {secret, ...})",
    """Accept a report (`/command/report`, `/?command=report`) only when it carries a valid
    `X-Wforce-Signature`: base64(HMAC-SHA256(secret, body)), which wforce adds when its report
    webhook has a `secret`. With several secrets (while rotating one) any of them will do. A
    missing or wrong signature gets a 401 JSON answer, is logged and counted in
    `trackalert_reports_rejected_total{reason="signature"}`. Default: no signature required.""",
    example='setReportSecret("verysecretcode")', topic="web",
)
def _set_report_secret(state: "LuaState") -> Callable[[Any], None]:
    def set_report_secret(secrets: Any) -> None:
        values = string_list(secrets, "secrets") if is_table(secrets) else [scalar_text(secrets, "secret")]
        if not all(values):
            raise ValueError("setReportSecret: a secret must not be empty")
        state.host.settings.report_secrets = values

    return set_report_secret


lua_global(
    "setNumLuaStates", CONFIG, "setNumLuaStates(n)",
    """How many worker Lua states run report, background and custom functions (default 6).
    Effective, unlike in the C++ daemon: the worker states are created after the config has run.
    It bounds how many Lua functions run at once.""",
    example="setNumLuaStates(4)", topic="lua",
)(_setter("num_lua_states", _count("setNumLuaStates")))

lua_global(
    "setNumWebProcesses", CONFIG, "setNumWebProcesses(n)",
    """Serve the REST API from `n` web worker processes (default 0: the core process serves it).
    A worker does the per-request work (HTTP, ACL, auth, parsing, validation) on its own CPU core
    and hands each report to the core, which stores it and runs the policy; the 200 still means
    the report is durable. Use it when one process cannot keep up (about 10,000 reports/s on
    one core); `setMaxWebserverConns` is shared out between the workers. Read at start.""",
    example="setNumWebProcesses(2)", topic="web",
)(_setter("num_web_processes", _count("setNumWebProcesses", minimum=0)))

def _flag(what: str) -> Callable[[Any], bool]:
    def convert(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{what} takes true or false, got {describe(value)} {value!r}")
        return value

    return convert


lua_global(
    "setPolicyProcess", CONFIG, "setPolicyProcess(on)",
    """Run `report(lt)` in a process of its own (true) or in the core process (false).
    Unset, it runs in its own process on a SQLite event log and in the core on Elasticsearch
    (true there is warned about and ignored: the process reads the SQLite file beside the
    writer). The policy process runs the same configuration in its own Lua states (two: a
    second takes over from a report stuck in a loop), reads each new event from the log and
    leaves the core's interpreter to ingestion. Its `runCustomWebHook` calls, cursor saves,
    custom stats, error and slow-call counts and `shutdown()` go to the core, which stores,
    counts and acts on them as before; a policy process that dies is logged and restarted, and
    runs again from the saved cursor. Background functions and custom endpoints stay in the
    core's states, so a config that shares Lua globals between `report` and them (a table
    filled by one, read by the other) needs `setPolicyProcess(false)`. Read at start.""",
    example="setPolicyProcess(true)", topic="web",
)(_setter("policy_process", _flag("setPolicyProcess")))

lua_global(
    "setNumWorkerThreads", CONFIG, "setNumWorkerThreads(n)",
    """Accepted for compatibility. trackalert serves HTTP on one event loop and never runs Lua on
    it, so HTTP needs no thread pool; the number of Lua calls running at once is
    `setNumLuaStates`.""",
    topic="web",
)(_setter("num_worker_threads", _count("setNumWorkerThreads")))

lua_global(
    "setMaxWebserverConns", CONFIG, "setMaxWebserverConns(n)",
    """The most REST connections open at once (default 10000). At the limit a new connection
    closes the oldest idle keep-alive one, or, if none is idle, is itself closed at once. With
    web processes each takes its share and leaves the rest to the others. Effective, unlike in
    the C++ daemon.""",
    example="setMaxWebserverConns(2000)", topic="web",
)(_setter("max_conns", _count("setMaxWebserverConns")))


@lua_global(
    "setMetricsNoPassword", CONFIG, "setMetricsNoPassword()",
    "Serve `/metrics` without Basic auth (the ACL still applies).", topic="web",
)
def _metrics_no_password(state: "LuaState") -> Callable[[], None]:
    return lambda: setattr(state.host.settings, "metrics_no_password", True)


@lua_global(
    "setNumReportThreads", CONFIG, "setNumReportThreads(n)",
    "Deprecated no-op, kept so old configs load.", topic="web",
)
def _num_report_threads(_state: "LuaState") -> Callable[[Any], None]:
    return lambda _n: log.logger.info(
        "setNumReportThreads is deprecated - use setNumWorkerThreads() instead"
    )


@lua_global(
    "setCustomEndpoint", Where.CONFIG | Where.WORKER, "setCustomEndpoint(name, function(args))",
    """Serve `POST /command/<name>` (and `/?command=<name>`) with a Lua function. It receives
    `args.attrs` (string values of the request's `attrs` object) and `args.attrs_mv` (array
    values) and must return a boolean and a table of strings, answered as
    `{"r_attrs": {...}, "success": <bool>}`. An error gives a 500 with a JSON reason.""",
    example=(
        'setCustomEndpoint("custom", function(args) return true, {login=args.attrs.login or '
        '"unknown"} end)'
    ),
    topic="web",
)
def _set_custom_endpoint(state: "LuaState") -> Callable[[Any, Any], None]:
    def set_custom_endpoint(name: Any, fn: Any) -> None:
        name = scalar_text(name, "endpoint name")
        state.endpoints[name] = fn
        if state.is_config:
            log.notice(f"Registering custom endpoint [{name}]")
            if name not in state.host.settings.custom_endpoints:
                state.host.settings.custom_endpoints.append(name)
            state.host.on_endpoint(name)

    return set_custom_endpoint


@lua_global(
    "showCustomEndpoints", Where.CONFIG, "showCustomEndpoints()",
    "Console output: the custom endpoint names, sorted.", topic="console",
)
def _show_custom_endpoints(state: "LuaState") -> Callable[[], None]:
    def show() -> None:
        lines = [f"{'Custom Endpoint':<30} \n"]
        lines += [f"{name[:30]:<30} \n" for name in sorted(state.host.settings.custom_endpoints)]
        state.host.console_replace("".join(lines))

    return show


@lua_global(
    "addCustomStat", Where.CONFIG, "addCustomStat(name)",
    """Declare a custom counter: shown by `showCustomStats()`, logged every 5 minutes and
    exported as `trackalert_custom_stats_total{metric="<name>"}`.""",
    example='addCustomStat("new_country")', topic="stats",
)
def _add_custom_stat(state: "LuaState") -> Callable[[Any], None]:
    return lambda name: state.host.declare_custom_stat(scalar_text(name, "stat name"))


@lua_global(
    "incCustomStat", Where.WORKER, "incCustomStat(name)",
    "Increment a custom counter declared with `addCustomStat` (undeclared names are not shown).",
    example='incCustomStat("new_country")', topic="stats",
)
def _inc_custom_stat(state: "LuaState") -> Callable[[Any], None]:
    return lambda name: state.host.inc_custom_stat(scalar_text(name, "stat name"))


def _show(getter: Callable[["LuaState"], str]) -> Callable[["LuaState"], Callable[[], None]]:
    def factory(state: "LuaState") -> Callable[[], None]:
        return lambda: state.host.console_append(getter(state))

    return factory


lua_global(
    "showPerfStats", Where.CONFIG, "showPerfStats()",
    "Console output: request latency buckets (`WTR_*`) over the last 5 minutes.", topic="console",
)(_show(lambda s: s.host.perf.show()))
lua_global(
    "showCommandStats", Where.CONFIG, "showCommandStats()",
    "Console output: `<command>=<n>` per REST command over the last 5 minutes.", topic="console",
)(_show(lambda s: s.host.command_stats.show()))
lua_global(
    "showCustomStats", Where.CONFIG, "showCustomStats()",
    "Console output: `<name>=<n>` per declared custom stat over the last 5 minutes.",
    topic="console",
)(_show(lambda s: s.host.custom_stats.show()))
