"""The lean HTTP/1.1 path of a web worker: the report request, served without aiohttp.

Why: a web worker spends its time on one request, wforce's report webhook, and aiohttp's server
machinery (request objects, header multidicts, stream readers, a task per request) cost ~46 µs
of CPU per request on the 2-core test machine, against ~8 µs for a protocol that finds the head
with C-speed byte searches (measured side by side, medians of 3 rounds: aiohttp Application 52,
aiohttp's low-level `web.Server` 46, aiohttp's C parser in a plain protocol 11, httptools 6.2,
this 8.0 µs per request). httptools is a little cheaper but tells no byte offsets, and offsets are
what makes the split below safe; aiohttp's parser is an internal API with its own stream readers.

The split: a connection starts here. A request that is a plain, well-formed report this path can
serve exactly as aiohttp would (`parse_head`: POST of a report target, HTTP/1.1, ASCII headers,
one Content-Length within the body limit, no Transfer-Encoding, Content-Encoding, Expect or
Upgrade, no repeated header), from an address the ACL admits, with valid credentials, a valid
signature and a valid body, is answered here. Anything else is handed, from the first byte of
that request, to aiohttp (`JsonRequestHandler`, with the worker's full handler), which serves
the connection from then on: errors, other commands, chunked bodies, HTTP/1.0 all keep exactly
today's behaviour, because it is today's code that answers them. Nothing irrevocable (a log
line, a count, an append) happens here before that decision, so a handed-over request is served
once, by aiohttp alone. A head still arriving goes over as soon as it cannot become one this
path takes (`may_become_head`), so what aiohttp refuses early is refused as early. Requests are
served one at a time, in order, so pipelined requests are answered in order, including across
the hand-over (it waits for the answers before it).

Two deliberate differences, both where aiohttp loses requests: aiohttp answers a parser error
in one read of the socket in place of every request completed in that read (a report followed,
in the same packet, by a malformed request got the 400 and was not stored); here each request
gets its own answer. And after a request with `Connection: close`, further data in the same
packet made aiohttp refuse that request too; here it is answered and the rest ignored, as RFC
9112 §9.6 says.

What this path answers itself matches aiohttp's bytes (a test compares them): 200
`{"status":"ok"}`, 500 when the core could not store the report, and the 408 of the read
timeout (`setWebserverReadTimeout`: a request must arrive whole within it, counted from its
first byte, or from the connection for the first one; still in its head, the connection is
just closed). As in aiohttp, the idle timeout (from the connection, or from the last answer)
closes a connection that has not sent a whole head by then, idle or trickling.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Callable, Mapping, Protocol

from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_protocol import RequestHandler

from trackalert import log
from trackalert.netaddr import endpoint_text
from trackalert.web import JsonRequestHandler, JsonServer, ReadTimeout, unreadable

#: Longest head served here (aiohttp's own line limit); a longer one is aiohttp's to answer (431).
MAX_HEAD = 8190
#: Most header lines served here (aiohttp refuses more than 128).
MAX_HEADERS = 100
#: While a request waits for the core, at most this much of the next ones is read ahead.
READ_AHEAD = 64 * 1024

_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TARGET_CHAR = rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]"
_FIELD_LINE = _TCHAR + rb"+:[\t\x20-\x7e]*\r\n"
_REQUEST_LINE = rb"POST (/" + _TARGET_CHAR + rb"*) HTTP/1\.1\r\n"
#: A report's head as this path takes it: origin-form target of RFC 3986 characters, header
#: values of visible ASCII, space and tab. Every such head is one aiohttp's parser accepts too.
_HEAD = re.compile(_REQUEST_LINE + rb"(?:" + _FIELD_LINE + rb")*\r\n")


def _prefixes(atoms: list[bytes]) -> bytes:
    """A pattern for every prefix of what the pattern atoms, one after the other, match."""
    pattern = b""
    for atom in reversed(atoms):
        pattern = atom + (b"(?:" + pattern + b")?" if pattern else b"")
    return b"(?:" + pattern + b")?"


#: What a head still arriving may hold: whole lines of a head above, then the start of a line.
_HEAD_LINES = re.compile(_REQUEST_LINE + rb"(?:" + _FIELD_LINE + rb")*")
_REQUEST_LINE_START = re.compile(_prefixes(
    [re.escape(bytes([c])) for c in b"POST /"] + [_TARGET_CHAR + b"*"]
    + [re.escape(bytes([c])) for c in b" HTTP/1.1\r"]))
_FIELD_LINE_START = re.compile(_TCHAR + rb"*(?::[\t\x20-\x7e]*)?\r?")
#: From the end of the target to the first header: " HTTP/1.1\r\n".
_AFTER_TARGET = 11
#: Headers whose meaning this path does not implement: a request with one goes to aiohttp.
_NOT_HERE = frozenset({
    b"transfer-encoding", b"content-encoding", b"expect", b"upgrade", b"sec-websocket-key1",
})
_JSON_TYPE = b"application/json; charset=utf-8"
_SERVER = SERVER_SOFTWARE.encode()


class ReportService(Protocol):
    """What the lean path needs from the worker: the decisions and the append of a report."""

    def now(self) -> float:
        """The monotonic clock the service measures request durations with."""

    def admits(self, target: str, ip: str, authorization: str) -> bool:
        """Whether a report to `target` from `ip` with these credentials may be served here
        (no side effect: what is refused here is refused, logged and counted by aiohttp's path)."""

    def submit(
        self, body: bytes, headers: Mapping[bytes, bytes], done: Callable[[str | None], None]
    ) -> float | None:
        """Hand a valid report to the core, which calls `done` (later) with None once it is
        stored, else why not; the time the append started. None: not valid, nothing done
        (aiohttp's path answers it)."""

    def answer(self, error: str | None, started: float, appended: float) -> tuple[int, bytes]:
        """Status and JSON body once the core answered (counts the report)."""

    def timed_out(self, started: float) -> None:
        """A report's body did not arrive within the read timeout (counts the report)."""


class Head:
    """The parsed head of a report this path serves."""

    __slots__ = ("target", "headers", "length", "close", "started", "appended")

    def __init__(self, target: str, headers: dict[bytes, bytes], length: int, close: bool) -> None:
        self.target = target
        self.headers = headers
        self.length = length
        self.close = close
        self.started = 0.0
        self.appended = 0.0


def parse_head(data: bytes | bytearray, end: int, body_limit: int) -> Head | None:
    """The head `data[:end]` (through its blank line) if this path can serve it, else None."""
    if end > MAX_HEAD:
        return None
    match = _HEAD.fullmatch(data, 0, end)
    if match is None:
        return None
    # The pattern vouched for every line ("token:value"), so splitting is exact (and cheaper
    # than capturing each field): values lose the blanks around them, as in aiohttp.
    lines = bytes(data[match.end(1) + _AFTER_TARGET:end - 4]).split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.lower()] = value.strip(b" \t")
    if len(headers) != len(lines) or len(lines) > MAX_HEADERS or b"host" not in headers:
        return None
    if not _NOT_HERE.isdisjoint(headers):
        return None
    length = headers.get(b"content-length", b"")
    if not length.isdigit() or len(length) > 10 or int(length) >= body_limit:
        return None
    connection = headers.get(b"connection", b"keep-alive").lower()
    if connection not in (b"keep-alive", b"close"):
        return None
    return Head(match.group(1).decode("ascii"), headers, int(length), connection == b"close")


def may_become_head(data: bytes | bytearray) -> bool:
    """Whether `data`, a head without its blank line yet, may still become one `parse_head`
    takes. If not, aiohttp gets it at once: its parser may refuse it before the head ends (an
    unknown method, a control character), and then answers at once, so must we."""
    first = data.find(b"\r\n")
    if first < 0:
        return _REQUEST_LINE_START.fullmatch(data) is not None
    last = data.rfind(b"\r\n")
    return (_HEAD_LINES.fullmatch(data, 0, last + 2) is not None
            and _FIELD_LINE_START.fullmatch(data, last + 2) is not None)


class _DateCache:
    """The Date header, formatted once a second (as aiohttp does), and the responses rendered
    with it: nearly every answer is the same 200, so it is rendered once a second too."""

    def __init__(self) -> None:
        self._second = -1
        self._text = b""
        self._responses: dict[tuple[int, bytes, bool], bytes] = {}

    def responses(self) -> tuple[bytes, dict[tuple[int, bytes, bool], bytes]]:
        """This second's Date text and the responses rendered with it."""
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._text = formatdate(second, usegmt=True).encode()
            self._responses = {}
        return self._text, self._responses


_date = _DateCache()
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
#: Most distinct responses kept for the current second (500s carry the core's error text).
_RENDERED = 16


def render(status: int, body: bytes, close: bool) -> bytes:
    """A JSON response, byte for byte as aiohttp writes it (but the Date)."""
    date, responses = _date.responses()
    key = (status, body, close)
    response = responses.get(key)
    if response is None:
        if len(responses) >= _RENDERED:
            responses.clear()
        response = responses[key] = (
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\nServer: %s\r\n%s\r\n%s"
            % (status, _REASONS[status], _JSON_TYPE, len(body), date, _SERVER,
               b"Connection: close\r\n" if close else b"", body)
        )
    return response


class LeanServer:
    """The protocol factory of a worker's connections and the registry the connection limit,
    the statistics and shutdown need (aiohttp's `Server` plays that part for its own)."""

    def __init__(
        self,
        service: ReportService,
        fallback: JsonServer,
        body_limit: Callable[[], int],
        timeouts: Callable[[], tuple[float, float]],
    ) -> None:
        self.service = service
        self.fallback = fallback
        self.body_limit = body_limit
        self.timeouts = timeouts
        self.closing = False
        #: Insertion order is age: the oldest idle connection is the first idle one.
        self.connections: dict[LeanConnection, None] = {}

    def __call__(self, released: Callable[[], None]) -> "LeanConnection":
        """A protocol for a new connection; `released()` when it ends (frontend.accept)."""
        return LeanConnection(self, released)

    def has_idle(self) -> bool:
        return self._oldest_idle() is not None

    def evict_idle(self) -> bool:
        """Close the oldest idle keep-alive connection, to make room at the connection limit."""
        connection = self._oldest_idle()
        if connection is not None:
            connection.force_close()
        return connection is not None

    def _oldest_idle(self) -> "LeanConnection | None":
        for connection in self.connections:
            if connection.idle():
                return connection
        return None

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections at once, let the others finish their request for up to
        `timeout`, then close whatever is left (aiohttp's own shutdown does the same)."""
        self.closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for connection in list(self.connections):
            if connection.idle():
                connection.force_close()
        while any(c.busy() for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self.fallback.shutdown(max(0.0, deadline - loop.time()))
        for connection in list(self.connections):
            connection.force_close()


class LeanConnection(asyncio.Protocol):
    """One client connection; see the module docstring for what it serves itself."""

    def __init__(self, server: LeanServer, released: Callable[[], None]) -> None:
        self._server = server
        self._released = released
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._ip, self._port = "", 0
        self._buffer: bytes | bytearray = b""
        self._scanned = 0  # how much of the buffer is known not to hold the end of the head
        self._head: Head | None = None
        self._body_start = 0
        self._pending = False  # a complete request waits for the core
        self._fallback: RequestHandler | None = None
        self._read_paused = False
        # The two deadlines of aiohttp's connections (loop time; None: not running). The read
        # deadline: the current request must be whole by then (from its first byte, or from
        # the connection for the first one). The idle deadline: the next request's head must
        # be whole by then (from the connection, or from the last answer). One timer serves
        # both, moved lazily: a request costs no timer of its own.
        self._read_at: float | None = None
        self._idle_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        read_timeout, self._idle_timeout = server.timeouts()
        self._read_timeout = read_timeout if read_timeout > 0 else None

    # ---- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as aiohttp: no Nagle
        peer = transport.get_extra_info("peername")
        if peer:
            self._ip, self._port = peer[0], peer[1]
        self._server.connections[self] = None
        now = self._loop.time()
        self._set_deadlines(self._read_deadline(now), now + self._idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self._fallback is not None:
            self._fallback.data_received(data)
            return
        if not self._buffer:
            self._buffer = data
            if not self._pending and self._read_at is None:  # the first byte of a request
                self._set_deadlines(self._read_deadline(self._loop.time()), self._idle_at)
        else:
            if type(self._buffer) is bytes:
                self._buffer = bytearray(self._buffer)
            self._buffer += data  # type: ignore[operator]
        if not self._pending:
            self._advance()
        elif len(self._buffer) > READ_AHEAD and not self._read_paused:
            self._pause_reading()

    def eof_received(self) -> bool | None:
        if self._fallback is None and self._buffer and not self._pending:
            self._hand_over()  # a request cut short: aiohttp says what it says to that
        if self._fallback is not None:
            return self._fallback.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._server.connections.pop(self, None)
        self._cancel_timer()
        try:
            if self._fallback is not None:
                self._fallback.connection_lost(exc)
        finally:
            self._released()

    def pause_writing(self) -> None:
        if self._fallback is not None:
            self._fallback.pause_writing()
        elif not self._read_paused:  # a client that does not read its answers: stop reading
            self._pause_reading()

    def resume_writing(self) -> None:
        if self._fallback is not None:
            self._fallback.resume_writing()
        elif self._read_paused:
            self._resume_reading()

    # ---- state, for the registry ------------------------------------------------------

    def idle(self) -> bool:
        """Kept alive between requests, with no byte of the next one yet."""
        if self._fallback is not None:
            return isinstance(self._fallback, JsonRequestHandler) and self._fallback.idle()
        return not self._pending and not self._buffer and self._read_at is None

    def busy(self) -> bool:
        """Waiting for the core to store a report (shutdown lets that finish)."""
        return self._pending

    def force_close(self) -> None:
        if self._fallback is not None:
            self._fallback.force_close()
        elif self._transport is not None:
            self._transport.close()

    # ---- serving ------------------------------------------------------------------------

    def _advance(self) -> None:
        """Serve the complete requests at the front of the buffer, one at a time."""
        server = self._server
        while self._buffer and not self._pending and self._fallback is None:
            buffer = self._buffer
            head = self._head
            if head is None:
                end = buffer.find(b"\r\n\r\n", self._scanned)
                if end < 0:
                    if len(buffer) > MAX_HEAD or not may_become_head(buffer):
                        self._hand_over()  # aiohttp's to answer, as soon as it would
                    else:
                        self._scanned = max(0, len(buffer) - 3)
                    return
                head = parse_head(buffer, end + 4, server.body_limit())
                if head is None or not server.service.admits(
                    head.target, self._ip, head.headers.get(b"authorization", b"").decode("ascii")
                ):
                    self._hand_over()
                    return
                head.started = server.service.now()
                self._head, self._body_start = head, end + 4
                self._idle_at = None  # a whole head: the connection is not idle any more
            stop = self._body_start + head.length
            if len(buffer) < stop:
                return  # the rest of the body is on its way
            appended = server.service.submit(bytes(buffer[self._body_start:stop]), head.headers, self._stored)
            if appended is None:
                self._hand_over()
                return
            head.appended = appended
            self._consume(stop)
            self._pending = True
            self._read_at = None  # the request is whole: no deadline while the core stores it

    def _consume(self, size: int) -> None:
        buffer = self._buffer
        if size == len(buffer):
            self._buffer = b""
        elif type(buffer) is bytes:
            self._buffer = bytearray(buffer[size:])
        else:
            del buffer[:size]  # type: ignore[union-attr]  # cheap at the front of a bytearray
        self._scanned = 0

    def _stored(self, error: str | None) -> None:
        head = self._head
        assert head is not None and self._pending
        self._head = None
        self._pending = False
        try:
            status, body = self._server.service.answer(error, head.started, head.appended)
        except BaseException:
            self.force_close()  # no answer to give: do not leave the client waiting for one
            raise
        if self._transport is None or self._transport.is_closing():
            return
        close = head.close or self._server.closing
        self._transport.write(render(status, body, close))
        if close:
            self._transport.close()
            return
        if self._read_paused:
            self._resume_reading()
        now = self._loop.time()
        # A pipelined request already begun gets its read time from now.
        self._set_deadlines(self._read_deadline(now) if self._buffer else None, now + self._idle_timeout)
        self._advance()

    def _hand_over(self) -> None:
        """From the first byte of the current request on, the connection is aiohttp's."""
        assert self._transport is not None
        self._cancel_timer()
        if self._read_paused:
            self._resume_reading()
        handler = self._server.fallback()
        self._fallback = handler
        handler.connection_made(self._transport)
        handler.resume_deadlines(self._read_at, self._idle_at)
        data, self._buffer, self._head = self._buffer, b"", None
        handler.data_received(bytes(data))

    def _pause_reading(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()
            self._read_paused = True

    def _resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()
        self._read_paused = False

    # ---- deadlines ----------------------------------------------------------------------

    def _read_deadline(self, now: float) -> float | None:
        return None if self._read_timeout is None else now + self._read_timeout

    def _set_deadlines(self, read_at: float | None, idle_at: float | None) -> None:
        self._read_at, self._idle_at = read_at, idle_at
        due = read_at if idle_at is None or (read_at is not None and read_at < idle_at) else idle_at
        if due is not None and (self._timer is None or self._timer_at > due):
            self._cancel_timer()
            self._timer_at = due
            self._timer = self._loop.call_at(due, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._transport is None or self._fallback is not None:
            return
        now, idle_at, read_at = self._loop.time(), self._idle_at, self._read_at
        if idle_at is not None and now >= idle_at and (read_at is None or idle_at <= read_at):
            self._transport.close()  # no whole head in time: aiohttp closes as silently
        elif read_at is not None and now >= read_at:
            self._read_timed_out()
        else:  # moved since this timer was set
            self._set_deadlines(self._read_at, self._idle_at)

    def _read_timed_out(self) -> None:
        """Today's rule, today's words: in the body, a 408; still in the head, just closed."""
        assert self._transport is not None
        timeout = self._read_timeout
        log.logger.info(
            "Closing a connection from %s: no whole request within %g s",
            endpoint_text(self._ip, self._port), timeout,
        )
        head = self._head
        if head is not None:
            self._server.service.timed_out(head.started)
            response = unreadable(ReadTimeout(f"no whole request within {timeout:g} s"), 0)
            assert response is not None and response.body is not None
            self._transport.write(render(response.status, bytes(response.body), True))
        self._transport.close()
