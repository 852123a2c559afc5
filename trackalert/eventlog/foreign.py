"""The other nodes' events for the window projection of a node on a shared log.

Why it exists: on a cluster several nodes write to, a node's policy runner judges only its own
reports, so the projection (windows.py), which adds the events it judges, would miss the
others' and had to be switched off (every starter helper call a round trip). This feed polls the
log for the other nodes' events and hands them to the projection in the runner's thread, under
the same as-of rule as a query: inside ``report(lt)`` a helper counts the events with a seq
below lt's, this node's exactly and the other nodes' once the feed has seen them.

How it stays exact (the queries, es_queries.py, are the reference):

* **As of.** `absorb(seq)`, called before the runner judges event `seq`, returns the other
  nodes' events with a smaller seq that the projection has not had yet; those polled with a
  larger seq are *held* until the runner passes them. Nothing at or after lt counts.
* **Late events.** A node takes its block of seqs before its bulk lands, so another node's
  event can become searchable with a seq below ones already seen. The feed therefore tracks
  every seq above its *stable* mark: decided (this node's, judged; another node's, absorbed)
  or a *hole* (not seen yet). Each poll asks for the new events and for the holes below the
  event being judged; an event found in a hole is absorbed then. A hole seen for `late`
  seconds (the log's `hole_limit`) is *closed*: a block that failed (or whose node died before
  its bulk) leaves one for good, and a bulk lands within the client's timeouts. The stable mark moves over decided
  seqs and closed holes, never past the runner.
* **What the projection's log reads may count.** Its tails and builds read the log in seq
  order (`read_fields`). Up to the stable mark every stored event counts except those in a
  closed hole (an event arriving after its hole closed is never absorbed: `counts`); past it,
  exactly the decided seqs. Tails and the builder thread read only up to the stable mark,
  where nothing changes any more; the runner thread reads past it (`read_open`) when it
  switches a built shape on. So what a tail subtracts is exactly what was added.
* **Failures.** A poll the cluster refuses raises: the projection logs it once, drops its
  counters (the queries answer) and starts the feed afresh (`start`) once the cluster answers.
* Memory: the decided seqs and holes between the stable mark and the runner (normally a
  bulk's worth), the held events (at most `CHUNK` polled ahead), the closed holes (one range per
  failed block, at most `MAX_CLOSED`).
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Callable, Protocol

from trackalert.eventlog.base import Event
from trackalert.eventlog.keys import RECEIVED, SEQ, Row

logger = logging.getLogger("trackalert")

#: How often (seconds) the runner's thread asks the log for the other nodes' new events, and
#: the seconds after which a seq not seen is taken for one that will never be (a failed block):
#: the defaults of a source that does not say (the Elasticsearch log's come from its URL,
#: `feed_interval` and `hole_limit`, es_client.py).
POLL_INTERVAL = 0.5
LATE = 60.0
#: Events polled at a time, and held at most before the runner reaches them.
CHUNK = 5000
#: Most events one `absorb` takes in; past it the projection rebuilds from the log instead.
MAX_ABSORB = 20_000
#: Closed holes kept at most (then the feed starts afresh and the projection rebuilds).
MAX_CLOSED = 100_000
#: Seconds between two attempts to start the feed while the log does not answer.
RETRY = 1.0


class ForeignSource(Protocol):
    """What a shared log offers the feed (es_foreign.ForeignReader); it may also carry
    `interval` and `late` (seconds), the feed's settings."""

    def poll(self, after: int | None, holes: list[tuple[int, int]], limit: int) -> list[Event]: ...

    def read_nodes(self, after: int, upto: int,
                   received_from: float | None = None) -> list[tuple[tuple, bool]]: ...

    def own_between(self, lo: int, hi: int) -> int: ...


class FeedOverflow(Exception):
    """More foreign events to take in at once than is worth it: rebuild from the log instead."""


class ForeignFeed:
    """The other nodes' events, handed to the projection in the runner's thread.

    `stable`, `stable_received` and `closed` are read by the builder thread (ints and a tuple,
    replaced, never changed in place); everything else is the runner thread's.
    """

    def __init__(self, source: ForeignSource, monotonic: Callable[[], float] = time.monotonic,
                 interval: float | None = None, late: float | None = None) -> None:
        """`interval` and `late` None: the source's own (its log's settings), else the defaults."""
        self.source = source
        self._monotonic = monotonic
        self.interval = interval if interval is not None else getattr(source, "interval",
                                                                      POLL_INTERVAL)
        self.late = late if late is not None else getattr(source, "late", LATE)
        self.ready = False
        self._failed_at: float | None = None
        self.polls = 0
        self.absorbed_total = 0
        self._clear()

    def _clear(self) -> None:
        self.ready = False
        self.stable = 0
        self.stable_received = 0.0
        self.closed: tuple[tuple[int, int], ...] = ()
        self._known: dict[int, float] = {}  # decided seqs above `stable` -> received
        self._held: list[Event] = []  # polled, seq >= the event being judged; ascending
        self._held_seqs: set[int] = set()
        self._noticed: dict[int, float] = {}  # hole seq -> when first seen missing
        self._polled = 0  # the highest seq polled
        self._last_poll: float | None = None
        self._more = False  # the last poll filled its page

    # -- starting and stopping

    def stop(self) -> None:
        """Forget everything (the projection dropped its counters): `start` again later."""
        self._clear()

    def failed(self) -> bool:
        """Note a refused read; True for the first of an outage (log it), False after."""
        first = self._failed_at is None
        self._failed_at = self._monotonic()
        self._clear()
        return first

    def may_start(self) -> bool:
        return self._failed_at is None or self._monotonic() - self._failed_at >= RETRY

    def start(self, position: int, received: float) -> None:
        """Take over at the runner's `position` (every own event up to it judged), the event
        to be judged next received at `received`.

        Everything stored up to `position` counts as it is in the log, except the seqs of the
        last `late` seconds, which are read now: those present are decided, those missing are
        holes (a block whose bulk has not landed yet), watched like any other."""
        self._clear()
        start = position
        rows = self.source.read_nodes(0, position, received - self.late) if position else []
        if rows:
            start = rows[0][0][SEQ] - 1
        self.stable = start
        if start:
            before = self.source.read_nodes(start - 1, start)
            self.stable_received = before[0][0][RECEIVED] if before else 0.0
        for row, _ in rows:
            self._known[row[SEQ]] = row[RECEIVED]
        self._polled = position
        self.ready = True
        if self._failed_at is not None:
            logger.info("projection: the other nodes' events are followed again")
        self._failed_at = None

    # -- the runner's side

    def note_own(self, seq: int, received: float) -> None:
        """This node's event `seq` has been judged (and added by the projection's head)."""
        if seq > self.stable:
            self._known[seq] = received

    def absorb(self, seq: int) -> list[Event]:
        """The other nodes' events with a seq below `seq` not handed out before, ascending
        (polling the log when the last poll is older than the interval)."""
        now = self._monotonic()
        if self._last_poll is None or now - self._last_poll >= self.interval:
            self._poll(seq, now)
        out: list[Event] = []
        for _ in range(MAX_ABSORB // CHUNK + 2):
            held = self._held
            taken = bisect.bisect_left(held, seq, key=_seq_of)
            if taken:
                for event in held[:taken]:
                    self._held_seqs.discard(event.seq)
                    self._known[event.seq] = event.received
                out += held[:taken]
                del held[:taken]
            if len(out) > MAX_ABSORB:
                raise FeedOverflow(f"more than {MAX_ABSORB} events of other nodes to take in")
            if not (self._more and not held):
                break
            self._poll(seq, now)  # the last page was full: the log holds more below `seq`
        else:
            raise FeedOverflow(f"more than {MAX_ABSORB} events of other nodes to take in")
        self.absorbed_total += len(out)
        self._advance(seq - 1, now)
        return out

    def _poll(self, seq: int, now: float) -> None:
        holes = self._holes(seq - 1, now)
        room = CHUNK - len(self._held)
        if room > 0:
            events = self.source.poll(self._polled, holes, room)
        else:  # enough held ahead of the runner: only the holes below it
            events = self.source.poll(None, holes, CHUNK) if holes else []
        self.polls += 1
        self._last_poll = now
        self._more = room > 0 and len(events) >= room
        for event in events:
            s = event.seq
            if s <= self.stable or s in self._known or s in self._held_seqs:
                continue  # seen before, or after its hole closed (never counted: `counts`)
            self._held_seqs.add(s)
            bisect.insort(self._held, event, key=_seq_of)
            if s > self._polled:
                self._polled = s

    def _holes(self, upto: int, now: float) -> list[tuple[int, int]]:
        """The runs of seqs in (stable, min(upto, polled)] not decided: asked for again."""
        top = min(upto, self._polled)
        holes: list[tuple[int, int]] = []
        s = self.stable + 1
        known = self._known
        for k in sorted(k for k in known if k <= top):
            if k > s:
                holes.append((s, k - 1))
            s = k + 1
        if s <= top:
            holes.append((s, top))
        for lo, hi in holes:
            for h in range(lo, hi + 1):
                self._noticed.setdefault(h, now)
        return holes[:200]

    def _advance(self, upto: int, now: float) -> None:
        """Move the stable mark over the decided seqs and the holes older than `late`."""
        s = self.stable
        closed: list[tuple[int, int]] | None = None
        known, noticed = self._known, self._noticed
        while s < upto:
            nxt = s + 1
            received = known.pop(nxt, None)
            if received is not None:
                self.stable_received = max(self.stable_received, received)
                noticed.pop(nxt, None)
                s = nxt
                continue
            seen = noticed.get(nxt)
            if seen is None:
                noticed[nxt] = now
                break
            if now - seen < self.late:
                break
            del noticed[nxt]
            if closed is None:
                closed = list(self.closed)
            if closed and closed[-1][1] == s:
                closed[-1] = (closed[-1][0], nxt)
            else:
                closed.append((nxt, nxt))
            s = nxt
        self.stable = s
        if closed is not None:
            if len(closed) > MAX_CLOSED:
                raise FeedOverflow(f"more than {MAX_CLOSED} seq ranges never stored")
            self.closed = tuple(closed)

    # -- what the projection's reads may count

    def counts(self, seq: int) -> bool:
        """Whether the projection counts the stored event `seq` (runner thread)."""
        if seq <= self.stable:
            return not _in(self.closed, seq)
        return seq in self._known

    def read_stable(self, read: Callable[..., list[Row]]) -> Callable[..., list[Row]]:
        """`read` (the log's `read_fields`) cut at the stable mark, without the closed holes:
        what the tails and the builder thread read."""
        def stable_read(after: int, limit: int, received_from: float | None = None) -> list[Row]:
            upto, closed = self.stable, self.closed
            if after >= upto:
                return []
            rows = read(after, limit, received_from)
            if rows and rows[-1][SEQ] > upto:
                rows = rows[:bisect.bisect_right(rows, upto, key=_row_seq)]
            if closed:
                rows = [row for row in rows if not _in(closed, row[SEQ])]
            return rows
        return stable_read

    def read_open(self, after: int, upto: int) -> list[Row]:
        """The rows the projection counts with seq in (after, upto], past the stable mark
        too (runner thread: switching a built shape on)."""
        return [row for row, _ in self.source.read_nodes(after, upto) if self.counts(row[SEQ])]

    def describe(self) -> dict:
        return {"stable": self.stable, "held": len(self._held), "open": len(self._known),
                "closed_ranges": len(self.closed), "polls": self.polls,
                "absorbed": self.absorbed_total, "ready": self.ready}


def _in(ranges: tuple[tuple[int, int], ...], seq: int) -> bool:
    i = bisect.bisect_right(ranges, (seq, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= seq <= ranges[i][1]


def _seq_of(event: Event) -> int:
    return event.seq


def _row_seq(row: Row) -> int:
    return row[SEQ]
