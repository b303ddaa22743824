"""A run's results as the arrays :mod:`mergebench.study.statistics` resamples.

A leaderboard row, a paired comparison and a report finding all start from the same thing: for one
(size, base kind, N) group and one seed, the per-example test values of every model the group's rows
use (the base, the multitask model, the merged categories' experts, every method's merge and its further
random draws), and each row's normalised score written as :class:`~mergebench.study.statistics.Term` s
over those models' columns:

- a merge or the multitask model: held-in = its score / the category's expert, held-out = its score /
  the base; the base: the same with the base as the model (held-out 1 by definition);
- the experts: held-in 1 by definition (each expert over itself), held-out = the mean of the merged
  categories' experts over the base.

A dataset whose models all have per-example values of one length is resampled by example; otherwise
(an evaluator that gives only scores, or a run recorded before per-example values were kept) its scores
are its only "example", and statistics on it vary over seeds only (``basis``). A merge whose raw test
scores are missing is its stored normalised score, resampled over seeds only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from mergebench.study import per_example
from mergebench.study.statistics import Draw, SeedSample, Term, hierarchical_bootstrap

BASELINES = ("multitask", "experts", "base")
METRICS = ("held_in", "held_out")
EXAMPLES, SEEDS_ONLY, PARTLY = "seeds and examples", "seeds only", "seeds, and examples where recorded"


@dataclass(frozen=True)
class Quantity:
    """A normalised score to resample: a row (merge method or baseline), a metric, optionally one category."""

    row: str
    metric: str  # "held_in" or "held_out"
    category: str | None = None

    @property
    def name(self) -> str:
        return "|".join([self.row, self.metric] + ([self.category] if self.category else []))


@dataclass
class _Seed:
    """One seed of a group: its models, the datasets' per-example matrices over those models' columns."""

    seed: int
    categories: list[str]
    base: str | None = None
    multitask: str | None = None
    experts: dict[str, str] = field(default_factory=dict)
    # method -> one (model key, stored held-in, stored held-out) per random draw, the first draw first
    merges: dict[str, list[tuple[str, float | None, float | None]]] = field(default_factory=dict)
    columns: dict[str, int] = field(default_factory=dict)
    datasets: dict[str, int] = field(default_factory=dict)
    matrices: list[np.ndarray] = field(default_factory=list)
    resampled: list[bool] = field(default_factory=list)  # per dataset: per-example values for every model
    scored: dict[str, set[str]] = field(default_factory=dict)  # model -> datasets it has a test score on


class Group:
    """The models and per-example results of one (size, base kind, N) group of a run, by seed."""

    def __init__(self, db, suite: dict, size: str, base_kind: str, n: int):
        self.size, self.base_kind, self.n = size, base_kind, n
        self.held_in: dict[str, list[str]] = suite["held_in"]
        self.held_out: dict[str, list[str]] = suite["held_out"]
        self.seeds: dict[int, _Seed] = {}
        where = (size, base_kind, n)
        for r in db.rows("SELECT * FROM merges WHERE size = ? AND base_kind = ? AND n = ? ORDER BY seed, method", where):
            s = self.seeds.setdefault(r["seed"], _Seed(r["seed"], json.loads(r["experts"])))
            s.merges[r["method"]] = [(r["model"], r["held_in"], r["held_out"])]
        for r in db.rows("SELECT * FROM draws WHERE size = ? AND base_kind = ? AND n = ? ORDER BY draw", where):
            if r["seed"] in self.seeds and r["method"] in self.seeds[r["seed"]].merges:
                self.seeds[r["seed"]].merges[r["method"]].append((r["model"], r["held_in"], r["held_out"]))
        for s in self.seeds.values():
            for r in db.rows("SELECT key, role, category FROM models WHERE seed = ? AND size = ? AND base_kind = ?",
                             (s.seed, size, base_kind)):
                if r["role"] == "base":
                    s.base = r["key"]
                elif r["role"] == "multitask":
                    s.multitask = r["key"]
                elif r["role"] == "expert" and r["category"] in s.categories:
                    s.experts[r["category"]] = r["key"]
            self._load(db, s)

    def _load(self, db, s: _Seed) -> None:
        models = [m for m in [s.base, s.multitask, *s.experts.values()] if m is not None]
        models += [model for draws in s.merges.values() for model, _, _ in draws]
        s.columns = {m: i for i, m in enumerate(dict.fromkeys(models))}
        names = [d for c in s.categories for d in self.held_in.get(c, [])]
        names += [d for ds in self.held_out.values() for d in ds]
        s.datasets = {d: i for i, d in enumerate(dict.fromkeys(names))}
        scores = {m: db.scores(m, "test") for m in s.columns}
        examples = {m: per_example.read(db, m, "test") for m in s.columns}
        s.scored = {m: set(v) for m, v in scores.items()}
        for d in s.datasets:
            values = [examples[m].get(d) for m in s.columns]
            if all(v is not None for v in values) and len({v.size for v in values}) == 1:
                s.matrices.append(np.stack(values, axis=1))
                s.resampled.append(True)
            else:
                s.matrices.append(np.array([[scores[m].get(d, np.nan) for m in s.columns]]))
                s.resampled.append(False)

    # ---- what the group holds ------------------------------------------------------------------------

    def methods(self) -> list[str]:
        return sorted({m for s in self.seeds.values() for m in s.merges})

    def rows(self) -> list[str]:
        """The merge methods of the group, then the baselines it can compute."""
        baselines = [b for b in BASELINES if any(self._draws(s, Quantity(b, "held_in")) for s in self.seeds.values())]
        return self.methods() + baselines

    def seeds_of(self, q: Quantity) -> list[int]:
        """The seeds where ``q`` has a value."""
        return [seed for seed, s in sorted(self.seeds.items()) if self._draws(s, q)]

    # ---- terms ---------------------------------------------------------------------------------------

    def _terms(self, s: _Seed, q: Quantity, numerator, reference) -> list[Term]:
        """``q``'s terms at seed ``s``: ``numerator(category)`` over ``reference(category)``, dataset by dataset."""
        groups = ({c: self.held_in.get(c, []) for c in s.categories} if q.metric == "held_in" else self.held_out)
        return [Term(c, s.datasets[d], numerator(c), reference(c)) for c, datasets in groups.items()
                if q.category in (None, c) for d in datasets]

    def _draws(self, s: _Seed, q: Quantity) -> list[Draw]:
        """``q`` at seed ``s``: one entry per random draw (terms over the seed's columns, or a stored score);
        empty when the seed lacks the models, or the category (a held-in category the seed did not merge)."""
        return [d for d in self._all_draws(s, q) if isinstance(d, float) or len(d)]

    def _all_draws(self, s: _Seed, q: Quantity) -> list[Draw]:
        col = s.columns
        complete = s.base is not None and all(c in s.experts for c in s.categories)
        if q.metric == "held_in":
            reference = (lambda c: col[s.experts[c]]) if complete else None
        else:
            reference = (lambda c: col[s.base]) if s.base is not None else None
        if q.row in BASELINES:
            if not complete:
                return []
            if q.row == "experts":
                if q.metric == "held_in":  # each expert over itself
                    return [self._terms(s, q, lambda c: ((col[s.experts[c]], 1.0),), reference)]
                mean_of_experts = tuple((col[s.experts[c]], 1.0 / len(s.categories)) for c in s.categories)
                return [self._terms(s, q, lambda c: mean_of_experts, reference)]
            model = s.base if q.row == "base" else s.multitask
            if model is None or not s.scored.get(model):
                return []
            return [self._terms(s, q, lambda c: ((col[model], 1.0),), reference)]
        needed = set(self._datasets(s, q.metric))
        draws: list[Draw] = []
        for model, held_in, held_out in s.merges.get(q.row, []):
            if reference is not None and needed <= s.scored.get(model, set()):
                draws.append(self._terms(s, q, lambda c, m=model: ((col[m], 1.0),), reference))
            elif q.category is None:  # no raw scores to resample: its recorded score, over seeds only
                value = held_in if q.metric == "held_in" else held_out
                if value is not None:
                    draws.append(float(value))
        return draws

    def _datasets(self, s: _Seed, metric: str) -> list[str]:
        if metric == "held_in":
            return [d for c in s.categories for d in self.held_in.get(c, [])]
        return [d for ds in self.held_out.values() for d in ds]

    def samples(self, quantities: list[Quantity], seeds: list[int]) -> list[SeedSample]:
        """One :class:`SeedSample` per seed, holding every quantity (each must have a value at each seed)."""
        return [SeedSample(self.seeds[seed].matrices, {q.name: self._draws(self.seeds[seed], q) for q in quantities})
                for seed in seeds]

    def basis(self, q: Quantity, seeds: list[int]) -> str:
        """Whether ``q``'s resampling reaches the examples (on every dataset, some, or none)."""
        flags = []
        for seed in seeds:
            s = self.seeds[seed]
            for draw in self._draws(s, q):
                flags += [False] if isinstance(draw, (int, float)) else [s.resampled[t.dataset] for t in draw]
        return EXAMPLES if flags and all(flags) else SEEDS_ONLY if not any(flags) else PARTLY

    def bootstrap(self, quantities: list[Quantity], n_boot: int = 2000, seed: int = 0
                  ) -> dict[str, tuple[list[int], np.ndarray]]:
        """Each quantity's bootstrap replicates over the seeds where it has a value: {name: (seeds, replicates)}.
        Quantities with the same seeds are resampled together (paired); quantities without a seed are left out."""
        by_seeds: dict[tuple[int, ...], list[Quantity]] = {}
        for q in quantities:
            seeds = tuple(self.seeds_of(q))
            if seeds:
                by_seeds.setdefault(seeds, []).append(q)
        out = {}
        for seeds, qs in by_seeds.items():
            replicates = hierarchical_bootstrap(self.samples(qs, list(seeds)), n_boot, seed)
            out.update({q.name: (list(seeds), replicates[q.name]) for q in qs})
        return out

    def contributions(self, a: str, b: str, metric: str, seeds: list[int],
                      category: str | None = None) -> np.ndarray | None:
        """Each test example's share of the mean over ``seeds`` of ``score(a) - score(b)``: ``c (a_i - b_i)`` with
        ``c = 1 / (S * categories * datasets of the category * n * reference mean)`` (the statistics module's
        docstring), a row's draws averaged example by example. Both rows are normalised by the same references, so
        the shares sum to the difference exactly. None when some dataset has no per-example values."""
        parts = []
        for seed in seeds:
            s = self.seeds[seed]
            da, db_ = (self._draws(s, Quantity(r, metric, category)) for r in (a, b))
            if not da or not db_ or any(isinstance(d, (int, float)) for d in da + db_):
                return None
            kept: dict[str, list[int]] = {}  # a dataset whose reference scored 0 is left out, as in the score
            for i, t in enumerate(da[0]):
                if self._reference(s, t) > 0:
                    kept.setdefault(t.category, []).append(i)
            for indices in kept.values():
                for i in indices:
                    t = da[0][i]
                    if not s.resampled[t.dataset]:
                        return None
                    x = s.matrices[t.dataset]
                    difference = (np.mean([_combine(x, d[i]) for d in da], axis=0)
                                  - np.mean([_combine(x, d[i]) for d in db_], axis=0))
                    weight = len(seeds) * len(kept) * len(indices) * x.shape[0] * self._reference(s, t)
                    parts.append(difference / weight)
        return np.concatenate(parts) if parts else None

    def _reference(self, s: _Seed, t: Term) -> float:
        return 1.0 if t.reference is None else float(s.matrices[t.dataset][:, t.reference].mean())


def _combine(x: np.ndarray, t: Term) -> np.ndarray:
    return sum(w * x[:, col] for col, w in t.numerator)


def groups(db, suite: dict, sizes=(), base_kinds=(), ns=()) -> list[Group]:
    """Every (size, base kind, N) group of the run's merges, filtered."""
    keys = [(r["size"], r["base_kind"], r["n"]) for r in db.rows(
        "SELECT DISTINCT size, base_kind, n FROM merges ORDER BY size, base_kind, n")]
    return [Group(db, suite, *k) for k in keys if (not sizes or k[0] in sizes) and
            (not base_kinds or k[1] in base_kinds) and (not ns or k[2] in ns)]
