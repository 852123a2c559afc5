"""Connecting to an Elasticsearch or OpenSearch cluster: the URL, the clients, plain JSON.

Why a transport node of our own: elasticsearch-py 8.x/9.x always send
``Content-Type: application/vnd.elasticsearch+json; compatible-with=N`` (and the same Accept).
Elasticsearch 8 refuses the 9.x client's value (a 400 ``media_type_header_exception``), and
OpenSearch and osmem-server answer 406 to every request with a body; setting client headers does
not help, the client rewrites them. Plain ``application/json`` is accepted by all of them
(REST API compatibility is opt-in on Elasticsearch 8 and 9: plain JSON is "this version's API";
as documented, not tried here on a real 8.x/9.x cluster), so the nodes below always send it: no
detection at start is needed, and one installed client works against every server we support.
Upstream: elastic/elasticsearch-py#2923 and #2927 (the 9.x client on an 8.x server; the answer
there is "use a 9.x server", which sites with OpenSearch or a pinned 8.x cannot).

The same nodes mark responses that lack ``X-Elastic-Product`` (OpenSearch sends none): the
client otherwise raises UnsupportedProductError on the first answer (the product check since
7.14: elastic/elasticsearch-py#1687, #1665, closed without a switch). We only use the API subset
both products share (bulk, mget, search with bool/range/terms/composite, delete_by_query,
index templates), which is what the contract suite runs.
"""

from __future__ import annotations

import dataclasses
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from elastic_transport import AiohttpHttpNode, HttpHeaders, Urllib3HttpNode
from elastic_transport._node import NodeApiResponse  # not re-exported at the top level
from elasticsearch import AsyncElasticsearch, Elasticsearch

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_OPTIONS = ("tls", "ca_file", "verify_certs", "api_key", "templates", "timeout", "node",
            "spool", "feed_interval", "hole_limit")
#: Bounds of `feed_interval` (seconds): below 10 ms the polls are the runner's main work; above
#: a minute the starter helpers' view of the other nodes is older than what they are asked about.
FEED_INTERVAL_RANGE = (0.01, 60.0)
#: The client's attempts at one request (max_retries=2 below): a bulk lands, or fails, within
#: this many timeouts, so a hole may close only after that (`hole_limit`).
ATTEMPTS = 3
#: What a node id may hold: it is a keyword in every event and part of state document ids.
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class ElasticSettings:
    """Everything `setEventLog("elasticsearch://...")` says, checked."""

    hosts: tuple[str, ...]
    #: Index names start with it: <prefix>-events, <prefix>-state (and their templates).
    prefix: str = "trackalert"
    username: str | None = None
    password: str | None = None
    api_key: str | None = None
    ca_file: str | None = None
    verify_certs: bool = True
    #: Install/update the index templates at start (needs the manage_index_templates privilege).
    install_templates: bool = True
    request_timeout: float = 10.0
    #: This daemon's name on the cluster: stored in each event it appends, it names the
    #: events its policy runner must run and its cursors (docs/elasticsearch.md, several nodes).
    node: str = "node"
    #: The local spool file that takes reports while the cluster is away (None: no spool).
    spool: str | None = None
    #: How often (seconds) the window projection polls for the other nodes' events (foreign.py).
    feed_interval: float = 0.5
    #: Seconds after which a seq the projection has not seen is taken for one never stored.
    hole_limit: float = 60.0

    @property
    def location(self) -> str:
        """Where the log is, for logs and the console: never with the credentials."""
        return f"elasticsearch://{','.join(h.split('://', 1)[1] for h in self.hosts)}/{self.prefix}"

    def client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = dict(hosts=list(self.hosts), request_timeout=self.request_timeout,
                                       max_retries=ATTEMPTS - 1, retry_on_timeout=True)
        if self.username is not None:
            options["basic_auth"] = (self.username, self.password or "")
        if self.api_key is not None:
            options["api_key"] = self.api_key
        if self.ca_file is not None:
            options["ca_certs"] = self.ca_file
        if not self.verify_certs:
            options["verify_certs"] = False
        return options


def parse_elastic_url(url: str) -> ElasticSettings:
    """``elasticsearch://[user:password@]host[:port][,host[:port]...][/prefix][?options]``.

    Options: ``tls=1`` (https), ``ca_file=PATH``, ``verify_certs=0``, ``api_key=KEY``,
    ``templates=0`` (do not install templates), ``timeout=SECONDS``, ``node=NAME`` (this
    daemon's node id on a shared cluster; the host name by default), ``spool=PATH`` (a local
    SQLite file that takes the reports while the cluster is away, es_spool.py),
    ``feed_interval=SECONDS`` and ``hole_limit=SECONDS`` (the window projection's feed of the
    other nodes' events, foreign.py). A URL rather than a table keeps setEventLog one string
    for both backends.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "elasticsearch" or not parts.netloc:
        raise ValueError(f"Elasticsearch event log URL must look like "
                         f"elasticsearch://host:9200/prefix, got {url!r}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown Elasticsearch event log option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(_OPTIONS)})")
    tls = _flag(query, "tls", False)
    scheme = "https" if tls else "http"
    hosts = tuple(f"{scheme}://{_host_port(h)}" for h in hostlist.split(",") if h)
    if not hosts:
        raise ValueError(f"no host in Elasticsearch event log URL {url!r}")
    prefix = unquote(parts.path.strip("/")) or "trackalert"
    if prefix != prefix.lower() or any(c in prefix for c in ' "*\\<|,>/?#:') or prefix[0] in "-_+":
        raise ValueError(f"index prefix {prefix!r} is not a valid lower-case index name")
    timeout = _seconds(query, "timeout", 10.0, 0.001, 3600.0, "one request's timeout must be "
                       "more than 0 and at most 3600 seconds")
    low, high = FEED_INTERVAL_RANGE
    feed_interval = _seconds(query, "feed_interval", 0.5, low, high,
                             f"the projection polls for the other nodes' events every {low:g} to "
                             f"{high:g} seconds")
    least = ATTEMPTS * timeout
    hole_limit = _seconds(query, "hole_limit", max(60.0, least), least, 86400.0,
                          f"a bulk can take {ATTEMPTS} x timeout = {least:g} s to land, so a seq "
                          f"not seen may be given up for lost only after that (and at most a day)")
    username = password = None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username, password = unquote(user), unquote(secret)
    return ElasticSettings(
        hosts=hosts, prefix=prefix, username=username, password=password,
        api_key=query.get("api_key") or None, ca_file=query.get("ca_file") or None,
        verify_certs=_flag(query, "verify_certs", True),
        install_templates=_flag(query, "templates", True),
        request_timeout=timeout,
        node=_node_id(query.get("node") or socket.gethostname()[:64]),
        spool=query.get("spool") or None,
        feed_interval=feed_interval,
        hole_limit=hole_limit,
    )


def _seconds(query: dict[str, str], name: str, default: float, low: float, high: float,
             why: str) -> float:
    """Option `name` as seconds within [low, high]; the error says what it is for."""
    text = query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"option {name} must be a number of seconds, got {text!r}") from None
    if not low <= value <= high:  # also refuses nan
        raise ValueError(f"option {name}={text} is out of range: {why}")
    return value


def _node_id(node: str) -> str:
    if not _NODE_ID.fullmatch(node):
        raise ValueError(f"node id {node!r} must be 1-64 letters, digits, '.', '_' or '-' "
                         "(set node=NAME in the event log URL)")
    return node


def _host_port(host: str) -> str:
    if host.startswith("[") or host.count(":") <= 1:  # name, v4, [v6] with optional port
        return host if host.rsplit("]", 1)[-1].count(":") else f"{host}:9200"
    return f"[{host}]:9200"  # a bare IPv6 address


def _flag(query: dict[str, str], name: str, default: bool) -> bool:
    value = query.get(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"option {name} must be 1/0 (or true/false), got {value!r}")


# --------------------------------------------------------------------------- plain JSON nodes


def _plain(headers: HttpHeaders | None) -> HttpHeaders | None:
    if headers is None:
        return None
    headers = headers.copy()
    for name in ("content-type", "accept"):
        value = headers.get(name)
        if value and "vnd.elasticsearch+" in value:
            headers[name] = "application/" + value.split("+", 1)[1].split(";", 1)[0].strip()
    return headers


def _as_elasticsearch(response: NodeApiResponse) -> NodeApiResponse:
    meta = response.meta
    if "x-elastic-product" in meta.headers:
        return response
    headers = HttpHeaders(meta.headers)
    headers["x-elastic-product"] = "Elasticsearch"
    return NodeApiResponse(dataclasses.replace(meta, headers=headers), response.body)


class PlainJsonAsyncNode(AiohttpHttpNode):
    """The async client's node, speaking plain application/json (see the module docstring)."""

    async def perform_request(self, method: str, target: str, body: bytes | None = None,  # type: ignore[override]
                              headers: HttpHeaders | None = None, **kwargs: Any) -> NodeApiResponse:
        response = await super().perform_request(method, target, body, _plain(headers), **kwargs)
        return _as_elasticsearch(response)


class PlainJsonSyncNode(Urllib3HttpNode):
    """The blocking client's node (the helpers' queries from Lua threads), plain JSON too."""

    def perform_request(self, method: str, target: str, body: bytes | None = None,  # type: ignore[override]
                        headers: HttpHeaders | None = None, **kwargs: Any) -> NodeApiResponse:
        return _as_elasticsearch(super().perform_request(method, target, body, _plain(headers), **kwargs))


def async_client(settings: ElasticSettings) -> AsyncElasticsearch:
    """The client the writer uses on the event loop (bulk, mget, reads)."""
    return AsyncElasticsearch(node_class=PlainJsonAsyncNode, **settings.client_options())


def sync_client(settings: ElasticSettings) -> Elasticsearch:
    """A thread-safe blocking client: Lua calls the helpers from worker threads, so they must
    not hop onto the event loop (which may be busy appending, or be the caller itself)."""
    return Elasticsearch(node_class=PlainJsonSyncNode, connections_per_node=8,
                         **settings.client_options())
