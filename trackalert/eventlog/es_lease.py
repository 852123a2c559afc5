"""Background runs claimed once per cluster: a lease document per function in PREFIX-state.

Several nodes load the same config, so each schedules the same background functions. Before a
run, a node claims it (`RunLeases.claim`): the function's document ``lease:NAME`` holds who runs
it (`holder`, the node id), the due time of the run claimed last (`due`) and until when the
holder keeps it (`expires`). The claim is a conditional write (``op_type=create`` for the first
one, ``if_seq_no``/``if_primary_term`` after), so of two nodes racing for one run exactly one
wins. A run is granted when

* its due time is later than the one claimed last: each cron due time runs once in total, and
* the lease is this node's, or has expired: another node keeps an interval schedule, whose due
  times differ from node to node, while it runs it.

A holder killed with its lease simply stops renewing it: from `expires` on, the next due run is
claimed by whichever node asks first. The scheduler chooses the time-to-live so that no run is
lost for cron (the lease ends at the next due time) and at most two intervals pass for an
interval schedule. Times are the daemon's clock (`trackalert.clock`), so the tests drive them.
"""

from __future__ import annotations

import logging

from elasticsearch import AsyncElasticsearch, ConflictError, NotFoundError

from trackalert.clock import Clock

logger = logging.getLogger("trackalert")

LEASE_DOC = "lease:"
#: Conflicting writes to one lease before a node gives a run up (another node is claiming it).
MAX_RACES = 10


class RunLeases:
    """This node's side of the leases of one cluster's background functions."""

    def __init__(self, client: AsyncElasticsearch, index: str, node: str, clock: Clock) -> None:
        self._client, self._index, self.node, self._clock = client, index, node, clock

    async def claim(self, name: str, due: float, ttl: float) -> bool:
        """Whether this node runs `name`'s run due at `due`; if so it holds the lease until
        `due + ttl`."""
        doc_id = LEASE_DOC + name
        claimed = {"kind": "lease", "name": name, "holder": self.node, "due": due,
                   "expires": due + ttl}
        for _ in range(MAX_RACES):
            try:
                doc = await self._client.get(index=self._index, id=doc_id)
            except NotFoundError:
                try:
                    await self._client.index(index=self._index, id=doc_id, op_type="create",
                                             document=claimed)
                    return True
                except ConflictError:
                    continue  # another node created it first: look at what it claimed
            held = doc["_source"]
            if held["due"] >= due:
                return False  # this run (or a later one) is claimed already
            if held["holder"] != self.node and held["expires"] > self._clock.time():
                return False  # another node holds the function and is alive
            try:
                await self._client.index(index=self._index, id=doc_id, document=claimed,
                                         if_seq_no=doc["_seq_no"],
                                         if_primary_term=doc["_primary_term"])
                return True
            except ConflictError:
                continue
        return False

    async def holder(self, name: str) -> dict | None:
        """The lease of `name` as stored (holder, due, expires), or None (for showEventLog and tests)."""
        try:
            return (await self._client.get(index=self._index, id=LEASE_DOC + name))["_source"]
        except NotFoundError:
            return None
