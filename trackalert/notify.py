"""systemd readiness notification for `Type=notify` units (the C++ daemon's `sd_notify`).

The protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named by
`$NOTIFY_SOCKET`, so it is written here rather than pulled in as a dependency (libsystemd bindings
need a compiler; the `sdnotify` package has been unmaintained since 2017). A daemon that is not
under systemd simply has no `$NOTIFY_SOCKET`, and a failed send must never stop the daemon: systemd
would report the start as timed out, which says more than a crash would.
"""

from __future__ import annotations

import logging
import os
import socket

_log = logging.getLogger("trackalert")


def _address(name: str) -> str | bytes:
    """The socket address for `$NOTIFY_SOCKET`; a leading `@` names a Linux abstract socket."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(state: str) -> bool:
    """Send `state` (newline-separated `KEY=value` lines) to systemd; True when it was sent."""
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), _address(name))
    except OSError as exc:
        _log.warning("Could not notify systemd via %s: %s", name, exc)
        return False
    return True


def ready() -> bool:
    """Tell systemd the daemon is serving (READY=1), naming this process as the main one.

    MAINPID matters after `-d` forks: the process that reports ready is the one to supervise.
    """
    return notify(f"READY=1\nMAINPID={os.getpid()}")


def stopping() -> bool:
    """Tell systemd an orderly shutdown has begun."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Set the one-line status `systemctl status` shows (newlines would end the field)."""
    return notify("STATUS=" + text.replace("\n", " "))
