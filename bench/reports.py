"""The wforce-shaped reports the benchmarks send, and a log prefilled with the same kind of history.

Both the wrk script (what arrives over HTTP) and the prefill (what is already in the log) draw
from one vocabulary, so that the long-term helpers meet the same logins, addresses and devices in
the prefilled history as in the live load: a policy on a prefilled log then does the work it would
do in production, instead of scanning rows no filter ever matches.

The prefill writes rows directly (no HTTP, no Lua): each distinct report shape is parsed, enriched
and encoded once by the checkout's own code (`parse_report`, `Enricher`, `encode_row`), so the row
is byte for byte what that daemon would store; only time, login and delivery id vary per row.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

import trackalert

#: The checkout whose `trackalert` this process imported: its GeoIP test data and policies.
CODE_ROOT = Path(trackalert.__file__).resolve().parent.parent
GEOIP = CODE_ROOT / "tests" / "data" / "geoip"
CITY_DB = GEOIP / "GeoIP2-City-Test.mmdb"
ASN_DB = GEOIP / "GeoLite2-ASN-Test.mmdb"
POLICIES = CODE_ROOT / "conf" / "policies"

LOGINS = 20_000
#: A handful of addresses: most are in the GeoIP test databases (country, city, ASN), two are not.
ADDRESSES = (
    "81.2.69.142",     # GB, London
    "2.125.160.216",   # GB, Boxford
    "89.160.20.112",   # SE, Linköping, AS29518
    "216.160.83.56",   # US, Milton, AS209
    "175.16.199.5",    # CN, Changchun
    "67.43.156.1",     # BT, AS35908
    "1.128.0.1",       # AS1221 only
    "2001:218::1",     # JP (IPv6)
    "2a02:d180::1",    # DE (IPv6)
    "192.0.2.7",       # unknown to GeoIP
    "2001:db8::7",     # unknown to GeoIP (IPv6)
)
#: (protocol, device_id): three browsers over http (ua-parser derives device_attrs) and an IMAP ID.
DEVICES = (
    ("http", "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
             "Chrome/120.0.0.0 Safari/537.36"),
    ("http", "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0"),
    ("http", "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
             "like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"),
    ("imap", '"name" "Thunderbird" "version" "115.5.0" "os" "Linux" "os-version" "6.1"'),
)
GOOD_PWHASH = "5f4dcc"
#: A few wrong password hashes shared by many logins (what pwhash_spray looks for).
BAD_PWHASHES = ("0a1b2c", "d4e5f6", "778899")
SUCCESS_RATE = 0.7
#: How often a login reports from somewhere other than its home address / device.
ROAMING = 0.1


def login_name(number: int) -> str:
    return f"user{number}@example.com"


def home(login: int) -> tuple[int, int]:
    """The (address, device) index a login usually reports from: stable, so that new-country
    and new-device alerts are the exception, as in production."""
    return login % len(ADDRESSES), (login // len(ADDRESSES)) % len(DEVICES)


def report_body(login: int, address: int, device: int, success: bool, bad: int, t: float) -> str:
    """One wforce `report` webhook body (reference §12), compact as wforce sends it."""
    protocol, device_id = DEVICES[device]
    return json.dumps({
        "login": login_name(login), "remote": ADDRESSES[address], "success": success,
        "pwhash": GOOD_PWHASH if success else BAD_PWHASHES[bad], "protocol": protocol, "t": t,
        "tls": True, "attrs": {"cos": "basic"}, "device_id": device_id, "session_id": "",
        "fail_type": "" if success else "credentials", "policy_reject": False,
        "type": "wforce_report",
    }, separators=(",", ":"))


def _lua_list(values: tuple[str, ...]) -> str:
    return "{" + ", ".join(json.dumps(v) for v in values) + "}"


def wrk_script() -> str:
    """The wrk Lua script: the same draw as `draws()`, with a unique X-Wforce-Delivery per request
    (wrk's first script argument is a per-run nonce, so warm-up and measurement never collide)."""
    devices = tuple(json.dumps(d)[1:-1] for _, d in DEVICES)  # JSON-escaped, as Lua literals
    protocols = tuple(p for p, _ in DEVICES)
    return f"""
local addresses = {_lua_list(ADDRESSES)}
local devices = {_lua_list(devices)}
local protocols = {_lua_list(protocols)}
local bad = {_lua_list(BAD_PWHASHES)}
local counter, id, nonce = 0, 0, "run"
function setup(thread) id = id + 1; thread:set("id", id) end
function init(args)
  nonce = args[1] or tostring(os.time())
  math.randomseed((id or 1) * 7919 + os.time())
end
request = function()
  counter = counter + 1
  local login = math.random(0, {LOGINS - 1})
  local address = login % #addresses
  local device = math.floor(login / #addresses) % #devices
  if math.random() < {ROAMING} then address = math.random(0, #addresses - 1) end
  if math.random() < {ROAMING} then device = math.random(0, #devices - 1) end
  local success = math.random() < {SUCCESS_RATE}
  local body = '{{"login":"user' .. login .. '@example.com","remote":"' .. addresses[address + 1]
    .. '","success":' .. tostring(success) .. ',"pwhash":"'
    .. (success and "{GOOD_PWHASH}" or bad[math.random(1, #bad)]) .. '","protocol":"'
    .. protocols[device + 1] .. '","t":' .. string.format("%.6f", os.time() + (counter % 1000) / 1000)
    .. ',"tls":true,"attrs":{{"cos":"basic"}},"device_id":"' .. devices[device + 1]
    .. '","session_id":"","fail_type":"' .. (success and "" or "credentials")
    .. '","policy_reject":false,"type":"wforce_report"}}'
  wrk.headers["X-Wforce-Delivery"] = "bench-" .. nonce .. "-" .. tostring(id) .. "-" .. tostring(counter)
  return wrk.format("POST", "/command/report", nil, body)
end
"""


def draws(count: int, seed: int = 1) -> Iterator[tuple[int, int, int, bool, int]]:
    """(login, address, device, success, bad pwhash) as the wrk script draws them."""
    rng = random.Random(seed)
    for _ in range(count):
        login = rng.randrange(LOGINS)
        address, device = home(login)
        if rng.random() < ROAMING:
            address = rng.randrange(len(ADDRESSES))
        if rng.random() < ROAMING:
            device = rng.randrange(len(DEVICES))
        yield login, address, device, rng.random() < SUCCESS_RATE, rng.randrange(len(BAD_PWHASHES))


# --------------------------------------------------------------------------------------- prefill

#: The draw of the prefilled history (the live load draws its own in wrk).
PREFILL_SEED = 2
_LOGIN_MARK, _DELIVERY_MARK, _T_MARK = "@login-mark@", "@delivery-mark@", 123456.25


def _templates() -> dict[tuple[int, int, bool, int], tuple[list[Any], int, int, int]]:
    """Every report shape encoded once by the checkout's own ingest code, with the positions of
    the columns that vary per row (found by their marks, not assumed)."""
    from trackalert.devices import DeviceParser
    from trackalert.enrich import Enricher
    from trackalert.eventlog.sqlite import encode_row
    from trackalert.geoip import GeoIPRegistry
    from trackalert.report import parse_report

    geoip = GeoIPRegistry()
    geoip.open("City", str(CITY_DB))
    geoip.open("ASN", str(ASN_DB))
    enricher = Enricher(geoip, {"city": "City", "asn": "ASN"}, DeviceParser())
    shapes = itertools.product(range(len(ADDRESSES)), range(len(DEVICES)), (True, False),
                               range(len(BAD_PWHASHES)))
    templates = {}
    for address, device, success, bad in shapes:
        body = report_body(0, address, device, success, bad, _T_MARK).replace(login_name(0), _LOGIN_MARK)
        row = list(encode_row(enricher.enrich(parse_report(body, _T_MARK)), _DELIVERY_MARK))
        templates[address, device, success, bad] = (
            row, row.index(_T_MARK), row.index(_LOGIN_MARK), row.index(_DELIVERY_MARK))
    return templates


def _migrate(db_path: Path) -> None:
    from trackalert.clock import RealClock
    from trackalert.eventlog import open_event_log

    async def migrate() -> None:
        log = open_event_log(f"sqlite:///{db_path}", RealClock())
        await log.open()
        await log.close()

    asyncio.run(migrate())


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def _event_rows(count: int, now: float, spacing: float) -> Iterator[tuple]:
    templates = _templates()
    for seq, (login, address, device, success, bad) in enumerate(draws(count, seed=PREFILL_SEED), start=1):
        row, t_at, login_at, delivery_at = templates[address, device, success, bad]
        t = now - (count - seq) * spacing
        row[t_at], row[login_at], row[delivery_at] = t, login_name(login), f"old-{seq}"
        yield (seq, t, *row)


def prefill(db_path: Path, count: int, spacing: float = 0.5) -> None:
    """A log of `count` events, as a long-running daemon would have it: one every `spacing`
    seconds up to now, the policy cursor at the end (it has run over everything), and the
    delivery ids of the last day in the dedupe table (the retention window)."""
    _migrate(db_path)
    started = time.monotonic()
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    columns = _columns(db, "events")
    insert = f"INSERT INTO events ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    now = time.time()
    rows = _event_rows(count, now, spacing)
    while batch := list(itertools.islice(rows, 100_000)):
        db.executemany(insert, batch)
        db.commit()
    db.execute("INSERT OR REPLACE INTO cursors (name, seq) VALUES ('report', ?)", (count,))
    # The fingerprint column exists from migration 0005 on; older checkouts have none.
    if "fingerprint" in _columns(db, "deliveries"):
        insert = "INSERT INTO deliveries (delivery_id, fingerprint, seq, received) VALUES (?, X'', ?, ?)"
    else:
        insert = "INSERT INTO deliveries (delivery_id, seq, received) VALUES (?, ?, ?)"
    day = range(max(1, count - int(86_400 / spacing) + 1), count + 1)
    db.executemany(
        insert,
        ((f"old-{seq}", seq, now - (count - seq) * spacing) for seq in day),
    )
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    print(f"  prefilled {count:,} events in {time.monotonic() - started:.0f} s "
          f"({db_path.stat().st_size / 2**20:.0f} MiB)", flush=True)


def prepare_log(db_path: Path, count: int, cache: Path | None) -> None:
    """Prefill `db_path`; with a cache directory, the first prefill of a size is kept and copied."""
    if not count:
        return
    if cache is None:
        prefill(db_path, count)
        return
    cache.mkdir(parents=True, exist_ok=True)
    template = cache / f"prefill-{count}.db"
    if not template.exists():
        prefill(template.with_suffix(".tmp"), count)
        template.with_suffix(".tmp").rename(template)
    shutil.copyfile(template, db_path)
