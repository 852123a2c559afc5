"""trackalert.notify: real AF_UNIX datagram sockets stand in for systemd's notify socket."""

from __future__ import annotations

import io
import os
import socket
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from trackalert import log, notify


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    log.reset()
    yield
    log.reset()


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_unset_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    assert notify.ready() is False


def test_empty_socket_variable_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify.ready() is False


def test_ready_sends_ready_and_mainpid(path_socket: socket.socket) -> None:
    assert notify.ready() is True
    assert path_socket.recv(4096) == f"READY=1\nMAINPID={os.getpid()}".encode()


def test_stopping_and_status(path_socket: socket.socket) -> None:
    assert notify.stopping() is True
    assert path_socket.recv(4096) == b"STOPPING=1"
    assert notify.status("replaying 3 events\nsecond line") is True
    assert path_socket.recv(4096) == b"STATUS=replaying 3 events second line"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"trackalert-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready() is True
        assert sock.recv(4096).startswith(b"READY=1\nMAINPID=")
    finally:
        sock.close()


def test_missing_socket_warns_and_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    log.configure(facility=None, stream=stream)
    missing = tmp_path / "gone.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(missing))
    assert notify.ready() is False
    assert stream.getvalue().startswith(f"Could not notify systemd via {missing}: ")
