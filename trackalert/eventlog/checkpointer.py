"""WAL checkpoints of the SQLite event log, off the acknowledgement path.

Why: SQLite checkpoints by itself (every 1,000 WAL pages) *inside* the COMMIT that crosses the
mark, i.e. while the appends of that commit wait for their acknowledgement. Timed per commit
under 128 appenders on an empty log (2 Dec 2026, load 3-8): commits took 7.8 ms at p50 and up
to 321 ms when they checkpointed (the statements before COMMIT under 2 ms), and append p99 was
181 ms; with the automatic checkpoint off the same load gave p99 48 ms and twice the rows/s
(but a WAL growing without bound).

A checkpoint on another connection alone does not bound the WAL under continuous appends: the
WAL starts over from its beginning only when a write transaction begins after *every* frame was
copied, and while a checkpoint copies, the writer adds frames (measured: passes every 0.25 s,
the WAL still grew to the backstop). So the work is split in two:

* this thread, on a connection of its own, runs PASSIVE checkpoints when the writer has
  committed, at most every `min_interval` s: they copy the bulk of the frames while the writer
  goes on (no lock that writers or readers wait for; never a frame that an open reader's
  snapshot still needs, so snapshots stay valid). A pass that took long is followed at once by
  another, shorter one (the frames written meanwhile), at most `MAX_PASSES`;
* once a pass was short, it asks the writer to finish: between two transactions, after the
  acknowledgements of the last one are handed over, the writer runs one PASSIVE checkpoint
  itself, copying only the few frames written since, and its next transaction restarts the WAL.

The writer's own automatic checkpoint stays as a far backstop (`BACKSTOP_PAGES`) should this
thread fall behind or fail. The graceful close still ends with a TRUNCATE checkpoint
(sqlite.py), after this thread has stopped.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger("trackalert")

#: The writer's own automatic checkpoint, only if this thread falls far behind: 16,384 pages
#: (64 MiB at 4 KiB pages) instead of SQLite's 1,000.
BACKSTOP_PAGES = 16384
#: Seconds between two rounds of passes at least: each pass fsyncs the WAL and the file, and a
#: longer WAL folds repeated writes of the same page (index pages) into one copy. But on a big
#: log the pages a pass copies are scattered (random-key indexes), and every commit's WAL fsync
#: waits behind the file's: passes every 0.25 s gave p99 104 ms at 5M events, every 0.1 s
#: 48-52 ms, every 0.05 s 36-39 ms, at about the same rate (bench/compare.py, 4 Dec 2026; see
#: README).
MIN_INTERVAL = 0.05
#: A pass at most this long hands the rest to the writer (about two commits' time: what the
#: writer then copies is what a pass this short let accumulate).
HANDOFF_S = 0.015
#: Passes in one round at most (each copies what the one before let accumulate).
MAX_PASSES = 4


@dataclass
class CheckpointStats:
    """What the checkpointer did; read by tests and benches (written by the checkpointer's
    thread, and `finished`/`longest_finish_s` by the writer's: counters, no lock)."""

    checkpoints: int = 0
    #: Frames in the WAL and how many of them were copied, as the last checkpoint reported.
    last_wal_frames: int = 0
    last_copied_frames: int = 0
    #: Checkpoints that could not copy everything (a reader's snapshot still needed frames).
    incomplete: int = 0
    failures: int = 0
    longest_s: float = 0.0
    #: The writer's own short checkpoints (`finish`), and the longest of them.
    finished: int = 0
    longest_finish_s: float = 0.0


class WalCheckpointer:
    """A thread running PASSIVE checkpoints of one SQLite file when told that commits happened."""

    def __init__(self, path: str, min_interval: float = MIN_INTERVAL,
                 busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.min_interval = min_interval
        self.busy_timeout_ms = busy_timeout_ms
        self.stats = CheckpointStats()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._done = threading.Condition()
        self._thread: threading.Thread | None = None
        #: Set by this thread after a short pass, cleared by the writer when it has finished.
        self.finish_requested = False

    def start(self) -> None:
        """Connect (in the caller's thread: a failure shows at open) and start the thread."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self.busy_timeout_ms / 1000)
        try:
            # the checkpoint's fsyncs of the WAL and of the file follow this setting
            conn.execute("PRAGMA synchronous=FULL")
            # this connection never writes, but say so: it must never checkpoint by accident
            conn.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            conn.close()
            raise
        self._thread = threading.Thread(target=self._run, args=(conn,),
                                        name="trackalert-eventlog-checkpointer", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Called by the writer after each commit: there may be frames to copy. Cheap."""
        self._wake.set()

    def finish(self, conn: sqlite3.Connection) -> None:
        """In the writer's thread, between transactions, when `finish_requested`: copy the
        frames written since the last pass, so that the next transaction restarts the WAL."""
        self.finish_requested = False
        outcome = self._passive(conn)
        if outcome is not None:
            self.stats.finished += 1
            self.stats.longest_finish_s = max(self.stats.longest_finish_s, outcome[1])

    def stop(self) -> None:
        """Stop the thread (after one last checkpoint if commits are pending) and wait for it."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait_for(self, checkpoints: int, timeout: float) -> bool:
        """Until at least `checkpoints` checkpoints ran (tests); False on timeout."""
        with self._done:
            return self._done.wait_for(lambda: self.stats.checkpoints >= checkpoints, timeout)

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                for _ in range(MAX_PASSES):
                    took = self._checkpoint(conn)
                    if took is None:
                        break
                    if took <= HANDOFF_S:
                        self.finish_requested = True
                        break
                if self._stopping.is_set():
                    return
                # at most one checkpoint per interval; a stop cuts the wait short
                self._stopping.wait(self.min_interval)
        finally:
            conn.close()

    def _passive(self, conn: sqlite3.Connection) -> tuple[tuple[int, int, int], float] | None:
        """One PASSIVE checkpoint on `conn`: ((busy, WAL frames, frames copied), seconds), or
        None if it failed (logged; the writer's backstop still bounds the WAL)."""
        started = time.perf_counter()
        try:
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            self.stats.failures += 1
            logger.warning("event log %s: WAL checkpoint failed: %s", self.path, exc)
            return None
        return (busy, frames, copied), time.perf_counter() - started

    def _checkpoint(self, conn: sqlite3.Connection) -> float | None:
        """One pass of this thread; how long it took (None if it failed)."""
        outcome = self._passive(conn)
        if outcome is None:
            return None
        (busy, frames, copied), took = outcome
        stats = self.stats
        stats.last_wal_frames, stats.last_copied_frames = frames, copied
        stats.incomplete += bool(busy) or copied < frames
        stats.longest_s = max(stats.longest_s, took)
        with self._done:
            stats.checkpoints += 1
            self._done.notify_all()
        return took
