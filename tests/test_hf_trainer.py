"""The ``hf_trainer`` expert trainer (transformers' Trainer) on a tiny Llama built offline."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from click.testing import CliRunner

from mergebench.core.errors import InputError, ParameterError
from mergebench.core.plugin_manager import make_plugin_manager
from mergebench.plugins import hf_trainer
from mergebench.plugins.hf_trainer import Collator, encode_example, hf_train

ROWS = ([{"query": f"What is {a} plus {b}? ", "answer": f"{a + b}"} for a in range(4) for b in range(4)]
        + [{"query": "Which colour is the sky? ", "choices": ["red", "blue", "green"], "label": 1},
           {"query": "Say nothing: ", "answer": ""}])
PAIRS = [(r["query"], r["choices"][r["label"]] if "choices" in r else r["answer"]) for r in ROWS]
# fast, deterministic, and the loss visibly falls in a few steps
FAST = {"steps": 20, "lr": 1e-2, "batch_size": 4, "bf16": False, "dropout": 0.0, "seed": 0}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one thread is faster on a shared machine than several contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def resolve(**given):
    return make_plugin_manager(entry_points=False).expert_trainers().get("hf_trainer").resolve_params(given)


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny bfloat16 Llama base with its own tokenizer, the training rows, and one trained expert."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergebench.training import train_tokenizer

    root = tmp_path_factory.mktemp("hf_trainer")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tok = train_tokenizer([q + a for q, a in PAIRS], root / "base", vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         attention_dropout=0.0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "base")
    base_files = file_hashes(root / "base")
    steps = []
    out = root / "expert"
    out.mkdir()
    assert hf_train(root / "base", [data], resolve(**FAST), out, on_step=lambda *a: steps.append(a)) == out
    return {"root": root, "base": root / "base", "data": data, "expert": out, "steps": steps,
            "base_files": base_files}


def answer_loss(model_dir: Path, pairs=PAIRS, prompt_too: bool = False) -> float:
    """Mean next-token loss over every target token (answer + EOS) of ``pairs``, computed here one row at a
    time from the model's logits (the prompt's tokens as well with ``prompt_too``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in pairs:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            t = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0].double(), -1)
            first = 1 if prompt_too else len(p)  # position of the first token scored
            targets = (p + t)[first:]
            total -= sum(logp[first - 1 + i, token].item() for i, token in enumerate(targets))
            count += len(targets)
    return total / count


# ---- training -----------------------------------------------------------------------------------------------

def test_training_lowers_the_loss_on_the_answers_and_reports_every_step(setup):
    before, after = answer_loss(setup["base"]), answer_loss(setup["expert"])
    assert after < 0.75 * before, (before, after)
    assert [s[:2] for s in setup["steps"]] == [(i, 20) for i in range(1, 21)]
    assert all(math.isfinite(s[2]) for s in setup["steps"])
    assert setup["steps"][-1][2] < setup["steps"][0][2]


def test_output_is_the_base_architecture_in_its_dtype_and_the_base_is_untouched(setup):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expert, base = setup["expert"], setup["base"]
    # only the Hugging Face layout: no Trainer output directory, checkpoints or training state left behind
    assert sorted(p.name for p in expert.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                        "tokenizer.json", "tokenizer_config.json"]
    model = AutoModelForCausalLM.from_pretrained(expert)
    base_model = AutoModelForCausalLM.from_pretrained(base)
    assert type(model) is type(base_model) and model.config.architectures == ["LlamaForCausalLM"]
    assert model.config.to_diff_dict() == base_model.config.to_diff_dict()  # dropout and use_cache restored
    with safe_open(expert / "model.safetensors", "pt") as f, safe_open(base / "model.safetensors", "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert any(not torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())
    text = "What is 3 plus 2? 5"
    ours, theirs = AutoTokenizer.from_pretrained(expert), AutoTokenizer.from_pretrained(base)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert file_hashes(base) == setup["base_files"]


def test_same_seed_gives_bit_identical_weights_and_another_seed_does_not(setup, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    again.mkdir(), other.mkdir()
    hf_train(setup["base"], [setup["data"]], resolve(**FAST), again)
    assert (again / "model.safetensors").read_bytes() == (setup["expert"] / "model.safetensors").read_bytes()
    hf_train(setup["base"], [setup["data"]], resolve(**{**FAST, "seed": 1}), other)  # another batch order
    assert (other / "model.safetensors").read_bytes() != (setup["expert"] / "model.safetensors").read_bytes()


def test_the_loss_is_on_the_answer_tokens_only(setup, tmp_path):
    """One step over the whole data in one batch: the loss Trainer reports (before the update) is the mean
    over answer + EOS tokens, computed independently; with the prompt's tokens it would be another number.
    Started from the trained expert, whose loss on the answers is far below its loss on the prompts."""
    start = setup["expert"]
    steps = []
    hf_train(start, [setup["data"]], resolve(**{**FAST, "steps": 1, "batch_size": len(ROWS)}), tmp_path,
             on_step=lambda *a: steps.append(a))
    reported = steps[0][2]
    expected, with_prompt = answer_loss(start), answer_loss(start, prompt_too=True)
    assert with_prompt - expected > 0.5  # the check below tells the two apart
    assert reported == pytest.approx(expected, abs=2e-4)  # Trainer logs the loss rounded to 4 decimals


def test_encoding_masks_the_prompt_uses_the_right_choice_and_cuts_from_the_left(setup):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup["base"])
    eos = tok.eos_token_id
    p = tok("Which colour is the sky? ", add_special_tokens=False)["input_ids"]
    t = tok("blue", add_special_tokens=False)["input_ids"]
    assert encode_example(tok, "Which colour is the sky? ", "blue", 64) == {
        "input_ids": p + t + [eos], "labels": [-100] * len(p) + t + [eos]}
    # a multiple-choice row trains on its labelled choice (through the same reader as full_finetune)
    from mergebench.training import read_pairs

    assert read_pairs([setup["data"]])[16] == ("Which colour is the sky? ", "blue")
    # an empty answer: only EOS is a target
    empty = encode_example(tok, "Say nothing: ", "", 64)
    assert empty["labels"] == [-100] * (len(empty["input_ids"]) - 1) + [eos]
    # too long: cut from the left, so the target survives
    cut = encode_example(tok, "Which colour is the sky? ", "blue", len(t) + 3)
    assert cut == {"input_ids": (p + t + [eos])[-(len(t) + 3):], "labels": [-100, -100] + t + [eos]}
    batch = Collator(tok.pad_token_id)([encode_example(tok, "a", "b", 64),
                                        encode_example(tok, "a long prompt", "b", 64)])
    short = len(encode_example(tok, "a", "b", 64)["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (batch["input_ids"].shape[1] - short)
    assert (batch["labels"][0, short:] == -100).all() and (batch["input_ids"][0, short:] == tok.pad_token_id).all()


def test_epochs_when_steps_is_zero(setup, tmp_path):
    steps = []
    hf_train(setup["base"], [setup["data"]], resolve(**{**FAST, "steps": 0, "epochs": 2, "batch_size": 8}), tmp_path,
             on_step=lambda *a: steps.append(a))
    per_epoch = math.ceil(len(ROWS) / 8)
    assert [s[:2] for s in steps] == [(i, 2 * per_epoch) for i in range(1, 2 * per_epoch + 1)]


def test_gradient_checkpointing_gives_the_same_model_and_bf16_trains_on_cpu(setup, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers.models.llama import modeling_llama

    calls = []
    forward = modeling_llama.LlamaMLP.forward  # inside the checkpointed layer: runs again when it is recomputed
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    checkpointed, bf16 = tmp_path / "ckpt", tmp_path / "bf16"
    checkpointed.mkdir(), bf16.mkdir()
    hf_train(setup["base"], [setup["data"]], resolve(**{**FAST, "gradient_checkpointing": True}), checkpointed)
    assert len(calls) == 2 * 2 * FAST["steps"]  # 2 layers, and again in every backward pass
    ours, reference = load_file(checkpointed / "model.safetensors"), load_file(setup["expert"] / "model.safetensors")
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert json.loads((checkpointed / "config.json").read_text())["use_cache"] is True  # restored for inference
    hf_train(setup["base"], [setup["data"]], resolve(**{**FAST, "bf16": True}), bf16)
    assert answer_loss(bf16) < 0.75 * answer_loss(setup["base"])
    mixed = load_file(bf16 / "model.safetensors")
    assert any(not torch.equal(v, mixed[k]) for k, v in reference.items())  # autocast ran


# ---- parameters, devices, errors ----------------------------------------------------------------------------

def test_registered_with_typed_parameters_and_bad_values_are_refused():
    trainer = make_plugin_manager(entry_points=False).expert_trainers().get("hf_trainer")
    assert trainer.plugin == "mergebench.plugins.hf_trainer" and "2410.03617" in trainer.reference
    assert [p.name for p in trainer.params] == [
        "steps", "epochs", "lr", "batch_size", "gradient_accumulation", "max_length", "warmup_ratio", "lr_scheduler",
        "weight_decay", "max_grad_norm", "dropout", "bf16", "gradient_checkpointing", "seed"]
    params = trainer.resolve_params({"steps": "5", "lr": "1e-4", "bf16": "false", "lr_scheduler": "linear"})
    assert (params["steps"], params["lr"], params["bf16"], params["lr_scheduler"]) == (5, 1e-4, False, "linear")
    assert trainer.resolve_params({})["lr"] == 3e-5
    for bad, match in [({"lr_scheduler": "cosin"}, "cosine | linear | constant"), ({"steps": -1}, ">= 0"),
                       ({"batch_size": 0}, ">= 1"), ({"bf16": "maybe"}, "must be a bool"),
                       ({"warmup_ratio": 1.5}, r"\[0.0, 0.99\]"), ({"dropout": 2}, r"\[0.0, 0.9\]"),
                       ({"max_length": 4}, ">= 8"), ({"epochs": "x"}, "must be a float"),
                       ({"learning_rate": 1}, "parameter 'learning_rate'")]:
        with pytest.raises(ParameterError, match=match):
            trainer.resolve_params(bad)


def test_devices_and_inputs_are_checked_before_anything_is_loaded(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    missing = tmp_path / "no-such-model"  # never reached: every check below fails first
    with pytest.raises(ParameterError, match="unknown device 'gpu0'"):
        hf_train(missing, [data], resolve(**FAST), tmp_path, device="gpu0")
    with pytest.raises(ParameterError, match="not supported"):
        hf_train(missing, [data], resolve(**FAST), tmp_path, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="no CUDA GPU"):
            hf_train(missing, [data], resolve(**FAST), tmp_path, device="cuda:1")
    with pytest.raises(ParameterError, match="epochs > 0"):
        hf_train(missing, [data], resolve(**{**FAST, "steps": 0, "epochs": 0}), tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "choices": ["a"], "label": 3}) + "\n")
    with pytest.raises(InputError, match="rows need"):
        hf_train(missing, [bad], resolve(**FAST), tmp_path)
    with pytest.raises(InputError, match="cannot load"):
        hf_train(missing, [data], resolve(**FAST), tmp_path)


def test_cuda_n_is_that_one_gpu_and_ddp_leaves_the_device_to_the_launcher(monkeypatch, tmp_path):
    """What Trainer is given (no GPU is needed to check the arguments; training on one is not tested here)."""
    from transformers import TrainingArguments

    params = resolve(bf16=False)
    with mock.patch.object(torch.cuda, "set_device") as set_device:
        one = hf_trainer.training_arguments(params, tmp_path, torch.device("cuda", 1))
        assert (one.device, one.n_gpu) == (torch.device("cuda", 1), 1)  # not cuda:0, no DataParallel
    set_device.assert_called_with(torch.device("cuda", 1))
    assert type(hf_trainer.training_arguments(params, tmp_path, torch.device("cuda"))) is TrainingArguments
    assert [hf_trainer.one_gpu(torch.device(d)) for d in ("cuda:1", "cuda:0", "cuda", "cpu")] == [1, 0, None, None]
    cpu = hf_trainer.training_arguments(params, tmp_path, torch.device("cpu"))
    assert cpu.use_cpu and cpu.report_to == [] and cpu.save_strategy == "no" and cpu.disable_tqdm
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun / accelerate launch: each rank's own GPU
    assert hf_trainer.one_gpu(torch.device("cuda:1")) is None


def test_train_expert_command_and_module_entry_point(setup, tmp_path):
    from mergebench.cli.main import cli

    result = CliRunner().invoke(cli, ["train-expert", str(setup["base"]), "--data", str(setup["data"]), "--trainer",
                                      "hf_trainer", "-p", "steps=2", "-p", "bf16=false", "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "model.safetensors").is_file() and (tmp_path / "cli" / "tokenizer.json").is_file()
    # trained with the default dropout (0.05), saved with the base's own
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["attention_dropout"] == 0.0
    # what accelerate launch / torchrun start in each process
    assert hf_trainer.main([str(setup["base"]), str(setup["data"]), "-o", str(tmp_path / "mod"), "-p", "steps=2",
                            "-p", "bf16=false", "-p", "dropout=0"]) == 0
    # the same training but for the dropout: the dropout was applied while training
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("mod", "cli")]
    assert weights[0] != weights[1]
    assert hf_trainer.main([str(setup["base"]), str(setup["data"]), "-o", str(tmp_path / "mod"), "-p", "steps=2"]) == 2
    assert hf_trainer.main([str(setup["base"]), str(setup["data"]), "-o", str(tmp_path / "x"), "-p", "steps"]) == 2
