"""The leaderboard: chosen merges and baselines, normalised as in the paper, aggregated over seeds.

Rows are (size, base kind, N, method). Baselines for each (size, base kind, N) are computed from
the same raw test scores: the base itself (held-out 1 by definition), the experts (held-in 1 by
definition; held-out is their mean), and the multitask model, each normalised over the same N
held-in categories as the merges it sits beside.

A row's score is the mean over seeds (of the mean over random draws, for a stochastic method run with
``draws: K``); its 95% interval comes from the two-level bootstrap over seeds and test examples of
:mod:`mergebench.study.statistics` (B = 2000 replicates, generator seed 0: reproducible). Within each
(size, base kind, N) group the merge with the highest mean is ``best`` for that metric, and a merge whose
interval overlaps the best's is ``tied`` with it (overlapping intervals do not show the two equal, only
that this table cannot order them: ``mergebench compare`` tests a pair with paired data). The variance
from random draws is reported apart from the variance between seeds (``draws``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from mergebench.core.errors import InputError
from mergebench.study import evidence, statistics
from mergebench.study.normalise import normalise
from mergebench.study.database import ResultsDB

BASELINES = ("multitask", "experts", "base")


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float | None]) -> "Stat":
        values = [v for v in values if v is not None]
        if not values:
            return cls(None, None, 0)
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return cls(mean, std, len(values))

    def text(self, digits: int = 3) -> str:
        if self.mean is None:
            return "-"
        return f"{self.mean:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.n > 1 else "")


@dataclass
class Row:
    size: str
    base_kind: str
    n: int
    method: str
    kind: str  # "merge" or "baseline"
    held_in: Stat
    held_out: Stat
    seeds: list[int] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)  # the chosen hyperparameters, one per seed
    held_in_ci: list[float] | None = None  # 95% interval [low, high]
    held_out_ci: list[float] | None = None
    held_in_rank: str | None = None  # merges: "best" in the group, "tied" (interval overlaps the best's), "below"
    held_out_rank: str | None = None
    ci_basis: str | None = None  # what the intervals resample: seeds and examples, or seeds only
    # stochastic methods with draws: K: {"per_seed": K, "held_in": {"draw_sd", "seed_sd", "draw_share"}, "held_out":
    # {...}, "params": {seed: [the parameters each draw's sweep chose]}}
    draws: dict[str, Any] | None = None
    searched: list[str] | None = None  # the parameters its sweep chose (the table shows those); None: all

    @property
    def key(self) -> str:
        return f"{self.size}/{self.base_kind}/N={self.n}/{self.method}"

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["key"] = self.key
        return out


def _baselines(db: ResultsDB, suite: dict, groups: dict[tuple, dict[int, list[str]]]) -> list[Row]:
    """Baseline rows per (size, base kind, N) from raw test scores; ``groups`` gives each seed's categories."""
    rows = []
    for (size, kind, n), by_seed in sorted(groups.items()):
        values: dict[str, list[tuple[float | None, float | None]]] = {b: [] for b in BASELINES}
        for seed, categories in by_seed.items():
            models = {(r["role"], r["category"]): r["key"] for r in db.rows(
                "SELECT * FROM models WHERE seed = ? AND size = ? AND base_kind = ?", (seed, size, kind))}
            base_key = models.get(("base", None))
            if base_key is None or any(("expert", c) not in models for c in categories):
                continue
            base_scores = db.scores(base_key, "test")
            experts = {c: db.scores(models[("expert", c)], "test") for c in categories}
            held_in = {c: suite["held_in"][c] for c in categories}
            for name, key in (("base", base_key), ("multitask", models.get(("multitask", None)))):
                if key is not None and db.scores(key, "test"):
                    s = normalise(db.scores(key, "test"), held_in, suite["held_out"], experts, base_scores, on_zero="skip")
                    values[name].append((s.held_in, s.held_out))
            outs = [normalise(experts[c], {}, suite["held_out"], {}, base_scores, on_zero="skip").held_out for c in categories]
            outs = [o for o in outs if o is not None]
            values["experts"].append((1.0, sum(outs) / len(outs) if outs else None))
        for name in BASELINES:
            if values[name]:
                rows.append(Row(size, kind, n, name, "baseline", Stat.of([v[0] for v in values[name]]),
                                Stat.of([v[1] for v in values[name]]), sorted(by_seed)))
    return rows


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def add_intervals(db: ResultsDB, suite: dict, rows: list[Row], n_boot: int = 2000, seed: int = 0) -> None:
    """Give each row its held-in and held-out 95% intervals (two-level bootstrap) and each merge its rank in
    its (size, base kind, N) group: best, tied (its interval overlaps the best's) or below."""
    by_group: dict[tuple, list[Row]] = {}
    for r in rows:
        by_group.setdefault((r.size, r.base_kind, r.n), []).append(r)
    for (size, kind, n), group_rows in by_group.items():
        group = evidence.Group(db, suite, size, kind, n)
        if not group.seeds:
            continue
        wanted = [evidence.Quantity(r.method, m) for r in group_rows for m in evidence.METRICS]
        intervals, bases = {}, {}
        for name, (seeds, replicates) in group.bootstrap(wanted, n_boot, seed).items():
            intervals[name] = statistics.percentile_interval(replicates)
            bases[name] = group.basis(next(q for q in wanted if q.name == name), seeds)
        for r in group_rows:
            for metric in evidence.METRICS:
                name = evidence.Quantity(r.method, metric).name
                if intervals.get(name) is not None:
                    setattr(r, f"{metric}_ci", list(intervals[name]))
            found = {bases[q] for q in (evidence.Quantity(r.method, m).name for m in evidence.METRICS) if q in bases}
            r.ci_basis = None if not found else found.pop() if len(found) == 1 else evidence.PARTLY
        for metric in evidence.METRICS:
            merges = [r for r in group_rows if r.kind == "merge" and getattr(r, metric).mean is not None
                      and getattr(r, f"{metric}_ci") is not None]
            if not merges:
                continue
            best = max(merges, key=lambda r: getattr(r, metric).mean)
            low, high = getattr(best, f"{metric}_ci")
            for r in merges:
                lo, hi = getattr(r, f"{metric}_ci")
                setattr(r, f"{metric}_rank", "best" if r is best else "tied" if lo <= high and hi >= low else "below")


def build(db: ResultsDB, sizes: tuple[str, ...] = (), base_kinds: tuple[str, ...] = (),
          methods: tuple[str, ...] = (), sort: str = "default", n_boot: int = 2000, ci_seed: int = 0) -> list[Row]:
    """Leaderboard rows (merges, then baselines within each group), filtered and sorted; with ``n_boot`` > 0, each
    with its intervals from ``n_boot`` bootstrap replicates drawn with generator seed ``ci_seed``."""
    suite = db.meta("suite")
    if suite is None:
        raise InputError(f"{db.path}: the run has not recorded its suite yet; nothing to show")
    merged: dict[tuple, list] = {}
    groups: dict[tuple, dict[int, list[str]]] = {}
    for r in db.rows("SELECT * FROM merges ORDER BY seed"):
        merged.setdefault((r["size"], r["base_kind"], r["n"], r["method"]), []).append(r)
        groups.setdefault((r["size"], r["base_kind"], r["n"]), {})[r["seed"]] = json.loads(r["experts"])
    further: dict[tuple, list] = {}  # draws 1.. of stochastic methods (draws: K), by (size, kind, n, method, seed)
    for r in db.rows("SELECT * FROM draws ORDER BY draw"):
        further.setdefault((r["size"], r["base_kind"], r["n"], r["method"], r["seed"]), []).append(r)
    searched: dict[str, set[str]] = {}  # method -> the parameters its sweeps' grids vary
    for r in db.rows("SELECT spec FROM units WHERE kind = 'sweep'"):
        spec = json.loads(r["spec"])
        if isinstance(spec, dict) and "method" in spec:
            searched.setdefault(spec["method"], set()).update(k for point in spec.get("grid") or [] for k in point)
    rows = []
    for (size, kind, n, method), rs in merged.items():
        per_seed = {metric: [[r[metric]] + [d[metric] for d in further.get((size, kind, n, method, r["seed"]), [])]
                             for r in rs] for metric in ("held_in", "held_out")}
        row = Row(size, kind, n, method, "merge", Stat.of([_mean(v) for v in per_seed["held_in"]]),
                  Stat.of([_mean(v) for v in per_seed["held_out"]]), [r["seed"] for r in rs],
                  [json.loads(r["params"]) for r in rs])
        if method in searched:
            row.searched = sorted(searched[method])
        if any(len(v) > 1 for v in per_seed["held_in"]):
            row.draws = {"per_seed": max(len(v) for v in per_seed["held_in"]),
                         **{m: statistics.variance_components(per_seed[m]) for m in per_seed},
                         "params": {r["seed"]: [json.loads(r["params"])] + [json.loads(d["params"]) for d in further.get(
                             (size, kind, n, method, r["seed"]), [])] for r in rs}}
        rows.append(row)
    rows += _baselines(db, suite, groups)
    rows = [r for r in rows if (not sizes or r.size in sizes) and (not base_kinds or r.base_kind in base_kinds)]
    if n_boot:  # before the methods filter: a merge is best or tied among every merge of its group
        add_intervals(db, suite, rows, n_boot, ci_seed)
    rows = [r for r in rows if not methods or r.method in methods or r.kind == "baseline"]

    def neg(stat: Stat) -> float:
        return -stat.mean if stat.mean is not None else math.inf

    keys = {
        "default": lambda r: (r.size, r.base_kind, r.n, r.kind != "merge", neg(r.held_in)),
        "held_in": lambda r: (neg(r.held_in), r.key),
        "held_out": lambda r: (neg(r.held_out), r.key),
        "method": lambda r: (r.method, r.size, r.base_kind, r.n),
        "n": lambda r: (r.n, r.size, r.base_kind, r.kind != "merge", neg(r.held_in)),
    }
    if sort not in keys:
        raise InputError(f"unknown sort '{sort}' (valid: {', '.join(keys)})")
    return sorted(rows, key=keys[sort])


def _params_text(row: Row) -> str:
    """The hyperparameters chosen on validation, seed by seed: equal choices share one entry naming their seeds."""
    if row.kind != "merge":
        return "baseline"

    def text(p: dict) -> str:
        shown = (lambda k: k in row.searched) if row.searched is not None else (lambda k: k != "trim_scope")
        return ", ".join(f"{k}={v}" for k, v in sorted(p.items()) if shown(k))

    if len(row.params) != len(row.seeds):  # not one per seed: the distinct choices
        texts = sorted({text(p) for p in row.params})
        return "; ".join(t or "no parameters" for t in texts) if texts else "-"
    chosen: dict[str, list[int]] = {}
    for seed, p in zip(row.seeds, row.params):
        chosen.setdefault(text(p), []).append(seed)
    if not chosen:
        return "-"
    if list(chosen) == [""]:
        return "no parameters"
    return "; ".join(f"{t or 'no parameters'} ({'seed' if len(ss) == 1 else 'seeds'} {', '.join(map(str, ss))})"
                     for t, ss in sorted(chosen.items()))


COLUMNS = ("size", "base", "N", "method", "held-in", "held-out", "seeds", "chosen (validation)")
MARKS = {"best": " ▲", "tied": " ≈", "below": "", None: ""}


def _cell(stat: Stat, ci: list[float] | None, rank: str | None) -> str:
    """The mean with its 95% interval and its mark when it has one; else the mean ± standard deviation over seeds."""
    if ci is None or stat.mean is None:
        return stat.text()
    return f"{stat.mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]{MARKS[rank]}"


def table_rows(rows: list[Row]) -> list[list[str]]:
    return [[r.size, r.base_kind, str(r.n), r.method, _cell(r.held_in, r.held_in_ci, r.held_in_rank),
             _cell(r.held_out, r.held_out_ci, r.held_out_rank), str(len(r.seeds)), _params_text(r)] for r in rows]


def notes(rows: list[Row]) -> list[str]:
    """What the intervals and marks mean, and where they rest on seeds only; empty for rows without intervals."""
    if not any(r.held_in_ci or r.held_out_ci for r in rows):
        return []
    out = ["Intervals: two-level bootstrap over seeds and test examples (mergebench.study.statistics). ▲ the best "
           "merge of its (size, base, N) group; ≈ a merge whose interval overlaps the best's: the table cannot order "
           "them (`mergebench compare RUN A B` tests a pair on paired data)."]
    seeds_only = sorted({r.key for r in rows if r.ci_basis in (evidence.SEEDS_ONLY, evidence.PARTLY)})
    if seeds_only:
        out.append(f"Intervals over seeds only ({len(seeds_only)} rows, e.g. {seeds_only[0]}): no per-example results "
                   "were recorded for some of their datasets (an evaluator that returns only scores, or evaluated "
                   "before they were kept).")
    return out


def draw_rows(rows: list[Row]) -> list[list[str]]:
    """The spread from random draws apart from the spread between seeds, for rows run with draws: K."""
    def sd(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def share(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f}%"

    out = []
    for r in rows:
        if r.draws:
            cells = [r.size, r.base_kind, str(r.n), r.method, str(r.draws["per_seed"])]
            for metric in ("held_in", "held_out"):
                parts = r.draws[metric]
                cells += [sd(parts["draw_sd"]), sd(parts["seed_sd"]), share(parts["draw_share"])]
            out.append(cells)
    return out


DRAW_COLUMNS = ("size", "base", "N", "method", "draws", "held-in: sd from draws", "sd from seeds", "draws' share",
                "held-out: sd from draws", "sd from seeds", "draws' share")


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines; a ``|`` inside a cell is escaped so it cannot split the cell."""
    def cell(c: Any) -> str:
        return str(c).replace("|", "\\|")

    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


def markdown(rows: list[Row], title: str = "mergebench leaderboard") -> str:
    spread = ("mean over seeds [95% interval]" if any(r.held_in_ci or r.held_out_ci for r in rows)
              else "mean ± standard deviation over seeds")
    lines = [f"## {title}", "",
             "Normalised scores (held-in: merged / expert of the category; held-out: merged / base, zero-shot), "
             f"{spread}, on the test splits; hyperparameters chosen on validation.", ""]
    lines += markdown_table(COLUMNS, ([f"*{c}*" if r.kind == "baseline" and i == 3 else c for i, c in enumerate(cells)]
                                      for r, cells in zip(rows, table_rows(rows))))
    extra = notes(rows)
    if extra:
        lines += [""] + extra
    drawn = draw_rows(rows)
    if drawn:
        lines += ["", "### Random draws (stochastic methods, draws: K)", "",
                  "Standard deviation of one merge's score from its random draw (pooled within seeds) and between "
                  "seeds (beyond the draws'), and the draws' share of the variance.", ""]
        lines += markdown_table(DRAW_COLUMNS, drawn)
    return "\n".join(lines) + "\n"


def to_json(rows: list[Row]) -> str:
    return json.dumps([r.record() for r in rows], indent=2) + "\n"


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["size", "base_kind", "n", "method", "kind", "held_in_mean", "held_in_std", "held_out_mean",
                "held_out_std", "seeds", "params", "held_in_ci", "held_out_ci", "held_in_rank", "held_out_rank",
                "ci_basis", "draws"])
    for r in rows:
        w.writerow([r.size, r.base_kind, r.n, r.method, r.kind, r.held_in.mean, r.held_in.std, r.held_out.mean,
                    r.held_out.std, len(r.seeds), json.dumps(r.params),
                    "" if r.held_in_ci is None else json.dumps(r.held_in_ci),
                    "" if r.held_out_ci is None else json.dumps(r.held_out_ci), r.held_in_rank or "",
                    r.held_out_rank or "", r.ci_basis or "", "" if r.draws is None else json.dumps(r.draws)])
    return buf.getvalue()


# ---- the CI gate ---------------------------------------------------------------------------------

def baseline_record(rows: list[Row]) -> dict[str, Any]:
    return {"format": "mergebench-baseline/1",
            "rows": {r.key: {"held_in": r.held_in.mean, "held_out": r.held_out.mean}
                     for r in rows if r.kind == "merge"}}


def check(rows: list[Row], baseline_path: Path, tolerance: float) -> list[str]:
    """Rows whose normalised scores fell more than ``tolerance`` below the baseline (or vanished)."""
    try:
        baseline = json.loads(Path(baseline_path).read_text())
        saved = baseline["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{baseline_path}: not a mergebench baseline (write one with --save-baseline)") from None
    current = {r.key: r for r in rows if r.kind == "merge"}
    failures = []
    for key, old in sorted(saved.items()):
        row = current.get(key)
        if row is None:
            failures.append(f"{key}: missing from this run")
            continue
        for metric in ("held_in", "held_out"):
            new, was = getattr(row, metric).mean, old.get(metric)
            if was is not None and (new is None or new < was - tolerance):
                shown = "none" if new is None else f"{new:.3f}"
                failures.append(f"{key}: {metric.replace('_', '-')} {shown} < baseline {was:.3f} - {tolerance}")
    return failures
