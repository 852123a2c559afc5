"""The replay's HTML report: self-contained, escaped, deterministic, and the charts count right.

The page is checked through Python's HTML parser (what a browser would build from it), not by
searching its text.
"""

from __future__ import annotations

import collections
import datetime
import html.parser
import json
import random
import re
import subprocess
import sys
from pathlib import Path

from trackalert.replay import html_report as report
from trackalert.replay import summary as summaries

#: 1 January 2024, 00:00 UTC.
START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
DAY = 86400.0
SCRIPT_LOGIN = '<script>alert("pwned")</script>'
SCRIPT_BODY = {"policy": "new-country", "login": SCRIPT_LOGIN, "note": "</pre><img src=x onerror=alert(1)>"}


class Page(html.parser.HTMLParser):
    """What a browser makes of the page: its elements, attributes, texts and tooltips."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.texts: list[str] = []
        self.titles: list[str] = []
        self.style = ""
        self._open: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in ("meta", "line", "br"):
            self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._open:
            while self._open.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        self.texts.append(data)
        if self._open and self._open[-1] == "title" and "rect" in self._open:
            self.titles.append(data)
        if self._open and self._open[-1] == "style":
            self.style += data

    def names(self) -> set[str]:
        return {tag for tag, _ in self.tags}


def alert(seq: int, day: int, policy: str | None, login: str = "alice", body: object = None) -> dict:
    body = {"policy": policy, "login": login} if body is None else body
    return {"seq": seq, "time": START + day * DAY + seq, "hook": "alert", "login": login,
            "remote": "2001:db8::7", "policy": policy, "body": body}


def summary_of(alerts: list[dict], days: int = 30, events: int = 5000) -> dict:
    per_policy = collections.Counter(a["policy"] or "-" for a in alerts)
    return {
        "events": events, "from": START, "to": START + days * DAY - 1, "alerts": len(alerts),
        "alerts_per_hook": dict(collections.Counter(a["hook"] for a in alerts)),
        "alerts_per_policy": dict(sorted(per_policy.items())),
        "top_logins": [list(x) for x in collections.Counter(a["login"] for a in alerts).most_common(10)],
        "top_remotes": [list(x) for x in collections.Counter(a["remote"] for a in alerts).most_common(10)],
        "lua_errors": 1, "errors": [{"seq": 9, "message": "policy.conf:3: <b>bad</b>"}],
        "run_seconds": 1.25, "events_per_second": 4000.0,
    }


def scenario() -> tuple[list[dict], list[dict], dict]:
    """Two configs over a month: the candidate alerts on days 0-19, the baseline on days 5-24,
    one spray alert per day each, and the <script> login among the added ones."""
    candidate = [alert(100 + d, d, "password-spray") for d in range(20)]
    candidate.append(alert(50, 2, "new-country", SCRIPT_LOGIN, SCRIPT_BODY))
    baseline = [alert(100 + d, d, "password-spray") for d in range(5, 25)]
    same = {a["seq"] for a in candidate} & {a["seq"] for a in baseline}
    compare = {
        "added": [a for a in candidate if a["seq"] not in same],
        "removed": [a for a in baseline if a["seq"] not in same],
        "unchanged": len(same),
        "per_policy": {"new-country": {"added": 1, "removed": 0, "unchanged": 0},
                       "password-spray": {"added": 5, "removed": 5, "unchanged": 15}},
    }
    return candidate, baseline, compare


def render_compare() -> str:
    candidate, baseline, compare = scenario()
    return report.render("Threshold 5 → 3", summary_of(candidate), candidate,
                         summary_of(baseline), baseline, compare)


def test_attacker_controlled_logins_and_bodies_stay_text() -> None:
    page = Page(render_compare())
    assert "script" not in page.names() and "img" not in page.names()
    assert not any(name.startswith("on") for _, attrs in page.tags for name in attrs)
    text = "".join(page.texts)
    assert SCRIPT_LOGIN in text, "shown as the login it is"
    assert SCRIPT_BODY["note"] in text and "<b>bad</b>" in text


def assert_fetches_nothing(page: Page) -> None:
    assert not page.names() & {"script", "link", "img", "iframe", "object", "embed", "base", "source"}
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "action", "data", "xlink:href"):
            assert name not in attrs, f"<{tag} {name}=...>"
    assert "url(" not in page.style and "@import" not in page.style
    policy = [a for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert policy and policy[0]["content"].startswith("default-src 'none'")


def test_the_page_fetches_nothing() -> None:
    assert_fetches_nothing(Page(render_compare()))


def test_the_same_input_gives_the_same_bytes_whatever_the_order_and_run_time() -> None:
    candidate, baseline, compare = scenario()
    first = report.render("t", summary_of(candidate), candidate, summary_of(baseline), baseline, compare)
    shuffled = list(candidate)
    random.Random(3).shuffle(shuffled)
    slower = dict(summary_of(candidate), run_seconds=99.0, events_per_second=1.0)
    second = report.render("t", slower, shuffled, summary_of(baseline), baseline, compare)
    assert first == second, "neither the alerts' order nor the run time changes a byte"


def tooltips(text: str) -> dict[str, str]:
    """Bar tooltips `<series>, <day>: <policy> <n>` as {series, day, policy: n}."""
    found = {}
    for title in Page(text).titles:
        match = re.fullmatch(r"(.+?), (\d{4}-\d\d-\d\d): (.+) (\d+)", title)
        if match:
            found[f"{match[1]}|{match[2]}|{match[3]}"] = match[4]
    return found


def test_the_chart_has_one_bar_per_day_policy_and_config() -> None:
    bars = tooltips(render_compare())
    assert bars["this config|2024-01-03|new-country"] == "1"
    candidate_days = {k.split("|")[1] for k in bars if k.startswith("this config|") and "spray" in k}
    baseline_days = {k.split("|")[1] for k in bars if k.startswith("baseline|") and "spray" in k}
    assert candidate_days == {f"2024-01-{d + 1:02d}" for d in range(20)}
    assert baseline_days == {f"2024-01-{d + 1:02d}" for d in range(5, 25)}
    assert set(bars.values()) == {"1"}


def test_the_difference_chart_counts_added_and_removed_per_day() -> None:
    titles = Page(render_compare()).titles
    added = [t for t in titles if " added (" in t]
    removed = [t for t in titles if " removed (" in t]
    assert "2024-01-03: 2 added (new-country 1, password-spray 1)" in added
    assert len(added) == 5 and len(removed) == 5
    assert "2024-01-25: 1 removed (password-spray 1)" in removed


def test_a_long_replay_is_charted_in_buckets_of_several_days() -> None:
    alerts = [alert(d + 1, d, "attacked-account") for d in range(0, 400, 2)]
    text = report.render("a year", summary_of(alerts, days=400), alerts)
    bars = [t for t in Page(text).titles if t.startswith("this config, ")]
    assert 0 < len(bars) <= report.MAX_BUCKETS
    assert bars[0] == "this config, 2024-01-01 + 4 days: attacked-account 2"
    assert sum(int(t.rsplit(" ", 1)[1]) for t in bars) == len(alerts)


def example_rows(text: str, heading: str) -> list[str]:
    """The seq column of the example table under `heading`."""
    section = text.split(f"<h2>{heading}</h2>", 1)[1].split("<h2>", 1)[0]
    return re.findall(r'<tr><td class="num">(\d+)</td>', section)


def test_the_first_twenty_added_and_removed_alerts_are_shown_in_event_order() -> None:
    added = [alert(seq, seq % 30, "new-country", f"user{seq}") for seq in range(60, 0, -2)]
    removed = [alert(seq, 1, None, f"user{seq}", body="plain text alert") for seq in (7, 3)]
    compare = {"added": added, "removed": removed, "unchanged": 0, "per_policy": {}}
    text = report.render("t", summary_of(added), added, summary_of(removed), removed, compare)
    assert example_rows(text, "Added alerts (only with this config)") == [str(s) for s in range(2, 41, 2)]
    assert "the first 20 of 30, in event order" in text
    assert example_rows(text, "Removed alerts (only with the baseline)") == ["3", "7"]
    assert "plain text alert" in "".join(Page(text).texts)


def policy_cells(text: str, policy: str) -> list[str]:
    """The numbers of `policy`'s row in the per-policy table."""
    policies = text.split("<h2>Alerts per policy</h2>", 1)[1].split("<h2>", 1)[0]
    row = re.search(rf"{re.escape(policy)}</span></td>(.*?)</tr>", policies)
    assert row is not None, policy
    return re.findall(r'<td class="num">(?:<span class="\w+">)?([\d,]+)', row[1])


def test_the_summary_tables_show_both_configs() -> None:
    # alerts, baseline, added, removed
    assert policy_cells(render_compare(), "password-spray") == ["20", "20", "5", "5"]


def test_an_empty_replay_still_renders() -> None:
    empty = {"events": 0, "from": None, "to": None, "alerts": 0, "alerts_per_hook": {},
             "alerts_per_policy": {}, "top_logins": [], "top_remotes": [], "lua_errors": 0,
             "errors": [], "run_seconds": 0.0, "events_per_second": 0.0}
    page = Page(report.render("nothing", empty, []))
    assert "no events, no alerts" in page.texts
    assert "svg" not in page.names()


EXAMPLE = Path(__file__).resolve().parent.parent / "conf" / "policies" / "tests"


def test_the_command_reports_exactly_what_it_replayed_and_compared(tmp_path: Path) -> None:
    """`trackalert-replay --compare --report`: the page is `render` of the very summaries,
    alerts and comparison the command writes (the shared data, nothing recomputed), and shows
    them."""
    baseline = tmp_path / "baseline.conf"
    baseline.write_text((EXAMPLE / "starter.conf").read_text()
                        .replace('"../', f'"{EXAMPLE.parent}/').replace("max_logins = 20", "max_logins = 21"))
    files = {name: tmp_path / name for name in ("report.html", "alerts.ndjson", "summary.json",
                                                "baseline.ndjson", "compare.json")}
    result = subprocess.run(
        [sys.executable, "-m", "trackalert.replay.cli", "--config", str(EXAMPLE / "starter.conf"),
         "--log", str(EXAMPLE / "history.ndjson"), "--compare", str(baseline), "-q",
         "--report", str(files["report.html"]), "--out", str(files["alerts.ndjson"]),
         "--summary-json", str(files["summary.json"]), "--baseline-out", str(files["baseline.ndjson"]),
         "--compare-json", str(files["compare.json"])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = files["report.html"].read_text(encoding="utf-8")
    alerts = [json.loads(line) for line in files["alerts.ndjson"].read_text().splitlines()]
    baseline_alerts = [json.loads(line) for line in files["baseline.ndjson"].read_text().splitlines()]
    compare = json.loads(files["compare.json"].read_text())
    summary = json.loads(files["summary.json"].read_text())
    # the baseline's summary is not written anywhere: the same events, its own alerts
    baseline_summary = summaries.build(summary["events"], (summary["from"], summary["to"]),
                                       baseline_alerts, 0, [], summary["run_seconds"])
    assert baseline_summary["alerts_per_policy"] == {"new_country": 1}
    assert text == report.render("starter.conf compared with baseline.conf", summary, alerts,
                                 baseline_summary, baseline_alerts, compare)
    page = Page(text)
    assert_fetches_nothing(page)
    [added] = compare["added"]
    assert (added["seq"], added["login"], added["policy"]) == (42, "user20", "password_spray")
    assert example_rows(text, "Added alerts (only with this config)") == ["42"]
    assert "user20" in page.texts
    # alerts, baseline, added, removed
    assert policy_cells(text, "password_spray") == ["1", "0", "1", "0"]
    assert policy_cells(text, "new_country") == ["1", "1", "0", "0"]


def test_the_charts_scale_to_the_page_instead_of_overflowing_it() -> None:
    charts = [attrs for tag, attrs in Page(render_compare()).tags if tag == "svg"]
    assert len(charts) == 2
    for attrs in charts:
        # a fixed width of 1,118 px overflowed the 1,180 px page's panels (a scroll bar)
        assert attrs.get("width") == "100%" and "height" not in attrs
        assert re.fullmatch(r"0 0 \d+ \d+", attrs.get("viewBox") or attrs.get("viewbox") or "")
