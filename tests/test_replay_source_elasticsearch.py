"""Export and replay read an Elasticsearch log (osmem-server, or TRACKALERT_TEST_ES_URL's
cluster) as they read an SQLite log: the same events in both backends give byte-identical
exports and replays; the index is only read, as of the start."""

from __future__ import annotations

import asyncio
import io
import json
import random
from pathlib import Path

import pytest

from elastic_server import elastic_base, elastic_url  # noqa: F401  (fixtures)
from test_eventlog_elasticsearch_parity import EVENTS, START, both, make_reports  # noqa: F401
from test_replay_engine import SEEING
from trackalert.cli import export_main, import_main
from trackalert.eventlog.elasticsearch import ElasticEventLog
from trackalert.eventlog.es_client import async_client, parse_elastic_url
from trackalert.eventlog import es_snapshot
from trackalert.eventlog.es_snapshot import ElasticSnapshot, SnapshotError
from trackalert.eventlog.history import HistoryError, export_events
from trackalert.eventlog.sqlite import SQLiteEventLog
from trackalert.replay.cli import main as replay_main
from trackalert.replay.source import SourceError, open_source
from trackalert.replay.summary import TIMING_FIELDS


@pytest.fixture
def logs(both: tuple[SQLiteEventLog, ElasticEventLog, list], elastic_url: str
         ) -> tuple[Path, str, ElasticEventLog]:
    """(SQLite log file, Elasticsearch log URL, the open Elasticsearch log) holding the same
    events (the parity test's history: the same batches at the same virtual times)."""
    sqlite_log, es_log, _ = both
    return Path(sqlite_log.path), elastic_url, es_log


def exported(location: str, **selection: object) -> str:
    out = io.StringIO()
    export_events(location, out, **selection)  # type: ignore[arg-type]
    return out.getvalue()


async def test_an_export_of_the_index_is_byte_identical_to_the_files(
        logs: tuple[Path, str, ElasticEventLog]) -> None:
    path, url, _ = logs
    whole = await asyncio.to_thread(exported, url)
    assert len(whole.splitlines()) == EVENTS
    assert whole == exported(str(path))
    lines = [json.loads(line) for line in whole.splitlines()]
    assert any(line["enrichment"]["country"] for line in lines), "enrichment is carried"
    middle = lines[EVENTS // 2]["received"]
    for selection in ({"from_": middle}, {"to": middle}, {"logins": ["user1@example.org", "jörg@example.org"]},
                      {"from_": START + 3600, "to": middle, "logins": ["user2@example.org"]}):
        part = await asyncio.to_thread(exported, url, **selection)
        assert part == exported(str(path), **selection), selection
        assert 0 < len(part.splitlines()) < EVENTS, selection


def replay(tmp_path: Path, log: str, name: str) -> tuple[int, bytes, dict]:
    conf = tmp_path / "seeing.conf"
    conf.write_text(SEEING, encoding="utf-8")
    out, summary = tmp_path / f"{name}.ndjson", tmp_path / f"{name}.summary.json"
    status = replay_main(["--config", str(conf), "--log", log, "--out", str(out),
                          "--summary-json", str(summary), "-q"])
    facts = json.loads(summary.read_text())
    for varying in TIMING_FIELDS:
        facts.pop(varying)
    return status, out.read_bytes(), facts


async def test_a_replay_of_the_index_gives_the_files_alerts_and_summary(
        tmp_path: Path, logs: tuple[Path, str, ElasticEventLog]) -> None:
    path, url, _ = logs
    status, alerts, summary = await asyncio.to_thread(replay, tmp_path, url, "es")
    assert status == 0
    assert (status, alerts, summary) == await asyncio.to_thread(replay, tmp_path, str(path), "sqlite")
    assert alerts.count(b"\n") > EVENTS, "every report and every background run alerted"


async def test_the_index_is_read_as_of_the_start_and_never_written(
        logs: tuple[Path, str, ElasticEventLog], monkeypatch: pytest.MonkeyPatch) -> None:
    _, url, es_log = logs
    monkeypatch.setattr(es_snapshot, "PAGE", 100)  # seven pages, appends between them
    client = async_client(parse_elastic_url(url))
    try:
        before = await client.search(index=es_log.state_index, size=100, sort=["_id"])
        source = await asyncio.to_thread(ElasticSnapshot, url)
        try:
            pages = source.events()
            first = await asyncio.to_thread(next, pages)
            for i in range(30):  # appended (and searchable) while the export reads
                await es_log.append(make_reports(random.Random(i), 1)[0])
            await client.indices.refresh(index=es_log.events_index)
            rest = await asyncio.to_thread(lambda: [e for page in pages for e in page])
        finally:
            await asyncio.to_thread(source.close)
        assert [e.seq for e in first + rest] == list(range(1, EVENTS + 1))
        after = await client.search(index=es_log.state_index, size=100, sort=["_id"])
        written = {h["_id"] for h in after["hits"]["hits"]} - {"seq", f"node:{es_log.node}"}
        assert written == {h["_id"] for h in before["hits"]["hits"]} - {"seq", f"node:{es_log.node}"}
    finally:
        await client.close()


async def test_a_missing_index_is_a_clear_error(elastic_url: str) -> None:
    with pytest.raises(SnapshotError, match="no event log there"):
        await asyncio.to_thread(ElasticSnapshot, elastic_url)
    with pytest.raises(SourceError, match="no event log there"):
        await asyncio.to_thread(open_source, elastic_url)
    with pytest.raises(HistoryError, match="no event log there"):
        await asyncio.to_thread(exported, elastic_url)


async def test_trackalert_export_takes_the_url_and_import_refuses_it(
        tmp_path: Path, logs: tuple[Path, str, ElasticEventLog]) -> None:
    path, url, _ = logs
    out = tmp_path / "es.ndjson"
    status = await asyncio.to_thread(export_main, ["--log", url, "--out", str(out), "--login",
                                                   "user3@example.org"])
    assert status == 0
    assert out.read_text(encoding="utf-8") == exported(str(path), logins=["user3@example.org"])
    assert out.stat().st_size > 0
    assert await asyncio.to_thread(import_main, ["--log", url, str(out)]) != 0
