"""Web worker processes: HTTP on several cores, the event log and Lua in the core process."""
