"""The cyclic garbage collector's settings for a long-running process of ours (the core and the
policy process): shared so that both run with the same, measured settings."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Freeze what start-up built and collect less often.

    Every report (and every judged event) allocates short-lived objects; with the default
    gen-0 threshold (700) the cyclic GC runs thousands of times a second at full load, and its
    full collections walk everything the projections hold (~15 % of the policy process's CPU
    per event: bench/policy_process_bench.py prints the time spent collecting). Reports create
    no reference cycles worth chasing that soon."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
