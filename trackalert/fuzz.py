"""Hostile requests for the report endpoint, and the promises the log must keep under them.

Shipped in the package, like `trackalert.testing`, so the very same seeded cases run in the test
suite (a few thousand), as a long benchmark-style run (`bench/fuzz.py`), and against an operator's
own staging daemon. Each case is a complete raw HTTP request: malformed framing and headers must be
answered by the daemon itself, not smoothed over by an HTTP client library.

The promises checked (issue "Nothing lost, nothing mixed up"): no 5xx; every error body is JSON;
nothing is stored for a 4xx; every report acknowledged with a 200 is stored exactly once, and an
exact retry (same delivery id, same body) is acknowledged without a second copy.

Every generated body that is a JSON object carries a unique ``"fuzz"`` member (an unknown field,
which the log keeps losslessly), so a stored event can be traced back to the case that sent it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    from trackalert.eventlog.base import EventLog

REPORT_PATH = "/command/report"
MARKER_FIELD = "fuzz"


@dataclass(frozen=True)
class Case:
    """One request: its raw bytes and what the checks need to know about it."""

    index: int
    kind: str
    raw: bytes
    #: The ``"fuzz"`` member the daemon sees if it parses the body as it was sent; None if absent.
    marker: str | None
    #: Index of the case whose request this one repeats byte for byte (a wforce retry).
    retry_of: int | None = None
    #: A well-formed body under valid credentials: anything but a 200 is a failure.
    must_succeed: bool = False


@dataclass(frozen=True)
class Outcome:
    case: Case
    status: int
    content_type: str
    body: bytes


@dataclass
class Verdict:
    """What a run showed: counts for the note, and every broken promise with its case."""

    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    stored: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        return (f"{self.sent} requests ({codes}); {self.stored} events stored; "
                f"{len(self.problems)} problems")


# --------------------------------------------------------------------------- generation


class _Builder:
    """Builds the cases of one seeded run; `rng` decides everything, so a seed replays exactly."""

    def __init__(self, seed: int, password: str) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        token = base64.b64encode(f"wforce:{password}".encode()).decode()
        self.auth = f"Authorization: Basic {token}".encode()
        self.cases: list[Case] = []
        self._retryable: list[int] = []

    # -- bodies

    def marker(self) -> str:
        return f"s{self.seed}-c{len(self.cases)}"

    def report(self, marker: str) -> dict[str, Any]:
        rng = self.rng
        doc: dict[str, Any] = {
            "login": rng.choice(["alice", "bob", "carol@example.com", "dave", "ünï"]),
            "remote": rng.choice(["192.0.2.1", "198.51.100.7", "2001:db8::1", "::ffff:192.0.2.9"]),
            "success": rng.random() < 0.5,
            "pwhash": f"{rng.getrandbits(48):012x}",
            "t": rng.choice([1700000000, 1700000000.25]),
            MARKER_FIELD: marker,
        }
        if rng.random() < 0.5:
            doc["attrs"] = {"service": "imap", "groups": ["a", "b"]}
            doc["device_attrs"] = {"os.family": "Linux"}
            doc["protocol"], doc["tls"] = "imap", True
            doc["device_id"] = "A1 ID (\"name\" \"Thunderbird\")"
        return doc

    def hostile_body(self, marker: str) -> tuple[str, bytes]:
        """A body meant to be refused (or, for mutations, maybe accepted): (kind, bytes)."""
        rng = self.rng
        base = self.report(marker)
        text = json.dumps(base)
        choice = rng.randrange(16)
        if choice == 0:
            depth = rng.choice([200, 1000, 5000, 100000])
            return "deep", (text[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}").encode()
        if choice == 1:
            digits = rng.choice([4301, 5000, 20000])
            where = rng.choice(["t", "x"])
            return "bigint", _with(text, where, "9" * digits)
        if choice == 2:
            return "bigfloat", _with(text, "t", rng.choice(["1" + "0" * 400, "1e309", "-1e400"]))
        if choice == 3:
            return "constant", _with(text, rng.choice(["t", "x"]),
                                     rng.choice(["NaN", "Infinity", "-Infinity"]))
        if choice == 4:
            field_name = rng.choice(["login", "pwhash", "device_id", "x"])
            return "surrogate", _with(text, field_name, '"\\ud800"')
        if choice == 5:
            return "surrogate-key", (text[:-1] + ', "\\udfff": 1}').encode()
        if choice == 6:
            return "attr-surrogate", (text[:-1] + ', "attrs": {"k\\udc00": "v"}}').encode()
        if choice == 7:
            field_name, value = rng.choice([
                ("login", "1"), ("success", '"yes"'), ("t", '"now"'), ("attrs", "[]"),
                ("attrs", '{"k": 1}'), ("device_attrs", '{"k": ["v"]}'), ("remote", "null"),
                ("tls", "1"), ("remote", '"300.1.2.3"'), ("remote", '"not an address"'),
            ])
            return "wrong-type", _with(text, field_name, value)
        if choice == 8:
            raw = bytearray(text.encode())
            raw[rng.randrange(len(raw))] = rng.choice([0xFF, 0xC0, 0x80, 0xED])
            return "bad-utf8", bytes(raw)
        if choice == 9:
            return "truncated", text.encode()[: rng.randrange(len(text))]
        if choice == 10:
            return "not-object", rng.choice([b"[]", b'"report"', b"42", b"null", b"", b" ",
                                             b"\xef\xbb\xbf{}", b"{}{}", b"\x00"])
        if choice == 11:
            return "nul", _with(text, "login", '"a\\u0000b"')
        if choice == 12:
            return "long-string", _with(text, "login", json.dumps("x" * rng.choice([10, 70000])))
        return "mutated", self.mutate(text.encode())

    def mutate(self, raw: bytes) -> bytes:
        data = bytearray(raw)
        for _ in range(self.rng.randrange(1, 4)):
            position = self.rng.randrange(len(data) + 1)
            action = self.rng.randrange(3)
            if action == 0 and data:
                del data[min(position, len(data) - 1)]
            elif action == 1:
                data.insert(position, self.rng.choice(b'{}[]",:\\0e-+.\x00\xff'))
            elif data:
                data[min(position, len(data) - 1)] = self.rng.randrange(256)
        return bytes(data)

    # -- requests

    def request(self, body: bytes, headers: Iterable[bytes] = (), *, method: bytes = b"POST",
                path: bytes = REPORT_PATH.encode(), auth: bool = True,
                framing: str = "length") -> bytes:
        lines = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close",
                 b"Content-Type: application/json"]
        if auth:
            lines.append(self.auth)
        lines.extend(headers)
        if framing == "length":
            lines.append(b"Content-Length: %d" % len(body))
            payload = body
        elif framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked")
            payload = _chunked(body, self.rng)
        elif framing == "bad-chunked":
            lines.append(b"Transfer-Encoding: chunked")
            payload = b"zz\r\n" + body + b"\r\n0\r\n\r\n"
        elif framing == "both":
            lines.append(b"Content-Length: %d" % len(body))
            lines.append(b"Transfer-Encoding: chunked")
            payload = _chunked(body, self.rng)
        else:
            raise ValueError(framing)
        return b"\r\n".join(lines) + b"\r\n\r\n" + payload

    def delivery_header(self) -> tuple[str, bytes | None, bool]:
        """(kind, header line or None, whether an exact repeat of the request is a retry)."""
        rng = self.rng
        choice = rng.randrange(10)
        if choice < 4:
            return "id", b"X-Wforce-Delivery: %d-%d" % (self.seed, len(self.cases)), True
        if choice < 6:  # wforce's ids collide: one microsecond, one hook, one event name
            return "shared-id", b"X-Wforce-Delivery: 1700000000123456-1-report", True
        if choice == 6:
            return "empty-id", b"X-Wforce-Delivery:", False
        if choice == 7:
            return "blank-id", b"X-Wforce-Delivery:   ", False
        if choice == 8:
            return "binary-id", b"X-Wforce-Delivery: \xff\xfe\x80id", False
        return "no-id", None, False

    def add(self, kind: str, raw: bytes, marker: str | None, *, must_succeed: bool = False,
            retryable: bool = False, retry_of: int | None = None) -> None:
        self.cases.append(Case(len(self.cases), kind, raw, marker, retry_of, must_succeed))
        if retryable:
            self._retryable.append(len(self.cases) - 1)

    def one(self) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.08 and self._retryable:
            original = self.cases[rng.choice(self._retryable)]
            self.add("retry", original.raw, original.marker, retry_of=original.index,
                     must_succeed=original.must_succeed)
            return
        marker = self.marker()
        id_kind, id_line, retryable = self.delivery_header()
        headers = [id_line] if id_line is not None else []
        if roll < 0.40:
            body = json.dumps(self.report(marker)).encode()
            framing = "chunked" if rng.random() < 0.2 else "length"
            self.add(f"valid/{id_kind}", self.request(body, headers, framing=framing), marker,
                     must_succeed=id_kind != "binary-id", retryable=retryable)
        elif roll < 0.80:
            kind, body = self.hostile_body(marker)
            self.add(f"{kind}/{id_kind}", self.request(body, headers), _marker_of(body),
                     retryable=retryable)
        else:
            self.protocol_case(marker, headers)

    def protocol_case(self, marker: str, headers: list[bytes]) -> None:
        """Malformed HTTP around a valid body: framing, methods, headers, credentials."""
        rng = self.rng
        body = json.dumps(self.report(marker)).encode()
        choice = rng.randrange(10)
        if choice == 0:
            raw = self.request(body, headers + [b"X-Big: " + b"a" * rng.choice([8200, 20000])])
            kind = "big-header"
        elif choice == 1:
            raw = self.request(body, headers, method=rng.choice([b"post", b"FOO", b"P\x00ST"]))
            kind = "method"
        elif choice == 2:
            raw = self.request(body, headers, framing="both")
            kind = "cl-and-te"
        elif choice == 3:
            raw = self.request(body, headers, framing="bad-chunked")
            kind = "bad-chunks"
        elif choice == 4:
            raw = self.request(body, headers + [b"X-Ctl: a\x01b\x7fc"])
            kind = "control-chars"
        elif choice == 5:
            raw = self.request(body, headers, auth=False)
            kind = "no-auth"
        elif choice == 6:
            raw = self.request(body, headers + [b"Authorization: Basic !!!" + self.auth[21:]],
                               auth=False)
            kind = "bad-auth"
        elif choice == 7:
            raw = self.request(body, headers, path=rng.choice(
                [b"/command/nope", b"/command/report/x", b"/%ff", b"/command/rep%00ort", b"*"]))
            kind = "path"
        elif choice == 8:
            raw = self.request(body, headers)[:-rng.randrange(1, len(body))]  # body cut short
            kind = "short-body"
        else:
            raw = self.request(body, headers + [b"Content-Length: 5"])
            kind = "two-lengths"
        self.add(kind, raw, marker)


def _with(text: str, name: str, value: str) -> bytes:
    """`text` (a JSON object) with member `name` set to the raw JSON `value`."""
    doc = json.loads(text)
    doc[name] = "\0placeholder\0"
    return json.dumps(doc).replace('"\\u0000placeholder\\u0000"', value).encode()


def _chunked(body: bytes, rng: random.Random) -> bytes:
    out, position = bytearray(), 0
    while position < len(body):
        size = rng.randrange(1, 200)
        piece = body[position:position + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        position += size
    return bytes(out + b"0\r\n\r\n")


def _marker_of(body: bytes) -> str | None:
    """The marker the daemon would find in `body`, if it is a JSON object with one."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    value = doc.get(MARKER_FIELD) if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def generate(seed: int, count: int, password: str) -> list[Case]:
    """`count` cases, the same ones for the same seed."""
    builder = _Builder(seed, password)
    while len(builder.cases) < count:
        builder.one()
    return builder.cases


# --------------------------------------------------------------------------- sending


async def send(host: str, port: int, raw: bytes, timeout: float = 30.0,
               half_close: bool = False) -> tuple[int, str, bytes]:
    """Send one raw request on its own connection; (status, content type, body) of the answer.

    The request says ``Connection: close``, so the answer ends where the daemon closes. With
    `half_close` the client also shuts its side after sending, as one that gives up mid-body.
    Status 0 means the daemon closed the connection without an answer.
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(raw)
        try:
            await writer.drain()
            if half_close:
                writer.write_eof()
        except (ConnectionError, OSError):
            pass  # the daemon answered and closed before taking it all (e.g. 431)
        answer = await asyncio.wait_for(_read_all(reader), timeout)
    finally:
        writer.close()
    return _parse_answer(answer)


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(-1)
    except (ConnectionError, OSError):
        return b""


def _parse_answer(answer: bytes) -> tuple[int, str, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines or not lines[0].startswith(b"HTTP/"):
        return 0, "", answer
    status = int(lines[0].split()[1])
    content_type, length = "", None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-type":
            content_type = value.strip().decode("latin-1")
        elif name == b"content-length":
            length = int(value.strip())
    return status, content_type, body if length is None else body[:length]


async def run(host: str, port: int, cases: list[Case], concurrency: int = 16,
              progress: Callable[[int], None] | None = None, keep_alive: bool = False) -> list[Outcome]:
    """Send every case over `concurrency` parallel clients; outcomes in case order.

    Each case has a connection of its own, unless `keep_alive`: then each client sends its cases
    one after the other on one connection, without their ``Connection: close``, as wforce's
    connection pool does, and opens a new one when the daemon closes it (after an error, say).
    Every kind of request then also arrives after others on the same connection, where a server
    that misreads where a request ends answers the next one wrongly.
    """
    outcomes: list[Outcome | None] = [None] * len(cases)
    pending = iter(cases)

    async def worker() -> None:
        connection = _Connection(host, port)
        try:
            for case in pending:
                if keep_alive and case.kind != "short-body":
                    status, content_type, body = await connection.exchange(_kept_alive(case.raw))
                else:
                    status, content_type, body = await send(
                        host, port, case.raw, half_close=case.kind == "short-body")
                outcomes[case.index] = Outcome(case, status, content_type, body)
                if progress is not None:
                    progress(case.index)
        finally:
            connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [o for o in outcomes if o is not None]


def _kept_alive(raw: bytes) -> bytes:
    return raw.replace(b"\r\nConnection: close\r\n", b"\r\n", 1)


class _Connection:
    """A client connection used for one request after another."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self._host, self._port, self._timeout = host, port, timeout
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def exchange(self, raw: bytes) -> tuple[int, str, bytes]:
        """(status, content type, body) of the answer to `raw` (status 0: closed without one).
        A kept connection the daemon closed before this request (idle) is opened anew, once."""
        for reused in (self._streams is not None, False):
            if self._streams is None:
                self._streams = await asyncio.wait_for(
                    asyncio.open_connection(self._host, self._port), self._timeout)
            reader, writer = self._streams
            writer.write(raw)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                pass  # answered and closed before taking it all (e.g. 431)
            answer, closing = await asyncio.wait_for(_read_one(reader), self._timeout)
            if closing:
                self.close()
            if answer or not reused:
                return _parse_answer(answer)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


async def _read_one(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """One response (head and Content-Length body) and whether the connection is done with."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial, True
    except (ConnectionError, OSError, asyncio.LimitOverrunError):
        return b"", True
    length, closing = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"connection":
            closing = value.strip().lower() == b"close"
    try:
        return head + await reader.readexactly(length), closing
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        return head, True


# --------------------------------------------------------------------------- checking


async def stored_markers(eventlog: "EventLog", page: int = 5000) -> list[str | None]:
    """The ``fuzz`` member of every event in the log, in log order (None where there is none)."""
    markers: list[str | None] = []
    after = 0
    while events := await eventlog.read(after, page):
        for event in events:
            value = event.report.extra.get(MARKER_FIELD)
            markers.append(value if isinstance(value, str) else None)
        after = events[-1].seq
    return markers


async def markers_in_sqlite(path: "str | os.PathLike[str]") -> list[str | None]:
    """`stored_markers` of a SQLite log file whose daemon has stopped."""
    from trackalert.clock import RealClock
    from trackalert.eventlog.sqlite import SQLiteEventLog

    eventlog = SQLiteEventLog(path, RealClock())
    await eventlog.open()
    try:
        return await stored_markers(eventlog)
    finally:
        await eventlog.close()


def check(outcomes: list[Outcome], stored_markers: list[str | None]) -> Verdict:
    """Hold the outcomes against the log's contents (the ``fuzz`` member of every stored event)."""
    verdict = Verdict(sent=len(outcomes), stored=len(stored_markers))
    acked: Counter = Counter()
    for outcome in outcomes:
        case = outcome.case
        verdict.statuses[outcome.status] += 1
        verdict.kinds[case.kind.split("/")[0]] += 1
        _check_answer(outcome, verdict.problems)
        if outcome.status == 200 and case.retry_of is None:
            acked[case.marker] += 1
    _check_retries(outcomes, verdict.problems)
    stored = Counter(stored_markers)
    for marker in set(acked) | set(stored):
        if stored[marker] != acked[marker]:
            verdict.problems.append(
                f"marker {marker!r}: acknowledged {acked[marker]} time(s), stored {stored[marker]}")
    expected = sum(1 for o in outcomes if o.status == 200 and o.case.retry_of is None)
    if len(stored_markers) != expected:
        verdict.problems.append(
            f"{len(stored_markers)} events stored for {expected} acknowledged reports")
    return verdict


def _check_answer(outcome: Outcome, problems: list[str]) -> None:
    case, status = outcome.case, outcome.status
    where = f"case {case.index} ({case.kind})"
    if status == 0 and case.kind == "short-body":
        return  # the client half-closed mid-body: going away without an answer is fair
    if status == 0 or status >= 500:
        problems.append(f"{where}: answered {status or 'nothing'}: {outcome.body[:200]!r}")
        return
    if case.must_succeed and status != 200:
        problems.append(f"{where}: a good report got {status}: {outcome.body[:200]!r}")
    if not outcome.content_type.startswith("application/json"):
        problems.append(f"{where}: {status} with content type {outcome.content_type!r}")
    try:
        json.loads(outcome.body.decode("utf-8"))
    except ValueError:
        problems.append(f"{where}: {status} body is not JSON: {outcome.body[:200]!r}")


def _check_retries(outcomes: list[Outcome], problems: list[str]) -> None:
    """An exact retry of an acknowledged report is acknowledged too (and, above, not stored)."""
    by_index = {o.case.index: o for o in outcomes}
    for outcome in outcomes:
        original = outcome.case.retry_of
        if original is None or by_index[original].status != 200:
            continue
        if outcome.status != 200:
            problems.append(f"case {outcome.case.index}: retry of acknowledged case {original} "
                            f"got {outcome.status}")
