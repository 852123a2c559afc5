"""The behaviour every event log backend must have, as one reusable test class.

A backend's test module subclasses `EventLogContract` and provides a ``make_log`` fixture: an async
factory ``await make_log(clock=None) -> EventLog`` that returns an *opened* log, where every call
within one test opens the *same* storage again (that is how reopen and durability-across-restart
are tested). The test closes a log before reopening it; the fixture closes whatever is left open.

Nothing here may depend on a backend's internals: only the `EventLog` interface, the clock and
the logging output.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from typing import Any, Awaitable, Callable

import pytest

from trackalert.clock import VirtualClock
from trackalert.eventlog import Appended, Event, EventLog, EventLogClosed
from trackalert.eventlog.retention import run_retention
from trackalert.report import Report, ReportError

MakeLog = Callable[..., Awaitable[EventLog]]


def report(i: int, **fields: Any) -> Report:
    """A small distinguishable report."""
    values: dict[str, Any] = dict(login=f"user{i}", t=1_600_000_000.0 + i, remote="192.0.2.1")
    values.update(fields)
    return Report(**values)


def full_report() -> Report:
    """Every field set to something non-default, with unicode and unknown extra fields."""
    return Report(
        t=1_699_999_999.125,
        remote="2001:db8::1",
        login="jörg.ßtraße@example.org",
        pwhash="a1b2c3",
        success=True,
        policy_reject=True,
        protocol="imaps",
        tls=True,
        device_id="Mozilla/5.0 (X11; Linux) 🦊",
        session_id="sess-\u2603",
        fail_type="credentials",
        attrs={"client": "Thunderbird", "ключ": "значение", "empty": ""},
        attrs_mv={"groups": ("admin", "üsers"), "none": ()},
        device_attrs={"os.family": "Linux", "browser.family": "Firefox"},
        extra={"type": "wforce_report", "nested": {"a": [1, 2.5, None, True, "x"]}, "n": 7},
    )


async def eventually(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """Wait for work another thread or process is doing (not for time: time is the clock's).

    Bounded, so a broken backend fails the test instead of hanging it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


class EventLogContract:
    """Backend-independent tests; see the module docstring for the ``make_log`` fixture."""

    @pytest.fixture
    def make_log(self) -> MakeLog:  # pragma: no cover - replaced by every backend's module
        raise NotImplementedError("a backend test module must provide the make_log fixture")

    # ----------------------------------------------------------------- basics

    async def test_empty_log(self, make_log: MakeLog) -> None:
        log = await make_log()
        assert await log.last_seq() == 0
        assert await log.read(0, 10) == []
        assert await log.load_cursor("policy") == 0
        description = await log.describe()
        assert description["events"] == 0
        assert description["last_seq"] == 0
        assert description["oldest_received"] is None

    async def test_round_trip_of_every_field(self, make_log: MakeLog) -> None:
        clock = VirtualClock(start=1_700_000_123.5)
        log = await make_log(clock)
        original = full_report()
        appended = await log.append(original, delivery_id="delivery-ü-1")
        assert appended == Appended(1, False)
        [stored] = await log.read(0, 10)
        assert stored == Event(1, 1_700_000_123.5, original, "delivery-ü-1")
        assert stored.report.to_json_dict() == original.to_json_dict()
        assert isinstance(stored.report.attrs_mv["groups"], tuple)

    async def test_round_trip_of_defaults_and_empty_maps(self, make_log: MakeLog) -> None:
        log = await make_log()
        await log.append(Report())
        [stored] = await log.read(0, 10)
        assert stored.report == Report()
        assert stored.delivery_id is None

    async def test_round_trip_survives_reopen(self, make_log: MakeLog) -> None:
        log = await make_log()
        await log.append(full_report(), delivery_id="x")
        await log.append(report(2))
        await log.close()
        log = await make_log()
        stored = await log.read(0, 10)
        assert [e.report for e in stored] == [full_report(), report(2)]
        assert await log.last_seq() == 2
        assert (await log.append(report(3))).seq == 3

    async def test_read_pages_by_seq(self, make_log: MakeLog) -> None:
        log = await make_log()
        for i in range(10):
            await log.append(report(i))
        assert [e.seq for e in await log.read(0, 3)] == [1, 2, 3]
        assert [e.seq for e in await log.read(3, 3)] == [4, 5, 6]
        assert [e.seq for e in await log.read(8, 100)] == [9, 10]
        assert await log.read(10, 100) == []

    async def test_received_is_server_time_and_non_decreasing(self, make_log: MakeLog) -> None:
        clock = VirtualClock(start=1_700_000_000.0)
        log = await make_log(clock)
        await log.append(report(1, t=5.0))  # the report's own t does not matter
        await clock.advance(2.5)
        await log.append(report(2, t=1.0))
        stored = await log.read(0, 10)
        assert [e.received for e in stored] == [1_700_000_000.0, 1_700_000_002.5]
        assert [e.report.t for e in stored] == [5.0, 1.0]

    async def test_closed_log_refuses_work_and_close_is_idempotent(self, make_log: MakeLog) -> None:
        log = await make_log()
        await log.append(report(1))
        await log.close()
        await log.close()
        with pytest.raises(EventLogClosed):
            await log.append(report(2))
        with pytest.raises(EventLogClosed):
            await log.read(0, 1)

    async def test_close_commits_pending_appends_first(self, make_log: MakeLog) -> None:
        log = await make_log()
        tasks = [asyncio.create_task(log.append(report(i))) for i in range(300)]
        await asyncio.sleep(0)  # let every append reach the log before close() starts
        await log.close()
        results = await asyncio.gather(*tasks)
        assert sorted(a.seq for a in results) == list(range(1, 301))
        log = await make_log()
        assert await log.last_seq() == 300

    # ----------------------------------------------------------------- ordering and batching

    async def test_concurrent_appends_get_contiguous_ordered_seqs(self, make_log: MakeLog) -> None:
        log = await make_log()
        results = await asyncio.gather(*(log.append(report(i)) for i in range(1000)))
        assert sorted(a.seq for a in results) == list(range(1, 1001))
        assert not any(a.duplicate for a in results)
        stored = await log.read(0, 5000)
        assert [e.seq for e in stored] == list(range(1, 1001))
        by_seq = {a.seq: i for i, a in enumerate(results)}
        assert all(e.report.login == f"user{by_seq[e.seq]}" for e in stored)
        received = [e.received for e in stored]
        assert received == sorted(received)
        assert await log.last_seq() == 1000

    async def test_group_commit_batches_concurrent_appends(self, make_log: MakeLog) -> None:
        log = await make_log()
        await asyncio.gather(*(log.append(report(i)) for i in range(1000)))
        stats = log.stats
        assert stats.appended_total == 1000
        assert stats.pending == 0
        assert stats.max_batch_size > 1
        assert stats.commits_total < 1000
        assert 1 <= stats.last_batch_size <= stats.max_batch_size

    async def test_pending_counts_queued_appends(self, make_log: MakeLog) -> None:
        log = await make_log()
        tasks = [asyncio.create_task(log.append(report(i))) for i in range(50)]
        await asyncio.sleep(0)
        assert 0 < log.stats.pending <= 50
        await asyncio.gather(*tasks)
        assert log.stats.pending == 0

    # ----------------------------------------------------------------- idempotent delivery
    # A retry is the same delivery id AND the same body (DESIGN §3): wforce's ids collide for
    # different reports stamped in the same microsecond, so the id alone proves nothing.

    async def test_retried_delivery_is_acknowledged_not_stored(self, make_log: MakeLog) -> None:
        log = await make_log()
        first = await log.append(report(1), delivery_id="d-1")
        again = await log.append(report(1), delivery_id="d-1")
        other = await log.append(report(2), delivery_id="d-2")
        assert first == Appended(1, False)
        assert again == Appended(1, True)
        assert other == Appended(2, False)
        assert [e.report.login for e in await log.read(0, 10)] == ["user1", "user2"]
        assert log.stats.duplicates_total == 1
        assert log.stats.appended_total == 2
        assert log.stats.delivery_id_collisions_total == 0

    async def test_same_id_with_another_body_is_another_report(
        self, make_log: MakeLog, caplog: pytest.LogCaptureFixture
    ) -> None:
        log = await make_log()
        with caplog.at_level(logging.WARNING, logger="trackalert"):
            first = await log.append(report(1), delivery_id="d-1")
            second = await log.append(report(99), delivery_id="d-1")
        assert (first, second) == (Appended(1, False), Appended(2, False))
        stored = await log.read(0, 10)
        assert [(e.report.login, e.delivery_id) for e in stored] == [("user1", "d-1"), ("user99", "d-1")]
        assert log.stats.duplicates_total == 0
        assert log.stats.delivery_id_collisions_total == 1
        assert "'d-1'" in caplog.text and "another body" in caplog.text
        assert await log.append(report(99), delivery_id="d-1") == Appended(2, True)

    async def test_the_body_fingerprint_decides_what_is_a_retry(self, make_log: MakeLog) -> None:
        """Callers with the raw body pass its fingerprint: two copies of one body are one
        delivery even when parsing them gave different reports (a missing `t` is filled with
        the time of arrival), and two bodies that parse alike are two."""
        log = await make_log()
        assert await log.append(report(1, t=1.0), "d", b"body-a") == Appended(1, False)
        assert await log.append(report(1, t=2.0), "d", b"body-a") == Appended(1, True)
        assert await log.append(report(1, t=1.0), "d", b"body-b") == Appended(2, False)
        assert len(await log.read(0, 10)) == 2

    async def test_concurrent_retries_and_collisions_in_one_batch(self, make_log: MakeLog) -> None:
        """10 ids, each shared by 5 different reports, each report sent 4 times, all at once."""
        log = await make_log()
        sent = [(k, j) for _ in range(4) for k in range(10) for j in range(5)]
        results = await asyncio.gather(
            *(log.append(report(100 * k + j), delivery_id=f"d-{k}") for k, j in sent)
        )
        fresh = {pair: a.seq for pair, a in zip(sent, results) if not a.duplicate}
        assert len(fresh) == 50 and sorted(fresh.values()) == list(range(1, 51))
        for pair, a in zip(sent, results):
            assert a.seq == fresh[pair]  # every copy points at the one that was stored
        stored = await log.read(0, 1000)
        assert sorted(e.report.login for e in stored) == sorted(
            f"user{100 * k + j}" for k in range(10) for j in range(5)
        )
        assert log.stats.duplicates_total == 150
        assert log.stats.delivery_id_collisions_total == 40

    async def test_duplicate_detected_after_reopen(self, make_log: MakeLog) -> None:
        log = await make_log()
        await log.append(report(1), delivery_id="keep-me")
        await log.close()
        log = await make_log()
        assert await log.append(report(1), delivery_id="keep-me") == Appended(1, True)
        assert await log.append(report(2), delivery_id="keep-me") == Appended(2, False)
        assert await log.last_seq() == 2

    @pytest.mark.parametrize("blank", ["", " ", "\t "])
    async def test_a_blank_delivery_id_is_no_id(self, make_log: MakeLog, blank: str) -> None:
        log = await make_log()
        results = [await log.append(report(1), delivery_id=blank) for _ in range(3)]
        assert [a.seq for a in results] == [1, 2, 3]
        assert [e.delivery_id for e in await log.read(0, 10)] == [None, None, None]

    # ----------------------------------------------------------------- unstorable reports

    async def test_unstorable_reports_fail_alone(self, make_log: MakeLog) -> None:
        """Reports that cannot be stored are refused before they join a batch (ReportError:
        a 400 for the web layer) and the valid reports beside them are all stored."""
        log = await make_log()
        poisoned = [
            (report(0, login="\ud800"), None),
            (report(0, attrs={"k": "x\udfff"}), None),
            (report(0, extra={"n": math.inf}), None),
            (report(0, t=math.nan), None),
            (report(0), "non-utf8-\udcff"),
        ]
        calls = []
        for i in range(200):
            calls.append(log.append(report(i), delivery_id=f"ok-{i}"))
            if i % 40 == 0:
                bad, delivery = poisoned[i // 40]
                calls.append(log.append(bad, delivery_id=delivery))
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert len(failed) == 5 and all(isinstance(r, ReportError) for r in failed)
        stored = await log.read(0, 1000)
        assert sorted(e.report.login for e in stored) == sorted(f"user{i}" for i in range(200))
        assert log.stats.pending == 0

    async def test_no_delivery_id_never_deduplicates(self, make_log: MakeLog) -> None:
        log = await make_log()
        results = await asyncio.gather(*(log.append(report(1)) for _ in range(20)))
        assert not any(a.duplicate for a in results)
        assert len(await log.read(0, 100)) == 20

    # ----------------------------------------------------------------- listeners

    async def test_listeners_see_new_events_before_append_returns(self, make_log: MakeLog) -> None:
        log = await make_log()
        calls: list[list[Event]] = []
        log.add_listener(calls.append)
        seen_by_second: list[int] = []
        log.add_listener(lambda batch: seen_by_second.extend(e.seq for e in batch))

        async def one(i: int) -> Appended:
            appended = await log.append(report(i % 150), delivery_id=f"d-{i % 150}")
            if not appended.duplicate:
                assert any(e.seq == appended.seq for batch in calls for e in batch)
            return appended

        results = await asyncio.gather(*(one(i) for i in range(200)))
        delivered = [e for batch in calls for e in batch]
        assert all(batch for batch in calls)  # never called with nothing
        for batch in calls:
            assert [e.seq for e in batch] == sorted(e.seq for e in batch)
        assert sorted(e.seq for e in delivered) == list(range(1, 151))  # no duplicates passed on
        assert seen_by_second == [e.seq for e in delivered]
        assert {e.seq: e for e in delivered} == {e.seq: e for e in await log.read(0, 1000)}
        assert sum(not a.duplicate for a in results) == 150

    async def test_failing_listener_does_not_break_appends(
        self, make_log: MakeLog, caplog: pytest.LogCaptureFixture
    ) -> None:
        log = await make_log()
        seen: list[int] = []

        def broken(batch: list[Event]) -> None:
            raise RuntimeError("listener bug")

        log.add_listener(broken)
        log.add_listener(lambda batch: seen.extend(e.seq for e in batch))
        with caplog.at_level(logging.ERROR, logger="trackalert"):
            assert (await log.append(report(1))).seq == 1
        assert seen == [1]
        assert "listener bug" in caplog.text

    # ----------------------------------------------------------------- cursors

    async def test_cursor_round_trip_across_reopen(self, make_log: MakeLog) -> None:
        log = await make_log()
        for i in range(5):
            await log.append(report(i))
        log.save_cursor("policy", 2)
        log.save_cursor("policy", 4)
        log.save_cursor("export", 1)
        assert await log.load_cursor("policy") == 4
        await log.close()
        log = await make_log()
        assert await log.load_cursor("policy") == 4
        assert await log.load_cursor("export") == 1
        assert await log.load_cursor("other") == 0

    async def test_cursor_saved_without_appends_is_persisted_by_close(
        self, make_log: MakeLog
    ) -> None:
        log = await make_log()
        log.save_cursor("policy", 7)
        await log.close()
        log = await make_log()
        assert await log.load_cursor("policy") == 7

    # ----------------------------------------------------------------- retention

    async def test_prune_removes_only_old_events(self, make_log: MakeLog) -> None:
        clock = VirtualClock()
        log = await make_log(clock)
        start = clock.time()
        for i in range(10):
            await log.append(report(i))
        await clock.advance(100)
        for i in range(10, 15):
            await log.append(report(i))
        assert await log.prune(start - 1) == 0
        assert await log.prune(start + 50, chunk=3) == 10
        assert [e.seq for e in await log.read(0, 100)] == [11, 12, 13, 14, 15]
        assert await log.prune(start + 50) == 0
        assert await log.last_seq() == 15
        assert (await log.append(report(99))).seq == 16

    async def test_prune_everything_never_reuses_seqs(self, make_log: MakeLog) -> None:
        clock = VirtualClock()
        log = await make_log(clock)
        for i in range(5):
            await log.append(report(i))
        await clock.advance(10)
        assert await log.prune(clock.time()) == 5
        assert await log.read(0, 10) == []
        assert await log.last_seq() == 5
        await log.close()
        log = await make_log(clock)
        assert await log.last_seq() == 5
        assert (await log.append(report(6))).seq == 6

    async def test_prune_with_cut_between_many_batches(self, make_log: MakeLog) -> None:
        clock = VirtualClock()
        log = await make_log(clock)
        start = clock.time()
        for minute in range(30):
            await asyncio.gather(*(log.append(report(minute * 10 + i)) for i in range(10)))
            await clock.advance(60)
        # events of minutes 0..16 have received < start + 17 * 60 - 1
        assert await log.prune(start + 17 * 60 - 1, chunk=7) == 170
        stored = await log.read(0, 1000)
        assert stored[0].seq == 171 and len(stored) == 130
        assert all(e.received >= start + 17 * 60 - 1 for e in stored)

    async def test_prune_deliveries_keeps_recent_ids(self, make_log: MakeLog) -> None:
        clock = VirtualClock()
        log = await make_log(clock)
        for i in range(20):
            await log.append(report(i), delivery_id=f"old-{i}")
        await clock.advance(1000)
        await log.append(report(100), delivery_id="recent")
        removed = await log.prune_deliveries(clock.time() - 500, chunk=6)
        assert isinstance(removed, int) and removed >= 0
        assert await log.append(report(100), delivery_id="recent") == Appended(21, True)

    async def test_retention_loop_driven_by_the_clock(
        self, make_log: MakeLog, caplog: pytest.LogCaptureFixture
    ) -> None:
        clock = VirtualClock()
        log = await make_log(clock)
        for i in range(10):
            await log.append(report(i))
        await clock.advance(100)
        for i in range(10, 15):
            await log.append(report(i))
        caplog.set_level(logging.INFO, logger="trackalert")
        task = asyncio.create_task(run_retention(log, clock, keep_seconds=50, every=60))
        try:
            await eventually(lambda: clock.pending() == 1, "the first retention pass")
            assert [e.seq for e in await log.read(0, 100)] == [11, 12, 13, 14, 15]
            assert "removed 10 events" in caplog.text
            # the task slept at start + 100, so it wakes at start + 160
            await clock.advance(30)
            await log.append(report(15))  # seq 16, received at start + 130
            await clock.advance(30)  # start + 160: cut-off start + 110 keeps seq 16
            await eventually(lambda: clock.pending() == 1, "the second retention pass")
            assert [e.seq for e in await log.read(0, 100)] == [16]
            await clock.advance(60)  # start + 220: cut-off start + 170 removes it
            await eventually(lambda: clock.pending() == 1, "the third retention pass")
            assert await log.read(0, 100) == []
            assert await log.last_seq() == 16
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    async def test_retention_loop_survives_errors(
        self, make_log: MakeLog, caplog: pytest.LogCaptureFixture
    ) -> None:
        clock = VirtualClock()
        log = await make_log(clock)
        await log.close()  # every pass now fails
        task = asyncio.create_task(run_retention(log, clock, keep_seconds=50, every=60))
        try:
            await eventually(lambda: clock.pending() == 1, "the first retention pass")
            await clock.advance(60)
            await eventually(lambda: clock.pending() == 1, "the second retention pass")
            assert caplog.text.count("retention") >= 2
            assert not task.done()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    # ----------------------------------------------------------------- describe

    async def test_describe(self, make_log: MakeLog) -> None:
        clock = VirtualClock(start=1_700_000_000.0)
        log = await make_log(clock)
        for i in range(3):
            await log.append(report(i))
            await clock.advance(10)
        description = await log.describe()
        assert set(description) >= {
            "backend", "location", "events", "first_seq", "last_seq",
            "oldest_received", "newest_received", "size_bytes",
        }
        assert description["backend"] == log.backend
        assert description["location"] == log.location
        assert description["events"] == 3
        assert (description["first_seq"], description["last_seq"]) == (1, 3)
        assert description["oldest_received"] == 1_700_000_000.0
        assert description["newest_received"] == 1_700_000_020.0
        assert description["size_bytes"] > 0
