"""An Elasticsearch log read whole, as of one moment: what export and replay read from an index.

Why it is built this way:

* **Read-only.** Nothing is written: no template, no index, no cursor. The only request that is
  not a read is one refresh of the events index at the start (it changes no document), so that
  every report acknowledged before the export or replay started is in it, whichever node took
  it; a user without the `maintenance` privilege gets the snapshot without it (the reports of the
  last refresh interval may then be missing) and a warning.
* **Consistent.** The reads go through one point in time opened at the start, so what nodes
  append meanwhile is never seen and the pages fit together (search_after on `seq`, which is
  unique). OpenSearch (and osmem-server) open it with ``POST /INDEX/_search/point_in_time``,
  Elasticsearch with ``POST /INDEX/_pit``: both are tried, in that order (the issue's facts:
  osmem-server has only the first).
* **Rows as SQLite's.** `rows` gives each event in EVENT_COLUMNS order, exactly as an SQLite log
  row, so the export writes the same bytes and the replay loads the same events as from a file.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

from elasticsearch import ApiError, AuthorizationException, Elasticsearch, NotFoundError, TransportError

from trackalert.eventlog.base import Event
from trackalert.eventlog.es_client import parse_elastic_url, sync_client
from trackalert.eventlog.es_docs import from_doc
from trackalert.eventlog.rows import encode_row

logger = logging.getLogger("trackalert")

#: Events per page (below the default index.max_result_window of 10,000).
PAGE = 5000
#: How long the point in time lives between two pages.
KEEP_ALIVE = "5m"
_JSON = {"accept": "application/json", "content-type": "application/json"}


class SnapshotError(Exception):
    """The index cannot be read as an event log; the message is for the operator."""


def is_elastic_url(location: str) -> bool:
    return location.lower().startswith("elasticsearch://")


class ElasticSnapshot:
    """The events of the log at `url` as of opening, read-only; use as a context manager."""

    def __init__(self, url: str) -> None:
        self.settings = parse_elastic_url(url)
        self.location = self.settings.location
        self.index = f"{self.settings.prefix}-events"
        self._client: Elasticsearch = sync_client(self.settings)
        self._pit: tuple[str, str] | None = None  # (kind, id)
        try:
            if not self._client.indices.exists(index=self.index):
                raise SnapshotError(f"{self.location}: no event log there (no index {self.index})")
            self._refresh()
            self._pit = self._open_pit()
        except (TransportError, ApiError) as exc:
            self._client.close()
            raise SnapshotError(f"cannot read the event log {self.location}: {exc}") from exc
        except SnapshotError:
            self._client.close()
            raise

    def __enter__(self) -> "ElasticSnapshot":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _refresh(self) -> None:
        try:
            self._client.indices.refresh(index=self.index)
        except AuthorizationException as exc:
            logger.warning("%s: cannot refresh %s (%s): reports acknowledged in the last "
                           "refresh interval may be missing", self.location, self.index, exc)

    def _open_pit(self) -> tuple[str, str]:
        try:
            answer = self._client.perform_request(
                "POST", f"/{self.index}/_search/point_in_time", params={"keep_alive": KEEP_ALIVE},
                headers=_JSON)
            return "opensearch", answer["pit_id"]
        except ApiError as exc:
            if exc.meta.status not in (400, 404, 405):
                raise
        answer = self._client.open_point_in_time(index=self.index, keep_alive=KEEP_ALIVE)
        return "elasticsearch", answer["id"]

    def events(self, from_: float | None = None, to: float | None = None,
               logins: Sequence[str] = ()) -> Iterator[list[Event]]:
        """The events with `from_ <= received < to` (of `logins`, if any), in seq order, a page
        at a time."""
        for hits in self._pages(from_, to, logins):
            yield [from_doc(hit["_source"]) for hit in hits]

    def rows(self, from_: float | None = None, to: float | None = None,
             logins: Sequence[str] = ()) -> Iterator[list[tuple]]:
        """As `events`, each event as an SQLite `events` row (EVENT_COLUMNS order)."""
        for events in self.events(from_, to, logins):
            yield [(e.seq, e.received) + encode_row(e.report, e.delivery_id) for e in events]

    def _pages(self, from_: float | None, to: float | None,
               logins: Sequence[str]) -> Iterator[list[dict[str, Any]]]:
        assert self._pit is not None
        filters: list[dict[str, Any]] = []
        if from_ is not None or to is not None:
            bounds = {k: v for k, v in (("gte", from_), ("lt", to)) if v is not None}
            filters.append({"range": {"received": bounds}})
        if logins:
            filters.append({"terms": {"login": list(logins)}})
        after: list[Any] | None = None
        while True:
            answer = self._client.search(
                pit={"id": self._pit[1], "keep_alive": KEEP_ALIVE},
                query={"bool": {"filter": filters}}, sort=[{"seq": "asc"}], size=PAGE,
                search_after=after, track_total_hits=False)
            hits = answer["hits"]["hits"]
            if answer.get("pit_id"):
                self._pit = (self._pit[0], answer["pit_id"])
            if hits:
                yield hits
            if len(hits) < PAGE:
                return
            after = hits[-1]["sort"]

    def close(self) -> None:
        if self._pit is not None:
            kind, pit_id = self._pit
            self._pit = None
            try:
                if kind == "opensearch":
                    self._client.perform_request("DELETE", "/_search/point_in_time",
                                                 body={"pit_id": [pit_id]}, headers=_JSON)
                else:
                    self._client.close_point_in_time(id=pit_id)
            except (NotFoundError, TransportError, ApiError) as exc:  # it expires by itself
                logger.warning("%s: could not close the point in time: %s", self.location, exc)
        self._client.close()
