"""``mergebench report RUN``: the paper's six findings tested on a run, a per-category view, and a plan.

The paper is Yadav et al. (2024), *What Matters for Model Merging at Scale?* (``shared/paper.md``). Every
number is recomputed from the run directory: normalised test scores as on the leaderboard (held-in = merged /
the category's expert, held-out = merged / the base; datasets, then categories, then seeds averaged), their
replicates from the two-level bootstrap of :mod:`mergebench.study.statistics` (seeds, then test examples).

**Notation.** A *cell* is one leaderboard row's score: (size, base kind, N, row, metric), its value the mean
over seeds (of the mean over random draws). H = normalised held-in, O = normalised held-out. "Merges" are
every merge method of the run (not only the paper's four). Sizes are ordered by the parameter count of their
bases (read from the safetensors headers); when those files are gone, in the order the run's config lists
them. PT = the ``pretrained`` base kind, IT = ``instruction_tuned``.

**Findings and their statistics** (each a paired contrast: cells are compared at the same seeds, whose test
examples are the same questions, so the bootstrap resamples the seeds and examples of every cell together):

1. *Instruction-tuned bases merge better.* One test per size having both base kinds: the mean over matched
   (N, method) of H(IT) - H(PT). Paper's direction: > 0.
2. *Larger models merge more easily.* One test per base kind and pair of consecutive sizes (s < s'): the
   mean over matched (N, method) of H(s') - H(s). Direction: > 0. Needs two sizes.
3. *Merging improves held-out generalisation, and more experts help.* (a) one test per (size, base kind): the
   mean over (N, method) of O(merge) - O(base) (O(base) = 1: the merge against the base's own zero-shot
   score); (b) one test per (size, base kind) with two N or more: the mean over methods of O(N_max) -
   O(N_min). Direction: > 0 for both. The note counts the (size, base kind, method) curves whose O rises at
   every step of N ("often monotonically").
4. *Large instruction-tuned merges of 8 experts generalise as well as or better than multitask.* At the
   largest size with an IT base and the largest N it merged (the paper: N = 8), one test per method:
   O(method) - O(multitask). "As well as or better" is non-inferiority: the threshold is -D (``--resolve``,
   default 0.05), not 0: the test agrees when the interval lies above -D, opposes when it lies below -D.
5. *Larger models can merge more experts before held-in drops.* One test per base kind and pair of
   consecutive sizes, with N_min < N_max both merged at both sizes: the mean over methods of
   [H(s', N_max) - H(s', N_min)] - [H(s, N_max) - H(s, N_min)] (the larger model loses less held-in as N
   grows). Direction: > 0.
6. *Method choice matters more for small or weak bases (the methods behave alike at scale).* The methods'
   spread in a (size, base kind, N) group is the mean absolute difference of H over every pair of methods.
   (a) one test per base kind with two sizes or more: the mean over matched N of spread(smallest size) -
   spread(largest size); (b) one test per size having both base kinds: the mean over matched N of
   spread(PT) - spread(IT). Direction: > 0. (A spread is not linear in the scores: its bootstrap replicates
   are spreads of resampled means, and noise alone makes it positive, more so for noisier groups.)

Each finding's ``effect`` and ``ci`` pool its first part's tests (``effect_of`` names them): the mean of their
statistics over the seeds all of them have (part (a) for findings 3 and 6; part (b) when the run has no
part (a) test). Every test of the report with the same seeds is resampled in one bootstrap (B = 2000
replicates, generator seed 0), so all findings read the same replicates and the report is reproducible.

JSON: ``{"run": {...}, "verdict_rule", "findings": [{"id", "claim", "verdict", "effect", "ci", "effect_of",
"statistic", "rows": [{"row", "metric", "mean", "seeds"}], "note", "tests": [{"label", "part", "effect", "ci",
"direction", "threshold", "outcome", "seeds", "per_seed", "d_z", "basis", "cells", "planning"} or {"label",
"missing", ...}], "planning"}], "categories": {"held_in", "held_out", "rows"}, "shares": [...]}``; a row's
``mean`` is the leaderboard's.

**The verdict rule, the same for every finding.** Each test compares its 95% interval with its threshold (0,
or -D for finding 4) in the paper's direction: it *agrees* when the interval lies entirely on the paper's
side, *opposes* when it lies entirely on the other side, and is *unclear* when it contains the threshold.
Then: ``reproduced`` when every test agrees; ``partly reproduced`` when some agree but not all;
``not reproduced`` when none agrees and at least one opposes; ``inconclusive`` when every interval contains
the threshold, or when the run lacks what the finding needs (a base kind, a second size, a second N, a
multitask model, two methods): the note says which. Tests the run cannot compute are listed in the note
and do not count.

**Planning** (``--resolve D``). For every test, from the observed variance: ``seeds_needed`` is
:func:`~mergebench.study.statistics.required_n` of the standard deviation over seeds of the per-seed
statistic (a paired t-test over seeds, at the current test sets; null with one seed); ``examples_needed`` is
``required_n(example_sd, D)``, the test examples per dataset that resolve D against the example-level noise
of the run's S seeds alone, where ``example_sd = sqrt(n * mean_s(v_s) / S)``: v_s is the variance of the
statistic under resampling seed s's examples only (the bootstrap with that seed alone), n the median number
of test examples per dataset (so the example noise of the S-seed statistic with n' examples per dataset is
example_sd^2 / n'). Both use alpha = 0.05 and power 0.8; each ignores the other source of noise, so a plan
needs both numbers met.

**Per-category view.** ``categories``: every row's normalised score per category (held-in: the merge on a
category's datasets over that category's expert: the expert's retention; held-out: over the base), a mean
over the seeds whose merged categories include it. ``shares``: per (size, base kind, N), the share of merges
(one per method and seed, its draws averaged) whose H (and O) is above the base's, and above the best single
expert's (the expert of one merged category, normalised over all N categories), as Hitit et al. (2025,
arXiv 2511.21437) report the probability that a merge beats its base and its best checkpoint.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mergebench.core.errors import InputError
from mergebench.study import evidence, statistics
from mergebench.study.leaderboard import markdown_table
from mergebench.study.normalise import normalise
from mergebench.study.statistics import SeedSample, Term

PRETRAINED, INSTRUCTION_TUNED = "pretrained", "instruction_tuned"
REPRODUCED, PARTLY, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "partly reproduced", "not reproduced", "inconclusive"
AGREES, OPPOSES, UNCLEAR = "agrees", "opposes", "unclear"
ALPHA, POWER, LEVEL = 0.05, 0.8, 0.95
VERDICT_RULE = ("Each test agrees when its 95% interval lies on the paper's side of its threshold (0; -D for "
                "finding 4), opposes when it lies on the other side, is unclear otherwise. Reproduced: every test "
                "agrees; partly reproduced: some agree; not reproduced: none agrees and some oppose; inconclusive: "
                "every interval contains the threshold, or the run lacks what the finding needs.")


@dataclass(frozen=True)
class Cell:
    """One leaderboard row's normalised score: (size, base kind, N, row) and a metric."""

    size: str
    base_kind: str
    n: int
    row: str
    metric: str  # "held_in" or "held_out"

    @property
    def group(self) -> tuple[str, str, int]:
        return self.size, self.base_kind, self.n

    @property
    def quantity(self) -> evidence.Quantity:
        return evidence.Quantity(self.row, self.metric)

    @property
    def key(self) -> str:  # the leaderboard's row key
        return f"{self.size}/{self.base_kind}/N={self.n}/{self.row}"

    @property
    def name(self) -> str:
        return f"{self.key}|{self.metric}"


Statistic = Callable[[Mapping[Cell, Any]], Any]  # cell values (numbers, or arrays of replicates) -> the statistic


@dataclass
class Test:
    """One contrast of a finding: its cells, the statistic over them, the paper's direction and threshold."""

    __test__ = False  # not a pytest class

    label: str
    part: str
    cells: tuple[Cell, ...]
    statistic: Statistic
    direction: int = 1
    threshold: float = 0.0


def mean_difference(pairs: Sequence[tuple[Cell, Cell]]) -> tuple[tuple[Cell, ...], Statistic]:
    """The mean over ``pairs`` of value(a) - value(b): its cells and statistic."""
    return linear({}, pairs)


def linear(weights: Mapping[Cell, float],
           pairs: Sequence[tuple[Cell, Cell]] = ()) -> tuple[tuple[Cell, ...], Statistic]:
    """sum(weight * value) over cells, plus the mean difference over ``pairs``."""
    w = dict(weights)
    for a, b in pairs:
        w[a] = w.get(a, 0.0) + 1.0 / len(pairs)
        w[b] = w.get(b, 0.0) - 1.0 / len(pairs)
    items = list(w.items())
    return tuple(w), lambda v: sum(c * v[cell] for cell, c in items)


def spread(cells: Sequence[Cell]) -> Statistic:
    """The mean absolute difference between the values of every pair of ``cells`` (methods of one group)."""
    pairs = [(a, b) for i, a in enumerate(cells) for b in cells[i + 1:]]
    return lambda v: sum(abs(v[a] - v[b]) for a, b in pairs) / len(pairs)


def spread_contrast(pairs: Sequence[tuple[Sequence[Cell], Sequence[Cell]]]) -> tuple[tuple[Cell, ...], Statistic]:
    """The mean over ``pairs`` of spread(first) - spread(second)."""
    parts = [(spread(a), spread(b)) for a, b in pairs]
    cells = tuple(dict.fromkeys(c for a, b in pairs for c in (*a, *b)))
    return cells, lambda v: sum(fa(v) - fb(v) for fa, fb in parts) / len(parts)


def outcome(ci: Sequence[float] | None, direction: int, threshold: float) -> str:
    """Whether an interval lies on the paper's side of the threshold (agrees), on the other (opposes), or neither."""
    if ci is None:
        return UNCLEAR
    low, high = sorted(direction * (v - threshold) for v in ci)
    return AGREES if low > 0 else OPPOSES if high < 0 else UNCLEAR


def verdict(outcomes: Sequence[str]) -> str:
    """The module's verdict rule over a finding's test outcomes (none: the run cannot test it)."""
    if not outcomes:
        return INCONCLUSIVE
    agree, oppose = outcomes.count(AGREES), outcomes.count(OPPOSES)
    if agree == len(outcomes):
        return REPRODUCED
    if agree:
        return PARTLY
    if oppose:
        return NOT_REPRODUCED
    return INCONCLUSIVE


# ---- the run's evidence across groups ------------------------------------------------------------------

def _parameters(model_dir: Path) -> int | None:
    """A model's parameter count from its safetensors headers (no weights read); None if unreadable."""
    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    try:
        for f in files:
            with open(f, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            total += sum(int(np.prod(t["shape"])) for k, t in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return total or None


def size_order(db, sizes: Sequence[str]) -> tuple[list[str], str]:
    """The run's sizes from smallest to largest, and how that order was found."""
    counts = {}
    for size in sizes:
        for r in db.rows("SELECT path FROM models WHERE role = 'base' AND size = ? ORDER BY base_kind, seed", (size,)):
            found = _parameters(Path(r["path"]))
            if found:
                counts[size] = found
                break
    if len(counts) == len(sizes):
        order = sorted(sizes, key=lambda s: (counts[s], s))
        return order, "by parameter count: " + ", ".join(f"{s} {counts[s]:,}" for s in order)
    from mergebench.training import SIZES

    listed = [b.get("size") for b in (db.meta("config") or {}).get("bases", []) if isinstance(b, dict)]
    known = list(dict.fromkeys(listed + list(SIZES)))
    order = [s for s in known if s in sizes] + sorted(s for s in sizes if s not in known)
    return order, "in the order the run's config lists them (the base models' files were not found)"


@dataclass
class _Joint:
    sample: SeedSample
    resampled: dict[tuple[str, str, int], set[int]]  # per group: the datasets resampled by example
    rows: list[int]  # per dataset: examples


class Evidence:
    """Every (size, base kind, N) group of a run, and cells of several groups resampled together."""

    def __init__(self, db, suite: dict):
        self.db, self.suite = db, suite
        self.groups = {(g.size, g.base_kind, g.n): g for g in evidence.groups(db, suite)}
        self._rows = {k: set(g.rows()) for k, g in self.groups.items()}
        self._seeds: dict[Cell, list[int]] = {}

    def has(self, cell: Cell) -> bool:
        return cell.row in self._rows.get(cell.group, ())

    def seeds(self, cell: Cell) -> list[int]:
        if cell not in self._seeds:
            self._seeds[cell] = self.groups[cell.group].seeds_of(cell.quantity) if self.has(cell) else []
        return self._seeds[cell]

    def mean(self, cell: Cell) -> float | None:
        """The cell's value over its own seeds (the leaderboard's mean)."""
        seeds = self.seeds(cell)
        if not seeds:
            return None
        value = statistics.point_estimates(self.groups[cell.group].samples([cell.quantity], seeds))[cell.quantity.name]
        return float(value) if np.isfinite(value) else None

    def joint(self, cells: Sequence[Cell], seed: int) -> _Joint:
        """One seed's sample holding every cell, over the columns of all their groups side by side. A seed's test
        examples are the same questions for all its sizes and base kinds (one suite build per seed), so a dataset's
        examples are resampled with the same indices for every group that has its per-example values (all of one
        length; different lengths are not the same questions: then none is); a group with only scores keeps them,
        constant under resampling."""
        by_group: dict[tuple, list[Cell]] = {}
        for c in cells:
            by_group.setdefault(c.group, []).append(c)
        parts, width = [], 0
        for key, cs in by_group.items():
            group = self.groups[key]
            sample = group.samples([c.quantity for c in cs], [seed])[0]
            s = group.seeds[seed]
            parts.append((s, sample, width, cs))
            width += len(s.columns)
        names = list(dict.fromkeys(d for s, _, _, _ in parts for d in s.datasets))
        index = {d: i for i, d in enumerate(names)}
        matrices, rows = [], []
        resampled: dict[tuple[str, str, int], set[int]] = {cs[0].group: set() for _, _, _, cs in parts}
        for i, d in enumerate(names):
            present = [(sample.examples[s.datasets[d]], s.resampled[s.datasets[d]], offset, cs[0].group)
                       for s, sample, offset, cs in parts if d in s.datasets]
            lengths = {x.shape[0] for x, flag, _, _ in present if flag}
            n = lengths.pop() if len(lengths) == 1 else 1  # examples of different lengths: not the same questions
            out = np.zeros((n, width))  # columns of groups without the dataset: never read
            for x, flag, offset, group in present:
                if flag and n > 1:
                    out[:, offset:offset + x.shape[1]] = x
                    resampled[group].add(i)
                else:  # its scores, the same in every row: resampling leaves them as they are
                    out[:, offset:offset + x.shape[1]] = x.mean(axis=0)
            matrices.append(out)
            rows.append(n)
        quantities = {}
        for s, sample, offset, cs in parts:
            name_of = {i: d for d, i in s.datasets.items()}

            def moved(t: Term, name_of=name_of, offset=offset) -> Term:
                return Term(t.category, index[name_of[t.dataset]], tuple((col + offset, w) for col, w in t.numerator),
                            None if t.reference is None else t.reference + offset)

            for c in cs:
                quantities[c.name] = [d if isinstance(d, (int, float)) else [moved(t) for t in d]
                                      for d in sample.quantities[c.quantity.name]]
        return _Joint(SeedSample(matrices, quantities), resampled, rows)


def _values(test: Test, found: Mapping[str, Any]) -> Any:
    return test.statistic({c: found[c.name] for c in test.cells})


def _basis(joint: _Joint, cells: Sequence[Cell]) -> tuple[str, int | None]:
    """Whether the cells' resampling reaches the examples (every dataset, some, none), and the median number of
    examples of the datasets it reaches."""
    flags, lengths = [], []
    for c in cells:
        for draw in joint.sample.quantities[c.name]:
            if isinstance(draw, (int, float)):
                flags.append(False)
                continue
            for t in draw:
                full = t.dataset in joint.resampled[c.group]
                flags.append(full)
                if full:
                    lengths.append(joint.rows[t.dataset])
    basis = evidence.EXAMPLES if flags and all(flags) else evidence.SEEDS_ONLY if not any(flags) else evidence.PARTLY
    return basis, (int(np.median(lengths)) if lengths else None)


def common_seeds(ev: Evidence, test: Test) -> list[int]:
    return sorted(set.intersection(*(set(ev.seeds(c)) for c in test.cells))) if test.cells else []


@dataclass
class _Resampled:
    """Every cell of the tests sharing one seed set, resampled together: point values and bootstrap replicates over
    all the seeds, and over each seed alone (its examples only)."""

    joints: list[_Joint]
    point: dict[str, float]
    replicates: dict[str, np.ndarray]
    per_seed_point: list[dict[str, float]]
    per_seed_replicates: list[dict[str, np.ndarray]]


class Resampler:
    """One two-level bootstrap per seed set for all the tests given to :meth:`prepare` (so every finding reads the
    same replicates), and one per seed for the plan."""

    def __init__(self, ev: Evidence, n_boot: int, seed: int):
        self.ev, self.n_boot, self.seed = ev, n_boot, seed
        self.done: dict[tuple[int, ...], _Resampled] = {}

    def prepare(self, tests: Sequence[Test]) -> None:
        wanted: dict[tuple[int, ...], dict[Cell, None]] = {}
        for t in tests:
            seeds = tuple(common_seeds(self.ev, t))
            if seeds:
                wanted.setdefault(seeds, {}).update(dict.fromkeys(t.cells))
        for seeds, cells in wanted.items():
            joints = [self.ev.joint(list(cells), s) for s in seeds]
            samples = [j.sample for j in joints]
            self.done[seeds] = _Resampled(
                joints, statistics.point_estimates(samples),
                statistics.hierarchical_bootstrap(samples, self.n_boot, self.seed),
                [statistics.point_estimates([x]) for x in samples],
                [statistics.hierarchical_bootstrap([x], self.n_boot, self.seed) for x in samples])

    def get(self, test: Test) -> tuple[list[int], _Resampled | None]:
        seeds = common_seeds(self.ev, test)
        if seeds and tuple(seeds) not in self.done:
            self.prepare([test])
        return seeds, self.done.get(tuple(seeds))


def evaluate(resampler: Resampler, test: Test, resolve: float) -> dict[str, Any]:
    """A test's effect on the seeds every cell has, its 95% interval, its outcome and its plan."""
    ev = resampler.ev
    out: dict[str, Any] = {"label": test.label, "part": test.part, "direction": "+" if test.direction > 0 else "-",
                           "threshold": test.threshold, "cells": sorted({c.key for c in test.cells})}
    seeds, found = resampler.get(test)
    if found is None:
        missing = sorted({c.key for c in test.cells if not ev.seeds(c)})
        out["missing"] = (f"no value for {', '.join(missing)}" if missing else "no seed holds every row it needs")
        return out
    effect = float(_values(test, found.point))
    if not np.isfinite(effect):
        out["missing"] = "nothing could be normalised (a reference scored 0 everywhere)"
        return out
    ci = statistics.percentile_interval(np.asarray(_values(test, found.replicates), dtype=float))
    per_seed, example_var = {}, []
    for s, point, replicates in zip(seeds, found.per_seed_point, found.per_seed_replicates):
        per_seed[s] = float(_values(test, point))
        alone = np.asarray(_values(test, replicates), dtype=float)
        alone = alone[np.isfinite(alone)]
        example_var.append(float(alone.var(ddof=1)) if alone.size > 1 else float("nan"))
    basis, n_examples = _basis(found.joints[0], test.cells)
    summary = statistics.paired_summary(per_seed)
    out.update({"effect": effect, "ci": None if ci is None else list(ci),
                "outcome": outcome(ci, test.direction, test.threshold), "seeds": seeds, "per_seed": per_seed,
                "d_z": summary["d_z"], "basis": basis,
                "planning": plan(summary["sd"], example_var, n_examples, len(seeds), resolve)})
    return out


def plan(seed_sd: float | None, example_var: Sequence[float], n_examples: int | None, n_seeds: int,
         resolve: float) -> dict[str, Any]:
    """Seeds and test examples per dataset that resolve a difference ``resolve`` (the module docstring)."""
    variances = [v for v in example_var if np.isfinite(v)]
    example_sd = None
    if n_examples is not None and variances:
        example_sd = float(np.sqrt(n_examples * np.mean(variances) / n_seeds))
    return {"resolve": resolve, "seeds": n_seeds, "seed_sd": seed_sd,
            "seeds_needed": None if seed_sd is None else statistics.required_n(seed_sd, resolve, ALPHA, POWER),
            "examples_per_dataset": n_examples, "example_sd": example_sd,
            "examples_needed": None if example_sd is None else statistics.required_n(example_sd, resolve, ALPHA, POWER)}


# ---- the six findings ------------------------------------------------------------------------------------

@dataclass
class Layout:
    """What a run holds: its sizes (smallest first), base kinds, and each group's merge methods."""

    sizes: list[str]
    size_order: str
    kinds: list[str]
    methods: dict[tuple[str, str, int], list[str]]

    def ns(self, size: str, kind: str) -> list[int]:
        return sorted(n for (s, k, n) in self.methods if s == size and k == kind)

    def common(self, *groups: tuple[str, str, int]) -> list[str]:
        found = [set(self.methods.get(g, ())) for g in groups]
        return sorted(set.intersection(*found)) if found else []

    def sizes_of(self, kind: str) -> list[str]:
        return [s for s in self.sizes if self.ns(s, kind)]


@dataclass
class Finding:
    id: str
    claim: str
    statistic: str
    tests: list[Test]
    notes: list[str]  # what the run lacks for (parts of) the finding, and what was tested where
    primary: str = ""  # the part whose tests the finding's effect pools


def _kind_label(kind: str) -> str:
    return kind.replace("_", "-")


def _lacks_kinds(layout: Layout, *kinds: str) -> list[str]:
    absent = [k for k in kinds if k not in layout.kinds]
    return [f"the run has no {k} base (base kinds: {', '.join(layout.kinds)})" for k in absent]


def strong_base(layout: Layout) -> Finding:
    tests, missing = [], _lacks_kinds(layout, PRETRAINED, INSTRUCTION_TUNED)
    for size in layout.sizes if not missing else []:
        pairs = [(Cell(size, INSTRUCTION_TUNED, n, m, "held_in"), Cell(size, PRETRAINED, n, m, "held_in"))
                 for n in layout.ns(size, INSTRUCTION_TUNED) if n in layout.ns(size, PRETRAINED)
                 for m in layout.common((size, INSTRUCTION_TUNED, n), (size, PRETRAINED, n))]
        if pairs:
            tests.append(Test(f"{size}: IT - PT", "", *mean_difference(pairs)))
        else:
            missing.append(f"{size}: no N and method merged from both base kinds")
    return Finding("1-strong-base", "Merging works better when experts come from a strong (instruction-tuned) base "
                   "than from a pretrained one.",
                   "Per size: the mean over matched (N, method) of normalised held-in, instruction-tuned minus "
                   "pretrained; > 0 in the paper.", tests, missing)


def _consecutive(layout: Layout, kind: str) -> list[tuple[str, str]]:
    sizes = layout.sizes_of(kind)
    return list(zip(sizes, sizes[1:]))


def _one_size(layout: Layout) -> list[str]:
    return ([f"the run has one size ({', '.join(layout.sizes)}); the finding compares sizes"]
            if len(layout.sizes) < 2 else [])


def larger_merge_better(layout: Layout) -> Finding:
    tests, missing = [], _one_size(layout)
    for kind in layout.kinds:
        for small, large in _consecutive(layout, kind):
            pairs = [(Cell(large, kind, n, m, "held_in"), Cell(small, kind, n, m, "held_in"))
                     for n in layout.ns(large, kind) if n in layout.ns(small, kind)
                     for m in layout.common((large, kind, n), (small, kind, n))]
            if pairs:
                tests.append(Test(f"{_kind_label(kind)}: {large} - {small}", "", *mean_difference(pairs)))
            else:
                missing.append(f"{_kind_label(kind)}: {small} and {large} share no N and method")
    return Finding("2-larger-merge-better", "Larger models merge more easily: normalised held-in performance rises "
                   "with size for every method and expert count.",
                   "Per base kind and pair of consecutive sizes: the mean over matched (N, method) of normalised "
                   "held-in, larger minus smaller; > 0 in the paper.", tests, missing)


def held_out(layout: Layout, ev: Evidence) -> Finding:
    tests, missing = [], []
    for size in layout.sizes:
        for kind in layout.kinds:
            ns = layout.ns(size, kind)
            if not ns:
                continue
            pairs = [(Cell(size, kind, n, m, "held_out"), Cell(size, kind, n, "base", "held_out"))
                     for n in ns for m in layout.methods[(size, kind, n)]
                     if ev.has(Cell(size, kind, n, "base", "held_out"))]
            if pairs:
                tests.append(Test(f"{size}, {_kind_label(kind)}: merges - base", "a", *mean_difference(pairs)))
            else:
                missing.append(f"{size}, {_kind_label(kind)}: no base scores to compare with")
    for size in layout.sizes:
        for kind in layout.kinds:
            ns = layout.ns(size, kind)
            if len(ns) < 2:
                if ns:
                    missing.append(f"{size}, {_kind_label(kind)}: one N ({ns[0]}); part (b) compares N")
                continue
            lo, hi = ns[0], ns[-1]
            pairs = [(Cell(size, kind, hi, m, "held_out"), Cell(size, kind, lo, m, "held_out"))
                     for m in layout.common((size, kind, lo), (size, kind, hi))]
            if pairs:
                tests.append(Test(f"{size}, {_kind_label(kind)}: N={hi} - N={lo}", "b", *mean_difference(pairs)))
    return Finding("3-held-out", "Merging improves held-out (zero-shot) generalisation, and more experts help it, "
                   "often monotonically.",
                   "(a) Per (size, base kind): the mean over (N, method) of normalised held-out of the merge minus "
                   "the base's (1: the base's own zero-shot score); (b) per (size, base kind): the mean over methods "
                   "of normalised held-out at the largest N minus the smallest; > 0 in the paper.", tests, missing,
                   primary="a")


def beats_multitask(layout: Layout, ev: Evidence, resolve: float) -> Finding:
    tests, missing = [], _lacks_kinds(layout, INSTRUCTION_TUNED)
    sizes = layout.sizes_of(INSTRUCTION_TUNED)
    note = []
    if sizes:
        size = sizes[-1]
        n = layout.ns(size, INSTRUCTION_TUNED)[-1]
        multitask = Cell(size, INSTRUCTION_TUNED, n, "multitask", "held_out")
        if not ev.has(multitask):
            missing.append(f"{size}, instruction-tuned, N={n}: the run has no multitask model")
        else:
            for m in layout.methods[(size, INSTRUCTION_TUNED, n)]:
                cells, stat = mean_difference([(Cell(size, INSTRUCTION_TUNED, n, m, "held_out"), multitask)])
                tests.append(Test(f"{size}, IT, N={n}: {m} - multitask", "", cells, stat, threshold=-resolve))
            note.append(f"tested at {size} (the run's largest instruction-tuned size) and N={n}"
                        + ("" if n == 8 else " (the paper: N=8)"))
    finding = Finding("4-beats-multitask", "With large instruction-tuned bases and 8 experts, merged models "
                      "generalise as well as or better than the multitask model.",
                      f"At the largest instruction-tuned size and N: per method, normalised held-out of the merge "
                      f"minus the multitask model's; 'as well as or better' is non-inferiority, so the threshold is "
                      f"-{resolve:g} (--resolve), not 0.", tests, missing)
    finding.notes += note
    return finding


def more_experts_at_scale(layout: Layout) -> Finding:
    tests, missing = [], _one_size(layout)
    for kind in layout.kinds:
        for small, large in _consecutive(layout, kind):
            ns = sorted(set(layout.ns(small, kind)) & set(layout.ns(large, kind)))
            if len(ns) < 2:
                missing.append(f"{_kind_label(kind)}: {small} and {large} share fewer than two N")
                continue
            lo, hi = ns[0], ns[-1]
            methods = layout.common(*[(s, kind, n) for s in (small, large) for n in (lo, hi)])
            if not methods:
                missing.append(f"{_kind_label(kind)}: no method merged at both N and sizes")
                continue
            k = len(methods)
            weights: dict[Cell, float] = {}
            for m in methods:
                for s, sign in ((large, 1.0), (small, -1.0)):
                    weights[Cell(s, kind, hi, m, "held_in")] = sign / k
                    weights[Cell(s, kind, lo, m, "held_in")] = -sign / k
            tests.append(Test(f"{_kind_label(kind)}: held-in change N={lo}->{hi}, {large} - {small}", "",
                              *linear(weights)))
    return Finding("5-more-experts-at-scale", "Larger models can merge more experts before held-in performance drops.",
                   "Per base kind and pair of consecutive sizes: the mean over methods of the change in normalised "
                   "held-in from the smallest to the largest N, larger size minus smaller; > 0 in the paper.",
                   tests, missing)


def method_choice(layout: Layout) -> Finding:
    tests, missing = [], [f"part (a): {m}" for m in _one_size(layout)]

    def group_cells(size: str, kind: str, n: int, methods: list[str]) -> list[Cell]:
        return [Cell(size, kind, n, m, "held_in") for m in methods]

    def contrast(label: str, part: str, a: tuple[str, str], b: tuple[str, str]) -> None:
        pairs = []
        for n in sorted(set(layout.ns(*a)) & set(layout.ns(*b))):
            methods = layout.common((*a, n), (*b, n))
            if len(methods) >= 2:
                pairs.append((group_cells(*a, n, methods), group_cells(*b, n, methods)))
        if pairs:
            tests.append(Test(label, part, *spread_contrast(pairs)))
        else:
            missing.append(f"{label}: no N with two methods in both")

    for kind in layout.kinds:
        sizes = layout.sizes_of(kind)
        if len(sizes) >= 2:
            contrast(f"{_kind_label(kind)}: spread {sizes[0]} - {sizes[-1]}", "a", (sizes[0], kind), (sizes[-1], kind))
    missing += [f"part (b): {m}" for m in _lacks_kinds(layout, PRETRAINED, INSTRUCTION_TUNED)]
    for size in layout.sizes:
        if layout.ns(size, PRETRAINED) and layout.ns(size, INSTRUCTION_TUNED):
            contrast(f"{size}: spread PT - IT", "b", (size, PRETRAINED), (size, INSTRUCTION_TUNED))
    return Finding("6-method-choice", "At large scale the methods behave very similarly; method choice matters more "
                   "for small or weak bases.",
                   "The methods' spread in a (size, base kind, N) group: the mean absolute difference of normalised "
                   "held-in over every pair of methods. (a) Per base kind: the mean over matched N of the spread at "
                   "the smallest size minus at the largest; (b) per size: pretrained minus instruction-tuned; > 0 "
                   "in the paper.", tests, missing, primary="a")


def _pooled(tests: list[Test], part: str) -> tuple[Test | None, list[str]]:
    """The mean of the statistics of ``part``'s tests (all tests when that part has none), and their labels."""
    chosen = [t for t in tests if t.part == part] or tests
    if len(chosen) <= 1:
        return (chosen[0] if chosen else None), [t.label for t in chosen]
    cells = tuple(dict.fromkeys(c for t in chosen for c in t.cells))
    stats = [t.statistic for t in chosen]
    return Test("pooled", part, cells, lambda v: sum(f(v) for f in stats) / len(stats), chosen[0].direction,
                chosen[0].threshold), [t.label for t in chosen]


def _note(finding: Finding, results: list[dict], pooled: dict | None, extra: list[str]) -> str:
    parts = []
    computed = [r for r in results if "outcome" in r]
    if computed:
        counts = {o: [r["label"] for r in computed if r["outcome"] == o] for o in (AGREES, OPPOSES, UNCLEAR)}
        parts.append(f"{len(counts[AGREES])} of {len(computed)} tests agree with the paper")
        if counts[OPPOSES]:
            parts.append("opposite direction: " + "; ".join(counts[OPPOSES]))
        if counts[UNCLEAR]:
            parts.append("interval contains the threshold: " + "; ".join(counts[UNCLEAR]))
    not_run = [f"{r['label']} ({r['missing']})" for r in results if "missing" in r]
    if not computed and not finding.notes and not not_run:
        parts.append("the run has nothing this finding compares")
    parts += finding.notes + extra
    if not_run:
        parts.append("not computed: " + "; ".join(not_run))
    if pooled is not None and pooled.get("basis") not in (None, evidence.EXAMPLES):
        parts.append(f"intervals over {pooled['basis']} (no per-example results for some datasets)")
    return "; ".join(parts) + ("." if parts else "")


def _monotonic(layout: Layout, ev: Evidence) -> str | None:
    rising, total = 0, 0
    for size in layout.sizes:
        for kind in layout.kinds:
            ns = layout.ns(size, kind)
            if len(ns) < 2:
                continue
            for m in layout.common(*[(size, kind, n) for n in ns]):
                values = [ev.mean(Cell(size, kind, n, m, "held_out")) for n in ns]
                if all(v is not None for v in values):
                    total += 1
                    rising += all(b > a for a, b in zip(values, values[1:]))
    return None if not total else (f"held-out rises at every step of N in {rising} of {total} (size, base kind, "
                                   f"method) curves (means)")


def findings(ev: Evidence, layout: Layout, n_boot: int, seed: int, resolve: float) -> list[dict[str, Any]]:
    defined = [strong_base(layout), larger_merge_better(layout), held_out(layout, ev),
               beats_multitask(layout, ev, resolve), more_experts_at_scale(layout), method_choice(layout)]
    pooled = {f.id: _pooled([t for t in f.tests if common_seeds(ev, t)], f.primary) for f in defined}
    resampler = Resampler(ev, n_boot, seed)
    resampler.prepare([t for f in defined for t in f.tests] + [p for p, _ in pooled.values() if p is not None])
    out = []
    for f in defined:
        results = {id(t): evaluate(resampler, t, resolve) for t in f.tests}
        computed = [r for r in results.values() if "outcome" in r]
        pooled_test, pooled_labels = pooled[f.id]
        summary = None
        if pooled_test is not None:
            summary = results.get(id(pooled_test)) or evaluate(resampler, pooled_test, resolve)
        extra = [_monotonic(layout, ev)] if f.id == "3-held-out" else []
        cells = list(dict.fromkeys(c for t in f.tests for c in t.cells))
        rows = [{"row": c.key, "metric": c.metric, "mean": ev.mean(c), "seeds": ev.seeds(c)} for c in cells]
        out.append({"id": f.id, "claim": f.claim, "verdict": verdict([r["outcome"] for r in computed]),
                    "effect": None if summary is None else summary.get("effect"),
                    "ci": None if summary is None else summary.get("ci"),
                    "effect_of": pooled_labels, "statistic": f.statistic, "rows": rows,
                    "note": _note(f, list(results.values()), summary, [e for e in extra if e]),
                    "tests": list(results.values()),
                    "planning": None if summary is None else summary.get("planning")})
    return out


# ---- the per-category view -----------------------------------------------------------------------------

def categories(ev: Evidence, layout: Layout) -> dict[str, Any]:
    """Every row's normalised score per category, a mean over the seeds that have it (held-in: the expert's
    retention)."""
    held_in, held_out = list(ev.suite["held_in"]), list(ev.suite["held_out"])
    rows = []
    for key in _ordered(ev, layout):
        group = ev.groups[key]
        for row in group.rows():
            record: dict[str, Any] = {"size": key[0], "base_kind": key[1], "n": key[2], "row": row,
                                      "kind": "baseline" if row in evidence.BASELINES else "merge"}
            for metric, names in (("held_in", held_in), ("held_out", held_out)):
                values = {}
                for c in names:
                    q = evidence.Quantity(row, metric, c)
                    seeds = group.seeds_of(q)
                    value = statistics.point_estimates(group.samples([q], seeds))[q.name] if seeds else None
                    values[c] = float(value) if value is not None and np.isfinite(value) else None
                record[metric] = values
            rows.append(record)
    return {"held_in": held_in, "held_out": held_out, "rows": rows}


def _ordered(ev: Evidence, layout: Layout) -> list[tuple[str, str, int]]:
    rank = {s: i for i, s in enumerate(layout.sizes)}
    return sorted(ev.groups, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1], k[2]))


def shares(ev: Evidence, layout: Layout) -> list[dict[str, Any]]:
    """Per group: the share of merges (method x seed) above the base and above the best single expert."""
    suite, out = ev.suite, []
    for key in _ordered(ev, layout):
        group = ev.groups[key]
        counts = {m: {"beat_base": 0, "beat_best_expert": 0, "of": 0} for m in evidence.METRICS}
        for seed, s in sorted(group.seeds.items()):
            if s.base is None or any(c not in s.experts for c in s.categories):
                continue
            base = ev.db.scores(s.base, "test")
            experts = {c: ev.db.scores(s.experts[c], "test") for c in s.categories}
            held_in = {c: suite["held_in"][c] for c in s.categories}
            singles = [normalise(experts[c], held_in, suite["held_out"], experts, base, on_zero="skip")
                       for c in s.categories]
            mine = normalise(base, held_in, suite["held_out"], experts, base, on_zero="skip")
            for metric in evidence.METRICS:
                best = max((v for v in (getattr(e, metric) for e in singles) if v is not None), default=None)
                reference = getattr(mine, metric)
                for method in s.merges:
                    q = evidence.Quantity(method, metric)
                    if seed not in group.seeds_of(q):
                        continue
                    value = statistics.point_estimates(group.samples([q], [seed]))[q.name]
                    if not np.isfinite(value):
                        continue
                    counts[metric]["of"] += 1
                    counts[metric]["beat_base"] += reference is not None and value > reference
                    counts[metric]["beat_best_expert"] += best is not None and value > best
        record: dict[str, Any] = {"size": key[0], "base_kind": key[1], "n": key[2],
                                  "merges": counts["held_in"]["of"]}
        for metric in evidence.METRICS:
            c = counts[metric]
            record[metric] = {k: (c[k] / c["of"] if c["of"] else None) for k in ("beat_base", "beat_best_expert")}
        out.append(record)
    return out


# ---- the report ----------------------------------------------------------------------------------------

def build(db, n_boot: int = 2000, seed: int = 0, resolve: float = 0.05) -> dict[str, Any]:
    """The report of a run's results database: ``{"run", "verdict_rule", "findings", "categories", "shares"}``."""
    if not resolve > 0:
        raise InputError(f"--resolve must be a positive difference of normalised score (e.g. 0.05), got {resolve}")
    suite = db.meta("suite")
    if suite is None:
        raise InputError(f"{db.path}: the run has not recorded its suite yet; nothing to report")
    if not db.rows("SELECT 1 FROM merges LIMIT 1"):
        raise InputError(f"run {db.path.parent} has no merges yet; nothing to report")
    ev = Evidence(db, suite)
    sizes, how = size_order(db, sorted({k[0] for k in ev.groups}))
    kinds = sorted({k[1] for k in ev.groups})
    layout = Layout(sizes, how, kinds, {k: g.methods() for k, g in ev.groups.items()})
    run = {"path": str(db.path.parent), "suite": suite.get("name"), "sizes": sizes, "size_order": how,
           "base_kinds": kinds, "n_experts": sorted({k[2] for k in ev.groups}),
           "methods": sorted({m for ms in layout.methods.values() for m in ms}),
           "seeds": sorted({s for g in ev.groups.values() for s in g.seeds}), "level": LEVEL, "replicates": n_boot,
           "bootstrap_seed": seed, "resolve": resolve, "alpha": ALPHA, "power": POWER}
    return {"run": run, "verdict_rule": VERDICT_RULE, "findings": findings(ev, layout, n_boot, seed, resolve),
            "categories": categories(ev, layout), "shares": shares(ev, layout)}


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str) + "\n"


# ---- text: shared by the Markdown and the HTML page ----------------------------------------------------

def num(v: float | None, signed: bool = True) -> str:
    return "-" if v is None else f"{v:+.3f}" if signed else f"{v:.3f}"


def interval(ci: Sequence[float] | None) -> str:
    return "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    return [[f["id"].split("-")[0], f["claim"], f["verdict"], f"{num(f['effect'])} {interval(f['ci'])}".strip()
             if f["effect"] is not None else "-", f["note"]] for f in report["findings"]]


SUMMARY_COLUMNS = ("#", "claim", "verdict", "effect [95% interval]", "note")
TEST_COLUMNS = ("test", "effect", "95% interval", "threshold", "seeds", "outcome", "seeds needed",
                "examples needed (per dataset)")


def test_rows(finding: dict[str, Any]) -> list[list[str]]:
    out = []
    for t in finding["tests"]:
        if "outcome" not in t:
            out.append([t["label"], "-", "-", f"{t['threshold']:g}", "-", f"not computed: {t['missing']}", "-", "-"])
            continue
        p = t["planning"]
        seeds_needed = "-" if p["seeds_needed"] is None else str(p["seeds_needed"])
        examples = ("-" if p["examples_needed"] is None
                    else f"{p['examples_needed']} (now {p['examples_per_dataset']})")
        direction = "" if t["direction"] == "+" else " (paper: < threshold)"
        out.append([f"{t['label']}" + (f" ({t['part']})" if t["part"] else ""), num(t["effect"]),
                    interval(t["ci"]), f"{t['threshold']:g}{direction}", str(len(t["seeds"])), t["outcome"],
                    seeds_needed, examples])
    return out


ROW_COLUMNS = ("row", "metric", "mean", "seeds")


def finding_rows(finding: dict[str, Any]) -> list[list[str]]:
    return [[r["row"], r["metric"].replace("_", "-"), num(r["mean"], signed=False), ", ".join(map(str, r["seeds"]))]
            for r in finding["rows"]]


def category_table(report: dict[str, Any], metric: str) -> tuple[list[str], list[tuple[list[str], list[float | None]]]]:
    """Columns and (label cells, values) rows of one metric's per-category table."""
    names = report["categories"][metric]
    rows = [([r["size"], _kind_label(r["base_kind"]), str(r["n"]),
              r["row"] if r["kind"] == "merge" else f"({r['row']})"], [r[metric][c] for c in names])
            for r in report["categories"]["rows"]]
    return ["size", "base", "N", "row", *names], rows


SHARE_COLUMNS = ("size", "base", "N", "merges", "held-in > base", "held-in > best expert", "held-out > base",
                 "held-out > best expert")


def share_rows(report: dict[str, Any]) -> list[list[str]]:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.0f}%"

    return [[s["size"], _kind_label(s["base_kind"]), str(s["n"]), str(s["merges"]),
             pct(s["held_in"]["beat_base"]), pct(s["held_in"]["beat_best_expert"]),
             pct(s["held_out"]["beat_base"]), pct(s["held_out"]["beat_best_expert"])] for s in report["shares"]]


def run_line(report: dict[str, Any]) -> str:
    r = report["run"]
    return (f"Run `{r['path']}`: suite {r['suite']}; sizes {', '.join(r['sizes'])} (smallest first, "
            f"{r['size_order']}); base kinds {', '.join(r['base_kinds'])}; N = {', '.join(map(str, r['n_experts']))}; "
            f"methods {', '.join(r['methods'])}; seeds {', '.join(map(str, r['seeds']))}. Intervals: 95%, two-level "
            f"bootstrap over seeds and test examples ({r['replicates']} replicates, generator seed "
            f"{r['bootstrap_seed']}).")


def planning_text(report: dict[str, Any]) -> str:
    r = report["run"]
    return (f"Seeds needed: a paired t-test over seeds (alpha {r['alpha']}, power {r['power']}) resolving a difference "
            f"of {r['resolve']:g} normalised, from the spread of the per-seed statistic at the current test sets. "
            f"Examples needed: test examples per dataset that resolve {r['resolve']:g} against the example-level noise "
            f"of the run's seeds alone. A plan needs both (`--resolve D` sets the difference).")


def markdown(report: dict[str, Any]) -> str:
    lines = ["## The paper's findings, tested", "", run_line(report), "", f"**Verdict rule.** {report['verdict_rule']}",
             "", *markdown_table(SUMMARY_COLUMNS, summary_rows(report))]
    for f in report["findings"]:
        lines += ["", f"### {f['id'].split('-')[0]}. {f['claim']} **{f['verdict']}**", "",
                  f"Statistic: {f['statistic']}", ""]
        if f["tests"]:
            lines += markdown_table(TEST_COLUMNS, test_rows(f)) + [""]
        lines.append(f"{f['note']}")
        if f["rows"]:
            lines += ["", f"<details><summary>the {len(f['rows'])} rows behind it</summary>", "",
                      *markdown_table(ROW_COLUMNS, finding_rows(f)), "", "</details>"]
    lines += ["", "### Planning the next run", "", planning_text(report)]
    lines += ["", "## Per category", "",
              ("Normalised test score per category, mean over the seeds whose merges include the category. Held-in: "
               "the merge over the category's expert on the category's datasets (the expert's retention); held-out: "
               "the merge over the base. Baselines in parentheses."), ""]
    for metric, title in (("held_in", "Held-in: each expert's retention"), ("held_out", "Held-out per category")):
        columns, rows = category_table(report, metric)
        lines += [f"### {title}", "", *markdown_table(columns, [labels + [num(v, signed=False) for v in values]
                                                           for labels, values in rows]), ""]
    lines += ["### Merges that beat the base and the best expert", "",
              ("Share of merges (one per method and seed) whose normalised score is above the base's and above the "
               "best single expert's (an expert of one merged category, normalised over all N categories), as "
               "arXiv 2511.21437 reports."), "", *markdown_table(SHARE_COLUMNS, share_rows(report))]
    return "\n".join(lines) + "\n"
