"""What a replay keeps instead of letting it leave the machine: alerts, errors and log lines.

The daemon's own classes are used with one thing changed each: `AlertCapture` is the daemon's
`WebHooks` registry (the same `addCustomWebHook` validation and ids) whose `run` records an
alert record instead of writing the outbox, and keeps it in its `alerts` store too, so that
`countAlerts`/`recentAlerts` answer from the replay's own alerts as the daemon's answer from the
ones it stored (never delivered here: their outcome stays `pending`); `ReplayHost` is the
daemon's `Host` whose crash boundary records the error with the event it happened on;
`ReplayPool` is the daemon's `LuaPool` noting a background function's error the same way. Log lines of `infoLog` & co. are collected by
a logging handler for as long as the replay runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from trackalert.eventlog.alerts import MemoryAlerts, new_alert
from trackalert.lua.host import Host
from trackalert.lua.pool import LuaPool
from trackalert.webhooks import WebHooks, caused_delivery_id

if TYPE_CHECKING:
    from trackalert.eventlog.base import Event
    from trackalert.lua.state import LuaState

T = TypeVar("T")
#: Errors kept with their message (all are counted); the summary shows the first 20.
ERRORS_KEPT = 20
#: Log lines kept in memory per level when they are not written to a file.
LOG_LINES_KEPT = 1000


def alert_record(seq: int, time: float, hook: str, login: str, remote: str, body: bytes) -> dict[str, Any]:
    """The shared alert record, keys in their documented order."""
    text = body.decode("utf-8", errors="replace")
    try:
        decoded: Any = json.loads(text)
    except ValueError:
        decoded = text
    policy = decoded.get("policy") if isinstance(decoded, dict) else None
    return {"seq": seq, "time": time, "hook": hook, "login": login, "remote": remote,
            "policy": policy if isinstance(policy, str) else None, "body": decoded}


@dataclass
class Findings:
    """Everything one runtime produced: alerts in event order, errors, log lines, notes."""

    alerts: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0
    logs: list[dict[str, Any]] = field(default_factory=list)
    log_counts: dict[str, int] = field(default_factory=dict)
    log_sink: Callable[[dict[str, Any]], None] | None = None
    stat_totals: dict[str, int] = field(default_factory=dict)

    def error(self, seq: int, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append({"seq": seq, "message": message})

    def stop_at(self, seq: int) -> None:
        """Forget what came after event `seq` (a replay stopping at its first error)."""
        self.alerts = [alert for alert in self.alerts if alert["seq"] <= seq]
        self.errors = [error for error in self.errors if error["seq"] <= seq]
        self.error_count = len(self.errors)

    def log(self, seq: int, time: float, level: str, message: str) -> None:
        self.log_counts[level] = self.log_counts.get(level, 0) + 1
        line = {"seq": seq, "time": time, "level": level, "message": message}
        if self.log_sink is not None:
            self.log_sink(line)
        elif self.log_counts[level] <= LOG_LINES_KEPT:
            self.logs.append(line)


class Position:
    """Where the replay is: the events of the batch running, and the helpers' horizon."""

    def __init__(self) -> None:
        self.events: dict[int, "Event"] = {}
        #: The seq after the last event a background function may see.
        self.horizon = 1

    def last_seen(self) -> int:
        return self.horizon - 1


def cause_of(state: "LuaState", position: Position) -> "tuple[int, Event | None]":
    """(seq, event) of what made the policy act: the event report(lt) runs for, else (in a
    background function) the last event seen, with no event."""
    seq = state.as_of_seq
    if seq is not None:
        return seq, position.events.get(seq)
    return position.last_seen(), None


def lua_location(state: "LuaState") -> str:
    """`file:line: ` of the operator's code calling into Python right now, or ''."""
    getinfo = state.lua.globals().debug.getinfo
    for level in range(1, 40):
        info = getinfo(level, "Sl")
        if info is None:
            break
        source = info["source"] or ""
        if info["currentline"] and info["currentline"] > 0 and source.startswith("@"):
            return f"{info['short_src']}:{info['currentline']}: "
    return ""


class AlertCapture(WebHooks):
    """`runCustomWebHook` recorded as an alert record; nothing is stored or sent."""

    def __init__(self, host: Host, position: Position, findings: Findings) -> None:
        super().__init__(host.settings, host.metrics, host.clock)
        self._host_clock = host.clock
        self._position = position
        self._findings = findings
        self.state: "LuaState | None" = None
        self._cause: str | None = None
        self._sent: set[tuple[str, bytes]] = set()
        self.alerts = MemoryAlerts()

    def run(self, name: str, body: bytes, cause: str | None = None, seq: int | None = None,
            time: float | None = None) -> bool:
        """As `WebHooks.run`; `seq` (for the daemon's outbox row) is the position's seq here."""
        state = self.state
        assert state is not None, "the replay's worker state is set before anything runs"
        seq, event = cause_of(state, self._position)
        hook = self.find(name)
        if hook is None:
            self._findings.error(seq, f"{lua_location(state)}runCustomWebHook(): no custom webhook "
                                      f"named '{name}' (addCustomWebHook registers them)")
            return False
        if self._repeated(cause, name, body):
            return True
        if event is not None:
            record = alert_record(seq, event.received, name, event.report.login,
                                  event.report.remote, body)
        else:
            record = alert_record(seq, self._host_clock.time(), name, "", "", body)
        self._findings.alerts.append(record)
        number = len(self._findings.alerts)
        delivery_id = caused_delivery_id(cause, hook, body) if cause else f"replay-{number}"
        self.alerts.record(new_alert(delivery_id, name, body, record["time"], self._host_clock.time(),
                                     state.as_of_seq))
        return True

    def _repeated(self, cause: str | None, name: str, body: bytes) -> bool:
        """The same alert again for the same cause: the daemon's outbox stores it once (its
        delivery id derives from cause, hook and body), so the replay records it once."""
        if cause is None:
            return False
        if cause != self._cause:
            self._cause, self._sent = cause, set()
        key = (name, body)
        if key in self._sent:
            return True
        self._sent.add(key)
        return False

    async def start(self) -> None:
        """No sender: alerts never leave the replay."""

    async def stop(self) -> None:
        """No outbox to close."""


class ReplayHost(Host):
    """The daemon's host; a Lua error is recorded with its event instead of only logged."""

    findings: Findings
    position: Position
    state: "LuaState | None" = None

    def inc_custom_stat(self, name: str) -> None:
        """Counted over the whole replay too (the daemon's own counts are per five minutes)."""
        super().inc_custom_stat(name)
        totals = self.findings.stat_totals
        totals[name] = totals.get(name, 0) + 1

    def lua_error(self, function: str, message: str, *_args: Any, **_kwargs: Any) -> None:
        self.metrics.lua_error(function)
        seq = self.position.last_seen()
        if self.state is not None and self.state.as_of_seq is not None:
            seq = self.state.as_of_seq
        self.findings.error(seq, message)


class ReplayPool(LuaPool):
    """The daemon's pool; a background function's error is recorded before the scheduler
    logs it (the scheduler's own crash boundary then carries on as in the daemon)."""

    def __init__(self, states: "list[LuaState]", host: ReplayHost) -> None:
        super().__init__(states, host.clock)
        self._host = host

    async def run(self, kind: str, fn: "Callable[[LuaState], T]") -> T:
        try:
            return await super().run(kind, fn)
        except Exception as exc:
            if kind == "background":
                self._host.findings.error(self._host.position.last_seen(), str(exc))
            raise


_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
           logging.ERROR: "error", logging.CRITICAL: "error"}


class LogCollector(logging.Handler):
    """The `trackalert` logger's records while a runtime runs, into that runtime's findings."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.target: tuple[Findings, Position, ReplayHost] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        target = self.target
        if target is None:
            return
        findings, position, host = target
        state = host.state
        seq, event = cause_of(state, position) if state is not None else (position.last_seen(), None)
        when = event.received if event is not None else host.clock.time()
        findings.log(seq, when, _LEVELS.get(record.levelno, "info"), record.getMessage())
