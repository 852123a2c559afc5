"""runCustomWebHook records each call in the log's alerts and the sender writes every attempt's
outcome back: a real receiver on loopback, the real outbox and sender on a virtual clock, a real
SQLite log; and the Lua helpers' filter errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_webhooks import Hooks, Receiver, hook_config
from trackalert.clock import VirtualClock
from trackalert.eventlog.alerts import AlertFilter
from trackalert.eventlog.filters import AsOf
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.testing import wait_for


async def test_each_attempt_updates_the_record_until_its_outcome(tmp_path: Path) -> None:
    receiver = await Receiver().start()
    receiver.answers = [503, 200, 400]
    log = SQLiteEventLog(tmp_path / "events.db", VirtualClock())
    await log.open()
    try:
        async with Hooks(tmp_path, hook_config(f"http://127.0.0.1:{receiver.port}/")) as hooks:
            store = hooks.webhooks.alerts = log.alerts()

            def record(n: int = 10) -> dict:
                return {a.body: a for a in store.recent(AlertFilter(), n, AsOf())}

            assert hooks.run("alert", '{"policy": "p", "login": "alice"}')
            await hooks.until_attempted(1, count=1)
            first = record()[b'{"policy": "p", "login": "alice"}']
            assert (first.outcome, first.attempts, first.seq, first.login) == ("pending", 1, None, "alice")
            assert "503" in first.error and first.time == first.created == hooks.clock.time()
            await hooks.advance_to(hooks.pending()[0].next_attempt)
            assert await wait_for(lambda: hooks.webhooks.depth() == 0)
            delivered = record()[b'{"policy": "p", "login": "alice"}']
            assert (delivered.outcome, delivered.attempts, delivered.error) == ("delivered", 2, "")
            assert delivered.settled == hooks.clock.time()

            assert hooks.run("alert", "refused body")
            assert await wait_for(lambda: record().get(b"refused body") is not None
                                  and record()[b"refused body"].outcome == "refused")
            assert "400" in record()[b"refused body"].error

            hooks.host.settings.webhooks.queue_size = 0  # full: refused, and recorded as dropped
            assert not hooks.run("alert", "no room")
            dropped = record()[b"no room"]
            assert (dropped.outcome, dropped.error) == ("dropped", "outbox full (0 deliveries)")
            assert not hooks.run("nope", "unknown hook")  # no hook: not recorded
            assert len(record()) == 3
            assert store.count(AlertFilter(login="alice", outcome="delivered"), AsOf()) == 1
            assert len(receiver.requests) == 3
    finally:
        await receiver.stop()
        await log.close()


async def test_the_lua_helpers_validate_their_filter_and_answer(tmp_path: Path) -> None:
    log = SQLiteEventLog(tmp_path / "events.db", VirtualClock())
    await log.open()
    try:
        async with Hooks(tmp_path, hook_config("http://127.0.0.1:9/")) as hooks:
            hooks.webhooks.alerts = log.alerts()
            worker = hooks.worker
            assert hooks.run("alert", '{"policy": "p", "login": "bob", "remote": "192.0.2.1"}')
            (count,) = worker.execute('return countAlerts({login="bob", remote=newCA("192.0.2.1")})')
            (policy, n) = worker.execute('local r = recentAlerts({policy="p"}, 5) '
                                         'return r[1].body.login, #r')
            assert (count, policy, n) == (1, "bob", 1)
            assert worker.execute('return countAlerts({window="1h"}), countAlerts()') == (1, 1)
            for lua, message in [
                ('countAlerts({logn="bob"})', "unknown alert filter key 'logn'"),
                ('countAlerts({login=true})', "filter key 'login' must be a string"),
                ('countAlerts("bob")', "alert filter must be a table"),
                ('recentAlerts({}, "ten")', "recentAlerts: n must be a number"),
            ]:
                with pytest.raises(Exception, match=message):
                    worker.execute(lua)
    finally:
        await log.close()
