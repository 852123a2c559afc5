"""The event log: the durable, ordered record of every report (DESIGN.md §4).

`open_event_log` picks the backend from a URL so that configuration stays one string
(``setEventLog("sqlite:///var/lib/trackalert/events.db")``). Backends are imported lazily: the
SQLite backend pulls in Alembic, the Elasticsearch backend its client, and neither should be
paid for by code that only needs the types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from trackalert.clock import Clock
from trackalert.eventlog.base import (
    AppendFailure,
    Appended,
    AppendStats,
    Event,
    EventLog,
    EventLogClosed,
    EventLogCorrupt,
    EventLogError,
    Listener,
    SchemaVersionError,
)

if TYPE_CHECKING:
    from trackalert.eventlog.alerts import AlertStore

__all__ = [
    "AppendFailure",
    "Appended",
    "AppendStats",
    "Event",
    "EventLog",
    "EventLogClosed",
    "EventLogCorrupt",
    "EventLogError",
    "Listener",
    "SchemaVersionError",
    "SUPPORTED_SCHEMES",
    "open_alerts",
    "open_event_log",
]


def _sqlite(url: str, clock: Clock) -> EventLog:
    from trackalert.eventlog.sqlite import SQLiteEventLog

    return SQLiteEventLog(sqlite_path(url), clock)


def _elasticsearch(url: str, clock: Clock) -> EventLog:
    from trackalert.eventlog.elasticsearch import ElasticEventLog
    from trackalert.eventlog.es_client import parse_elastic_url

    return ElasticEventLog(parse_elastic_url(url), clock)


_BACKENDS: dict[str, Callable[[str, Clock], EventLog]] = {
    "sqlite": _sqlite, "elasticsearch": _elasticsearch,
}
SUPPORTED_SCHEMES: tuple[str, ...] = tuple(_BACKENDS)


def open_event_log(url: str, clock: Clock) -> EventLog:
    """The (not yet opened) event log for `url`; call ``await log.open()`` next.

    Raises ValueError, naming the supported schemes, for a URL no backend understands.
    """
    scheme, sep, _ = url.partition("://")
    factory = _BACKENDS.get(scheme.lower()) if sep else None
    if factory is None:
        supported = ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        raise ValueError(
            f"unsupported event log URL {url!r}: supported schemes are {supported} "
            f"(e.g. sqlite:///relative/path.db, sqlite:////absolute/path.db or "
            f"elasticsearch://host:9200/prefix)"
        )
    return factory(url, clock)


def open_alerts(url: str) -> "AlertStore":
    """The alerts of the log at `url`, without opening the log itself (`trackalert alerts`
    reads them beside a running daemon). A SQLite file must have been opened by this version
    once (migration 0007)."""
    scheme = url.partition("://")[0].lower()
    if scheme == "elasticsearch":
        from trackalert.eventlog.es_alerts import ElasticAlerts
        from trackalert.eventlog.es_client import parse_elastic_url, sync_client

        settings = parse_elastic_url(url)
        return ElasticAlerts(sync_client(settings), f"{settings.prefix}-alerts")
    from trackalert.eventlog.sqlite_alerts import SQLiteAlerts

    return SQLiteAlerts(sqlite_path(url))


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///path`` URL (three slashes relative, four absolute).

    In-memory databases are refused: the writer and the readers are separate connections that
    must see the same data, and an in-memory log would not be durable anyway.
    """
    prefix = "sqlite:///"
    if not url.lower().startswith(prefix):
        raise ValueError(f"SQLite event log URL must look like sqlite:///path.db, got {url!r}")
    path = url[len(prefix):].split("?", 1)[0]
    if not path or path == ":memory:":
        raise ValueError(f"SQLite event log needs a file path, got {url!r}")
    return path
