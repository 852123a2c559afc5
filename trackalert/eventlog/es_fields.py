"""The narrow synchronous read of the Elasticsearch log (`EventLog.read_fields`).

Why it is built this way:

* The window projection (eventlog/windows.py) calls it from the policy runner's worker thread
  and from its builder thread, between two Lua calls. It uses a blocking client of its own
  (urllib3: thread safe, its own connection pool), like the helpers' queries (es_queries.py),
  rather than hopping onto the event loop with `run_coroutine_threadsafe`: no call here ever
  waits for the loop, so it cannot deadlock with it, and the loop's appends never queue
  behind a projection build. It refuses to run on a thread with a running event loop (it would
  stall every append there while it waits for the cluster).
* An unreachable cluster raises after the client's timeout and retries (`timeout=` of the
  URL, 2 retries): the projection catches it, logs it, drops its shapes and lets the queries
  answer (and say what is wrong) until it has rebuilt them.
* Rows are `FIELDS_ROW` tuples with SQLite's values: the address as its `ip_key`, success as
  0/1, unknown enrichment as None, the maps as compact JSON text or None (rebuilt from their
  `_kv` terms, in the report's order).
* Only events this node has acknowledged are handed out (seq <= `Visibility.committed`),
  made searchable first: a refresh in the middle of a bulk may show some of its documents and
  not others, and a cursor that took a later one would never come back for the missing one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from elasticsearch import Elasticsearch

from trackalert.eventlog.base import EventLogError
from trackalert.eventlog.es_docs import kv_split
from trackalert.eventlog.es_queries import PAGE, Visibility
from trackalert.eventlog.ipkey import ip_key
from trackalert.eventlog.rows import json_or_null

_SOURCE = ["seq", "received", "login", "success", "ip", "pwhash", "country", "protocol", "asn",
           "device_attrs_kv", "attrs_kv"]


class FieldsReader:
    """`read_fields` over the events index, on a blocking client (closed by `close`)."""

    def __init__(self, client: Elasticsearch, index: str, visibility: Visibility) -> None:
        self._client = client
        self._index = index
        self._visibility = visibility

    def read(self, after_seq: int, limit: int, received_from: float | None = None) -> list[tuple]:
        """Up to `limit` acknowledged events with seq > `after_seq` (received at or after
        `received_from`), ascending."""
        _not_on_a_loop()
        upto = self._visibility.committed
        if limit <= 0 or after_seq >= upto:
            return []
        self._visibility.ensure(upto, self._refresh)
        conds: list[dict] = [{"range": {"seq": {"gt": after_seq, "lte": upto}}}]
        if received_from is not None:
            conds.append({"range": {"received": {"gte": received_from}}})
        rows: list[tuple] = []
        after: list[Any] | None = None
        while len(rows) < limit:
            size = min(limit - len(rows), PAGE)
            hits = self._client.search(
                index=self._index, query={"bool": {"filter": conds}}, sort=[{"seq": "asc"}],
                size=size, source=_SOURCE, search_after=after, track_total_hits=False,
            )["hits"]["hits"]
            rows += [_row(hit["_source"]) for hit in hits]
            if len(hits) < size:
                break
            after = hits[-1]["sort"]
        return rows

    def _refresh(self) -> None:
        self._client.indices.refresh(index=self._index)

    def close(self) -> None:
        self._client.close()


def _row(source: dict[str, Any]) -> tuple:
    get = source.get
    return (source["seq"], source["received"], source["login"], int(source["success"]),
            ip_key(get("ip") or ""), source["pwhash"], get("country"), source["protocol"],
            get("asn"), _map(get("device_attrs_kv")), _map(get("attrs_kv")))


def _map(terms: list[str] | str | None) -> str | None:
    """A map as SQLite stores it, from its `_kv` terms: source filtering on the map itself
    would hand dotted keys (``browser.family``) back as nested objects (osmem-server does)."""
    if not terms:
        return None
    if isinstance(terms, str):
        terms = [terms]
    return json_or_null(dict(kv_split(term) for term in terms))


def _not_on_a_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise EventLogError("read_fields blocks on the cluster: call it from a worker thread, "
                        "never on the event loop")
