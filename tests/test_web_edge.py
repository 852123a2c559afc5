"""The HTTP edge of the REST API, in one process and with web processes, over raw sockets:
malformed requests get JSON errors, one routing rule, wforce's signature, slow clients cut off.

Raw sockets because an HTTP client library would refuse to send (or would normalise) exactly
the requests these tests are about.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sqlite3
from pathlib import Path

import pytest

from trackalert.testing import DaemonProcess, basic_auth, listener_config, wait_for
from trackalert.web import check_basic_auth

CAPTURES = json.loads((Path(__file__).parent / "data" / "wforce-webhook-captures.json").read_text())
#: The capture of wforce's hook 3, which had `secret = "verysecretcode"`; all captures carry
#: wforce's Basic auth password `tapass`.
SIGNED = CAPTURES[1]
SECRET = "verysecretcode"
PASSWORD = "tapass"
AUTH = basic_auth(PASSWORD)["Authorization"]
READ_TIMEOUT = 3

MODES = {
    "one-process": (0, {}),
    "web-processes": (2, {}),
    "pure-python-parser": (0, {"AIOHTTP_NO_EXTENSIONS": "1"}),
}


def edge_config(web_processes: int) -> str:
    return listener_config(PASSWORD) + f"""
setNumWebProcesses({web_processes})
setReportSecret({{"{SECRET}", "rotated-secret"}})
setWebserverReadTimeout({READ_TIMEOUT})
"""


@pytest.fixture(scope="module", params=list(MODES))
def edge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    web_processes, env = MODES[request.param]
    with DaemonProcess(tmp_path_factory.mktemp(request.param), edge_config(web_processes), env=env) as process:
        process.mode = request.param  # type: ignore[attr-defined]
        yield process


def stored(daemon: DaemonProcess, login: str) -> int:
    with sqlite3.connect(daemon.directory / "trackalert-events.db") as db:
        return db.execute("SELECT count(*) FROM events WHERE login = ?", (login,)).fetchone()[0]


def sign(body: bytes, secret: str = SECRET) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def report_request(target: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {target} HTTP/1.1", "Host: trackalert", f"Authorization: {AUTH}",
             f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def signed_report(target: str, login: str) -> bytes:
    body = json.dumps({"login": login}).encode()
    return report_request(target, body, f"X-Wforce-Signature: {sign(body)}")


async def exchange(port: int, *parts: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send `parts` (as separate writes) and read one response; status 0 if closed without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for index, part in enumerate(parts):
            if index:  # let the server read the previous part on its own
                await asyncio.sleep(0.05)
            writer.write(part)
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), timeout)
        return int(status_line.split()[1]), headers, body
    except (asyncio.IncompleteReadError, ConnectionError):
        return 0, {}, b""
    finally:
        writer.close()


BODY = b'{"login": "malformed"}'
POST = "POST /command/report HTTP/1.1\r\nHost: x\r\nAuthorization: " + AUTH + "\r\n"

#: (request, status with aiohttp's C parser). Each one is what a fuzzer or a broken client sends.
MALFORMED = {
    "header-over-8190-bytes": (b"GET /command/readyz HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    "target-over-8190-bytes": (b"GET /command/readyz?" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 431),
    "too-many-headers": (b"GET /command/readyz HTTP/1.1\r\n" + b"X-H: a\r\n" * 200 + b"\r\n", 431),
    "unknown-method": (b"FOO /command/readyz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "lowercase-method": (b"post /command/report HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "content-length-and-chunked": (
        (POST + "Content-Length: 22\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + BODY, 400),
    "bad-chunk-size": ((POST + "Transfer-Encoding: chunked\r\n\r\nzz\r\n").encode() + BODY + b"\r\n0\r\n\r\n", 400),
    "chunk-longer-than-its-size": (
        (POST + "Transfer-Encoding: chunked\r\n\r\n2\r\n").encode() + BODY + b"\r\n0\r\n\r\n", 400),
    "control-character-in-a-header-value": (b"GET /command/readyz HTTP/1.1\r\nX-A: a\x01b\r\n\r\n", 400),
    "control-character-in-a-header-name": (b"GET /command/readyz HTTP/1.1\r\nX\x01A: b\r\n\r\n", 400),
    "bad-content-length": ((POST + "Content-Length: 2x\r\n\r\n").encode() + BODY, 400),
    "two-content-lengths": ((POST + "Content-Length: 22\r\nContent-Length: 23\r\n\r\n").encode() + BODY, 400),
    "tls-on-the-plain-port": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),
    "body-over-the-limit": ((POST + "Content-Length: 1048600\r\n\r\n").encode() + b" " * 1048600, 413),
    "chunked-body-over-the-limit": (
        (POST + "Transfer-Encoding: chunked\r\n\r\n100000\r\n").encode() + b" " * 0x100000
        + b"\r\n10\r\n" + b" " * 16 + b"\r\n0\r\n\r\n", 413),
    "undecodable-gzip-body": ((POST + "Content-Encoding: gzip\r\nContent-Length: 22\r\n\r\n").encode() + BODY, 400),
}


def assert_json_failure(status: int, headers: dict[str, str], body: bytes) -> None:
    assert headers["content-type"] == "application/json; charset=utf-8"
    answer = json.loads(body)
    assert answer["status"] == "failure" and answer["reason"], answer


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_requests_get_a_json_error(edge: DaemonProcess, case: str) -> None:
    data, expected = MALFORMED[case]
    status, headers, body = await exchange(edge.port, data)
    if edge.mode == "pure-python-parser":  # lenient about methods; never a 5xx or a text error
        assert 0 < status < 500 and (status < 400 or json.loads(body)["status"] == "failure"), (status, body)
    else:
        assert status == expected, (status, body)
        assert_json_failure(status, headers, body)
        assert status != 405 or headers["allow"] == "GET, HEAD, POST, PUT, DELETE"
    assert stored(edge, "malformed") == 0


async def test_bad_chunk_framing_after_the_headers_is_a_400_at_once(edge: DaemonProcess) -> None:
    """The framing error arrives in a later packet, while the handler is reading the body:
    aiohttp left that body waiting for ever (until the read timeout, here a 408)."""
    head = (POST + "Transfer-Encoding: chunked\r\n\r\n4\r\n").encode()
    status, headers, body = await exchange(edge.port, head, b'{"lo\r\nzz\r\n', timeout=READ_TIMEOUT - 1)
    assert status == 400, (status, body)
    assert_json_failure(status, headers, body)
    assert stored(edge, "lo") == 0


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/command/report", 200),
        ("/COMMAND/Report", 200),
        ("/command/re%70ort", 200),
        ("/?command=report", 200),
        ("/command/../command/report", 404),
        ("/./command/report", 404),
        ("/command/./report", 404),
        ("/command/report#x", 404),
        ("/command//report", 404),
        ("/command/%2e%2e/command/report", 404),
        ("/?command=report#x", 404),
    ],
)
async def test_one_routing_rule_in_every_mode(edge: DaemonProcess, target: str, status: int) -> None:
    login = f"route-{edge.mode}-{target}"
    got, headers, body = await exchange(edge.port, signed_report(target, login))
    assert got == status, (got, body)
    assert stored(edge, login) == (1 if status == 200 else 0)
    if status != 200:
        assert_json_failure(got, headers, body)


async def rejected_signatures(daemon: DaemonProcess) -> float:
    request = f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n\r\n".encode()
    _, _, body = await exchange(daemon.port, request)
    for line in body.decode().splitlines():
        if line.startswith('trackalert_reports_rejected_total{reason="signature"}'):
            return float(line.split()[-1])
    return 0.0


async def test_wforce_signature_of_a_real_capture_is_accepted(edge: DaemonProcess) -> None:
    body = SIGNED["body"].encode()
    before = stored(edge, "alice@example.com")
    status, _, answer = await exchange(
        edge.port, report_request("/command/report", body, f"X-Wforce-Signature: {SIGNED['headers']['X-Wforce-Signature']}")
    )
    assert (status, answer) == (200, b'{"status":"ok"}')
    assert stored(edge, "alice@example.com") == before + 1
    status, _, _ = await exchange(  # any of the configured secrets (rotation)
        edge.port, report_request("/?command=report", body, f"X-Wforce-Signature: {sign(body, 'rotated-secret')}")
    )
    assert status == 200 and stored(edge, "alice@example.com") == before + 2


@pytest.mark.parametrize(
    "signature",
    [None, "", sign(b"another body"), sign(SIGNED["body"].encode(), "wrong-secret"),
     SIGNED["headers"]["X-Wforce-Signature"] + "junk", "not base64!", SIGNED["headers"]["X-Wforce-Signature"][:-4]],
    ids=["missing", "empty", "other-body", "other-secret", "junk-after", "not-base64", "truncated"],
)
@pytest.mark.parametrize("target", ["/command/report", "/?command=report"])
async def test_missing_or_wrong_signature_is_a_counted_401(edge: DaemonProcess, signature: str | None, target: str) -> None:
    body = SIGNED["body"].encode()
    before, counted = stored(edge, "alice@example.com"), await rejected_signatures(edge)
    headers = [] if signature is None else [f"X-Wforce-Signature: {signature}"]
    status, response_headers, answer = await exchange(edge.port, report_request(target, body, *headers))
    assert status == 401
    assert_json_failure(status, response_headers, answer)
    assert "X-Wforce-Signature" in json.loads(answer)["reason"]
    assert stored(edge, "alice@example.com") == before
    assert await poll_metric(edge, counted + 1)
    assert "X-Wforce-Signature" in edge.output()


async def poll_metric(daemon: DaemonProcess, at_least: float) -> bool:
    """Web workers hand their counts to the core every half second."""
    for _ in range(50):
        if await rejected_signatures(daemon) >= at_least:
            return True
        await asyncio.sleep(0.1)
    return False


TOKEN = base64.b64encode(b"wforce:tapass").decode()


@pytest.mark.parametrize(
    "header",
    [f"Basic {TOKEN}!!", f"Basic {TOKEN} x", f"Basic  {TOKEN}", f"Basic {TOKEN[:8]} {TOKEN[8:]}",
     f"Basic {TOKEN[:-2]}", f"Basic {TOKEN}\t", "Basic d2ZvcmNlOnRhcGFzcw=!", f"Basic {TOKEN}é"],
    ids=["junk-after", "word-after", "two-spaces", "space-inside", "bad-padding", "tab-after",
         "junk-in-padding", "non-ascii"],
)
def test_basic_auth_takes_strict_base64_only(header: str) -> None:
    assert check_basic_auth(f"Basic {TOKEN}", PASSWORD)
    assert check_basic_auth(f"basic {TOKEN}", PASSWORD)
    assert not check_basic_auth(header, PASSWORD)


async def test_basic_auth_with_junk_is_refused_by_the_daemon(edge: DaemonProcess) -> None:
    for header in (f"Basic {TOKEN}!!", f"Basic {TOKEN[:8]}*{TOKEN[8:]}"):
        request = f"GET /command/stats HTTP/1.1\r\nHost: x\r\nAuthorization: {header}\r\n\r\n".encode()
        status, headers, body = await exchange(edge.port, request)
        assert status == 401 and headers["www-authenticate"] == 'basic realm="wforce"'
    request = f"GET /command/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {TOKEN}\r\n\r\n".encode()
    assert (await exchange(edge.port, request))[0] == 200


async def slow_client(port: int, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    return reader, writer


async def answer_of(reader: asyncio.StreamReader, bound: float) -> bytes:
    """What the server says before it closes (b"" for a plain close or a reset)."""
    try:
        return await asyncio.wait_for(reader.read(), bound)
    except ConnectionError:
        return b""


@pytest.mark.parametrize("web_processes", [0, 2])
async def test_slow_clients_are_cut_off_and_free_their_slots(tmp_path: Path, web_processes: int) -> None:
    limit, timeout = 20, 1.0
    config = listener_config(PASSWORD) + (
        f"setNumWebProcesses({web_processes})\nsetMaxWebserverConns({limit})\n"
        f"setWebserverReadTimeout({timeout})\n"
    )
    slow_body = (POST + "Content-Length: 100\r\n\r\n").encode() + b'{"login": "slow'
    slow_headers = POST.encode()  # never ends its headers
    with DaemonProcess(tmp_path, config) as process:
        clients = [await slow_client(process.port, slow_body if i % 2 else slow_headers) for i in range(limit + 10)]
        answers = await asyncio.gather(*(answer_of(reader, 10 * timeout + 5) for reader, _ in clients))
        for reader, writer in clients:
            writer.close()
        timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
        assert all(a == b"" or a.startswith(b"HTTP/1.1 408") for a in answers), answers
        assert len(timed_out) >= limit // 2 - 2, "slow bodies are answered 408"
        assert all(b'"status": "failure"' in a and b"application/json" in a for a in timed_out)
        # every slot is free again: real reports are all served
        for batch in range(4):  # half the limit at a time: the previous batch may still be closing
            reports = [report(f"after-slow-{batch}-{i}") for i in range(limit // 2)]
            results = await asyncio.gather(*(exchange(process.port, r) for r in reports))
            assert [status for status, _, _ in results] == [200] * len(reports)
        assert stored(process, "slow") == 0
        assert "no whole request within 1 s" in process.output()


def report(login: str) -> bytes:
    return report_request("/command/report", json.dumps({"login": login}).encode(), "Connection: close")


async def test_a_client_leaving_mid_body_is_not_an_internal_error(edge: DaemonProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    writer.write((POST + "Content-Length: 100\r\n\r\n").encode() + b'{"login": "left"')
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    assert not await wait_for(lambda: "Internal error" in edge.output() or "Traceback" in edge.output(), timeout=1.5)
    assert stored(edge, "left") == 0


async def served_and_busy(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A connection that got its answer and then started a next request (None: refused)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /command/readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        return None
    assert head.startswith(b"HTTP/1.1 200")
    writer.write(b"GET /command/readyz HTTP/1.1\r\n")
    return reader, writer


@pytest.mark.parametrize("web_processes", [0, 2])
async def test_at_the_limit_an_idle_keepalive_connection_makes_room(tmp_path: Path, web_processes: int) -> None:
    """Idle keep-alive connections (60 s by default) must not hold every slot: at the limit, a
    new connection closes the oldest idle one; a busy one is never closed for it."""
    limit = 3
    config = listener_config(PASSWORD) + f"setNumWebProcesses({web_processes})\nsetMaxWebserverConns({limit})\n"
    with DaemonProcess(tmp_path, config) as process:
        idle = [await asyncio.open_connection("127.0.0.1", process.port) for _ in range(limit)]
        for reader, writer in idle:
            writer.write(b"GET /command/readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
        busy = [await served_and_busy(process.port) for _ in range(limit)]
        assert all(busy), "each new connection is served, closing an idle one"
        assert [await answer_of(reader, 10) for reader, _ in idle] == [b""] * limit
        assert await served_and_busy(process.port) is None, "busy connections are not closed for a new one"
        for _, writer in idle + busy:  # type: ignore[operator]
            writer.close()
