"""The Elasticsearch event log: the shared contract, against osmem-server (or a real cluster,
see tests/elastic_server.py), plus what only this backend has (URLs, templates, start-up)."""

from __future__ import annotations

from typing import AsyncIterator

import pytest

from elastic_server import elastic_base, elastic_url  # noqa: F401  (fixtures)
from eventlog_contract import EventLogContract, MakeLog
from trackalert.clock import Clock, VirtualClock
from trackalert.eventlog.elasticsearch import ElasticEventLog
from trackalert.eventlog.es_client import parse_elastic_url


@pytest.fixture
async def elastic_logs(elastic_url: str) -> AsyncIterator[tuple[str, list[ElasticEventLog]]]:
    opened: list[ElasticEventLog] = []
    yield elastic_url, opened
    for log in opened:
        await log.close()


class TestElasticContract(EventLogContract):
    @pytest.fixture
    def make_log(self, elastic_logs: tuple[str, list[ElasticEventLog]]) -> MakeLog:
        url, opened = elastic_logs

        async def make(clock: Clock | None = None) -> ElasticEventLog:
            log = ElasticEventLog(parse_elastic_url(url), clock or VirtualClock())
            opened.append(log)
            await log.open()
            return log

        return make
