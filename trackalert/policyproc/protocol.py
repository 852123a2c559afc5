"""What the core and its policy process say to each other over their socketpair.

Frames and batching are the web workers' (trackalert.frontend.ipc): the messages of one
event-loop iteration leave as one frame, in order. Order is what makes the cursor safe: the
webhooks a batch of reports ran are sent before the cursor that says the batch is done, and the
core applies them in that order, so a saved cursor never passes an alert not yet in the outbox.
"""

from __future__ import annotations

# core -> policy process
HEAD = 20  # (HEAD, seq): the log is committed up to seq
STORED = 25  # (STORED, call id, ok): the WEBHOOK call with that id is applied; what run() returned
#: (CONSOLE, command id, code): a console command, to run in every worker state here too (a
#: `report` redefined from the console reaches the states that run it), answered by CONSOLE_RAN
CONSOLE = 27
# policy process -> core
READY = 21  # (READY, cursor): states built, log open, resuming after cursor
#: (WEBHOOK, call id, name, body, cause, seq, time): one runCustomWebHook call; the Lua call
#: waits for its STORED, so the alert is recorded before runCustomWebHook returns, as in the core
WEBHOOK = 22
CURSOR = 23  # (CURSOR, seq): every event up to seq has run through report
STATS = 24  # (STATS, {...}): counters since the last STATS, see child.Counters.drain
SHUTDOWN = 26  # (SHUTDOWN,): report called shutdown(); the core stops the daemon gracefully
CONSOLE_RAN = 28  # (CONSOLE_RAN, command id, the error reply or None)
