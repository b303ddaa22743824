"""The study's stages on their own: suites (micro-t0, t0-paper, a plugin's), base preparers, expert
trainers, in-memory merges against the engine, and the stage commands on a user's model directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mergebench.cli.main import cli
from mergebench.core import in_memory
from mergebench.study.cache import ArtifactCache
from mergebench.core.hookspecs import hookimpl
from mergebench.study.components import DatasetSpec, Suite
from mergebench.study.contracts import ComponentChoice, ModelRole
from mergebench.study.weights import load_state_dict
from mergebench.study import artifacts

from conftest import load_dir
from test_cli_errors import assert_user_error

SMALL_SUITE = {"train": 120, "validation": 12, "test": 12, "vocab_size": 400}


def FINETUNE(seed: int) -> ComponentChoice:
    return ComponentChoice("full_finetune", {"steps": 30, "seed": seed})


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---- suites ---------------------------------------------------------------------------------------

def test_a_plugin_registers_a_suite_and_it_builds_through_the_cache(pm, tmp_path):
    def build(directory, seed, params):
        rows = [{"query": f"{i} + {seed} =", "answer": f" {i + seed}"} for i in range(params["rows"])]
        (directory / "add.test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        manifest = {"suite": "arith", "files": {"add": {"test": str(directory / "add.test.jsonl")}}}
        (directory / "suite.json").write_text(json.dumps(manifest))
        return manifest

    class ArithSuite:
        @hookimpl
        def register_suites(self, register):
            from mergebench.core.registry import Param

            register(Suite(name="arith", description="Addition.", held_in={"maths": (DatasetSpec("add", "generate_until", "exact_match"),)},
                           params=(Param("rows", int, 3, "rows", min=1),), build=build))

    pm.register(ArithSuite(), name="arith-plugin")
    suite = pm.suites().get("arith")
    assert suite.plugin == "arith-plugin" and suite.datasets() == {"add": DatasetSpec("add", "generate_until", "exact_match")}
    cache = ArtifactCache(tmp_path / "cache")
    first = artifacts.suite(pm, cache, "arith", 2, {"rows": 4})
    lines = first.file("add", "test").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[3]) == {"query": "3 + 2 =", "answer": " 5"}
    assert first.suite == "arith" and first.seed == 2 and first.directory.parent == cache.root / "suite"
    assert artifacts.suite(pm, cache, "arith", 2, {"rows": 4}).directory == first.directory  # cached
    assert artifacts.suite(pm, cache, "arith", 3, {"rows": 4}).directory != first.directory  # new seed
    assert "rows" in pm.suites().get("arith").params[0].name


def test_micro_suite_build_has_a_tokenizer_with_special_tokens(pm, tmp_path):
    from transformers import AutoTokenizer

    manifest = artifacts.suite(pm, ArtifactCache(tmp_path), "micro-t0", 0, SMALL_SUITE)
    tok = AutoTokenizer.from_pretrained(manifest.tokenizer)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>") and len(tok) == 400
    suite = pm.suites().get("micro-t0")
    assert len(suite.held_in) == 8 and len(suite.held_out) == 4
    for name in suite.datasets():
        assert manifest.file(name, "test").is_file()


def test_t0_paper_configs_parse_and_register_offline(pm):
    """Every held-in config is valid lm-eval YAML that lm-eval indexes; held-out ones are lm-eval's own tasks.
    Nothing is downloaded: building a task would fetch its dataset, so only indexing is checked."""
    from lm_eval.api.task import TaskConfig
    from lm_eval.tasks import TaskManager

    try:
        from lm_eval.tasks._yaml_loader import load_yaml as load_yaml_config
    except ImportError:  # lm-eval < 0.4.10
        from lm_eval.utils import load_yaml_config

    suite = pm.suites().get("t0-paper")
    held_in = [d.name for ds in suite.held_in.values() for d in ds]
    assert len(held_in) == 16 and len(suite.held_in) == 8 and len(suite.held_out) == 4
    manager = TaskManager(include_path=suite.task_dir, include_defaults=True)
    for name in held_in:
        assert name in manager.all_tasks, name
        config = load_yaml_config(str(Path(suite.task_dir) / f"{name}.yaml"))
        assert config["task"] == name and config["dataset_path"] and config["output_type"] == suite.datasets()[name].output_type
        TaskConfig(**config)  # lm-eval's own validation of the fields
        if "process_results" in config:
            assert callable(config["process_results"])  # the !function tag resolved to our ROUGE-L
            assert config["process_results"]({"target": "a b c", "target_text": "a b c", "highlights": "a b c",
                                               "summary": "a b c"}, ["a b c"]) == {"rouge_l": 1.0}
    for name in (d.name for ds in suite.held_out.values() for d in ds):
        assert name in manager.all_tasks, name


# ---- preparers and trainers -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A micro suite, a briefly pretrained tiny base, an instruction-tuned one and one expert, via the plugins."""
    from mergebench.core.plugin_manager import make_plugin_manager

    pm = make_plugin_manager(entry_points=False)
    cache = ArtifactCache(tmp_path_factory.mktemp("home") / "artifacts")  # MERGEBENCH_HOME's layout
    manifest = artifacts.suite(pm, cache, "micro-t0", 0, SMALL_SUITE)
    losses: list[float] = []
    base = artifacts.prepare_base(pm, cache, manifest, ComponentChoice("pretrain", {"size": "tiny", "steps": 40}), 0,
                                  on_step=lambda s, t, l: losses.append(l))
    it = artifacts.prepare_base(pm, cache, manifest, ComponentChoice("instruction_tune", {"steps": 5}), 0, source=base)
    expert = artifacts.expert(pm, cache, manifest, base, ["sentiment"], FINETUNE(4))
    return pm, cache, manifest, base, it, expert, losses


def test_pretraining_learns_and_saves_the_hugging_face_layout(built):
    from transformers import AutoModelForCausalLM

    _, _, _, base, it, expert, losses = built
    assert len(losses) == 40 and sum(losses[-5:]) < 0.7 * sum(losses[:5])  # 6.0 -> ~3.7
    for d in (base, it, expert):
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
        assert AutoModelForCausalLM.from_pretrained(d).config.num_hidden_layers == 4
    assert json.loads((base / "config.json").read_text())["attention_dropout"] == 0.0  # dropout only while training


def test_expert_training_is_deterministic_and_cached(built, tmp_path):
    pm, cache, manifest, base, _, expert, _ = built
    again = artifacts.expert(pm, ArtifactCache(tmp_path), manifest, base, ["sentiment"], FINETUNE(4))
    assert (again / "model.safetensors").read_bytes() == (expert / "model.safetensors").read_bytes()
    assert artifacts.expert(pm, cache, manifest, base, ["sentiment"], FINETUNE(4)) == expert
    other = artifacts.expert(pm, cache, manifest, base, ["sentiment"], FINETUNE(5))
    assert other != expert
    changed = {k for k, v in load_state_dict(expert).items() if not torch.equal(v, load_state_dict(base)[k])}
    assert changed  # fine-tuning touched the weights


def test_target_only_loss_ignores_the_prompt(built):
    from mergebench.training import _encode_pair, load_model

    _, _, _, base, _, _, _ = built
    _, tok = load_model(base)
    ids, labels = _encode_pair(tok, "Review: good\nThe review is", " positive", 64)
    n_prompt = len(tok("Review: good\nThe review is", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert labels[-1] == tok.eos_token_id


@pytest.mark.parametrize("method, params", [("average", {}), ("task_arithmetic", {"lambda": 0.7}),
                                            ("ties", {"density": 0.2, "lambda": 0.9}),
                                            ("ties", {"density": 0.2, "lambda": 1.0, "trim_scope": "global"}),  # whole-model pre-pass
                                            ("dare_ties", {"density": 0.3, "lambda": 0.8})])
def test_in_memory_merge_equals_the_engine(built, tmp_path, method, params):
    """What a sweep scores in memory is bit for bit what `mergebench merge` writes."""
    from mergebench.core.api import merge

    pm, cache, manifest, base, it, expert, _ = built
    m = pm.merge_methods().get(method)
    b, experts = load_state_dict(base), [load_state_dict(expert), load_state_dict(it)]
    originals = [{k: v.clone() for k, v in sd.items()} for sd in [b, *experts]]
    merge(method, base=base, experts=[expert, it], output=tmp_path / "out", seed=3, plugin_manager=pm, **params)
    written = load_dir(tmp_path / "out")
    in_mem = in_memory.merge(m, params, b if m.needs_base else None, experts, seed=3)
    assert set(written) == set(in_mem)
    for k in written:
        assert torch.equal(written[k], in_mem[k].to(written[k].dtype)), k
    for sd, original in zip([b, *experts], originals):  # inputs untouched: a sweep reuses them
        assert all(torch.equal(sd[k], original[k]) for k in sd)
    if m.delta is not None:
        delta = in_memory.merge_delta(m, params, b, experts, seed=3)
        scaled = in_memory.apply_delta(b, delta, params["lambda"])
        assert all(torch.equal(scaled[k], in_mem[k]) for k in in_mem)


# ---- stage commands -------------------------------------------------------------------------------

def test_stage_commands_on_a_users_directories(built, tmp_path, monkeypatch):
    pm, cache, manifest, base, it, expert, _ = built
    monkeypatch.setenv("MERGEBENCH_HOME", str(cache.root.parent))
    suite_args = [a for k, v in SMALL_SUITE.items() for a in ("--suite-param", f"{k}={v}")]
    out = tmp_path / "expert"
    r = run_cli("train-expert", base, "--category", "topic_classification", "-p", "steps=3", *suite_args, "-o", out)
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file() and not (out / "mergebench-artifact.json").exists()
    r = run_cli("eval", base, it, out, "--base", base, "--expert", f"topic_classification={out}", "--json", *suite_args)
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert set(report["scores"]) == {str(base), str(it), str(out)} and len(report["scores"][str(base)]) == 12
    norm = report["normalised"]
    assert norm[str(out)]["held_in"] == pytest.approx(1.0) or norm[str(out)]["skipped"]  # its own category
    assert norm[str(base)]["held_out"] == pytest.approx(1.0)  # the base on held-out, by definition
    table = run_cli("eval", base, "--dataset", "micro_topic", *suite_args)
    assert table.exit_code == 0 and "micro_topic" in table.output and "micro_nli" not in table.output
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"query": "Q: 2+2?\nA:", "answer": " 4"}) + "\n")
    r = run_cli("train-expert", base, "--data", data, "-p", "steps=2", "-o", tmp_path / "mine")
    assert r.exit_code == 0, r.output
    assert_user_error(run_cli("train-expert", base, "--category", "sentimnt", *suite_args), "did you mean 'sentiment'")
    assert_user_error(run_cli("train-expert", tmp_path / "nope", "--category", "sentiment"), "not a model directory")
    assert_user_error(run_cli("train-expert", base, "--data", tmp_path / "missing.jsonl", "-o", tmp_path / "x"),
                      "training data not found")
    assert_user_error(run_cli("eval", base, "--dataset", "micro_nl", *suite_args), "did you mean 'micro_nli'")
    assert_user_error(run_cli("prepare-base", "--preparer", "pretrain", "-p", "stepz=3"), "unknown parameter 'stepz'")
    assert_user_error(run_cli("prepare-base", "--preparer", "instruction_tune"), "needs --base")
    r = run_cli("prepare-base", "--preparer", "load", "-p", f"model={base}")
    assert r.exit_code == 0 and r.output.strip() == str(base.resolve())
    assert_user_error(run_cli("prepare-base", "--preparer", "load", "-p", "model=org/not-cached"), "local Hugging Face cache")
    r = run_cli("suite", "list", "--json")
    assert {s["name"] for s in json.loads(r.output)} == {"micro-t0", "t0-paper"}


def test_evaluations_are_cached_by_model_and_data_contents(built, tmp_path, monkeypatch):
    """A model scored on a split before is not evaluated again, under any path; a changed model or
    --no-cache is; a subset of datasets scored before hits too."""
    import shutil

    from safetensors.torch import load_file, save_file

    pm, cache, manifest, base, it, expert, _ = built
    monkeypatch.setenv("MERGEBENCH_HOME", str(cache.root.parent))
    suite_args = [a for k, v in SMALL_SUITE.items() for a in ("--suite-param", f"{k}={v}")]

    def evaluate(*args):
        r = run_cli("eval", *args, "--split", "validation", "--json", *suite_args)
        assert r.exit_code == 0, r.output
        return json.loads(r.output[r.output.index("{"):])

    def entries():
        root = cache.root / "evaluation"
        return {e for e in root.iterdir() if e.is_dir()} if root.is_dir() else set()

    before = entries()
    first = evaluate(expert)
    assert first["cached"] == [] and len(first["scores"][str(expert)]) == 12
    copy = tmp_path / "copy"
    shutil.copytree(expert, copy)
    again = evaluate(copy, "--dataset", "micro_sentiment", "--dataset", "micro_nli")
    assert again["cached"] == [str(copy)]
    assert again["scores"][str(copy)] == {d: first["scores"][str(expert)][d] for d in ("micro_sentiment", "micro_nli")}
    assert evaluate(copy, "--no-cache", "--dataset", "micro_nli")["cached"] == []
    weights = load_file(copy / "model.safetensors")
    name = next(n for n in weights if n.endswith("embed_tokens.weight"))
    weights[name] = weights[name] * 1.5  # another model: must be evaluated, and score differently
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    changed = evaluate(copy)
    assert changed["cached"] == [] and changed["scores"][str(copy)] != first["scores"][str(expert)]
    new = entries() - before
    assert len(new) == 24 and all((e / "score.json").is_file() for e in new)  # 12 datasets x 2 models


def test_a_worker_keeps_one_evaluation_session_per_architecture(built, tmp_path, monkeypatch):
    """A worker that evaluates a tiny and then a small model (same suite, same datasets) must not swap the
    small model's weights into the tiny model's wrapper."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mergebench.study import jobs
    from mergebench.training import llama_config, save_model

    _, _, manifest, base, _, _, _ = built
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    small = base.parent / "small-model"  # beside the tiny base, as cache entries of one kind are
    save_model(LlamaForCausalLM(llama_config("small", len(tok))), tok, small)
    evaluator = ComponentChoice("lm-eval", {"batch_size": 64})
    monkeypatch.setattr(jobs, "_SESSIONS", {})  # this worker's sessions only (other tests share the process)
    for model in (base, small, base):
        job = jobs.EvalJob(str(tmp_path / "cache"), model, "micro-t0", manifest, ("micro_sentiment",), evaluator,
                           "validation", ModelRole("base", 0, "tiny", "pretrained"))
        scores = job.run().scores
        assert 0.0 <= scores["micro_sentiment"] <= 1.0
    assert len([k for k in jobs._SESSIONS if k[2] == str(manifest.directory)]) == 2
