"""mergekit configurations run unchanged through mergebench and agree with mergekit 0.1.5.

One config per mergekit method, each using per-model parameters, and between them gradients over the
layers, filters by tensor name and slices, merged by mergekit (its own virtualenv, see
tests/mergekit_ref.py) and by mergebench's engine from the same YAML. Deterministic methods agree to
float32 rounding; random ones (DARE, DELLA) draw other numbers, so their kept mass is compared.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from mergebench.core import engine
from mergebench.core.errors import ParameterError
from mergebench.core.recipe import load_recipe
from mergebench.core.tensor_params import evaluate, layer_index
from mergekit_ref import llama_family, needs_mergekit, read_model, run_mergekit_many

STOCHASTIC = {"dare_ties", "dare_linear", "della", "della_linear"}


def configs(p: dict) -> dict[str, dict]:
    """A mergekit config per method over a base and three experts (paths in ``p``)."""
    base, e0, e1, e2 = (str(p[k]) for k in ("base", "e0", "e1", "e2"))

    def models(*entries):
        return [{"model": m, "parameters": params} for m, params in entries]

    three = models((e0, {"weight": 1.0}), (e1, {"weight": [0.2, 1.0]}), (e2, {"weight": [{"filter": "mlp", "value": 0.5},
                                                                                            {"value": 0.8}]}))
    gta = {"base_model": base, "dtype": "float32", "parameters": {"lambda": [0.6, 1.0]}}
    dens = models((e0, {"weight": 1.0, "density": 0.7}), (e1, {"weight": 0.5, "density": [0.4, 0.9]}),
                  (e2, {"weight": 0.8, "density": 0.5}))
    crumbs = models((e0, {"weight": 1.0, "density": 0.8, "gamma": 0.05}), (e1, {"weight": 0.5, "density": 0.7, "gamma": 0.1}),
                    (e2, {"weight": 0.8, "density": 0.9, "gamma": 0.02}))
    della = models((e0, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}), (e1, {"weight": 0.5, "density": 0.6, "epsilon": 0.2}),
                   (e2, {"weight": 0.8, "density": 0.4, "epsilon": 0.15}))
    two = {"base_model": base, "dtype": "float32", "models": models((base, {}), (e0, {}))}
    return {
        "linear": {"merge_method": "linear", "dtype": "float32", "models": three},
        "task_arithmetic": {**gta, "merge_method": "task_arithmetic", "models": three},
        "ties": {**gta, "merge_method": "ties", "models": dens},
        "dare_ties": {**gta, "merge_method": "dare_ties", "models": dens},
        "dare_linear": {**gta, "merge_method": "dare_linear", "models": dens},
        "breadcrumbs": {**gta, "merge_method": "breadcrumbs", "models": crumbs},
        "breadcrumbs_ties": {**gta, "merge_method": "breadcrumbs_ties", "models": crumbs},
        "della": {**gta, "merge_method": "della", "models": della},
        "della_linear": {**gta, "merge_method": "della_linear", "models": della},
        "slerp": {**two, "merge_method": "slerp",
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                                       {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]}, {"value": 0.5}]}},
        "nearswap": {**two, "merge_method": "nearswap", "parameters": {"t": 0.05}},
        "arcee_fusion": {**two, "merge_method": "arcee_fusion"},
        "nuslerp": {"merge_method": "nuslerp", "base_model": base, "dtype": "float32",
                    "models": models((e0, {"weight": 0.7}), (e1, {"weight": 0.3}))},
        "multislerp": {"merge_method": "multislerp", "base_model": base, "dtype": "float32", "models": three},
        "karcher": {"merge_method": "karcher", "dtype": "float32", "models": models((e0, {}), (e1, {}), (e2, {}))},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "dtype": "float32",
                        "models": models((e0, {}), (e1, {}), (e2, {}))},
        "sce": {"merge_method": "sce", "base_model": base, "dtype": "float32", "parameters": {"select_topk": 0.5},
                "models": models((e0, {}), (e1, {}), (e2, {}))},
        "ram": {"merge_method": "ram", "base_model": base, "dtype": "float32", "models": models((e0, {}), (e1, {}))},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "dtype": "float32",
                       "parameters": {"r": 0.2, "alpha": 0.3}, "models": models((e0, {}), (e1, {}))},
        "passthrough": {"merge_method": "passthrough", "dtype": "float32",
                        "slices": [{"sources": [{"model": e0, "layer_range": [0, 2]}]},
                                   {"sources": [{"model": e1, "layer_range": [1, 4]}]}]},
        "slerp_slices": {"merge_method": "slerp", "base_model": base, "dtype": "float32",
                         "parameters": {"t": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.4}]},
                         "slices": [{"sources": [{"model": base, "layer_range": [0, 3]}, {"model": e0, "layer_range": [1, 4]}]}]},
    }


METHODS = sorted(configs({k: "x" for k in ("base", "e0", "e1", "e2")}))


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Every config merged by mergekit (one process) and by mergebench's engine."""
    root = tmp_path_factory.mktemp("mergekit-configs")
    paths = llama_family(root / "models", n_experts=3, scale=0.1)
    cfgs = configs(paths)
    reference = run_mergekit_many(cfgs, root / "ref")
    ours = {}
    for name, cfg in cfgs.items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        try:
            engine.run(load_recipe(path), root / f"{name}-ours")
            ours[name] = read_model(root / f"{name}-ours")
        except Exception as exc:  # noqa: BLE001 - reported by the method's own test
            ours[name] = f"{type(exc).__name__}: {exc}"
    return paths, reference, ours


@needs_mergekit
@pytest.mark.parametrize("name", METHODS)
def test_a_mergekit_config_runs_unchanged_and_agrees_with_mergekit(merged, name):
    paths, reference, ours = merged
    ref, got = reference[name], ours[name]
    assert not isinstance(ref, str), f"mergekit refused the config:\n{ref}"
    assert not isinstance(got, str), f"mergebench refused the config: {got}"
    assert sorted(got) == sorted(ref)
    for n in ref:
        assert got[n].dtype == ref[n].dtype and got[n].shape == ref[n].shape, n
    if name not in STOCHASTIC:
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=2e-6, msg=lambda m, n=n: f"{n}: {m}")
        return
    # random drops: other random numbers, the same kept fraction and mass of change from the base
    base = read_model(paths["base"])
    changed = {k: sum(int((v[n] != base[n]).sum()) for n in base) for k, v in (("ours", got), ("ref", ref))}
    mass = {k: sum(float((v[n] - base[n]).abs().sum()) for n in base) for k, v in (("ours", got), ("ref", ref))}
    total = sum(t.numel() for t in base.values())
    assert abs(changed["ours"] - changed["ref"]) / total < 0.02, changed
    assert mass["ours"] == pytest.approx(mass["ref"], rel=0.05), mass


@needs_mergekit
def test_the_config_runs_through_the_cli_and_the_card_keeps_it_as_given(merged, tmp_path):
    paths, reference, _ = merged
    cfg = configs(paths)["ties"]
    path = tmp_path / "ties.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "mergebench", "merge", str(path), "-o", str(out), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = read_model(out)
    for n, t in reference["ties"].items():
        torch.testing.assert_close(got[n], t, rtol=1e-5, atol=2e-6)
    record = json.loads((out / "mergebench.json").read_text())
    assert record["config_given"] == cfg
    assert record["recipe"]["experts"][1]["parameters"] == {"density": [0.4, 0.9]}
    # the card's recipe redoes the merge to the same bytes
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "mergebench", "merge", str(out / "README.md"), "-o", str(again), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    redo = read_model(again)
    assert all(torch.equal(redo[n], got[n]) for n in got)


def test_settings_follow_mergekits_gradient_and_filter_rules():
    # gradient [0, 1, 4] at t: piecewise linear over equally spaced points
    assert evaluate([0.0, 1.0, 4.0], "x", 0.0) == 0.0
    assert evaluate([0.0, 1.0, 4.0], "x", 0.25) == pytest.approx(0.5)
    assert evaluate([0.0, 1.0, 4.0], "x", 0.75) == pytest.approx(2.5)
    assert evaluate([0.0, 1.0, 4.0], "x", 1.0) == 4.0
    # non-numeric lists pick, they do not interpolate
    assert evaluate(["a", "b", "c"], "x", 0.6) == "b"
    assert evaluate([True, False], "x", 0.99) is True
    # filters: substring of the name, first match wins, a missing or "*" filter matches everything
    filters = [{"filter": "mlp", "value": [0.0, 1.0]}, {"filter": "*", "value": 7}, {"value": 9}]
    assert evaluate(filters, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate(filters, "model.norm.weight", 0.5) == 7
    assert evaluate([{"filter": "mlp", "value": 1}], "lm_head.weight", 0.0) is None
    assert evaluate({"filter": "norm", "value": 3}, "model.norm.weight", 0.0) == 3
    with pytest.raises(ParameterError):
        evaluate([{"filter": "mlp", "valu": 1}], "mlp", 0.0)


def test_layer_positions_run_over_the_layers_and_put_the_rest_at_zero():
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + ["lm_head.weight"]
    jobs = engine.identity_jobs(names, 3, True)
    assert [j.t for j in jobs] == [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 0.0]
    assert all(j.experts == (0, 1) and [s for s, _ in j.inputs] == [0, 1, 2] for j in jobs)
    assert layer_index("transformer.h.11.attn.c_attn.weight") == 11 and layer_index("lm_head.weight") is None


def _cli(*args: str):
    return subprocess.run([sys.executable, "-m", "mergebench", *args], capture_output=True, text=True)


@pytest.mark.parametrize("extra, message", [
    ({"modules": {}}, "multi-module configs (modules:) are not supported"),
    ({"tokenizer": {"source": "union"}}, "the tokenizer: block"),
    ({"frobnicate": 1}, "mergekit config key 'frobnicate' is not supported"),
    ({"tokenizer_source": "other/model"}, "tokenizer_source 'other/model' is neither 'base', 'union' nor one of"),
])
def test_an_unsupported_key_is_one_clear_error_before_any_tensor_is_read(tmp_path, toy_models, extra, message):
    cfg = {"merge_method": "task_arithmetic", "base_model": str(toy_models["base"]),
           "models": [{"model": str(toy_models["e0"]), "parameters": {"weight": 1.0}}], **extra}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _cli("merge", str(path), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_slice_keys_and_per_expert_misuse_are_refused(tmp_path, toy_models):
    base, e0 = str(toy_models["base"]), str(toy_models["e0"])
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": e0, "layer_range": [0, 1]}],
                                                      "residual_weight": 0.5}]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _cli("merge", str(path), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "slice key(s) ['residual_weight'] are not supported" in proc.stderr
    # lambda is one value for the whole merge: per model it is refused, naming the per-expert ones
    cfg = {"merge_method": "task_arithmetic", "base_model": base,
           "models": [{"model": e0, "parameters": {"weight": 1.0, "lambda": 0.5}}]}
    path.write_text(yaml.safe_dump(cfg))
    proc = _cli("merge", str(path), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "parameter 'lambda' of merge method 'task_arithmetic' is one value" in proc.stderr


def test_convert_shows_the_resolved_plan_without_reading_tensors(tmp_path, monkeypatch):
    paths = llama_family(tmp_path / "m", n_experts=1)
    cfg = configs({**paths, "e1": paths["e0"], "e2": paths["e0"]})["slerp_slices"]
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _cli("convert", str(path), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)["tensors"]}
    # 3 output layers from base layers 0-2 and expert layers 1-3, at t = 0, 0.5, 1
    up = rows["model.layers.1.mlp.up_proj.weight"]
    assert up["inputs"] == ["base: model.layers.1.mlp.up_proj.weight", "expert 1: model.layers.2.mlp.up_proj.weight"]
    assert up["t"] == 0.5 and up["params"]["t"] == pytest.approx(0.5)  # 0.2 + 0.5 * (0.8 - 0.2)
    assert rows["model.layers.2.self_attn.q_proj.weight"]["params"]["t"] == 0.4
    assert "model.layers.3.mlp.up_proj.weight" not in rows and rows["lm_head.weight"]["t"] == 0.0
    proc = _cli("convert", str(path), "--format", "recipe")
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["slices"][0]["sources"][1]["layer_range"] == [1, 4]


def test_per_expert_parameters_from_the_cli(tmp_path, toy_models):
    out1, out2 = tmp_path / "a", tmp_path / "b"
    common = ["merge", "ties", "-b", str(toy_models["base"]), "-e", str(toy_models["e0"]), "-e", str(toy_models["e1"]), "-q"]
    assert _cli(*common, "-p", "density=0.3", "-P", "2:density=0.9", "-o", str(out1)).returncode == 0
    from mergebench.core.api import merge
    merge("ties", base=toy_models["base"], experts=[toy_models["e0"], toy_models["e1"]], output=out2, density=0.3,
          expert_params=[{}, {"density": 0.9}])
    a, b = read_model(out1), read_model(out2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    bad = _cli(*common, "-P", "3:density=0.9", "-o", str(tmp_path / "c"))
    assert bad.returncode == 2 and "N from 1 to 2" in bad.stderr


def test_a_misspelt_per_expert_gradient_is_named_before_any_tensor_is_read(pm):
    from mergebench.core.tensor_params import ParameterPlan

    ties = pm.merge_methods().get("ties")
    with pytest.raises(ParameterError, match="unknown parameter 'densty' .*did you mean 'density'"):
        ParameterPlan(ties, {}, [{"densty": [0.1, 0.2]}], [1.0])
    with pytest.raises(ParameterError, match="parameter 'lambda' of merge method 'ties' is one value"):
        ParameterPlan(ties, {}, [{"lambda": [0.1, 0.2]}], [1.0])


def test_a_slices_merge_writes_its_layer_count_into_every_layer_key_of_the_config(tmp_path):
    """Slices stack another number of layers: config.json's num_hidden_layers (Llama), n_layer (GPT-2) and
    num_layers say how many, or the merged model does not load as what it is."""
    paths = llama_family(tmp_path / "m", n_experts=2)
    for key in ("e0", "e1"):
        config_path = paths[key] / "config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "n_layer": config["num_hidden_layers"],
                                           "num_layers": config["num_hidden_layers"]}))
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": str(paths["e0"]), "layer_range": [0, 2]}]},
                      {"sources": [{"model": str(paths["e1"]), "layer_range": [1, 4]}]}]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _cli("merge", str(path), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["num_hidden_layers"], written["n_layer"], written["num_layers"]) == (5, 5, 5)
    assert sum(1 for n in read_model(tmp_path / "out") if n.endswith("mlp.down_proj.weight")) == 5
