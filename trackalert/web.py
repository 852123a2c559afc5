"""The REST API: wforce's report webhook in, the event log append, and the operator's endpoints.

A report's path is short on purpose: ACL, auth, `parse_report`, `EventLog.append`, 200. The
policy runs later, from the log, so wforce's 2 s webhook timeout only ever waits for the append.
Every error body is valid JSON (the C++ daemon concatenated raw error text into some of them).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import resource
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_exceptions import HTTPRequestEntityTooLarge
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
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
SIGNATURE_HEADER = "X-Wforce-Signature"
DELIVERY_HEADER = "X-Wforce-Delivery"
#: Where a request keeps its client's `ip:port` text (for log lines of the handlers).
PEER_KEY = "trackalert.peer"
OK_BODY = b'{"status":"ok"}'
#: The methods some route takes (a 405 must say so).
ALLOWED_METHODS = "GET, HEAD, POST, PUT, DELETE"
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


def delivery_of(header: str | None, body: bytes) -> tuple[str | None, bytes | None]:
    """The delivery id (from the `X-Wforce-Delivery` header) and the body fingerprint that
    together tell a retry (DESIGN §3)."""
    delivery = parse_delivery_id(header)
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
        self._http = JsonServer(self._handle, self._body_limit, self._timeouts)
        self._host.metrics.set_connection_source(lambda: len(self._http.connections) if self._http else 0)
        for listener, sock in zip(listeners, sockets):
            context = tls_context(listener) if listener.tls else None
            server = await loop.create_server(
                limited(self._http, lambda: self._host.settings.max_conns), sock=sock, ssl=context,
                ssl_handshake_timeout=self._host.settings.read_timeout if context else None,
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

    def _timeouts(self) -> tuple[float, float]:
        settings = self._host.settings
        return settings.read_timeout, settings.idle_timeout

    # ---- dispatch ---------------------------------------------------------------------

    async def start_internal(self, path: str) -> None:
        """Serve requests proxied by the web workers on a Unix socket only they can reach.

        The worker already applied the ACL; it passes the client's address in a header, which is
        trusted on this socket alone, so auth logs and `ip` fields still name the real client.
        """
        loop = asyncio.get_running_loop()
        self._internal = JsonServer(self._handle_internal, self._body_limit, self._timeouts)
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
        request[PEER_KEY] = endpoint_text(ip, port)
        try:
            return await self._route(request, ip, port)
        except Exception as exc:
            return request_failed(request, exc, self._host.settings.body_limit, self._host.metrics.report_rejected)

    async def _route(self, request: web.BaseRequest, ip: str, port: int) -> web.StreamResponse:
        target = route(request.raw_path)
        method = "GET" if request.method == "HEAD" else request.method
        if target.kind == "livez":
            return self._livez(method)
        if target.kind == "command":
            command = self._commands.get(target.name)
            if command is None or command.method != method:
                return failure(404, "Not found")
            if command.auth and not self._authorised(request, ip, port):
                return unauthorised()
            return await self._run(command, request)
        if target.kind == "legacy":
            if method not in ("GET", "POST", "PUT", "DELETE"):
                return failure(405, "Method not allowed")
            if not self._authorised(request, ip, port):
                return unauthorised()
            command = self._commands.get(target.name.lower())
            if command is None or command.method != method or command.name != target.name:
                return failure(404, "Not found")
            return await self._run(command, request)
        if target.kind == "metrics":
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
        refusal = signature_refusal(request, body, host.settings.report_secrets, request[PEER_KEY])
        if refusal is not None:
            host.metrics.report_rejected("signature")
            return refusal
        try:
            report = parse_report(body, host.clock.time())
            started = host.clock.monotonic()
            stored = self._ingest.submit(report, *delivery_of(request.headers.get(DELIVERY_HEADER), body))
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


class ReadTimeout(Exception):
    """A client did not send its whole request within the read timeout."""


class JsonRequestHandler(RequestHandler):
    """aiohttp's connection protocol, with JSON error bodies and a deadline for each request.

    aiohttp answers what its parser rejects (a header over 8,190 bytes, an unknown method,
    Content-Length with Transfer-Encoding, bad chunk framing, ...) from `handle_error` in
    text/plain; every error body the daemon sends is JSON, so that is the place to change it.
    A client that trickles its headers or body in would hold its connection (and a slot under
    `setMaxWebserverConns`) for ever: a request must arrive whole within the read timeout of
    its first byte (or of the connection, for the first one), else it gets a 408 and is closed.
    """

    def __init__(self, manager: Server, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._read_timeout = read_timeout
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_read_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.body_received()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        request = self._current_request
        if request is None:  # the first bytes of a request (not of a pipelined one)
            self._arm_read_timer()
        queued = len(self._messages)
        super().data_received(data)
        if request is not None and len(self._messages) > queued and not request.content.is_eof():
            # The parser failed in the body being read (bad chunk framing in a later packet):
            # aiohttp queues the error for the next request and leaves this body hanging.
            error = getattr(self._messages[-1][0], "exc", None)
            if isinstance(error, HttpProcessingError):
                self._fail_body(request, error)

    def _fail_body(self, request: web.BaseRequest, exc: Exception) -> None:
        """Make the handler's read of the body raise `exc`; close once it has answered."""
        self.skip_lingering()
        request.content.set_exception(exc)

    def skip_lingering(self) -> None:
        """Close right after the response, without reading the rest of the body first."""
        self._lingering_time = 0.0

    def track_body(self, payload: StreamReader) -> None:
        """Called when a request's headers are in: its deadline ends with its body."""
        payload.on_eof(self.body_received)

    def body_received(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def idle(self) -> bool:
        """Kept alive between requests, with no byte of the next one yet."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and self._read_timer is None and not self._messages

    def resume_deadlines(self, read_at: float | None, idle_at: float | None) -> None:
        """Taking over a connection whose current request started earlier (the lean path of a
        web worker handed it over): it keeps the deadlines it had (loop times, None for none),
        rather than new ones from now."""
        self.body_received()
        if read_at is not None:
            self._read_timer = self._loop.call_at(read_at, self._read_timed_out)
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        if idle_at is not None:
            self._next_keepalive_close_time = idle_at
            self._keepalive_handle = self._loop.call_at(idle_at, self._process_keepalive)

    def _arm_read_timer(self) -> None:
        if self._read_timer is None and self._read_timeout > 0:
            self._read_timer = self._loop.call_later(self._read_timeout, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        request = self._current_request
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.logger.info(
            "Closing a connection from %s: no whole request within %g s",
            endpoint_text(*peer[:2]) if peer else "?", self._read_timeout,
        )
        if request is not None and not request.content.is_eof():
            self._fail_body(request, ReadTimeout(f"no whole request within {self._read_timeout:g} s"))
        else:  # still in the headers: nothing to answer to
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        status, reason = http_error(status, exc, message)
        log.logger.debug("Bad HTTP request from %s: %d %s", request.remote, status, reason)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; no room for the error")
        response = failure(status, reason)
        if status == 405:
            response.headers["Allow"] = ALLOWED_METHODS
        response.force_close()
        return response


class JsonServer(Server):
    """aiohttp's low-level server with `JsonRequestHandler` connections; the body limit, read
    timeout and keep-alive timeout are read for each connection, so a change applies at once."""

    def __init__(
        self,
        handler: Handler,
        body_limit: Callable[[], int],
        timeouts: Callable[[], tuple[float, float]],
    ) -> None:
        super().__init__(handler, access_log=None)
        self._body_limit = body_limit
        self._timeouts = timeouts

    def __call__(self) -> RequestHandler:
        read_timeout, idle_timeout = self._timeouts()
        return JsonRequestHandler(
            self, read_timeout, loop=self._loop, keepalive_timeout=idle_timeout, **self._kwargs
        )

    def evict_idle(self) -> bool:
        """Close the oldest idle keep-alive connection, if there is one, to make room for a new
        one at the connection limit (as nginx reuses idle connections): idle connections must
        not hold every slot for the idle timeout."""
        handler = self._oldest_idle()
        if handler is not None:
            handler.force_close()
        return handler is not None

    def has_idle(self) -> bool:
        return self._oldest_idle() is not None

    def _oldest_idle(self) -> JsonRequestHandler | None:
        for handler in self._connections:
            if isinstance(handler, JsonRequestHandler) and handler.idle():
                return handler
        return None

    def _make_request(self, message, payload, protocol, writer, task) -> web.BaseRequest:  # type: ignore[no-untyped-def]
        if isinstance(protocol, JsonRequestHandler):
            protocol.track_body(payload)
        return web.BaseRequest(
            message, payload, protocol, writer, task, self._loop, client_max_size=self._body_limit()
        )


def http_error(status: int, exc: BaseException | None, message: str | None = None) -> tuple[int, str]:
    """The status and JSON reason for a request aiohttp could not parse or serve."""
    if isinstance(exc, LineTooLong) or (exc is not None and "Too many headers" in str(exc)):
        return 431, "Request header fields too large: " + error_text(exc)
    if isinstance(exc, BadHttpMethod) and "HTTPS" not in str(exc):
        return 405, "Method not allowed: " + error_text(exc)
    if status >= 500:
        return status, "internal error" if exc is None else f"internal error: {type(exc).__name__}"
    return status, "Bad request: " + (error_text(exc) if exc is not None else message or "")


def error_text(exc: BaseException) -> str:
    """One line of text for an HTTP error, safe to encode (parser messages quote raw bytes)."""
    cause = exc if isinstance(exc, HttpProcessingError) else exc.__cause__
    text = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
    return " ".join(str(text).split()).encode("utf-8", "backslashreplace").decode("utf-8")


def unreadable(exc: Exception, body_limit: int) -> web.Response | None:
    """The JSON answer to a request whose body could not be read (None: not the client's fault)."""
    if isinstance(exc, HTTPRequestEntityTooLarge):
        return failure(413, f"Request body larger than {body_limit} bytes")
    if isinstance(exc, ReadTimeout):
        response = failure(408, f"Request timeout: {exc}")
    elif isinstance(exc, ConnectionResetError):  # the client left mid-body: no one to answer
        response = failure(400, "Bad request: the connection was lost")
    elif isinstance(exc, (HttpProcessingError, RequestPayloadError)):
        response = failure(400, "Bad request: " + error_text(exc))
    else:
        return None
    response.force_close()
    return response


def limited(http: JsonServer, limit: Callable[[], int]) -> Callable[[], asyncio.Protocol]:
    """A protocol factory for `http` that refuses connections beyond `limit()` open ones, unless
    an idle one can make room (the limit is read per connection, so a change applies at once)."""

    def factory() -> asyncio.Protocol:
        if len(http.connections) >= limit() and not http.evict_idle():
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


@dataclass(frozen=True)
class Target:
    """Where a request target leads: `command` (/command/<name>, name lowercased), `legacy`
    (/?command=<name>, name as given), `livez`, `metrics` or `none`."""

    kind: str
    name: str = ""


def route(raw_target: str) -> Target:
    """The one routing rule of both modes (reference §3.2): the target exactly as the client
    sent it, percent-decoded, with no dot segments resolved and no fragment dropped."""
    path, query = split_target(raw_target)
    lower = path.lower()
    if lower == "/command/livez":
        return Target("livez")
    if lower.startswith("/command/"):
        return Target("command", lower[9:])
    if path == "/":
        return Target("legacy", legacy_command(query))
    if lower == "/metrics":
        return Target("metrics")
    return Target("none")


def is_report(target: Target) -> bool:
    return target.kind in ("command", "legacy") and target.name == "report"


def request_failed(
    request: web.BaseRequest, exc: Exception, body_limit: int, reject: Callable[[str], None]
) -> web.Response:
    """The JSON answer when serving a request raised: the client's fault (4xx) or ours (500)."""
    response = unreadable(exc, body_limit)
    if response is None:  # a daemon fault: still answer JSON, and say so in the log
        log.logger.exception("Internal error handling %s %s", request.method, request.path)
        return failure(500, f"internal error: {type(exc).__name__}")
    if response.status == 413:
        reject("too_large")
    elif isinstance(request.protocol, JsonRequestHandler):
        request.protocol.skip_lingering()  # the rest of a broken body is not worth waiting for
    return response


def split_target(target: str) -> tuple[str, str]:
    """Path and query of a request target, without building a URL object for every report."""
    path, _, query = origin_form(target).partition("?")
    if "%" in path:
        path = urllib.parse.unquote(path)
    return path, query


def origin_form(target: str) -> str:
    """A request target as path and query (an absolute-form one, sent through a proxy, cut)."""
    if target.startswith("/"):
        return target
    return "/" + target.split("://", 1)[-1].partition("/")[2]


def legacy_command(query: str) -> str:
    """The `command` parameter of the legacy `/?command=X` form (empty when missing)."""
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key == "command":
            return value
    return ""


def check_basic_auth(header: str, password: str) -> bool:
    """Only the password counts (the user name is ignored), and an unset password never matches.

    Unlike the C++ daemon, a password may contain `:` (everything after the first one is the
    password) and an empty user name is fine. The credentials must be strict base64 (no
    whitespace or junk around them), and the password is compared in constant time, so the
    answer's timing tells nothing about how much of a guess was right.
    """
    if not password or header[:6].lower() != "basic ":
        return False
    try:
        decoded = base64.b64decode(header[6:], validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII header
        return False
    _user, sep, given = decoded.partition(b":")
    return hmac.compare_digest(given, password.encode()) and bool(sep)


def signature_problem(body: bytes, signature: str | None, secrets: Sequence[str]) -> str | None:
    """Why `signature` does not prove that wforce sent `body` (None: it does, or no secret is set).

    wforce signs each webhook body with the webhook's `secret`: `X-Wforce-Signature` is
    base64(HMAC-SHA256(secret, body)). Each secret is tried (rotation), in constant time.
    """
    if not secrets:
        return None
    if not signature:
        return f"Missing {SIGNATURE_HEADER}"
    try:
        given = base64.b64decode(signature, validate=True)
    except ValueError:
        given = b""
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(hmac.new(secret.encode(), body, hashlib.sha256).digest(), given)
    return None if matched else f"Wrong {SIGNATURE_HEADER}"


def signature_refusal(
    request: web.BaseRequest, body: bytes, secrets: Sequence[str], peer: str
) -> web.Response | None:
    """The 401 for a report whose signature is missing or wrong (logged), else None."""
    problem = signature_problem(body, request.headers.get(SIGNATURE_HEADER), secrets)
    if problem is None:
        return None
    log.logger.error('WforceWebserver: HTTP(S) Request "%s" from %s: %s', request.path, peer, problem)
    return failure(401, problem)


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
