"""The report endpoint under hostile traffic (trackalert.fuzz): a real daemon, raw HTTP on loopback.

Seeded and bounded: the same few thousand cases every run, in one process and with web processes.
`bench/fuzz.py` runs the same generator for longer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trackalert import fuzz
from trackalert.testing import DEFAULT_PASSWORD, DaemonProcess, listener_config

CONFIG = listener_config() + """
setNumLuaStates(2)
setNumWebProcesses({web_processes})
setReport(function(lt) local r = lt.remote:tostring() end)
"""


@pytest.mark.parametrize("web_processes,seed,count,keep_alive",
                         [(0, 1, 2500, False), (2, 2, 1500, False), (2, 3, 1500, True)])
async def test_hostile_traffic_keeps_every_promise(tmp_path: Path, web_processes: int, seed: int,
                                                   count: int, keep_alive: bool) -> None:
    cases = fuzz.generate(seed, count, DEFAULT_PASSWORD)
    daemon = DaemonProcess(tmp_path, CONFIG.replace("{web_processes}", str(web_processes)))
    with daemon:
        outcomes = await fuzz.run("127.0.0.1", daemon.port, cases, concurrency=16, keep_alive=keep_alive)
        assert daemon.stop() == 0
    verdict = fuzz.check(outcomes, await fuzz.markers_in_sqlite(tmp_path / "trackalert-events.db"))
    print(verdict.summary())
    assert verdict.sent == count
    assert verdict.statuses[200] > count // 4, verdict.summary()  # the valid share got through
    assert not verdict.problems, "\n".join(verdict.problems[:40])
    assert "Traceback" not in daemon.output()


def test_same_seed_same_cases() -> None:
    first = fuzz.generate(7, 300, "pw")
    assert [c.raw for c in first] == [c.raw for c in fuzz.generate(7, 300, "pw")]
    assert [c.raw for c in first] != [c.raw for c in fuzz.generate(8, 300, "pw")]
    kinds = {c.kind.split("/")[0] for c in first}
    assert {"valid", "retry", "deep", "surrogate", "mutated"} <= kinds


def test_check_catches_a_lost_report_and_a_non_json_error() -> None:
    """The checker itself must be able to fail: a lost 200 and a text/plain 400 are both caught."""
    cases = fuzz.generate(3, 50, "pw")
    good = next(c for c in cases if c.must_succeed)
    bad = next(c for c in cases if not c.must_succeed and c.retry_of is None)
    outcomes = [fuzz.Outcome(good, 200, "application/json", b'{"status":"ok"}'),
                fuzz.Outcome(bad, 400, "text/plain", b"Bad Request")]
    problems = fuzz.check(outcomes, []).problems
    assert any("stored 0" in p for p in problems)
    assert any("content type 'text/plain'" in p for p in problems)
    assert not fuzz.check(outcomes[:1], [good.marker]).problems
