"""Per-example results, leaderboard intervals and `mergebench compare` on a results database written by hand,
every expected number worked out in the comments."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

from mergebench.cli.main import cli
from mergebench.core.errors import InputError, PluginError
from mergebench.study import compare as cmp
from mergebench.study import evidence, per_example, statistics
from mergebench.study import leaderboard as lb
from mergebench.study.components import Scores
from mergebench.study.database import ResultsDB, score_statements
from mergebench.study.normalise import normalise

from test_cli_errors import assert_user_error

A = pytest.approx

# Two held-in categories (a, b: one dataset each) and one held-out (x), N = 2, seeds 0 and 1; four test examples
# per dataset, scored 0 or 1. Per seed: the base, the two experts, a multitask model and two merges (ties, avg).
SUITE = {"name": "s", "held_in": {"a": ["a1"], "b": ["b1"]}, "held_out": {"x": ["x1"]}}
EXAMPLES = {
    0: {"base": {"a1": [1, 0, 0, 0], "b1": [1, 1, 0, 0], "x1": [1, 1, 0, 0]},
        "ea": {"a1": [1, 1, 1, 1], "b1": [0, 0, 0, 0], "x1": [1, 0, 0, 0]},
        "eb": {"a1": [0, 0, 0, 0], "b1": [1, 1, 1, 1], "x1": [1, 1, 1, 0]},
        "mt": {"a1": [1, 1, 0, 0], "b1": [1, 1, 1, 0], "x1": [1, 1, 0, 0]},
        "ties": {"a1": [1, 1, 1, 0], "b1": [1, 1, 1, 1], "x1": [1, 1, 1, 0]},
        "avg": {"a1": [1, 1, 0, 0], "b1": [1, 1, 0, 0], "x1": [1, 0, 0, 0]}},
    1: {"base": {"a1": [0, 0, 0, 1], "b1": [0, 1, 0, 0], "x1": [1, 1, 1, 1]},
        "ea": {"a1": [1, 1, 0, 1], "b1": [0, 0, 1, 0], "x1": [1, 1, 0, 0]},
        "eb": {"a1": [0, 0, 0, 0], "b1": [1, 1, 1, 1], "x1": [1, 1, 1, 1]},
        "mt": {"a1": [1, 0, 0, 1], "b1": [1, 1, 1, 0], "x1": [0, 1, 1, 1]},
        "ties": {"a1": [1, 1, 0, 0], "b1": [1, 1, 1, 1], "x1": [1, 1, 0, 1]},
        "avg": {"a1": [1, 1, 0, 1], "b1": [1, 0, 1, 0], "x1": [1, 1, 1, 1]}},
}


def mean(v):
    return sum(v) / len(v)


def scores_of(seed, model):
    return {d: mean(v) for d, v in EXAMPLES[seed][model].items()}


def normalised(seed, model):
    experts = {"a": scores_of(seed, "ea"), "b": scores_of(seed, "eb")}
    return normalise(scores_of(seed, model), {"a": ["a1"], "b": ["b1"]}, {"x": ["x1"]}, experts,
                     scores_of(seed, "base"), on_zero="skip")


def write_run(path, with_examples=True) -> ResultsDB:
    db = ResultsDB(path)
    db.set_meta("suite", SUITE)
    for seed, models in EXAMPLES.items():
        roles = {"base": ("base", None), "ea": ("expert", "a"), "eb": ("expert", "b"), "mt": ("multitask", None)}
        for name, values in models.items():
            key = f"{name}{seed}"
            if name in roles:
                db.conn.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                (key, roles[name][0], seed, "toy", "pre", roles[name][1], "p", None))
            else:
                n = normalised(seed, name)
                db.conn.execute("INSERT INTO merges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (seed, "toy", "pre", 2, name, json.dumps(["a", "b"]), json.dumps({"lambda": 0.5}),
                                 0.0, n.held_in, n.held_out, "{}", key, 1.0))
            arrays = {d: np.array(v, dtype=float) for d, v in values.items()}
            statements = score_statements(key, "test", scores_of(seed, name))
            if with_examples:
                statements += per_example.statements(key, "test", arrays)
            for sql, args in statements:
                db.conn.execute(sql, args)
    return db


@pytest.fixture
def run(tmp_path):
    db = write_run(tmp_path / "results.sqlite")
    yield db
    db.close()


# ---- per-example values ------------------------------------------------------------------------------------

def test_per_example_values_round_trip_compactly():
    binary, graded = np.array([1.0, 0.0, 1.0]), np.array([0.25, 1 / 3, 0.9])
    assert per_example.encode(binary) == ("u1", b"\x01\x00\x01")  # one byte per example
    dtype, data = per_example.encode(graded)
    assert dtype == "f4" and len(data) == 12
    assert np.array_equal(per_example.decode("u1", b"\x01\x00\x01"), binary)
    assert np.allclose(per_example.decode(dtype, data), graded, rtol=1e-7)


def test_collect_checks_the_evaluators_per_example_contract():
    plain, examples = per_example.collect("e", Scores({"d": 0.5, "e": 1.0}, {"d": [1, 0]}))
    assert plain == {"d": 0.5, "e": 1.0} and list(examples) == ["d"] and examples["d"].tolist() == [1.0, 0.0]
    assert per_example.collect("e", {"d": 0.5}) == ({"d": 0.5}, None)  # a plain dict: no per-example values
    with pytest.raises(PluginError, match="average 0.5 but its score is 0.75"):
        per_example.collect("e", Scores({"d": 0.75}, {"d": [1, 0]}))
    with pytest.raises(PluginError, match="no score for it"):
        per_example.collect("e", Scores({"d": 0.5}, {"other": [1]}))
    with pytest.raises(PluginError, match="finite"):
        per_example.collect("e", Scores({"d": 0.5}, {"d": [float("nan")]}))


# ---- evidence: the arrays the statistics resample ----------------------------------------------------------

def test_group_point_estimates_are_the_recorded_normalised_scores(run):
    group = evidence.Group(run, SUITE, "toy", "pre", 2)
    assert sorted(group.seeds) == [0, 1] and group.rows() == ["avg", "ties", "multitask", "experts", "base"]
    for row, model in (("ties", "ties"), ("avg", "avg"), ("multitask", "mt"), ("base", "base")):
        for metric in evidence.METRICS:
            q = evidence.Quantity(row, metric)
            assert group.basis(q, [0, 1]) == evidence.EXAMPLES
            point = statistics.point_estimates(group.samples([q], [0, 1]))[q.name]
            assert point == A(mean([getattr(normalised(s, model), metric) for s in (0, 1)]), rel=1e-12)
    # the experts: held-in 1; held-out the mean of the experts' own over the base:
    # seed 0: (0.25 / 0.5 + 0.75 / 0.5) / 2 = 1; seed 1: (0.5 / 1 + 1 / 1) / 2 = 0.75 -> 0.875
    experts = statistics.point_estimates(group.samples([evidence.Quantity("experts", m) for m in evidence.METRICS],
                                                       [0, 1]))
    assert experts == {"experts|held_in": A(1.0), "experts|held_out": A(0.875)}


def test_contributions_sum_to_the_difference_and_give_the_hand_computed_permutation_p(run):
    group = evidence.Group(run, SUITE, "toy", "pre", 2)
    # held-out, ties - avg: seed 0 (0.75 - 0.25) / 0.5 = 1; seed 1 (0.75 - 1) / 1 = -0.25; mean 0.375.
    # Each example weighs 1 / (2 seeds * 1 category * 1 dataset * 4 examples * the base's mean): 1/4 at seed 0,
    # 1/8 at seed 1; the examples that differ: +1/4, +1/4 (seed 0), -1/8 (seed 1)
    c = group.contributions("ties", "avg", "held_out", [0, 1])
    assert sorted(c[c != 0].tolist()) == [-0.125, 0.25, 0.25] and c.sum() == A(0.375)
    # sign patterns of (1/4, 1/4, -1/8) reaching |0.375|: +++ (0.375), ++- (0.625), --+ (-0.625), --- (-0.375): 4 of 8
    assert statistics.sign_flip_test(c) == A(0.5)
    for metric in evidence.METRICS:
        for a, b in (("ties", "avg"), ("ties", "base"), ("avg", "experts"), ("multitask", "experts")):
            seeds = [0, 1]
            point = statistics.point_estimates(group.samples([evidence.Quantity(a, metric),
                                                              evidence.Quantity(b, metric)], seeds))
            assert group.contributions(a, b, metric, seeds).sum() == A(
                point[f"{a}|{metric}"] - point[f"{b}|{metric}"], abs=1e-12), (a, b, metric)


def test_compare_by_hand(run):
    result = cmp.compare(run, "ties", "avg", n_boot=2000)
    (group,) = result["groups"]
    out = group["held_out"]
    assert out["difference"] == A(0.375) and out["per_seed"] == {0: A(1.0), 1: A(-0.25)}
    assert out["p_value"] == A(0.5) and out["examples"] == 8 and out["basis"] == evidence.EXAMPLES
    assert out["test"] == "sign-flip permutation over test examples"
    assert out["ci"][0] < out["difference"] < out["ci"][1]
    # held-in, seed 0: a (0.75 / 1), b (1 / 1) -> 0.875 for ties; a 0.5, b 0.5 -> 0.5 for avg: +0.375;
    # seed 1: ties a 0.5 / 0.75, b 1 -> 0.8333; avg a 0.75 / 0.75, b 0.5 -> 0.75: +0.0833
    held_in = group["held_in"]
    assert held_in["per_seed"] == {0: A(0.375), 1: A(1 / 12)} and held_in["difference"] == A((0.375 + 1 / 12) / 2)
    # per category: a at seed 0: 0.75 - 0.5; seed 1: 0.5 / 0.75 - 1 -> mean (0.25 - 1/3) / 2
    assert held_in["categories"]["a"]["difference"] == A((0.25 - 1 / 3) / 2)
    assert set(held_in["categories"]) == {"a", "b"} and set(out["categories"]) == {"x"}
    assert out["categories"]["x"]["difference"] == A(0.375)  # one held-out category: the same as overall


def test_compare_without_per_example_results_falls_back_to_seeds(tmp_path):
    db = write_run(tmp_path / "results.sqlite", with_examples=False)
    out = cmp.compare(db, "ties", "avg")["groups"][0]["held_out"]
    assert out["basis"] == evidence.SEEDS_ONLY and out["examples"] is None
    # the exact sign-flip over the 2 seeds' shares (1 / 2, -0.25 / 2) of the mean difference 0.375: the sums of the
    # four sign patterns are +-0.375 and +-0.625, all reaching |0.375|: p = 1 (two seeds of opposite signs)
    assert out["p_value"] == 1.0 and out["test"].startswith("exact sign-flip over 2 seeds")
    # seeds only: every replicate is seed 0's difference, seed 1's or their mean
    assert out["ci"] == A([-0.25, 1.0])
    rows = {r.method: r for r in lb.build(db)}
    # ties' held-out: 1.5 at seed 0, 0.75 at seed 1
    assert rows["ties"].ci_basis == evidence.SEEDS_ONLY and rows["ties"].held_out_ci == A([0.75, 1.5])
    assert any("seeds only" in n for n in lb.notes(list(rows.values())))
    db.close()


@pytest.mark.parametrize("args, fragments", [
    (("tie", "avg"), ["unknown method 'tie'", "did you mean 'ties'"]),
    (("ties", "ties"), ["two different methods", "'ties' twice"]),
    (("ties", "avg", "--size", "big"), ["unknown size 'big'", "valid: toy"]),
    (("ties", "avg", "--n", "8"), ["unknown N '8'", "valid: 2"]),
    (("ties", "avg", "--base-kind", "it"), ["unknown base kind 'it'"]),
])
def test_compare_errors_are_one_line(run, args, fragments):
    assert_user_error(CliRunner().invoke(cli, ["compare", str(run.path.parent), *args]), *fragments)


def test_compare_needs_paired_data(run):
    run.conn.execute("DELETE FROM merges WHERE method = 'avg' AND seed = 0")
    run.conn.execute("DELETE FROM merges WHERE method = 'ties' AND seed = 1")
    with pytest.raises(InputError, match="has both 'ties' and 'avg' on the same seeds"):
        cmp.compare(run, "ties", "avg")


def test_compare_cli_text_and_json(run):
    text = CliRunner().invoke(cli, ["compare", str(run.path.parent), "ties", "avg"])
    assert text.exit_code == 0, text.output
    assert "ties - avg: toy, pre base, N=2" in text.output and "+0.375" in text.output and "0.5000" in text.output
    data = json.loads(CliRunner().invoke(cli, ["compare", str(run.path.parent), "ties", "base", "--format",
                                               "json"]).output)
    assert data["a"] == "ties" and data["b"] == "base" and data["groups"][0]["held_out"]["b"] == A(1.0)


# ---- the leaderboard's intervals and marks ---------------------------------------------------------------

def test_leaderboard_rows_carry_intervals_containing_their_means_and_marks(run):
    for seed in (0, 1):  # a merge that answers nothing right: held-in and held-out 0 whatever the resample
        run.conn.execute("INSERT INTO merges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (seed, "toy", "pre", 2, "flat", json.dumps(["a", "b"]), "{}", 0.0, 0.0, 0.0, "{}",
                          f"flat{seed}", 1.0))
        zeros = {d: np.zeros(4) for d in ("a1", "b1", "x1")}
        for sql, args in (score_statements(f"flat{seed}", "test", {d: 0.0 for d in zeros})
                          + per_example.statements(f"flat{seed}", "test", zeros)):
            run.conn.execute(sql, args)
    rows = lb.build(run)
    by = {r.method: r for r in rows}
    for r in rows:
        for metric in evidence.METRICS:
            ci, m = getattr(r, f"{metric}_ci"), getattr(r, metric).mean
            assert ci is not None and ci[0] <= m <= ci[1], (r.key, metric)
    # held-out means: ties (1.5 + 0.75) / 2 = 1.125, avg (0.5 + 1) / 2 = 0.75: ties is best, avg tied or below
    assert by["ties"].held_out_rank == "best" and by["base"].held_out_ci == [1.0, 1.0]
    low, high = by["ties"].held_out_ci
    overlap = by["avg"].held_out_ci[1] >= low and by["avg"].held_out_ci[0] <= high
    assert by["avg"].held_out_rank == ("tied" if overlap else "below")
    assert by["experts"].held_in_ci == [1.0, 1.0] and by["multitask"].held_in_rank is None
    assert by["flat"].held_in_ci == [0.0, 0.0] and by["flat"].held_in_rank == by["flat"].held_out_rank == "below"
    record = json.loads(lb.to_json(rows))[0]
    assert record["held_in_ci"] == by[record["method"]].held_in_ci and record["ci_basis"] == evidence.EXAMPLES
    table = list(csv.DictReader(io.StringIO(lb.to_csv(rows))))
    assert json.loads(table[0]["held_out_ci"]) == A(rows[0].held_out_ci)
    md = lb.markdown(rows)
    assert f"{by['ties'].held_out.mean:.3f} [{low:.3f}, {high:.3f}] ▲" in md and "two-level bootstrap" in md
    assert "lambda=0.5 (seeds 0, 1)" in md  # the chosen hyperparameters, per seed
    assert lb.build(run, n_boot=0)[0].held_in_ci is None  # --bootstrap 0: no intervals
    only = {r.method: r for r in lb.build(run, methods=("flat",))}  # marks compare with every merge of the group
    assert set(only) == {"flat", "multitask", "experts", "base"} and only["flat"].held_out_rank == "below"
    assert [r.held_in_ci for r in lb.build(run)] == [r.held_in_ci for r in rows]  # reproducible


def test_intervals_reach_the_examples_only_where_they_were_recorded(run):
    run.conn.execute("DELETE FROM examples WHERE model = 'ties1' AND dataset = 'x1'")
    rows = {r.method: r for r in lb.build(run)}
    assert rows["ties"].ci_basis == evidence.PARTLY  # held-in still resamples examples, held-out at seed 1 cannot
    group = evidence.Group(run, SUITE, "toy", "pre", 2)
    assert group.basis(evidence.Quantity("avg", "held_out"), [0]) == evidence.EXAMPLES
    assert group.basis(evidence.Quantity("avg", "held_out"), [1]) == evidence.SEEDS_ONLY  # x1 unpaired at seed 1


def test_the_python_api_gives_the_clis_json(run):
    from mergebench.study import api

    via_api = api.compare(run.path.parent, "ties", "avg", ns=[2])
    via_cli = json.loads(CliRunner().invoke(cli, ["compare", str(run.path.parent), "ties", "avg", "--format",
                                                  "json"]).output)
    assert json.loads(json.dumps(via_api)) == via_cli


def test_html_chart_draws_means_and_intervals_on_one_axis():
    import re

    from mergebench.study.html import chart

    svg = chart("t", [2, 4], {"m": [(2, 0.5, 0.4, 0.6), (4, 0.7, 0.65, 0.75)]}, None, "y")
    # the axis spans the bars, padded by max(0.02, 10% of 0.75 - 0.4): [0.365, 0.785] over 210 px from y = 30
    def py(v):
        return 30 + 210 * (1 - (v - 0.365) / 0.42)

    circles = [float(v) for v in re.findall(r'<circle cx="[^"]+" cy="([^"]+)"', svg)]
    bars = [(float(a), float(b)) for a, b in re.findall(r'<line x1="[^"]+" x2="[^"]+" y1="([^"]+)" y2="([^"]+)" '
                                                        r'stroke="#[0-9a-f]+" stroke-width="1"/>', svg)]
    assert circles == pytest.approx([py(0.5), py(0.7)], abs=0.06)
    assert bars == [pytest.approx((py(0.4), py(0.6)), abs=0.06), pytest.approx((py(0.65), py(0.75)), abs=0.06)]
    assert "m, N=4: 0.700 [0.650, 0.750]" in svg


def test_a_cached_evaluation_brings_its_per_example_values_back(tmp_path, monkeypatch):
    """The evaluation cache keeps each dataset's per-example values beside its score."""
    import sys

    from toy_study import EXAMPLE

    if str(EXAMPLE) not in sys.path:
        monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("MERGEBENCH_PLUGINS", "mergebench_toy_study")
    from mergebench.core.plugin_manager import get_plugin_manager
    from mergebench.study import artifacts, jobs
    from mergebench.study.cache import ArtifactCache
    from mergebench.study.contracts import ComponentChoice, ModelRole, PrepareInputs

    import mergebench_toy_study as toy

    cache = ArtifactCache(tmp_path / "cache")
    data = artifacts.suite(get_plugin_manager(), cache, "toy-study", 0, {})
    model = toy.toy_init({"dim": 8, "noise": 0.3, "seed": 1}, tmp_path / "model", PrepareInputs(data))
    datasets = ("toy_alpha", "toy_x")
    job = jobs.EvalJob(str(cache.root), model, "toy-study", data, datasets, ComponentChoice("toy_score", {}), "test",
                       ModelRole("base", 0, "toy", "pretrained"))
    first, again = job.run(), job.run()
    assert not first.cached and again.cached and again.scores == first.scores
    w = toy.read_model(model)["w"]
    for d in datasets:
        row = json.loads(data.require(d, "test", "t").read_text())
        by_hand = toy.example_scores(w, row["block"], row["target"], 4.0)
        assert first.examples[d].tolist() == pytest.approx(by_hand, rel=1e-12)
        assert again.examples[d].tolist() == pytest.approx(by_hand, rel=1e-6)  # float32 in the cache
        assert len(by_hand) == 8 and len(set(by_hand)) > 1
