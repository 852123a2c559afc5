"""The trackalert console: the encrypted control socket, its client and the local console.

The wire protocol is the one of the C++ daemon's libsodium build, so the C++ `trackalert -c`
drives our daemon and our client drives the C++ daemon (reference §9). Modules, one job each:

* `protocol` — keys, nonces and frames (pure, no I/O);
* `executor` — how a command runs: every worker state, then the config state, and the reply text;
* `server` — the asyncio control socket server;
* `service` — what the daemon starts and stops (control sockets, local console, host hooks);
* `repl` — the prompt shared by the client and the local console (ptpython/prompt_toolkit);
* `client` — `trackalert -c` / `-e`;
* `local` — the interactive console of a daemon running in the foreground.

Kept import-free on purpose: the client must not pay for the server's imports.
"""
