"""The leaderboard as one self-contained HTML page: the paper's plots as inline SVG, then the table.

No scripts, fonts or images from elsewhere: the page works offline and as a CI artefact. For each
(size, base kind): normalised held-in and held-out performance against the number of merged experts,
one line per method (error bars: the row's 95% interval, a bootstrap over seeds and test examples; the
standard deviation over seeds when the leaderboard was built without intervals), the multitask model as
a dashed reference line. Then the table (intervals, best and tied marks, the hyperparameters chosen per
seed), what the marks mean, and the spread from random draws for stochastic methods run with ``draws: K``.
"""

from __future__ import annotations

import html
import math
from typing import Any

from mergebench.study import report as rep
from mergebench.study.leaderboard import COLUMNS, DRAW_COLUMNS, Row, draw_rows, notes, table_rows

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 16px; margin: 18px 0 4px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg { background: #fff; border: 1px solid #ddd; }
svg .t { font-size: 13px; font-weight: 600; } svg .a { font-size: 11px; fill: #555; }
svg .l { font-size: 11px; } svg .g { stroke: #eee; }
table { border-collapse: collapse; margin-top: 16px; }
td, th { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: left; }
tr.baseline td { color: #777; font-style: italic; }
.meta, .note { color: #666; font-size: 12px; }
"""
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f"]
W, H, LEFT, RIGHT, TOP, BOTTOM = 420, 280, 52, 118, 30, 40


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def chart(title: str, xs: list[int], series: dict[str, list[tuple[int, float, float, float]]],
          reference: list[tuple[int, float]] | None, ylabel: str, colours: dict[str, str] | None = None) -> str:
    """An SVG line chart; ``series``: name -> [(x, mean, bar low, bar high)], ``reference``: [(x, value)] dashed."""
    values = [v for pts in series.values() for _, _, lo, hi in pts for v in (lo, hi)]
    values += [m for pts in series.values() for _, m, _, _ in pts]
    values += [v for _, v in reference or []]
    if not values or not xs:
        return ""
    lo, hi = min(values), max(values)
    pad = max(0.02, (hi - lo) * 0.1)
    lo, hi = lo - pad, hi + pad
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: int) -> float:
        return LEFT + (pw * (xs.index(x) / (len(xs) - 1)) if len(xs) > 1 else pw / 2)

    def py(y: float) -> float:
        return TOP + ph * (1 - (y - lo) / (hi - lo))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
           f'aria-label="{html.escape(title)}">',
           f'<text x="{LEFT + pw / 2}" y="18" text-anchor="middle" class="t">{html.escape(title)}</text>']
    for i in range(5):  # horizontal grid with labels
        y = lo + (hi - lo) * i / 4
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" class="g"/>'
                   f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end" class="a">{_fmt(y)}</text>')
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{TOP + ph + 16}" text-anchor="middle" class="a">{x}</text>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 6}" text-anchor="middle" class="a">number of experts merged (N)</text>')
    out.append(f'<text x="12" y="{TOP + ph / 2}" text-anchor="middle" class="a" '
               f'transform="rotate(-90 12 {TOP + ph / 2})">{html.escape(ylabel)}</text>')
    legend_y = TOP + 4
    if reference:
        pts = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in reference)
        out.append(f'<polyline points="{pts}" fill="none" stroke="#444" stroke-width="1.5" stroke-dasharray="5,4"/>')
        out += [f'<rect x="{px(x) - 3:.1f}" y="{py(v) - 3:.1f}" width="6" height="6" fill="none" stroke="#444">'
                f'<title>multitask, N={x}: {v:.3f}</title></rect>' for x, v in reference]
        out.append(f'<line x1="{LEFT + pw + 10}" x2="{LEFT + pw + 28}" y1="{legend_y}" y2="{legend_y}" stroke="#444" '
                   f'stroke-dasharray="5,4"/><text x="{LEFT + pw + 32}" y="{legend_y + 4}" class="l">multitask</text>')
        legend_y += 16
    colours = colours or {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(series))}
    for name, pts in sorted(series.items()):
        colour = colours[name]
        pts = sorted(pts)
        line = " ".join(f"{px(x):.1f},{py(m):.1f}" for x, m, _, _ in pts)
        out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, m, low, high in pts:  # not lo, hi: those are the axis range py() reads
            if high > low:
                out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{py(low):.1f}" y2="{py(high):.1f}" '
                           f'stroke="{colour}" stroke-width="1"/>')
            bar = f" [{low:.3f}, {high:.3f}]" if high > low else ""
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(m):.1f}" r="3" fill="{colour}">'
                       f'<title>{html.escape(name)}, N={x}: {m:.3f}{bar}</title></circle>')
        out.append(f'<line x1="{LEFT + pw + 10}" x2="{LEFT + pw + 28}" y1="{legend_y}" y2="{legend_y}" '
                   f'stroke="{colour}" stroke-width="2"/><text x="{LEFT + pw + 32}" y="{legend_y + 4}" '
                   f'class="l">{html.escape(name)}</text>')
        legend_y += 16
    out.append("</svg>")
    return "".join(out)


def _panels(rows: list[Row]) -> list[str]:
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.size, r.base_kind), []).append(r)
    panels = []
    # one colour per method on every chart of the page
    methods = sorted({r.method for r in rows if r.kind == "merge"})
    colours = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(methods)}
    for (size, kind), rs in sorted(groups.items()):
        xs = sorted({r.n for r in rs})
        charts = []
        for metric, label in (("held_in", "normalised held-in"), ("held_out", "normalised held-out")):
            series: dict[str, list[tuple[int, float, float, float]]] = {}
            for r in rs:
                stat, ci = getattr(r, metric), getattr(r, f"{metric}_ci")
                if r.kind == "merge" and stat.mean is not None:
                    low, high = ci if ci is not None else (stat.mean - (stat.std or 0.0), stat.mean + (stat.std or 0.0))
                    series.setdefault(r.method, []).append((r.n, stat.mean, low, high))
            reference = sorted((r.n, getattr(r, metric).mean) for r in rs
                               if r.method == "multitask" and getattr(r, metric).mean is not None)
            charts.append(chart(f"{size}, {kind.replace('_', '-')} base: {label.split()[1]}", xs, series, reference, label,
                                colours))
        panels.append(f'<section><h2>{html.escape(size)} · {html.escape(kind.replace("_", "-"))} base</h2>'
                      f'<div class="charts">{"".join(charts)}</div></section>')
    return panels


def render(rows: list[Row], db: Any = None, title: str = "mergebench leaderboard") -> str:
    meta = ""
    if db is not None:
        config, versions = db.meta("config") or {}, db.meta("versions") or {}
        seeds = sorted({seed for r in rows for seed in r.seeds})  # what the rows hold, not the last config
        meta = (f"<p class='meta'>suite <b>{html.escape(str(config.get('suite', '?')))}</b>, seeds "
                f"{html.escape(', '.join(map(str, seeds)) or '-')}; "
                + ", ".join(f"{html.escape(k)} {html.escape(str(v))}" for k, v in versions.items()) + "</p>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        f"<tr class='{r.kind}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
        for r, cells in zip(rows, table_rows(rows)))
    explained = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes(rows))
    drawn = draw_rows(rows)
    draws = ""
    if drawn:
        draws = ("<h2>Random draws of stochastic methods</h2><p class='note'>Standard deviation of one merge's score "
                 "from its random draw (pooled within seeds) and between seeds (beyond the draws'), and the draws' share "
                 "of the variance.</p><table><thead><tr>"
                 + "".join(f"<th>{html.escape(c)}</th>" for c in DRAW_COLUMNS) + "</tr></thead><tbody>"
                 + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in drawn)
                 + "</tbody></table>")
    spread = ("95% interval (two-level bootstrap over seeds and test examples)" if any(r.held_in_ci for r in rows)
              else "± standard deviation over seeds")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
{meta}
<p class="note">Normalised test scores as in Yadav et al. (2024): held-in = merged / the category's expert,
held-out = merged / the base (zero-shot); means over datasets, then categories, then seeds; error bars:
{spread}. Hyperparameters (lambda, density) chosen on the validation split.</p>
{"".join(_panels(rows))}
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{explained}
{draws}
</body></html>
"""


# ---- the report (mergebench report --format html) ----------------------------------------------------

LOW, HIGH = (214, 96, 77), (67, 147, 195)  # below and above the centre of a heatmap; white at the centre


def colour(value: float | None, centre: float = 1.0, span: float = 0.5) -> str:
    """A heatmap cell's background: white at ``centre``, deepening to red below it and to blue above it, full at
    ``centre -+ span``; light grey where there is no value."""
    if value is None or math.isnan(value):
        return "#f2f2f2"
    t = max(-1.0, min(1.0, (value - centre) / span))
    end = LOW if t < 0 else HIGH
    return "#" + "".join(f"{round(255 + abs(t) * (c - 255)):02x}" for c in end)


def heatmap(columns: list[str], rows: list[tuple[list[str], list[float | None]]], centre: float = 1.0,
            span: float = 0.5) -> str:
    """A table whose value cells are coloured by :func:`colour`; ``columns`` name the label cells, then the values;
    each row is (label cells, values)."""
    labels = len(columns) - (len(rows[0][1]) if rows else 0)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for cells, values in rows:
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        for name, v in zip(columns[labels:], values):
            text = "" if v is None else f"{v:.2f}"
            tip = f"{' '.join(cells)}, {name}: " + ("not merged" if v is None else f"{v:.3f}")
            tds += (f'<td class="h" style="background:{colour(v, centre, span)}" title="{html.escape(tip)}">'
                    f"{text}</td>")
        body.append(f"<tr>{tds}</tr>")
    return f'<table class="heat"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _table(columns, rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(report: dict[str, Any], title: str = "mergebench report") -> str:
    """``mergebench report --format html``: the findings with their tests, the per-category heatmaps (held-in: each
    expert's retention; held-out: over the base), the share of merges beating the base and the best expert, and
    the plan; one offline page."""
    verdict_class = {rep.REPRODUCED: "ok", rep.PARTLY: "part", rep.NOT_REPRODUCED: "no", rep.INCONCLUSIVE: "open"}
    parts = [f"<p class='meta'>{html.escape(rep.run_line(report))}</p>",
             f"<p class='note'><b>Verdict rule.</b> {html.escape(report['verdict_rule'])}</p>",
             "<h2>The paper's findings</h2>", _table(rep.SUMMARY_COLUMNS, rep.summary_rows(report))]
    for f in report["findings"]:
        number = f["id"].split("-")[0]
        parts.append(f"<h2>{number}. {html.escape(f['claim'])} <span class='v {verdict_class[f['verdict']]}'>"
                     f"{html.escape(f['verdict'])}</span></h2>"
                     f"<p class='note'>Statistic: {html.escape(f['statistic'])}</p>")
        if f["tests"]:
            parts.append(_table(rep.TEST_COLUMNS, rep.test_rows(f)))
        parts.append(f"<p class='note'>{html.escape(f['note'])}</p>")
        if f["rows"]:
            parts.append(f"<details><summary>the {len(f['rows'])} rows behind it</summary>"
                         f"{_table(rep.ROW_COLUMNS, rep.finding_rows(f))}</details>")
    parts += ["<h2>Planning the next run</h2>", f"<p class='note'>{html.escape(rep.planning_text(report))}</p>",
              ("<h2>Per category</h2><p class='note'>Normalised test score per category, mean over the seeds whose "
               "merges include the category; white at 1, red below, blue above; blank: not merged. Baselines in "
               "parentheses.</p>")]
    for metric, heading in (("held_in", "Held-in: each expert's retention (merge / the category's expert)"),
                            ("held_out", "Held-out per category (merge / base)")):
        columns, rows = rep.category_table(report, metric)
        parts += [f"<h2>{html.escape(heading)}</h2>", heatmap(columns, rows)]
    parts += [("<h2>Merges that beat the base and the best expert</h2><p class='note'>Share of merges (one per "
               "method and seed) whose normalised score is above the base's and above the best single expert's, as "
               "arXiv 2511.21437 reports.</p>"), _table(rep.SHARE_COLUMNS, rep.share_rows(report))]
    extra = """
td.h { text-align: right; font-variant-numeric: tabular-nums; min-width: 3em; }
.v { font-size: 13px; padding: 1px 6px; border-radius: 3px; margin-left: 6px; }
.v.ok { background: #d6ecd2; } .v.part { background: #fbecc6; } .v.no { background: #f6d2cc; }
.v.open { background: #e6e6e6; } details { margin: 4px 0 12px; }
"""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}{extra}</style></head><body>
<h1>{html.escape(title)}</h1>
{"".join(parts)}
</body></html>
"""
