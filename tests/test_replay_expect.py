"""Expectations for a replay: partial expected lines, the pairing, the readable diff, the loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trackalert.replay import expect


def alert(seq: int, hook: str = "alert", login: str = "alice", policy: str | None = "new-country",
          **body: object) -> dict:
    return {"seq": seq, "time": 1_700_000_000.0 + seq, "hook": hook, "login": login,
            "remote": "192.0.2.1", "policy": policy,
            "body": {"policy": policy, "login": login, **body}}


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "expected.ndjson"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_same_alerts_pass() -> None:
    actual = [alert(3), alert(9, login="bob")]
    ok, diff = expect.check(actual, json.loads(json.dumps(actual)))
    assert ok, diff
    assert diff == "2 expected alerts, all matched, none unexpected"


def test_an_expected_line_is_compared_only_on_the_fields_it_gives() -> None:
    actual = [alert(3, country="FR", extra={"a": 1, "b": 2})]
    assert expect.check(actual, [{"seq": 3, "body": {"country": "FR", "extra": {"b": 2}}}])[0]
    assert expect.check(actual, [{"hook": "alert", "login": "alice"}])[0]
    ok, diff = expect.check(actual, [{"seq": 3, "body": {"country": "DE"}}])
    assert not ok and '    body.country: expected "DE", got "FR"' in diff.splitlines()


def test_the_diff_names_missing_unexpected_and_different_alerts_in_seq_order(tmp_path: Path) -> None:
    path = write(tmp_path, [
        json.dumps({"seq": 40, "hook": "alert"}),
        "# alice's takeover",
        json.dumps({"seq": 12, "login": "alice", "body": {"policy": "new-country", "n": 1}}),
        "",
        json.dumps({"seq": 5}),
    ])
    actual = [alert(5), alert(12, login="mallory", policy="impossible-travel", n=True), alert(57)]
    ok, diff = expect.check(actual, expect.load_expected(path))
    assert not ok
    assert diff.splitlines() == [
        "3 expected alerts, 3 actual: 1 missing, 1 unexpected, 1 different",
        f"different:  {path}:3  seq 12 hook alert",
        '    login: expected "alice", got "mallory"',
        '    body.policy: expected "new-country", got "impossible-travel"',
        "    body.n: expected 1, got true",
        f'missing:    {path}:1  {{"seq":40,"hook":"alert"}}',
        "unexpected: " + json.dumps(alert(57), separators=(",", ":")),
    ]


def test_a_field_the_alert_lacks_is_shown_as_absent() -> None:
    ok, diff = expect.check([alert(2)], [{"seq": 2, "body": {"country": "FR"}}])
    assert not ok and "    body.country: expected \"FR\", got (absent)" in diff


def test_a_general_expectation_does_not_take_the_alert_a_specific_one_needs() -> None:
    """Two alerts of one event: the first expected line fits both, the second only one. A
    first-come pairing gives the first line that one and fails; the check must not."""
    actual = [alert(5, hook="audit"), alert(5, hook="alert")]
    ok, diff = expect.check(actual, [{"seq": 5}, {"seq": 5, "hook": "audit"}])
    assert ok, diff
    ok, diff = expect.check(actual, [{"seq": 5, "hook": "audit"}, {"seq": 5, "hook": "audit"}])
    assert not ok and diff.splitlines()[1].startswith("different:  expected #2  seq 5 hook alert")


def test_each_alert_answers_one_expected_line_only() -> None:
    ok, diff = expect.check([alert(1)], [{"seq": 1}, {"seq": 1}])
    assert not ok and diff.splitlines()[1] == 'missing:    expected #2  {"seq":1}'


def test_numbers_compare_as_json_numbers_and_booleans_are_not_numbers() -> None:
    assert expect.check([alert(1, score=2)], [{"seq": 1, "time": 1_700_000_001, "body": {"score": 2.0}}])[0]
    assert not expect.check([alert(1, flag=True)], [{"seq": 1, "body": {"flag": 1}}])[0]
    assert not expect.check([alert(1, tags=["a", "b"])], [{"seq": 1, "body": {"tags": ["a"]}}])[0]
    assert not expect.check([alert(1, policy=None)], [{"seq": 1, "policy": "new-country"}])[0]


def test_a_large_scenario_is_paired_and_its_one_difference_found() -> None:
    actual = [alert(seq, login=f"user{seq % 97}") for seq in range(1, 20_001)]
    expected = [{"seq": a["seq"], "login": a["login"]} for a in actual]
    expected[12_345]["login"] = "someone else"
    ok, diff = expect.check(actual, expected)
    assert not ok
    assert diff.splitlines() == [
        "20000 expected alerts, 20000 actual: 0 missing, 0 unexpected, 1 different",
        "different:  expected #12346  seq 12346 hook alert",
        f'    login: expected "someone else", got "user{12346 % 97}"',
    ]


@pytest.mark.parametrize(("line", "message"), [
    ('{"seq": 3, "hook": "alert"', "not valid JSON"),
    ('[1, 2]', "must be a JSON object, not an array"),
    ('{"seq": 3, "logn": "alice"}', "unknown field 'logn'"),
    ('{"seq": "3"}', 'seq must be a positive integer, got "3"'),
    ('{"seq": true}', "seq must be a positive integer, got true"),
    ('{"time": "yesterday"}', "time must be a number"),
    ('{"login": 7}', "login must be a string, got 7"),
    ('{"policy": 1}', "policy must be a string or null"),
])
def test_a_bad_expected_line_is_reported_with_its_line_number(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, ["# header", json.dumps({"seq": 1}), "", line])
    with pytest.raises(expect.ExpectationError) as caught:
        expect.load_expected(path)
    assert str(caught.value).startswith(f"{path}:4: ")
    assert message in str(caught.value)


def test_the_loader_keeps_every_expected_line_and_its_number(tmp_path: Path) -> None:
    path = write(tmp_path, ["", json.dumps({"seq": 1}), "  # comment", json.dumps({"seq": 2, "policy": None})])
    loaded = expect.load_expected(path)
    assert list(loaded) == [{"seq": 1}, {"seq": 2, "policy": None}]
    assert loaded.lines == [2, 4]
