"""The long-term helpers on the Elasticsearch event log: a `Filter` becomes one bool query.

Why it is built this way:

* Lua calls a helper synchronously from a worker thread: the blocking client (urllib3, thread
  safe, its own connection pool) answers there, with no hop onto the event loop.
* Answers must equal SQLite's, exactly. Counts are `_count` (exact); distinct values and top
  values come from a composite aggregation paged to the end (exact at any size, unlike
  ``cardinality``, which is approximate past its precision threshold, and ``terms``, whose counts
  are approximate across shards). The cost grows with the number of distinct values among the
  matching events: small for the per-login/per-address questions policies ask.
* As-of: inside ``report(lt)`` the query is ``seq < lt.seq``; a window counts back from lt's
  `received`. A document is searchable only after a refresh, so `Visibility` refreshes the
  events index before a query that must see events this node acknowledged since the last one
  (one refresh serves every query waiting for it). Events another node acknowledged become
  searchable within that node's refresh interval (docs/elasticsearch.md).
* Values only ever travel as query *data* (term values, ranges), never as query text.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

from elasticsearch import Elasticsearch

from trackalert.eventlog.base import Event, EventQueries
from trackalert.eventlog.es_docs import from_doc, kv_prefix, kv_split, kv_term, to_report_row
from trackalert.eventlog.filters import AsOf, Field, Filter
from trackalert.eventlog.ipkey import ip_key
from trackalert.eventlog.queries import _prefix_value

#: Filter attributes compared for equality with a field of the same name.
_EQUAL_FIELDS = ("protocol", "pwhash", "country", "asn")
#: Buckets per composite page, and hits per search page (below index.max_result_window).
PAGE = 5000
#: lt's `received` by seq, for windows: a policy asks several helpers about the same event.
_RECEIVED_CACHE = 4096


class Visibility:
    """What this node has acknowledged and what the events index already shows.

    `committed` is set by the writer on the event loop after each acknowledged bulk; `visible`
    is the highest seq known searchable. Refreshing is the caller's, through `refresh`.
    """

    def __init__(self) -> None:
        self.committed = 0
        self.visible = 0
        self._lock = threading.Lock()

    def ensure(self, upto: int, refresh: Callable[[], Any]) -> None:
        """Make every event this node committed up to `upto` searchable (blocking)."""
        if self.visible >= min(upto, self.committed):
            return
        with self._lock:
            if self.visible >= min(upto, self.committed):
                return  # the refresh another thread ran meanwhile covered it
            target = self.committed
            refresh()
            self.visible = max(self.visible, target)

    def needed(self) -> int | None:
        """The seq a refresh started now would make visible, or None if nothing is pending."""
        return self.committed if self.committed > self.visible else None

    def refreshed(self, target: int) -> None:
        with self._lock:
            self.visible = max(self.visible, target)


class ElasticQueries(EventQueries):
    def __init__(self, client: Elasticsearch, index: str, visibility: Visibility) -> None:
        self._client = client
        self._index = index
        self._visibility = visibility
        self._received: dict[int, float] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------ the helpers

    def count_reports(self, flt: Filter, as_of: AsOf) -> int:
        query = self._query(flt, as_of)
        if query is None:
            return 0
        return self._client.count(index=self._index, query=query)["count"]

    def count_distinct(self, field: Field, flt: Filter, as_of: AsOf) -> int:
        if field.name == "remote":  # the address, as SQLite counts its key (not the text)
            field = Field("remote", "ip")
        return len(self._buckets(field, flt, as_of))

    def top_values(self, field: Field, flt: Filter, n: int, as_of: AsOf) -> list[tuple[Any, int]]:
        if n <= 0:
            return []
        counts = self._buckets(field, flt, as_of)
        if field.kind == "prefix":
            ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]
            return [(_prefix_value(key, field.bits), count) for key, count in ranked]
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]

    def first_seen(self, flt: Filter, as_of: AsOf) -> float | None:
        return self._edge(flt, as_of, "asc")

    def last_seen(self, flt: Filter, as_of: AsOf) -> float | None:
        return self._edge(flt, as_of, "desc")

    def recent_reports(self, flt: Filter, n: int, as_of: AsOf) -> list[Event]:
        query = self._query(flt, as_of)
        if query is None or n <= 0:
            return []
        return [from_doc(hit["_source"]) for hit in self._hits(query, "desc", n)]

    def recent_rows(self, flt: Filter, n: int, as_of: AsOf) -> list[tuple]:
        query = self._query(flt, as_of)
        if query is None or n <= 0:
            return []
        return [to_report_row(hit["_source"]) for hit in self._hits(query, "desc", n)]

    def search_body(self, body: dict, as_of: AsOf) -> dict:
        """Run a whole search body (esQuery's stored queries) as of `as_of`: its query must
        match and so must the as-of bounds, added as a filter (its scores stay its own)."""
        bounds: list[dict] = []
        if as_of.before_seq is not None:
            bounds.append({"range": {"seq": {"lt": as_of.before_seq}}})
        elif as_of.now is not None:
            bounds.append({"range": {"received": {"lte": as_of.now}}})
        query = body.get("query", {"match_all": {}})
        body = {**body, "query": {"bool": {"must": [query], "filter": bounds}}}
        self._make_visible(as_of)
        return self._client.search(index=self._index, body=body).body

    # ------------------------------------------------------------------ searching

    def _edge(self, flt: Filter, as_of: AsOf, order: str) -> float | None:
        query = self._query(flt, as_of)
        if query is None:
            return None
        for hit in self._hits(query, order, 1, source=["received"]):
            return hit["_source"]["received"]
        return None

    def _hits(self, query: dict, order: str, n: int,
              source: list[str] | bool = True) -> Iterator[dict]:
        """Up to `n` hits in seq `order`, paged with search_after."""
        after: list[Any] | None = None
        while n > 0:
            page = self._client.search(
                index=self._index, query=query, sort=[{"seq": order}], size=min(n, PAGE),
                source=source, search_after=after, track_total_hits=False,
            )["hits"]["hits"]
            yield from page
            if len(page) < min(n, PAGE):
                return
            n -= len(page)
            after = page[-1]["sort"]

    def _buckets(self, field: Field, flt: Filter, as_of: AsOf) -> dict[Any, int]:
        """Every value of `field` among the matching events with its count (composite paging)."""
        query = self._query(flt, as_of)
        if query is None:
            return {}
        name, keep = _source_field(field)
        counts: dict[Any, int] = {}
        after: dict | None = None
        while True:
            composite: dict[str, Any] = {"size": PAGE, "sources": [{"v": {"terms": {"field": name}}}]}
            if after is not None:
                composite["after"] = after
            result = self._client.search(index=self._index, query=query, size=0,
                                         aggs={"values": {"composite": composite}})
            agg = result["aggregations"]["values"]
            for bucket in agg["buckets"]:
                value = keep(bucket["key"]["v"])
                if value is not None:
                    counts[value] = counts.get(value, 0) + bucket["doc_count"]
            after = agg.get("after_key")
            if len(agg["buckets"]) < PAGE or after is None:
                return counts  # a short page is the last (no request for an empty one)

    # ------------------------------------------------------------------ the query

    def _query(self, flt: Filter, as_of: AsOf) -> dict | None:
        """The bool query of `flt` as of `as_of`, or None when nothing can match."""
        conds: list[dict] = []
        if as_of.before_seq is not None:
            conds.append({"range": {"seq": {"lt": as_of.before_seq}}})
        received = self._received_range(flt, as_of)
        if received is None:
            return None
        if received:
            conds.append({"range": {"received": received}})
        if flt.login is not None:
            conds.append({"term": {"login": flt.login}})
        if flt.success is not None:
            conds.append({"term": {"success": flt.success}})
        if flt.remote is not None:
            conds.append({"term": {"ip": flt.remote}})
        if flt.netmask is not None:
            conds.append({"term": {"ip": flt.netmask}})
        for name in _EQUAL_FIELDS:
            value = getattr(flt, name)
            if value is not None:
                conds.append({"term": {name: value}})
        for name, pairs in (("device_attrs_kv", flt.device_attrs), ("attrs_kv", flt.attrs)):
            for key, value in pairs:
                conds.append({"term": {name: kv_term(key, value)}})
        self._make_visible(as_of)
        return {"bool": {"filter": conds}} if conds else {"match_all": {}}

    def _received_range(self, flt: Filter, as_of: AsOf) -> dict | None:
        """The `received` bounds ({} for none), or None when the range is empty."""
        now = as_of.now
        if now is None and as_of.before_seq is not None and flt.window is not None:
            now = self._received_at(as_of.before_seq)
        start = now - flt.window if flt.window is not None and now is not None else None
        if flt.since is not None:
            start = flt.since if start is None else max(start, flt.since)
        end = flt.until
        if as_of.before_seq is None and as_of.now is not None:
            end = as_of.now if end is None else min(end, as_of.now)
        if start is not None and end is not None and start > end:
            return None
        bounds: dict[str, float] = {}
        if start is not None:
            bounds["gte"] = start
        if end is not None:
            bounds["lte"] = end
        return bounds

    def _received_at(self, seq: int) -> float | None:
        """lt's `received` (or, if retention removed it meanwhile, the newest one before it)."""
        with self._lock:
            if seq in self._received:
                return self._received[seq]
        self._visibility.ensure(seq, self._refresh)
        hits = list(self._hits({"range": {"seq": {"lte": seq}}}, "desc", 1, source=["received"]))
        if not hits:
            return None  # not cached: another node's event may become searchable later
        received = hits[0]["_source"]["received"]
        with self._lock:
            if len(self._received) >= _RECEIVED_CACHE:
                self._received.clear()
            self._received[seq] = received
        return received

    def _make_visible(self, as_of: AsOf) -> None:
        upto = as_of.before_seq - 1 if as_of.before_seq is not None else self._visibility.committed
        self._visibility.ensure(upto, self._refresh)

    def _refresh(self) -> None:
        self._client.indices.refresh(index=self._index)


def _source_field(field: Field) -> tuple[str, Callable[[Any], Any]]:
    """The indexed field a `Field` is counted on, and how a bucket key becomes its value
    (None: not a value of this field, e.g. another key's map entry)."""
    if field.kind == "column":
        return field.name, _same
    if field.kind == "ip":
        return "ip", _same
    if field.kind == "prefix":
        width = 1 + field.bits // 8  # the bytes of the address key SQLite groups by

        def prefix(value: str) -> bytes | None:
            key = ip_key(value)
            return key[:width] if key is not None else None

        return "ip", prefix
    start = kv_prefix(field.key)

    def entry(term: str) -> str | None:
        if not term.startswith(start):
            return None
        key, value = kv_split(term)
        return value if key == field.key else None

    return field.kind + "_kv", entry


def _same(value: Any) -> Any:
    return value
