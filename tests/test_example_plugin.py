"""The third-party example plugin (Consensus merging), installed the way users install it, seen and used by the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mergebench.core.context import TensorContext
from mergebench.core.errors import ParameterError
from mergebench.core.plugin_manager import make_plugin_manager

from conftest import REPO, load_dir

EXAMPLE = REPO / "examples" / "mergebench-plugin-example"
WORKFLOW = ".github/workflows/mergebench-leaderboard.yml"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """pip-install the example into a private directory (offline: no dependencies, no build isolation), from a
    copy so that the in-tree build leaves no build/ or *.egg-info in the checkout."""
    source = tmp_path_factory.mktemp("src") / "example"
    shutil.copytree(EXAMPLE, source)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, capture_output=True)
    return target


def cli(site, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("MERGEBENCH_LOAD_PLUGINS")
    return subprocess.run([sys.executable, "-m", "mergebench", *map(str, args)], capture_output=True,
                          text=True, env=env)


def consensus_reference(base, experts, weights, tall_lambdas, k, lam):
    """The paper's formula in float64, and each entry's smallest distance to a mask threshold (a float32
    computation agrees with this one only where that margin is well above float32 rounding)."""
    base = base.double()
    taus = [e.double() - base for e in experts]
    mtl = sum(w * tau for w, tau in zip(weights, taus))
    sides = [(tau.abs(), t_lam * (mtl - tau).abs()) for tau, t_lam in zip(taus, tall_lambdas)]
    votes = sum((left >= right).int() for left, right in sides)
    margin = torch.stack([(left - right).abs() for left, right in sides]).amin(0)
    kept = votes >= k
    return base + lam * torch.where(kept, mtl, torch.zeros_like(mtl)), kept & (mtl != 0), margin


def test_consensus_is_not_built_in_and_the_installed_example_registers_it(site):
    assert "consensus" not in make_plugin_manager(entry_points=False).merge_methods()  # else: registered twice
    listed = cli(site, "methods", "--json")
    assert listed.returncode == 0, listed.stderr
    consensus = next(m for m in json.loads(listed.stdout) if m["name"] == "consensus")
    assert consensus["plugin"] == "consensus" and "2405.07813" in consensus["reference"]
    assert [p["name"] for p in consensus["parameters"]] == ["tall_lambda", "k", "lambda"]
    plugins = {r["name"]: r for r in json.loads(cli(site, "plugins", "--json").stdout)}
    assert plugins["consensus"]["distribution"] == "mergebench-consensus"


def test_installed_example_passes_the_plugin_check(site):
    done = cli(site, "plugin", "check", "consensus", "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    report = json.loads(done.stdout)
    status = {r["name"]: r["status"] for r in report["results"]}
    assert report["ok"] and report["plugin"] == "consensus"
    # judged, not skipped: elementwise (chunking), order-free, deterministic; N=1 is refused by k=2
    assert {status[n] for n in ("chunking", "permutation", "deterministic", "identity", "in_memory_vs_engine")} == {"pass"}
    assert report["expert_counts"] == [2, 3]


def test_installed_example_merges_through_the_cli(site, toy_models, tmp_path):
    out = tmp_path / "consensus"
    experts = [toy_models[f"e{i}"] for i in range(3)]
    weights, tall_lambdas, k, lam = (1.0, 0.5, 1.5), (0.3, 0.6, 0.3), 2, 0.7
    done = cli(site, "merge", "consensus", "--base", toy_models["base"], *sum((["-e", e] for e in experts), []),
               *sum((["-w", w] for w in weights), []), "-p", "tall_lambda=0.3", "-P", "2:tall_lambda=0.6",
               "-p", f"k={k}", "-p", f"lambda={lam}", "-q", "-o", out)
    assert done.returncode == 0, done.stderr

    merged, base = load_dir(out), load_dir(toy_models["base"])
    models = [load_dir(e) for e in experts]
    kept_fraction = []
    for name, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(merged[name], b)
            continue
        want, kept, margin = consensus_reference(b, [m[name] for m in models], weights, tall_lambdas, k, lam)
        assert margin.min() > 1e-5, f"{name}: an entry sits on a mask threshold; the comparison would be fragile"
        torch.testing.assert_close(merged[name], want.float(), rtol=1e-6, atol=1e-6)
        kept_fraction.append(kept.double().mean().item())
    # the masks matter here: some entries are dropped (not task arithmetic), some kept (not the base)
    assert all(0.1 < f < 0.9 for f in kept_fraction), kept_fraction

    bad = cli(site, "merge", "consensus", "--base", toy_models["base"], "-e", experts[0], "-e", experts[1],
              "-p", "tall_lamda=0.1", "-o", tmp_path / "bad")
    assert bad.returncode == 2 and "did you mean 'tall_lambda'" in bad.stderr
    too_many = cli(site, "merge", "consensus", "--base", toy_models["base"], "-e", experts[0], "-e", experts[1],
                   "-p", "k=3", "-o", tmp_path / "k3")
    assert too_many.returncode == 2 and "k=3 needs at least 3 experts" in too_many.stderr
    assert not (tmp_path / "k3").exists()


def test_example_registers_on_a_fresh_manager():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import mergebench_consensus
    finally:
        sys.path.remove(str(EXAMPLE))
    pm = make_plugin_manager(entry_points=False)
    pm.register(mergebench_consensus, name="consensus")
    m = pm.merge_methods().get("consensus")
    assert m.elementwise and m.needs_base and not m.stochastic

    # tall_lambda 0.5, unit weights, base 0; entry by entry (tau_MTL; which task masks are on):
    #   0: 1 + 1 + 0 = 2       a, b            2 votes: shared by two tasks
    #   1: 4 + .1 - .1 = 4     a               1 vote: selfish (task a only)
    #   2: 1 - 1 + .1 = .1     a, b, c         3 votes
    #   3: 0                   all (0 >= 0)    0 whatever is kept
    #   4: 1 + 2 + 0 = 3       a (1 >= .5 * 2, on the threshold: the paper's >=), b   2 votes
    def merge(k, lam=1.0, expert_params=({}, {}, {})):
        experts = [torch.tensor([1, 4, 1, 0, 1.]), torch.tensor([1, .1, -1, 0, 2.]), torch.tensor([0, -.1, .1, 0, 0.])]
        params = m.resolve_params({"k": k, "tall_lambda": 0.5, "lambda": lam})
        m.check(params, (1.0,) * 3)
        return m.merge(torch.zeros(5), experts, params, TensorContext("w", (1.0,) * 3, expert_params=expert_params))

    tall = torch.tensor([2, 4, 0.1, 0, 3])  # task arithmetic's tau_MTL
    assert torch.equal(merge(0), tall) and torch.equal(merge(1), tall)
    assert torch.equal(merge(2), torch.tensor([2, 0, 0.1, 0, 3]))
    assert torch.equal(merge(3), torch.tensor([0, 0, 0.1, 0, 0]))
    assert torch.equal(merge(2, lam=0.5), torch.tensor([2, 0, 0.1, 0, 3]) * 0.5)
    # expert b's own tall_lambda: .1 >= .01 * 3.9 turns its mask on at entry 1, which now has 2 votes
    assert torch.equal(merge(2, expert_params=({}, {"tall_lambda": 0.01}, {})), tall)
    with pytest.raises(ParameterError, match="k=4 needs at least 4 experts, got 3"):
        m.check(m.resolve_params({"k": 4}), (1.0,) * 3)


def test_ci_files_are_the_examples_and_name_its_method():
    import yaml

    for name in ("mergebench-leaderboard.yml", "mergebench-ci.yaml"):
        theirs = EXAMPLE / (WORKFLOW if name.endswith(".yml") else name)
        assert (REPO / "examples" / "ci" / name).read_bytes() == theirs.read_bytes(), name
    workflow = yaml.safe_load((EXAMPLE / WORKFLOW).read_text())
    assert workflow["env"]["METHOD"] == "consensus"
    steps = [s.get("run", "") for s in workflow["jobs"]["leaderboard"]["steps"]]
    assert any(s.strip() == 'mergebench plugin check "$METHOD"' for s in steps)
    assert "consensus" in yaml.safe_load((EXAMPLE / "mergebench-ci.yaml").read_text())["methods"]


def test_example_plugin_runs_in_a_study_and_gates_in_ci(site, tmp_path):
    """The CI recipe of examples/ci/ with the example plugin: run, save a baseline, check, see a regression fail."""
    import yaml

    config = yaml.safe_load((EXAMPLE / "mergebench-ci.yaml").read_text())
    assert config["methods"] == ["ties", "consensus"]
    config.update({"suite_params": {"train": 200, "validation": 16, "test": 16}, "n_experts": [2],
                   "base_kinds": ["pretrained"], "pretrain": {"steps": 20}, "expert": {"steps": 6},
                   "multitask": {"steps": 6}, "workers": 1})
    config["search"]["consensus"] = {"lambda": [0.5, 1.0], "tall_lambda": [0.4]}
    (tmp_path / "ci.yaml").write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    result = cli(site, "run", tmp_path / "ci.yaml", "--run-dir", run_dir, "--no-leaderboard")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(cli(site, "leaderboard", run_dir, "--format", "json").stdout)
    consensus = next(r for r in rows if r["method"] == "consensus")
    chosen = consensus["params"][0]
    assert chosen["lambda"] in (0.5, 1.0) and chosen["tall_lambda"] == 0.4 and chosen["k"] == 2
    assert consensus["held_out"]["mean"] is not None
    assert cli(site, "leaderboard", run_dir, "--save-baseline", tmp_path / "b.json", "--format", "json").returncode == 0
    assert cli(site, "leaderboard", run_dir, "--check", tmp_path / "b.json", "--format", "json").returncode == 0
    baseline = json.loads((tmp_path / "b.json").read_text())
    baseline["rows"]["tiny/pretrained/N=2/consensus"]["held_out"] += 0.1
    (tmp_path / "b.json").write_text(json.dumps(baseline))
    gate = cli(site, "leaderboard", run_dir, "--check", tmp_path / "b.json", "--format", "json")
    assert gate.returncode == 1 and "tiny/pretrained/N=2/consensus: held-out" in gate.stderr
