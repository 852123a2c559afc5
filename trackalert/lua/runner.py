"""Runs the Lua `report` policy over the event log, at least once per event, even across a crash.

The runner is a consumer of the log with a persisted cursor: every event up to the cursor has been
through `report`. Right after a commit the log hands the new events over in memory; after a restart,
or when the runner falls behind and its buffer is full, it reads them back from the log instead. So
a slow policy never slows ingestion (the HTTP answer only waits for the append), and memory stays
bounded whatever the lag.

Batches run one at a time, strictly in log order, and the window projection
(eventlog/windows.py) advances after each event in the same thread: that is what lets the
starter helpers answer from counters exactly as of the report being judged. The other worker
states stay free for custom endpoints and the console.
"""

from __future__ import annotations

import asyncio
import collections
import json
from typing import TYPE_CHECKING, Callable

from trackalert import log
from trackalert.eventlog.windows import WindowProjection, set_running_projection
from trackalert.lua.convert import ANSWERS, call_with_tuple, tuple_runner

if TYPE_CHECKING:
    from trackalert.eventlog.base import Event, EventLog
    from trackalert.lua.host import Host
    from trackalert.lua.pool import LuaPool
    from trackalert.lua.state import LuaState

CURSOR_NAME = "report"
#: Events kept in memory for the runner when it lags (beyond that they are read back from the
#: log). An Event with its Report costs about 1.5 KiB of RSS (bench/policy_helpers_bench.py
#: --buffer 100000 measured +146 MiB), so 10,000 is ~15 MiB; 100,000 cost ~150 MiB for no gain:
#: reading a batch of 256 back takes a few ms, far less than running the policy on it.
BUFFER_MAX = 10_000
#: How often (seconds) the runner looks whether the running batch is stuck.
STUCK_POLL = 0.25


class PolicyRunner:
    def __init__(
        self,
        eventlog: "EventLog",
        pool: "LuaPool",
        host: "Host",
        batch_max: int = 256,
        buffer_max: int = BUFFER_MAX,
        projection: bool = True,
        save_cursor: Callable[[int], None] | None = None,
    ) -> None:
        self._log = eventlog
        #: Where `done` goes: the log's cursor here; in a runner process, a message to the core
        #: (whose writer owns the file), sent after the batch's webhooks so they land first.
        self._save_cursor = save_cursor or (lambda seq: eventlog.save_cursor(CURSOR_NAME, seq))
        self._pool = pool
        self._host = host
        self._batch_max = batch_max
        self._buffer_max = buffer_max
        self._buffer: collections.deque[Event] = collections.deque()
        self._wake = asyncio.Event()
        self._inflight: dict[int, tuple[int, float]] = {}  # first seq -> (last seq, received)
        self._tasks: set[asyncio.Task[None]] = set()
        # One batch at a time, in log order (the projection judges as of each event); a batch
        # stuck in one report is left behind (`_wait_turn`).
        self._running: asyncio.Task[None] | None = None
        self._stuck: set[asyncio.Task[None]] = set()
        self._progress = 0.0  # clock.monotonic() when the running batch last finished an event
        #: The helpers' counters, or None to answer everything with SQL.
        self.projection: WindowProjection | None = None
        if projection and WindowProjection.supports(eventlog):
            self.projection = WindowProjection(eventlog)
        self._loop_task: asyncio.Task[None] | None = None
        self.done = 0  # every seq <= done has run through report
        self.dispatched = 0  # every seq <= dispatched has been handed to a state
        self.head = 0  # last seq known to be in the log
        self._oldest_unread: float | None = None

    async def start(self) -> None:
        self.done = self.dispatched = await self._log.load_cursor(CURSOR_NAME)
        if self.projection is not None:
            self.projection.start_at(self.done)
        self._log.add_listener(self._on_commit)
        self.head = max(self.head, await self._log.last_seq())
        if self.head > self.done:
            log.logger.info(
                "Policy runner resumes after event %d: %d stored reports still to run",
                self.done, self.head - self.done,
            )
        self._loop_task = asyncio.create_task(self._loop(), name="policy-runner")
        self._wake.set()

    async def stop(self, timeout: float = 3.0) -> None:
        """Stop dispatching, give running batches `timeout` to finish and save the cursor.

        A batch still running then (a runaway policy) is not waited for: its events run again
        after the restart, which keeps the at-least-once promise.
        """
        if self._loop_task:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        if self.projection is not None:
            # saved only when no batch runs on (a stuck one): its counts would move under the save
            self.projection.close(save=all(task.done() for task in self._tasks))
        self._save_cursor(self.done)

    def notify_head(self, seq: int) -> None:
        """The core committed up to `seq` (a runner process has no appends to listen to): the
        events are read back from the log by the cursor."""
        if seq > self.head:
            self.head = seq
            self._wake.set()

    def lag_events(self) -> int:
        return max(0, self.head - self.done)

    def lag_seconds(self) -> float:
        """How long the oldest report not yet run has been waiting."""
        if self.head <= self.done:
            return 0.0
        received = [r for _, r in self._inflight.values()]
        if self._buffer:
            received.append(self._buffer[0].received)
        if self._oldest_unread is not None:
            received.append(self._oldest_unread)
        if not received:
            return 0.0
        return max(0.0, self._host.clock.time() - min(received))

    def _on_commit(self, events: "list[Event]") -> None:
        self.head = max(self.head, events[-1].seq)
        if len(self._buffer) + len(events) <= self._buffer_max:
            self._buffer.extend(events)
        elif self._oldest_unread is None:
            # Too far behind to keep everything in memory: these are read back from the log.
            self._oldest_unread = events[0].received
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.dispatched < self.head:
                await self._wait_turn()
                try:
                    batch = await self._next_batch()
                except Exception as exc:  # the log is unreadable for now: retry shortly
                    log.logger.error("Policy runner cannot read the event log: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
                if not batch:
                    break
                self._dispatch(batch)

    async def _wait_turn(self) -> None:
        """Until the running batch is done, or stuck: one report running longer than the slow
        call limit (LuaJIT cannot interrupt a runaway loop). A stuck batch is left to finish on
        its own state, and the batches after it run on the others, answered by SQL until it is
        done (the projection is its until then); the cursor waits for it, as before."""
        while self._running is not None:
            task = self._running
            await asyncio.wait({task}, timeout=STUCK_POLL)
            if task.done():
                break
            if self._host.clock.monotonic() - self._progress > self._host.settings.slow_call_seconds:
                log.logger.warning("Policy runner: a report call on events %d-%d is stuck; the "
                                   "next reports run in other states meanwhile",
                                   min(self._inflight), self.dispatched)
                self._stuck.add(task)
                task.add_done_callback(self._stuck.discard)
                break
        self._running = None

    async def _next_batch(self) -> "list[Event]":
        buffer = self._buffer
        while buffer and buffer[0].seq <= self.dispatched:
            buffer.popleft()
        expected = self._log.seq_after(self.dispatched)
        if buffer and buffer[0].seq == expected:
            batch = []
            while buffer and buffer[0].seq == expected and len(batch) < self._batch_max:
                batch.append(buffer.popleft())
                expected = self._log.seq_after(expected)
            return batch
        gap = (buffer[0].seq - expected) if buffer else self._batch_max
        batch = await self._log.read_stored(self.dispatched, min(self._batch_max, max(1, gap)))
        if not buffer or (batch and self._log.seq_after(batch[-1].seq) >= buffer[0].seq):
            self._oldest_unread = None
        return batch

    def _dispatch(self, batch: "list[Event]") -> None:
        first, last = batch[0].seq, batch[-1].seq
        self.dispatched = last
        self._inflight[first] = (last, batch[0].received)
        self._progress = self._host.clock.monotonic()
        projection = None if self._stuck else self.projection
        task = asyncio.create_task(self._run_batch(batch, projection))
        self._running = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: "list[Event]", projection: WindowProjection | None) -> None:
        try:
            await self._pool.run("report", lambda state: self._run_in_state(state, batch, projection))
        except Exception as exc:  # the crash boundary is per event; this is a daemon fault
            log.logger.error("Policy runner failed on events %d-%d: %s", batch[0].seq, batch[-1].seq, exc)
        finally:
            self._complete(batch[0].seq)

    def _complete(self, first: int) -> None:
        self._inflight.pop(first, None)
        done = min(self._inflight) - 1 if self._inflight else self.dispatched
        if done > self.done:
            self.done = done
            self._save_cursor(done)

    def _run_in_state(self, state: "LuaState", batch: "list[Event]",
                      projection: WindowProjection | None) -> None:
        """Runs in a worker thread with the state locked: one Lua call per event."""
        if projection is not None:
            projection.check_retention()
        set_running_projection(projection)
        try:
            self._run_events(state, batch, projection)
        finally:
            set_running_projection(None)
            state.as_of_seq = None
            state.cache.pop(ANSWERS, None)
        if state.report_fn is not None:
            self._host.metrics.lua_calls("report", len(batch))

    def run_events(self, state: "LuaState", batch: "list[Event]") -> None:
        """Judge `batch` in this thread on `state` (the caller holds it), exactly as a batch of
        the running daemon: the replay tool drives the runner's own code path this way."""
        self._run_in_state(state, batch, self.projection)

    def _run_events(self, state: "LuaState", batch: "list[Event]",
                    projection: WindowProjection | None) -> None:
        fn = state.report_fn
        runner = tuple_runner(state) if fn is not None else None
        for event in batch:
            if projection is not None:
                projection.begin(event)
            try:
                if fn is not None:
                    self._judge(state, runner, fn, event)
            finally:
                if projection is not None:
                    projection.finish(event)
                self._progress = self._host.clock.monotonic()

    def _judge(self, state: "LuaState", runner: object, fn: object, event: "Event") -> None:
        state.as_of_seq = event.seq
        state.cache[ANSWERS] = {}  # what this report asked is answered once (api_helpers)
        try:
            ok, error = call_with_tuple(state, runner, fn, event)
        except Exception as exc:  # a conversion fault must not stop the batch
            ok, error = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            self._host.lua_error("report", _naming_the_event(str(error), event))


def _naming_the_event(error: str, event: "Event") -> str:
    """The error with the report it failed on, so an operator finds that report in the log (and
    can replay it). It goes at the end of the first line, before any stack traceback, where a
    grep for the error finds it. The login is JSON-quoted: it is attacker-controlled, and a
    newline in it must not forge a log line."""
    first, newline, rest = error.partition("\n")
    login = json.dumps(event.report.login, ensure_ascii=False)
    return f"{first} (event seq {event.seq}, login {login}){newline}{rest}"
