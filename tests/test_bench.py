"""The benchmark instruments (bench/) measure the real thing: what wrk sends is accepted and
enriched like wforce's reports, a prefilled log is what the daemon itself would have stored (the
helpers find it), the memory figure covers every process of the daemon, and a daemon's reported
`trackalert` is the one it really imported. Figures themselves are never asserted."""

from __future__ import annotations

import collections
import json
import shutil
import sqlite3
import sys
import time
import urllib.request
from pathlib import Path

import lupa
import pytest

from trackalert.testing import DaemonProcess, basic_auth, listener_config

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import reports  # noqa: E402

ENRICHED = listener_config() + f"""
setNumLuaStates(1)
newGeoIP2DB("City", "{reports.CITY_DB}")
newGeoIP2DB("ASN", "{reports.ASN_DB}")
setEnrichment({{city="City", asn="ASN"}})
setCustomEndpoint("count", function(args)
  local a = args.attrs
  return true, {{
    remote = tostring(countReports({{remote = a.remote}})),
    netmask = tostring(countReports({{netmask = a.netmask, success = false}})),
    country = tostring(countReports({{country = a.country}})),
    asn = tostring(countReports({{asn = tonumber(a.asn)}})),
    browser = tostring(countReports({{["device_attrs.browser.family"] = a.browser}})),
    login = tostring(countReports({{login = a.login, success = true, window = "30d"}})),
  }}
end)
"""


#: Appended to a copied package: each process that imports it writes "<pid> <file>" to MARKER.
IMPORT_WITNESS = """
import os as _os
with open(MARKER, "a") as _marker:
    _marker.write(f"{_os.getpid()} {__file__}\\n")
"""


def post(url: str, body: str, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body.encode(), headers={**basic_auth(), **headers})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return answer.status, json.loads(answer.read())


def wrk_requests(count: int) -> list[tuple[dict[str, str], str]]:
    """(headers, body) of `count` requests from the real wrk script, run in LuaJIT with the
    slice of wrk's API it uses (wrk.headers, wrk.format)."""
    lua = lupa.LuaRuntime()
    lua.execute("wrk = {headers = {}, format = function(method, path, headers, body) "
                "return {method = method, path = path, body = body} end}")
    lua.execute(reports.wrk_script())
    lua.globals().setup({"set": lambda *_: None})
    lua.globals().init(lua.table("test"))
    requests = []
    for _ in range(count):
        made = lua.globals().request()
        assert (made.method, made.path) == ("POST", "/command/report")
        requests.append((dict(lua.globals().wrk.headers), made.body))
    return requests


def test_wrk_reports_are_accepted_enriched_and_varied(tmp_path: Path) -> None:
    requests = wrk_requests(400)
    deliveries = [headers["X-Wforce-Delivery"] for headers, _ in requests]
    assert len(set(deliveries)) == len(deliveries)
    with DaemonProcess(tmp_path, ENRICHED) as daemon:
        for headers, body in requests:
            assert post(daemon.url("/command/report"), body, headers) == (200, {"status": "ok"})
    with sqlite3.connect(tmp_path / "trackalert-events.db") as db:
        rows = db.execute("SELECT login, remote, success, country, asn, device_attrs, protocol "
                          "FROM events").fetchall()
    assert len(rows) == len(requests)
    remotes = {r[1] for r in rows}
    assert {":" in r for r in remotes} == {True, False}  # IPv4 and IPv6
    assert remotes <= set(reports.ADDRESSES) and len(remotes) >= 8
    assert {r[2] for r in rows} == {0, 1}
    assert len({r[0] for r in rows}) > 300
    assert {"GB", "SE", "US", "JP", "DE"} <= {r[3] for r in rows}
    assert {29518, 209} <= {r[4] for r in rows}
    browsers = {json.loads(r[5]).get("browser.family") for r in rows if r[6] == "http"}
    assert {"Chrome", "Firefox", "Mobile Safari"} <= browsers
    assert {json.loads(r[5]).get("imapc.family") for r in rows if r[6] == "imap"} == {"Thunderbird"}


def test_prefilled_log_is_what_the_daemon_stores(tmp_path: Path) -> None:
    count = 3000
    reports.prefill(tmp_path / "trackalert-events.db", count)
    drawn = list(reports.draws(count, seed=reports.PREFILL_SEED))
    by_address = collections.Counter(d[1] for d in drawn)
    failed_v6 = sum(1 for d in drawn if d[1] == reports.ADDRESSES.index("2001:218::1") and not d[3])
    logins = collections.Counter(d[0] for d in drawn if d[3])
    login, successes = logins.most_common(1)[0]
    firefox = sum(1 for d in drawn if d[2] == 1)
    with DaemonProcess(tmp_path, ENRICHED) as daemon:
        assert harness.policy_lag(daemon.url("/metrics")) == 0  # the cursor is at the end
        with harness.LagSampler(daemon.url("/metrics"), interval=0.05) as lags:
            for _ in range(1500):  # bounded: 30 s at most
                if len(lags.samples) >= 3:
                    break
                time.sleep(0.02)
        assert [events for _, events in lags.samples[:3]] == [0, 0, 0]
        assert [t for t, _ in lags.samples] == sorted(t for t, _ in lags.samples)
        status, answer = post(daemon.url("/command/count"), json.dumps({"attrs": {
            "remote": "81.2.69.142", "netmask": "2001:218::/32", "country": "GB",
            "asn": "29518", "browser": "Firefox", "login": reports.login_name(login)}}), {})
    assert status == 200 and answer["success"]
    assert answer["r_attrs"] == {
        "remote": str(by_address[0]), "netmask": str(failed_v6),
        "country": str(by_address[0] + by_address[1]), "asn": str(by_address[2]),
        "browser": str(firefox), "login": str(successes),
    }
    assert harness.stored(tmp_path / "trackalert-events.db") == count


def test_memory_covers_core_web_workers_and_policy_process(tmp_path: Path) -> None:
    config = listener_config() + "setNumLuaStates(1)\nsetNumWebProcesses(2)\n"
    with DaemonProcess(tmp_path, config) as daemon:
        pid = daemon.process.pid
        with harness.MemorySampler(pid, interval=0.05) as memory:
            status, _ = post(daemon.url("/command/report"), '{"login":"a","remote":"192.0.2.1"}', {})
        core_only = harness.process_rss_mib(pid)
    assert status == 200
    assert memory.processes == 4
    assert memory.peak_mib >= memory.last_mib > core_only > 0


def test_origin_is_the_checkout_the_daemon_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = tmp_path / "checkout"
    shutil.copytree(reports.CODE_ROOT / "trackalert", checkout / "trackalert",
                    ignore=shutil.ignore_patterns("__pycache__"))
    marker = tmp_path / "imported"
    with open(checkout / "trackalert" / "__init__.py", "a", encoding="utf-8") as init:
        init.write(IMPORT_WITNESS.replace("MARKER", repr(str(marker))))
    # PYTHONPATH alone does not win over the working directory of `python -m trackalert`.
    monkeypatch.chdir(reports.CODE_ROOT)
    with DaemonProcess(tmp_path / "a", listener_config(), env={"PYTHONPATH": str(checkout)}) as daemon:
        assert harness.trackalert_origin(daemon.process.pid) == str(reports.CODE_ROOT / "trackalert")
    assert not marker.exists()
    monkeypatch.chdir(checkout)
    with DaemonProcess(tmp_path / "b", listener_config(), env={"PYTHONPATH": str(checkout)}) as daemon:
        assert harness.trackalert_origin(daemon.process.pid) == str(checkout / "trackalert")
        pid = daemon.process.pid
    assert f"{pid} {checkout / 'trackalert' / '__init__.py'}" in marker.read_text().splitlines()


def test_compare_rounds_share_a_prefill_cache_only_when_told(tmp_path: Path) -> None:
    """Each side prefills its own log by default; `--prefill-cache DIR` makes both copy DIR's
    (the bench's own --prefill-cache option, last on the line, is the one argparse keeps)."""
    import compare
    import workload

    side = compare.Side("tree", tmp_path / "tree")
    args = compare.parse_args(["--prefill-cache", str(tmp_path / "shared"), "--", "--prefill", "5"])
    assert args.bench_args == ["--prefill", "5"]
    own = compare.bench_command(side, "workload", args.bench_args, tmp_path, tmp_path / "f.json", None)
    shared = compare.bench_command(side, "workload", args.bench_args, tmp_path, tmp_path / "f.json",
                                   args.prefill_cache)
    parsed = workload.parse_args(own[2:])
    assert parsed.prefill_cache == tmp_path / "prefill-tree" and parsed.prefill == 5
    assert workload.parse_args(shared[2:]).prefill_cache == tmp_path / "shared"
    assert compare.parse_args([]).prefill_cache is None


def test_the_elasticsearch_workload_counts_what_the_daemon_stored(tmp_path: Path) -> None:
    """workload.py --elasticsearch: the daemon logs into the osmem-server it started, and the
    durable count its figures divide by is what the daemon acknowledged."""
    import workload

    requests = wrk_requests(60)
    with workload.osmem_log() as (log_url, stored, server_pid):
        assert stored() == 0
        assert b"osmem" in Path(f"/proc/{server_pid}/cmdline").read_bytes()  # whose CPU is counted
        config = workload.daemon_config("empty", 2, 0, log_url)
        with DaemonProcess(tmp_path, config) as daemon:
            for headers, body in requests:
                assert post(daemon.url("/command/report"), body, headers) == (200, {"status": "ok"})
            assert stored() == len(requests)
        assert harness.process_cpu_seconds(server_pid) > 0
    assert not (tmp_path / "trackalert-events.db").exists()
    assert workload.parse_args(["--elasticsearch"]).elasticsearch
