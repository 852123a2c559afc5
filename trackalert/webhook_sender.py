"""Delivers the outbox's custom webhooks: concurrently, with retries, until accepted or expired.

Policy, per delivery:

* 2xx: delivered; removed from the outbox.
* 4xx other than 408 and 429: the receiver refuses this request for good (bad URL, bad
  credentials, bad body); retrying would only repeat it. Removed, logged, counted as a
  permanent failure.
* Anything else (transport error, timeout, 3xx since redirects are not followed, 408, 429,
  5xx): retried with exponential backoff and jitter, honouring a `Retry-After` in seconds,
  until the delivery's expiry (`setWebHookExpiry`) passes; the last attempt is made at the
  expiry, and if it fails too the delivery is removed, logged and counted as expired.

Concurrency is `setNumWebHookThreads` × `setNumWebHookConnsPerThread` requests in flight (5 × 10
by default), all on the event loop; outbox reads and writes run in one dedicated thread so an
fsync never stalls the loop. The clock and the random source for jitter are injected, so tests
drive retries on a virtual clock.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import aiohttp

from trackalert import __version__, log
from trackalert.durations import format_span

if TYPE_CHECKING:
    from trackalert.clock import Clock
    from trackalert.metrics import Metrics
    from trackalert.outbox import Delivery, Outbox
    from trackalert.settings import WebHookSettings

__all__ = ["RetryPolicy", "Sender", "build_ssl_context", "classify", "expand_url"]

T = TypeVar("T")

#: The longest single wait for the next due delivery; the wall clock is re-read this often.
MAX_NAP = 60.0
#: After an outbox read or write fails (disk full, ...), wait this long before trying again.
OUTBOX_ERROR_PAUSE = 1.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with "equal jitter": the n-th retry waits between half and all of
    `first_delay * factor**(n-1)`, capped at `max_delay`. Jitter spreads the retries of many
    deliveries that failed together, so a receiver coming back is not hit by all at once."""

    first_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0
    #: A receiver's `Retry-After` is honoured up to this long.
    max_retry_after: float = 3600.0

    def delay(self, attempts: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait after the `attempts`-th failed attempt."""
        ceiling = min(self.max_delay, self.first_delay * self.factor ** max(0, attempts - 1))
        wait = ceiling / 2 + rng.random() * ceiling / 2
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait


def classify(status: int | None) -> str:
    """`ok`, `retry` or `permanent` for an HTTP status (None: no response at all)."""
    if status is not None and 200 <= status < 300:
        return "ok"
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return "permanent"
    return "retry"


def expand_url(template: str, now: float) -> str:
    """Replace `%{YYYY}`, `%{MM}` and `%{dd}` with the UTC date at send time (e.g. one
    Elasticsearch index per day). Anything else, such as `${MM}`, is sent literally."""
    day = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    return (
        template.replace("%{YYYY}", f"{day.year:04d}")
        .replace("%{MM}", f"{day.month:02d}")
        .replace("%{dd}", f"{day.day:02d}")
    )


def build_ssl_context(settings: "WebHookSettings") -> ssl.SSLContext:
    """The outgoing TLS settings: verification on by default, as libcurl's."""
    context = ssl.create_default_context(cafile=settings.ca_bundle or None)
    if not settings.verify_host or not settings.verify_peer:
        context.check_hostname = False
    if not settings.verify_peer:
        context.verify_mode = ssl.CERT_NONE
    if settings.client_cert:
        context.load_cert_chain(settings.client_cert, settings.client_key or None)
    return context


class Sender:
    """Drains an outbox on the event loop."""

    def __init__(
        self,
        outbox: "Outbox",
        settings: "WebHookSettings",
        metrics: "Metrics",
        clock: "Clock",
        on_result: Callable[["Delivery", bool], None] = lambda delivery, ok: None,
        on_settled: Callable[["Delivery", str, int, str], None] = lambda d, outcome, n, error: None,
        rng: random.Random | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._outbox = outbox
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._on_result = on_result
        #: (delivery, outcome, attempts, error) after each attempt, in the outbox thread, before
        #: the outbox is updated (a crash in between sends it again, as before): outcome
        #: "delivered", "refused", "expired", or "pending" when it is retried.
        self._on_settled = on_settled
        self._rng = rng or random.Random()
        self._policy = policy or RetryPolicy()
        self.concurrency = max(1, settings.threads) * max(1, settings.conns_per_thread)
        self._db = ThreadPoolExecutor(1, thread_name_prefix="webhook-outbox")
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        #: When the sender next looks at the outbox by itself (None: only when woken).
        self.waiting_until: float | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        connector = aiohttp.TCPConnector(ssl=build_ssl_context(self._settings), limit=self.concurrency)
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": f"trackalert/{__version__}"},
        )
        self._task = asyncio.create_task(self._run(), name="webhook-sender")

    async def stop(self, timeout: float | None = None) -> None:
        """Stop; requests in flight get `timeout` (default: the request timeout) to finish.
        An interrupted delivery stays in the outbox and is sent again after the restart."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        inflight = list(self._inflight.values())
        if inflight:
            wait = self._settings.timeout_seconds + 1 if timeout is None else timeout
            _, pending = await asyncio.wait(inflight, timeout=wait)
            for task in pending:
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self._db.shutdown(wait=True)

    def wake(self) -> None:
        """Something was enqueued: look at the outbox now. Call on the loop thread."""
        if self._wake is not None:
            self._wake.set()

    def in_flight(self) -> int:
        return len(self._inflight)

    # -- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            try:
                next_due = await self._dispatch_due()
            except Exception as exc:  # noqa: BLE001 - the outbox is unreadable for now
                log.logger.error("Webhook sender cannot read the outbox %s: %s", self._outbox.path, exc)
                next_due = self._clock.time() + OUTBOX_ERROR_PAUSE
            await self._wait(next_due)

    async def _dispatch_due(self) -> float | None:
        """Start sending what is due; when to look again (None: when woken)."""
        free = self.concurrency - len(self._inflight)
        if free <= 0:
            return None
        exclude = frozenset(self._inflight)
        batch = await self._call_db(self._outbox.due, self._clock.time(), free, exclude)
        for delivery in batch:
            self._inflight[delivery.row] = asyncio.create_task(
                self._deliver(delivery), name=f"webhook:{delivery.delivery_id}"
            )
        if len(batch) == free:
            return None  # full: a finished request wakes us
        return await self._call_db(self._outbox.next_due, frozenset(self._inflight))

    async def _wait(self, until: float | None) -> None:
        assert self._wake is not None
        if self._wake.is_set():
            return
        if until is None:
            self.waiting_until = None
            await self._wake.wait()
            return
        delay = until - self._clock.time()
        if delay <= 0:
            return
        self.waiting_until = until
        woken = asyncio.ensure_future(self._wake.wait())
        timer = asyncio.ensure_future(self._nap_until(until))
        try:
            await asyncio.wait((woken, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting_until = None
            woken.cancel()
            timer.cancel()

    async def _nap_until(self, until: float) -> None:
        """Sleep until `until`, the delay taken when the sleep starts, not when it was planned.

        The timer task only starts on a later turn of the loop, after `waiting_until` already
        says we wait: a clock moved in between (a VirtualClock advanced past `until`) must wake
        it at once. A delay computed before would sleep that long again from the new time: a
        lost wake-up that left due deliveries unsent until something else woke the sender.
        """
        delay = until - self._clock.time()
        if delay > 0:
            await self._clock.sleep(min(delay, MAX_NAP))

    async def _call_db(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._db, fn, *args)

    # -- one attempt -----------------------------------------------------------------------------

    async def _deliver(self, delivery: "Delivery") -> None:
        try:
            status, retry_after, error = await self._attempt(delivery)
            await self._settle(delivery, status, retry_after, error)
        except Exception as exc:  # noqa: BLE001 - never lose the loop over one delivery
            log.logger.error(
                "Webhook id=%d delivery %s: cannot update the outbox: %s",
                delivery.hook_id, delivery.delivery_id, exc,
            )
            await self._clock.sleep(OUTBOX_ERROR_PAUSE)
        finally:
            self._inflight.pop(delivery.row, None)
            self.wake()

    async def _attempt(self, delivery: "Delivery") -> tuple[int | None, float | None, str]:
        """Send once: (HTTP status or None, Retry-After seconds or None, error text)."""
        assert self._session is not None
        url = expand_url(delivery.url, self._clock.time())
        if log.verbose():
            log.logger.debug(
                "Webhook id=%d starting for event (%s) to url (%s) with delivery id (%s) and "
                "hook_data (%s)", delivery.hook_id, delivery.hook_name, url,
                delivery.delivery_id, delivery.body.decode("utf-8", "replace"),
            )
        timeout = aiohttp.ClientTimeout(total=self._settings.timeout_seconds)
        try:
            async with self._session.post(
                url, data=delivery.body, headers=delivery.headers, allow_redirects=False,
                timeout=timeout,
            ) as response:
                await response.read()
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            return None, None, f"Timeout was reached ({self._settings.timeout_seconds:g} s)"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return None, None, str(exc) or type(exc).__name__
        if 200 <= status < 300:
            return status, None, ""
        return status, retry_after, f"Received non-2XX response from webserver: {status}"

    async def _settle(
        self, delivery: "Delivery", status: int | None, retry_after: float | None, error: str
    ) -> None:
        outcome = classify(status)
        ok = outcome == "ok"
        self._metrics.webhook_result(delivery.hook_id, delivery.url, ok)
        self._on_result(delivery, ok)
        attempts = delivery.attempts + 1
        if ok:
            await self._call_db(self._on_settled, delivery, "delivered", attempts, "")
            await self._call_db(self._outbox.remove, delivery.row)
            if log.verbose():
                log.logger.info("Webhook id=%d succeeded to url (%s)", delivery.hook_id, delivery.url)
            return
        now = self._clock.time()
        deadline = delivery.created + self._settings.expiry_seconds
        if outcome == "permanent":
            await self._call_db(self._on_settled, delivery, "refused", attempts, error)
            await self._call_db(self._outbox.remove, delivery.row)
            self._metrics.webhook_permanent_failure(delivery.hook_id, delivery.url)
            log.logger.error(
                "Webhook id=%d failed to url (%s): [%s] - permanent failure, delivery %s for "
                "event (%s) dropped after %d attempt(s)", delivery.hook_id, delivery.url, error,
                delivery.delivery_id, delivery.hook_name, attempts,
            )
        elif now >= deadline:
            await self._call_db(self._on_settled, delivery, "expired", attempts, error)
            await self._call_db(self._outbox.remove, delivery.row)
            self._metrics.webhook_expired(delivery.hook_id, delivery.url)
            log.logger.error(
                "Webhook id=%d failed to url (%s): [%s] - delivery %s for event (%s) expired "
                "after %d attempt(s) over %s", delivery.hook_id, delivery.url, error,
                delivery.delivery_id, delivery.hook_name, attempts, format_span(now - delivery.created),
            )
        else:
            wait = self._policy.delay(attempts, self._rng, retry_after)
            next_attempt = min(now + wait, deadline)
            await self._call_db(self._on_settled, delivery, "pending", attempts, error)
            await self._call_db(self._outbox.reschedule, delivery.row, attempts, next_attempt, error)
            self._metrics.webhook_retry(delivery.hook_id, delivery.url)
            log.logger.error(
                "Webhook id=%d failed to url (%s): [%s] - retry %d of delivery %s in %s",
                delivery.hook_id, delivery.url, error, attempts, delivery.delivery_id,
                format_span(round(next_attempt - now, 3)),
            )


def _retry_after(value: str | None) -> float | None:
    """A `Retry-After` in seconds (the HTTP-date form is ignored: the backoff applies)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
