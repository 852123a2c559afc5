"""The core's side of the web workers' channel: a group's answers reach each waiting report."""

from __future__ import annotations

import asyncio
import random
import socket

from trackalert.eventlog.base import Appended
from trackalert.frontend import ipc
from trackalert.frontend.supervisor import WebWorkers
from trackalert.frontend.worker import CoreLink


async def test_a_groups_answers_reach_each_report_stored_or_failed() -> None:
    """Groups of random size and random failures, answered out of order between groups: every
    report hears once, the stored ones None, the failed ones their own error's words."""
    rng = random.Random(9)
    core_sock, worker_sock = socket.socketpair()
    groups: asyncio.Queue[list[tuple]] = asyncio.Queue()
    core = await ipc.open_channel(core_sock, lambda message: None, groups.put_nowait)
    link = CoreLink()
    await link.connect(worker_sock)
    heard: dict[int, list[str | None]] = {}
    expected: dict[int, str | None] = {}
    reports = 2000
    for number in range(reports):
        link.append((None, (number,)), None, None, lambda error, n=number: heard.setdefault(n, []).append(error))
        if rng.random() < 0.05:
            await asyncio.sleep(0)  # a flush: the appends arrive in several groups
    received: list[list[tuple]] = []
    while sum(map(len, received)) < reports:
        received.append(await asyncio.wait_for(groups.get(), 5))
    rng.shuffle(received)
    answers = []
    for messages in received:
        assert all(message[0] == ipc.APPEND for message in messages)
        outcomes: list[Appended | Exception] = []
        for message in messages:
            number = message[2][1][0]
            if rng.random() < 0.1:
                outcomes.append(RuntimeError(f"disk full for {number}"))
                expected[number] = f"disk full for {number}"
            else:
                outcomes.append(Appended(number + 1, rng.random() < 0.2))
                expected[number] = None
        answers.append((messages, outcomes))
    for messages, outcomes in answers:
        WebWorkers._appended(core, messages, outcomes)
        if rng.random() < 0.3:
            await asyncio.sleep(0)
    for _ in range(500):
        if len(heard) == reports:
            break
        await asyncio.sleep(0.01)
    assert heard == {number: [error] for number, error in expected.items()}
    assert sum(error is not None for error in expected.values()) > 100  # both kinds were there
    core.close()
    await asyncio.wait_for(link.run(), 5)


async def test_a_group_stored_is_one_message() -> None:
    """The answers of a stored group leave as one STORED message of its request ids."""
    core_sock, worker_sock = socket.socketpair()
    core = await ipc.open_channel(core_sock, lambda message: None)
    got: list[tuple] = []
    worker = await ipc.open_channel(worker_sock, got.append)
    messages = [(ipc.APPEND, i, (None, ()), None, None) for i in (7, 8, 9)]
    WebWorkers._appended(core, messages, [Appended(1, False), ValueError("bad"), Appended(2, True)])
    for _ in range(500):
        if len(got) == 2:
            break
        await asyncio.sleep(0.01)
    assert got == [(ipc.APPENDED, 8, 0, False, "bad"), (ipc.STORED, [7, 9])]
    core.close()
    worker.close()
