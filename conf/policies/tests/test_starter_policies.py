"""A worked example of testing policies with trackalert.testing: keep a file like this next to
your own config, and run it with `pytest conf/policies/tests` (docs/policies.md).

history.ndjson is a tiny event log in the export format (docs/history.md) with a new-country
takeover and a password spray planted in it; expected.ndjson lists the alerts they must raise.
"""

from __future__ import annotations

from pathlib import Path

from trackalert.testing import assert_alerts, replay_alerts

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "starter.conf"
HISTORY = HERE / "history.ndjson"


def test_the_planted_attacks_raise_exactly_the_expected_alerts() -> None:
    assert_alerts(CONFIG, HISTORY, HERE / "expected.ndjson")


def test_a_quiet_day_raises_nothing() -> None:
    # before the takeover (event 21, 2026-03-12 08:00 UTC) every login is a habit
    assert replay_alerts(CONFIG, HISTORY, "--to", "2026-03-12T07:00") == []


def test_a_higher_spray_threshold_lets_the_spray_through(tmp_path: Path) -> None:
    stricter = tmp_path / "stricter.conf"
    stricter.write_text(CONFIG.read_text().replace("max_logins = 20", "max_logins = 21"))
    # the copy is in another folder: its dofile paths must point at the policies
    stricter.write_text(stricter.read_text().replace('"../', f'"{HERE.parent}/'))
    alerts = replay_alerts(stricter, HISTORY)
    assert [alert["policy"] for alert in alerts] == ["new_country"]
