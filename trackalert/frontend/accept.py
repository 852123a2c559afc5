"""How web workers share `setMaxWebserverConns` on the listening sockets they all hold.

Why: each worker used to accept whatever the kernel woke it for and close what went past its
limit/N, so a burst that landed on one worker was refused while another had free slots (with
limit 100 and 2 workers, 2-10 of 99 connections were refused; the issue measured 38). Here a
worker accepts only up to its share (the shares add up to the limit) and, at its share, leaves new
connections in the kernel's queue for a worker with room. Only when every worker is full, as the
counts they publish in a small shared file say, does it do what one process does past the limit:
close an idle keep-alive connection to make room, or else refuse the new one at once. Under its
share, a worker ahead of the others leaves new connections to them for a moment: every worker is
woken for each one, and the first awake would otherwise take a whole burst.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import ssl
from typing import Callable

from trackalert import log

#: How long a worker at its share waits before looking at the queue again (another worker,
#: woken for the same connection, normally takes it within this time).
PAUSE = 0.01
_SLOT = 8
#: How many more connections than the least loaded other worker one may hold before it leaves
#: new ones to the others (see `SharedAccept._ahead_of_others`).
BALANCE_SLACK = 1
#: How long it leaves them at most (the others may be busy on a loaded machine, or being replaced).
#: 10 ms was too short on a loaded 2-core machine: a burst of 128 landed up to 93 to 35 (the other
#: worker, descheduled for a few ms more, lost its turn); 50 ms is still one short wait per burst.
BALANCE_WAIT = 0.05
#: How long it stops watching the socket meanwhile. Short: while both workers were paused for
#: PAUSE (10 ms) in turn, nobody accepted, and clients that open a connection per request ran
#: 5.7x slower with two web processes (bench/fuzz.py, 64 connections: 24.3 s against 4.2 s).
BALANCE_PAUSE = 0.001
#: How long a full worker with no idle connection leaves a new connection, at the limit, to a
#: worker that has one to close for it before refusing it. One PAUSE (10 ms) was not enough: the
#: other worker may itself be paused for a PAUSE, or descheduled, and the connection was refused
#: (the idle keep-alive test failed 1 run in 3 on a loaded machine).
DEFER_WAIT = 5 * PAUSE
#: A deferral not looked at for this long belongs to an earlier connection: a new one starts its
#: own wait (else, after a quiet spell, a full worker refused at once a connection that a worker
#: with an idle connection would have taken).
STALE_WAIT = 2 * DEFER_WAIT


def create_counts(path: str, workers: int) -> "ConnectionCounts":
    """The core creates the file (zeroed) before it spawns the workers."""
    with open(path, "wb") as file:
        file.write(bytes(_SLOT * workers))
    return ConnectionCounts(path)


def share_of(limit: int, workers: int, index: int) -> int:
    """Worker `index`'s part of `limit`: the parts differ by at most one and add up to `limit`."""
    return limit // workers + (1 if index < limit % workers else 0)


class ConnectionCounts:
    """One 8-byte slot per worker, each written by its worker only, read by all."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        self._slots = memoryview(self._map).cast("q")

    def __len__(self) -> int:
        return len(self._slots)

    def set(self, index: int, count: int) -> None:
        self._slots[index] = count

    def get(self, index: int) -> int:
        return self._slots[index]

    def total(self) -> int:
        return sum(self._slots)


class SharedAccept:
    """Accepts for one worker, within its share; see the module docstring."""

    def __init__(
        self,
        index: int,
        counts: ConnectionCounts,
        limit: Callable[[], int],
        protocol_factory: Callable[[Callable[[], None]], asyncio.Protocol],
        has_idle: Callable[[], bool],
        evict_idle: Callable[[], bool],
        handshake_timeout: Callable[[], float],
    ) -> None:
        self._index = index
        self._counts = counts
        self._limit = limit
        self._factory = protocol_factory
        self._has_idle = has_idle
        self._evict_idle = evict_idle
        self._handshake_timeout = handshake_timeout
        self._deferred_since: float | None = None
        self._deferred_seen = 0.0
        self._yielded_since: float | None = None
        self._yield_seen = 0.0
        self._open = 0
        self._listeners: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        self._closed = False

    def listen(self, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        sock.setblocking(False)
        self._listeners.append((sock, context))
        self._watch(sock, context)

    def close(self) -> None:
        self._closed = True
        loop = asyncio.get_running_loop()
        for sock, _ in self._listeners:
            loop.remove_reader(sock.fileno())

    def opened(self) -> None:
        """A connection of this worker started (counted from accept to its end)."""
        self._open += 1
        self._counts.set(self._index, self._open)

    def closed(self) -> None:
        self._open -= 1
        self._counts.set(self._index, self._open)

    def _watch(self, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        if not self._closed:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, sock, context)

    def _readable(self, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        limit = self._limit()
        share = share_of(limit, len(self._counts), self._index)
        while True:
            full = self._open >= share
            if self._leave_to_others(limit) if full else self._ahead_of_others():
                loop = asyncio.get_running_loop()
                loop.remove_reader(sock.fileno())
                loop.call_later(PAUSE if full else BALANCE_PAUSE, self._watch, sock, context)
                return
            if not full:
                self._deferred_since = None
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, ...: try again a little later
                log.logger.error("Could not accept a REST connection: %s", exc)
                asyncio.get_running_loop().remove_reader(sock.fileno())
                asyncio.get_running_loop().call_later(PAUSE * 10, self._watch, sock, context)
                return
            if full and not self._evict_idle():  # every worker is full: refuse, as one process does
                conn.close()
                continue
            self.opened()
            asyncio.ensure_future(self._serve(conn, context))

    def _ahead_of_others(self) -> bool:
        """Under its share, should this worker leave a queued connection to a worker holding
        fewer? Yes for a moment: every worker is woken for a new connection and the first
        awake would otherwise take a whole burst (wrk's 128 connections landed 125 to 3 on two
        workers, leaving one worker's core idle while the other was loaded). If the others
        do not take it within BALANCE_WAIT (busy, or one is being replaced), this one does."""
        others = [self._counts.get(i) for i in range(len(self._counts)) if i != self._index]
        if not others or self._open <= min(others) + BALANCE_SLACK:
            self._yielded_since = None
            return False
        now = asyncio.get_running_loop().time()
        if self._yielded_since is None or now - self._yield_seen > 2 * PAUSE:
            self._yielded_since = now  # a new burst: the last one's wait is over
        self._yield_seen = now
        return now - self._yielded_since < BALANCE_WAIT

    def _leave_to_others(self, limit: int) -> bool:
        """At its share, should this worker leave the queued connections to the others? Yes if
        one has room; and, when all are full but this one has no idle connection to close for
        a new one, for a moment, so that a worker with an idle one takes it; then it refuses."""
        if self._counts.total() < limit:
            return True
        if self._has_idle():
            return False
        now = asyncio.get_running_loop().time()
        if self._deferred_since is None or now - self._deferred_seen > STALE_WAIT:
            self._deferred_since = now  # a new connection: the wait of an earlier one is over
        self._deferred_seen = now
        return now - self._deferred_since < DEFER_WAIT

    async def _serve(self, conn: socket.socket, context: ssl.SSLContext | None) -> None:
        """Hand an accepted socket to a protocol of the factory, which calls its argument when
        the connection ends: the slot is released once, whatever ends it."""
        conn.setblocking(False)
        release = _Once(self.closed)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: self._factory(release), conn, ssl=context,
                ssl_handshake_timeout=self._handshake_timeout() if context else None,
            )
        except Exception:  # a failed TLS handshake, a reset, ...: the protocol never started
            conn.close()
            release()


class _Once:
    def __init__(self, action: Callable[[], None]) -> None:
        self._action: Callable[[], None] | None = action

    def __call__(self) -> None:
        action, self._action = self._action, None
        if action is not None:
            action()
