"""What the operator's configuration sets, gathered in one place.

The config state's Lua functions write here; the daemon reads it once the config has run (listeners,
number of Lua states, event log, ...). Values that may change at runtime from the console (the ACL,
the password) are read from here on every use rather than captured at start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trackalert.netaddr import DEFAULT_ACL, ComboAddress, NetmaskGroup

DEFAULT_NUM_LUA_STATES = 6
DEFAULT_MAX_CONNS = 10000
DEFAULT_BODY_LIMIT = 1024 * 1024
#: A request must arrive whole (headers and body) within this many seconds of its first byte;
#: wforce sends each report at once and gives up after 2 s anyway.
DEFAULT_READ_TIMEOUT = 5.0
#: An idle keep-alive connection is closed after this long (the C++ daemon's framework default).
DEFAULT_IDLE_TIMEOUT = 60.0


@dataclass
class Listener:
    address: ComboAddress
    tls: bool = False
    cert_file: str = ""
    key_file: str = ""
    options: dict[str, str] = field(default_factory=dict)


@dataclass
class WebHookSettings:
    """Custom webhook delivery settings (reference §8; the expiry and outbox path are ours)."""

    threads: int = 5
    conns_per_thread: int = 10
    #: The most deliveries the outbox holds; beyond it runCustomWebHook refuses (and says so).
    queue_size: int = 50000
    timeout_seconds: float = 2.0
    #: How long a delivery is retried before it is given up as expired.
    expiry_seconds: float = 86400.0
    #: The outbox file ("" = trackalert-outbox.db next to the config file).
    outbox_path: str = ""
    verify_peer: bool = True
    verify_host: bool = True
    ca_bundle: str = ""
    client_cert: str = ""
    client_key: str = ""


@dataclass
class ConsoleSettings:
    """Limits of the control socket (trackalert.console.server): the C++ daemon had none, and
    idle connections that never authenticated exhausted its file descriptors. A timeout of 0
    means no limit. Read for each new connection and each wait."""

    max_conns: int = 64
    #: The client's nonce must arrive this long after it connected.
    handshake_timeout: float = 10.0
    #: A frame that has begun to arrive must be complete within this.
    frame_timeout: float = 10.0
    #: The first command (the proof of the key) must arrive this long after the nonce exchange.
    unauthenticated_timeout: float = 60.0
    #: How long an authenticated session may wait between commands (an operator at the prompt).
    idle_timeout: float = 86400.0


@dataclass
class Settings:
    config_file: str = ""
    config_dir: str = "."
    verbose: bool = False
    listeners: list[Listener] = field(default_factory=list)
    password: str = ""
    metrics_no_password: bool = False
    num_lua_states: int = DEFAULT_NUM_LUA_STATES
    num_worker_threads: int = 4
    max_conns: int = DEFAULT_MAX_CONNS
    body_limit: int = DEFAULT_BODY_LIMIT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    #: setReportSecret: X-Wforce-Signature must match one of these (none: not checked).
    report_secrets: list[str] = field(default_factory=list)
    acl: NetmaskGroup = field(default_factory=NetmaskGroup)
    eventlog_url: str = ""
    retention_seconds: float | None = None
    #: Custom endpoint names in registration order (registered from the config state).
    custom_endpoints: list[str] = field(default_factory=list)
    custom_stats: list[str] = field(default_factory=list)
    #: Web worker processes serving HTTP (0: the core process serves HTTP itself).
    num_web_processes: int = 0
    #: setPolicyProcess: report(lt) runs in a process of its own (trackalert.policyproc);
    #: None (not set): in its own process on a SQLite log, in the core on another.
    policy_process: bool | None = None
    #: A Lua call running longer than this is logged and counted (LuaJIT cannot interrupt it).
    slow_call_seconds: float = 5.0
    #: How many background functions may run at once (setNumSchedulerThreads).
    num_scheduler_threads: int = 4
    webhooks: WebHookSettings = field(default_factory=WebHookSettings)
    #: setEnrichment: which GeoIP database (by newGeoIP2DB name) fills city/country/asn/isp.
    enrichment: dict[str, str] = field(default_factory=dict)

    # Console (trackalert.console): control socket addresses (controlSocket) and the key
    # (setKey; None until set).
    control_sockets: list[ComboAddress] = field(default_factory=list)
    console_key: bytes | None = None
    console: ConsoleSettings = field(default_factory=ConsoleSettings)

    def add_default_acl(self) -> None:
        """The private ranges the C++ daemon always allows, added after the config has run."""
        for mask in DEFAULT_ACL:
            self.acl.addMask(mask)

    def default_eventlog_url(self) -> str:
        """With no setEventLog, the log is a SQLite file next to the config file."""
        return "sqlite:///" + os.path.abspath(os.path.join(self.config_dir, "trackalert-events.db"))
