"""The reads of the foreign-event feed on the Elasticsearch log (eventlog/foreign.py).

Why it is built this way:

* The window projection of a node on a shared cluster adds the other nodes' events as they
  become searchable (foreign.py says how it stays exact). These are its three questions to the
  cluster, asked from the policy runner's worker thread on a blocking client of their own
  (like es_fields.py: never on the event loop, so they cannot stall an append).
* `poll` does not refresh the events index: it finds what the index's own periodic refresh
  (`index.refresh_interval`, 1 s in the shipped template) made searchable. Refreshing before
  every poll (as this did up to a6358f4) saw the other nodes' reports sooner, but on a real
  cluster each refresh writes a small segment on every shard, up to ten a second per busy node;
  the bound it costs, the refresh interval plus the poll interval (`feed_interval`), is in
  docs/elasticsearch.md. It asks for the events after the highest seq polled so far *and* the
  seq ranges still missing below it (holes: a block another node took before its bulk landed,
  or whose events are not searchable yet), so an event that becomes searchable with a seq
  below ones already seen is found too.
* Events come back whole (`from_doc`): recentReports keeps whole rows (recent.py).
"""

from __future__ import annotations

from typing import Any

from elasticsearch import Elasticsearch

from trackalert.eventlog.base import Event
from trackalert.eventlog.es_docs import from_doc
from trackalert.eventlog.es_fields import _SOURCE, _not_on_a_loop, _row
from trackalert.eventlog.es_queries import PAGE, Visibility


class ForeignReader:
    """The other nodes' events of one node's view of the log (closed by `close`)."""

    def __init__(self, client: Elasticsearch, index: str, node: str, visibility: Visibility,
                 interval: float, late: float) -> None:
        """`interval` and `late`: the feed's poll interval and hole limit (ForeignFeed)."""
        self.interval, self.late = interval, late
        self._client = client
        self._index = index
        self._node = node
        self._visibility = visibility

    def poll(self, after: int | None, holes: list[tuple[int, int]], limit: int) -> list[Event]:
        """Up to `limit` events of the other nodes with seq > `after` or within one of `holes`
        (inclusive ranges; `after` None: the holes only), ascending, as searchable now (no
        refresh: see the module docstring)."""
        _not_on_a_loop()
        ranges: list[dict[str, Any]] = [{"range": {"seq": {"gte": lo, "lte": hi}}} for lo, hi in holes]
        if after is not None:
            ranges.append({"range": {"seq": {"gt": after}}})
        if not ranges or limit <= 0:
            return []
        query = {"bool": {"filter": [{"bool": {"should": ranges, "minimum_should_match": 1}}],
                          "must_not": [{"term": {"node": self._node}}]}}
        hits = self._client.search(index=self._index, query=query, sort=[{"seq": "asc"}],
                                   size=min(limit, PAGE), track_total_hits=False)["hits"]["hits"]
        return [from_doc(hit["_source"]) for hit in hits]

    def read_nodes(self, after: int, upto: int,
                   received_from: float | None = None) -> list[tuple[tuple, bool]]:
        """(narrow row, stored by another node) of every event with seq in (after, upto] (and
        received at or after `received_from`), ascending; this node's acknowledged ones made
        searchable first."""
        _not_on_a_loop()
        if upto <= after:
            return []
        self._visibility.ensure(upto, self._refresh)
        conds: list[dict] = [{"range": {"seq": {"gt": after, "lte": upto}}}]
        if received_from is not None:
            conds.append({"range": {"received": {"gte": received_from}}})
        out: list[tuple[tuple, bool]] = []
        search_after: list[Any] | None = None
        while True:
            hits = self._client.search(
                index=self._index, query={"bool": {"filter": conds}}, sort=[{"seq": "asc"}],
                size=PAGE, source=_SOURCE + ["node"], search_after=search_after,
                track_total_hits=False,
            )["hits"]["hits"]
            out += [(_row(hit["_source"]), hit["_source"].get("node") != self._node) for hit in hits]
            if len(hits) < PAGE:
                return out
            search_after = hits[-1]["sort"]

    def own_between(self, lo: int, hi: int) -> int:
        """How many events this node stored with lo < seq < hi (did the runner skip some?)."""
        _not_on_a_loop()
        if hi - lo <= 1:
            return 0
        self._visibility.ensure(hi - 1, self._refresh)
        query = {"bool": {"filter": [{"range": {"seq": {"gt": lo, "lt": hi}}},
                                     {"term": {"node": self._node}}]}}
        return self._client.count(index=self._index, query=query)["count"]

    def _refresh(self) -> None:
        self._client.indices.refresh(index=self._index)

    def close(self) -> None:
        self._client.close()
