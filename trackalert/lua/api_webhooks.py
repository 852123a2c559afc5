"""Lua globals for custom webhooks (reference §8) and their persisted outbox.

The registry, outbox and sender live on the host (`Host.webhooks`); the settings they read at
start live in `Settings.webhooks`.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable

from trackalert.durations import format_span, parse_span
from trackalert.lua.api_alerts import report_time
from trackalert.lua.convert import describe, number_text, scalar_text, table_items
from trackalert.lua.registry import Where, lua_global

if TYPE_CHECKING:
    from trackalert.lua.state import LuaState
    from trackalert.webhooks import WebHooks


def _webhooks(state: "LuaState") -> "WebHooks":
    webhooks = state.host.webhooks
    if webhooks is None:
        raise RuntimeError("custom webhooks are not available in this process")
    return webhooks


def _key_values(value: Any) -> dict[str, str]:
    """The keys table: strings, numbers as Lua prints them, booleans as true/false (wforce
    configs copied over sometimes carry `kafka=true`)."""
    result = {}
    for key, item in table_items(value, "webhook configuration"):
        name = scalar_text(key, "webhook configuration key")
        if isinstance(item, bool):
            result[name] = "true" if item else "false"
        else:
            result[name] = scalar_text(item, f"webhook configuration value of {name}")
    return result


@lua_global(
    "addCustomWebHook", Where.CONFIG, "addCustomWebHook(name, {key=value, ...})",
    """Register a custom webhook that `runCustomWebHook(name, data)` sends to. Keys: `url`
    (required, http or https; `%{YYYY}`, `%{MM}`, `%{dd}` become the UTC date at send time),
    `secret` (adds `X-Wforce-Signature`, the Base64 HMAC-SHA256 of the body), `basic-auth`
    (`user:password`), `api-key` (sent as `X-API-Key`) and `content-type` (default
    `application/json`). Unknown keys are warned about. Ids count from 1, one per call; a
    failed registration is logged and uses up its id.""",
    example=(
        'addCustomWebHook("alert", {url="https://siem.example/hooks/%{YYYY}-%{MM}-%{dd}", '
        'secret="s3cret"})'
    ),
    topic="webhooks",
)
def _add_custom_webhook(state: "LuaState") -> Callable[[Any, Any], None]:
    def add_custom_webhook(name: Any, keys: Any) -> None:
        _webhooks(state).add(scalar_text(name, "webhook name"), _key_values(keys))

    return add_custom_webhook


@lua_global(
    "runCustomWebHook", Where.WORKER, "runCustomWebHook(name, data) -> boolean",
    """Send `data` (a string, sent verbatim) to the custom webhook `name`. The request,
    with its `X-Wforce-Event`, `X-Wforce-HookID`, `X-Wforce-Delivery` and optional signature
    and credentials, is written to the persisted outbox before this returns true; it survives
    a restart and is retried with backoff until the receiver accepts it or it expires
    (`setWebHookExpiry`). The delivery id is the same on every retry, and derives from what
    caused the alert (in `report`: the event's seq; in a background function: its name and
    scheduled time; plus the hook and the body), so the alerts of a policy that runs again
    after a crash carry the same ids as the first time; in a custom endpoint it is unique
    (random). The delivery also records the seq of the event `report(lt)` judged, to trace a
    live alert to its report (`showWebHookOutbox`); background functions, custom endpoints
    and the console judge no single event, so their deliveries carry none. Every call with a
    known hook is also recorded in the event log's alerts (hook, body, time, seq, delivery
    outcome; `countAlerts`, `recentAlerts`, `trackalert alerts`, docs/alerts.md). Returns false,
    and logs why, when the name is unknown or the outbox is full (`setWebHookQueueSize`;
    `trackalert_webhook_outbox_full_total`; recorded as `dropped`); nothing is dropped silently.""",
    example='runCustomWebHook("alert", \'{"login":"\' .. lt.login .. \'"}\')', topic="webhooks",
)
def _run_custom_webhook(state: "LuaState") -> Callable[[Any, Any], bool]:
    def run_custom_webhook(name: Any, data: Any) -> bool:
        name = scalar_text(name, "webhook name")
        if isinstance(data, bytes):
            body = data
        elif isinstance(data, str):
            body = data.encode("utf-8")
        elif isinstance(data, (int, float)) and not isinstance(data, bool):
            body = number_text(data).encode("utf-8")
        else:
            raise TypeError(f"webhook data must be a string, got {describe(data)}")
        return _webhooks(state).run(name, body, alert_cause(state), state.as_of_seq,
                                    report_time(state))

    return run_custom_webhook


def alert_cause(state: "LuaState") -> str | None:
    """What made the policy send this alert, when it would make it again after a restart: the
    event `report(lt)` runs for, or the background run (name and due time). None elsewhere
    (custom endpoints, console commands): those alerts get a unique random id."""
    if state.as_of_seq is not None:
        return f"report {state.as_of_seq}"
    if state.background_run is not None:
        name, due = state.background_run
        return f"background {name} {due:.6f}"  # the scheduled (virtual) time, not the start
    return None


@lua_global(
    "showCustomWebHooks", Where.CONFIG, "showCustomWebHooks()",
    """Console output: one line per custom webhook with its id, name, successful and failed
    attempts (a retried delivery counts each failed attempt) and URL, in the C++ layout.""",
    topic="console",
)
def _show_custom_webhooks(state: "LuaState") -> Callable[[], None]:
    return lambda: state.host.console_replace(_webhooks(state).show())


@lua_global(
    "showWebHookOutbox", Where.CONFIG, "showWebHookOutbox([n])",
    """Console output: the first `n` (default 20) deliveries waiting in the outbox to be sent
    or retried, oldest first, with their row, hook, `seq`, attempts, next attempt (UTC), last
    error and delivery id. `seq` is the event whose `report(lt)` sent the alert, the key to its
    report in the event log (`trackalert export`, `trackalert-replay`); `-` for alerts sent by
    a background function, a custom endpoint or the console, which judge no single event.""",
    example="showWebHookOutbox(50)", topic="console",
)
def _show_outbox(state: "LuaState") -> Callable[..., None]:
    def show_outbox(count: Any = None) -> None:
        limit = 20 if count is None else _positive_int("showWebHookOutbox")(count)
        state.host.console_replace(_outbox_listing(_webhooks(state), limit))

    return show_outbox


def _outbox_listing(webhooks: "WebHooks", limit: int) -> str:
    """The outbox as a table; a config without webhooks has no outbox file, and looking must
    not create one."""
    if not webhooks.hooks and not os.path.exists(webhooks.outbox_path()):
        return "No webhook outbox (no custom webhook is registered)\n"
    outbox = webhooks.outbox()
    fmt = "{:<7} {:<16.16} {:<10} {:<8} {:<19} {:<44} {}\n"
    lines = [fmt.format("Row", "Hook", "Seq", "Attempts", "Next attempt (UTC)", "Delivery id",
                        "Last error")]
    for d in outbox.pending(limit):
        seq = "-" if d.seq is None else str(d.seq)
        due = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.next_attempt))
        lines.append(fmt.format(d.row, d.hook_name, seq, d.attempts, due, d.delivery_id,
                                d.last_error.replace("\n", " ")))
    depth = outbox.depth()
    lines.append(f"{depth} deliveries waiting" + (f", first {limit} shown\n" if depth > limit else "\n"))
    return "".join(lines)


def _positive_int(name: str) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) < 1:
            raise ValueError(f"{name} needs a positive number, got {describe(value)}")
        return int(value)

    return convert


def _webhook_setter(attribute: str, convert: Callable[[Any], Any]) -> Callable[["LuaState"], Any]:
    def factory(state: "LuaState") -> Callable[[Any], None]:
        return lambda value: setattr(state.host.settings.webhooks, attribute, convert(value))

    return factory


lua_global(
    "setNumWebHookThreads", Where.CONFIG, "setNumWebHookThreads(n)",
    """With `setNumWebHookConnsPerThread`, how many webhook requests are in flight at once
    (threads × conns, default 5 × 10). Read at start.""",
    example="setNumWebHookThreads(2)", topic="webhooks",
)(_webhook_setter("threads", _positive_int("setNumWebHookThreads")))

lua_global(
    "setNumWebHookConnsPerThread", Where.CONFIG, "setNumWebHookConnsPerThread(n)",
    """Concurrent webhook requests per webhook thread (default 10); see
    `setNumWebHookThreads`. Read at start.""",
    example="setNumWebHookConnsPerThread(20)", topic="webhooks",
)(_webhook_setter("conns_per_thread", _positive_int("setNumWebHookConnsPerThread")))

lua_global(
    "setWebHookQueueSize", Where.CONFIG, "setWebHookQueueSize(n)",
    """The most deliveries the outbox holds (default 50000). When it is full,
    `runCustomWebHook` returns false and the refusal is logged and counted
    (`trackalert_webhook_outbox_full_total`) instead of the delivery vanishing.""",
    example="setWebHookQueueSize(100000)", topic="webhooks",
)(_webhook_setter("queue_size", _positive_int("setWebHookQueueSize")))

lua_global(
    "setWebHookTimeoutSecs", Where.CONFIG, "setWebHookTimeoutSecs(n)",
    "The whole-request timeout of each webhook attempt in seconds (default 2); a timeout is retried.",
    example="setWebHookTimeoutSecs(5)", topic="webhooks",
)(_webhook_setter("timeout_seconds", _positive_int("setWebHookTimeoutSecs")))


@lua_global(
    "setWebHookExpiry", Where.CONFIG, "setWebHookExpiry(span)",
    """How long a webhook delivery is retried before it is given up (`"1d"` by default;
    `"30m"`, `"12h"`, `"7d"`, ...). Retries back off exponentially with jitter from 1 s to
    5 min. An expired delivery is logged and counted (`trackalert_webhook_expired_total`).""",
    example='setWebHookExpiry("12h")', topic="webhooks",
)
def _set_expiry(state: "LuaState") -> Callable[[Any], None]:
    def set_expiry(span: Any) -> None:
        seconds = parse_span(scalar_text(span, "expiry"))
        if seconds <= 0:
            raise ValueError(f"the webhook expiry must be longer than 0s, got {format_span(seconds)}")
        state.host.settings.webhooks.expiry_seconds = seconds

    return set_expiry


@lua_global(
    "setWebHookOutbox", Where.CONFIG, "setWebHookOutbox(path)",
    """The SQLite file in which webhook deliveries wait until a receiver accepts them (default
    `trackalert-outbox.db` next to the config file; a relative path is relative to the config
    directory). It is created, with mode 0600, only once a webhook is registered. Read at
    start.""",
    example='setWebHookOutbox("/var/lib/trackalert/outbox.db")', topic="webhooks",
)
def _set_outbox(state: "LuaState") -> Callable[[Any], None]:
    def set_outbox(path: Any) -> None:
        text = scalar_text(path, "outbox path")
        if not text:
            raise ValueError("the outbox path must not be empty")
        state.host.settings.webhooks.outbox_path = text

    return set_outbox


def _readable_file(what: str, path: str) -> str:
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"{what} [{path}] does not exist or cannot be read")
    return path


@lua_global(
    "disableCurlPeerVerification", Where.CONFIG, "disableCurlPeerVerification()",
    "Do not verify the TLS certificate of HTTPS webhook receivers (nor their host name).",
    topic="webhooks",
)
def _disable_peer(state: "LuaState") -> Callable[[], None]:
    return lambda: setattr(state.host.settings.webhooks, "verify_peer", False)


@lua_global(
    "disableCurlHostVerification", Where.CONFIG, "disableCurlHostVerification()",
    """Verify HTTPS webhook receivers' certificates but not that they name the host in the
    URL.""",
    topic="webhooks",
)
def _disable_host(state: "LuaState") -> Callable[[], None]:
    return lambda: setattr(state.host.settings.webhooks, "verify_host", False)


@lua_global(
    "setCurlCABundleFile", Where.CONFIG, "setCurlCABundleFile(file)",
    """Verify HTTPS webhook receivers against the CA certificates in this PEM file instead of
    the system's. A file that cannot be read is an error.""",
    example='setCurlCABundleFile("/etc/ssl/private-ca.pem")', topic="webhooks",
)
def _ca_bundle(state: "LuaState") -> Callable[[Any], None]:
    def set_ca_bundle(path: Any) -> None:
        state.host.settings.webhooks.ca_bundle = _readable_file(
            "setCurlCABundleFile() file", scalar_text(path, "CA bundle file")
        )

    return set_ca_bundle


@lua_global(
    "setCurlClientCertAndKey", Where.CONFIG, "setCurlClientCertAndKey(certFile, keyFile)",
    """Present this client certificate and key (PEM) to HTTPS webhook receivers. A file that
    cannot be read is an error.""",
    example='setCurlClientCertAndKey("/etc/trackalert/client.pem", "/etc/trackalert/client.key")',
    topic="webhooks",
)
def _client_cert(state: "LuaState") -> Callable[[Any, Any], None]:
    def set_client_cert(cert: Any, key: Any) -> None:
        settings = state.host.settings.webhooks
        settings.client_cert = _readable_file("client certificate", scalar_text(cert, "certFile"))
        settings.client_key = _readable_file("client key", scalar_text(key, "keyFile"))

    return set_client_cert
