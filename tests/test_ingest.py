"""Reports entering the log over real HTTP, under load, with and without web worker processes:
what was acknowledged is stored exactly once and counted once, bad input is a JSON 400 that
stores nothing and fails nothing else."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from test_report import BAD_BODIES
from trackalert import fuzz
from trackalert.testing import DaemonProcess, basic_auth, listener_config

AUTH = basic_auth()
CONFIG = listener_config() + "setNumLuaStates(1)\n"


@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "web-processes"])
def daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    config = CONFIG + f"setNumWebProcesses({request.param})\n"
    with DaemonProcess(tmp_path_factory.mktemp("ingest"), config) as process:
        yield process


def stored_logins(daemon: DaemonProcess, prefix: str) -> list[str]:
    with sqlite3.connect(daemon.directory / "trackalert-events.db") as db:
        rows = db.execute("SELECT login FROM events WHERE login LIKE ?", (prefix + "%",))
        return [row[0] for row in rows]


async def post(session: aiohttp.ClientSession, daemon: DaemonProcess, body: bytes,
               delivery: str | None = None) -> tuple[int, dict]:
    headers = dict(AUTH)
    if delivery is not None:
        headers["X-Wforce-Delivery"] = delivery
    async with session.post(daemon.url("/command/report"), data=body, headers=headers) as resp:
        return resp.status, json.loads(await resp.read() or b"{}")


async def raw_post(daemon: DaemonProcess, body: bytes, extra_headers: bytes = b"") -> tuple[int, bytes]:
    """A request written byte by byte: aiohttp's client cannot send a header that is not UTF-8."""
    status, _, payload = await fuzz.send("127.0.0.1", daemon.port, (
        b"POST /command/report HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Authorization: {AUTH['Authorization']}\r\n".encode()
        + extra_headers
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    ))
    return status, payload


async def stats_reports(session: aiohttp.ClientSession, daemon: DaemonProcess) -> int:
    async with session.get(daemon.url("/command/stats"), headers=AUTH) as resp:
        return (await resp.json())["reports"]


async def metric(session: aiohttp.ClientSession, daemon: DaemonProcess, name: str) -> float:
    """A sample of /metrics; 0 when the family is missing (the final comparison then fails)."""
    async with session.get(daemon.url("/metrics"), headers=AUTH) as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def body_of(login: str) -> bytes:
    return json.dumps({"login": login, "remote": "192.0.2.7", "success": True,
                       "t": 1_700_000_000.25, "type": "wforce_report"}, sort_keys=True).encode()


async def run_concurrently(jobs: list, concurrency: int) -> list:
    """Run the coroutine factories over `concurrency` workers; results in job order."""
    results: list = [None] * len(jobs)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(jobs)):
        queue.put_nowait(index)

    async def worker() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            results[index] = await jobs[index]()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def test_one_delivery_id_for_many_reports_and_genuine_retries(daemon: DaemonProcess) -> None:
    """What a real wforce does at 32 concurrent logins: many reports stamped in the same
    microsecond share an id, while a retried delivery repeats its id and its body."""
    rng = random.Random(8)
    shared = [f"shared{i}" for i in range(600)]
    retried = [f"retried{i}" for i in range(100)]
    sends = [(login, "2026-12-01 19:00:00.000001-report") for login in shared]
    sends += [(login, f"id-{login}") for login in retried for _ in range(3)]
    sends += [(f"blank{i}", "") for i in range(50)]  # an empty header is no id at all
    rng.shuffle(sends)
    async with aiohttp.ClientSession() as session:
        before = await stats_reports(session, daemon)
        collisions = await metric(session, daemon, "trackalert_eventlog_delivery_id_collisions_total")
        jobs = [lambda login=login, delivery=delivery: post(session, daemon, body_of(login), delivery)
                for login, delivery in sends]
        results = await run_concurrently(jobs, concurrency=32)
        assert [status for status, _ in results] == [200] * len(sends)
        acknowledged = await stats_reports(session, daemon) - before
        new_collisions = await metric(
            session, daemon, "trackalert_eventlog_delivery_id_collisions_total") - collisions
    assert sorted(stored_logins(daemon, "shared")) == sorted(shared)
    assert sorted(stored_logins(daemon, "retried")) == sorted(retried)
    assert len(stored_logins(daemon, "blank")) == 50
    assert acknowledged == len(sends), "stats counts every 200, retries included"
    assert new_collisions == len(shared) - 1


async def test_stats_counts_exactly_the_acknowledged_reports(daemon: DaemonProcess) -> None:
    """`reports` in stats (and trackalert_reports_total) is the number of 200s: retries get
    their 200 too and are counted, refused bodies are not; read right after the last answer."""
    sends: list[tuple[bytes, str | None]] = [(body_of(f"count{i}"), None) for i in range(400)]
    sends += [(body_of(f"again{i}"), f"again-{i}") for i in range(100) for _ in range(3)]
    sends += [(b'{"login": 5}', None)] * 50
    random.Random(6).shuffle(sends)
    async with aiohttp.ClientSession() as session:
        before = await stats_reports(session, daemon)
        total_before = await metric(session, daemon, "trackalert_reports_total")
        jobs = [lambda body=body, delivery=delivery: post(session, daemon, body, delivery)
                for body, delivery in sends]
        results = await run_concurrently(jobs, concurrency=32)
        counted = await stats_reports(session, daemon) - before
        total = await metric(session, daemon, "trackalert_reports_total") - total_before
    oks = sum(1 for status, _ in results if status == 200)
    assert oks == 700
    assert counted == oks
    assert total == oks


async def test_poisoned_reports_fail_alone(daemon: DaemonProcess) -> None:
    """A lone surrogate in a body, or a delivery header that is not UTF-8, among 1,000 valid
    reports sent at once: each bad one gets its own JSON 400, every valid one is stored."""
    valid = [f"valid{i}" for i in range(1000)]

    async def bad_body() -> tuple[int, bytes]:
        return await raw_post(daemon, b'{"login": "poison\\ud800"}')

    async def bad_header() -> tuple[int, bytes]:
        return await raw_post(daemon, body_of("poison-header"), b"X-Wforce-Delivery: \xff\xfe\r\n")

    async with aiohttp.ClientSession() as session:
        jobs: list = [lambda login=login: post(session, daemon, body_of(login), f"d-{login}")
                      for login in valid]
        poison = [bad_body if i % 2 else bad_header for i in range(20)]
        for i, job in enumerate(poison):
            jobs.insert(i * 50, job)
        results = await run_concurrently(jobs, concurrency=32)
    refused = [r for r in results if r[0] != 200]
    assert len(refused) == len(poison)
    for status, payload in refused:
        assert status == 400
        answer = json.loads(payload.decode("utf-8"))
        assert answer["status"] == "failure"
        assert "UTF-8" in answer["reason"] or "surrogate" in answer["reason"]
    assert sorted(stored_logins(daemon, "valid")) == sorted(valid)
    assert stored_logins(daemon, "poison") == []


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_bad_bodies_get_a_json_400_and_store_nothing(daemon: DaemonProcess, body: bytes) -> None:
    with sqlite3.connect(daemon.directory / "trackalert-events.db") as db:
        before = db.execute("SELECT count(*) FROM events").fetchone()[0]
    output_before = len(daemon.output())
    status, payload = await raw_post(daemon, body)
    assert status == 400
    answer = json.loads(payload.decode("utf-8"))  # strict UTF-8: no raw surrogate in it
    assert answer["status"] == "failure" and answer["reason"]
    with sqlite3.connect(daemon.directory / "trackalert-events.db") as db:
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == before
    logged = daemon.output()[output_before:]
    assert "Traceback" not in logged
    assert logged.count("Refused a report") == 1


# --------------------------------------------------------------------------- the worker's half


GEOIP = Path(__file__).parent / "data" / "geoip"


def test_handover_follows_the_enrichment_settings(tmp_path: Path) -> None:
    """A worker's Handover builds its enricher from the pushed snapshot, rebuilds it when the
    core reloads the databases (a new generation: new answers), and hands plain fields over
    while it has no usable enricher."""
    from trackalert.devices import DeviceParser
    from trackalert.enrich import Enricher
    from trackalert.geoip import GeoIPRegistry
    from trackalert.ingest import Handover, prepare
    from trackalert.report import Report

    path = tmp_path / "geo.mmdb"
    shutil.copyfile(GEOIP / "GeoIP2-City-Test.mmdb", path)
    geoip = GeoIPRegistry()
    geoip.open("City", str(path))
    core = Enricher(geoip, {"city": "City"}, DeviceParser())
    handover = Handover()
    london = Report(login="a", remote="81.2.69.142", protocol="http", device_id="curl/8.0")

    assert handover(london, None, None, {})[0] == (None, london.fields())  # no settings yet
    settings = {"enrichment": core.snapshot()}
    payload, _, _ = handover(london, "d-1", b"f" * 16, settings)
    assert payload == prepare(core, london, "d-1")
    assert payload[0][16:18] == ("GB", "London")

    shutil.copyfile(GEOIP / "GeoIP2-Country-Test.mmdb", tmp_path / "new.mmdb")
    (tmp_path / "new.mmdb").replace(path)
    geoip.reload()
    payload, _, _ = handover(london, None, None, {"enrichment": core.snapshot(), "acl": []})
    assert payload == prepare(core, london, None)
    assert payload[0][16:18] == ("GB", None)  # the country database has no city

    path.unlink()  # gone before the next reload reaches the worker
    broken = {"enrichment": {**core.snapshot(), "generation": core.snapshot()["generation"] + 1}}
    assert handover(london, None, None, broken)[0] == (None, london.fields())
