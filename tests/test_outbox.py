"""trackalert.outbox: a bounded, durable store of webhook deliveries, on real SQLite files."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from trackalert.outbox import SCHEMA_VERSION, Delivery, Outbox, OutboxFull


def delivery(n: int, next_attempt: float = 100.0) -> Delivery:
    return Delivery(
        delivery_id=f"id-{n}", hook_id=1, hook_name="alert", url="http://127.0.0.1:1/%{YYYY}",
        body=f'{{"n": {n}}}'.encode(), headers={"X-Wforce-Delivery": f"id-{n}", "X-Wforce-Event": "alert"},
        created=50.0, next_attempt=next_attempt,
    )


@pytest.fixture
def outbox(tmp_path: Path):
    box = Outbox(str(tmp_path / "outbox.db"))
    box.open()
    yield box
    box.close()


def test_a_delivery_round_trips_byte_for_byte(outbox: Outbox) -> None:
    body = b'{"login": "al\xc3\xafce", "raw": "\x00\xff"}'
    stored = outbox.enqueue(
        Delivery("abc", 3, "hook", "http://x/", body, {"A": "b", "X-Wforce-Delivery": "abc"}, 1.5, 0, 2.5),
        capacity=10,
    )
    assert stored.row > 0
    [got] = outbox.pending()
    assert got == stored
    assert got.body == body and got.headers == {"A": "b", "X-Wforce-Delivery": "abc"}


def test_the_file_survives_a_reopen_with_its_deliveries(tmp_path: Path) -> None:
    path = str(tmp_path / "outbox.db")
    first = Outbox(path)
    first.open()
    for n in range(3):
        first.enqueue(delivery(n), capacity=10)
    first.reschedule(1, attempts=2, next_attempt=200.0, error="boom")
    # no close(): as after a kill -9, only what was committed counts
    second = Outbox(path)
    second.open()
    pending = second.pending()
    assert [d.delivery_id for d in pending] == ["id-0", "id-1", "id-2"]
    assert (pending[0].attempts, pending[0].next_attempt, pending[0].last_error) == (2, 200.0, "boom")
    assert second.depth() == 3
    second.close()
    first.close()


def test_file_mode_wal_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "outbox.db"
    box = Outbox(str(path))
    box.open()
    box.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, "stored headers may carry credentials"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(sqlite3.DatabaseError, match="newer"):
        Outbox(str(path)).open()


def test_full_outbox_refuses_loudly_and_frees_up(outbox: Outbox) -> None:
    for n in range(3):
        outbox.enqueue(delivery(n), capacity=3)
    with pytest.raises(OutboxFull) as info:
        outbox.enqueue(delivery(3), capacity=3)
    assert info.value.depth == 3
    assert outbox.depth() == 3
    outbox.remove(outbox.pending()[0].row)
    outbox.enqueue(delivery(3), capacity=3)
    assert [d.delivery_id for d in outbox.pending()] == ["id-1", "id-2", "id-3"]


def test_due_orders_by_next_attempt_and_skips_in_flight(outbox: Outbox) -> None:
    rows = [outbox.enqueue(delivery(n, next_attempt=t), capacity=10).row
            for n, t in enumerate([30.0, 10.0, 20.0, 99.0])]
    assert [d.delivery_id for d in outbox.due(25.0, limit=10)] == ["id-1", "id-2"]
    assert [d.delivery_id for d in outbox.due(50.0, limit=2)] == ["id-1", "id-2"]
    assert [d.delivery_id for d in outbox.due(50.0, limit=2, exclude={rows[1]})] == ["id-2", "id-0"]
    assert outbox.due(50.0, limit=0) == []
    assert outbox.next_due() == 10.0
    assert outbox.next_due(exclude={rows[1], rows[2]}) == 30.0
    assert outbox.next_due(exclude=set(rows)) is None


def test_a_delivery_id_already_waiting_is_stored_once_even_when_full(outbox: Outbox) -> None:
    first = outbox.enqueue(delivery(1), capacity=1)
    again = outbox.enqueue(delivery(1), capacity=1)  # the same alert: a re-run, not a new one
    assert again.row == first.row
    assert outbox.depth() == 1 and [d.delivery_id for d in outbox.pending()] == ["id-1"]
    with pytest.raises(OutboxFull):
        outbox.enqueue(delivery(2), capacity=1)


def test_a_waiting_delivery_keeps_its_id_and_attempts_across_a_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "outbox.db")
    box = Outbox(path)
    box.open()
    stored = box.enqueue(delivery(7), capacity=10)
    box.reschedule(stored.row, attempts=3, next_attempt=120.0, error="503")
    box.close()
    reopened = Outbox(path)
    reopened.open()
    try:
        assert reopened.enqueue(delivery(7), capacity=10).row == stored.row
        [waiting] = reopened.pending()
        assert (waiting.delivery_id, waiting.headers["X-Wforce-Delivery"]) == ("id-7", "id-7")
        assert (waiting.attempts, waiting.next_attempt, reopened.depth()) == (3, 120.0, 1)
    finally:
        reopened.close()


def test_concurrent_enqueues_from_many_threads_respect_the_bound(outbox: Outbox) -> None:
    accepted: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(25):
            d = delivery(t * 100 + i)
            try:
                outbox.enqueue(d, capacity=120)
            except OutboxFull:
                with lock:
                    refused.append(d.delivery_id)
            else:
                with lock:
                    accepted.append(d.delivery_id)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 120 and len(refused) == 80
    assert sorted(d.delivery_id for d in outbox.pending()) == sorted(accepted)


def test_using_a_closed_outbox_is_an_error(tmp_path: Path) -> None:
    box = Outbox(str(tmp_path / "outbox.db"))
    with pytest.raises(sqlite3.ProgrammingError, match="not open"):
        box.enqueue(delivery(1), capacity=1)
