"""A study on "real" models: bases loaded by hub id from the local Hugging Face cache (written here in the
hub's cache layout, as `huggingface-cli download` leaves it), experts trained by `hf_trainer`
(transformers' Trainer), scored by the lm-eval evaluator with its model arguments from the config. The same
code paths a study on Llama or Qwen checkpoints takes, on models small enough for a CPU."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from mergebench.cli.main import cli


def write_hub_model(cache: Path, repo_id: str, seed: int, tok_dir: Path) -> Path:
    """A tiny Llama in the hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mergebench.training import llama_config

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config("tiny", len(tok)))
    commit = f"{seed:040x}"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from mergebench.training import train_tokenizer

    root = tmp_path_factory.mktemp("hub")
    lines = ["Q: What is the capital of Spain? A: Madrid", "Review: great film. Sentiment: positive"] * 30
    train_tokenizer(lines, root / "tok", vocab_size=300)
    cache = root / "hf" / "hub"
    snapshots = {name: write_hub_model(cache, name, seed, root / "tok")
                 for seed, name in enumerate(["tiny-org/tiny-llama", "tiny-org/tiny-llama-instruct"])}
    return root, cache, snapshots


def test_a_study_on_hub_models_from_the_local_cache(hub, tmp_path):
    root, cache, snapshots = hub
    config = {
        "suite": "micro-t0", "suite_params": {"train": 40, "validation": 6, "test": 6, "vocab_size": 300},
        "n_experts": [2], "methods": ["task_arithmetic"], "search": {"task_arithmetic": {"lambda": [0.5, 1.0]}},
        "bases": [{"size": "tiny-llama", "kind": "pretrained", "preparer": "load",
                   "params": {"model": "tiny-org/tiny-llama"}},
                  {"size": "tiny-llama", "kind": "instruction_tuned", "preparer": "load",
                   "params": {"model": "tiny-org/tiny-llama-instruct"}}],
        "expert_trainer": {"name": "hf_trainer", "params": {"steps": 2, "batch_size": 4, "max_length": 64,
                                                           "bf16": False, "lr": 1e-3}},
        "multitask": False,
        "evaluator": {"name": "lm-eval", "params": {"batch_size": 8, "limit": 3, "model_args": "max_length=128"}},
    }
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"MERGEBENCH_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = CliRunner().invoke(cli, ["run", str(path), "--run-dir", str(tmp_path / "run"), "--no-leaderboard"], env=env)
    assert result.exit_code == 0, result.output
    conn = sqlite3.connect(tmp_path / "run" / "results.sqlite")
    bases = dict(conn.execute("SELECT base_kind, path FROM models WHERE role = 'base'").fetchall())
    # loaded where the hub cache has them, not copied or downloaded
    assert bases == {"pretrained": str(snapshots["tiny-org/tiny-llama"]),
                     "instruction_tuned": str(snapshots["tiny-org/tiny-llama-instruct"])}
    experts = conn.execute("SELECT base_kind, category, path FROM models WHERE role = 'expert'").fetchall()
    assert len(experts) == 2 * 2  # only the experts a merge uses
    for _, _, p in experts:
        assert json.loads((Path(p) / "mergebench-artifact.json").read_text())["spec"]["name"] == "hf_trainer"
    merges = conn.execute("SELECT base_kind, params, held_in, held_out FROM merges").fetchall()
    assert len(merges) == 2 and all(h is not None and o is not None for _, _, h, o in merges)
    points = conn.execute("SELECT count(*) FROM sweep_points").fetchone()[0]
    assert points == 4
    # the evaluator's parameters reached lm-eval: 3 examples per task
    spec = json.loads(conn.execute("SELECT spec FROM units WHERE kind = 'evaluation' LIMIT 1").fetchone()[0])
    assert spec["evaluator"]["params"]["limit"] == 3 and spec["evaluator"]["name"] == "lm-eval"


def test_load_never_downloads(tmp_path, monkeypatch):
    from mergebench.core.errors import InputError
    from mergebench.plugins.base_preparers import load

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # even with the hub reachable in principle
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: calls.append(k) or (_ for _ in ()).throw(FileNotFoundError("x")))
    with pytest.raises(InputError, match="local Hugging Face cache"):
        load({"model": "org/missing"}, None)
    assert calls and all(k.get("local_files_only") for k in calls)
