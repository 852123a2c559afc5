"""The Elasticsearch/OpenSearch event log: bulk creates, group commit, one seq for the cluster.

Why it is built this way (docs/elasticsearch.md has the operator's side):

* **Log order.** A seq counter document in the state index hands out seqs in blocks: a batch
  of k new events takes the next k seqs with one conditional write (``if_seq_no``/
  ``if_primary_term``: optimistic concurrency, retried on conflict). So seq stays the one
  integer that orders the whole log, contiguous for one writer exactly as on SQLite (the contract
  suite holds), unique across several nodes sharing the cluster, never reused (the counter
  outlives retention). A block whose bulk failed is a gap, never handed out again.
* **Idempotence.** Every document's `_id` is fixed before the bulk is sent (by delivery id and
  body, or by seq): a bulk the client retries after a timeout stores nothing twice (the second
  create is a 409). Delivery ids are looked up with one realtime mget per batch (a GET sees
  documents before any refresh), so a wforce retry that reaches another node is recognised too.
* **Group commit.** Appends queue while a bulk is in flight; the next bulk takes all of them.
  An append returns only after the cluster acknowledged its bulk item, and listeners see the
  events first, in seq order.
* **Cursors** are documents of the state index, written with the next bulk (or within a second).
* **Several nodes.** Each event names the node that stored it; a node's cursors, `read` and
  `last_seq` are its own, so each node's policy runner runs the reports it acknowledged, once,
  and catches up on those alone after a restart. The block a node takes is stamped with the
  later of its clock and the cluster's newest stamp (kept in the counter document), so
  `received` never goes back in seq order. `leases` claims background runs once per cluster
  (es_lease.py).
* **Spool** (``?spool=PATH``, es_spool.py). When a bulk fails because the cluster is away, its
  appends and every append after them go to a local SQLite file instead (the 200 goes out once
  that commit is fsync'd), and a forwarder sends them on, oldest first, once the cluster answers
  again; only when the spool is empty do appends go straight to the cluster again, so the log
  order is the arrival order. Spooled reports get their seq when forwarded, and the listeners
  (the policy runner) see them then: after they reached the cluster, in seq order. They keep
  their arrival time as `received` unless the cluster's newest stamp is later (other nodes
  stored reports meanwhile): then they take that stamp, so `received` never goes back in seq
  order on a shared cluster either (docs/elasticsearch.md, spool, several nodes).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, Awaitable, Callable

from elasticsearch import ApiError, AsyncElasticsearch, ConflictError, NotFoundError, TransportError
from elasticsearch.helpers import async_bulk
from elastic_transport import TlsError

from trackalert.clock import Clock
from trackalert.eventlog.base import (
    AppendFailure,
    Appended,
    AppendStats,
    DeliveryKey,
    Event,
    EventLog,
    EventLogClosed,
    EventLogError,
    EventQueries,
    Listener,
    delivery_key,
)
from trackalert.eventlog.es_alerts import ElasticAlerts
from trackalert.eventlog.es_client import ElasticSettings, async_client, sync_client
from trackalert.eventlog.es_docs import delivery_ids, event_doc_id, fingerprint_text, from_doc, to_doc
from trackalert.eventlog.es_fields import FieldsReader
from trackalert.eventlog.es_foreign import ForeignReader
from trackalert.eventlog.es_lease import RunLeases
from trackalert.eventlog.es_queries import ElasticQueries, Visibility
from trackalert.eventlog.es_spool import Spool, Spooled
from trackalert.eventlog.es_templates import install_templates
from trackalert.eventlog.rows import encode_row
from trackalert.report import Report, ReportError, parse_delivery_id

logger = logging.getLogger("trackalert")

#: Most appends one bulk takes (a bulk of 2,000 reports is ~2 MB).
MAX_BATCH = 2000
#: Delivery keys remembered with their seq, so a retry seen by this node needs no lookup.
SEEN_KEYS = 100_000
#: How long a saved cursor may wait for a bulk to carry it (seconds of loop time).
CURSOR_DELAY = 1.0
#: Hits per page of `read` (below the default index.max_result_window of 10,000).
READ_PAGE = 5000
SEQ_DOC = "seq"
CURSOR_DOC = "cursor:"
#: How long the forwarder waits between attempts while the cluster is away (seconds, doubling).
RETRY_FIRST, RETRY_MAX = 0.05, 1.0
#: HTTP statuses of a whole request that mean "the cluster is away for now": spool and retry.
AWAY_STATUSES = frozenset({429, 502, 503, 504})
#: At most how often (seconds) the stored cursors are copied into the spool while all is well.
STATE_EVERY = 1.0


class _Append:
    """One queued append: what to store, and the future its caller awaits."""

    __slots__ = ("report", "delivery_id", "key", "future", "doc_id", "seq", "received", "spooled")

    def __init__(self, report: Report, delivery_id: str | None, key: DeliveryKey | None,
                 future: "asyncio.Future[Appended]") -> None:
        self.report, self.delivery_id, self.key, self.future = report, delivery_id, key, future
        self.doc_id: str | None = None
        self.seq = 0
        #: Server time the event is stored with (0 until the commit, or from the spool).
        self.received = 0.0
        #: The spool row this append was forwarded from (None: a live append).
        self.spooled: Spooled | None = None


class _SeqCounter:
    """The cluster's seq counter: one document, advanced by conditional writes."""

    def __init__(self, client: AsyncElasticsearch, index: str) -> None:
        self._client, self._index = client, index
        self.last = 0
        #: The newest `received` handed out with a block: received never goes back in seq
        #: order, across nodes too (a node whose clock is behind stamps the cluster's newest).
        self.received = 0.0
        self._version: tuple[int, int] | None = None

    async def load(self) -> None:
        try:
            doc = await self._client.get(index=self._index, id=SEQ_DOC)
        except NotFoundError:
            try:
                doc = await self._client.index(index=self._index, id=SEQ_DOC, op_type="create",
                                               document={"kind": "seq", "last": 0})
                self.last, self._version = 0, (doc["_seq_no"], doc["_primary_term"])
                return
            except ConflictError:  # another node created it first
                doc = await self._client.get(index=self._index, id=SEQ_DOC)
        self.last = doc["_source"]["last"]
        self.received = doc["_source"].get("received", 0.0)
        self._version = (doc["_seq_no"], doc["_primary_term"])

    async def reserve(self, n: int, received: float) -> tuple[int, float]:
        """Take the next `n` seqs for this node and move the cluster's newest stamp to
        `received` if later; returns the first seq and the stamp before (the block's floor)."""
        for _ in range(1000):
            assert self._version is not None
            wanted, floor = self.last + n, self.received
            stamp = max(received, floor)
            try:
                done = await self._client.index(
                    index=self._index, id=SEQ_DOC,
                    document={"kind": "seq", "last": wanted, "received": stamp},
                    if_seq_no=self._version[0], if_primary_term=self._version[1],
                )
            except ConflictError:  # another node took a block: read where it ended
                await self.load()
                continue
            first, self.last, self.received = self.last + 1, wanted, stamp
            self._version = (done["_seq_no"], done["_primary_term"])
            return first, floor
        raise EventLogError("could not take seqs from the counter after 1000 conflicts")

    async def current(self) -> int:
        """The highest seq any node took (a realtime GET)."""
        doc = await self._client.get(index=self._index, id=SEQ_DOC)
        return max(self.last, doc["_source"]["last"])


class SpoolStats(AppendStats):
    """AppendStats plus the spool's figures, read by the metrics at scrape time."""

    __slots__ = ("spooled_total", "spool_refused_total", "_spool", "_clock")

    def __init__(self, spool: Spool, clock: Clock) -> None:
        super().__init__()
        #: Appends answered from the spool; spooled reports the cluster refused when forwarded.
        self.spooled_total = 0
        self.spool_refused_total = 0
        self._spool, self._clock = spool, clock

    @property
    def spool_depth(self) -> int:
        """Reports in the spool, not yet forwarded."""
        return self._spool.depth

    @property
    def spool_age_seconds(self) -> float:
        """How long the oldest spooled report has been waiting (0 when the spool is empty)."""
        oldest = self._spool.oldest
        return 0.0 if oldest is None else max(0.0, self._clock.time() - oldest)


class ElasticEventLog(EventLog):
    backend = "elasticsearch"

    def __init__(self, settings: ElasticSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.location = settings.location
        self.spool: Spool | None = Spool(settings.spool) if settings.spool else None
        self.stats = SpoolStats(self.spool, clock) if self.spool else AppendStats()
        self.failure: AppendFailure | None = None
        self.events_index = f"{settings.prefix}-events"
        self.state_index = f"{settings.prefix}-state"
        self.alerts_index = f"{settings.prefix}-alerts"
        self._alerts: ElasticAlerts | None = None
        self._client: AsyncElasticsearch | None = None
        self._counter: _SeqCounter | None = None
        self._queries: ElasticQueries | None = None
        self._fields: FieldsReader | None = None
        self._foreign: ForeignReader | None = None
        #: False once another node's block of seqs came between two of this node's (or did
        #: before this run): the log is then not this node's alone (`single_writer`).
        self._single = True
        self._visibility = Visibility()
        self._queue: list[_Append] = []
        self._flusher: asyncio.Task[None] | None = None
        self._listeners: list[Listener] = []
        self._cursors: dict[str, int] = {}
        self._cursor_timer: asyncio.TimerHandle | None = None
        self._seen: OrderedDict[DeliveryKey, int] = OrderedDict()
        self._last_received = 0.0
        #: This node's id on the cluster, its newest seq, and where each of its blocks is
        #: followed by its next one (`seq_after`).
        self.node = settings.node
        self._own_last = 0
        self._node_doc = f"node:{self.node}"
        self._next_block: OrderedDict[int, int] = OrderedDict()
        self.leases: RunLeases | None = None
        self._last_spooled = 0.0  # the latest received in the spool (the log's is _last_received)
        self._open = False
        #: False until the cluster answered the start-up questions (a spooled start).
        self._connected = False
        #: While True appends go to the spool: the cluster is away, or the spool is not empty yet.
        self.spooling = False
        #: Why the cluster was last found away (None once a forward or a commit succeeds).
        self.cluster_error: str | None = None
        self._spool_writes = 0
        self._spooled_more = asyncio.Event()
        self._forwarder: asyncio.Task[None] | None = None
        #: This node's last seq and its cursors stored, copied into the spool for a start without
        #: the cluster (saved by `_keep_state`, at most one write in flight).
        self._state: dict[str, int] = {}
        self._state_saving: asyncio.Task[None] | None = None
        self._state_saved_at = 0.0

    def __repr__(self) -> str:
        return f"<ElasticEventLog {self.location}>"

    # ------------------------------------------------------------------ open / close

    async def open(self) -> None:
        if self.spool is not None:
            await self.spool.open()
        self._client = async_client(self.settings)
        self._counter = _SeqCounter(self._client, self.state_index)
        try:
            await self._connect()
        except EventLogError as exc:
            if self.spool is None or exc.__cause__ is None or not _is_away(exc.__cause__):
                if self.spool is not None:  # e.g. a refused password: no use waiting for it
                    await self.spool.close()
                await self._client.close()
                raise
            await self._start_spooled(exc)
        self.leases = RunLeases(self._client, self.state_index, self.node, self.clock)
        self._visibility = Visibility()
        self._queries = ElasticQueries(sync_client(self.settings), self.events_index,
                                       self._visibility)
        self._alerts = ElasticAlerts(sync_client(self.settings), self.alerts_index)
        self._fields = FieldsReader(sync_client(self.settings), self.events_index, self._visibility)
        self._foreign = ForeignReader(sync_client(self.settings), self.events_index, self.node,
                                      self._visibility, self.settings.feed_interval,
                                      self.settings.hole_limit)
        self._open = True
        if self.spool is not None and (self.spooling or self.spool.depth):
            self.spooling = True
            self._start_forwarder()

    async def _connect(self) -> None:
        """Ask the cluster who it is, install the templates, create the indices, read the
        counter; raises EventLogError naming the hosts when the cluster cannot be used."""
        client, counter = self._client, self._counter
        assert client is not None and counter is not None
        try:
            await client.info()
            if self.settings.install_templates:
                await install_templates(client, self.settings.prefix)
            for index in (self.events_index, self.state_index, self.alerts_index):
                await _create_index(client, index)
            await counter.load()
            last_received, own_last = await self._newest(client)
            self._last_received = max(self._last_received, last_received)
            self._own_last = max(self._own_last, own_last)
            if counter.last != self._own_last:
                self._not_single(f"the cluster's last seq {counter.last} is not this node's "
                                 f"({self._own_last})")
        except (TransportError, ApiError) as exc:
            raise EventLogError(
                f"cannot use the Elasticsearch cluster at {', '.join(self.settings.hosts)} "
                f"({exc}): trackalert does not start without its event log"
            ) from exc
        self._connected = True
        self._keep_state(force=True)

    async def _start_spooled(self, exc: EventLogError) -> None:
        """Open on the spool alone: appends are spooled until the cluster answers. Needs the
        state a previous run left in the spool (this node's last seq and cursors): without it
        the policy runner would not know where it stopped."""
        assert self.spool is not None and self._client is not None
        self._state = await self.spool.state()
        if SEQ_DOC not in self._state:
            await self.spool.close()
            await self._client.close()
            raise EventLogError(f"{exc}; the spool {self.spool.path} cannot stand in for it: "
                                f"it has never seen the cluster (start once with the cluster up)")
        self._own_last = self._state[SEQ_DOC]
        self.cluster_error = str(exc)
        self.spooling = True
        logger.error("event log %s: %s; reports are spooled to %s until the cluster answers",
                     self.location, exc, self.spool.path)

    async def _newest(self, client: AsyncElasticsearch) -> tuple[float, int]:
        """The newest `received` in the log, and the newest seq this node stored."""
        await client.indices.refresh(index=self.events_index)
        hits = (await client.search(index=self.events_index, size=1, sort=[{"seq": "desc"}],
                                    source=["received"]))["hits"]["hits"]
        own = (await client.search(index=self.events_index, size=1, sort=[{"seq": "desc"}],
                                   query=self._own_query(), source=["seq"]))["hits"]["hits"]
        try:  # written with each bulk: the search misses what retention deleted
            noted = (await client.get(index=self.state_index, id=self._node_doc))["_source"]["last"]
        except NotFoundError:
            noted = 0
        return ((hits[0]["_source"]["received"] if hits else 0.0),
                max(noted, own[0]["_source"]["seq"] if own else 0))

    def _own_query(self) -> dict[str, Any]:
        return {"term": {"node": self.node}}

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False  # refuse new appends; those queued are committed below
        if self._cursor_timer is not None:
            self._cursor_timer.cancel()
        while self._flusher is not None or self._queue or (self._cursors and not self.spooling):
            if self._flusher is None:
                self._start_flush()
            assert self._flusher is not None
            await asyncio.shield(self._flusher)
            if self._cursors and self.failure is not None:
                break  # the cluster is gone: what was not written is lost, say so below
        if self._forwarder is not None:  # what it has not forwarded yet is, after the restart
            self._forwarder.cancel()
            await asyncio.gather(self._forwarder, return_exceptions=True)
        if self._cursors:
            logger.error("event log %s: cursors %s could not be saved", self.location, self._cursors)
        if self.spool is not None:
            await self._close_spool()
        assert self._client is not None and self._queries is not None
        self._queries.close()
        if self._fields is not None:
            self._fields.close()
        if self._foreign is not None:
            self._foreign.close()
        if self._alerts is not None:
            self._alerts.close()
        await self._client.close()

    async def _close_spool(self) -> None:
        assert self.spool is not None
        if self._state_saving is not None:
            await asyncio.gather(self._state_saving, return_exceptions=True)
        if self.spool.is_open:
            await self.spool.save_state(self._state | {SEQ_DOC: self._own_last} | {
                CURSOR_DOC + name: seq for name, seq in self._cursors.items()})
            if self.spool.depth:
                logger.warning("event log %s: %d reports stay in the spool %s, forwarded after "
                               "the restart", self.location, self.spool.depth, self.spool.path)
            await self.spool.close()

    def _check_open(self) -> AsyncElasticsearch:
        if not self._open or self._client is None:
            raise EventLogClosed(f"the event log {self.location} is not open")
        return self._client

    def _check_reachable(self) -> AsyncElasticsearch:
        """The client, unless the cluster has not answered since a spooled start."""
        client = self._check_open()
        if not self._connected:
            raise EventLogError(f"the Elasticsearch cluster of {self.location} has not answered "
                                f"yet ({self.cluster_error}); reports are spooled meanwhile")
        return client

    def alerts(self) -> ElasticAlerts:
        if self._alerts is None or not self._open:
            raise EventLogClosed(f"the event log {self.location} is not open")
        return self._alerts

    def queries(self) -> EventQueries:
        if self._queries is None or not self._open:
            raise EventLogClosed(f"the event log {self.location} is not open")
        return self._queries

    # ------------------------------------------------------------------ appends

    async def append(
        self, report: Report, delivery_id: str | None = None, fingerprint: bytes | None = None
    ) -> Appended:
        self._check_open()
        delivery_id = parse_delivery_id(delivery_id)
        encode_row(report, delivery_id)  # the same checks as SQLite: a bad report fails alone
        key = delivery_key(report, delivery_id, fingerprint)
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._queue.append(_Append(report, delivery_id, key, future))
        self.stats.pending += 1
        if self._flusher is None:
            self._start_flush()
        return await future

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def _start_flush(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._queue or (self._cursors and not self.spooling):
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await self._flush_batch(batch)
                finally:
                    self.stats.pending -= len(batch)
                if not batch and self.failure is not None:
                    return  # cursors alone failed: retried by the next bulk or close
        finally:
            self._flusher = None

    async def _flush_batch(self, batch: list[_Append]) -> None:
        """Commit `batch` to the cluster, or to the spool while spooling (also when the cluster
        turns out to be away now)."""
        if self.spooling:
            await self._spool_batch(batch)
            return
        cursors, self._cursors = self._cursors, {}
        try:
            await self._commit(batch, cursors)
        except Exception as exc:
            if self.spool is None or not _is_away(exc):
                self._failed(batch, cursors, exc)
                return
            self._restore_cursors(cursors)
            self._went_away(exc)
            await self._spool_batch(batch)

    async def _commit(self, batch: list[_Append], cursors: dict[str, int],
                      before_bulk: Callable[[list[_Append]], Awaitable[None]] | None = None,
                      ) -> dict[str, Exception]:
        """Store `batch` (and `cursors`) with one bulk; returns the refused items by `_id`.
        `before_bulk` is awaited with the new appends once their seqs are known."""
        assert self._client is not None and self._counter is not None
        duplicates, collisions = await self._sort_out(batch)
        fresh = [a for a in batch if a.doc_id is not None]
        new = [a for a in fresh if not a.seq]  # the others have theirs from the spool
        if new:
            await self._take_seqs(new)
        if before_bulk is not None:
            await before_bulk(new)
        actions = [self._action(item) for item in fresh]
        actions += [{"_op_type": "index", "_index": self.state_index, "_id": self._cursor_id(name),
                     "_source": {"kind": "cursor", "seq": seq}} for name, seq in cursors.items()]
        if fresh:  # this node's newest seq outlives retention, as the counter does
            actions.append({"_op_type": "index", "_index": self.state_index, "_id": self._node_doc,
                            "_source": {"kind": "node", "node": self.node, "last": self._own_last}})
        refused: dict[str, Exception] = {}
        if actions:
            _, errors = await async_bulk(self._client, actions, chunk_size=len(actions),
                                         max_chunk_bytes=200 * 2**20, raise_on_error=False,
                                         raise_on_exception=True)
            refused = await self._refused(errors, fresh, cursors)
        if fresh:
            self._last_received = max(self._last_received, *(a.received for a in fresh))
        if cursors:
            self._keep_state(**{CURSOR_DOC + name: seq for name, seq in cursors.items()
                                if name not in self._cursors})
        self._committed(batch, fresh, duplicates, collisions, refused)
        return refused

    async def _take_seqs(self, new: list[_Append]) -> None:
        """Give `new` the next block of seqs, and each its `received`: when it came (a spooled
        report's arrival, a live one's now), or the stamp of what the cluster stored before it
        if later (another node's block taken while this node spooled), so `received` never
        goes back in seq order across the nodes."""
        assert self._counter is not None
        now = max(self.clock.time(), self._last_received)
        first, floor = await self._counter.reserve(len(new), max(a.received or now for a in new))
        self._own_block(first, first + len(new) - 1)
        for offset, item in enumerate(new):
            item.seq = first + offset
            if item.key is None:
                item.doc_id = event_doc_id(item.seq, None)
            floor = item.received = max(item.received or now, floor)

    def _action(self, item: _Append) -> dict[str, Any]:
        fp = item.key[1] if item.key is not None else None
        return {"_op_type": "create", "_index": self.events_index, "_id": item.doc_id,
                "_source": to_doc(item.seq, item.received, item.report, item.delivery_id, fp,
                                  self.node)}

    async def _sort_out(self, batch: list[_Append]) -> tuple[dict[int, Any], list[_Append]]:
        """Mark each keyed append new (its `doc_id` set) or a duplicate.

        Returns {index in batch: seq or the earlier `_Append` of this batch it repeats} for
        the duplicates, and the new appends whose delivery id was stored before with another
        body (collisions)."""
        unknown = [a for a in batch if a.key is not None and not a.seq and a.key not in self._seen]
        stored = await self._lookup(unknown)
        duplicates: dict[int, Any] = {}
        collisions: list[_Append] = []
        in_batch: dict[DeliveryKey, _Append] = {}
        claimed: set[str] = set()
        for item in batch:  # sent before under this seq and `_id` (from the spool): again, and
            if item.seq and item.key is not None:  # a copy of it in this batch repeats it
                in_batch.setdefault(item.key, item)  # (else both shared one `_id`: the one
                claimed.add(item.doc_id)             # stored was taken as stored elsewhere)
        for index, item in enumerate(batch):
            if item.seq:
                continue
            if item.key is None:
                item.doc_id = ""  # named after its seq, once it has one
                continue
            if item.key in self._seen:
                duplicates[index] = self._seen[item.key]
                continue
            if item.key in in_batch:
                duplicates[index] = in_batch[item.key]
                continue
            first_id, other_id = delivery_ids(item.key)
            if other_id in stored:
                duplicates[index] = stored[other_id][0]
            elif first_id in stored and stored[first_id][1] == fingerprint_text(item.key[1]):
                duplicates[index] = stored[first_id][0]
            else:
                if first_id in stored or first_id in claimed:
                    item.doc_id = other_id
                    collisions.append(item)
                else:
                    item.doc_id = first_id
                    claimed.add(first_id)
                in_batch[item.key] = item
        return duplicates, collisions

    async def _lookup(self, items: list[_Append]) -> dict[str, tuple[int, str]]:
        """The stored (seq, fingerprint) under both `_id`s of each delivery (realtime mget)."""
        if not items:
            return {}
        assert self._client is not None
        ids = list(dict.fromkeys(i for a in items for i in delivery_ids(a.key)))  # type: ignore[arg-type]
        found = await self._client.mget(index=self.events_index, ids=ids,
                                        source=["seq", "delivery_fp"])
        return {doc["_id"]: (doc["_source"]["seq"], doc["_source"].get("delivery_fp"))
                for doc in found["docs"] if doc.get("found")}

    async def _refused(self, errors: list[dict], fresh: list[_Append],
                       cursors: dict[str, int]) -> dict[str, Exception]:
        """The bulk items the cluster did not store, by `_id`. A 409 on create means the
        document is there already: our own earlier attempt of this bulk (same seq: stored), or
        another node storing the same delivery first (then this append is its duplicate). A
        refused cursor waits for the next bulk (the events beside it are stored all the same)."""
        refused: dict[str, Exception] = {}
        conflicts: list[str] = []
        for error in errors:
            (op, info), = error.items()
            if info.get("status") == 409 and op == "create":
                conflicts.append(info["_id"])
            elif info.get("_index") == self.events_index:
                reason = info.get("error", {})
                refused[info["_id"]] = ReportError(
                    f"the cluster refused the report: {reason.get('type')}: {reason.get('reason')}")
            elif info["_id"].startswith(self._cursor_id("")):
                name = info["_id"][len(self._cursor_id("")):]
                if name in cursors:
                    self._cursors.setdefault(name, cursors[name])
                logger.error("event log %s: the cluster refused cursor %r: %s", self.location,
                             name, info.get("error"))
            else:  # the node's newest seq: written again with the next bulk
                logger.error("event log %s: the cluster refused %s: %s", self.location,
                             info["_id"], info.get("error"))
        if conflicts:
            assert self._client is not None
            found = await self._client.mget(index=self.events_index, ids=conflicts, source=["seq"])
            theirs = {d["_id"]: d["_source"]["seq"] for d in found["docs"] if d.get("found")}
            for item in fresh:
                if item.doc_id in theirs and theirs[item.doc_id] != item.seq:
                    refused[item.doc_id] = _StoredElsewhere(theirs[item.doc_id])
        return refused

    def _committed(self, batch: list[_Append], fresh: list[_Append], duplicates: dict[int, Any],
                   collisions: list[_Append], refused: dict[str, Exception]) -> None:
        stored = [a for a in fresh if a.doc_id not in refused]
        events = [Event(a.seq, a.received, a.report, a.delivery_id) for a in stored]
        for item in stored:
            if item.key is not None:
                self._remember(item.key, item.seq)
        if stored:
            self._visibility.committed = max(self._visibility.committed, stored[-1].seq)
        stats = self.stats
        stats.appended_total += len(stored)
        stats.commits_total += 1
        stats.last_batch_size = len(batch)
        stats.max_batch_size = max(stats.max_batch_size, len(batch))
        self.failure = None
        self.cluster_error = None
        stored_collisions = [a for a in collisions if a.doc_id not in refused]
        stats.delivery_id_collisions_total += len(stored_collisions)
        for item in stored_collisions:
            logger.warning("event log: delivery id %r came again with another body: stored as a "
                           "new report (seq %d), not as a retry", item.delivery_id, item.seq)
        if events:
            self._tell_listeners(events)
        for index, item in enumerate(batch):
            original = duplicates.get(index)
            if original is None:
                outcome = _outcome(item, refused, False)
            elif isinstance(original, _Append):  # repeats an append of this very batch
                outcome = _outcome(original, refused, True)
            else:
                outcome = Appended(original, True)
            if isinstance(outcome, Appended) and outcome.duplicate:
                stats.duplicates_total += 1
            _settle(item.future, outcome)

    def _own_block(self, first: int, last: int) -> None:
        """Note this node's new block of seqs, so `seq_after` leads from its previous one to it."""
        if self._own_last and first != self._own_last + 1:
            self._not_single(f"another node took seqs {self._own_last + 1}..{first - 1}")
            self._next_block[self._own_last] = first
            if len(self._next_block) > SEEN_KEYS:
                self._next_block.popitem(last=False)
        self._own_last = max(self._own_last, last)

    def _not_single(self, why: str) -> None:
        if self._single:
            logger.info("event log %s: %s; the policy runner's projection follows the other "
                        "nodes' events from now on", self.location, why)
        self._single = False

    def single_writer(self) -> bool:
        """Whether every seq this node took so far followed its previous one, since a start
        at which the cluster's last seq was this node's own: then no other node's event lies
        between (or can still arrive below) the events the runner judges."""
        return self._single

    def read_fields(self, after_seq: int, limit: int, received_from: float | None = None) -> list[tuple]:
        """The acknowledged events after `after_seq`, narrow (es_fields.py); from a worker
        thread only."""
        self._check_open()
        assert self._fields is not None
        return self._fields.read(after_seq, limit, received_from)

    def foreign_source(self) -> ForeignReader | None:
        """The other nodes' events, for the window projection's feed (eventlog/foreign.py)."""
        return self._foreign

    def seq_after(self, seq: int) -> int:
        """This node's seq after `seq`: the other nodes' blocks between are not ours to run."""
        return self._next_block.get(seq, seq + 1)

    def _remember(self, key: DeliveryKey, seq: int) -> None:
        self._seen[key] = seq
        if len(self._seen) > SEEN_KEYS:
            self._seen.popitem(last=False)

    def _tell_listeners(self, events: list[Event]) -> None:
        for fn in self._listeners:
            try:
                fn(events)
            except Exception:
                logger.exception("event log listener %r failed", fn)

    def _failed(self, batch: list[_Append], cursors: dict[str, int], exc: BaseException) -> None:
        """The whole bulk failed (the cluster is unreachable or refused it): every append of it
        fails, the cursors wait for the next bulk, and readiness reports the failure."""
        self._restore_cursors(cursors)
        if self.failure is None:
            self.failure = AppendFailure(self.clock.time(), str(exc))
        logger.error("event log %s: a bulk of %d appends failed: %s", self.location, len(batch), exc)
        error = EventLogError(f"the Elasticsearch event log could not store the report: {exc}")
        for item in batch:
            _settle(item.future, error)

    def _restore_cursors(self, cursors: dict[str, int]) -> None:
        """Cursors whose bulk failed wait for the next one (a newer save wins)."""
        for name, seq in cursors.items():
            self._cursors.setdefault(name, seq)

    # ------------------------------------------------------------------ the spool

    def _went_away(self, exc: BaseException) -> None:
        """The cluster did not answer a bulk: spool from now on, forward when it is back."""
        logger.error("event log %s: the cluster is away (%s): reports are spooled to %s",
                     self.location, exc, self.spool.path if self.spool else None)
        self.cluster_error = str(exc)
        self.spooling = True
        self._keep_state(force=True)
        self._start_forwarder()

    async def _spool_batch(self, batch: list[_Append]) -> None:
        """Answer `batch` once it is fsync'd in the spool (seq 0: it has none yet). An append
        that was sent already keeps its seq and `_id`, so its forward stores it once."""
        assert self.spool is not None
        received = max(self.clock.time(), self._last_received, self._last_spooled)
        entries = [self._to_spool(item, received) for item in batch]
        self._spool_writes += 1
        try:
            await self.spool.add(entries)
        except Exception as exc:  # the local disk failed too: no 200 for these
            self._failed(batch, {}, exc)
            return
        finally:
            self._spool_writes -= 1
        self._last_spooled = received
        self.stats.spooled_total += len(batch)
        for item in batch:
            _settle(item.future, Appended(0, False))
        self._spooled_more.set()

    def _to_spool(self, item: _Append, received: float) -> Spooled:
        sent = item.seq > 0
        fp = item.key[1] if item.key is not None else None
        when = item.received if sent else received
        return Spooled(when, to_doc(item.seq, when, item.report, item.delivery_id, fp),
                       item.delivery_id, fp, item.seq if sent else None,
                       item.doc_id if sent else None)

    def _start_forwarder(self) -> None:
        if self._forwarder is None:
            self._forwarder = asyncio.get_running_loop().create_task(self._forward())

    async def _forward(self) -> None:
        """Until the spool is empty: connect if need be, forward its oldest reports, and wait
        (doubling, up to RETRY_MAX) while the cluster is away. Then appends go live again."""
        assert self.spool is not None
        delay = RETRY_FIRST
        try:
            while True:
                try:
                    if not self._connected:
                        await self._connect()
                    entries = await self.spool.head(MAX_BATCH)
                    if not entries:
                        if self._spool_writes:
                            self._spooled_more.clear()
                            await self._spooled_more.wait()
                            continue
                        break
                    await self._forward_batch(entries)
                    delay = RETRY_FIRST
                except Exception as exc:  # the cluster is away still (or the spool's disk)
                    self.cluster_error = str(exc)
                    logger.log(logging.WARNING if delay == RETRY_FIRST else logging.DEBUG,
                               "event log %s: forwarding the spool waits: %s", self.location, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
        finally:
            self._forwarder = None
        self.spooling = False
        logger.warning("event log %s: the cluster is back, the spool is forwarded", self.location)
        if (self._queue or self._cursors) and self._flusher is None and self._open:
            self._start_flush()

    async def _forward_batch(self, entries: list[Spooled]) -> None:
        """Store `entries` in order: the seqs they get are in the spool (fsync'd) before the
        bulk goes out, so a forward repeated after a crash sends the same `_id`s."""
        assert self.spool is not None
        batch = [self._from_spool(entry) for entry in entries]
        cursors, self._cursors = self._cursors, {}

        async def assigned(new: list[_Append]) -> None:
            for item in new:
                assert item.spooled is not None
                item.spooled.seq, item.spooled.doc_id = item.seq, item.doc_id
                item.spooled.received = item.received  # later than its arrival on a shared cluster
            await self.spool.assign(item.spooled for item in new)  # type: ignore[union-attr]

        try:
            refused = await self._commit(batch, cursors, assigned)
        except BaseException:
            self._restore_cursors(cursors)
            raise
        for item in batch:
            if item.doc_id in refused and not isinstance(refused[item.doc_id], _StoredElsewhere):
                self.stats.spool_refused_total += 1
                logger.error("event log %s: the cluster refused a spooled report (login %r), "
                             "dropped from the spool: %s", self.location, item.report.login,
                             refused[item.doc_id])
        await self.spool.remove(entries)

    def _from_spool(self, entry: Spooled) -> _Append:
        report = from_doc(entry.doc | {"seq": 0}).report
        key = (entry.delivery_id, entry.fp) if entry.delivery_id and entry.fp else None
        answered: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        answered.cancel()  # its 200 went out when it was spooled
        item = _Append(report, entry.delivery_id, key, answered)
        item.spooled, item.received = entry, entry.received
        if entry.seq:
            item.seq, item.doc_id = entry.seq, entry.doc_id
        return item

    def _keep_state(self, force: bool = False, **values: int) -> None:
        """Copy the last seq and the stored cursors into the spool: when the cluster goes away,
        at close, and at most every STATE_EVERY seconds in between (one write at a time). A
        copy a little behind only makes a start without the cluster run a few reports again."""
        if self.spool is None:
            return
        self._state.update(values)
        self._state[SEQ_DOC] = self._own_last  # this node's: its runner's head
        if force:  # also the cursors still waiting for a bulk: those reports have run
            self._state.update({CURSOR_DOC + n: seq for n, seq in self._cursors.items()})
        now = self.clock.monotonic()
        if self._state_saving is None and self.spool.is_open and (
                force or now - self._state_saved_at >= STATE_EVERY):
            self._state_saved_at = now
            self._state_saving = asyncio.get_running_loop().create_task(self._save_state())

    async def _save_state(self) -> None:
        assert self.spool is not None
        try:
            saved: dict[str, int] = {}
            while saved != self._state and self.spool.is_open:
                saved = dict(self._state)
                await self.spool.save_state(saved)
        except Exception:
            logger.exception("event log %s: the spool's state could not be saved", self.location)
        finally:
            self._state_saving = None

    # ------------------------------------------------------------------ reading

    async def read(self, after_seq: int, limit: int) -> list[Event]:
        """The events after `after_seq` that this node stored: those its policy runner runs
        (each node runs the reports it acknowledged; the others' are theirs to run)."""
        client = self._check_reachable()
        await self._make_visible(client)
        events: list[Event] = []
        after: list[Any] | None = None
        query = {"bool": {"filter": [{"range": {"seq": {"gt": after_seq}}}, self._own_query()]}}
        while len(events) < limit:
            size = min(limit - len(events), READ_PAGE)
            hits = (await client.search(
                index=self.events_index, query=query,
                sort=[{"seq": "asc"}], size=size, search_after=after, track_total_hits=False,
            ))["hits"]["hits"]
            events += [from_doc(hit["_source"]) for hit in hits]
            if len(hits) < size:
                break
            after = hits[-1]["sort"]
        return events

    async def _make_visible(self, client: AsyncElasticsearch) -> None:
        target = self._visibility.needed()
        if target is not None:
            await client.indices.refresh(index=self.events_index)
            self._visibility.refreshed(target)

    async def last_seq(self) -> int:
        """The newest seq this node stored (the policy runner's head; on a cluster shared by
        several nodes, `describe` has the cluster's)."""
        self._check_open()
        return self._own_last  # on a spooled start, as the spool's state kept it

    # ------------------------------------------------------------------ cursors

    async def load_cursor(self, name: str) -> int:
        client = self._check_open()
        if name in self._cursors:
            return self._cursors[name]
        if not self._connected:  # a spooled start: the cursor as this node last stored it
            return self._state.get(CURSOR_DOC + name, 0)
        try:
            doc = await client.get(index=self.state_index, id=self._cursor_id(name))
        except NotFoundError:
            return 0
        return doc["_source"]["seq"]

    def _cursor_id(self, name: str) -> str:
        """A consumer's cursor is this node's: its runner runs this node's events."""
        return f"{CURSOR_DOC}{self.node}:{name}"

    def save_cursor(self, name: str, seq: int) -> None:
        self._cursors[name] = seq
        if self.spooling:  # no bulk carries it while the cluster is away: the spool keeps it
            self._keep_state(force=True)
        if self._flusher is None and self._cursor_timer is None and self._open:
            self._cursor_timer = asyncio.get_running_loop().call_later(CURSOR_DELAY, self._cursor_due)

    def _cursor_due(self) -> None:
        self._cursor_timer = None
        if self._flusher is None and self._cursors and self._open:
            self._start_flush()

    # ------------------------------------------------------------------ retention

    async def prune(self, older_than: float, chunk: int = 5000) -> int:
        client = self._check_reachable()
        await self._make_visible(client)
        done = await client.delete_by_query(
            index=self.events_index, query={"range": {"received": {"lt": older_than}}},
            conflicts="proceed", refresh=True, scroll_size=max(chunk, 1),
        )
        return int(done["deleted"])

    async def prune_deliveries(self, older_than: float, chunk: int = 5000) -> int:
        """Nothing to do: a delivery id is the `_id` of its event and goes with it when the
        event is pruned (so a retry is recognised for as long as the event is kept)."""
        self._check_open()
        return 0

    async def describe(self) -> dict:
        """The summary; with a spool also its depth and age, and while the cluster is away
        only what is known locally (asking the cluster would wait for its timeouts)."""
        client = self._check_open()
        if self.spool is None:
            return await self._describe_cluster(client)
        if self.spooling and self.cluster_error is not None:
            info: dict[str, Any] = {"backend": self.backend, "location": self.location,
                                    "events": 0, "last_seq": self._state.get(SEQ_DOC, 0),
                                    "cluster": f"away: {self.cluster_error}"}
        else:
            info = await self._describe_cluster(client)
        assert isinstance(self.stats, SpoolStats)
        info["spool"] = {"path": self.spool.path, "depth": self.stats.spool_depth,
                         "age_seconds": self.stats.spool_age_seconds}
        return info

    async def _describe_cluster(self, client: AsyncElasticsearch) -> dict[str, Any]:
        await self._make_visible(client)
        result = await client.search(
            index=self.events_index, size=0, track_total_hits=True, aggs={
                "first_seq": {"min": {"field": "seq"}}, "last_seq": {"max": {"field": "seq"}},
                "oldest": {"min": {"field": "received"}}, "newest": {"max": {"field": "received"}},
            })
        aggs = result["aggregations"]
        count = result["hits"]["total"]["value"]
        stats = await client.indices.stats(index=self.events_index, metric="store")
        assert self._counter is not None
        return {
            "backend": self.backend,
            "location": self.location,
            "events": count,
            "first_seq": int(aggs["first_seq"]["value"]) if count else 0,
            "last_seq": await self._counter.current(),
            "oldest_received": aggs["oldest"]["value"] if count else None,
            "newest_received": aggs["newest"]["value"] if count else None,
            "size_bytes": stats["_all"]["primaries"]["store"]["size_in_bytes"],
        }


class _StoredElsewhere(Exception):
    """A bulk item's delivery was stored first by another writer, under `seq`."""

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.seq = seq


async def _create_index(client: AsyncElasticsearch, index: str) -> None:
    """Create `index` (its template gives it its mapping) unless it exists."""
    if not await client.indices.exists(index=index):
        try:
            await client.indices.create(index=index)
        except ApiError as exc:
            if "resource_already_exists" not in str(exc):  # another node was quicker
                raise


def _is_away(exc: BaseException) -> bool:
    """Whether a failed request means the cluster is away for now (spool and retry) rather
    than that it refused the request (which a retry would not change)."""
    if isinstance(exc, ApiError):
        return exc.meta.status in AWAY_STATUSES
    if isinstance(exc, TlsError):  # a certificate refused: waiting does not change it
        return False
    return isinstance(exc, (TransportError, OSError, asyncio.TimeoutError))


def _outcome(item: _Append, refused: dict[str, Exception], repeat: bool) -> Appended | Exception:
    """What the append of `item` (or, with `repeat`, of a copy of it) is told."""
    error = refused.get(item.doc_id or "")
    if isinstance(error, _StoredElsewhere):
        return Appended(error.seq, True)
    if error is not None:
        return error
    return Appended(item.seq, repeat)


def _settle(future: "asyncio.Future[Appended]", outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
