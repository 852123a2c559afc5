"""GeoIP2 databases from Lua (reference §4.6), against MaxMind's own test databases.

The expected values come from the JSON sources published with the databases
(tests/data/geoip/*.json), so a wrong path in our mapping cannot agree with itself.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import pytest

from trackalert.geoip import GeoIPRegistry
from trackalert.lua.host import Host
from trackalert.lua.state import LuaState, StateKind

DATA = Path(__file__).parent / "data" / "geoip"
CITY = DATA / "GeoIP2-City-Test.mmdb"
COUNTRY = DATA / "GeoIP2-Country-Test.mmdb"
ISP = DATA / "GeoIP2-ISP-Test.mmdb"
ASN = DATA / "GeoLite2-ASN-Test.mmdb"
ANON = DATA / "GeoIP2-Anonymous-IP-Test.mmdb"


@pytest.fixture
def states() -> tuple[Host, LuaState, LuaState]:
    host = Host()
    config = LuaState(StateKind.CONFIG, host)
    config.execute(
        f'newGeoIP2DB("City", "{CITY}")\nnewGeoIP2DB("Country", "{COUNTRY}")\n'
        f'newGeoIP2DB("ISP", "{ISP}")\nnewGeoIP2DB("ASN", "{ASN}")\nnewGeoIP2DB("Anon", "{ANON}")'
    )
    worker = LuaState(StateKind.WORKER, host)
    return host, config, worker


def run(state: LuaState, code: str) -> tuple:
    return state.execute(code)


def test_country_and_city_of_known_addresses(states) -> None:
    _, _, worker = states
    assert run(worker, 'return getGeoIP2DB("City"):lookupCountry(newCA("81.2.69.142"))') == ("GB",)
    assert run(worker, 'return getGeoIP2DB("Country"):lookupCountry(newCA("89.160.20.112"))') == ("SE",)
    record = run(worker, """
        local r = getGeoIP2DB("City"):lookupCity(newCA("2.125.160.216"))
        return r.country_code, r.country_name, r.region, r.city, r.postal_code, r.continent_code,
               r.latitude, r.longitude""")
    assert record[:6] == ("GB", "United Kingdom", "ENG", "Boxford", "OX1", "EU")
    assert record[6] == pytest.approx(51.75) and record[7] == pytest.approx(-1.25)
    # an IPv6 address of the test data (2001:218::/32 is Japan)
    assert run(worker, 'return getGeoIP2DB("City"):lookupCountry(newCA("2001:218::1"))') == ("JP",)


def test_latitude_is_a_32_bit_float_like_the_original(states) -> None:
    _, _, worker = states
    (lat,) = run(worker, 'return getGeoIP2DB("City"):lookupCity(newCA("81.2.69.142")).latitude')
    assert lat != 51.5142 and lat == pytest.approx(51.5142, abs=1e-5)


def test_isp_asn_and_anonymous_ip(states) -> None:
    _, _, worker = states
    assert run(worker, 'return getGeoIP2DB("ISP"):lookupISP(newCA("1.128.0.1"))') == ("Telstra Internet",)
    assert run(worker, """
        return getGeoIP2DB("ASN"):lookupUIntValue(newCA("1.128.0.1"), {"autonomous_system_number"}),
               getGeoIP2DB("ASN"):lookupStringValue(newCA("1.128.0.1"), {"autonomous_system_organization"})
    """) == (1221, "Telstra Pty Ltd")
    assert run(worker, """
        local db = getGeoIP2DB("Anon")
        return db:lookupBoolValue(newCA("1.2.0.1"), {"is_anonymous_vpn"}),
               db:lookupBoolValue(newCA("1.2.0.1"), {"is_tor_exit_node"}),
               db:lookupBoolValue(newCA("192.0.2.1"), {"is_anonymous"})
    """) == (True, False, False)


def test_paths_with_array_indices_and_doubles(states) -> None:
    _, _, worker = states
    assert run(worker, """
        local db = getGeoIP2DB("City")
        local ca = newCA("2.125.160.216")
        return db:lookupStringValue(ca, {"subdivisions", "1", "iso_code"}),
               db:lookupStringValue(ca, {"city", "names", "en"}),
               db:lookupDoubleValue(ca, {"location", "latitude"}),
               db:lookupUIntValue(ca, {"location", "accuracy_radius"}),
               db:lookupUIntValue(ca, {"location", "latitude"}),
               db:lookupDoubleValue(ca, {"location", "accuracy_radius"}),
               db:lookupStringValue(ca, {"location", "latitude"})
    """) == ("WBK", "Boxford", 51.75, 100, 0, 0.0, "")


def test_missing_data_gives_empty_values(states) -> None:
    _, _, worker = states
    # 192.0.2.1 is in no test database; 67.43.156.1 has a country but no city
    assert run(worker, """
        local db = getGeoIP2DB("City")
        local r = db:lookupCity(newCA("192.0.2.1"))
        local b = db:lookupCity(newCA("67.43.156.1"))
        return db:lookupCountry(newCA("192.0.2.1")), r.city, r.latitude, b.country_code, b.city,
               db:lookupISP(newCA("81.2.69.142")), db:lookupStringValue(newCA("81.2.69.142"), {"no", "such"})
    """) == ("", "", 0.0, "BT", "", "", "")


def test_unknown_name_logs_and_gives_an_empty_database(states, caplog) -> None:
    _, _, worker = states
    with caplog.at_level(logging.ERROR, logger="trackalert"):
        result = run(worker, """
            local db = getGeoIP2DB("Nope")
            local r = db:lookupCity(newCA("81.2.69.142"))
            return db:lookupCountry(newCA("81.2.69.142")), r.country_code,
                   db:lookupUIntValue(newCA("81.2.69.142"), {"x"}), db:lookupBoolValue(newCA("1.2.3.4"), {"x"})
        """)
    assert result == ("", "", 0, False)
    assert "getGeoIP2DB(): Could not find database named Nope" in caplog.text


def test_bad_address_logs_a_warning_and_gives_empty(states, caplog) -> None:
    _, _, worker = states
    with caplog.at_level(logging.WARNING, logger="trackalert"):
        assert run(worker, 'return getGeoIP2DB("City"):lookupCountry("not-an-address")') == ("",)
    assert "MMDB_lookup_string(not-an-address) failed" in caplog.text


def test_opening_a_bad_file_is_logged_and_not_fatal(tmp_path, caplog) -> None:
    host = Host()
    config = LuaState(StateKind.CONFIG, host)
    broken = tmp_path / "broken.mmdb"
    broken.write_bytes(b"this is not a MaxMind database")
    with caplog.at_level(logging.ERROR, logger="trackalert"):
        config.execute(f'newGeoIP2DB("B", "{broken}")\nnewGeoIP2DB("M", "{tmp_path}/missing.mmdb")')
    assert "newGeoIPDB(): Error initialising GeoIP2DB (Cannot open" in caplog.text
    output = host.take_console_output()
    assert output.count("newGeoIP2DB(): Error loading GeoIP2 DB (") == 2
    assert host.geoip.names() == []


def test_an_existing_name_is_not_replaced(tmp_path) -> None:
    host = Host()
    config = LuaState(StateKind.CONFIG, host)
    config.execute(f'newGeoIP2DB("X", "{CITY}")\nnewGeoIP2DB("X", "{ASN}")')
    assert config.execute('return getGeoIP2DB("X"):lookupCountry(newCA("81.2.69.142"))') == ("GB",)


def test_new_db_is_a_no_op_in_worker_states() -> None:
    host = Host()
    LuaState(StateKind.WORKER, host).execute(f'newGeoIP2DB("City", "{CITY}")')
    assert host.geoip.names() == []


def test_reload_reopens_files_without_disturbing_lookups(tmp_path) -> None:
    path = tmp_path / "geo.mmdb"
    shutil.copyfile(CITY, path)
    host = Host()
    config = LuaState(StateKind.CONFIG, host)
    config.execute(f'newGeoIP2DB("Geo", "{path}")')
    worker = LuaState(StateKind.WORKER, host)
    worker.execute('db = getGeoIP2DB("Geo")')  # held across the reload, as a policy would
    assert worker.execute('return db:lookupCity(newCA("81.2.69.142")).city') == ("London",)

    shutil.copyfile(COUNTRY, path.with_suffix(".new"))
    path.with_suffix(".new").replace(path)  # as a MaxMind updater does: atomic rename
    config.execute("reloadGeoIPDBs()")
    assert "reloadGeoIPDBs() successful" in host.take_console_output()
    # the Country DB has no cities: the same db object now answers from the new file
    assert worker.execute('return db:lookupCity(newCA("81.2.69.142")).city, '
                          'db:lookupCountry(newCA("81.2.69.142"))') == ("", "GB")

    path.with_suffix(".new").write_bytes(b"garbage")
    path.with_suffix(".new").replace(path)
    config.execute("reloadGeoIPDBs()")
    assert "Error reloading GeoIP" in host.take_console_output()
    assert worker.execute('return db:lookupCountry(newCA("81.2.69.142"))') == ("GB",)


def test_lookups_during_reloads_always_answer(tmp_path) -> None:
    registry = GeoIPRegistry()
    registry.open("City", str(CITY))
    db = registry.get("City")
    assert db is not None
    answers: list[str] = []
    stop = threading.Event()

    def lookups() -> None:
        for _ in range(20000):
            if stop.is_set():
                break
            answers.append(db.lookupCountry("81.2.69.142"))

    thread = threading.Thread(target=lookups)
    thread.start()
    for _ in range(50):
        registry.reload()
    stop.set()
    thread.join(30)
    assert answers and set(answers) == {"GB"}
    assert registry.generation >= 51
