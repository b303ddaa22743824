"""The third-party example plugin, installed the way users install it, seen and used by the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mergebench.core.context import TensorContext
from mergebench.core.plugin_manager import make_plugin_manager

from conftest import REPO, load_dir

EXAMPLE = REPO / "examples" / "mergebench-plugin-example"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """pip-install the example into a private directory (offline: no dependencies, no build isolation)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(EXAMPLE)], check=True, capture_output=True)
    return target


def cli(site, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("MERGEBENCH_LOAD_PLUGINS")
    return subprocess.run([sys.executable, "-m", "mergebench", *map(str, args)], capture_output=True,
                          text=True, env=env)


def test_installed_example_appears_in_methods_and_plugins(site):
    methods = json.loads(cli(site, "methods", "--json").stdout)
    crumbs = next(m for m in methods if m["name"] == "breadcrumbs")
    assert crumbs["plugin"] == "breadcrumbs" and "2312.06795" in crumbs["reference"]
    assert [p["name"] for p in crumbs["parameters"]] == ["density", "gamma", "lambda"]
    plugins = {r["name"]: r for r in json.loads(cli(site, "plugins", "--json").stdout)}
    assert plugins["breadcrumbs"]["distribution"] == "mergebench-breadcrumbs"


def test_installed_example_merges_through_the_cli(site, toy_models, tmp_path):
    out = tmp_path / "crumbs"
    done = cli(site, "merge", "breadcrumbs", "--base", toy_models["base"], "-e", toy_models["e0"], "-e",
               toy_models["e1"], "-p", "density=0.5", "-p", "gamma=0.1", "-q", "-o", out)
    assert done.returncode == 0, done.stderr
    bad = cli(site, "merge", "breadcrumbs", "--base", toy_models["base"], "-e", toy_models["e0"], "-p", "gama=0.1",
              "-o", tmp_path / "bad")
    assert bad.returncode == 2 and "did you mean 'gamma'" in bad.stderr

    # the maths, by hand: drop the top 10% and keep the next 50% of each task vector, then sum
    base, e0, e1 = (load_dir(p)["layer.0.weight"] for p in (toy_models["base"], toy_models["e0"], toy_models["e1"]))
    n = base.numel()
    want = base.clone()
    for e in (e0, e1):
        tau = (e - base).reshape(-1)
        order = sorted(range(n), key=lambda i: (-abs(float(tau[i])), i))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[round(0.1 * n): round(0.6 * n)]] = True
        want += (tau * keep).reshape(base.shape)
    assert torch.allclose(load_dir(out)["layer.0.weight"], want, atol=1e-6)


def test_example_registers_on_a_fresh_manager():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import mergebench_breadcrumbs
    finally:
        sys.path.remove(str(EXAMPLE))
    pm = make_plugin_manager(entry_points=False)
    pm.register(mergebench_breadcrumbs, name="breadcrumbs")
    m = pm.merge_methods().get("breadcrumbs")
    base, expert = torch.zeros(10), torch.arange(1.0, 11.0)
    out = m.merge(base, [expert], m.resolve_params({"density": 0.3, "gamma": 0.2}), TensorContext("w", (1.0,)))
    assert out.tolist() == [0, 0, 0, 0, 0, 6, 7, 8, 0, 0]  # 10 and 9 are outliers; 8, 7, 6 are kept


def test_example_plugin_runs_in_a_study_and_gates_in_ci(site, tmp_path):
    """The CI recipe of examples/ci/ with the example plugin: run, save a baseline, check, see a regression fail."""
    import yaml

    config = yaml.safe_load((EXAMPLE / "mergebench-ci.yaml").read_text())
    assert config["methods"] == ["ties", "breadcrumbs"]
    config.update({"suite_params": {"train": 200, "validation": 16, "test": 16}, "n_experts": [2],
                   "base_kinds": ["pretrained"], "pretrain": {"steps": 20}, "expert": {"steps": 6},
                   "multitask": {"steps": 6}, "workers": 1})
    config["search"]["breadcrumbs"] = {"lambda": [0.5, 1.0]}
    (tmp_path / "ci.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    result = cli(site, "run", tmp_path / "ci.yaml", "--run-dir", run_dir, "--no-leaderboard")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(cli(site, "leaderboard", run_dir, "--format", "json").stdout)
    crumbs = next(r for r in rows if r["method"] == "breadcrumbs")
    assert crumbs["params"][0]["lambda"] in (0.5, 1.0) and crumbs["held_out"]["mean"] is not None
    assert cli(site, "leaderboard", run_dir, "--save-baseline", tmp_path / "b.json", "--format", "json").returncode == 0
    assert cli(site, "leaderboard", run_dir, "--check", tmp_path / "b.json", "--format", "json").returncode == 0
    baseline = json.loads((tmp_path / "b.json").read_text())
    baseline["rows"]["tiny/pretrained/N=2/breadcrumbs"]["held_out"] += 0.1
    (tmp_path / "b.json").write_text(json.dumps(baseline))
    gate = cli(site, "leaderboard", run_dir, "--check", tmp_path / "b.json", "--format", "json")
    assert gate.returncode == 1 and "tiny/pretrained/N=2/breadcrumbs: held-out" in gate.stderr
