"""An Elasticsearch-compatible server for the tests: osmem-server, or a real cluster.

osmem-server (PyPI) is an in-memory OpenSearch-compatible server shipped as a binary in its
wheel; it is started once per test session on a free loopback port and stopped at the end. Set
``TRACKALERT_TEST_ES_URL`` to run the same tests against a real Elasticsearch/OpenSearch cluster
instead: an ``elasticsearch://`` URL as setEventLog takes it, without the index prefix, e.g.
``elasticsearch://elastic:secret@127.0.0.1:9200?tls=1&ca_file=/tmp/ca.crt``. Every test uses
its own index prefix and deletes its indices and templates afterwards.
"""

from __future__ import annotations

import os
import uuid
from typing import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

ENV = "TRACKALERT_TEST_ES_URL"


@pytest.fixture(scope="session")
def elastic_base() -> Iterator[str]:
    """``elasticsearch://host:port`` (plus options) of the server the tests use."""
    url = os.environ.get(ENV)
    if url:
        yield url
        return
    from osmem_server import OsmemServer

    server = OsmemServer.start(addr="127.0.0.1:0", japanese=False)
    try:
        yield "elasticsearch://" + urlsplit(server.url).netloc
    finally:
        server.close()


def with_prefix(base: str, prefix: str) -> str:
    """The log URL of `prefix` on the server of `base`."""
    parts = urlsplit(base)
    return urlunsplit((parts.scheme, parts.netloc, "/" + prefix, parts.query, ""))


@pytest.fixture
async def elastic_url(elastic_base: str) -> AsyncIterator[str]:
    """A log URL with a prefix of its own; its indices and templates are removed afterwards."""
    from trackalert.eventlog.es_client import async_client, parse_elastic_url
    from trackalert.eventlog.es_templates import remove_templates

    prefix = f"ta-test-{uuid.uuid4().hex[:12]}"
    url = with_prefix(base=elastic_base, prefix=prefix)
    yield url
    client = async_client(parse_elastic_url(url))
    try:
        await client.options(ignore_status=404).indices.delete(index=f"{prefix}-*")
        await remove_templates(client, prefix)
    finally:
        await client.close()
