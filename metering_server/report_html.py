"""`metering-admin report --format html`: one self-contained page from a `report` reply.

No network needed to view it: inline CSS, and per product an inline SVG chart drawn here
(concurrent use over time as a step line against the seat count) and the per-user table.
Pure: a function of the reply; no I/O, no clock.
"""

from __future__ import annotations

import html
import math
from datetime import UTC, datetime
from typing import Any

from metering_protocol.timefmt import parse_rfc3339

# Chart geometry (SVG user units; the page scales it to its column).
WIDTH, HEIGHT = 960, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 24, 24, 56

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: #1c2430; background: #fff; margin: 0; }
main { max-width: 1040px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 6px; padding-top: 18px; border-top: 1px solid #d5dbe3; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.sub { color: #4a5566; margin: 0 0 18px; }
table { border-collapse: collapse; margin: 6px 0 10px; }
th, td { padding: 4px 12px; border-bottom: 1px solid #e3e7ee; text-align: left; }
th { background: #f1f4f8; font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.full td { background: #fff4e5; }
.figures { color: #333d4b; margin: 0 0 8px; }
.figures b { font-variant-numeric: tabular-nums; }
.note { color: #5b6678; font-size: 13px; }
.warn { color: #9a4a00; }
svg.chart { width: 100%; height: auto; display: block; margin: 4px 0; }
.chart .grid { stroke: #e6e9ef; stroke-width: 1; }
.chart .axis { stroke: #556070; stroke-width: 1; }
.chart text { font: 12px system-ui, "DejaVu Sans", sans-serif; fill: #3d4756; }
.chart .title { font-size: 13px; fill: #1c2430; }
.chart .use { fill: none; stroke: #1f6fd1; stroke-width: 2; }
.chart .area { fill: #1f6fd1; fill-opacity: 0.14; stroke: none; }
.chart .seats { stroke: #d1342f; stroke-width: 2; stroke-dasharray: 7 5; }
.chart .seatlabel { fill: #b52a25; font-weight: 600; }
.chart .peak { fill: #1f6fd1; }
dl.glossary { font-size: 13px; color: #4a5566; display: grid; gap: 2px 14px;
              grid-template-columns: max-content 1fr; margin-top: 32px; }
dl.glossary dt { font-weight: 600; }
dl.glossary dd { margin: 0; }
"""

_GLOSSARY = (
    (
        "Sessions",
        "runs of the program that held a seat (granted, or beyond the seat count "
        "in meter mode) during the period; a run still going when the report was made "
        'counts up to that moment ("still running")',
    ),
    (
        "Hours",
        "the time those runs spent inside the period, added up (runs that began "
        "before or ended after it count only their part inside it)",
    ),
    (
        "Peak in use",
        "the most runs holding a seat of the product at the same instant, "
        "computed from the runs' start and end times",
    ),
    ("Denials", "runs that were refused a seat (each stopped program counts once)"),
    ("Overuse runs", "runs granted beyond the seat count (meter mode only)"),
    ("Chart", "blue: seats in use over time; red dashed line: seats licensed"),
)

_NICE_STEPS_S = (
    60, 300, 900, 1800, 3600, 2 * 3600, 3 * 3600, 6 * 3600, 12 * 3600,
    86400, 2 * 86400, 7 * 86400, 14 * 86400, 28 * 86400, 91 * 86400, 182 * 86400, 364 * 86400,
)  # fmt: skip


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


NONE = "&ndash;"


def _num(value: Any) -> str:
    if value is None:
        return NONE
    if isinstance(value, float):
        return f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else _esc(value)


def _utc(epoch: float, with_seconds: bool = False) -> str:
    dt = datetime.fromtimestamp(epoch, UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S" if with_seconds else "%Y-%m-%d %H:%M") + " UTC"


def _span(seconds: float) -> str:
    if seconds >= 86400 and seconds % 86400 == 0:
        days = int(seconds // 86400)
        return f"{days} day" + ("s" if days != 1 else "")
    if seconds >= 3600:
        return f"{seconds / 3600:g} hours"
    return f"{seconds / 60:g} minutes"


def render(report: dict[str, Any], *, server_address: str | None = None) -> str:
    """The page for one `report` reply (its fields; `id` and `ok` may be there or not)."""
    since = parse_rfc3339(report["since"])
    until = parse_rfc3339(report["until"])
    products = [p for p in report.get("products") or [] if isinstance(p, dict)]
    site, server = report.get("site"), report.get("server")
    where = " · ".join(
        x for x in (f"site {site}" if site else "", f"server {server}" if server else "") if x
    )
    title = f"License usage report — {where}" if where else "License usage report"
    period = f"{_utc(since)} to {_utc(until)} ({_span(until - since)})"
    generated = report.get("generated_at")
    notes = ["from the start time up to (not including) the end time"]
    if generated:
        notes.append(f"generated {_esc(_utc(parse_rfc3339(generated)))}")
    if server_address:
        notes.append(f"from {_esc(server_address)}")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}, {_esc(period)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="sub">Period: <b>{_esc(period)}</b>, {" · ".join(notes)}</p>',
    ]
    if not products:
        out.append("<p>No products in the catalogue and no usage in this period.</p>")
    else:
        out.append(_summary(products))
        for p in products:
            out.append(_section(p, since, until))
    out.append('<dl class="glossary">')
    for term, meaning in _GLOSSARY:
        out.append(f"<dt>{_esc(term)}</dt><dd>{_esc(meaning)}</dd>")
    out.append("</dl></main></body></html>")
    return "\n".join(out) + "\n"


def _name(p: dict[str, Any]) -> str:
    version = p.get("version")
    return f"{p.get('product')} {version}" if version not in (None, "*") else str(p.get("product"))


def _at_capacity(p: dict[str, Any]) -> bool:
    seats = p.get("seats")
    return bool(p.get("denials")) or (
        isinstance(seats, int) and seats > 0 and (p.get("peak_in_use") or 0) >= seats
    )


def _summary(products: list[dict[str, Any]]) -> str:
    head = (
        "<tr><th>Product</th><th>Version</th><th class=n>Seats</th><th>Mode</th>"
        "<th class=n>Sessions</th><th class=n>Hours</th><th class=n>Peak in use</th>"
        "<th class=n>Denials</th><th class=n>Overuse runs</th></tr>"
    )
    rows = []
    for p in products:
        cls = ' class="full"' if _at_capacity(p) else ""
        rows.append(
            f"<tr{cls}><td>{_esc(p.get('product'))}</td><td>{_esc(p.get('version'))}</td>"
            f"<td class=n>{_num(p.get('seats'))}</td><td>{_num(p.get('mode'))}</td>"
            f"<td class=n>{_num(p.get('sessions'))}</td><td class=n>{_num(p.get('hours'))}</td>"
            f"<td class=n>{_num(p.get('peak_in_use'))}</td>"
            f"<td class=n>{_num(p.get('denials'))}</td>"
            f"<td class=n>{_num(p.get('overuse'))}</td></tr>"
        )
    note = (
        '<p class="note">Shaded rows: the product was at its seat count at some moment, or '
        "refused a seat.</p>"
        if any(_at_capacity(p) for p in products)
        else ""
    )
    return f"<h2>Summary</h2><table>{head}{''.join(rows)}</table>{note}"


def _section(p: dict[str, Any], since: float, until: float) -> str:
    seats = p.get("seats")
    anchor = "p-" + "".join(c if c.isalnum() else "-" for c in _name(p))
    figures = [
        f"<b>{_num(seats)}</b> seats" if seats is not None else "not in the catalogue",
        f"mode <b>{_esc(p.get('mode'))}</b>" if p.get("mode") else "",
        f"<b>{_num(p.get('sessions'))}</b> sessions"
        + (f" ({_num(p.get('open'))} still running)" if p.get("open") else ""),
        f"<b>{_num(p.get('hours'))}</b> hours",
        f"peak <b>{_num(p.get('peak_in_use'))}</b> in use"
        + (f" (first at {_esc(_utc(parse_rfc3339(p['peak_at'])))})" if p.get("peak_at") else ""),
        f"<b>{_num(p.get('denials'))}</b> denials",
        f"<b>{_num(p.get('overuse'))}</b> overuse runs",
    ]
    parts = [
        f'<section id="{_esc(anchor)}"><h2>{_esc(_name(p))}</h2>',
        f'<p class="figures">{" · ".join(f for f in figures if f)}</p>',
        _chart(p, since, until),
    ]
    bucket = p.get("timeline_bucket_s")
    if bucket:
        parts.append(
            f'<p class="note">Each step of the chart shows the highest number in use within '
            f"{_esc(_span(round(bucket)))} (too many changes to draw one by one).</p>"
        )
    users = [u for u in p.get("users") or [] if isinstance(u, dict)]
    parts.append(f"<h3>Per user: {_esc(_name(p))}</h3>")
    if users:
        rows = "".join(
            f"<tr><td>{_esc(u.get('user'))}</td><td class=n>{_num(u.get('sessions'))}</td>"
            f"<td class=n>{_num(u.get('hours'))}</td><td class=n>{_num(u.get('denials'))}</td>"
            f"<td class=n>{_num(u.get('overuse'))}</td></tr>"
            for u in users
        )
        parts.append(
            "<table><tr><th>User</th><th class=n>Sessions</th><th class=n>Hours</th>"
            f"<th class=n>Denials</th><th class=n>Overuse runs</th></tr>{rows}</table>"
        )
    else:
        parts.append('<p class="note">Nobody used it in this period.</p>')
    parts.append("</section>")
    return "\n".join(parts)


# --- the chart ------------------------------------------------------------------------------------
def _time_ticks(since: float, until: float, most: int = 8) -> tuple[list[float], float]:
    span = until - since
    step = next((s for s in _NICE_STEPS_S if span / s <= most), None)
    if step is None:
        step = math.ceil(span / most / 86400) * 86400
    first = math.ceil(since / step) * step
    ticks = []
    t = first
    while t <= until + 1e-6:
        ticks.append(float(t))
        t += step
    return ticks, step


def _tick_label(t: float, step: float) -> tuple[str, str]:
    """Two lines: the time, and the date where it changes (or for day steps, the date)."""
    dt = datetime.fromtimestamp(t, UTC)
    if step >= 86400:
        return dt.strftime("%b %d"), dt.strftime("%Y") if step >= 28 * 86400 else ""
    return dt.strftime("%H:%M"), dt.strftime("%b %d")


def _count_ticks(top: int, most: int = 6) -> list[int]:
    step = 1
    for candidate in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        step = candidate
        if top / candidate <= most:
            break
    else:
        step = math.ceil(top / most)
    return list(range(0, top + 1, step))


def _chart(p: dict[str, Any], since: float, until: float) -> str:
    points: list[tuple[float, int]] = []
    for item in p.get("timeline") or []:
        if isinstance(item, list | tuple) and len(item) == 2:
            try:
                points.append((parse_rfc3339(str(item[0])), int(item[1])))
            except (ValueError, TypeError):
                continue
    if not points or points[0][0] > since:
        points.insert(0, (since, 0))
    seats = p.get("seats") if isinstance(p.get("seats"), int) else None
    highest = max([n for _, n in points] + [seats or 0, 1])
    top = highest + max(1, math.ceil(highest * 0.12))  # headroom above the seat line
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + (min(max(t, since), until) - since) / (until - since) * plot_w

    def y(n: float) -> float:
        return TOP + plot_h - n / top * plot_h

    name = _name(p)
    svg = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="Seats in use over time, {_esc(name)}">',
        f"<title>Seats of {_esc(name)} in use over time</title>",
    ]
    for n in _count_ticks(top):
        svg.append(
            f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(n):.1f}" y2="{y(n):.1f}"/>'
            f'<text x="{LEFT - 8}" y="{y(n) + 4:.1f}" text-anchor="end">{n}</text>'
        )
    ticks, step = _time_ticks(since, until)
    last_date = None
    for t in ticks:
        first, second = _tick_label(t, step)
        if step < 86400:
            second, last_date = ("" if second == last_date else second), second
        svg.append(
            f'<line class="grid" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'
            f'<text x="{x(t):.1f}" y="{TOP + plot_h + 17}" text-anchor="middle">{_esc(first)}'
            f"</text>"
        )
        if second:
            svg.append(
                f'<text x="{x(t):.1f}" y="{TOP + plot_h + 32}" text-anchor="middle">'
                f"{_esc(second)}</text>"
            )
    # The step line: each value holds until the next point, the last one until `until`.
    d = [f"M{x(points[0][0]):.1f},{y(points[0][1]):.1f}"]
    for t, n in points[1:]:
        d.append(f"H{x(t):.1f}V{y(n):.1f}")
    d.append(f"H{x(until):.1f}")
    line = "".join(d)
    base = f"{y(0):.1f}"
    svg.append(f'<path class="area" d="{line}V{base}H{x(since):.1f}Z"/>')
    svg.append(f'<path class="use" d="{line}"/>')
    if seats is not None:
        svg.append(
            f'<line class="seats" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(seats):.1f}" '
            f'y2="{y(seats):.1f}"/><text class="seatlabel" x="{LEFT + plot_w - 4}" '
            f'y="{y(seats) - 6:.1f}" text-anchor="end">{seats} seats licensed</text>'
        )
    peak_at = p.get("peak_at")
    if peak_at and p.get("peak_in_use"):
        try:
            px, py = x(parse_rfc3339(peak_at)), y(p["peak_in_use"])
            svg.append(
                f'<circle class="peak" cx="{px:.1f}" cy="{py:.1f}" r="4"/>'
                f'<text x="{min(px + 7, LEFT + plot_w - 60):.1f}" y="{py - 7:.1f}">'
                f"peak {int(p['peak_in_use'])}</text>"
            )
        except (ValueError, TypeError):
            pass
    svg.append(
        f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + plot_h}"/>'
        f'<line class="axis" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{TOP + plot_h}" '
        f'y2="{TOP + plot_h}"/>'
        f'<text class="title" x="14" y="{TOP + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {TOP + plot_h / 2:.1f})">seats in use</text>'
        f'<text class="title" x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 6}" '
        f'text-anchor="middle">time (UTC)</text>'
    )
    if not p.get("sessions"):
        svg.append(
            f'<text class="title" x="{LEFT + plot_w / 2:.1f}" y="{TOP + plot_h / 2:.1f}" '
            f'text-anchor="middle">no use in this period</text>'
        )
    svg.append("</svg>")
    return "".join(svg)
