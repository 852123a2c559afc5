"""A web worker process: serves the REST API on the shared listening sockets.

Why: one Python process tops out near 10,000 reports/s because the event loop, the log writer and
the Lua states share one GIL, and HTTP handling alone costs ~35 µs a request. A worker does the
expensive per-request part (HTTP, ACL, auth, parsing, validation) on its own core and hands the
validated report to the core process, which appends it to the log (group commit) and answers
with its seq; only then does the worker send the 200. Every other request (stats, custom
endpoints, metrics, ...) is proxied to the core's own handler, so there is one implementation of
them and one set of Lua states.

Started by `trackalert.frontend.supervisor` as `python -m trackalert.frontend.worker`, with the
listening sockets and its end of a socketpair passed as file descriptors.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import signal
import socket
import sys
from typing import Any, Callable, Mapping, Sequence

import aiohttp
import yarl
from aiohttp import web

from trackalert import log
from trackalert.clock import RealClock
from trackalert.frontend import ipc
from trackalert.frontend.accept import ConnectionCounts, SharedAccept
from trackalert.frontend.lean import LeanServer
from trackalert.frontend.report_row import Handed, hand_over
from trackalert.ingest import Handover
from trackalert.netaddr import NetmaskGroup, endpoint_text, parse_combo
from trackalert.report import ReportError
from trackalert.settings import Listener
from trackalert.web import (
    DELIVERY_HEADER,
    JSON_TYPE,
    OK_BODY,
    PEER_HEADER,
    JsonServer,
    bad_report,
    check_basic_auth,
    failure,
    is_report,
    json_response,
    log_auth_failure,
    origin_form,
    request_failed,
    route,
    signature_problem,
    signature_refusal,
    tls_context,
    unauthorised,
)

#: Request headers not forwarded to the core (hop-by-hop, or set by the proxy itself).
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
#: Response headers relayed back to the client.
_RELAYED = ("Content-Type", "WWW-Authenticate", "Connection")


#: What a report waiting for the core is told when the core process is gone.
GONE = "the trackalert core process is gone"
#: Called once the core answered an append: None (stored) or why it could not store it.
Stored = Callable[[str | None], None]


class StatsBuffer:
    """What this worker measured since the last flush; the core merges it into its statistics."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.reports = 0
        self.durations: list[float] = []
        self.append_durations: list[float] = []
        self.rejected: dict[str, int] = {}

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def drain(self, connections: int) -> dict[str, Any]:
        delta = {
            "reports": self.reports, "durations": self.durations,
            "append_durations": self.append_durations, "rejected": self.rejected,
            "connections": connections,
        }
        self._reset()
        return delta


class CoreLink:
    """The socketpair to the core: appends out, acknowledgements and settings in."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, Stored] = {}
        self._channel: ipc.Channel | None = None
        self.settings: dict[str, Any] = {}
        self.settings_changed = asyncio.Event()
        self.closed = asyncio.Event()

    async def connect(self, sock: socket.socket) -> None:
        self._channel = await ipc.open_channel(sock, self._on_message)

    def send(self, message: tuple[Any, ...]) -> None:
        if self._channel is not None:
            self._channel.send(message)

    def append(
        self, fields: tuple[Any, ...], delivery_id: str | None, fingerprint: bytes | None, done: "Stored"
    ) -> None:
        """Have the core store a report; `done(None)` once it did, `done(why)` if it could not
        (or is gone). A callback, not a future: the answer to a report is written in the very
        pass that reads the core's acknowledgement, with no task or future per report.
        `done` is never called from within this call."""
        if self.closed.is_set():
            asyncio.get_running_loop().call_soon(done, GONE)
            return
        request_id = next(self._ids)
        self._pending[request_id] = done
        self.send((ipc.APPEND, request_id, fields, delivery_id, fingerprint))

    def close(self) -> None:
        """Flush what is queued (the last statistics) and close the channel."""
        if self._channel is not None:
            self._channel.close()

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == ipc.STORED:
            pending = self._pending
            for request_id in message[1]:
                done = pending.pop(request_id, None)
                if done is not None:
                    self._answer(done, None)
        elif kind == ipc.APPENDED:
            done = self._pending.pop(message[1], None)
            if done is not None:
                self._answer(done, message[4])
        elif kind == ipc.SETTINGS:
            self.settings = message[1]
            self.settings_changed.set()

    @staticmethod
    def _answer(done: Stored, error: str | None) -> None:
        try:
            done(error)
        except Exception:  # one broken answer must not stop the others in this read
            log.logger.exception("Answering a stored report failed")

    async def run(self) -> None:
        """Wait for the channel to close, then fail whatever is still waiting on the core."""
        assert self._channel is not None
        await self._channel.closed.wait()
        self.closed.set()
        pending, self._pending = self._pending, {}
        for done in pending.values():
            done(GONE)


class WorkerWeb:
    """The request handler of a worker: reports locally, everything else through the core.

    Connections start on the lean path (`frontend.lean`, which serves plain reports through
    the `admits`/`submit`/`answer` methods below); whatever it does not serve itself is handed
    to aiohttp with `handle` as the handler, as every request was before.
    """

    def __init__(self, link: CoreLink, proxy_path: str, index: int) -> None:
        self._link = link
        self._index = index
        self._accept: SharedAccept | None = None
        self._clock = RealClock()
        self._stats = StatsBuffer()
        self._acl = NetmaskGroup()
        self._handover = Handover()  # enriches and encodes for the core
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=proxy_path), auto_decompress=False
        )
        self.http: JsonServer | None = None
        self.lean: LeanServer | None = None
        self.apply_settings()

    def apply_settings(self) -> None:
        self._acl = NetmaskGroup(self._link.settings.get("acl", ()))
        # What the lean path decided for the same input under the same settings, which the
        # lean path asks for every report (one client address, one target, one password).
        self._admitted_ips: dict[str, bool] = {}
        self._good_credentials: set[str] = set()

    @property
    def _settings(self) -> dict[str, Any]:
        return self._link.settings

    def listen(self, fds: list[int]) -> None:
        """Serve on the listening sockets the core passed down, with the core's TLS settings,
        taking this worker's share of the connection limit (see `frontend.accept`)."""
        self.http = JsonServer(self.handle, self._body_limit, self._timeouts)
        self.lean = LeanServer(self, self.http, self._body_limit, self._timeouts)
        counts = ConnectionCounts(self._settings["connections_path"])
        self._accept = SharedAccept(
            self._index, counts, self._max_conns, self.lean, self.lean.has_idle, self.lean.evict_idle,
            lambda: self._timeouts()[0],
        )
        for fd, (tls, cert_file, key_file, options) in zip(fds, self._settings["listeners"]):
            listener = Listener(parse_combo("0.0.0.0"), tls, cert_file, key_file, options)
            self._accept.listen(socket.socket(fileno=fd), tls_context(listener) if tls else None)

    def stop_listening(self) -> None:
        if self._accept is not None:
            self._accept.close()

    def _body_limit(self) -> int:
        return int(self._settings["body_limit"])

    def _timeouts(self) -> tuple[float, float]:
        return float(self._settings["read_timeout"]), float(self._settings["idle_timeout"])

    def _max_conns(self) -> int:
        return int(self._settings["max_conns"])

    def stats_delta(self) -> dict[str, Any]:
        return self._stats.drain(len(self.lean.connections) if self.lean else 0)

    async def shutdown(self, timeout: float) -> None:
        if self.lean is not None:
            await self.lean.shutdown(timeout)

    async def close(self) -> None:
        await self._session.close()

    # ---- the lean path's report service (frontend.lean.ReportService) -------------------

    def now(self) -> float:
        return self._clock.monotonic()

    def admits(self, target: str, ip: str, authorization: str) -> bool:
        if self._settings.get("report_shadowed") or not _is_report_target(target):
            return False
        admitted = self._admitted_ips.get(ip)
        if admitted is None:
            admitted = self._remember(self._admitted_ips, ip, self._acl.match_ip(ip))
        return admitted and self._authorised(authorization)

    def _authorised(self, authorization: str) -> bool:
        """`check_basic_auth`, remembering the credentials that passed: a set lookup hashes
        the header (keyed, randomised hash) and compares only on a hash match, so its timing
        tells a guess nothing about how close it came, as the constant-time check promises."""
        if authorization in self._good_credentials:
            return True
        if not check_basic_auth(authorization, self._settings.get("password", "")):
            return False
        if len(self._good_credentials) >= _REMEMBERED:
            self._good_credentials.clear()
        self._good_credentials.add(authorization)
        return True

    @staticmethod
    def _remember(cache: dict[str, bool], key: str, value: bool) -> bool:
        if len(cache) >= _REMEMBERED:
            cache.clear()
        cache[key] = value
        return value

    def submit(self, body: bytes, headers: Mapping[bytes, bytes], done: Stored) -> float | None:
        signature = headers.get(b"x-wforce-signature")
        if signature_problem(body, signature.decode("ascii") if signature is not None else None,
                             self._settings["report_secrets"]):
            return None
        delivery_header = headers.get(b"x-wforce-delivery")
        try:
            handed = self._hand(body, delivery_header.decode("ascii") if delivery_header is not None else None)
        except ReportError:  # aiohttp's path answers it with its reason
            return None
        return self._append(handed, done)

    def _hand(self, body: bytes, delivery_header: str | None) -> Handed:
        return hand_over(body, self._clock.time(), delivery_header, self._handover, self._settings)

    def answer(self, error: str | None, started: float, appended: float) -> tuple[int, bytes]:
        if error is None:  # `_stored` and `_count` of a stored report, on one clock reading
            now, stats = self._clock.monotonic(), self._stats
            stats.append_durations.append(now - appended)
            stats.reports += 1
            stats.durations.append(now - started)
            return 200, OK_BODY
        response = self._stored(error, appended)
        self._count(started)
        assert response is not None
        return response.status, bytes(response.body)

    def timed_out(self, started: float) -> None:
        self._count(started)

    def _append(self, handed: Handed, done: Stored) -> float:
        """Hand the enriched, encoded report (`Handover`) to the core; when that started (for
        the append duration)."""
        started = self._clock.monotonic()
        self._link.append(*handed, done)
        return started

    def _stored(self, error: str | None, appended: float) -> web.Response | None:
        """None once the core stored the report, else the 500 that says why (logged)."""
        if error is not None:
            log.logger.error("Could not store report: %s", error)
            return failure(500, f"could not store report: {error}")
        self._stats.append_durations.append(self._clock.monotonic() - appended)
        return None

    def _count(self, started: float) -> None:
        self._stats.reports += 1
        self._stats.durations.append(self._clock.monotonic() - started)

    # ---- aiohttp's path ---------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ip, port = (peer[0], peer[1]) if peer else ("", 0)
        if not self._acl.match_ip(ip):
            return json_response(
                401, {"status": "failure", "reason": "Source IP Address not in ACL", "ip": ip},
                headers={"Connection": "close"},
            )
        try:
            if self._is_report(request):
                return await self._report(request, ip, port)
            return await self._proxy(request, ip, port)
        except Exception as exc:
            return request_failed(request, exc, self._body_limit(), self._stats.reject)

    def _is_report(self, request: web.BaseRequest) -> bool:
        if request.method != "POST" or self._settings.get("report_shadowed"):
            return False
        return is_report(route(request.raw_path))

    async def _report(self, request: web.BaseRequest, ip: str, port: int) -> web.Response:
        if not check_basic_auth(request.headers.get("Authorization", ""), self._settings.get("password", "")):
            log_auth_failure(request.path, ip, port)
            return unauthorised()
        started = self._clock.monotonic()
        stats = self._stats
        try:
            body = await request.read()
            refusal = signature_refusal(request, body, self._settings["report_secrets"], endpoint_text(ip, port))
            if refusal is not None:
                stats.reject("signature")
                return refusal
            try:
                handed = self._hand(body, request.headers.get(DELIVERY_HEADER))
            except ReportError as exc:
                stats.reject(exc.reason)
                return bad_report(exc)
            stored: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            appended = self._append(handed, lambda error: stored.done() or stored.set_result(error))
            refusal = self._stored(await stored, appended)
            if refusal is not None:
                return refusal
            return web.Response(body=OK_BODY, content_type=JSON_TYPE, charset="utf-8")
        finally:
            self._count(started)

    async def _proxy(self, request: web.BaseRequest, ip: str, port: int) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        headers[PEER_HEADER] = f"{ip} {port}"
        body = await request.read()
        async with self._session.request(
            request.method, core_url(request.raw_path), headers=headers, data=body, allow_redirects=False,
        ) as response:
            payload = await response.read()
            relayed = {k: response.headers[k] for k in _RELAYED if k in response.headers}
            return web.Response(status=response.status, body=payload, headers=relayed)


#: How many client addresses, targets and credentials the lean path's decisions remember.
_REMEMBERED = 1024


@functools.lru_cache(maxsize=_REMEMBERED)
def _is_report_target(target: str) -> bool:
    return is_report(route(target))


def core_url(raw_target: str) -> yarl.URL:
    """The core's URL for a request target, byte for byte: no dot segments resolved, nothing
    after a `#` dropped, no re-quoting, so the core routes exactly what the client sent."""
    path, sep, query = origin_form(raw_target).partition("?")
    return yarl.URL.build(
        scheme="http", host="trackalert-core", path=path, query_string=query if sep else "", encoded=True
    )


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    link = CoreLink()
    await link.connect(socket.socket(fileno=args.ipc_fd))
    link_task = asyncio.create_task(link.run())
    link.send((ipc.HELLO, args.index))
    await asyncio.wait(
        [asyncio.create_task(link.settings_changed.wait()), link_task],
        return_when=asyncio.FIRST_COMPLETED,
    )
    if not link.settings:
        return 1
    worker = WorkerWeb(link, link.settings["proxy_path"], args.index)
    worker.listen(args.listen_fds)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    tasks = [
        asyncio.create_task(_watch_settings(link, worker)),
        asyncio.create_task(_flush_stats(link, worker)),
    ]
    await asyncio.wait(
        [asyncio.create_task(stop.wait()), link_task], return_when=asyncio.FIRST_COMPLETED
    )
    worker.stop_listening()
    await worker.shutdown(2.0)
    link.send((ipc.STATS, worker.stats_delta()))
    for task in tasks:
        task.cancel()
    await worker.close()
    link.close()
    return 0


async def _watch_settings(link: CoreLink, worker: WorkerWeb) -> None:
    while True:
        await link.settings_changed.wait()
        link.settings_changed.clear()
        worker.apply_settings()


async def _flush_stats(link: CoreLink, worker: WorkerWeb, every: float = 0.5) -> None:
    while True:
        await asyncio.sleep(every)
        if not link.closed.is_set():
            link.send((ipc.STATS, worker.stats_delta()))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trackalert-web-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--ipc-fd", type=int, required=True)
    parser.add_argument("--listen-fds", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    ipc.add_log_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return ipc.run_child(parse_args(sys.argv[1:] if argv is None else argv), serve)


if __name__ == "__main__":
    raise SystemExit(main())
