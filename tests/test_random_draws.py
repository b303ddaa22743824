"""Whether a merge draws random numbers depends on its parameters, not only on the method: DARE at density 1
and arcee_fusion with exact quantiles draw none. The card says the seed matters only when it does, and a study's
``draws: K`` repeats only sweeps whose grid draws."""

from __future__ import annotations

import json

import pytest

from mergebench.core.api import merge

from mergekit_ref import llama_family


@pytest.mark.parametrize("method, params, expert_params, draws", [
    ("dare_linear", {"density": 1.0}, [{}, {}], False),
    ("dare_linear", {"density": 0.0}, [{}, {}], False),  # everything dropped, whatever the draws
    ("dare_linear", {"density": 0.3}, [{}, {}], True),
    ("dare_ties", {"density": 1.0}, [{}, {"density": 0.5}], True),  # one expert's own density draws
    ("dare_ties", {"density": [0.2, 1.0]}, [], True),  # a gradient varies by tensor: taken to draw
    ("della", {"density": 1.0}, [], False),
    ("della", {"density": 0.7}, [], True),
    ("ties", {"density": 0.2}, [], False),
    ("arcee_fusion", {}, [], False),  # exact quartiles
    ("arcee_fusion", {"quantile_sample": 1000}, [], True),  # mergekit's sampled estimate
])
def test_draws_random_goes_by_the_parameters(pm, method, params, expert_params, draws):
    m = pm.merge_methods().get(method)
    given = {k: v for k, v in params.items() if not isinstance(v, list)}
    resolved = {**m.resolve_params(given), **params}
    assert m.draws_random(resolved, expert_params) is draws


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return llama_family(tmp_path_factory.mktemp("draws"), n_experts=2, scale=0.1, layers=2)


@pytest.mark.parametrize("density, random", [(1.0, False), (0.5, True)])
def test_the_card_says_the_seed_matters_only_when_the_merge_draws(family, tmp_path, density, random):
    out = tmp_path / "out"
    merge("dare_linear", base=family["base"], experts=[family["e0"], family["e1"]], output=out, density=density,
          seed=7)
    record = json.loads((out / "mergebench.json").read_text())
    assert record["method"]["stochastic"] is random
    assert ("the seed determines the output" in (out / "README.md").read_text()) is random
    again = tmp_path / "again"
    merge("dare_linear", base=family["base"], experts=[family["e0"], family["e1"]], output=again, density=density,
          seed=8)
    same = (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    assert same is not random  # what the card says is what another seed does


def test_a_study_repeats_only_sweeps_whose_grid_draws(pm):
    from mergebench.study.config import parse
    from mergebench.study.plan import make_plan

    cfg = parse({"methods": ["dare_ties", "ties"], "n_experts": [2], "draws": 3, "seeds": [0, 1],
                 "base_kinds": ["pretrained"], "search": {"dare_ties": {"density": [1.0], "lambda": [0.5, 1.0]}}}, pm)
    sweeps = {j.what: j.count for j in make_plan(cfg, pm, check_inputs=False).jobs if j.kind == "sweep"}
    assert [c for w, c in sweeps.items() if "dare_ties" in w] == [2]  # density 1 draws nothing: one per seed
    cfg = parse({**cfg.to_dict(), "search": {"dare_ties": {"density": [1.0, 0.5], "lambda": [1.0]}}}, pm)
    sweeps = {j.what: j.count for j in make_plan(cfg, pm, check_inputs=False).jobs if j.kind == "sweep"}
    assert [c for w, c in sweeps.items() if "dare_ties" in w] == [2 * 3]
