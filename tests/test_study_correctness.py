"""The study's numbers, checked by hand on a study whose every score is known in advance.

The example study plugin (examples/mergebench-study-example) scores a model by an exact function of its
weights, with validation and test targets that disagree (test prefers smaller task vectors), so
experts, merges, sweep points and bases all score differently. Every expected number below is computed
here from the model files, independently of mergebench's merging, normalisation and selection. The
run uses the default worker pool (2 processes).
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mergebench.cli.main import cli

from toy_study import EXAMPLE, example_scores, plugin_env, rows, score, split_rows, weights, write_config

HELD_OUT = ["x", "y"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """One finished toy study (2 seeds, 2 base kinds, N = 2 and 4, three methods): (run_dir, home, config)."""
    root = tmp_path_factory.mktemp("toy")
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    config = write_config(root / "toy.yaml")
    result = CliRunner().invoke(cli, ["run", str(config), "--run-dir", str(root / "run")],
                                env=plugin_env(root / "home"))
    assert result.exit_code == 0, result.output
    return root / "run", root / "home", config


def suite_rows(home, seed: int) -> dict:
    for manifest in (home / "artifacts" / "suite").glob("*/suite.json"):
        if json.loads(manifest.read_text())["seed"] == seed:
            return split_rows(manifest.parent)
    raise AssertionError(f"no built suite for seed {seed}")


def models_of(run_dir, seed: int, kind: str) -> dict:
    """(role, category) -> model directory, for one seed and base kind."""
    return {(r["role"], r["category"]): r["path"] for r in rows(
        run_dir, "SELECT * FROM models WHERE seed = ? AND base_kind = ? AND role != 'merge'", (seed, kind))}


def hand_merge(method: str, params: dict, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    if method == "average":
        return sum(experts) / len(experts)
    if method == "task_arithmetic":
        return base + params["lambda"] * sum(e - base for e in experts)
    raise AssertionError(method)


def held_in_by_hand(w, categories, expert_w, data, split) -> float:
    ratios = [score(w, data[(f"toy_{c}", split)]) / score(expert_w[c], data[(f"toy_{c}", split)]) for c in categories]
    return sum(ratios) / len(ratios)


def held_out_by_hand(w, base_w, data) -> float:
    ratios = [score(w, data[(f"toy_{c}", "test")]) / score(base_w, data[(f"toy_{c}", "test")]) for c in HELD_OUT]
    return sum(ratios) / len(ratios)


def merge_rows(run_dir):
    return rows(run_dir, "SELECT g.*, m.path AS path, u.key AS unit FROM merges g JOIN models m ON m.key = g.model "
                         "JOIN units u ON u.kind = 'sweep' AND u.key LIKE 'sweep:' || g.seed || ':' || g.size || ':' "
                         "|| g.base_kind || ':' || g.n || ':' || g.method || ':%'")


def test_the_run_used_the_default_worker_pool(toy):
    run_dir, _, _ = toy
    config = json.loads(rows(run_dir, "SELECT value FROM meta WHERE key = 'config'")[0][0])
    assert config["workers"] == 2 and config["executor"]["name"] == "local"
    assert len(merge_rows(run_dir)) == 2 * 2 * 2 * 3


def test_sweeps_choose_the_best_validation_point_and_never_look_at_test(toy):
    run_dir, home, _ = toy
    test_would_differ = 0
    for m in merge_rows(run_dir):
        points = [(json.loads(r["params"]), r["held_in"]) for r in rows(
            run_dir, "SELECT * FROM sweep_points WHERE unit = ?", (m["unit"],))]
        chosen = json.loads(m["params"])
        best_params, best = max(points, key=lambda p: p[1])  # first best in grid order
        assert all(chosen[k] == v for k, v in best_params.items()), (m["method"], chosen, points)
        assert m["validation_held_in"] == pytest.approx(best)
        if m["method"] == "ties":
            continue  # its maths is checked against references elsewhere; here: the choice among its points
        # every recorded point, recomputed by hand from the model files
        models = models_of(run_dir, m["seed"], m["base_kind"])
        data = suite_rows(home, m["seed"])
        categories = json.loads(m["experts"])
        base = weights(models[("base", None)]).float()
        experts = {c: weights(models[("expert", c)]).float() for c in categories}
        by_hand = {}
        for params, recorded in points:
            w = hand_merge(m["method"], params, base, [experts[c] for c in categories]).double()
            val = held_in_by_hand(w, categories, {c: e.double() for c, e in experts.items()}, data, "validation")
            assert recorded == pytest.approx(val, rel=1e-5), (m["method"], params)
            by_hand[json.dumps(params)] = (val, held_in_by_hand(
                w, categories, {c: e.double() for c, e in experts.items()}, data, "test"))
        by_validation = max(by_hand, key=lambda k: by_hand[k][0])
        by_test = max(by_hand, key=lambda k: by_hand[k][1])
        assert json.loads(by_validation).items() <= chosen.items()
        test_would_differ += by_validation != by_test
    # the fixture can tell a choice made on test from one made on validation
    assert test_would_differ >= 4


def test_normalised_scores_equal_the_papers_definition_by_hand(toy):
    """Held-in: merged / the category's expert, on test; held-out: merged / the base, on test; means over
    categories."""
    run_dir, home, _ = toy
    for m in merge_rows(run_dir):
        models = models_of(run_dir, m["seed"], m["base_kind"])
        data = suite_rows(home, m["seed"])
        categories = json.loads(m["experts"])
        w = weights(m["path"])
        experts = {c: weights(models[("expert", c)]) for c in categories}
        assert m["held_in"] == pytest.approx(held_in_by_hand(w, categories, experts, data, "test"), rel=1e-9)
        assert m["held_out"] == pytest.approx(held_out_by_hand(w, weights(models[("base", None)]), data), rel=1e-9)
        # the merge on disk is the chosen point's (the in-memory sweep and the engine agree)
        if m["method"] != "ties":
            base = weights(models[("base", None)]).float()
            expected = hand_merge(m["method"], json.loads(m["params"]), base,
                                  [experts[c].float() for c in categories])
            assert torch.allclose(w.float(), expected, atol=1e-6)


def leaderboard(run_dir, *args) -> list[dict]:
    result = CliRunner().invoke(cli, ["leaderboard", str(run_dir), "--format", "json", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_leaderboard_rows_hold_hand_computed_means_in_rank_order(toy):
    run_dir, home, _ = toy
    records = leaderboard(run_dir)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["size"], r["base_kind"], r["n"]), []).append(r)
    assert len(groups) == 4
    for (size, kind, n), group in groups.items():
        kinds = [r["kind"] for r in group]
        assert kinds == ["merge"] * 3 + ["baseline"] * 3  # merges first, then the baselines
        merged = [r["held_in"]["mean"] for r in group if r["kind"] == "merge"]
        assert merged == sorted(merged, reverse=True) and len(set(merged)) == 3  # best first, and they differ
        for r in group:
            seeds = {}
            for seed in (0, 1):
                models = models_of(run_dir, seed, kind)
                data = suite_rows(home, seed)
                categories = json.loads(rows(run_dir, "SELECT experts FROM merges WHERE seed = ? AND base_kind = ? AND "
                                                      "n = ? LIMIT 1", (seed, kind, n))[0][0])
                experts = {c: weights(models[("expert", c)]) for c in categories}
                base = weights(models[("base", None)])
                if r["kind"] == "merge":
                    path = rows(run_dir, "SELECT m.path FROM merges g JOIN models m ON m.key = g.model WHERE g.seed = ? "
                                         "AND g.base_kind = ? AND g.n = ? AND g.method = ?", (seed, kind, n, r["method"]))[0][0]
                    w = weights(path)
                elif r["method"] == "multitask":
                    w = weights(models[("multitask", None)])
                elif r["method"] == "base":
                    w = base
                else:  # experts: held-in 1 by definition, held-out the mean of the experts' own
                    outs = [held_out_by_hand(experts[c], base, data) for c in categories]
                    seeds[seed] = (1.0, sum(outs) / len(outs))
                    continue
                seeds[seed] = (held_in_by_hand(w, categories, experts, data, "test"), held_out_by_hand(w, base, data))
            for i, metric in enumerate(("held_in", "held_out")):
                values = [v[i] for v in seeds.values()]
                mean = sum(values) / 2
                assert r[metric]["mean"] == pytest.approx(mean, rel=1e-9), (r["key"], metric)
                assert r[metric]["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values)), rel=1e-6)
    ordered = leaderboard(run_dir, "--sort", "held_out")
    outs = [r["held_out"]["mean"] for r in ordered]
    assert outs == sorted(outs, reverse=True)


@pytest.mark.parametrize("tolerance", [0.02, 0.125])
def test_ci_gate_passes_at_exactly_the_tolerance_and_fails_just_beyond(toy, tmp_path, tolerance):
    run_dir, _, _ = toy
    baseline = tmp_path / "baseline.json"
    assert CliRunner().invoke(cli, ["leaderboard", str(run_dir), "--save-baseline", str(baseline),
                                    "--format", "json"]).exit_code == 0
    saved = json.loads(baseline.read_text())
    key = "toy/pretrained/N=4/task_arithmetic"
    current = saved["rows"][key]["held_in"]

    def gate(was: float):
        saved["rows"][key]["held_in"] = was
        baseline.write_text(json.dumps(saved))
        return CliRunner().invoke(cli, ["leaderboard", str(run_dir), "--check", str(baseline), "--tolerance",
                                        str(tolerance), "--format", "json"])

    at = current + tolerance  # the baseline was better by exactly the tolerance (to the last bit)
    while at - tolerance > current:
        at = math.nextafter(at, -math.inf)
    assert gate(at).exit_code == 0
    beyond = gate(current + tolerance * 1.01)
    assert beyond.exit_code == 1 and key in beyond.output and "held-in" in beyond.output
    assert gate(current).exit_code == 0


def test_a_unit_is_recorded_entirely_or_not_at_all(tmp_path):
    """A unit's results and its row in ``units`` are one transaction: a failure part-way leaves nothing."""
    from mergebench.study.database import ResultsDB, score_statements

    db = ResultsDB(tmp_path / "results.sqlite")
    statements = score_statements("m", "test", {"a": 0.5, "b": 0.25})
    statements.append(("INSERT INTO no_such_table VALUES (?)", (1,)))  # fails after two rows were written
    with pytest.raises(Exception):
        db.complete("eval:m", "evaluation", {}, None, 1.0, {}, statements)
    assert not db.done("eval:m")
    assert db.scores("m", "test") == {}
    db.complete("eval:m", "evaluation", {}, None, 1.0, {}, statements[:2])
    assert db.done("eval:m") and db.scores("m", "test") == {"a": 0.5, "b": 0.25}


# ---- per-example results, intervals and paired comparisons (issue 13) -----------------------------------------

def test_every_evaluation_keeps_per_example_values_that_are_the_examples_scores(toy):
    """Each (model, split, dataset) score has its per-example values, averaging to it; on test they are the toy
    scoring of each entry of the dataset's block, recomputed here from the model files."""
    from mergebench.study.per_example import decode

    run_dir, home, _ = toy
    examples = {(r["model"], r["split"], r["dataset"]): decode(r["dtype"], r["data"])
                for r in rows(run_dir, "SELECT * FROM examples")}
    scores = {(r["model"], r["split"], r["dataset"]): r["score"] for r in rows(run_dir, "SELECT * FROM scores")}
    assert set(examples) == set(scores) and len(scores) > 100
    for key, values in examples.items():
        assert len(values) == 8 and values.mean() == pytest.approx(scores[key], rel=1e-6)
    checked = 0
    for m in rows(run_dir, "SELECT key, seed, path FROM models WHERE role IN ('merge', 'base', 'expert')"):
        data = suite_rows(home, m["seed"])
        w = weights(m["path"])
        for (model, split, dataset), values in examples.items():
            if model == m["key"] and split == "test":
                assert values == pytest.approx(example_scores(w, data[(dataset, "test")]), rel=1e-6)
                checked += 1
    assert checked > 100


def _independent_interval(run_dir, home, kind: str, n: int, method: str, metric: str, replicates: int = 2000):
    """The two-level bootstrap written out plainly, on per-example values recomputed from the model files: draw
    the seeds, then each dataset's examples (the same draw for the merge and its reference), the paper's score."""
    rng = np.random.default_rng(12345)
    seeds = []
    for seed in (0, 1):
        models = models_of(run_dir, seed, kind)
        data = suite_rows(home, seed)
        categories = json.loads(rows(run_dir, "SELECT experts FROM merges WHERE seed = ? AND base_kind = ? AND n = ? "
                                              "LIMIT 1", (seed, kind, n))[0][0])
        path = rows(run_dir, "SELECT m.path FROM merges g JOIN models m ON m.key = g.model WHERE g.seed = ? AND "
                             "g.base_kind = ? AND g.n = ? AND g.method = ?", (seed, kind, n, method))[0][0]
        merged = weights(path)
        pairs = []  # per category: (merged values, reference values) of its one dataset
        for c in (categories if metric == "held_in" else HELD_OUT):
            reference = weights(models[("expert", c)] if metric == "held_in" else models[("base", None)])
            row = data[(f"toy_{c}", "test")]
            pairs.append((np.array(example_scores(merged, row)), np.array(example_scores(reference, row))))
        seeds.append(pairs)
    values = []
    for _ in range(replicates):
        slots = []
        for s in rng.integers(0, len(seeds), len(seeds)):
            ratios = []
            for x, ref in seeds[s]:
                idx = rng.integers(0, len(x), len(x))
                ratios.append(x[idx].mean() / ref[idx].mean())
            slots.append(np.mean(ratios))
        values.append(np.mean(slots))
    return np.percentile(values, [2.5, 97.5])


def test_two_seed_leaderboard_has_intervals_on_every_row_containing_its_mean(toy):
    run_dir, home, _ = toy
    records = leaderboard(run_dir)
    for r in records:
        assert r["ci_basis"] == "seeds and examples", r["key"]
        for metric in ("held_in", "held_out"):
            low, high = r[f"{metric}_ci"]
            assert low <= r[metric]["mean"] <= high, (r["key"], metric)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["size"], r["base_kind"], r["n"]), []).append(r)
    for group in groups.values():
        merges = [r for r in group if r["kind"] == "merge"]
        for metric in ("held_in", "held_out"):
            best = max(merges, key=lambda r: r[metric]["mean"])
            lo, hi = best[f"{metric}_ci"]
            for r in merges:
                overlaps = r[f"{metric}_ci"][0] <= hi and r[f"{metric}_ci"][1] >= lo
                assert r[f"{metric}_rank"] == ("best" if r is best else "tied" if overlaps else "below")
        base = next(r for r in group if r["method"] == "base")
        assert base["held_out_ci"] == [1.0, 1.0]  # the base over itself, whatever the resample
    # one merge's interval against the bootstrap written out here from the model files
    for method, metric in (("task_arithmetic", "held_in"), ("average", "held_out")):
        row = next(r for r in records if r["key"] == f"toy/pretrained/N=2/{method}")
        low, high = _independent_interval(run_dir, home, "pretrained", 2, method, metric)
        width = high - low
        assert row[f"{metric}_ci"] == pytest.approx([low, high], abs=0.1 * width), (method, metric)


def test_compare_prints_the_paired_difference_with_its_interval(toy):
    run_dir, _, _ = toy
    text = CliRunner().invoke(cli, ["compare", str(run_dir), "ties", "average"])
    assert text.exit_code == 0, text.output
    assert "ties - average: toy, pretrained base, N=2" in text.output and "95% interval" in text.output
    result = CliRunner().invoke(cli, ["compare", str(run_dir), "ties", "average", "--format", "json"])
    data = json.loads(result.output)
    board = {r["key"]: r for r in leaderboard(run_dir)}
    assert len(data["groups"]) == 4
    for g in data["groups"]:
        prefix = f"toy/{g['base_kind']}/N={g['n']}/"
        for metric in ("held_in", "held_out"):
            d = g[metric]
            expected = board[prefix + "ties"][metric]["mean"] - board[prefix + "average"][metric]["mean"]
            assert d["difference"] == pytest.approx(expected, abs=1e-6)  # float32 per-example values
            for seed, value in d["per_seed"].items():
                stored = {m: rows(run_dir, f"SELECT {metric} FROM merges WHERE seed = ? AND base_kind = ? AND n = ? AND "
                                           "method = ?", (int(seed), g["base_kind"], g["n"], m))[0][0]
                          for m in ("ties", "average")}
                assert value == pytest.approx(stored["ties"] - stored["average"], abs=1e-6)
            assert d["ci"][0] <= d["ci"][1] and 0 < d["p_value"] <= 1 and d["examples"] == 8 * (
                g["n"] if metric == "held_in" else 2) * 2
            assert set(d["categories"]) == (set(HELD_OUT) if metric == "held_out" else set(d["categories"])) and (
                d["categories"])
