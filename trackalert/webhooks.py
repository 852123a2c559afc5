"""Custom webhooks (reference §8): the registry, the request each call builds, and the outbox.

`runCustomWebHook` runs in Lua worker threads. It builds the complete request at once (headers,
signature, delivery id), stores it in the persisted outbox and only then returns true: the alert
is on disk before the policy goes on, and the sender (`trackalert.webhook_sender`, on the event
loop) delivers it with retries. When the outbox is full the call returns false and says so in
the log and in `trackalert_webhook_outbox_full_total`; nothing is dropped quietly.

Each call is also recorded in the event log's alerts (`WebHooks.alerts`, eventlog/alerts.py)
under its delivery id, and the sender writes each attempt's outcome back to that record: the
outbox holds a delivery while it is in flight, the record keeps it for as long as retention
keeps events (docs/alerts.md).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import itertools
import json
import os
import random
import sqlite3
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from trackalert import log
from trackalert.eventlog.alerts import new_alert
from trackalert.outbox import Delivery, Outbox, OutboxFull
from trackalert.webhook_sender import RetryPolicy, Sender, expand_url

if TYPE_CHECKING:
    from trackalert.clock import Clock
    from trackalert.eventlog.alerts import AlertStore
    from trackalert.metrics import Metrics
    from trackalert.settings import Settings

__all__ = [
    "CustomWebHook", "WebHooks", "build_delivery", "caused_delivery_id", "expand_url",
    "new_delivery_id", "sign",
]

DEFAULT_CONTENT_TYPE = "application/json"
OUTBOX_FILE = "trackalert-outbox.db"
#: The configuration keys custom webhooks use.
KNOWN_KEYS = ("url", "secret", "basic-auth", "api-key", "content-type")
#: wforce keys accepted for compatibility that do nothing for trackalert's custom webhooks.
INERT_KEYS = ("kafka", "num_conns", "allow_filter")


@dataclass
class CustomWebHook:
    """One `addCustomWebHook` registration and its delivery counts (`showCustomWebHooks`)."""

    id: int
    name: str
    url: str
    secret: str = ""
    basic_auth: str = ""
    api_key: str = ""
    content_type: str = DEFAULT_CONTENT_TYPE
    successes: int = 0
    failures: int = 0


# -- building one request ----------------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """`X-Wforce-Signature`: standard Base64 of the HMAC-SHA256 of the exact body bytes."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def new_delivery_id(now: float, hook: CustomWebHook) -> str:
    """`X-Wforce-Delivery` of an alert with no cause that survives a restart (a custom endpoint,
    a console command): 44 characters of Base64 SHA-256, as the original's.

    The original hashed the time, hook id and name only, so two deliveries of one hook in the
    same microsecond shared an id; 16 random bytes make each id unique. The id is stored with
    the delivery, so every retry of it carries the same one.
    """
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%b-%d %H:%M:%S.%f")
    material = f"{stamp}{hook.id}{hook.name}".encode("utf-8") + os.urandom(16)
    return _base64_sha256(material)


def caused_delivery_id(cause: str, hook: CustomWebHook, body: bytes) -> str:
    """`X-Wforce-Delivery` of an alert with a replayable cause: a function of the cause, the
    hook and the body only, in the original's 44-character form.

    A report policy runs again over recent events after a kill -9 (at least once); a run with
    the same cause sending the same body to the same hook is the same alert, so it must carry
    the same id for a receiver to recognise it. The JSON prefix keeps the fields apart (no
    cause, hook name or body can be mistaken for another split of the same bytes).
    """
    prefix = json.dumps(["trackalert-alert-1", cause, hook.id, hook.name], ensure_ascii=True)
    return _base64_sha256(prefix.encode("ascii") + b"\n" + body)


def _base64_sha256(material: bytes) -> str:
    return base64.b64encode(hashlib.sha256(material).digest()).decode("ascii")


def build_delivery(hook: CustomWebHook, body: bytes, now: float, cause: str | None = None,
                   seq: int | None = None) -> Delivery:
    """The complete request for one `runCustomWebHook` call, ready to be stored and sent."""
    delivery_id = new_delivery_id(now, hook) if cause is None else caused_delivery_id(cause, hook, body)
    headers = {
        "Content-Type": hook.content_type or DEFAULT_CONTENT_TYPE,
        "X-Wforce-Event": hook.name,
        "X-Wforce-HookID": str(hook.id),
        "X-Wforce-Delivery": delivery_id,
    }
    if hook.secret:
        headers["X-Wforce-Signature"] = sign(hook.secret, body)
    if hook.basic_auth:
        token = base64.b64encode(hook.basic_auth.encode("utf-8")).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    if hook.api_key:
        headers["X-API-Key"] = hook.api_key
    return Delivery(
        delivery_id=delivery_id, hook_id=hook.id, hook_name=hook.name, url=hook.url, body=body,
        headers=headers, created=now, next_attempt=now, seq=seq,
    )


# -- the registry and the outbox in front of the sender ----------------------------------------


class WebHooks:
    """Every custom webhook, the outbox their deliveries wait in and the sender that drains it."""

    def __init__(
        self,
        settings: "Settings",
        metrics: "Metrics",
        clock: "Clock",
        rng: random.Random | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self._policy = policy or RetryPolicy()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.hooks: list[CustomWebHook] = []
        self._outbox: Outbox | None = None
        self.sender: Sender | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Where each call is recorded: the event log's alerts, set once the log is open (None:
        #: not recorded, e.g. a config checked without its log).
        self.alerts: "AlertStore | None" = None

    # -- registration ----------------------------------------------------------------------------

    def add(self, name: str, keys: Mapping[str, str]) -> CustomWebHook | None:
        """`addCustomWebHook`: register a hook (ids count every call, failed ones included)."""
        with self._lock:
            hook_id = next(self._ids)
        for key in keys:
            if key in INERT_KEYS:
                log.logger.warning(
                    "addCustomWebHook(): key '%s' has no effect for custom webhook %s", key, name
                )
            elif key not in KNOWN_KEYS:
                log.logger.warning(
                    "addCustomWebHook(): unknown key '%s' for custom webhook %s is ignored "
                    "(known keys: %s)", key, name, ", ".join(KNOWN_KEYS),
                )
        problem = _check_keys(keys)
        if problem:
            log.logger.error(
                "Registering custom webhook id=%d name=%s from Lua failed [%s]", hook_id, name, problem
            )
            return None
        hook = CustomWebHook(
            id=hook_id, name=name, url=keys["url"], secret=keys.get("secret", ""),
            basic_auth=keys.get("basic-auth", ""), api_key=keys.get("api-key", ""),
            content_type=keys.get("content-type", "") or DEFAULT_CONTENT_TYPE,
        )
        with self._lock:
            self.hooks.append(hook)
        self._metrics.register_custom_webhook(hook.id, hook.url)
        self._metrics.register_webhook_outcomes(hook.id, hook.url)
        log.logger.info("Registering custom webhook id=%d name=%s to url (%s)", hook.id, name, hook.url)
        if self._loop is not None:  # added from the console: make sure the sender runs
            self._loop.call_soon_threadsafe(self._start_sender_soon)
        return hook

    def find(self, name: str) -> CustomWebHook | None:
        """The first hook registered under `name` (duplicate names are allowed, as before)."""
        with self._lock:
            return next((hook for hook in self.hooks if hook.name == name), None)

    # -- runCustomWebHook (Lua worker threads) ---------------------------------------------------

    def run(self, name: str, body: bytes, cause: str | None = None, seq: int | None = None,
            time: float | None = None) -> bool:
        """Store one delivery durably; true once it is on disk, false (and logged) otherwise.

        `cause` (what made the policy send it, see `caused_delivery_id`) makes the delivery id
        repeatable; the same alert again while the first still waits in the outbox is stored
        once. `seq` (the event `report` judged) is stored with it to trace the alert. The call
        is recorded in `alerts` (dropped when the outbox refused it) at `time`, the causing
        event's received (default: now)."""
        hook = self.find(name)
        if hook is None:
            log.logger.error(
                "Attempting to run custom webhook with name %s but no such webhook exists!", name
            )
            return False
        delivery = build_delivery(hook, body, self._clock.time(), cause, seq)
        new = self._record(delivery, time)  # first: the sender may settle it at once
        try:
            self.outbox().enqueue(delivery, self._settings.webhooks.queue_size)
        except OutboxFull as full:
            if new:
                self._settled(delivery, "dropped", 0, f"outbox full ({full.depth} deliveries)")
            self._metrics.webhook_outbox_full(hook.id, hook.url)
            log.logger.error(
                "runCustomWebHook: webhook outbox at max size (%d) - NOT queueing webhook id=%d "
                "for event (%s); runCustomWebHook returned false (raise setWebHookQueueSize or "
                "check the receiver at %s)", full.depth, hook.id, name, hook.url,
            )
            return False
        except (sqlite3.Error, OSError) as exc:
            if new:
                self._settled(delivery, "dropped", 0, f"outbox: {exc}")
            log.logger.error(
                "runCustomWebHook: cannot store webhook id=%d for event (%s) in the outbox %s: %s",
                hook.id, name, self.outbox_path(), exc,
            )
            return False
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._wake_sender)
            except RuntimeError:  # the loop is gone (shutting down): the next start sends it
                pass
        return True

    def _record(self, delivery: Delivery, time: float | None) -> bool:
        """The alert record of one call, before the outbox has it (once it has, the sender may
        settle it before a record written after would exist); True when it is new. A failure
        is logged, not raised: an alert is worth more sent than recorded."""
        alerts = self.alerts
        if alerts is None:
            return False
        alert = new_alert(delivery.delivery_id, delivery.hook_name, delivery.body,
                          delivery.created if time is None else time, delivery.created,
                          delivery.seq)
        try:
            return alerts.record(alert)
        except Exception as exc:  # noqa: BLE001 - any store's error (SQLite, Elasticsearch)
            log.logger.error("runCustomWebHook: cannot record alert %s of webhook %s in the event "
                             "log: %s", delivery.delivery_id, delivery.hook_name, exc)
            return False

    def _settled(self, delivery: Delivery, outcome: str, attempts: int, error: str) -> None:
        """An attempt's outcome written back to the alert record: from the sender's outbox
        thread, or from `run` (the worker) when the outbox refused the delivery."""
        alerts = self.alerts
        if alerts is None:
            return
        at = None if outcome == "pending" else self._clock.time()  # dropped: settled at once
        try:
            alerts.settle(delivery.delivery_id, outcome, attempts, error, at)
        except Exception as exc:  # noqa: BLE001 - as in _record
            log.logger.error("Webhook delivery %s: cannot record its outcome (%s) in the event "
                             "log: %s", delivery.delivery_id, outcome, exc)

    # -- the outbox ------------------------------------------------------------------------------

    def outbox_path(self) -> str:
        configured = self._settings.webhooks.outbox_path
        return os.path.join(self._settings.config_dir, configured or OUTBOX_FILE)

    def outbox(self) -> Outbox:
        """The outbox, opened on first use: a config without webhooks creates no file."""
        with self._lock:
            if self._outbox is None:
                outbox = Outbox(self.outbox_path())
                outbox.open()
                self._outbox = outbox
            return self._outbox

    def depth(self) -> int:
        """Deliveries waiting (0 while no outbox is open)."""
        outbox = self._outbox
        return outbox.depth() if outbox is not None else 0

    # -- lifecycle (event loop) ------------------------------------------------------------------

    async def start(self) -> None:
        """Start delivering when there is anything to deliver: hooks, or an outbox left over
        from before a restart. Raises RuntimeError when the outbox cannot be opened."""
        self._loop = asyncio.get_running_loop()
        self._metrics.set_webhook_queue_source(self.depth)
        self._metrics.set_webhook_outbox_source(self.depth)
        if self.hooks or os.path.exists(self.outbox_path()):
            try:
                self.outbox()
            except (sqlite3.Error, OSError) as exc:
                raise RuntimeError(f"Cannot open the webhook outbox {self.outbox_path()}: {exc}") from exc
            await self._start_sender()

    async def stop(self) -> None:
        """Stop sending; whatever was not delivered stays in the outbox for the next start."""
        self._loop = None
        if self.sender is not None:
            await self.sender.stop()
            self.sender = None
        with self._lock:
            outbox, self._outbox = self._outbox, None
        if outbox is not None:
            outbox.close()

    async def _start_sender(self) -> None:
        if self.sender is not None:
            return
        self.sender = Sender(
            self.outbox(), self._settings.webhooks, self._metrics, self._clock,
            on_result=self._count, on_settled=self._settled, rng=self._rng, policy=self._policy,
        )
        await self.sender.start()

    def _start_sender_soon(self) -> None:
        if self.sender is None and self._loop is not None:
            task = asyncio.ensure_future(self._start_sender())
            task.add_done_callback(_log_failure)

    def _wake_sender(self) -> None:
        if self.sender is not None:
            self.sender.wake()
        else:
            self._start_sender_soon()

    def _count(self, delivery: Delivery, ok: bool) -> None:
        """Per-hook counts for showCustomWebHooks (deliveries stored before a restart count
        against the hook that now has their id)."""
        with self._lock:
            hook = next((h for h in self.hooks if h.id == delivery.hook_id), None)
            if hook is None:
                return
            if ok:
                hook.successes += 1
            else:
                hook.failures += 1

    # -- console ---------------------------------------------------------------------------------

    def show(self) -> str:
        """`showCustomWebHooks()`, in the original's `%-9d %-20.20s %-9d %-9d %-s` layout."""
        fmt = "{:<9} {:<20.20} {:<9} {:<9} {}\n"
        with self._lock:
            rows = [(h.id, h.name, h.successes, h.failures, h.url) for h in self.hooks]
        return fmt.format("ID", "Name", "Successes", "Failures", "URL") + "".join(
            fmt.format(*row) for row in rows
        )


def _check_keys(keys: Mapping[str, str]) -> str:
    url = keys.get("url")
    if not url:
        return "Missing mandatory configuration key: url"
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        return f"Unsupported URL scheme in {url}: only http and https are allowed"
    return ""


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.logger.error("Cannot start the webhook sender: %s", task.exception())
