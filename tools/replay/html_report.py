"""The replay as one HTML page an operator opens in a browser, mails or attaches to a change.

One self-contained file: inline CSS, charts as inline SVG drawn here, no script and no fetch of
anything (a Content-Security-Policy says so to the browser too), so it shows the same offline,
from a mail attachment or an archive years later. Logins, remotes, policy names and bodies come
from the reports, that is from whoever sent the logins: every one of them is escaped as text.
The same input gives the same bytes (no generation time, no run time, stable orders), so a report
can be kept next to the policy and compared.
"""

from __future__ import annotations

import datetime
import html
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

__all__ = ["render", "EXAMPLES"]

#: How many added/removed (or plain) alerts are shown in full.
EXAMPLES = 20
#: At most this many bars per chart: a longer replay is shown in buckets of several days.
MAX_BUCKETS = 120
#: Bodies longer than this are cut in the examples (the NDJSON has them whole).
BODY_CHARS = 1500
NO_POLICY = "-"
#: Colour-blind-friendly categorical palette (Okabe-Ito, then Tableau's muted tones).
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442",
           "#4e79a7", "#b07aa1", "#9c755f", "#76b7b2", "#bab0ac")
DAY = 86400.0

CSS = """
:root{--fg:#1d2330;--muted:#5d6678;--line:#dde2ea;--bg:#f6f7fa;--card:#fff;--add:#137a3a;
--rm:#b3261e}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,
"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:17px;margin:32px 0 10px}
.sub{color:var(--muted);margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 16px;
flex:1 1 120px}
.card .n{font-size:26px;font-weight:600}.card .l{color:var(--muted);font-size:12px;
text-transform:uppercase;letter-spacing:.04em}
.add{color:var(--add)}.rm{color:var(--rm)}
.panel{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;
overflow-x:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:14px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:var(--muted);font-weight:600;text-transform:uppercase;letter-spacing:.03em}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.k{font-family:ui-monospace,"DejaVu Sans Mono",monospace;word-break:break-all}
pre{margin:0;white-space:pre-wrap;word-break:break-all;font:12px/1.35 ui-monospace,
"DejaVu Sans Mono",monospace;max-height:14em;overflow:auto}
.legend{display:flex;flex-wrap:wrap;gap:6px 16px;margin:4px 0 8px;font-size:13px}
.sw{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:5px;
vertical-align:-1px}
.empty{color:var(--muted);font-style:italic}
svg text{font:11px system-ui,"DejaVu Sans",sans-serif;fill:#5d6678}
"""


# -- small helpers ---------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """Text for HTML content or a quoted attribute (quotes escaped too)."""
    return html.escape(str(value), quote=True)


def _policy(alert: dict) -> str:
    policy = alert.get("policy")
    return policy if isinstance(policy, str) else NO_POLICY


def _label(policy: str) -> str:
    """How a policy is shown: alerts whose body names none are grouped as "-" in the summary."""
    return "(no policy)" if policy == NO_POLICY else policy


def _utc(seconds: float | None, with_time: bool = True) -> str:
    if seconds is None:
        return "–"
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M:%S" if with_time else "%Y-%m-%d")


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else _e(n)


def _colours(policies: Iterable[str]) -> dict[str, str]:
    """A fixed colour per policy, by sorted name, so two reports colour alike."""
    names = sorted(set(policies))
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool]) -> str:
    """A table from cells that are already HTML; `numeric` right-aligns a column."""
    if not rows:
        return '<p class="empty">none</p>'
    cls = [' class="num"' if n else "" for n in numeric]
    head = "".join(f"<th{c}>{_e(h)}</th>" for h, c in zip(headers, cls))
    head = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = "".join(
        "<tr>" + "".join(f"<td{c}>{cell}</td>" for cell, c in zip(row, cls)) + "</tr>" for row in rows
    )
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _section(title: str, content: str) -> str:
    return f"<h2>{_e(title)}</h2>\n{content}\n"


# -- the charts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Axis:
    """Where the bars go: `count` bars of `width` UTC days from `start`, on a fixed canvas."""

    start: float
    width: int
    count: int
    left: float = 48
    plot_w: float = 1060
    plot_h: float = 240
    head: float = 10
    foot: float = 44

    @property
    def slot(self) -> float:
        return self.plot_w / self.count

    def svg_open(self, label: str) -> str:
        # drawn on a fixed canvas, scaled to the panel's width (a fixed width overflowed it)
        return (f'<svg viewBox="0 0 {self.left + self.plot_w + 10:.0f} '
                f'{self.head + self.plot_h + self.foot:.0f}" width="100%" role="img" '
                f'aria-label="{_e(label)}">')

    def bucket(self, seconds: float) -> int:
        return min(self.count - 1, max(0, int((seconds - self.start) // (self.width * DAY))))

    def bucket_label(self, index: int) -> str:
        first = _utc(self.start + index * self.width * DAY, with_time=False)
        return first if self.width == 1 else f"{first} + {self.width} days"


def _axis(summary: dict, alert_lists: Sequence[Sequence[dict]]) -> _Axis | None:
    """Bars over the replayed span (or the alerts' own), one per day, or per several days when
    the span is longer than MAX_BUCKETS days."""
    times = [a["time"] for alerts in alert_lists for a in alerts]
    bounds = [t for t in (summary.get("from"), summary.get("to")) if t is not None] + times
    if not bounds:
        return None
    first, last = math.floor(min(bounds) / DAY), math.floor(max(bounds) / DAY)
    width = max(1, math.ceil((last - first + 1) / MAX_BUCKETS))
    return _Axis(first * DAY, width, math.ceil((last - first + 1) / width))


def _per_bucket(axis: _Axis, alerts: Sequence[dict]) -> list[dict[str, int]]:
    bars: list[dict[str, int]] = [{} for _ in range(axis.count)]
    for alert in alerts:
        bar, policy = bars[axis.bucket(alert["time"])], _policy(alert)
        bar[policy] = bar.get(policy, 0) + 1
    return bars


def _nice_step(top: int) -> int:
    """A round gridline step giving at most 5 lines up to `top`."""
    raw = max(top, 1) / 5
    magnitude = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    return next(f * magnitude for f in (1, 2, 5, 10) if f * magnitude >= raw)


def _y_grid(axis: _Axis, low: int, high: int) -> tuple[list[str], Callable[[float], float]]:
    """Gridlines and labels from `low` to `high` (rounded out to steps), and the value -> y map."""
    step = _nice_step(max(high, -low))
    top, bottom = math.ceil(high / step) * step, math.floor(low / step) * step
    top = max(top, step) if bottom == 0 else top
    scale = axis.plot_h / (top - bottom)

    def y(value: float) -> float:
        return axis.head + (top - value) * scale

    parts = []
    for tick in range(bottom, top + 1, step):
        colour = "#b9c0cc" if tick == 0 else "#e6e9ef"
        parts.append(f'<line x1="{axis.left}" x2="{axis.left + axis.plot_w}" y1="{y(tick):.1f}" '
                     f'y2="{y(tick):.1f}" stroke="{colour}"/><text x="{axis.left - 6}" '
                     f'y="{y(tick) + 4:.1f}" text-anchor="end">{tick:,}</text>')
    return parts, y


def _x_labels(axis: _Axis) -> list[str]:
    every = max(1, math.ceil(axis.count / 12))
    base = axis.head + axis.plot_h
    parts = []
    for i in range(0, axis.count, every):
        x = axis.left + (i + 0.5) * axis.slot
        day = datetime.datetime.fromtimestamp(axis.start + i * axis.width * DAY, datetime.timezone.utc)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}" stroke="#b9c0cc"/>'
                     f'<text x="{x:.1f}" y="{base + 17}" text-anchor="middle">{day:%b %d}</text>')
    per = "one day" if axis.width == 1 else f"{axis.width} days"
    parts.append(f'<text x="{axis.left}" y="{base + 36}">UTC, {per} per bar</text>')
    return parts


def _rect(x: float, y0: float, y1: float, w: float, fill: str, tip: str, pale: bool = False) -> str:
    opacity = ' fill-opacity="0.38"' if pale else ""
    return (f'<rect x="{x:.1f}" y="{min(y0, y1):.1f}" width="{w:.1f}" height="{abs(y1 - y0):.1f}" '
            f'fill="{fill}"{opacity}><title>{_e(tip)}</title></rect>')


def _chart(series: Sequence[tuple[str, Sequence[dict]]], axis: _Axis, colours: dict[str, str]) -> str:
    """Stacked bars of alerts per day and policy; with two series (baseline, this config) a
    pair of bars per day on one scale, the baseline's paler, so a change stands out."""
    stacks = [_per_bucket(axis, alerts) for _, alerts in series]
    grid, y = _y_grid(axis, 0, max((sum(b.values()) for bars in stacks for b in bars), default=0))
    gap = max(1.0, axis.slot * 0.18)
    bar_w = (axis.slot - gap) / len(series)
    parts = [axis.svg_open("alerts per day and policy"), *grid]
    for s, ((name, _), bars) in enumerate(zip(series, stacks)):
        pale = len(series) > 1 and s == 0
        for i, bar in enumerate(bars):
            x, total = axis.left + i * axis.slot + gap / 2 + s * bar_w, 0
            for policy in sorted(bar):
                tip = f"{name}, {axis.bucket_label(i)}: {_label(policy)} {bar[policy]:,}"
                parts.append(_rect(x, y(total), y(total + bar[policy]), bar_w, colours[policy], tip, pale))
                total += bar[policy]
    return "".join(parts + _x_labels(axis) + ["</svg>"])


def _difference_chart(compare: dict, axis: _Axis) -> str:
    """Alerts added (up, green) and removed (down, red) per day: where the change bites."""
    added, removed = _per_bucket(axis, compare["added"]), _per_bucket(axis, compare["removed"])
    high = max((sum(b.values()) for b in added), default=0)
    low = -max((sum(b.values()) for b in removed), default=0)
    grid, y = _y_grid(axis, low, max(high, 1 if low == 0 else 0))
    gap = max(1.0, axis.slot * 0.18)
    parts = [axis.svg_open("alerts added and removed per day"), *grid]
    for i in range(axis.count):
        x = axis.left + i * axis.slot + gap / 2
        for bar, sign, colour, what in ((added[i], 1, "#137a3a", "added"),
                                        (removed[i], -1, "#b3261e", "removed")):
            if bar:
                detail = ", ".join(f"{_label(p)} {bar[p]:,}" for p in sorted(bar))
                tip = f"{axis.bucket_label(i)}: {sum(bar.values()):,} {what} ({detail})"
                parts.append(_rect(x, y(0), y(sign * sum(bar.values())), axis.slot - gap, colour, tip))
    return "".join(parts + _x_labels(axis) + ["</svg>"])


def _legend(colours: dict[str, str], compared: bool) -> str:
    items = "".join(f'<span><span class="sw" style="background:{c}"></span>{_e(_label(p))}</span>'
                    for p, c in colours.items())
    if compared:
        items += ('<span><span class="sw" style="background:#5d6678;opacity:.38"></span>'
                  'left, pale: baseline</span><span><span class="sw" style="background:#5d6678">'
                  '</span>right: this config</span>')
    return f'<div class="legend">{items}</div>'


# -- the tables ------------------------------------------------------------------------------------


def _cards(summary: dict, baseline: dict | None, compare: dict | None) -> str:
    cards = [("events replayed", _count(summary.get("events", 0)), ""),
             ("alerts", _count(summary.get("alerts", 0)), "")]
    if baseline is not None:
        cards.append(("baseline alerts", _count(baseline.get("alerts", 0)), ""))
    if compare is not None:
        cards += [("added", _count(len(compare["added"])), "add"),
                  ("removed", _count(len(compare["removed"])), "rm"),
                  ("unchanged", _count(compare["unchanged"]), "")]
    cards.append(("Lua errors", _count(summary.get("lua_errors", 0)),
                  "rm" if summary.get("lua_errors") else ""))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="n {c}">{n}</div><div class="l">{_e(label)}</div></div>'
        for label, n, c in cards
    ) + "</div>"


def _counts_table(key: str, summary: dict, baseline: dict | None, compare: dict | None) -> str:
    """Alerts per hook or per policy: this config, and with a baseline its count and the diff."""
    mine, theirs = summary.get(key, {}), (baseline or {}).get(key, {})
    names = sorted(set(mine) | set(theirs))
    headers, numeric = ["hook" if key == "alerts_per_hook" else "policy", "alerts"], [False, True]
    if baseline is not None:
        headers.append("baseline")
        numeric.append(True)
    per_policy = compare.get("per_policy", {}) if compare and key == "alerts_per_policy" else None
    if per_policy is not None:
        headers += ["added", "removed"]
        numeric += [True, True]
    rows = []
    for name in names:
        shown = _label(name) if key == "alerts_per_policy" else name
        row = [f'<span class="k">{_e(shown)}</span>', _count(mine.get(name, 0))]
        if baseline is not None:
            row.append(_count(theirs.get(name, 0)))
        if per_policy is not None:
            diff = per_policy.get(name, {})
            row += [f'<span class="add">{_count(diff.get("added", 0))}</span>',
                    f'<span class="rm">{_count(diff.get("removed", 0))}</span>']
        rows.append(row)
    return _table(headers, rows, numeric)


def _top_table(title: str, pairs: Sequence[Sequence[Any]]) -> str:
    rows = [[f'<span class="k">{_e(value)}</span>', _count(n)] for value, n in pairs]
    return f'<div class="panel">{_table([title, "alerts"], rows, [False, True])}</div>'


def _overview(summary: dict) -> str:
    rows = [["time span (UTC)", f"{_e(_utc(summary.get('from')))} → {_e(_utc(summary.get('to')))}"],
            ["events replayed", _count(summary.get("events", 0))],
            ["alerts", _count(summary.get("alerts", 0))],
            ["Lua errors", _count(summary.get("lua_errors", 0))]]
    return _table(["", ""], rows, [False, False])


def _errors(summary: dict) -> str:
    rows = [[_e(err.get("seq")), f"<pre>{_e(err.get('message', ''))}</pre>"]
            for err in summary.get("errors", [])]
    return _table(["seq", "message"], rows, [True, False])


def _body_text(body: Any) -> str:
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False,
                                                         separators=(", ", ": "))
    if len(text) > BODY_CHARS:
        text = text[:BODY_CHARS] + f"… ({len(text) - BODY_CHARS:,} more characters)"
    return text


def _examples(alerts: Sequence[dict], total: int | None = None) -> str:
    """The first EXAMPLES alerts in seq order, whole enough to judge each one."""
    ordered = sorted(alerts, key=lambda a: (a["seq"], a["time"]))[:EXAMPLES]
    rows = [[_e(a["seq"]), _e(_utc(a["time"])), f'<span class="k">{_e(a["hook"])}</span>',
             f'<span class="k">{_e(_label(_policy(a)))}</span>', f'<span class="k">{_e(a["login"])}</span>',
             f'<span class="k">{_e(a["remote"])}</span>', f"<pre>{_e(_body_text(a['body']))}</pre>"]
            for a in ordered]
    shown = len(alerts) if total is None else total
    note = (f'<p class="sub">the first {len(ordered)} of {shown:,}, in event order</p>'
            if shown > len(ordered) else "")
    table = _table(["seq", "time (UTC)", "hook", "policy", "login", "remote", "body"], rows,
                   [True, False, False, False, False, False, False])
    return note + f'<div class="panel">{table}</div>'


# -- the page --------------------------------------------------------------------------------------


def render(title: str, summary: dict, alerts: list[dict], baseline_summary: dict | None = None,
           baseline_alerts: list[dict] | None = None, compare: dict | None = None) -> str:
    """The whole report as one HTML document (str; write it as UTF-8)."""
    series: list[tuple[str, Sequence[dict]]] = [("this config", alerts)]
    if baseline_alerts is not None:
        series.insert(0, ("baseline", baseline_alerts))
    sections = [
        _header(title, summary, baseline_summary, compare),
        *_charts(series, summary, compare),
        *_tables(summary, baseline_summary, compare),
        *_example_sections(summary, alerts, compare),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_e(title)}</title>\n<style>{CSS}</style></head>\n<body><main>\n"
        + "\n".join(sections) + "\n</main></body></html>\n"
    )


def _header(title: str, summary: dict, baseline: dict | None, compare: dict | None) -> str:
    span = f"{_e(_utc(summary.get('from')))} → {_e(_utc(summary.get('to')))} UTC"
    return (f"<h1>{_e(title)}</h1>\n<p class=\"sub\">{span} · {_count(summary.get('events', 0))} "
            f"events</p>\n{_cards(summary, baseline, compare)}")


def _charts(series: Sequence[tuple[str, Sequence[dict]]], summary: dict,
            compare: dict | None) -> list[str]:
    axis = _axis(summary, [group for _, group in series])
    if axis is None:
        return [_section("Alerts per day and policy", '<p class="empty">no events, no alerts</p>')]
    colours = _colours(_policy(a) for _, group in series for a in group)
    charts = [_section("Alerts per day and policy", '<div class="panel">' + _legend(
        colours, len(series) > 1) + _chart(series, axis, colours) + "</div>")]
    if compare is not None:
        charts.append(_section("Added and removed per day", '<div class="panel">'
                               + _difference_chart(compare, axis) + "</div>"))
    return charts


def _tables(summary: dict, baseline: dict | None, compare: dict | None) -> list[str]:
    hooks = _counts_table("alerts_per_hook", summary, baseline, compare)
    policies = _counts_table("alerts_per_policy", summary, baseline, compare)
    tops = (_top_table("login", summary.get("top_logins", []))
            + _top_table("remote", summary.get("top_remotes", [])))
    return [
        _section("Summary", f'<div class="grid"><div class="panel">{_overview(summary)}</div>'
                            f'<div class="panel">{hooks}</div></div>'),
        _section("Alerts per policy", f'<div class="panel">{policies}</div>'),
        _section("Most alerted", f'<div class="grid">{tops}</div>'),
    ]


def _example_sections(summary: dict, alerts: Sequence[dict], compare: dict | None) -> list[str]:
    if compare is not None:
        sections = [_section("Added alerts (only with this config)", _examples(compare["added"])),
                    _section("Removed alerts (only with the baseline)", _examples(compare["removed"]))]
    else:
        sections = [_section("Alerts", _examples(alerts, summary.get("alerts")))]
    if summary.get("errors"):
        sections.append(_section("Lua errors", f'<div class="panel">{_errors(summary)}</div>'))
    return sections
