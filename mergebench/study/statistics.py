"""The study's statistics as pure functions on arrays: intervals, paired tests, variance parts, sample sizes.

Nothing here reads a database; :mod:`mergebench.study.evidence` turns a run's results into the arrays.

**What is resampled.** A study score is a mean over seeds (each seed a full replicate: its own data,
bases, experts and expert order) of the paper's normalised score: a mean over categories of means over
datasets of ratios of per-dataset scores (merged / the category's expert, or merged / the base), each
per-dataset score being the mean of a metric over the dataset's test examples. Two things would change
if the study were run again: the seeds (which experts, which training noise) and the test examples
(which questions). Stochastic merges (``draws: K``) add a third: the merge's random draw.

**Two-level (hierarchical) bootstrap** (:func:`hierarchical_bootstrap`). One replicate:

1. draw S seeds with replacement from the S seeds of the row;
2. for each drawn seed (each of the S slots on its own, so a seed drawn twice gets two independent
   resamples), resample each dataset's n test examples with replacement, with the *same* example
   indices for every model of that seed: the merge, its experts, the base and the other methods are
   scored on the same examples, so ratios and differences stay paired; a quantity with K random draws
   also has its K draws resampled with replacement;
3. compute the normalised score from the resampled per-dataset means (a reference that resamples to
   a mean of 0 leaves its dataset out of that replicate, as ``normalise(on_zero="skip")`` does), and
   average it over the slot's resampled draws;
4. the replicate is the mean over the S slots.

The interval is the percentile interval of B replicates (:func:`percentile_interval`: the 2.5th and
97.5th percentiles for 95%, numpy's linear interpolation; B = 2000 by default), drawn from numpy's
PCG64 generator seeded with ``seed`` (0 by default), so the same results always give the same interval.
Where a dataset has no per-example values (an evaluator that returns only scores), its "examples" are
its one score, and only the seed level (and draws) varies: the interval is then over seeds only.
Caveat: with S seeds the seed level only knows the spread among those S (its variance is (S-1)/S of the
usual estimate); with 2 or 3 seeds the interval understates how much another set of experts could move a
score. Example-level resampling treats the test examples as a sample from a larger population of such
questions.

**Paired tests** (:func:`sign_flip_test`). Two methods normalised by the same references (same seed,
same experts and base) differ by a *linear* function of their per-example differences: with the
references fixed, ``score(A) - score(B) = sum_i c_i (a_i - b_i)`` where ``c_i = 1 / (S * |categories| *
|datasets of the category| * n_dataset * reference's mean on the dataset)``. The paired permutation test
flips the sign of each example's contribution ``c_i (a_i - b_i)`` (A and B exchangeable on each example
under the null): the p-value is the share of sign patterns whose |sum| reaches the observed |sum|, exact
(all 2^k patterns) for k <= 16 examples that differ, Monte Carlo otherwise ((1 + hits) / (1 + P), P =
10,000 patterns by default). It is conditional on the seeds: it asks whether these merges differ on these
examples beyond chance, not whether another set of experts would give the same sign; the bootstrap
interval of the difference (:func:`bootstrap_p_value` turns it into a p-value) includes the seed level.

**Draws** (:func:`variance_components`): one-way random-effects ANOVA over (seed, draw) scores: the
variance from draws is the pooled within-seed variance, the variance from seeds is the variance of the
seed means less the draws' share of it (``var(seed means) - within / K``, not below 0).

**Sample sizes** (:func:`required_n`): the n of a two-sided one-sample (or paired) t-test with power
``power`` at level ``alpha`` for a difference ``delta`` when the unit-level standard deviation is
``sd``, by the normal approximation with Guenther's (1981) t correction:
``n = ceil(((z_{1-alpha/2} + z_power) * sd / delta)^2 + z_{1-alpha/2}^2 / 2)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Mapping, Sequence, Union

import numpy as np

# at most this many (replicate x example) counts in memory at once while resampling
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Term:
    """One dataset's ratio in a normalised score: ``sum(weight * mean of column) / mean of reference``.

    ``numerator``: (model column, weight) pairs, so a score may be of a combination of models (the experts'
    held-out mean is the mean of their columns); ``reference``: the normalising model's column, or None for
    a raw (unnormalised) score. ``dataset`` indexes the seed's example matrices.
    """

    category: str
    dataset: int
    numerator: tuple[tuple[int, float], ...]
    reference: int | None


# a quantity's value at one seed and draw: its terms, or a fixed number (a stored score with nothing to resample)
Draw = Union[Sequence[Term], float]


@dataclass
class SeedSample:
    """One seed's data: ``examples[d]`` is dataset d's (n_d, M) per-example values of the seed's M model
    columns (n_d = 1 when only scores exist); ``quantities[name]`` lists one :data:`Draw` per random draw."""

    examples: list[np.ndarray]
    quantities: dict[str, list[Draw]] = field(default_factory=dict)


def normalised_score(means: Sequence[np.ndarray], terms: Sequence[Term]) -> np.ndarray:
    """The paper's normalised score from per-dataset means (``means[d]``: (..., M)), vectorised over the leading
    axes: ratios averaged within each category, categories averaged; a ratio whose reference is <= 0 is left
    out (NaN where nothing is left)."""
    by_category: dict[str, list[np.ndarray]] = {}
    for t in terms:
        m = means[t.dataset]
        num = sum(w * m[..., col] for col, w in t.numerator)
        if t.reference is None:
            ratio = np.asarray(num, dtype=float)
        else:
            ref = m[..., t.reference]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(ref > 0, num / np.where(ref > 0, ref, 1.0), np.nan)
        by_category.setdefault(t.category, []).append(ratio)
    if not by_category:
        return np.full(means[0].shape[:-1] if len(means) else (), np.nan)
    total, count = 0.0, 0
    for ratios in by_category.values():
        stack = np.stack(ratios)
        ok = np.isfinite(stack)
        n = ok.sum(axis=0)
        mean = np.where(ok, stack, 0.0).sum(axis=0) / np.maximum(n, 1)
        total = total + np.where(n > 0, mean, 0.0)
        count = count + (n > 0)
    return np.where(np.asarray(count) > 0, total / np.maximum(count, 1), np.nan)


def resampled_means(values: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` bootstrap resamples of the rows of ``values`` (n, M), the same rows for every column: the
    (count, M) column means of each resample."""
    n = values.shape[0]
    if n == 1:
        return np.repeat(values, count, axis=0)
    idx = rng.integers(0, n, size=(count, n))
    idx += (np.arange(count) * n)[:, None]
    counts = np.bincount(idx.ravel(), minlength=count * n).reshape(count, n).astype(float)
    return counts @ values / n


def _draw_values(draws: Sequence[Draw], means: Sequence[np.ndarray], shape: int) -> np.ndarray:
    cols = [np.full(shape, float(d)) if isinstance(d, (int, float)) else normalised_score(means, d) for d in draws]
    return np.stack(cols, axis=1)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    ok = np.isfinite(values)
    n = ok.sum(axis=1)
    return np.where(n > 0, np.where(ok, values, 0.0).sum(axis=1) / np.maximum(n, 1), np.nan)


def point_estimates(seeds: Sequence[SeedSample]) -> dict[str, float]:
    """Each quantity on the data as they are: the mean over seeds of the mean over draws (NaN values skipped)."""
    out: dict[str, float] = {}
    for name in _names(seeds):
        values = []
        for s in seeds:
            means = [x.mean(axis=0)[None, :] for x in s.examples]
            values.append(_nanmean_rows(_draw_values(s.quantities[name], means, 1))[0])
        finite = [v for v in values if np.isfinite(v)]
        out[name] = float(np.mean(finite)) if finite else float("nan")
    return out


def _names(seeds: Sequence[SeedSample]) -> list[str]:
    if not seeds:
        raise ValueError("no seeds to resample")
    names = list(seeds[0].quantities)
    for s in seeds[1:]:
        if set(s.quantities) != set(names):
            raise ValueError("every seed must hold the same quantities (resample each seed set on its own)")
    return names


def hierarchical_bootstrap(seeds: Sequence[SeedSample], n_boot: int = 2000, seed: int = 0) -> dict[str, np.ndarray]:
    """B replicates of every quantity (see the module docstring): {name: (B,) array}, NaN where a replicate
    had nothing to normalise. Every quantity is resampled with the same seeds, examples and draw indices
    within a replicate, so differences of quantities are paired."""
    names = _names(seeds)
    rng = np.random.default_rng(seed)
    S = len(seeds)
    picks = rng.integers(0, S, size=(n_boot, S))
    sums = {q: np.zeros(n_boot) for q in names}
    counts = {q: np.zeros(n_boot) for q in names}
    for s, sample in enumerate(seeds):
        slots = np.nonzero(picks == s)[0]  # the replicate of each slot that drew seed s (repeats allowed)
        widest = max([x.shape[0] for x in sample.examples] + [1])
        step = max(1, _CHUNK // widest)
        for start in range(0, len(slots), step):
            rows = slots[start:start + step]
            means = [resampled_means(x, len(rows), rng) for x in sample.examples]
            for q in names:
                draws = sample.quantities[q]
                values = _draw_values(draws, means, len(rows))
                if len(draws) > 1:
                    values = np.take_along_axis(values, rng.integers(0, len(draws), size=values.shape), axis=1)
                v = _nanmean_rows(values)
                ok = np.isfinite(v)
                np.add.at(sums[q], rows[ok], v[ok])
                np.add.at(counts[q], rows[ok], 1.0)
    return {q: np.where(counts[q] > 0, sums[q] / np.maximum(counts[q], 1), np.nan) for q in names}


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """The percentile bootstrap interval of ``replicates`` (NaN replicates ignored); None when none is finite."""
    r = np.asarray(replicates, dtype=float)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return None
    lo, hi = np.percentile(r, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def bootstrap_p_value(replicates: np.ndarray, null: float = 0.0) -> float | None:
    """Two-sided p-value of "the quantity equals ``null``" from its bootstrap replicates: twice the smaller share
    of replicates on either side of ``null`` ((1 + count) / (1 + B) each), at most 1."""
    r = np.asarray(replicates, dtype=float)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return None
    below, above = np.count_nonzero(r <= null), np.count_nonzero(r >= null)
    return float(min(1.0, 2 * (1 + min(below, above)) / (1 + r.size)))


def sign_flip_test(contributions: np.ndarray, n_perm: int = 10_000, seed: int = 0, exact_limit: int = 16) -> float:
    """Two-sided p-value of the paired permutation (sign-flip) test of ``sum(contributions) = 0``: the share of
    sign patterns whose |sum| is at least the observed |sum|; exact over all 2^k patterns for k <= ``exact_limit``
    non-zero contributions, else (1 + hits) / (1 + n_perm) over random patterns."""
    c = np.asarray(contributions, dtype=float).ravel()
    c = c[c != 0]
    if c.size == 0:
        return 1.0
    observed = abs(c.sum())
    tolerance = 1e-12 * max(1.0, np.abs(c).sum())  # equal sums computed in another order still count as reached
    if c.size <= exact_limit:
        patterns = np.arange(1 << c.size)[:, None] >> np.arange(c.size) & 1
        sums = (1 - 2 * patterns) @ c
        return float(np.count_nonzero(np.abs(sums) >= observed - tolerance) / sums.size)
    rng = np.random.default_rng(seed)
    hits = 0
    step = max(1, _CHUNK // c.size)
    for start in range(0, n_perm, step):
        k = min(step, n_perm - start)
        signs = rng.integers(0, 2, size=(k, c.size), dtype=np.int8) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ c) >= observed - tolerance))
    return float((1 + hits) / (1 + n_perm))


def variance_components(values: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """Spread from draws versus spread from seeds, from ``values[seed][draw]`` (one-way random-effects ANOVA).

    ``draw_sd``: sqrt of the pooled within-seed variance (None without a seed of 2+ draws); ``seed_sd``: sqrt
    of max(var(seed means) - within / mean draws per seed, 0) (None with fewer than 2 seeds); ``draw_share``:
    within / (within + between), the part of one run's variance due to the draw."""
    groups = [np.asarray([v for v in vs if v is not None and np.isfinite(v)], dtype=float) for vs in values]
    groups = [g for g in groups if g.size]
    df = sum(g.size - 1 for g in groups)
    within = sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / df if df else None
    between = None
    if len(groups) >= 2:
        seed_means = np.array([g.mean() for g in groups])
        between = float(seed_means.var(ddof=1))
        if within is not None:
            between = max(between - within / float(np.mean([g.size for g in groups])), 0.0)
    share = None
    if within is not None and between is not None and within + between > 0:
        share = within / (within + between)
    return {"draw_sd": None if within is None else float(np.sqrt(within)),
            "seed_sd": None if between is None else float(np.sqrt(between)), "draw_share": share}


def required_n(sd: float, delta: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Units (seeds, or examples) a two-sided paired t-test needs to detect a mean difference ``delta`` with
    ``power`` at level ``alpha`` when the units' differences have standard deviation ``sd`` (see the module
    docstring: normal approximation with Guenther's correction)."""
    if sd < 0 or delta == 0 or not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError("need sd >= 0, delta != 0, 0 < alpha < 1 and 0 < power < 1")
    z = NormalDist()
    za, zb = z.inv_cdf(1 - alpha / 2), z.inv_cdf(power)
    return max(2, int(np.ceil(((za + zb) * sd / abs(delta)) ** 2 + za ** 2 / 2)))


def paired_summary(differences: Mapping[object, float]) -> dict[str, float | None]:
    """Mean, standard deviation and standardised effect (Cohen's d_z = mean / sd) of per-unit differences."""
    d = np.asarray([v for v in differences.values() if v is not None and np.isfinite(v)], dtype=float)
    if d.size == 0:
        return {"mean": None, "sd": None, "d_z": None}
    sd = float(d.std(ddof=1)) if d.size > 1 else None
    return {"mean": float(d.mean()), "sd": sd, "d_z": float(d.mean() / sd) if sd else None}
