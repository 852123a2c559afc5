"""The policy runner in a process of its own (setPolicyProcess).

Why: in one process the SQLite writer, the event loop and the Lua policy runner share one
interpreter lock, so a heavy policy takes CPU from ingestion although the machine has cores to
spare. The runner is already a log consumer with a persisted cursor, so it can run next to the
writer: `child` is that process, `supervisor` the core's side of it, `protocol` what they say.
"""
