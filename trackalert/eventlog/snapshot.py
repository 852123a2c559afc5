"""The window projection's counts on disk, so that a restart catches up instead of rebuilding.

Why it exists: the counts of a long window over millions of events take minutes to build from
the log, and until they are built the helpers answer by query, so after every restart of a big
site the policies fell behind. The counts over the log's events (tail, head] are a function of
those stored rows alone, so counts saved at shutdown are still exact at the next start for any
later runner position: the projection catches them up from their head and tail (windows.py)
as it would a build.

A snapshot is trusted only when it is plainly the same log: the format is this module's, and
the stored rows it names (its head, and the first row of each window after its tail) are still
in the log with the same received time and login; otherwise it is ignored with one log line
(another file, a rebuilt log, retention pruned rows it counts, a truncated write).

Written atomically (a temporary file beside it, fsynced, renamed over it) with `marshal`, which
holds exactly the tuples, dicts, texts, bytes and numbers the counts are made of, and runs no
code on load.
"""

from __future__ import annotations

import logging
import marshal
import os
from typing import Any, Callable

logger = logging.getLogger("trackalert")

#: Bump when what a shape id or its counts mean changes: an older snapshot is then ignored.
FORMAT = "trackalert-windows-1"

#: (seq, received, login) of a stored row: how a snapshot recognises its log.
Mark = tuple[int, float, str]
#: (window seconds, tail seq, mark of the first row after the tail or None, [(shape id, counts)])
SavedWindow = tuple[float, int, "Mark | None", list[tuple[Any, dict]]]


def mark(read: Callable[[int, int], list[tuple]], seq: int) -> Mark | None:
    """The mark of the stored row `seq`, or None when the log has no such row."""
    rows = read(seq - 1, 1)
    if not rows or rows[0][0] != seq:
        return None
    return rows[0][0], rows[0][1], rows[0][2]


def save(path: str, position: int, head: Mark | None, windows: list[SavedWindow]) -> None:
    """Write the counts as of `position` (every event up to it counted) atomically to `path`."""
    data = marshal.dumps((FORMAT, position, head, windows))
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def load(path: str, position: int,
         read: Callable[[int, int], list[tuple]]) -> tuple[int, list[SavedWindow]] | None:
    """(the position it was saved at, its windows), when the snapshot at `path` is this log's
    and no later than the runner's `position`; None otherwise (said once in the log)."""
    try:
        with open(path, "rb") as src:
            data = src.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("projection: the snapshot %s is unreadable (%s); building from the log",
                       path, exc)
        return None
    why = _check(data, position, read)
    if isinstance(why, str):
        logger.info("projection: the snapshot %s is ignored (%s); building from the log", path, why)
        return None
    return why


def _check(data: bytes, position: int,
           read: Callable[[int, int], list[tuple]]) -> tuple[int, list[SavedWindow]] | str:
    try:
        loaded = marshal.loads(data)
        form, saved_at, head, windows = loaded
    except (EOFError, ValueError, TypeError) as exc:
        return f"not a snapshot: {exc}"
    if form != FORMAT:
        return f"format {form!r}, not {FORMAT!r}"
    if saved_at > position:
        return f"saved at event {saved_at}, after the runner's position {position}"
    if saved_at and (head is None or mark(read, saved_at) != tuple(head)):
        return f"event {saved_at} is not the one it was saved at (another or a rebuilt log)"
    for seconds, tail, first, _ in windows:
        if first is not None and mark(read, first[0]) != tuple(first):
            return (f"the {seconds:g}s window counts from event {first[0]}, which the log no "
                    "longer holds as it was (pruned, or another log)")
        if first is None and tail < saved_at:
            return f"the {seconds:g}s window has no first event"
    return saved_at, windows
