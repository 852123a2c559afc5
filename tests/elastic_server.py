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


# --------------------------------------------------------------------------- server personas

def _version(number: str, lucene: str, wire: str, index: str, **more: object) -> dict:
    """The `version` object of a `GET /` answer."""
    return {"number": number, "build_type": "docker", "build_hash": "persona",
            "build_date": "2025-01-01T00:00:00.000000000Z", "build_snapshot": False,
            "lucene_version": lucene, "minimum_wire_compatibility_version": wire,
            "minimum_index_compatibility_version": index, **more}


#: How each kind of server answers `GET /` and the media types it takes, from the issue's facts
#: and the products' documented answers: Elasticsearch 8 refuses the 9.x client's
#: `compatible-with=9` (400 media_type_header_exception), Elasticsearch 9 takes 8 and 9,
#: OpenSearch refuses every `application/vnd.elasticsearch+json` (406) and sends no
#: `X-Elastic-Product` header; plain `application/json` is taken by all three.
PERSONAS: dict[str, dict] = {
    "elasticsearch-8": {"version": _version("8.15.3", "9.11.1", "7.17.0", "7.0.0", build_flavor="default"),
                        "tagline": "You Know, for Search", "compatible": ("7", "8"),
                        "product": True, "pit": "_pit"},
    "elasticsearch-9": {"version": _version("9.1.0", "10.2.2", "8.19.0", "8.0.0", build_flavor="default"),
                        "tagline": "You Know, for Search", "compatible": ("8", "9"),
                        "product": True, "pit": "_pit"},
    "opensearch-2": {"version": _version("2.17.1", "9.11.1", "7.10.0", "7.0.0", distribution="opensearch"),
                     "tagline": "The OpenSearch Project: https://opensearch.org/", "compatible": (),
                     "product": False, "pit": "point_in_time"},
}


class Persona:
    """A real HTTP server on loopback in front of osmem-server that answers as `kind` does:
    its `GET /`, its media-type rule, its product header, its point-in-time API (Elasticsearch:
    `POST /INDEX/_pit`, `DELETE /_pit`; OpenSearch: `.../_search/point_in_time`). Everything
    else is osmem-server's answer. `requests` counts what was asked, by (method, endpoint)."""

    def __init__(self, kind: str, upstream: str) -> None:
        import collections

        self.kind, self.facts = kind, PERSONAS[kind]
        self.upstream = upstream.rstrip("/")  # http://host:port of osmem-server
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.refused: list[str] = []
        self.port = 0
        self._runner = None
        self._session = None

    @property
    def base(self) -> str:
        return f"elasticsearch://127.0.0.1:{self.port}"

    async def start(self) -> None:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession()
        app = web.Application(client_max_size=256 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _media_refusal(self, name: str, value: str | None) -> str | None:
        """Why this server refuses header `name`, or None."""
        if not value or "vnd.elasticsearch+" not in value:
            return None
        version = value.split("compatible-with=", 1)[-1].split(";", 1)[0].strip()
        if version in self.facts["compatible"]:
            return None
        return f"{name}={value}"

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        import json

        path = request.path
        body = await request.read()
        endpoint = next((p for p in reversed(path.split("/"))
                         if p.startswith("_") or p == "point_in_time"), "doc")
        self.requests[request.method, endpoint if path != "/" else "/"] += 1
        content_type = request.headers.get("Content-Type") if body else None
        refusals = [r for r in (self._media_refusal("Content-Type", content_type),
                                self._media_refusal("Accept", request.headers.get("Accept")))
                    if r]
        if refusals:
            self.refused.append("; ".join(refusals))
            if self.facts["product"]:  # Elasticsearch's answer
                reason = "Invalid media-type value on headers [Content-Type, Accept]"
                error = {"error": {"root_cause": [{"type": "media_type_header_exception", "reason": reason}],
                                   "type": "media_type_header_exception", "reason": reason,
                                   "caused_by": {"type": "status_exception", "reason":
                                                 f"A compatible version is required ... {refusals[0]}"}},
                         "status": 400}
                return self._answer(400, json.dumps(error).encode())
            error = {"error": f"Content-Type header [{refusals[0]}] is not supported", "status": 406}
            return self._answer(406, json.dumps(error).encode())
        if path == "/" and request.method in ("GET", "HEAD"):
            about = {"name": f"{self.kind}-node", "cluster_name": "persona",
                     "cluster_uuid": "persona-cluster", "version": self.facts["version"],
                     "tagline": self.facts["tagline"]}
            return self._answer(200, json.dumps(about).encode())
        method, target, params = request.method, path, dict(request.query)
        if self.facts["pit"] == "_pit":
            if path.endswith("/_search/point_in_time"):  # not an Elasticsearch route
                error = {"error": f"no handler found for uri [{path}] and method [{method}]"}
                return self._answer(400, json.dumps(error).encode())
            if method == "POST" and path.endswith("/_pit"):
                opensearch_path = path[:-len("_pit")] + "_search/point_in_time"
                status, answer = await self._forward("POST", opensearch_path, params, b"")
                if status == 200:
                    answer = json.dumps({"id": json.loads(answer)["pit_id"]}).encode()
                return self._answer(status, answer)
            if method == "DELETE" and path == "/_pit":
                pit_id = json.loads(body)["id"]
                status, answer = await self._forward("DELETE", "/_search/point_in_time", {},
                                                     json.dumps({"pit_id": [pit_id]}).encode())
                return self._answer(status, json.dumps({"succeeded": status == 200, "num_freed": 1}).encode())
        status, answer = await self._forward(method, target, params, body,
                                             "x-ndjson" in (request.headers.get("Content-Type") or ""))
        return self._answer(status, answer)

    async def _forward(self, method: str, target: str, params: dict, body: bytes,
                       ndjson: bool = False) -> tuple[int, bytes]:
        assert self._session is not None
        headers = {"Content-Type": "application/x-ndjson" if ndjson else "application/json",
                   "Accept": "application/json"}
        async with self._session.request(method, self.upstream + target, params=params,
                                         data=body or None, headers=headers) as response:
            return response.status, await response.read()

    def _answer(self, status: int, body: bytes):  # type: ignore[no-untyped-def]
        from aiohttp import web

        headers = {"Content-Type": "application/json; charset=UTF-8"}
        if self.facts["product"]:
            headers["X-Elastic-Product"] = "Elasticsearch"
        return web.Response(status=status, body=body, headers=headers)


def upstream_http(base: str) -> str:
    """http://host:port of the server behind an ``elasticsearch://`` base URL (osmem-server)."""
    return "http://" + urlsplit(base).netloc.rsplit("@", 1)[-1]
