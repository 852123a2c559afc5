"""Enrichment at ingest: GeoIP and device attributes are frozen into the stored event."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from trackalert import migrations
from trackalert.clock import VirtualClock
from trackalert.devices import DeviceParser
from trackalert.enrich import Enricher
from trackalert.eventlog.ipkey import ip_key
from trackalert.eventlog.sqlite import SQLiteEventLog, encode_row
from trackalert.eventlog.rows import report_from_row
from trackalert.geoip import GeoIPRegistry
from trackalert.ingest import prepare
from trackalert.report import Enrichment, Report, parse_report
from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for, web_worker_pids

DATA = Path(__file__).parent / "data" / "geoip"
CITY = DATA / "GeoIP2-City-Test.mmdb"
COUNTRY = DATA / "GeoIP2-Country-Test.mmdb"
ISP = DATA / "GeoIP2-ISP-Test.mmdb"
ASN = DATA / "GeoLite2-ASN-Test.mmdb"
CHROME = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")
AUTH = basic_auth()


def registry(city: Path = CITY) -> GeoIPRegistry:
    geoip = GeoIPRegistry()
    geoip.open("City", str(city))
    geoip.open("Country", str(COUNTRY))
    geoip.open("ASN", str(ASN))
    geoip.open("ISP", str(ISP))
    return geoip


def test_known_addresses_get_country_city_location_asn_and_isp() -> None:
    enricher = Enricher(registry(), {"city": "City", "asn": "ASN", "isp": "ISP"})
    london = enricher.enrich(Report(remote="81.2.69.142")).geo
    assert london is not None
    assert (london.country, london.city) == ("GB", "London")
    assert london.latitude == pytest.approx(51.5142) and london.longitude == pytest.approx(-0.0931)
    telstra = enricher.enrich(Report(remote="1.128.0.1")).geo
    assert telstra == Enrichment(asn=1221, isp="Telstra Internet")
    assert enricher.enrich(Report(remote="192.0.2.1")).geo is None


def test_isp_database_supplies_the_asn_when_there_is_no_asn_database() -> None:
    enricher = Enricher(registry(), {"country": "Country", "isp": "ISP"})
    geo = enricher.enrich(Report(remote="1.128.0.1")).geo
    assert geo == Enrichment(asn=1221, isp="Telstra Internet")
    geo = enricher.enrich(Report(remote="89.160.20.112")).geo
    assert geo is not None and (geo.country, geo.city, geo.latitude) == ("SE", "", None)


def test_unknown_database_name_is_logged_and_skipped(caplog) -> None:
    enricher = Enricher(registry(), {"city": "Nope"})
    assert not enricher.geo_enabled
    assert "no GeoIP database named Nope" in caplog.text
    report = Report(remote="81.2.69.142")
    assert enricher.enrich(report) is report


def test_device_attributes_are_derived_only_when_missing() -> None:
    enricher = Enricher(GeoIPRegistry(), {}, DeviceParser())
    derived = enricher.enrich(Report(protocol="https", device_id=CHROME))
    assert derived.device_attrs["browser.family"] == "Chrome"
    given = Report(protocol="https", device_id=CHROME, device_attrs={"os.family": "Mine"})
    assert enricher.enrich(given) is given
    plain = Report(protocol="pop3", device_id=CHROME)
    assert enricher.enrich(plain) is plain


def test_reload_drops_cached_answers(tmp_path: Path) -> None:
    path = tmp_path / "geo.mmdb"
    shutil.copyfile(CITY, path)
    geoip = GeoIPRegistry()
    geoip.open("City", str(path))
    enricher = Enricher(geoip, {"city": "City"})
    assert enricher.enrich(Report(remote="81.2.69.142")).geo.city == "London"
    shutil.copyfile(COUNTRY, tmp_path / "new.mmdb")
    (tmp_path / "new.mmdb").replace(path)
    assert enricher.enrich(Report(remote="81.2.69.142")).geo.city == "London"  # cached
    geoip.reload()
    geo = enricher.enrich(Report(remote="81.2.69.142")).geo
    assert (geo.country, geo.city) == ("GB", "")


#: Addresses the test databases know in various ways, and some they do not.
REMOTES = ("81.2.69.142", "2.125.160.216", "89.160.20.112", "216.160.83.56", "175.16.199.5",
           "67.43.156.1", "1.128.0.1", "2001:218::1", "2a02:d180::1", "192.0.2.7", "2001:db8::7")
DEVICES = (("http", CHROME), ("https", "Mozilla/5.0 (Windows NT 10.0; rv:121.0) Firefox/121.0"),
           ("imap", '"name" "Thunderbird" "version" "115.5.0" "os" "Linux" "os-version" "6.1"'),
           ("mobileapi", "acme.ios.mail/4.2 OS: 17.1 device: iPhone 15"), ("pop3", "anything"),
           ("http", ""))


def varied_bodies(count: int) -> list[bytes]:
    """Report bodies over every address and device kind, some with their own device_attrs."""
    bodies = []
    for i in range(count):
        protocol, device_id = DEVICES[i % len(DEVICES)]
        doc = {"login": f"u{i % 7}", "remote": REMOTES[i % len(REMOTES)], "success": i % 3 > 0,
               "protocol": protocol, "device_id": device_id, "t": 1_700_000_000.5 + i,
               "attrs": {"cos": "basic", "groups": ["a", "b"]} if i % 2 else {},
               "type": "wforce_report"}
        if i % 5 == 0:
            doc["device_attrs"] = {"os.family": "Given"}
        bodies.append(json.dumps(doc).encode())
    return bodies


def test_a_worker_enricher_from_the_snapshot_stores_what_the_core_would() -> None:
    """`prepare` on an enricher rebuilt from `snapshot()` (as a web worker builds it) gives the
    row and the report of the old core path: enrich, then encode."""
    core = Enricher(registry(), {"city": "City", "asn": "ASN", "isp": "ISP"}, DeviceParser())
    worker = Enricher.from_snapshot(core.snapshot())
    assert worker.snapshot()["databases"] == core.snapshot()["databases"]
    for number, body in enumerate(varied_bodies(60)):
        report = parse_report(body, 0.0)
        delivery = f"d-{number}" if number % 2 else None
        expected = core.enrich(report)
        row, maps = prepare(worker, report, delivery)
        assert (row, maps) == prepare(core, report, delivery)
        assert row == encode_row(expected, delivery)
        assert report_from_row(row, *maps) == expected


async def test_enrichment_is_stored_and_read_back(tmp_path: Path) -> None:
    enricher = Enricher(registry(), {"city": "City", "asn": "ASN", "isp": "ISP"}, DeviceParser())
    log = SQLiteEventLog(tmp_path / "events.db", VirtualClock(start=1_700_000_000.0))
    await log.open()
    try:
        reports = [enricher.enrich(Report(remote=r, login="a", protocol="https", device_id=CHROME))
                   for r in ("81.2.69.142", "1.128.0.1", "192.0.2.1")]
        for report in reports:
            await log.append(report)
        stored = [e.report for e in await log.read(0, 10)]
        assert stored == reports
        assert stored[0].geo.city == "London" and stored[2].geo is None
    finally:
        await log.close()
    with sqlite3.connect(tmp_path / "events.db") as db:
        rows = db.execute("SELECT country, city, asn, isp, ip FROM events ORDER BY seq").fetchall()
    assert rows[0][:2] == ("GB", "London") and rows[0][4] == ip_key("81.2.69.142")
    assert rows[1][2:4] == (1221, "Telstra Internet")
    assert rows[2][:4] == (None, None, None, None)


async def test_upgrade_from_0002_keeps_events_and_fills_the_address_key(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
    with engine.begin() as connection:
        migrations.upgrade(connection, "0002")
    engine.dispose()
    old = [Report(t=1.0 + i, login=f"u{i}", remote=r)
           for i, r in enumerate(("192.0.2.1", "2001:db8::7", "198.51.100.9"))]
    with sqlite3.connect(path) as db:
        db.executemany(f"INSERT INTO events VALUES ({','.join('?' * 18)})",
                       [(i + 1, 100.0 + i) + encode_row(r, None)[:16] for i, r in enumerate(old)])
    log = SQLiteEventLog(path, VirtualClock(start=200.0))
    await log.open()
    try:
        assert [e.report for e in await log.read(0, 10)] == old  # geo None: stored before
        await log.append(Report(login="new", remote="81.2.69.142",
                                geo=Enrichment(country="GB", city="London")))
        [new] = await log.read(3, 10)
        assert new.report.geo == Enrichment(country="GB", city="London")
    finally:
        await log.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone() == (migrations.head_revision(),)
        keys = [row[0] for row in db.execute("SELECT ip FROM events ORDER BY seq")]
    assert keys == [ip_key("192.0.2.1"), ip_key("2001:db8::7"), ip_key("198.51.100.9"),
                    ip_key("81.2.69.142")]


ENRICHING_CONFIG = listener_config() + f"""
newGeoIP2DB("City", "{CITY}")
newGeoIP2DB("ASN", "{ASN}")
newGeoIP2DB("ISP", "{ISP}")
setEnrichment({{city="City", asn="ASN", isp="ISP"}})
setNumLuaStates(2)
function report(lt)
  local f = io.open("seen.txt", "a")
  f:write(table.concat({{lt.login, lt.country, lt.city, tostring(lt.latitude), tostring(lt.asn),
                        lt.isp, lt.device_attrs["browser.family"] or ""}}, "|") .. "\\n")
  f:close()
end
setReport(report)
"""


def stored_rows(directory: Path) -> list[tuple]:
    """Every stored column but seq and received, in log order."""
    with sqlite3.connect(directory / "trackalert-events.db") as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(events)")][2:]
        return db.execute(f"SELECT {', '.join(columns)} FROM events ORDER BY seq").fetchall()


def mapped_files(pid: int) -> set[str]:
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if line.count(" ") >= 5}


async def post_all(daemon: DaemonProcess, bodies: list[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for number, body in enumerate(bodies):
            headers = {**AUTH, "X-Wforce-Delivery": f"d-{number}"} if number % 2 else AUTH
            async with session.post(daemon.url("/command/report"), data=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()


async def test_web_workers_enrich_and_store_exactly_the_rows_of_one_process(tmp_path: Path) -> None:
    """The same reports through a one-process daemon and through two web workers (which enrich
    and encode them with the databases the config opened) are stored as identical rows."""
    bodies = varied_bodies(48)
    rows = {}
    for workers in (0, 2):
        directory = tmp_path / f"workers-{workers}"
        directory.mkdir()
        config = ENRICHING_CONFIG + f"setNumWebProcesses({workers})\n"
        with DaemonProcess(directory, config) as daemon:
            await post_all(daemon, bodies)
            if workers:
                pids = web_worker_pids(daemon.process.pid)
                assert len(pids) == 2
                # the worker that served them read the databases itself
                assert any({str(CITY), str(ASN), str(ISP)} <= mapped_files(pid) for pid in pids)
        rows[workers] = stored_rows(directory)
    assert len(rows[0]) == len(bodies)
    assert rows[2] == rows[0]


async def test_a_worker_that_cannot_open_a_database_leaves_enrichment_to_the_core(
    tmp_path: Path,
) -> None:
    """The database file is gone by the time the workers start (the config removed it after
    opening it): the workers say so and hand plain reports over; the core enriches them."""
    copy = tmp_path / "city-copy.mmdb"
    shutil.copyfile(CITY, copy)
    config = ENRICHING_CONFIG.replace(str(CITY), str(copy)) + f"""
os.remove("{copy}")
setNumWebProcesses(1)
"""
    bodies = varied_bodies(12)
    with DaemonProcess(tmp_path, config) as daemon:
        await post_all(daemon, bodies)
        output = daemon.output()
    assert "cannot open the enrichment databases" in output
    rows = stored_rows(tmp_path)
    expected = Enricher(registry(), {"city": "City", "asn": "ASN", "isp": "ISP"}, DeviceParser())
    assert rows == [
        encode_row(expected.enrich(parse_report(body, 0.0)), f"d-{n}" if n % 2 else None)
        for n, body in enumerate(bodies)
    ]


@pytest.mark.parametrize("web_processes", [0, 1])
async def test_daemon_enriches_at_ingest_and_lt_exposes_it(tmp_path: Path, web_processes: int) -> None:
    config = ENRICHING_CONFIG + (f"setNumWebProcesses({web_processes})\n" if web_processes else "")
    with DaemonProcess(tmp_path, config) as daemon:
        async with aiohttp.ClientSession() as session:
            for login, remote in (("alice", "81.2.69.142"), ("bob", "1.128.0.1"), ("carol", "192.0.2.1")):
                body = json.dumps({"login": login, "remote": remote, "success": True,
                                   "protocol": "https", "device_id": CHROME})
                async with session.post(daemon.url("/command/report"), data=body, headers=AUTH) as resp:
                    assert resp.status == 200, await resp.text()
        seen = tmp_path / "seen.txt"
        assert await wait_for(lambda: seen.exists() and len(seen.read_text().splitlines()) == 3)
    lines = sorted(seen.read_text().splitlines())
    assert lines[0].split("|")[:3] == ["alice", "GB", "London"]
    assert lines[0].split("|")[3].startswith("51.51")
    assert lines[0].split("|")[6] == "Chrome"
    assert lines[1] == "bob|||nil|1221|Telstra Internet|Chrome"
    assert lines[2] == "carol|||nil|nil||Chrome"
    with sqlite3.connect(tmp_path / "trackalert-events.db") as db:
        rows = db.execute("SELECT login, country, city, asn, isp, device_attrs FROM events "
                          "ORDER BY login").fetchall()
    assert rows[0][:3] == ("alice", "GB", "London")
    assert rows[1][3:5] == (1221, "Telstra Internet")
    assert json.loads(rows[2][5])["os.family"] == "Mac OS X"


def test_set_enrichment_records_the_databases_and_refuses_unknown_roles() -> None:
    from trackalert.lua.host import Host
    from trackalert.lua.state import LuaError, LuaState, StateKind

    host = Host()
    state = LuaState(StateKind.CONFIG, host)
    state.execute('setEnrichment({city="City", asn="ASN"})')
    assert host.settings.enrichment == {"city": "City", "asn": "ASN"}
    with pytest.raises(LuaError, match="unknown enrichment key 'town'"):
        state.execute('setEnrichment({town="City"})')


REGEXES = Path(__file__).parent / "data" / "acme-regexes.yaml"


@pytest.mark.parametrize("web_processes", [0, 2])
async def test_daemon_uses_the_regexes_file_given_with_dash_r(tmp_path: Path, web_processes: int) -> None:
    regexes = REGEXES
    config = listener_config() + f"setReport(function(lt) end)\nsetNumWebProcesses({web_processes})\n"
    with DaemonProcess(tmp_path, config, args=("-D", "-R", str(regexes))) as daemon:
        body = json.dumps({"login": "x", "remote": "192.0.2.1", "protocol": "http",
                           "device_id": "AcmeBrowser/3.4 (AcmeOS 2.1; AcmePhone)"})
        async with aiohttp.ClientSession() as session:
            async with session.post(daemon.url("/command/report"), data=body, headers=AUTH) as resp:
                assert resp.status == 200
    with sqlite3.connect(tmp_path / "trackalert-events.db") as db:
        (attrs,) = db.execute("SELECT device_attrs FROM events").fetchone()
    parsed = json.loads(attrs)
    assert (parsed["browser.family"], parsed["os.family"], parsed["device.family"]) == (
        "AcmeBrowser", "AcmeOS", "AcmePhone")


def test_daemon_refuses_a_broken_regexes_file(tmp_path: Path) -> None:
    regexes = tmp_path / "regexes.yaml"
    regexes.write_text("user_agent_parsers: [unclosed\n")
    daemon = DaemonProcess(tmp_path, listener_config(), args=("-D", "-R", str(regexes)))
    with pytest.raises(RuntimeError, match="Cannot load the ua-parser regexes"):
        daemon.start()
    daemon.kill()
