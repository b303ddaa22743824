"""``draws: K`` (each stochastic merge repeated with K merge seeds, each draw its own resumable unit, the spread
from draws reported apart from the spread between seeds) and ``methods: all`` (every registered method, through the
registry, the (method, N) pairs a method cannot merge skipped), on the example study plugin."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mergebench.cli.main import cli
from mergebench.core.errors import InputError
from mergebench.study.runner import draw_seed

from toy_study import EXAMPLE, plugin_env, rows, weights, write_config

TESTS = Path(__file__).resolve().parent
DRAWS = dict(seeds=[0, 1], n_experts=[2, 3], methods=["average", "dare_ties", "pairwise_mean"], draws=3,
             search={"dare_ties": {"lambda": [0.6, 1.0], "density": [0.3, 0.6]}},
             bases=[{"size": "toy", "kind": "pretrained", "preparer": "toy_init"}], workers=1)


def env_for(home: Path) -> dict[str, str]:
    env = plugin_env(home)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env["PYTHONPATH"]])
    env["MERGEBENCH_PLUGINS"] = "mergebench_toy_study,toy_pairwise"
    return env


def run(config: Path, run_dir: Path, home: Path):
    result = CliRunner().invoke(cli, ["run", str(config), "--run-dir", str(run_dir)], env=env_for(home))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    root = tmp_path_factory.mktemp("draws")
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))
    config = write_config(root / "draws.yaml", **DRAWS)
    result = run(config, root / "run", root / "home")
    return root, config, result.output


def json_of(*args, env=None):
    result = CliRunner().invoke(cli, [*map(str, args), "--format", "json"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_each_draw_is_its_own_unit_merged_with_its_own_seed(drawn, tmp_path):
    from mergebench.core.api import merge

    root, _, output = drawn
    run_dir = root / "run"
    # sweeps: 2 seeds x (N=2: average, 3 dare_ties draws, pairwise_mean; N=3: average, 3 dare_ties draws)
    assert len(rows(run_dir, "SELECT key FROM units WHERE kind = 'sweep'")) == 2 * (5 + 4)
    assert "pairwise_mean not run at N=3" in " ".join(output.split())
    methods = {(r["n"], r["method"]) for r in rows(run_dir, "SELECT n, method FROM merges")}
    assert methods == {(2, "average"), (2, "dare_ties"), (2, "pairwise_mean"), (3, "average"), (3, "dare_ties")}
    draws = rows(run_dir, "SELECT d.*, m.path FROM draws d JOIN models m ON m.key = d.model ORDER BY seed, n, draw")
    assert [(r["seed"], r["n"], r["method"], r["draw"]) for r in draws] == [
        (s, n, "dare_ties", k) for s in (0, 1) for n in (2, 3) for k in (1, 2)]
    with torch.no_grad():
        for r in draws:
            assert r["merge_seed"] == draw_seed(r["seed"], r["draw"]) != r["seed"]
            first = rows(run_dir, "SELECT m.path, g.experts FROM merges g JOIN models m ON m.key = g.model WHERE "
                                  "g.seed = ? AND g.n = ? AND g.method = 'dare_ties'", (r["seed"], r["n"]))[0]
            assert json.loads(r["experts"]) == json.loads(first["experts"])  # the same experts, another random draw
            assert not torch.equal(weights(r["path"]), weights(first["path"]))
            # the draw's merge is dare_ties with the draw's seed and its chosen parameters, merged again here
            models = {(m["role"], m["category"]): m["path"] for m in rows(
                run_dir, "SELECT * FROM models WHERE seed = ? AND role != 'merge'", (r["seed"],))}
            again = merge("dare_ties", base=models[("base", None)],
                          experts=[models[("expert", c)] for c in json.loads(r["experts"])],
                          output=tmp_path / f"again-{r['seed']}-{r['n']}-{r['draw']}", seed=r["merge_seed"],
                          **json.loads(r["params"]))
            assert torch.equal(weights(again.output), weights(r["path"]))
    assert draw_seed(5, 0) == 5 and draw_seed(5, 1) == draw_seed(5, 1) != draw_seed(5, 2)


def test_leaderboard_reports_the_spread_from_draws_apart_from_seeds(drawn):
    root, _, _ = drawn
    run_dir = root / "run"
    records = {r["key"]: r for r in json_of("leaderboard", run_dir)}
    for n in (2, 3):
        row = records[f"toy/pretrained/N={n}/dare_ties"]
        values = {}  # metric -> seed -> the three draws' normalised scores, from the database
        for metric in ("held_in", "held_out"):
            values[metric] = {
                s: [rows(run_dir, f"SELECT {metric} FROM merges WHERE seed = ? AND n = ? AND method = 'dare_ties'",
                         (s, n))[0][0]] + [r[0] for r in rows(run_dir, f"SELECT {metric} FROM draws WHERE seed = ? AND "
                                                                       "n = ? ORDER BY draw", (s, n))]
                for s in (0, 1)}
            per_seed = [np.mean(v) for v in values[metric].values()]
            assert row[metric]["mean"] == pytest.approx(np.mean(per_seed), rel=1e-12)
            # one-way ANOVA by hand: within-seed variance pooled over 2 x (3 - 1) degrees of freedom
            within = sum(np.sum((np.array(v) - np.mean(v)) ** 2) for v in values[metric].values()) / 4
            between = max(np.var(per_seed, ddof=1) - within / 3, 0.0)
            parts = row["draws"][metric]
            assert parts["draw_sd"] == pytest.approx(np.sqrt(within), rel=1e-9)
            assert parts["seed_sd"] == pytest.approx(np.sqrt(between), abs=1e-12)
            assert parts["draw_share"] == pytest.approx(within / (within + between), rel=1e-9)
            low, high = row[f"{metric}_ci"]
            assert low <= row[metric]["mean"] <= high
        assert row["draws"]["per_seed"] == 3 and len(row["draws"]["params"]["0"]) == 3
        assert records[f"toy/pretrained/N={n}/average"]["draws"] is None
    page = CliRunner().invoke(cli, ["leaderboard", str(run_dir), "--format", "markdown"]).output
    assert "### Random draws" in page and "| toy | pretrained | 2 | dare_ties | 3 |" in page
    html = CliRunner().invoke(cli, ["leaderboard", str(run_dir), "--format", "html"]).output
    assert "Random draws of stochastic methods" in html


def test_compare_averages_each_seeds_draws(drawn):
    root, _, _ = drawn
    records = {r["key"]: r for r in json_of("leaderboard", root / "run")}
    data = json_of("compare", root / "run", "dare_ties", "average")
    for g in data["groups"]:
        for metric in ("held_in", "held_out"):
            expected = (records[f"toy/pretrained/N={g['n']}/dare_ties"][metric]["mean"]
                        - records[f"toy/pretrained/N={g['n']}/average"][metric]["mean"])
            assert g[metric]["difference"] == pytest.approx(expected, abs=1e-6)


def test_more_draws_add_only_the_new_units(drawn, tmp_path):
    root, config, _ = drawn
    run_dir = root / "run"
    before = dict(rows(run_dir, "SELECT key, finished FROM units"))
    run(config, run_dir, root / "home")
    assert dict(rows(run_dir, "SELECT key, finished FROM units")) == before  # nothing redone
    more = write_config(tmp_path / "more.yaml", **{**DRAWS, "draws": 4})
    run(more, run_dir, root / "home")
    after = dict(rows(run_dir, "SELECT key, finished FROM units"))
    assert {k: after[k] for k in before} == before
    assert sorted(k.split(":")[5] for k in set(after) - set(before)) == ["dare_ties@draw3"] * 4  # 2 seeds x 2 N


# ---- the config: draws and methods: all ------------------------------------------------------------------

@pytest.fixture
def pm_pairwise(pm):
    import toy_pairwise

    pm.register(toy_pairwise, name="toy_pairwise")
    return pm


def test_methods_all_is_every_registered_method_that_can_merge_some_n(pm_pairwise):
    from mergebench.study.config import parse, skipped

    cfg = parse({"methods": "all", "n_experts": [2, 3]}, pm_pairwise)
    names = pm_pairwise.merge_methods().names()
    assert "pairwise_mean" in cfg.methods  # a plugin's method: the registry, not a list in the code
    assert {"regmean", "fisher"} <= set(cfg.methods)  # data-aware too: the study gives each expert calibration data
    assert cfg.methods == [m for m in names if len(cfg.unmergeable.get(m, {})) < 2]
    assert cfg.unmergeable["pairwise_mean"] == {3: "pairwise_mean merges exactly 2 experts, got 3"}
    assert set(cfg.methods) | {m for m, r in cfg.unmergeable.items() if len(r) == 2} == set(names)
    for name, reasons in cfg.unmergeable.items():  # each exclusion is the method's own check refusing N experts
        method = pm_pairwise.merge_methods().get(name)
        if method.check is not None:
            for n in reasons:
                with pytest.raises(Exception):
                    method.check(method.resolve_params({}), (1.0,) * n)
    assert "merge method pairwise_mean not run at N=3: pairwise_mean merges exactly 2 experts, got 3" in skipped(cfg)
    assert parse(cfg.to_dict(), pm_pairwise).methods == cfg.methods  # the expanded list is a valid config again


def test_a_method_that_can_merge_no_n_of_the_study_is_an_error(pm_pairwise):
    from mergebench.study.config import parse

    with pytest.raises(InputError, match="merge method 'pairwise_mean' cannot merge N=3 experts .* nor any N"):
        parse({"methods": ["average", "pairwise_mean"], "n_experts": [3]}, pm_pairwise)


def test_the_plan_leaves_out_what_the_run_skips_and_counts_draws(pm_pairwise):
    from mergebench.study.config import parse
    from mergebench.study.plan import make_plan

    cfg = parse({"methods": ["average", "dare_ties", "pairwise_mean"], "n_experts": [2, 3], "draws": 3,
                 "seeds": [0, 1], "base_kinds": ["pretrained"]}, pm_pairwise)
    plan = make_plan(cfg, pm_pairwise, check_inputs=False)
    sweeps = {j.what: j.count for j in plan.jobs if j.kind == "sweep"}
    assert not any("pairwise_mean, N=3" in w for w in sweeps) and any("pairwise_mean, N=2" in w for w in sweeps)
    assert [c for w, c in sweeps.items() if "dare_ties, N=2" in w] == [2 * 3]  # seeds x draws
    assert [c for w, c in sweeps.items() if "average, N=2" in w] == [2]  # not stochastic: one per seed
    assert any("pairwise_mean is not run at N=3" in note for note in plan.notes)


@pytest.mark.parametrize("draws", [0, "3", True, 1.5])
def test_draws_must_be_a_positive_integer(pm, draws):
    from mergebench.study.config import parse

    with pytest.raises(InputError, match="draws must be an integer >= 1"):
        parse({"draws": draws}, pm)
