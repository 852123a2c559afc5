"""Custom webhooks end to end: Lua `runCustomWebHook` → persisted outbox → a real HTTP receiver on
loopback. Retries and expiry run on a virtual clock with a seeded random source for jitter; the
restart test uses a real daemon that is killed with deliveries pending."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import logging
import random
import socket
import sqlite3
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from trackalert.clock import VirtualClock
from trackalert.lua.host import Host
from trackalert.lua.state import LuaState, StateKind
from trackalert.settings import Settings, WebHookSettings
from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for
from trackalert.webhook_sender import RetryPolicy, build_ssl_context, classify
from trackalert.webhooks import WebHooks, new_delivery_id, sign

SECRET = "s3cret"
#: 31 December 2023, 23:59:00 UTC.
NEW_YEARS_EVE = datetime.datetime(2023, 12, 31, 23, 59, tzinfo=datetime.timezone.utc).timestamp()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float | None
    signature_ok: bool
    status: int = 200


class Receiver:
    """A webhook receiver on 127.0.0.1 that checks signatures and answers as told."""

    def __init__(self, clock: VirtualClock | None = None, secret: str = SECRET,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.clock = clock
        self.secret = secret
        self.ssl_context = ssl_context
        self.port = free_port()
        self.requests: list[Received] = []
        #: Statuses (or (status, headers)) to answer with, in order; then 200.
        self.answers: list[Any] = []
        #: Paths answered 503 for as long as they are listed here.
        self.refused_paths: set[str] = set()
        self._runner: web.AppRunner | None = None

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context,
                           reuse_address=True)
        await site.start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        expected = base64.b64encode(hmac.new(self.secret.encode(), body, hashlib.sha256).digest()).decode()
        if request.path in self.refused_paths:
            answer: Any = 503
        else:
            answer = self.answers.pop(0) if self.answers else 200
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        self.requests.append(Received(
            path=request.path_qs, headers=dict(request.headers), body=body,
            at=self.clock.time() if self.clock else None,
            signature_ok=request.headers.get("X-Wforce-Signature") == expected, status=status,
        ))
        return web.Response(status=status, headers=headers, text="{}")

    def delivery_ids(self) -> list[str]:
        return [r.headers["X-Wforce-Delivery"] for r in self.requests]


class Hooks:
    """Config and worker Lua states sharing a `WebHooks` on a virtual clock."""

    def __init__(self, tmp_path: Path, config: str, start: float = NEW_YEARS_EVE, seed: int = 7) -> None:
        self.clock = VirtualClock(start)
        self.host = Host(settings=Settings(config_dir=str(tmp_path)), clock=self.clock)
        self.seed = seed
        self.webhooks = WebHooks(self.host.settings, self.host.metrics, self.clock, rng=random.Random(seed))
        self.host.webhooks = self.webhooks
        self.config = LuaState(StateKind.CONFIG, self.host)
        self.config.execute(config, "trackalert.conf")
        self.worker = LuaState(StateKind.WORKER, self.host)
        self.worker.execute(config, "trackalert.conf")

    async def __aenter__(self) -> "Hooks":
        await self.webhooks.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.webhooks.stop()

    def run(self, name: str, data: str) -> bool:
        g = self.worker.lua.globals()
        g.hook_name, g.hook_data = name, data
        (ok,) = self.worker.execute("return runCustomWebHook(hook_name, hook_data)")
        return ok

    def pending(self):
        return self.webhooks.outbox().pending()

    async def until_attempted(self, attempts: int, count: int | None = None) -> None:
        """Wait until every stored delivery has failed `attempts` times and the sender waits."""
        def settled() -> bool:
            pending = self.pending()
            sender = self.webhooks.sender
            return (
                (count is None or len(pending) == count)
                and all(d.attempts >= attempts for d in pending)
                and sender is not None and sender.in_flight() == 0 and sender.waiting_until is not None
            )
        assert await wait_for(settled), f"deliveries did not reach {attempts} attempts: {self.pending()}"

    async def advance_to(self, when: float) -> None:
        await self.clock.advance(max(0.0, when - self.clock.time()))

    def metric(self, sample: str, **labels: str) -> float:
        for family in text_string_to_metric_families(self.host.metrics.render().decode()):
            for s in family.samples:
                if s.name == sample and s.labels == labels:
                    return s.value
        raise AssertionError(f"no sample {sample}{labels}")


def hook_config(url: str, extra: str = "", keys: str = f'secret="{SECRET}"') -> str:
    return f'addCustomWebHook("alert", {{url="{url}", {keys}}})\n{extra}'


async def test_headers_and_signature_are_verified_by_the_receiver(tmp_path: Path) -> None:
    receiver = await Receiver().start()
    try:
        async with Hooks(tmp_path, hook_config(f"http://127.0.0.1:{receiver.port}/hook")) as hooks:
            body = '{"login": "alice", "note": "caf\u00e9 % ${MM}"}'
            assert hooks.run("alert", body) is True
            assert hooks.run("alert", body) is True
            assert await wait_for(lambda: len(receiver.requests) == 2 and hooks.webhooks.depth() == 0)
            assert hooks.metric("trackalert_custom_webhook_events_total", id="1",
                                url=f"http://127.0.0.1:{receiver.port}/hook", status="ok") == 2
            hooks.config.execute("showCustomWebHooks()")
            shown = hooks.host.take_console_output()
    finally:
        await receiver.stop()
    first, second = receiver.requests
    assert first.path == "/hook" and first.body == body.encode()
    assert first.signature_ok and second.signature_ok
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["X-Wforce-Event"] == "alert"
    assert first.headers["X-Wforce-HookID"] == "1"
    assert first.headers["X-Wforce-Signature"] == sign(SECRET, body.encode())
    delivery_ids = receiver.delivery_ids()
    assert len(set(delivery_ids)) == 2, "every delivery has its own id"
    assert all(len(d) == 44 and len(base64.b64decode(d)) == 32 for d in delivery_ids)
    assert "Authorization" not in first.headers and "X-API-Key" not in first.headers
    assert shown == (
        "ID        Name                 Successes Failures  URL\n"
        f"1         alert                2         0         http://127.0.0.1:{receiver.port}/hook\n"
    )


async def test_date_macros_basic_auth_api_key_and_content_type(tmp_path: Path) -> None:
    clock_receiver = Receiver()
    await clock_receiver.start()
    clock_receiver.answers = [503]
    port = clock_receiver.port
    config = hook_config(
        f"http://127.0.0.1:{port}/idx-%{{YYYY}}.%{{MM}}.%{{dd}}/${{MM}}",
        keys='["basic-auth"]="wforce:pa:ss", ["api-key"]="key-123", ["content-type"]="text/plain"',
    )
    try:
        # half a second before midnight: the first retry (after 0.5-1 s) is sent on another date
        async with Hooks(tmp_path, config, start=NEW_YEARS_EVE + 59.5) as hooks:
            clock_receiver.clock = hooks.clock
            assert hooks.run("alert", "plain text")
            await hooks.until_attempted(1, count=1)
            await hooks.advance_to(hooks.pending()[0].next_attempt)
            assert await wait_for(lambda: len(clock_receiver.requests) == 2 and hooks.webhooks.depth() == 0)
    finally:
        await clock_receiver.stop()
    first, retry = clock_receiver.requests
    assert first.path == "/idx-2023.12.31/$%7BMM%7D"  # `${MM}` is not a macro: sent as is
    assert retry.path == "/idx-2024.01.01/$%7BMM%7D"
    assert first.headers["X-Wforce-Delivery"] == retry.headers["X-Wforce-Delivery"], "same delivery, same id"
    assert base64.b64decode(first.headers["Authorization"].removeprefix("Basic ")) == b"wforce:pa:ss"
    assert first.headers["X-API-Key"] == "key-123"
    assert first.headers["Content-Type"] == "text/plain"
    assert "X-Wforce-Signature" not in first.headers


async def test_registration_errors_unknown_keys_and_unknown_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trackalert")
    config = """
addCustomWebHook("nourl", {secret="x"})
addCustomWebHook("ftp", {url="ftp://127.0.0.1/x"})
addCustomWebHook("alert", {url="http://127.0.0.1:9/x", kafka=true, colour="blue"})
"""
    async with Hooks(tmp_path, config) as hooks:
        assert [(h.id, h.name) for h in hooks.webhooks.hooks] == [(3, "alert")]
        assert hooks.run("nosuch", "{}") is False
    text = caplog.text
    assert "Registering custom webhook id=1 name=nourl from Lua failed [Missing mandatory configuration key: url]" in text
    assert "Registering custom webhook id=2 name=ftp from Lua failed [Unsupported URL scheme" in text
    assert "Registering custom webhook id=3 name=alert to url (http://127.0.0.1:9/x)" in text
    assert "key 'kafka' has no effect for custom webhook alert" in text
    assert "unknown key 'colour' for custom webhook alert is ignored" in text
    assert "Attempting to run custom webhook with name nosuch but no such webhook exists!" in text


def test_webhook_functions_work_only_where_documented(tmp_path: Path) -> None:
    hooks = Hooks(tmp_path, hook_config("http://127.0.0.1:9/x"))
    assert hooks.config.execute('return runCustomWebHook("alert", "{}")') == ()  # config: no-op
    hooks.worker.execute('addCustomWebHook("other", {url="http://127.0.0.1:9/y"})')  # worker: no-op
    assert [h.name for h in hooks.webhooks.hooks] == ["alert"]
    hooks.config.execute(
        'setNumWebHookThreads(2); setNumWebHookConnsPerThread(3); setWebHookQueueSize(9); '
        'setWebHookTimeoutSecs(4); setWebHookExpiry("2h"); setWebHookOutbox("box.db"); '
        'disableCurlHostVerification()'
    )
    settings = hooks.host.settings.webhooks
    assert (settings.threads, settings.conns_per_thread, settings.queue_size, settings.timeout_seconds,
            settings.expiry_seconds, settings.outbox_path, settings.verify_host, settings.verify_peer) == (
        2, 3, 9, 4, 7200.0, "box.db", False, True)
    assert hooks.webhooks.outbox_path() == str(tmp_path / "box.db")
    assert not (tmp_path / "trackalert-outbox.db").exists(), "no delivery yet, no file"


def test_retry_policy_and_classification() -> None:
    policy = RetryPolicy()
    rng = random.Random(1)
    for attempts, ceiling in [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (30, 300)]:
        wait = policy.delay(attempts, rng)
        assert ceiling / 2 <= wait <= ceiling
    assert policy.delay(1, rng, retry_after=120) == 120
    assert policy.delay(1, rng, retry_after=10**6) == 3600
    assert [classify(s) for s in (200, 204, 299)] == ["ok"] * 3
    assert [classify(s) for s in (400, 401, 403, 404, 410, 422)] == ["permanent"] * 6
    assert [classify(s) for s in (None, 301, 408, 429, 500, 502, 503)] == ["retry"] * 7


async def test_backoff_with_jitter_and_retry_after_on_the_virtual_clock(tmp_path: Path) -> None:
    receiver = Receiver()
    receiver.answers = [503, 500, (429, {"Retry-After": "120"}), 200]
    await receiver.start()
    try:
        async with Hooks(tmp_path, hook_config(f"http://127.0.0.1:{receiver.port}/")) as hooks:
            receiver.clock = hooks.clock
            start = hooks.clock.time()
            assert hooks.run("alert", "{}")
            for attempts in (1, 2, 3):
                await hooks.until_attempted(attempts, count=1)
                [delivery] = hooks.pending()
                assert delivery.last_error.startswith("Received non-2XX response from webserver: 5") or attempts == 3
                await hooks.advance_to(delivery.next_attempt)
            assert await wait_for(lambda: len(receiver.requests) == 4 and hooks.webhooks.depth() == 0)
            url = f"http://127.0.0.1:{receiver.port}/"
            assert hooks.metric("trackalert_webhook_retries_total", id="1", url=url) == 3
            assert hooks.metric("trackalert_custom_webhook_events_total", id="1", url=url, status="error") == 3
            assert hooks.metric("trackalert_custom_webhook_events_total", id="1", url=url, status="ok") == 1
    finally:
        await receiver.stop()
    replica, policy = random.Random(hooks.seed), RetryPolicy()
    d1 = policy.delay(1, replica)
    d2 = policy.delay(2, replica)
    d3 = policy.delay(3, replica, retry_after=120)
    assert 0.5 <= d1 <= 1 and 1 <= d2 <= 2 and d3 == 120
    assert [r.at for r in receiver.requests] == pytest.approx(
        [start, start + d1, start + d1 + d2, start + d1 + d2 + d3], abs=1e-6)
    assert len(set(receiver.delivery_ids())) == 1


async def test_a_clock_moved_past_the_wait_before_its_timer_starts_still_wakes_the_sender(tmp_path: Path) -> None:
    """The sender says it waits (waiting_until) one turn of the loop before its timer sleeps:
    a clock advanced in that turn must not be lost (it was: the test below hung 1 run in ~20
    under load, the 5th attempts never made)."""
    async with Hooks(tmp_path, hook_config("http://127.0.0.1:9/alerts")) as hooks:
        sender = hooks.webhooks.sender
        until = hooks.clock.time() + 30.0
        waiting = asyncio.ensure_future(sender._wait(until))
        await asyncio.sleep(0)  # _wait has run up to its own await; its timer task has not
        assert sender.waiting_until == until
        await hooks.advance_to(until + 1.0)  # no sleeper registered yet: nothing to wake
        for _ in range(20):
            if waiting.done():
                break
            await asyncio.sleep(0)
        assert waiting.done(), "the sender slept on past a deadline the clock had passed"
        await waiting


async def test_a_receiver_down_for_a_while_gets_every_delivery_exactly_once(tmp_path: Path) -> None:
    receiver = Receiver()  # not started: connections are refused
    async with Hooks(tmp_path, hook_config(f"http://127.0.0.1:{receiver.port}/alerts")) as hooks:
        receiver.clock = hooks.clock
        for n in range(20):
            assert hooks.run("alert", json.dumps({"n": n}))
        stored_ids = [d.delivery_id for d in hooks.pending()]
        for attempts in (1, 2, 3, 4):
            await hooks.until_attempted(attempts, count=20)
            assert all("Cannot connect" in d.last_error or "refused" in d.last_error.lower() for d in hooks.pending())
            await hooks.advance_to(max(d.next_attempt for d in hooks.pending()))
        await hooks.until_attempted(5, count=20)
        await receiver.start()
        try:
            await hooks.advance_to(max(d.next_attempt for d in hooks.pending()))
            assert await wait_for(lambda: hooks.webhooks.depth() == 0)
            # and nothing is sent again afterwards
            await hooks.clock.advance(3600)
            assert await wait_for(lambda: hooks.webhooks.sender.waiting_until is None and hooks.webhooks.sender.in_flight() == 0)
        finally:
            await receiver.stop()
        url = f"http://127.0.0.1:{receiver.port}/alerts"
        assert hooks.metric("trackalert_webhook_retries_total", id="1", url=url) == 100
        assert hooks.metric("trackalert_custom_webhook_events_total", id="1", url=url, status="ok") == 20
    ids = receiver.delivery_ids()
    assert sorted(ids) == sorted(stored_ids), "every delivery, each exactly once, with its stored id"
    assert sorted(json.loads(r.body)["n"] for r in receiver.requests) == list(range(20))
    assert all(r.signature_ok for r in receiver.requests)


@pytest.mark.parametrize("status", [400, 401, 404, 410])
async def test_a_4xx_is_a_permanent_failure(tmp_path: Path, status: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="trackalert")
    receiver = Receiver()
    receiver.answers = [status]
    await receiver.start()
    try:
        async with Hooks(tmp_path, hook_config(f"http://127.0.0.1:{receiver.port}/")) as hooks:
            assert hooks.run("alert", "{}")
            assert await wait_for(lambda: len(receiver.requests) == 1 and hooks.webhooks.depth() == 0)
            url = f"http://127.0.0.1:{receiver.port}/"
            assert hooks.metric("trackalert_webhook_permanent_failures_total", id="1", url=url) == 1
            assert hooks.metric("trackalert_webhook_retries_total", id="1", url=url) == 0
            await hooks.clock.advance(3600)
    finally:
        await receiver.stop()
    assert len(receiver.requests) == 1
    assert f"Received non-2XX response from webserver: {status}] - permanent failure" in caplog.text


@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_408_429_and_5xx_are_retried(tmp_path: Path, status: int) -> None:
    receiver = Receiver()
    receiver.answers = [status]
    await receiver.start()
    try:
        async with Hooks(tmp_path, hook_config(f"http://127.0.0.1:{receiver.port}/")) as hooks:
            assert hooks.run("alert", "{}")
            await hooks.until_attempted(1, count=1)
            await hooks.advance_to(hooks.pending()[0].next_attempt)
            assert await wait_for(lambda: len(receiver.requests) == 2 and hooks.webhooks.depth() == 0)
    finally:
        await receiver.stop()
    assert len(set(receiver.delivery_ids())) == 1


async def test_expiry_gives_up_loudly_after_a_last_attempt_at_the_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="trackalert")
    receiver = Receiver()
    receiver.answers = [503] * 1000
    await receiver.start()
    try:
        config = hook_config(f"http://127.0.0.1:{receiver.port}/", 'setWebHookExpiry("10m")')
        async with Hooks(tmp_path, config) as hooks:
            receiver.clock = hooks.clock
            created = hooks.clock.time()
            assert hooks.run("alert", "{}")
            for attempts in range(1, 50):
                if hooks.webhooks.depth() == 0:
                    break
                await hooks.until_attempted(attempts, count=1)
                await hooks.advance_to(hooks.pending()[0].next_attempt)
                assert await wait_for(lambda: len(receiver.requests) == attempts + 1)
            assert await wait_for(lambda: hooks.webhooks.depth() == 0)
            url = f"http://127.0.0.1:{receiver.port}/"
            assert hooks.metric("trackalert_webhook_expired_total", id="1", url=url) == 1
    finally:
        await receiver.stop()
    times = [r.at for r in receiver.requests]
    assert times[-1] == created + 600, "the last attempt is made at the expiry"
    assert all(t <= created + 600 for t in times) and len(times) >= 10
    assert "expired after" in caplog.text and f"after {len(times)} attempt(s) over 10m" in caplog.text


async def test_a_full_outbox_refuses_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="trackalert")
    port = free_port()  # nobody listens: everything stays in the outbox
    config = hook_config(f"http://127.0.0.1:{port}/", "setWebHookQueueSize(2)")
    async with Hooks(tmp_path, config) as hooks:
        assert [hooks.run("alert", str(n)) for n in range(3)] == [True, True, False]
        assert hooks.webhooks.depth() == 2
        url = f"http://127.0.0.1:{port}/"
        assert hooks.metric("trackalert_webhook_outbox_full_total", id="1", url=url) == 1
        assert hooks.metric("trackalert_webhook_outbox_depth") == 2
        assert hooks.metric("trackalert_webhook_queue_size") == 2
    assert "webhook outbox at max size (2) - NOT queueing webhook id=1 for event (alert)" in caplog.text


# -- outgoing TLS ----------------------------------------------------------------------------------


def make_cert(directory: Path, name: str, san: str) -> tuple[str, str]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName={san}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    directory = tmp_path_factory.mktemp("certs")
    return {
        "server": make_cert(directory, "server", "IP:127.0.0.1"),
        "elsewhere": make_cert(directory, "elsewhere", "DNS:elsewhere.invalid"),
        "client": make_cert(directory, "client", "DNS:client.invalid"),
    }


@pytest.mark.parametrize(
    ("server", "require_client", "settings", "delivered"),
    [
        ("server", False, "", False),
        ("server", False, 'setCurlCABundleFile("{server}")', True),
        ("server", False, "disableCurlPeerVerification()", True),
        ("elsewhere", False, 'setCurlCABundleFile("{elsewhere}")', False),
        ("elsewhere", False, 'setCurlCABundleFile("{elsewhere}"); disableCurlHostVerification()', True),
        ("server", True, 'setCurlCABundleFile("{server}")', False),
        ("server", True, 'setCurlCABundleFile("{server}"); setCurlClientCertAndKey("{client}", "{client_key}")', True),
    ],
    ids=["untrusted", "ca-bundle", "no-peer-check", "wrong-host", "no-host-check", "no-client-cert", "client-cert"],
)
async def test_outgoing_tls_settings(tmp_path: Path, certs, server: str, require_client: bool,
                                     settings: str, delivered: bool) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certs[server])
    if require_client:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs["client"][0])
    receiver = Receiver(ssl_context=context)
    await receiver.start()
    names = {"server": certs["server"][0], "elsewhere": certs["elsewhere"][0],
             "client": certs["client"][0], "client_key": certs["client"][1]}
    config = hook_config(f"https://127.0.0.1:{receiver.port}/tls", settings.format(**names))
    try:
        async with Hooks(tmp_path, config) as hooks:
            assert hooks.run("alert", "{}")
            if delivered:
                assert await wait_for(lambda: len(receiver.requests) == 1 and hooks.webhooks.depth() == 0)
            else:
                await hooks.until_attempted(1, count=1)
                assert receiver.requests == []
                assert hooks.pending()[0].last_error
    finally:
        await receiver.stop()


def test_a_missing_ca_bundle_is_a_load_time_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"setCurlCABundleFile\(\) file \[.*nope.pem\] does not exist"):
        Hooks(tmp_path, f'setCurlCABundleFile("{tmp_path}/nope.pem")')
    context = build_ssl_context(WebHookSettings(verify_peer=False))
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname


def test_delivery_ids_without_a_cause_are_unique_even_in_the_same_microsecond() -> None:
    from trackalert.webhooks import CustomWebHook

    hook = CustomWebHook(1, "alert", "http://x/")
    ids = {new_delivery_id(1_700_000_000.0, hook) for _ in range(1000)}
    assert len(ids) == 1000


# -- the daemon: killed with deliveries pending, they are sent after the restart ---------------------


def daemon_config(port: int) -> str:
    return listener_config() + f"""
setNumLuaStates(2)
addCustomWebHook("alert", {{url="http://127.0.0.1:{port}/alerts", secret="{SECRET}"}})
setCustomEndpoint("alert", function(args)
  return runCustomWebHook("alert", '{{"login":"' .. args.attrs.login .. '"}}'), {{}}
end)
"""


def stored_deliveries(directory: Path) -> list[tuple[str, int]]:
    path = directory / "trackalert-outbox.db"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        return db.execute("SELECT delivery_id, attempts FROM deliveries ORDER BY row").fetchall()


async def test_a_killed_daemon_sends_pending_deliveries_after_restart(tmp_path: Path) -> None:
    receiver = Receiver()  # down while the first daemon runs
    config = daemon_config(receiver.port)
    process = DaemonProcess(tmp_path, config).start()
    try:
        async with aiohttp.ClientSession() as session:
            for n in range(10):
                body = json.dumps({"attrs": {"login": f"user{n}"}})
                async with session.post(process.url("/command/alert"), data=body, headers=basic_auth()) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["success"] is True, "stored before the answer"
        assert await wait_for(lambda: len(stored_deliveries(tmp_path)) == 10
                              and all(a >= 1 for _, a in stored_deliveries(tmp_path)))
    finally:
        process.kill()
    pending_ids = sorted(d for d, _ in stored_deliveries(tmp_path))
    assert len(pending_ids) == 10
    await receiver.start()
    try:
        with DaemonProcess(tmp_path, config):
            assert await wait_for(lambda: len(receiver.requests) >= 10 and not stored_deliveries(tmp_path), timeout=60)
    finally:
        await receiver.stop()
    assert sorted(receiver.delivery_ids()) == pending_ids, "each pending delivery exactly once, same id"
    assert sorted(json.loads(r.body)["login"] for r in receiver.requests) == [f"user{n}" for n in range(10)]
    assert all(r.signature_ok for r in receiver.requests)


# -- delivery ids derive from what caused the alert ---------------------------------------------------


def rerun_config(port: int) -> str:
    """Every report sends three different alerts (two hooks, two bodies) and one of them twice;
    the first report also alerts a hook the receiver refuses for now, then holds its Lua state
    (so the policy cursor cannot pass it) until the daemon is killed. After the restart it no
    longer holds (the marker file exists)."""
    hooks = "".join(
        f'addCustomWebHook("{name}", {{url="http://127.0.0.1:{port}/{name}", secret="{SECRET}"}})\n'
        for name in ("alert", "audit", "late")
    )
    return listener_config() + hooks + """
setNumLuaStates(3)
function report(lt)
  local body = '{"login":"' .. lt.login .. '"}'
  runCustomWebHook("alert", body)
  runCustomWebHook("alert", body)
  runCustomWebHook("alert", '{"again":"' .. lt.login .. '"}')
  runCustomWebHook("audit", body)
  if lt.login == "first" then
    runCustomWebHook("late", body)
    if not io.open("held") then
      io.open("held", "w"):close()
      local deadline = os.time() + 120
      while os.time() < deadline do os.execute("sleep 0.05") end
    end
  end
end
setReport(report)
"""


def report_cursor(directory: Path) -> int:
    with sqlite3.connect(directory / "trackalert-events.db") as db:
        row = db.execute("SELECT seq FROM cursors WHERE name = 'report'").fetchone()
    return row[0] if row else 0


def accepted(receiver: Receiver) -> list[Received]:
    return [r for r in receiver.requests if r.status == 200]


async def post_reports(process: DaemonProcess, logins: list[str]) -> None:
    async with aiohttp.ClientSession() as session:
        async def post(login: str) -> None:
            body = json.dumps({"login": login, "remote": "192.0.2.1", "success": True})
            async with session.post(process.url("/command/report"), data=body, headers=basic_auth()) as resp:
                assert resp.status == 200
        await asyncio.gather(*(post(login) for login in logins))


async def test_alerts_sent_again_after_a_kill_carry_the_same_delivery_ids(tmp_path: Path) -> None:
    receiver = await Receiver().start()
    receiver.refused_paths = {"/late"}
    logins = ["first"] + [f"user{n}" for n in range(60)]
    alerts = 3 * len(logins)  # alert (two bodies) and audit for each report; late comes on top
    try:
        process = DaemonProcess(tmp_path, rerun_config(receiver.port)).start()
        try:
            await post_reports(process, logins[:1])
            assert await wait_for(lambda: (tmp_path / "held").exists(), timeout=30)
            await post_reports(process, logins[1:])
            assert await wait_for(lambda: len({(r.path, r.body) for r in accepted(receiver)}) == alerts, timeout=60)
            assert report_cursor(tmp_path) == 0, "the held first event keeps the cursor before it"
        finally:
            process.kill()
        refused_late = [r.headers["X-Wforce-Delivery"] for r in receiver.requests if r.path == "/late"]
        assert refused_late and all(r.status == 503 for r in receiver.requests if r.path == "/late")
        receiver.refused_paths = set()
        first_run = len(accepted(receiver))
        with DaemonProcess(tmp_path, rerun_config(receiver.port)) as process:
            assert await wait_for(
                lambda: len(accepted(receiver)) >= first_run + alerts and any(
                    r.path == "/late" for r in accepted(receiver)) and not stored_deliveries(tmp_path),
                timeout=90,
            ), process.output()[-3000:]
            assert "Policy runner resumes after event 0: 61 stored reports still to run" in process.output()
    finally:
        await receiver.stop()
    ids_of: dict[tuple[str, bytes], set[str]] = {}
    for r in accepted(receiver):
        ids_of.setdefault((r.path, r.body), set()).add(r.headers["X-Wforce-Delivery"])
    assert len(ids_of) == alerts + 1
    twice = [key for key in ids_of if sum(1 for r in accepted(receiver) if (r.path, r.body) == key) >= 2]
    assert len(twice) >= alerts, "every alert of the first run was sent again by the re-run"
    assert all(len(ids) == 1 for ids in ids_of.values()), "an alert sent again has its first id"
    by_id = {r.headers["X-Wforce-Delivery"]: (r.path, r.body) for r in accepted(receiver)}
    assert sorted(by_id.values()) == sorted(ids_of), "deduplicated by id: each alert exactly once"
    assert ids_of[("/late", b'{"login":"first"}')] == set(refused_late), "the outbox kept the id over the kill"
    assert all(len(id_) == 44 and base64.b64decode(id_) for id_ in by_id)


BACKGROUND_CONFIG = """
addCustomWebHook("alert", {url="http://127.0.0.1:9/alert"})
addCustomWebHook("audit", {url="http://127.0.0.1:9/audit"})
cronScheduleBackgroundFunc("*/10 * * * *", "sweep")
setBackground("sweep", function()
  runCustomWebHook("alert", "sweep")
  runCustomWebHook("audit", "sweep")
end)
"""


async def background_delivery_ids(directory: Path, minutes: int) -> list[tuple[str, str]]:
    """(hook, delivery id) of what a fresh scheduler's runs over `minutes` virtual minutes
    from NEW_YEARS_EVE put in the outbox (the receiver at port 9 never answers)."""
    from trackalert.lua.pool import LuaPool
    from trackalert.scheduler import Scheduler

    clock = VirtualClock(NEW_YEARS_EVE + 60)  # 00:00 on 1 January
    host = Host(settings=Settings(config_dir=str(directory)), clock=clock)
    host.scheduler = Scheduler(clock, host.metrics)
    host.webhooks = WebHooks(host.settings, host.metrics, clock, rng=random.Random(1))
    config = LuaState(StateKind.CONFIG, host)
    config.execute(BACKGROUND_CONFIG, "trackalert.conf")
    worker = LuaState(StateKind.WORKER, host)
    worker.execute(BACKGROUND_CONFIG, "trackalert.conf")
    pool = LuaPool([worker], clock)
    await host.webhooks.start()
    await host.scheduler.start(pool)
    try:
        await host.scheduler.run_until(clock.time() + minutes * 60)
        return [(d.hook_name, d.delivery_id) for d in host.webhooks.outbox().pending()]
    finally:
        await host.scheduler.stop()
        await host.webhooks.stop()
        pool.close()


async def test_background_alert_ids_derive_from_the_schedule_run(tmp_path: Path) -> None:
    once = await background_delivery_ids(tmp_path / "once", 25)
    again = await background_delivery_ids(tmp_path / "again", 25)
    assert [hook for hook, _ in once] == ["alert", "audit"] * 2  # runs at 00:10 and 00:20
    assert again == once, "the same runs at the same (virtual) times send the same ids"
    assert len({id_ for _, id_ in once}) == 4, "another run time or another hook: another id"


def test_ids_without_a_cause_differ_and_caused_ids_are_stable() -> None:
    from trackalert.webhooks import CustomWebHook, caused_delivery_id

    hook, other = CustomWebHook(1, "alert", "http://x/"), CustomWebHook(2, "alert", "http://x/")
    assert caused_delivery_id("report 7", hook, b"a") == caused_delivery_id("report 7", hook, b"a")
    ids = {caused_delivery_id(c, h, b) for c in ("report 7", "report 8") for h in (hook, other) for b in (b"a", b"b")}
    assert len(ids) == 8
