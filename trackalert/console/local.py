"""The interactive console of a daemon in the foreground (no `-s`/`-d`/`-D`, reference §9.5).

Same prompt as `trackalert -c` (`console.repl`), same multi-state execution as the control socket
(`console.executor`), running on the daemon's event loop with `prompt_async`, so it costs no
thread and log lines print above the prompt instead of through it (`patch_stdout`).

Output as the original: a returned string with a newline, the output buffer as it is, errors on
stderr. `quit` or Ctrl-D stops the daemon gracefully (exit 0), as in the original: the operator
ended the session of a daemon started in their terminal. Ctrl-C discards the line being typed (a
SIGINT sent to the process still stops it). The console only starts when stdin is a terminal, so
a foreground daemon with stdin on /dev/null or a pipe keeps running instead of stopping at the
first EOF as the C++ one does.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from prompt_toolkit.patch_stdout import patch_stdout

from trackalert import log
from trackalert.console.executor import Reply, ReplyKind
from trackalert.console.repl import QUIT, history_path, make_session

if TYPE_CHECKING:
    from trackalert.console.executor import CommandExecutor
    from trackalert.lua.host import Host


def print_reply(reply: Reply) -> None:
    if reply.kind is ReplyKind.ERROR:
        sys.stderr.write(reply.text.rstrip("\n") + "\n")
    elif reply.kind is ReplyKind.VALUE:
        sys.stdout.write(reply.text + "\n")
    else:
        sys.stdout.write(reply.text)
    sys.stdout.flush()


async def run_local_console(executor: "CommandExecutor", host: "Host") -> None:
    """Read commands until `quit`/EOF, then stop the daemon; cancelled when it stops otherwise."""
    session = make_session(history_path())
    with patch_stdout(raw=True):
        while True:
            try:
                # The daemon keeps its own SIGINT handler and loop exception handler.
                text = await session.prompt_async(handle_sigint=False, set_exception_handler=False)
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if text.strip() == QUIT:
                break
            print_reply(await executor.execute(text, show_values=True))
    log.notice("Console closed: stopping trackalert")
    host.shutdown()
