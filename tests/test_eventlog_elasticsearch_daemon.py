"""The daemon on an Elasticsearch event log (osmem-server, or TRACKALERT_TEST_ES_URL's cluster):
reports over HTTP are stored, each runs through the policy once, the helpers answer as of each
report, and a restart continues from the saved cursor."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from pathlib import Path

import aiohttp
import pytest

from elastic_server import elastic_base, elastic_url  # noqa: F401  (fixtures)
from trackalert.clock import VirtualClock
from trackalert.eventlog.elasticsearch import ElasticEventLog
from trackalert.eventlog.es_client import parse_elastic_url
from trackalert.testing import DaemonProcess, basic_auth, listener_config, policy_process_pid, wait_for

AUTH = basic_auth()
LOGINS = [f"es{i}@example.org" for i in range(5)]


def config(url: str, web_processes: int) -> str:
    return listener_config() + f"""
setEventLog("{url}")
setNumLuaStates(3)
setNumWebProcesses({web_processes})
function report(lt)
  local f = io.open("ran.txt", "a")
  f:write(lt.login .. " " .. countReports({{login=lt.login}}) .. " "
          .. countDistinct("remote", {{login=lt.login, window="1d"}}) .. "\\n")
  f:close()
end
setReport(report)
"""


def ran(directory: Path) -> list[list[str]]:
    path = directory / "ran.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def send(process: DaemonProcess, first: int, total: int, concurrency: int) -> list[int]:
    statuses: list[int] = []
    numbers = iter(range(first, first + total))

    async def client(session: aiohttp.ClientSession) -> None:
        for i in numbers:
            body = json.dumps({"login": LOGINS[i % len(LOGINS)], "remote": f"192.0.2.{i % 7}",
                               "success": i % 3 == 0})
            async with session.post(process.url("/command/report"), data=body, headers=AUTH) as resp:
                statuses.append(resp.status)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return statuses


@pytest.mark.parametrize("web_processes", [0, 2])
async def test_the_daemon_runs_every_report_with_helpers_as_of_it(
        tmp_path: Path, elastic_url: str, web_processes: int) -> None:
    with DaemonProcess(tmp_path, config(elastic_url, web_processes)) as process:
        assert await send(process, 0, 300, concurrency=16) == [200] * 300
        assert await wait_for(lambda: len(ran(tmp_path)) == 300, timeout=60)
        # the policy process reads a SQLite file: on Elasticsearch the policy stays in the
        # core, without a warning when setPolicyProcess was not asked for
        assert policy_process_pid(process.process.pid) is None
        assert "setPolicyProcess" not in process.output()
        assert process.stop() == 0
    with DaemonProcess(tmp_path, config(elastic_url, web_processes)) as process:
        assert await send(process, 300, 20, concurrency=2) == [200] * 20
        assert await wait_for(lambda: len(ran(tmp_path)) == 320, timeout=60)
    lines = ran(tmp_path)
    assert len(lines) == 320, "each stored report ran once, also across the restart"
    counts: dict[str, list[int]] = defaultdict(list)
    for login, count, distinct in lines:
        counts[login].append(int(count))
        assert 0 <= int(distinct) <= 7
    for login in LOGINS:  # the k-th report of a login saw exactly the k-1 before it
        assert sorted(counts[login]) == list(range(64)), login
    log = ElasticEventLog(parse_elastic_url(elastic_url), VirtualClock())
    await log.open()
    try:
        stored = await log.read(0, 1000)
        assert [e.seq for e in stored] == list(range(1, 321))
        assert await log.load_cursor("report") == 320  # saved by the graceful stop
    finally:
        await log.close()
