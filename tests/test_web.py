"""The REST API end to end: a real daemon subprocess on loopback, driven over real HTTP."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for

CAPTURES = json.loads((Path(__file__).parent / "data" / "wforce-webhook-captures.json").read_text())
AUTH = basic_auth()

CONFIG = listener_config() + """
addACL("!127.0.0.2/32")
setNumLuaStates(2)
addCustomStat("seen")
local out = "reports.txt"
function report(lt)
  if lt.login == "explode" then error("policy exploded") end
  local f = io.open(out, "a")
  f:write(lt.login .. " " .. lt.remote:tostring() .. " " .. tostring(lt.success) .. "\\n")
  f:close()
  incCustomStat("seen")
end
setReport(report)
setCustomEndpoint("custom", function(args)
  return true, {login = args.attrs.login or "unknown", groups = table.concat(args.attrs_mv.groups or {}, ",")}
end)
setCustomEndpoint("broken", function(args) error("endpoint exploded") end)
setCustomEndpoint("badreturn", function(args) return "yes" end)
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    with DaemonProcess(tmp_path_factory.mktemp("web"), CONFIG) as process:
        yield process


def stored(daemon: DaemonProcess, login: str) -> int:
    with sqlite3.connect(daemon.directory / "trackalert-events.db") as db:
        return db.execute("SELECT count(*) FROM events WHERE login = ?", (login,)).fetchone()[0]


def ran(daemon: DaemonProcess, login: str) -> int:
    path = daemon.directory / "reports.txt"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.split(" ")[0] == login)


async def request(
    daemon: DaemonProcess, method: str, path: str, body: bytes | str | None = None,
    headers: dict[str, str] | None = None, local_addr: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    connector = aiohttp.TCPConnector(local_addr=(local_addr, 0) if local_addr else None)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.request(method, daemon.url(path), data=body, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()


async def post_report(daemon: DaemonProcess, doc: dict, path: str = "/command/report", **headers: str):
    return await request(daemon, "POST", path, json.dumps(doc), {**AUTH, **headers})


@pytest.mark.parametrize("path", ["/command/report", "/?command=report"])
@pytest.mark.parametrize("index", range(len(CAPTURES)))
async def test_wforce_webhook_requests_are_stored_and_run(daemon, path: str, index: int) -> None:
    capture = CAPTURES[index]
    doc = json.loads(capture["body"])
    doc["login"] = f"capture{index}-{'legacy' if '?' in path else 'path'}"
    headers = {k: v for k, v in capture["headers"].items() if k.startswith("X-") or k == "Content-Type"}
    headers.pop("X-Wforce-Delivery")
    status, response_headers, body = await request(
        daemon, "POST", path, json.dumps(doc, sort_keys=True, separators=(", ", ": ")), {**headers, **AUTH}
    )
    assert (status, body) == (200, b'{"status":"ok"}')
    assert response_headers["Content-Type"] == "application/json; charset=utf-8"
    assert stored(daemon, doc["login"]) == 1
    assert await wait_for(lambda: ran(daemon, doc["login"]) == 1)


async def test_the_exact_captured_request_with_its_delivery_id_is_idempotent(daemon) -> None:
    capture = CAPTURES[3]
    headers = {k: v for k, v in capture["headers"].items() if not k.startswith(":") and k not in ("Host", "Content-Length")}
    headers.update(AUTH)  # the capture's password is wforce's test password, not ours
    for _ in range(3):
        status, _, body = await request(daemon, "POST", "/command/report", capture["body"], headers)
        assert (status, body) == (200, b'{"status":"ok"}')
    assert stored(daemon, "bob@example.com") == 1
    assert await wait_for(lambda: ran(daemon, "bob@example.com") == 1)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("null", "must be a JSON object"),
        ('{"login": "badinput", "success": "yes"}', "field 'success' must be a boolean"),
        ('{"login": "badinput", "remote": "no.such.host"}', "Unable to convert presentation address"),
        ('{"login": "badinput", "attrs": {"n": 1}}', "field 'attrs.n'"),
        ('{"login": "badinput", "t": "now"}', "field 't' must be a number"),
    ],
)
async def test_bad_input_gets_400_json_and_is_not_stored(daemon, body: str, reason: str) -> None:
    status, headers, raw = await request(daemon, "POST", "/command/report", body, AUTH)
    assert status == 400
    answer = json.loads(raw)
    assert answer["status"] == "failure" and reason in answer["reason"]
    assert stored(daemon, "badinput") == 0


async def test_body_over_one_mebibyte_gets_413_json(daemon) -> None:
    doc = {"login": "huge", "attrs": {"blob": "x" * (1024 * 1024)}}
    status, _, raw = await post_report(daemon, doc)
    assert status == 413
    assert json.loads(raw)["status"] == "failure"
    assert stored(daemon, "huge") == 0


@pytest.mark.parametrize(
    "authorization",
    [None, "Basic " + "d2ZvcmNlOndyb25n", "Bearer secret", "Basic !!!notbase64", "Basic c2VjcmV0"],
    ids=["missing", "wrong-password", "not-basic", "garbage", "no-colon"],
)
async def test_authentication_failures(daemon, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    status, response_headers, raw = await request(
        daemon, "POST", "/command/report", '{"login": "noauth"}', headers
    )
    assert status == 401
    assert response_headers["WWW-Authenticate"] == 'basic realm="wforce"'
    assert json.loads(raw) == {"status": "failure", "reason": "Unauthorized"}
    assert stored(daemon, "noauth") == 0


async def test_any_user_name_and_a_colon_in_the_password_are_fine(tmp_path: Path) -> None:
    config = listener_config(password="pa:ss") + 'setReport(function(lt) end)\n'
    with DaemonProcess(tmp_path, config) as process:
        status, _, _ = await request(process, "GET", "/command/stats", headers=basic_auth("pa:ss", user=""))
        assert status == 200
        status, _, _ = await request(process, "GET", "/command/stats", headers=basic_auth("pa", user=""))
        assert status == 401


async def test_acl_denial_is_a_401_json_with_the_ip(daemon) -> None:
    status, headers, raw = await request(
        daemon, "POST", "/command/report", '{"login": "denied"}', AUTH, local_addr="127.0.0.2"
    )
    assert status == 401
    assert json.loads(raw) == {"status": "failure", "reason": "Source IP Address not in ACL", "ip": "127.0.0.2"}
    assert headers.get("Connection") == "close"
    assert stored(daemon, "denied") == 0
    status, _, _ = await request(daemon, "GET", "/command/readyz", local_addr="127.0.0.3")
    assert status == 200


async def test_stats_reports_counts_and_uptime_from_start(daemon) -> None:
    await post_report(daemon, {"login": "statsuser"})
    status, headers, raw = await request(daemon, "GET", "/?command=stats", headers=AUTH)
    assert status == 200
    stats = json.loads(raw)
    assert set(stats) == {"perfstats", "reports", "sys-msec", "user-msec", "uptime"}
    assert stats["reports"] >= 1
    assert sorted(stats["perfstats"]) == [
        "WTR_0_1", "WTR_100_1000", "WTR_10_100", "WTR_1_10", "WTR_Slow",
        "WTW_0_1", "WTW_100_1000", "WTW_10_100", "WTW_1_10", "WTW_Slow",
    ]
    assert sum(v for k, v in stats["perfstats"].items() if k.startswith("WTR")) >= 1
    assert raw.startswith(b'{"perfstats": {"WTR_0_1": ')  # json11 layout: sorted, ", " and ": "


async def test_readyz_livez_and_routing(daemon) -> None:
    assert (await request(daemon, "GET", "/command/readyz"))[0] == 200
    assert (await request(daemon, "GET", "/?command=readyz"))[0] == 401
    assert (await request(daemon, "GET", "/?command=readyz", headers=AUTH))[0] == 200
    status, headers, body = await request(daemon, "GET", "/command/livez")
    assert (status, body) == (200, b"")
    assert (await request(daemon, "POST", "/command/livez"))[0] == 405
    for method, path in [("GET", "/nothing"), ("GET", "/command/report"), ("POST", "/command/nothing"),
                         ("GET", "/?command=nothing"), ("GET", "/command/report/")]:
        status, _, raw = await request(daemon, method, path, headers=AUTH)
        assert status == 404, (method, path)
        assert json.loads(raw) == {"status": "failure", "reason": "Not found"}
    assert (await request(daemon, "PATCH", "/?command=report", headers=AUTH))[0] == 405
    assert (await request(daemon, "GET", "/COMMAND/STATS", headers=AUTH))[0] == 200


async def test_custom_endpoint(daemon) -> None:
    status, headers, raw = await request(
        daemon, "POST", "/command/custom",
        json.dumps({"attrs": {"login": "custom1", "groups": ["a", "b"], "dropped": 5}}), AUTH,
    )
    assert status == 200
    assert raw == b'{"r_attrs": {"groups": "a,b", "login": "custom1"}, "success": true}'
    status, _, raw = await request(daemon, "POST", "/?command=custom", "{}", AUTH)
    assert json.loads(raw) == {"r_attrs": {"groups": "", "login": "unknown"}, "success": True}


@pytest.mark.parametrize(("name", "reason"), [("broken", "endpoint exploded"), ("badreturn", "must return a boolean")])
async def test_custom_endpoint_errors_are_500_json_and_logged(daemon, name: str, reason: str) -> None:
    status, _, raw = await request(daemon, "POST", f"/command/{name}", "{}", AUTH)
    assert status == 500
    answer = json.loads(raw)
    assert answer["success"] is False and reason in answer["reason"]
    assert f"Lua function [custom:{name}] exception" in daemon.output()


async def test_custom_endpoint_bad_json_is_400(daemon) -> None:
    status, _, raw = await request(daemon, "POST", "/command/custom", "{oops", AUTH)
    assert status == 400
    assert json.loads(raw)["success"] is False


async def test_a_lua_error_in_report_is_logged_with_location_and_counted(daemon) -> None:
    status, _, _ = await post_report(daemon, {"login": "explode"})
    assert status == 200
    assert stored(daemon, "explode") == 1
    assert await wait_for(lambda: "policy exploded" in daemon.output())
    assert "trackalert.conf:" in daemon.output().split("policy exploded")[0].rsplit("\n", 1)[-1]
    metrics = await scrape(daemon)
    assert metrics[("trackalert_lua_errors_total", (("function", "report"),))] >= 1
    # ... and the daemon carries on
    await post_report(daemon, {"login": "after-explode"})
    assert await wait_for(lambda: ran(daemon, "after-explode") == 1)


async def scrape(daemon: DaemonProcess) -> dict[tuple[str, tuple], float]:
    status, _, raw = await request(daemon, "GET", "/metrics", headers=AUTH)
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_need_auth_and_have_the_original_names(daemon) -> None:
    assert (await request(daemon, "GET", "/metrics"))[0] == 401
    before = await scrape(daemon)
    await request(daemon, "POST", "/command/custom", "{}", AUTH)
    await post_report(daemon, {"login": "metrics"})
    after = await scrape(daemon)
    assert ("trackalert_worker_queue_duration_seconds_bucket", (("le", "0.001"),)) in after
    assert after[("trackalert_worker_response_duration_seconds_bucket", (("le", "+Inf"),))] > 0
    assert ("trackalert_active_http_connections", ()) in after
    custom = ("trackalert_commands_total", (("cmd", "custom"),))
    assert after[custom] == before[custom] + 1
    assert after[("trackalert_commands_total", (("cmd", "report"),))] > before[("trackalert_commands_total", (("cmd", "report"),))]
    assert after[("trackalert_custom_stats_total", (("metric", "seen"),))] >= 1
    assert after[("trackalert_eventlog_appends_total", ())] >= 1
    status, _, raw = await request(daemon, "GET", "/metrics", headers=AUTH)
    text = raw.decode()
    assert 'trackalert_commands_total{cmd="custom"}' in text
    assert 'trackalert_worker_queue_duration_seconds_bucket{le="0.001"}' in text
    assert "_created" not in text


async def test_metrics_without_password(tmp_path: Path) -> None:
    config = listener_config() + "setMetricsNoPassword()\n"
    with DaemonProcess(tmp_path, config) as process:
        assert (await request(process, "GET", "/metrics"))[0] == 200
        assert (await request(process, "GET", "/command/stats"))[0] == 401


async def test_max_connections_closes_the_extra_ones(tmp_path: Path) -> None:
    config = listener_config() + "setMaxWebserverConns(2)\n"
    with DaemonProcess(tmp_path, config) as process:
        held = [await asyncio.open_connection("127.0.0.1", process.port) for _ in range(2)]
        for reader, writer in held:  # make sure the server has accepted both
            writer.write(b"GET /command/readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            writer.write(b"GET /command/readyz HTTP/1.1\r\n")  # and keep them busy (idle ones make room)
        reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
        writer.write(b"GET /command/readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:  # closed without an answer: EOF, or a reset because our request was unread
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass
        for _, held_writer in held:
            held_writer.close()
        writer.close()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with openssl."""
    import subprocess

    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize("web_processes", [0, 2])
async def test_a_tls_handshake_that_never_comes_is_cut_off(tmp_path: Path, web_processes: int) -> None:
    cert, key = self_signed(tmp_path)
    config = (
        f'addListener("127.0.0.1:0", true, "{cert}", "{key}", {{}})\n'
        f"setNumWebProcesses({web_processes})\nsetWebserverReadTimeout(1)\n"
    )
    with DaemonProcess(tmp_path, config) as process:
        reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
        try:  # silent after connecting: closed after the read timeout, not the 60 s default
            assert await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionResetError:
            pass
        writer.close()


@pytest.mark.parametrize("web_processes", [0, 1])
async def test_tls_listener_with_min_protocol(tmp_path: Path, web_processes: int) -> None:
    import ssl

    cert, key = self_signed(tmp_path)
    config = (
        f'addListener("127.0.0.1:0", true, "{cert}", "{key}", {{MinProtocol="TLSv1.3", Bogus="x"}})\n'
        'setWebserverPassword("secret")\n'
        f"setNumWebProcesses({web_processes})\n"
    )
    with DaemonProcess(tmp_path, config) as process:
        assert await wait_for(lambda: "TLS option Bogus=x is not supported" in process.output())
        url = f"https://127.0.0.1:{process.port}/command/stats"
        context = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as session:
            async with session.get(url, headers=AUTH, ssl=context) as resp:
                assert resp.status == 200
                assert "reports" in await resp.json(content_type=None)
        old = ssl.create_default_context(cafile=str(cert))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                await session.get(url, headers=AUTH, ssl=old)
