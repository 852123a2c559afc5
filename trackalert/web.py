"""The REST API: wforce's report webhook in, the event log append, and the operator's endpoints.

A report's path is short on purpose: ACL, auth, `parse_report`, `EventLog.append`, 200. The
policy runs later, from the log, so wforce's 2 s webhook timeout only ever waits for the append.
Every error body is valid JSON (the C++ daemon concatenated raw error text into some of them).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import resource
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web
from aiohttp.web_exceptions import HTTPRequestEntityTooLarge
from aiohttp.web_server import Server

from trackalert import log
from trackalert.lua.convert import protected_call, string_map
from trackalert.metrics import CONTENT_TYPE as METRICS_TYPE
from trackalert.netaddr import endpoint_text
from trackalert.report import ReportError, fingerprint, parse_delivery_id, parse_report
from trackalert.settings import Listener

if TYPE_CHECKING:
    from trackalert.ingest import Ingest
    from trackalert.lua.host import Host
    from trackalert.lua.pool import LuaPool
    from trackalert.lua.state import LuaState

JSON_TYPE = "application/json"
#: Client address of a request proxied by a web worker ("ip port"); trusted on the internal socket only.
PEER_HEADER = "X-Trackalert-Peer"
OK_BODY = b'{"status":"ok"}'
Handler = Callable[[web.BaseRequest], Awaitable[web.Response]]


def json11(value: Any) -> bytes:
    """JSON as the C++ daemon's json11 prints it: sorted keys, `", "` and `": "` separators."""
    return json.dumps(value, sort_keys=True, separators=(", ", ": "), ensure_ascii=False).encode()


def json_response(status: int, value: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=json11(value), content_type=JSON_TYPE, charset="utf-8", headers=headers
    )


def failure(status: int, reason: str, **extra: Any) -> web.Response:
    return json_response(status, {"status": "failure", "reason": reason, **extra})


def bad_report(exc: ReportError) -> web.Response:
    """A refused report: one log line (no traceback: bad input is not a fault), a JSON 400."""
    log.logger.warning("Refused a report: %s", exc)
    return failure(400, str(exc))


def delivery_of(request: web.BaseRequest, body: bytes) -> tuple[str | None, bytes | None]:
    """The delivery id and the body fingerprint that together tell a retry (DESIGN §3)."""
    delivery = parse_delivery_id(request.headers.get("X-Wforce-Delivery"))
    return delivery, fingerprint(body) if delivery is not None else None


@dataclass(frozen=True)
class Command:
    name: str
    method: str
    handler: Handler
    #: /command/<name> needs Basic auth (the legacy /?command= form always does).
    auth: bool = True


class WebServer:
    def __init__(self, host: "Host", ingest: "Ingest", pool: "LuaPool") -> None:
        self._host = host
        self._ingest = ingest
        self._pool = pool
        self._commands: dict[str, Command] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self._http: Server | None = None
        self._internal: Server | None = None
        for command in (
            Command("report", "POST", self._report),
            Command("stats", "GET", self._stats),
            Command("readyz", "GET", self._readyz, auth=False),
        ):
            self.add_command(command)
        self._host.register_command("livez")  # a fixed path, but counted like a command

    # ---- set-up -------------------------------------------------------------------------

    def add_command(self, command: Command) -> None:
        """Register a command; a custom endpoint of the same name shadows a built-in."""
        self._commands[command.name.lower()] = command
        self._host.register_command(command.name)

    def add_custom_endpoint(self, name: str) -> None:
        self.add_command(Command(name, "POST", lambda request: self._custom(request, name)))

    async def start(self, listeners: list[Listener], sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        self._http = Server(
            self._handle,
            request_factory=sized_requests(self._body_limit),
            access_log=None,
            keepalive_timeout=60.0,
        )
        self._host.metrics.set_connection_source(lambda: len(self._http.connections) if self._http else 0)
        for listener, sock in zip(listeners, sockets):
            context = tls_context(listener) if listener.tls else None
            server = await loop.create_server(
                limited(self._http, lambda: self._host.settings.max_conns), sock=sock, ssl=context
            )
            self._servers.append(server)
        if listeners:
            log.logger.info("Starting webserver")

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for http in (self._http, self._internal):
            if http:
                await http.shutdown(2.0)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()


    def _body_limit(self) -> int:
        return self._host.settings.body_limit

    # ---- dispatch ---------------------------------------------------------------------

    async def start_internal(self, path: str) -> None:
        """Serve requests proxied by the web workers on a Unix socket only they can reach.

        The worker already applied the ACL; it passes the client's address in a header, which is
        trusted on this socket alone, so auth logs and `ip` fields still name the real client.
        """
        loop = asyncio.get_running_loop()
        self._internal = Server(
            self._handle_internal, request_factory=sized_requests(self._body_limit), access_log=None,
        )
        server = await loop.create_unix_server(self._internal, path=path)
        os.chmod(path, 0o600)
        self._servers.append(server)

    async def _handle_internal(self, request: web.BaseRequest) -> web.StreamResponse:
        ip, _, port = request.headers.get(PEER_HEADER, "").partition(" ")
        return await self._serve(request, ip, int(port or 0))

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ip, port = (peer[0], peer[1]) if peer else ("", 0)
        return await self._serve(request, ip, port)

    async def _serve(self, request: web.BaseRequest, ip: str, port: int) -> web.StreamResponse:
        if not self._host.settings.acl.match_ip(ip):
            return json_response(
                401, {"status": "failure", "reason": "Source IP Address not in ACL", "ip": ip},
                headers={"Connection": "close"},
            )
        try:
            return await self._route(request, ip, port)
        except HTTPRequestEntityTooLarge:
            self._host.metrics.report_rejected("too_large")
            return failure(413, f"Request body larger than {self._host.settings.body_limit} bytes")
        except Exception as exc:  # a daemon fault: still answer JSON, and say so in the log
            log.logger.exception("Internal error handling %s %s", request.method, request.path)
            return failure(500, f"internal error: {type(exc).__name__}")

    async def _route(self, request: web.BaseRequest, ip: str, port: int) -> web.StreamResponse:
        path, query = split_target(request.raw_path)
        lower = path.lower()
        method = "GET" if request.method == "HEAD" else request.method
        if lower.startswith("/command/"):
            if lower == "/command/livez":
                return self._livez(method)
            command = self._commands.get(lower[9:])
            if command is None or command.method != method:
                return failure(404, "Not found")
            if command.auth and not self._authorised(request, ip, port):
                return unauthorised()
            return await self._run(command, request)
        if path == "/":
            if method not in ("GET", "POST", "PUT", "DELETE"):
                return failure(405, "Method not allowed")
            if not self._authorised(request, ip, port):
                return unauthorised()
            name = legacy_command(query)
            command = self._commands.get(name.lower())
            if command is None or command.method != method or command.name != name:
                return failure(404, "Not found")
            return await self._run(command, request)
        if lower == "/metrics":
            if method != "GET":
                return failure(405, "Method not allowed")
            if not self._host.settings.metrics_no_password and not self._authorised(request, ip, port):
                return unauthorised()
            return web.Response(body=self._host.metrics.render(), headers={"Content-Type": METRICS_TYPE})
        return failure(404, "Not found")

    def _livez(self, method: str) -> web.Response:
        if method != "GET":
            return failure(405, "Method not allowed")
        self._host.count_command("livez")
        return web.Response(status=200, content_type="text/html", charset="utf-8")

    async def _run(self, command: Command, request: web.BaseRequest) -> web.Response:
        clock = self._host.clock
        started = clock.monotonic()
        try:
            return await command.handler(request)
        finally:
            elapsed = clock.monotonic() - started
            self._host.count_command(command.name)
            self._host.perf.record_response(elapsed)
            self._host.metrics.response_duration(elapsed)

    def _authorised(self, request: web.BaseRequest, ip: str, port: int) -> bool:
        if check_basic_auth(request.headers.get("Authorization", ""), self._host.settings.password):
            return True
        log_auth_failure(request.path, ip, port)
        return False

    # ---- commands ---------------------------------------------------------------------

    async def _report(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        host = self._host
        try:
            report = parse_report(body, host.clock.time())
            started = host.clock.monotonic()
            stored = self._ingest.submit(report, *delivery_of(request, body))
        except ReportError as exc:
            host.metrics.report_rejected(exc.reason)
            return bad_report(exc)
        try:
            await stored
        except Exception as exc:
            log.logger.error("Could not store report: %s", exc)
            return failure(500, f"could not store report: {exc}")
        host.metrics.append_duration(host.clock.monotonic() - started)
        return web.Response(body=OK_BODY, content_type=JSON_TYPE, charset="utf-8")

    async def _stats(self, _request: web.BaseRequest) -> web.Response:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return json_response(200, {
            "perfstats": self._host.perf.snapshot(),
            "reports": self._host.reports,
            "sys-msec": int(usage.ru_stime * 1000),
            "user-msec": int(usage.ru_utime * 1000),
            "uptime": int(self._host.uptime()),
        })

    async def _readyz(self, _request: web.BaseRequest) -> web.Response:
        failing = self._host.eventlog.failure if self._host.eventlog is not None else None
        if failing is not None:  # e.g. a full disk: every report would get a 500
            return failure(503, f"the event log cannot be written: {failing.error}",
                           since=failing.since)
        return web.Response(status=200, content_type=JSON_TYPE, charset="utf-8")

    async def _custom(self, request: web.BaseRequest, name: str) -> web.Response:
        body = await request.read()
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return json_response(400, {"success": False, "reason": f"body is not valid JSON: {exc}"})
        attrs, attrs_mv = endpoint_attrs(doc)
        try:
            ok, result = await self._pool.run(
                f"custom:{name}", lambda state: self._call_endpoint(state, name, attrs, attrs_mv)
            )
        except EndpointError as exc:
            self._host.lua_error(f"custom:{name}", str(exc))
            return json_response(500, {"success": False, "reason": str(exc)})
        self._host.metrics.lua_calls("custom")
        return json_response(200, {"r_attrs": result, "success": ok})

    def _call_endpoint(
        self, state: "LuaState", name: str, attrs: dict, attrs_mv: dict
    ) -> tuple[bool, dict[str, str]]:
        """Runs in a worker thread: call the state's endpoint function and check what it gave."""
        fn = state.endpoints.get(name)
        if fn is None:
            return False, {}
        args = state.table({"attrs": attrs, "attrs_mv": attrs_mv})
        results = protected_call(state, fn, args)
        if not results[0]:
            raise EndpointError(str(results[1]))
        if len(results) < 3 or not isinstance(results[1], bool):
            raise EndpointError(
                f"custom endpoint [{name}] must return a boolean and a table of strings"
            )
        try:
            return results[1], string_map(results[2], "result")
        except TypeError as exc:
            raise EndpointError(f"custom endpoint [{name}] returned a bad table: {exc}") from None


def bind_listeners(listeners: list[Listener]) -> list[socket.socket]:
    """Bind every listener now (before any fork), so a busy port is a clear start-up error."""
    sockets = []
    for listener in listeners:
        family = socket.AF_INET6 if listener.address.isIPv6() else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((listener.address.tostring(), listener.address.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"Unable to bind webserver to {listener.address}: {exc.strerror}") from exc
        sock.listen(1024)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def socket_addresses(sockets: list[socket.socket]) -> list[str]:
    """`ip:port` of listening sockets, ephemeral ports resolved (for logs and systemd STATUS)."""
    return [endpoint_text(*sock.getsockname()[:2]) for sock in sockets]


class EndpointError(Exception):
    """A custom endpoint failed; the message goes into the 500 body and the log."""


class _Refuse(asyncio.Protocol):
    """Over the connection limit: close at once, as the C++ daemon's framework does."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def sized_requests(limit: Callable[[], int]) -> Callable[..., web.BaseRequest]:
    """An aiohttp request factory whose body limit is read per request (413 above it)."""

    def factory(message, payload, protocol, writer, task) -> web.BaseRequest:  # type: ignore[no-untyped-def]
        return web.BaseRequest(
            message, payload, protocol, writer, task, asyncio.get_running_loop(),
            client_max_size=limit(),
        )

    return factory


def limited(http: Server, limit: Callable[[], int]) -> Callable[[], asyncio.Protocol]:
    """A protocol factory for `http` that refuses connections beyond `limit()` open ones
    (read per connection, so a change of the limit applies at once)."""

    def factory() -> asyncio.Protocol:
        if len(http.connections) >= limit():
            return _Refuse()
        return http()

    return factory


def log_auth_failure(path: str, ip: str, port: int) -> None:
    log.logger.error(
        'WforceWebserver: HTTP(S) Request "%s" from %s: Web Authentication failed',
        path, endpoint_text(ip, port),
    )


def unauthorised() -> web.Response:
    return json_response(
        401, {"status": "failure", "reason": "Unauthorized"},
        headers={"WWW-Authenticate": 'basic realm="wforce"'},
    )


def split_target(target: str) -> tuple[str, str]:
    """Path and query of a request target, without building a URL object for every report."""
    if not target.startswith("/"):  # absolute-form target (through a proxy)
        target = "/" + target.split("://", 1)[-1].partition("/")[2]
    path, _, query = target.partition("?")
    if "%" in path:
        path = urllib.parse.unquote(path)
    return path, query


def legacy_command(query: str) -> str:
    """The `command` parameter of the legacy `/?command=X` form (empty when missing)."""
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key == "command":
            return value
    return ""


def check_basic_auth(header: str, password: str) -> bool:
    """Only the password counts (the user name is ignored), and an unset password never matches.

    Unlike the C++ daemon, a password may contain `:` (everything after the first one is the
    password) and an empty user name is fine.
    """
    if not password or header[:6].lower() != "basic ":
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=False).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    _user, sep, given = decoded.partition(":")
    return bool(sep) and given == password


def endpoint_attrs(doc: Any) -> tuple[dict[str, str], dict[str, list[str]]]:
    """A custom endpoint's `attrs`, split as the C++ daemon does (other value types dropped)."""
    attrs = doc.get("attrs") if isinstance(doc, dict) else None
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    if isinstance(attrs, dict):
        for key, value in attrs.items():
            if isinstance(value, str):
                single[key] = value
            elif isinstance(value, list):
                multi[key] = [v if isinstance(v, str) else "" for v in value]
    return single, multi


_TLS_VERSIONS = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def tls_context(listener: Listener) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(listener.cert_file, listener.key_file)
    for name, value in listener.options.items():
        if name == "MinProtocol" and value in _TLS_VERSIONS:
            context.minimum_version = max(_TLS_VERSIONS[value], ssl.TLSVersion.TLSv1_2)
        elif name == "CipherString":
            context.set_ciphers(value)
        else:
            log.logger.warning(
                "addListener(): TLS option %s=%s is not supported here and is ignored "
                "(supported: MinProtocol=TLSv1.2|TLSv1.3, CipherString)", name, value,
            )
    return context
