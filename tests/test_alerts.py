"""The alert stores (eventlog/alerts.py): the filter, the as-of rule, and the same answers from the
replay's memory store, the SQLite table (a real file, migrated by the log) and the Elasticsearch
index (osmem-server, or TRACKALERT_TEST_ES_URL's cluster) for one randomised set of alerts; the
outcome written back, retention, and many threads recording while the log takes appends."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
from pathlib import Path
import uuid
from typing import Any, AsyncIterator

import pytest

from elastic_server import elastic_base, with_prefix  # noqa: F401  (fixtures)
from trackalert.clock import VirtualClock
from trackalert.eventlog.alerts import (
    OUTCOMES, Alert, AlertFilter, AlertStore, MemoryAlerts, alert_table, new_alert,
    parse_alert_filter,
)
from trackalert.eventlog.elasticsearch import ElasticEventLog
from trackalert.eventlog.es_client import async_client, parse_elastic_url
from trackalert.eventlog.es_templates import remove_templates
from trackalert.eventlog.filters import AsOf, FilterError
from trackalert.eventlog.retention import retention_pass
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.report import Report

T0 = 1_700_000_000.0
POLICIES = ["new_country", "password_spray", "account_attack"]
LOGINS = ["alice", "bob", "carol", "dave"]
REMOTES = ["192.0.2.1", "192.0.2.2", "2001:db8::7"]


def body(policy: str | None, login: str | None, remote: str | None) -> bytes:
    alert = {k: v for k, v in (("policy", policy), ("login", login), ("remote", remote)) if v}
    return json.dumps({**alert, "message": "m", "evidence": {"n": 1}}, sort_keys=True).encode()


def history(count: int, seed: int) -> list[Alert]:
    """Alerts of reports (seq 1..count, one report per 60 s) and of background runs (no seq),
    some not JSON, in random outcomes."""
    rng = random.Random(seed)
    alerts = []
    for i in range(count):
        seq = i + 1 if rng.random() < 0.8 else None
        time = T0 + 60 * i
        if rng.random() < 0.1:
            raw = f"plain text alert {i}".encode()
        else:
            raw = body(rng.choice(POLICIES + [None]), rng.choice(LOGINS + [None]),
                       rng.choice(REMOTES + [None]))
        alert = new_alert(f"d{i:05d}", rng.choice(["alerts", "siem"]), raw, time, time + 5, seq,
                          outcome=rng.choice(OUTCOMES))
        alerts.append(alert)
    return alerts


def test_the_filter_is_validated_with_errors_naming_the_key() -> None:
    assert parse_alert_filter([("login", "alice"), ("window", "1d")]) == AlertFilter(
        login="alice", window=86400.0)
    assert parse_alert_filter([("remote", "::ffff:192.0.2.1")]).remote == "192.0.2.1"
    for items, message in [
        ([("logn", "alice")], "unknown alert filter key 'logn'"),
        ([("policy", True)], "filter key 'policy' must be a string, got a boolean"),
        ([("remote", "not an address")], "filter key 'remote'"),
        ([("window", "1 fortnight")], "filter key 'window'"),
        ([("since", "yesterday")], "filter key 'since' must be a number"),
        ([("outcome", "sent")], "'outcome' must be one of pending, delivered"),
        ([(1, "x")], "alert filter keys must be strings"),
    ]:
        with pytest.raises(FilterError, match=message):
            parse_alert_filter(items)


def test_the_body_gives_policy_login_and_remote_when_it_is_a_json_object() -> None:
    alert = new_alert("d", "alerts", body("spray", "alice", "::ffff:192.0.2.9"), T0, T0)
    assert (alert.policy, alert.login, alert.remote) == ("spray", "alice", "192.0.2.9")
    assert alert.decoded_body()["evidence"] == {"n": 1}
    for raw in (b"not json", b"[1, 2]", b'{"policy": 7}'):
        other = new_alert("d", "alerts", raw, T0, T0)
        assert (other.policy, other.login, other.remote) == (None, None, None)
    assert new_alert("d", "a", b"not json", T0, T0).decoded_body() == "not json"


def test_the_as_of_rule_in_report_sees_only_alerts_of_earlier_reports() -> None:
    store = MemoryAlerts()
    store.record(new_alert("a", "h", body("p", "alice", None), T0, T0, seq=5))
    store.record(new_alert("b", "h", body("p", "alice", None), T0 + 1, T0 + 1, seq=None))
    store.record(new_alert("c", "h", body("p", "alice", None), T0 + 2, T0 + 2, seq=6))
    counts = [store.count(AlertFilter(login="alice"), AsOf(before_seq=s, now=T0 + 2))
              for s in (5, 6, 7)]
    assert counts == [0, 1, 2], "report(lt) sees alerts of reports before lt, never background ones"
    assert store.count(AlertFilter(), AsOf(now=T0 + 1)) == 2  # elsewhere: all up to now
    assert store.count(AlertFilter(window=1.5), AsOf(now=T0 + 2)) == 2
    assert [a.delivery_id for a in store.recent(AlertFilter(), 2, AsOf())] == ["c", "b"]


@pytest.fixture(params=["sqlite", "elasticsearch"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AlertStore]:
    """The alerts of a freshly opened log of each backend."""
    if request.param == "sqlite":
        log: SQLiteEventLog | ElasticEventLog = SQLiteEventLog(tmp_path / "events.db", VirtualClock(T0))
    else:
        base = request.getfixturevalue("elastic_base")
        prefix = f"ta-test-{uuid.uuid4().hex[:12]}"
        log = ElasticEventLog(parse_elastic_url(with_prefix(base, prefix)), VirtualClock(T0))
    await log.open()
    try:
        yield log.alerts()
    finally:
        await log.close()
        if request.param == "elasticsearch":
            await remove_indices(log.settings, prefix)


async def remove_indices(settings: Any, prefix: str) -> None:
    client = async_client(settings)
    try:
        await client.options(ignore_status=404).indices.delete(index=f"{prefix}-*")
        await remove_templates(client, prefix)
    finally:
        await client.close()


def filters(rng: random.Random, count: int) -> list[AlertFilter]:
    """Every key alone, and random combinations."""
    chosen = [AlertFilter()]
    chosen += [AlertFilter(policy=p) for p in POLICIES] + [AlertFilter(login=x) for x in LOGINS]
    chosen += [AlertFilter(remote=r) for r in REMOTES] + [AlertFilter(outcome=o) for o in OUTCOMES]
    chosen += [AlertFilter(hook="siem"), AlertFilter(window=3600.0), AlertFilter(since=T0 + 6000),
               AlertFilter(until=T0 + 6000), AlertFilter(since=T0 + 600, until=T0 + 600)]
    for _ in range(count):
        chosen.append(AlertFilter(
            policy=rng.choice(POLICIES + [None]), login=rng.choice(LOGINS + [None, None]),
            remote=rng.choice(REMOTES + [None, None]), hook=rng.choice(["alerts", None, None]),
            window=rng.choice([None, 1800.0, 86400.0]),
            since=rng.choice([None, T0 + 60 * rng.randrange(300)]),
        ))
    return chosen


def as_ofs(rng: random.Random, count: int, size: int) -> list[AsOf]:
    points = [AsOf(), AsOf(now=T0 + 60 * size)]
    for _ in range(count):
        seq = rng.randrange(1, size + 2)
        points.append(AsOf(before_seq=seq, now=T0 + 60 * (seq - 1)))  # in report(lt)
        points.append(AsOf(now=T0 + 60 * rng.randrange(size)))  # background at a time
    return points


async def test_every_store_gives_the_memory_stores_answers(store: AlertStore) -> None:
    alerts = history(400, seed=11)
    reference = MemoryAlerts()
    for alert in alerts:
        assert await asyncio.to_thread(store.record, alert) is True
        reference.record(alert)
    again = await asyncio.to_thread(store.record, alerts[0])
    assert again is False, "the same alert again (same delivery id): still one record"
    rng = random.Random(3)
    nonzero = checked = 0
    for point in as_ofs(rng, 12, len(alerts)):
        for flt in filters(rng, 10):
            want = reference.count(flt, point)
            got = await asyncio.to_thread(store.count, flt, point)
            assert got == want, (flt, point)
            recent = await asyncio.to_thread(store.recent, flt, 7, point)
            assert recent == reference.recent(flt, 7, point), (flt, point)
            nonzero += want > 0
            checked += 1
    assert nonzero > checked // 3, "the filters must select something, or equal answers say little"
    assert await asyncio.to_thread(store.count, AlertFilter(), AsOf()) == 400
    whole = await asyncio.to_thread(store.recent, AlertFilter(), 1000, AsOf())
    assert sorted(whole, key=lambda a: a.delivery_id) == alerts  # every field round-trips


async def test_the_outcome_is_written_back_and_retention_prunes_by_time(store: AlertStore) -> None:
    for alert in history(50, seed=5):
        await asyncio.to_thread(store.record, alert)
    await asyncio.to_thread(store.settle, "d00003", "pending", 2, "Received 503", None)
    await asyncio.to_thread(store.settle, "d00004", "delivered", 1, "", T0 + 9)
    await asyncio.to_thread(store.settle, "unknown", "delivered", 1, "", T0 + 9)  # no error
    found = {a.delivery_id: a for a in await asyncio.to_thread(
        store.recent, AlertFilter(), 100, AsOf())}
    assert (found["d00003"].outcome, found["d00003"].attempts, found["d00003"].error,
            found["d00003"].settled) == ("pending", 2, "Received 503", None)
    assert (found["d00004"].outcome, found["d00004"].settled) == ("delivered", T0 + 9)
    assert await asyncio.to_thread(store.prune, T0 + 60 * 20) == 20
    left = await asyncio.to_thread(store.recent, AlertFilter(), 100, AsOf())
    assert sorted(a.delivery_id for a in left) == [f"d{i:05d}" for i in range(20, 50)]


def report(i: int) -> Report:
    return Report(t=T0 + i, remote="192.0.2.1", login=f"user{i % 50}", pwhash="ab", success=False)


@pytest.mark.parametrize("backend", ["sqlite", "elasticsearch"])
async def test_retention_prunes_alerts_with_the_events_at_scale(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """10,000 events and 1,000 alerts over 200 s; keeping 100 s removes the older half of each
    (one retention pass, as the daemon's, on each backend)."""
    clock = VirtualClock(T0)
    prefix = f"ta-test-{uuid.uuid4().hex[:12]}"
    if backend == "sqlite":
        log: SQLiteEventLog | ElasticEventLog = SQLiteEventLog(tmp_path / "events.db", clock)
    else:
        url = with_prefix(request.getfixturevalue("elastic_base"), prefix)
        log = ElasticEventLog(parse_elastic_url(url), clock)
    await log.open()
    try:
        store = log.alerts()
        for tick in range(200):
            stored = await asyncio.gather(*(log.append(report(tick * 50 + i)) for i in range(50)))
            for appended in stored[:5]:
                await asyncio.to_thread(store.record, new_alert(
                    f"d{appended.seq}", "h", body("p", "alice", None), clock.time(), clock.time(),
                    seq=appended.seq))
            await clock.advance(1.0)
        assert await asyncio.to_thread(store.count, AlertFilter(), AsOf()) == 1000
        removed = await retention_pass(log, clock, keep_seconds=100, delivery_window=86400)
        assert removed == (5000, 0, 500)
        left = await asyncio.to_thread(store.recent, AlertFilter(), 10_000, AsOf())
        assert len(left) == 500 and min(a.time for a in left) == T0 + 100
        assert await asyncio.to_thread(store.count, AlertFilter(login="alice"), AsOf(
            before_seq=10_001, now=clock.time())) == 500
    finally:
        await log.close()
        if backend == "elasticsearch":
            await remove_indices(log.settings, prefix)


async def test_many_threads_record_while_the_log_takes_appends(tmp_path: Path) -> None:
    """The alerts table shares the file with the log's writer: every alert recorded from 8
    threads (as from Lua workers) while 400 appends commit, none lost, none twice."""
    log = SQLiteEventLog(tmp_path / "events.db", VirtualClock(T0))
    await log.open()
    try:
        store = log.alerts()
        errors: list[BaseException] = []

        def worker(n: int) -> None:
            try:
                for i in range(150):
                    alert = new_alert(f"w{n}-{i % 120}", "h", body("p", f"u{n}", None), T0 + i,
                                      T0 + i, seq=i + 1)
                    store.record(alert)
                    store.settle(alert.delivery_id, "delivered", 1, "", T0 + i)
                    store.count(AlertFilter(login=f"u{n}"), AsOf(before_seq=i + 1, now=T0 + i))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        appended = await asyncio.gather(*(log.append(report(i)) for i in range(400)))
        await asyncio.to_thread(lambda: [t.join(timeout=120) for t in threads])
        assert errors == [] and len(appended) == 400
        all_alerts = await asyncio.to_thread(store.recent, AlertFilter(), 10_000, AsOf())
        assert len(all_alerts) == 8 * 120  # ids repeat after 120: recorded once
        assert {a.outcome for a in all_alerts} == {"delivered"}
    finally:
        await log.close()


def test_the_table_is_one_readable_line_per_alert() -> None:
    alerts = [new_alert("d1", "alerts", body("password_spray", None, "192.0.2.7"), T0, T0, seq=42),
              new_alert("d2", "siem", b"plain", T0 + 61, T0 + 61, outcome="dropped",
                        error="outbox full (5 deliveries)")]
    lines = list(alert_table(alerts))
    assert lines[0].split() == ["Time", "(UTC)", "Policy", "Login", "Hook", "Remote", "Seq",
                                "Outcome", "Error"]
    assert lines[1].split() == ["2023-11-14", "22:13:20", "password_spray", "-", "alerts",
                                "192.0.2.7", "42", "pending", "-"]
    assert lines[2].split()[2:8] == ["-", "-", "siem", "-", "-", "dropped"]
    assert lines[2].endswith("outbox full (5 deliveries)")


async def test_trackalert_alerts_reads_the_config_log_and_never_creates_one(tmp_path: Path) -> None:
    (tmp_path / "t.conf").write_text('setEventLog("sqlite:///ev.db")\n')  # relative to the config
    log = SQLiteEventLog(tmp_path / "ev.db", VirtualClock(T0))
    await log.open()
    try:
        for alert in history(30, seed=2):
            await asyncio.to_thread(log.alerts().record, alert)
    finally:
        await log.close()
    want = _filled(history(30, seed=2)).recent(AlertFilter(login="bob"), 1000, AsOf())[::-1]
    listed = subprocess.run([sys.executable, "-m", "trackalert", "alerts", "-C", str(tmp_path / "t.conf"),
                             "--login", "bob", "--json"], capture_output=True, text=True, timeout=60,
                            cwd="/")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["delivery_id"] for line in listed.stdout.splitlines()] == [
        a.delivery_id for a in want] and want
    missing = subprocess.run([sys.executable, "-m", "trackalert", "alerts", "--log",
                              str(tmp_path / "nope.db")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "cannot open the event log" in missing.stderr
    assert not (tmp_path / "nope.db").exists()


def _filled(alerts: list[Alert]) -> MemoryAlerts:
    store = MemoryAlerts()
    for alert in alerts:
        store.record(alert)
    return store
