"""``mergebench compare RUN A B``: the paired difference between two merge methods, or a method and a baseline.

Within each (size, base kind, N) group the two rows are merges of the same experts onto the same base (or a
baseline of those experts), normalised by the same references and scored on the same test examples, so
their difference is paired at every level. For the held-in and held-out score, overall and per category:

- ``difference``: mean over seeds of score(A) - score(B) (each a mean over draws with ``draws: K``);
- ``ci``: its 95% percentile interval from the two-level bootstrap over seeds and test examples, A and B
  resampled together (:func:`mergebench.study.statistics.hierarchical_bootstrap`);
- ``p_value``: the paired permutation (sign-flip) test over test examples of the per-example
  contributions to the difference (:func:`~mergebench.study.statistics.sign_flip_test`; conditional on these
  seeds' experts); with no per-example results, the exact sign-flip test over seeds (2^S patterns, so it
  cannot go below 2 / 2^S);
- ``p_bootstrap``: the bootstrap test of a zero difference (includes the seed level);
- ``per_seed``: each seed's difference, and their ``d_z`` (mean / standard deviation: the standardised
  effect a plan for more seeds needs).

A held-in category is compared over the seeds whose N merged categories include it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mergebench.core.errors import InputError
from mergebench.core.registry import _unknown_message
from mergebench.study import evidence, statistics
from mergebench.study.database import ResultsDB


def _choose(what: str, given: tuple, valid: list, where: str) -> tuple:
    for v in given:
        if v not in valid:
            raise InputError(_unknown_message(f"{what} '{v}'", where, [str(x) for x in valid]))
    return given


def compare(db: ResultsDB, a: str, b: str, sizes: tuple[str, ...] = (), base_kinds: tuple[str, ...] = (),
            ns: tuple[int, ...] = (), n_boot: int = 2000, n_perm: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """The paired comparison of rows ``a`` and ``b`` in every selected group that holds both (see the module)."""
    suite = db.meta("suite")
    if suite is None:
        raise InputError(f"{db.path}: the run has not recorded its suite yet; nothing to compare")
    where = f"run {db.path.parent}"
    available = db.rows("SELECT DISTINCT size, base_kind, n, method FROM merges")
    if not available:
        raise InputError(f"{where} has no merges yet; nothing to compare")
    _choose("size", sizes, sorted({r["size"] for r in available}), where)
    _choose("base kind", base_kinds, sorted({r["base_kind"] for r in available}), where)
    _choose("N", ns, sorted({r["n"] for r in available}), where)
    rows = sorted({r["method"] for r in available}) + list(evidence.BASELINES)
    for name in (a, b):
        if name not in rows:
            raise InputError(_unknown_message(f"method '{name}'", where, rows))
    if a == b:
        raise InputError(f"compare needs two different methods or baselines, got '{a}' twice")
    groups = []
    for group in evidence.groups(db, suite, sizes, base_kinds, ns):
        found = _group(group, a, b, n_boot, n_perm, seed)
        if found is not None:
            groups.append(found)
    if not groups:
        raise InputError(f"no (size, base kind, N) group of {where} has both '{a}' and '{b}' on the same seeds "
                         f"(`mergebench leaderboard` lists what each group holds)")
    return {"run": str(db.path.parent), "a": a, "b": b, "level": 0.95, "replicates": n_boot, "permutations": n_perm,
            "seed": seed, "groups": groups}


def _group(group: evidence.Group, a: str, b: str, n_boot: int, n_perm: int, seed: int) -> dict[str, Any] | None:
    categories = {"held_in": sorted({c for s in group.seeds.values() for c in s.categories}),
                  "held_out": list(group.held_out)}
    quantities = [evidence.Quantity(row, metric, category) for metric in evidence.METRICS
                  for category in [None, *categories[metric]] for row in (a, b)]
    replicates = group.bootstrap(quantities, n_boot, seed)
    out: dict[str, Any] = {"size": group.size, "base_kind": group.base_kind, "n": group.n}
    for metric in evidence.METRICS:
        overall = _difference(group, a, b, metric, None, replicates, n_perm, seed)
        if overall is None:
            return None
        overall["categories"] = {}
        for category in categories[metric]:
            found = _difference(group, a, b, metric, category, replicates, n_perm, seed)
            if found is not None:
                overall["categories"][category] = found
        out[metric] = overall
    return out


def _difference(group: evidence.Group, a: str, b: str, metric: str, category: str | None, replicates: dict,
                n_perm: int, seed: int) -> dict[str, Any] | None:
    qa, qb = evidence.Quantity(a, metric, category), evidence.Quantity(b, metric, category)
    if qa.name not in replicates or qb.name not in replicates:
        return None
    seeds_a, reps_a = replicates[qa.name]
    seeds_b, reps_b = replicates[qb.name]
    if seeds_a != seeds_b:  # different seeds: resample the common ones together
        seeds = sorted(set(seeds_a) & set(seeds_b))
        if not seeds:
            return None
        both = statistics.hierarchical_bootstrap(group.samples([qa, qb], seeds), len(reps_a), seed)
        reps_a, reps_b = both[qa.name], both[qb.name]
    else:
        seeds = seeds_a
    per_seed = {}
    for s in seeds:
        point = statistics.point_estimates(group.samples([qa, qb], [s]))
        per_seed[s] = point[qa.name] - point[qb.name]
    means = statistics.point_estimates(group.samples([qa, qb], seeds))
    difference = reps_a - reps_b
    contributions = group.contributions(a, b, metric, seeds, category)
    if contributions is not None:
        p, test = statistics.sign_flip_test(contributions, n_perm, seed), "sign-flip permutation over test examples"
    else:
        p = statistics.sign_flip_test(np.array(list(per_seed.values())) / len(seeds), n_perm, seed)
        test = f"exact sign-flip over {len(seeds)} seeds (no per-example results)"
    ci = statistics.percentile_interval(difference)
    summary = statistics.paired_summary(per_seed)
    return {"seeds": seeds, "a": means[qa.name], "b": means[qb.name], "difference": means[qa.name] - means[qb.name],
            "ci": None if ci is None else list(ci), "p_value": p, "test": test,
            "p_bootstrap": statistics.bootstrap_p_value(difference), "per_seed": per_seed, "d_z": summary["d_z"],
            "examples": None if contributions is None else int(contributions.size),
            "basis": _basis(group, qa, qb, seeds)}


def _basis(group: evidence.Group, qa, qb, seeds: list[int]) -> str:
    found = {group.basis(qa, seeds), group.basis(qb, seeds)}
    return found.pop() if len(found) == 1 else evidence.PARTLY
