"""mergebench.study.statistics against hand-computed cases, closed-form bootstrap variances and scipy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from mergebench.study import statistics as st
from mergebench.study.normalise import normalise

A = pytest.approx


def one(values) -> np.ndarray:
    """A single model's per-example values as an (n, 1) matrix."""
    return np.asarray(values, dtype=float)[:, None]


def raw(category: str = "c", dataset: int = 0, column: int = 0) -> list[st.Term]:
    return [st.Term(category, dataset, ((column, 1.0),), None)]


# ---- the normalised score ----------------------------------------------------------------------------

def test_normalised_score_is_the_papers_score_by_hand_and_equals_normalise():
    # columns: 0 merged, 1 qa expert, 2 sentiment expert, 3 base; the numbers of test_normalise_cache
    merged = {"qa1": 0.6, "qa2": 0.5, "sent1": 0.45, "nli1": 0.5, "nli2": 0.45, "coref1": 0.66}
    experts = {"qa": {"qa1": 0.8, "qa2": 0.5}, "sentiment": {"sent1": 0.9}}
    base = {"nli1": 0.4, "nli2": 0.5, "coref1": 0.6}
    datasets = list(merged)
    means = [np.array([[merged[d], experts["qa"].get(d, 1.0), experts["sentiment"].get(d, 1.0), base.get(d, 1.0)]])
             for d in datasets]
    held_in = [st.Term("qa", 0, ((0, 1.0),), 1), st.Term("qa", 1, ((0, 1.0),), 1),
               st.Term("sentiment", 2, ((0, 1.0),), 2)]
    held_out = [st.Term("nli", 3, ((0, 1.0),), 3), st.Term("nli", 4, ((0, 1.0),), 3),
                st.Term("coref", 5, ((0, 1.0),), 3)]
    # qa (0.75 + 1) / 2, sentiment 0.5 -> 0.6875; nli (1.25 + 0.9) / 2, coref 1.1 -> 1.0875
    assert st.normalised_score(means, held_in)[0] == A(0.6875)
    assert st.normalised_score(means, held_out)[0] == A(1.0875)
    reference = normalise(merged, {"qa": ["qa1", "qa2"], "sentiment": ["sent1"]},
                          {"nli": ["nli1", "nli2"], "coref": ["coref1"]}, experts, base)
    assert st.normalised_score(means, held_in)[0] == A(reference.held_in, rel=1e-12)
    assert st.normalised_score(means, held_out)[0] == A(reference.held_out, rel=1e-12)


def test_a_zero_reference_leaves_its_dataset_out_then_its_category():
    means = [np.array([[0.5, 0.0]]), np.array([[0.3, 0.6]]), np.array([[0.2, 0.0]])]
    terms = [st.Term("a", 0, ((0, 1.0),), 1), st.Term("a", 1, ((0, 1.0),), 1), st.Term("b", 2, ((0, 1.0),), 1)]
    assert st.normalised_score(means, terms)[0] == A(0.5)  # a: only 0.3 / 0.6; b: nothing left, left out
    assert np.isnan(st.normalised_score(means, [terms[0]])[0])


def test_a_numerator_may_combine_models():
    means = [np.array([[0.2, 0.6, 0.5]])]
    assert st.normalised_score(means, [st.Term("x", 0, ((0, 0.5), (1, 0.5)), 2)])[0] == A(0.8)  # (0.2 + 0.6) / 2 / 0.5


# ---- resampling ---------------------------------------------------------------------------------------

def test_resampled_means_count_each_row_and_keep_columns_paired():
    rng = np.random.default_rng(3)
    n = 7
    counts = st.resampled_means(np.eye(n), 5000, rng) * n  # column j: how often row j was drawn
    assert np.allclose(counts, np.round(counts)) and np.allclose(counts.sum(axis=1), n)
    # each row's count is Binomial(n, 1/n): mean 1, variance 1 - 1/n
    assert np.allclose(counts.mean(axis=0), 1.0, atol=0.05) and np.allclose(counts.var(axis=0), 6 / 7, atol=0.07)
    x = np.random.default_rng(0).random((30, 1))
    paired = st.resampled_means(np.hstack([x, x, 2 * x]), 200, rng)
    assert np.array_equal(paired[:, 0], paired[:, 1]) and np.allclose(paired[:, 2], 2 * paired[:, 0])
    assert np.array_equal(st.resampled_means(np.array([[0.25, 0.5]]), 3, rng), [[0.25, 0.5]] * 3)


def test_one_level_bootstrap_matches_scipys_percentile_interval():
    x = np.random.default_rng(1).beta(2, 5, size=80)
    reps = st.hierarchical_bootstrap([st.SeedSample([one(x)], {"m": [raw()]})], n_boot=20000, seed=4)["m"]
    ours = st.percentile_interval(reps)
    theirs = stats.bootstrap((x,), np.mean, method="percentile", n_resamples=20000, random_state=5).confidence_interval
    width = theirs.high - theirs.low
    assert ours[0] == A(theirs.low, abs=0.05 * width) and ours[1] == A(theirs.high, abs=0.05 * width)
    assert reps.mean() == A(x.mean(), abs=0.01 * width)


def _seeds(seed_means, sds, n, rng):
    return [st.SeedSample([one(m + sd * rng.standard_normal(n))], {"m": [raw()]}) for m, sd in zip(seed_means, sds)]


def test_two_level_bootstrap_variance_is_the_closed_form_seed_part():
    # examples constant within a seed: the replicate is a mean of S seeds drawn with replacement, whose
    # variance is the plug-in variance of the seed means / S
    seeds = [st.SeedSample([one([m] * 5)], {"m": [raw()]}) for m in (0.2, 0.5, 0.9)]
    reps = st.hierarchical_bootstrap(seeds, n_boot=20000)["m"]
    assert reps.var() == A(np.var([0.2, 0.5, 0.9]) / 3, rel=0.05)
    assert reps.mean() == A(np.mean([0.2, 0.5, 0.9]), abs=0.005)


def test_two_level_bootstrap_resamples_examples_independently_for_each_slot():
    # equal seed means, noisy examples: each slot adds var_s / n of example noise, so the replicate's variance is
    # mean_s(var_s / n) / S. Reusing one resample for a seed drawn twice would inflate it by (2 - 1/S).
    rng = np.random.default_rng(2)
    seeds = []
    for sd in (1.0, 2.0, 3.0):
        x = sd * rng.standard_normal(40)
        seeds.append(st.SeedSample([one(x - x.mean())], {"m": [raw()]}))  # each seed's mean exactly 0
    reps = st.hierarchical_bootstrap(seeds, n_boot=20000, seed=1)["m"]
    expected = np.mean([s.examples[0].var() / 40 for s in seeds]) / 3
    assert reps.var() == A(expected, rel=0.05)


def test_draws_are_resampled_within_each_seed():
    draws = [1.0, 2.0, 3.0, 4.0]
    reps = st.hierarchical_bootstrap([st.SeedSample([one([0.0])], {"m": list(draws)})], n_boot=20000)["m"]
    assert reps.var() == A(np.var(draws) / 4, rel=0.05) and reps.mean() == A(2.5, abs=0.02)


def test_quantities_share_their_resamples_so_differences_are_paired():
    rng = np.random.default_rng(0)
    x = rng.random((50, 1))
    both = np.hstack([x, x + 0.125, 2 * x + 0.5])
    seeds = [st.SeedSample([both * s], {"a": [raw(column=0)], "b": [raw(column=1)],
                                        "ratio": [[st.Term("c", 0, ((0, 1.0),), 0)]]}) for s in (1.0, 1.5)]
    reps = st.hierarchical_bootstrap(seeds, n_boot=500)
    diff = reps["b"] - reps["a"]
    # exactly 0.125 times the mean scale of the two drawn seeds (1 and 1; 1 and 1.5; 1.5 and 1.5): no example noise
    possible = np.array([0.125, 0.15625, 0.1875])
    assert np.all(np.isclose(diff[:, None], possible).any(axis=1)) and len(np.unique(diff.round(12))) == 3
    assert np.all(reps["ratio"] == 1.0)


def test_interval_with_constant_seeds_spans_them_and_is_reproducible():
    seeds = [st.SeedSample([one([v, v])], {"m": [raw()]}) for v in (0.4, 0.8)]
    first = st.hierarchical_bootstrap(seeds, n_boot=4000, seed=7)["m"]
    # a quarter of the replicates draw seed 0 twice (0.4), a quarter seed 1 twice (0.8), half one of each (0.6)
    assert st.percentile_interval(first) == A((0.4, 0.8))
    assert np.count_nonzero(np.isclose(first, 0.6)) / 4000 == A(0.5, abs=0.03)
    assert np.array_equal(first, st.hierarchical_bootstrap(seeds, n_boot=4000, seed=7)["m"])
    assert not np.array_equal(first, st.hierarchical_bootstrap(seeds, n_boot=4000, seed=8)["m"])


def test_seeds_must_hold_the_same_quantities():
    with pytest.raises(ValueError, match="same quantities"):
        st.hierarchical_bootstrap([st.SeedSample([one([1.0])], {"a": [raw()]}),
                                   st.SeedSample([one([1.0])], {"b": [raw()]})])


def test_point_estimates_average_draws_then_seeds():
    seeds = [st.SeedSample([one([0.2, 0.4])], {"m": [raw(), 0.5]}),  # draws 0.3 and 0.5 -> 0.4
             st.SeedSample([one([1.0, 1.0])], {"m": [raw()]})]
    assert st.point_estimates(seeds) == {"m": A(0.7)}


def test_percentile_interval_and_bootstrap_p_by_hand():
    assert st.percentile_interval(np.arange(101.0)) == A((2.5, 97.5))
    assert st.percentile_interval(np.array([np.nan, 1.0, 3.0]), level=0.5) == A((1.5, 2.5))
    assert st.percentile_interval(np.array([np.nan])) is None
    # one replicate at or below 0, three at or above: 2 * (1 + 1) / (1 + 4)
    assert st.bootstrap_p_value(np.array([-1.0, 1.0, 2.0, 3.0])) == A(0.8)
    assert st.bootstrap_p_value(np.array([1.0] * 99)) == A(0.02)


# ---- the paired permutation test ------------------------------------------------------------------------

def test_sign_flip_test_by_hand():
    assert st.sign_flip_test(np.array([1.0, 1.0, 1.0])) == A(2 / 8)  # only +-3 reach |3|
    assert st.sign_flip_test(np.array([1.0, 2.0])) == A(2 / 4)  # sums 3, 1, -1, -3
    assert st.sign_flip_test(np.array([0.0, 0.0])) == 1.0
    assert st.sign_flip_test(np.array([1.0, -1.0, 0.0])) == 1.0


@pytest.mark.parametrize("k", [3, 6, 10])
def test_sign_flip_test_equals_scipys_exact_paired_permutation_test(k):
    rng = np.random.default_rng(k)
    a, b = rng.random(k), rng.random(k) + 0.2
    c = rng.random(k) + 0.5  # each example's weight in the normalised score

    def statistic(x, y):
        return np.sum(c * (x - y))

    theirs = stats.permutation_test((a, b), statistic, permutation_type="samples", n_resamples=np.inf).pvalue
    assert st.sign_flip_test(c * (a - b)) == A(theirs, rel=1e-9)


def test_sign_flip_monte_carlo_agrees_with_full_enumeration():
    rng = np.random.default_rng(11)
    c = rng.standard_normal(17) + 0.3
    patterns = np.array(list(itertools.product((1, -1), repeat=17)))
    exact = np.mean(np.abs(patterns @ c) >= abs(c.sum()) - 1e-12)
    assert st.sign_flip_test(c, n_perm=40000, exact_limit=16) == A(exact, abs=0.01)
    assert st.sign_flip_test(c, exact_limit=17) == A(exact, rel=1e-9)


# ---- draws, effect sizes, sample sizes ------------------------------------------------------------------

def test_variance_components_by_hand():
    parts = st.variance_components([[1.0, 3.0], [5.0, 7.0]])
    # within: (1 + 1 + 1 + 1) / 2 = 2; seed means 2, 6: variance 8, less 2 / 2 draws = 7
    assert parts["draw_sd"] == A(np.sqrt(2)) and parts["seed_sd"] == A(np.sqrt(7)) and parts["draw_share"] == A(2 / 9)
    assert st.variance_components([[1.0], [3.0]]) == {"draw_sd": None, "seed_sd": A(np.sqrt(2)), "draw_share": None}
    assert st.variance_components([[1.0, 2.0, None]])["seed_sd"] is None


def test_paired_summary_by_hand():
    s = st.paired_summary({0: 0.1, 1: 0.3, 2: 0.2})
    assert s == {"mean": A(0.2), "sd": A(0.1), "d_z": A(2.0)}
    assert st.paired_summary({0: 0.5}) == {"mean": 0.5, "sd": None, "d_z": None}


def _exact_n(d: float, alpha: float = 0.05, power: float = 0.8) -> int:
    for n in range(2, 10000):
        df, nc = n - 1, d * np.sqrt(n)
        t = stats.t.ppf(1 - alpha / 2, df)
        if stats.nct.sf(t, df, nc) + stats.nct.cdf(-t, df, nc) >= power:
            return n
    raise AssertionError


def test_required_n_by_hand_and_against_the_noncentral_t():
    # ((1.959964 + 0.841621) * 1 / 0.5)^2 + 1.959964^2 / 2 = 31.396 + 1.921 = 33.3 -> 34
    assert st.required_n(1.0, 0.5) == 34
    for sd, delta in ((1.0, 0.2), (0.1, 0.08), (0.05, 0.05), (0.2, -0.1)):
        assert abs(st.required_n(sd, delta) - _exact_n(abs(delta) / sd)) <= 1
    with pytest.raises(ValueError):
        st.required_n(1.0, 0.0)
