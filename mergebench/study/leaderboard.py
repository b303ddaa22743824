"""The leaderboard: chosen merges and baselines, normalised as in the paper, aggregated over seeds.

Rows are (size, base kind, N, method). Baselines for each (size, base kind, N) are computed from
the same raw test scores: the base itself (held-out 1 by definition), the experts (held-in 1 by
definition; held-out is their mean), and the multitask model, each normalised over the same N
held-in categories as the merges it sits beside.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergebench.core.errors import InputError
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
    params: list[dict[str, Any]] = field(default_factory=list)

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


def build(db: ResultsDB, sizes: tuple[str, ...] = (), base_kinds: tuple[str, ...] = (),
          methods: tuple[str, ...] = (), sort: str = "default") -> list[Row]:
    """Leaderboard rows (merges, then baselines within each group), filtered and sorted."""
    suite = db.meta("suite")
    if suite is None:
        raise InputError(f"{db.path}: the run has not recorded its suite yet; nothing to show")
    merged: dict[tuple, list] = {}
    groups: dict[tuple, dict[int, list[str]]] = {}
    for r in db.rows("SELECT * FROM merges ORDER BY seed"):
        merged.setdefault((r["size"], r["base_kind"], r["n"], r["method"]), []).append(r)
        groups.setdefault((r["size"], r["base_kind"], r["n"]), {})[r["seed"]] = json.loads(r["experts"])
    rows = [Row(size, kind, n, method, "merge", Stat.of([r["held_in"] for r in rs]), Stat.of([r["held_out"] for r in rs]),
                [r["seed"] for r in rs], [json.loads(r["params"]) for r in rs])
            for (size, kind, n, method), rs in merged.items()]
    rows += _baselines(db, suite, groups)
    rows = [r for r in rows if (not sizes or r.size in sizes) and (not base_kinds or r.base_kind in base_kinds)
            and (not methods or r.method in methods or r.kind == "baseline")]

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
    if row.kind != "merge":
        return "baseline"
    texts = sorted({", ".join(f"{k}={v}" for k, v in sorted(p.items()) if k not in ("trim_scope",)) for p in row.params})
    return "; ".join(t or "no parameters" for t in texts) if texts else "-"


COLUMNS = ("size", "base", "N", "method", "held-in", "held-out", "seeds", "chosen (validation)")


def table_rows(rows: list[Row]) -> list[list[str]]:
    return [[r.size, r.base_kind, str(r.n), r.method, r.held_in.text(), r.held_out.text(), str(len(r.seeds)),
             _params_text(r)] for r in rows]


def markdown(rows: list[Row], title: str = "mergebench leaderboard") -> str:
    lines = [f"## {title}", "",
             "Normalised scores (held-in: merged / expert of the category; held-out: merged / base, zero-shot), "
             "mean ± standard deviation over seeds, on the test splits; hyperparameters chosen on validation.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r, cells in zip(rows, table_rows(rows)):
        if r.kind == "baseline":
            cells = [f"*{c}*" if i == 3 else c for i, c in enumerate(cells)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(rows: list[Row]) -> str:
    return json.dumps([r.record() for r in rows], indent=2) + "\n"


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["size", "base_kind", "n", "method", "kind", "held_in_mean", "held_in_std", "held_out_mean",
                "held_out_std", "seeds", "params"])
    for r in rows:
        w.writerow([r.size, r.base_kind, r.n, r.method, r.kind, r.held_in.mean, r.held_in.std, r.held_out.mean,
                    r.held_out.std, len(r.seeds), json.dumps(r.params)])
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
