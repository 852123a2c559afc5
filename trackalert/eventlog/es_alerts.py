"""The alerts of an Elasticsearch event log: the `<prefix>-alerts` index (elasticqueries/).

One document per alert, `_id` its delivery id, so the same alert recorded twice (a policy
re-run, two nodes) is one document: a `create` that finds it already there is not an error.
The blocking client, as the helpers': the writers are Lua worker threads and the webhook
sender's outbox thread, never the event loop.

Visibility: a document is searchable after the next refresh (1 s by default). This node
refreshes the index before a query when it wrote since the last refresh, so its own alerts are
always seen at once (what "did we already tell alice today?" needs on one node); another node's
alert can be up to the refresh interval late, as its reports are (docs/elasticsearch.md).
"""

from __future__ import annotations

import threading
from typing import Any

from elasticsearch import ApiError, Elasticsearch, NotFoundError

from trackalert.eventlog.alerts import (
    MAX_RECENT, Alert, AlertFilter, AlertStore, time_bounds,
)
from trackalert.eventlog.filters import AsOf


class ElasticAlerts(AlertStore):
    def __init__(self, client: Elasticsearch, index: str) -> None:
        self._client = client
        self.index = index
        self._lock = threading.Lock()
        self._written = 0  # writes since the last refresh

    def record(self, alert: Alert) -> bool:
        try:
            self._client.create(index=self.index, id=alert.delivery_id, document=_doc(alert))
        except ApiError as exc:
            if exc.meta.status != 409:  # 409: recorded before (same delivery id)
                raise
            return False
        self._wrote()
        return True

    def settle(self, delivery_id: str, outcome: str, attempts: int, error: str,
               at: float | None) -> None:
        try:
            self._client.update(index=self.index, id=delivery_id, retry_on_conflict=3,
                                doc={"outcome": outcome, "attempts": attempts, "error": error,
                                     "settled": at})
        except NotFoundError:
            return  # pruned meanwhile
        self._wrote()

    def count(self, flt: AlertFilter, as_of: AsOf) -> int:
        self._visible()
        return int(self._client.count(index=self.index, query=_query(flt, as_of))["count"])

    def recent(self, flt: AlertFilter, n: int, as_of: AsOf) -> list[Alert]:
        if n <= 0:
            return []
        self._visible()
        hits = self._client.search(
            index=self.index, query=_query(flt, as_of), size=min(n, MAX_RECENT),
            sort=[{"time": "desc"}, {"delivery_id": "desc"}],
        )["hits"]["hits"]
        return [_alert(hit["_source"]) for hit in hits]

    def prune(self, older_than: float) -> int:
        self._visible()  # delete_by_query deletes what a search finds: this node's writes too
        done = self._client.delete_by_query(
            index=self.index, query={"range": {"time": {"lt": older_than}}},
            conflicts="proceed", refresh=True,
        )
        return int(done["deleted"])

    def close(self) -> None:
        self._client.close()

    def _wrote(self) -> None:
        with self._lock:
            self._written += 1

    def _visible(self) -> None:
        with self._lock:
            written, self._written = self._written, 0
        if written:
            self._client.indices.refresh(index=self.index)


def _doc(alert: Alert) -> dict[str, Any]:
    doc = {k: v for k, v in alert.to_json_dict().items() if k not in ("body", "seq")}
    doc["@timestamp"] = int(alert.time * 1000)
    doc["event_seq"] = alert.seq
    doc["body_text"] = alert.body.decode("utf-8", errors="replace")
    decoded = alert.decoded_body()
    if isinstance(decoded, dict):
        doc["body"] = decoded  # for Kibana; not indexed (the mapping disables it)
    return doc


def _alert(source: dict[str, Any]) -> Alert:
    return Alert(
        delivery_id=source["delivery_id"], hook=source["hook"],
        body=source["body_text"].encode("utf-8"), time=float(source["time"]),
        created=float(source["created"]), seq=source.get("event_seq"),
        policy=source.get("policy"), login=source.get("login"), remote=source.get("remote"),
        outcome=source["outcome"], attempts=int(source.get("attempts") or 0),
        error=source.get("error") or "", settled=source.get("settled"),
    )


def _query(flt: AlertFilter, as_of: AsOf) -> dict[str, Any]:
    """alerts.matches as a bool query; values are data in the structure, never query text."""
    terms: list[dict[str, Any]] = []
    if as_of.before_seq is not None:
        terms.append({"range": {"event_seq": {"lt": as_of.before_seq}}})  # none: not seen
    low, high = time_bounds(flt, as_of)
    bounds = {op: value for op, value in (("gte", low), ("lte", high)) if value is not None}
    if bounds:
        terms.append({"range": {"time": bounds}})
    for key in ("policy", "login", "remote", "hook", "outcome"):
        value = getattr(flt, key)
        if value is not None:
            terms.append({"term": {key: value}})
    return {"bool": {"filter": terms}} if terms else {"match_all": {}}
