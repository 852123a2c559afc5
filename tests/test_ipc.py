"""The channel between the core process and its web workers, over a real socketpair."""

from __future__ import annotations

import asyncio
import marshal
import os
import socket
import struct

import pytest

import trackalert
from trackalert.frontend import ipc


async def channel_pair(on_batch):
    """(sending channel, receiving channel) over a socketpair; the receiver takes batches."""
    left, right = socket.socketpair()
    sender = await ipc.open_channel(left, lambda message: None)
    receiver = await ipc.open_channel(right, lambda message: None, on_batch)
    return sender, receiver


def frames(data: bytes) -> list[tuple]:
    """The messages of each frame in `data`, frame by frame."""
    found, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        found.append(marshal.loads(data[offset + 4:offset + 4 + length]))
        offset += 4 + length
    return found


async def test_the_messages_of_one_iteration_leave_as_one_frame_and_arrive_together() -> None:
    batches: list[list[tuple]] = []
    arrived = asyncio.Event()

    def on_batch(messages: list[tuple]) -> None:
        batches.append(messages)
        if sum(map(len, batches)) == 300:
            arrived.set()

    sender, receiver = await channel_pair(on_batch)
    try:
        sent = [(ipc.APPEND, i, ((float(i), "login"), ({}, {}, {}, {})), f"id-{i}", b"f" * 16)
                for i in range(300)]
        for message in sent:
            sender.send(message)
        await asyncio.wait_for(arrived.wait(), 10)
        assert [m for batch in batches for m in batch] == sent
        # one read may carry the lot: far fewer batches than messages
        assert len(batches) <= 3
    finally:
        sender.close()
        receiver.close()


async def test_a_per_message_receiver_gets_each_message_in_order() -> None:
    left, right = socket.socketpair()
    got: list[tuple] = []
    arrived = asyncio.Event()

    def on_message(message: tuple) -> None:
        got.append(message)
        if len(got) == 50:
            arrived.set()

    sender = await ipc.open_channel(left, lambda message: None)
    receiver = await ipc.open_channel(right, on_message)
    try:
        for i in range(50):
            sender.send((ipc.APPENDED, i, i + 1, False, None))
        await asyncio.wait_for(arrived.wait(), 10)
        assert got == [(ipc.APPENDED, i, i + 1, False, None) for i in range(50)]
    finally:
        sender.close()
        receiver.close()


def test_a_flush_is_one_batch_frame() -> None:
    messages = [(ipc.APPENDED, i, i, False, None) for i in range(10)]
    assert frames(ipc.encode_many(messages)) == [(ipc.BATCH, messages)]
    assert frames(ipc.encode_many(messages[:1])) == messages[:1]


def test_a_batch_over_the_frame_limit_is_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipc, "MAX_FRAME", 1000)
    messages = [(ipc.APPEND, i, f"{i:0100d}") for i in range(40)]
    found = frames(ipc.encode_many(messages))
    assert len(found) > 1
    assert all(len(marshal.dumps(frame)) <= 1000 for frame in found)
    flat = [m for frame in found for m in (frame[1] if frame[0] == ipc.BATCH else [frame])]
    assert flat == messages


def test_an_unmarshallable_message_is_dropped_alone(caplog: pytest.LogCaptureFixture) -> None:
    messages = [(ipc.APPENDED, 1, 1, False, None), (ipc.APPENDED, 2, object()),
                (ipc.APPENDED, 3, 3, False, None)]
    found = frames(ipc.encode_many(messages))
    assert found == [messages[0], messages[2]]
    assert "cannot send a message" in caplog.text


def test_a_child_imports_the_checkout_its_core_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    """The venv's editable install may point at another checkout (bench/compare.py runs an
    older one); the child's PYTHONPATH starts with ours, and keeps what was there after it."""
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/notify")
    env = ipc.inherit_env()
    ours = os.path.dirname(os.path.dirname(os.path.abspath(trackalert.__file__)))
    assert env["PYTHONPATH"].split(os.pathsep) == [ours, "/elsewhere"]
    assert "NOTIFY_SOCKET" not in env
