"""Experts with different vocabularies: rows aligned by token, as mergekit 0.1.5's tokenizer_source does.

The models are tiny Llamas with word-level tokenizers: expert 1 appends four tokens (a resized
embedding), expert 2 appends two (one shared with expert 1) and swaps two token ids, so alignment
must go by token string, not by row number.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from mergekit_ref import LLAMA, llama_tensors, needs_mergekit, read_model, run_mergekit_many, write_tokenizer
from safetensors.torch import save_file

from mergebench.core import engine
from mergebench.core.recipe import load_recipe

BASE_TOKENS = ["[UNK]"] + [f"w{i}" for i in range(59)]


def write(directory, tokens, seed, like=None, base_tokens=None):
    """A tiny Llama whose embedding and head have one row per token; rows of tokens ``like`` has are
    ``like``'s rows plus noise (a fine-tune), new tokens get fresh rows."""
    directory.mkdir(parents=True)
    t = llama_tensors(seed, scale=1.0 if like is None else 0.1)
    v = len(tokens)
    g = torch.Generator().manual_seed(seed + 1000)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = torch.randn(v, LLAMA["hidden_size"], generator=g)
        if like is not None:
            for i, token in enumerate(tokens):
                if token in base_tokens:
                    rows[i] = like[name][base_tokens.index(token)] + 0.1 * rows[i]
        t[name] = rows
    if like is not None:
        for name in t:
            if name not in ("model.embed_tokens.weight", "lm_head.weight"):
                t[name] = like[name] + t[name]
    (directory / "config.json").write_text(json.dumps({**LLAMA, "vocab_size": v}))
    save_file({n: x.contiguous() for n, x in t.items()}, directory / "model.safetensors")
    write_tokenizer(directory, tokens)
    return t


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    base = write(root / "base", BASE_TOKENS, 0)
    e0_tokens = BASE_TOKENS + ["new_a", "new_b", "new_c", "new_d"]
    e1_tokens = list(BASE_TOKENS) + ["new_c", "new_e"]
    e1_tokens[5], e1_tokens[6] = e1_tokens[6], e1_tokens[5]
    write(root / "e0", e0_tokens, 1, base, BASE_TOKENS)
    write(root / "e1", e1_tokens, 2, base, BASE_TOKENS)
    return root


def config(root, method, source):
    cfg = {"merge_method": method, "dtype": "float32", "tokenizer_source": source,
           "models": [{"model": str(root / "e0"), "parameters": {"weight": 0.6}},
                      {"model": str(root / "e1"), "parameters": {"weight": 0.4}}]}
    if method != "linear":
        cfg["base_model"] = str(root / "base")
    return cfg


CASES = {"union_task_arithmetic": ("task_arithmetic", "union"), "union_linear": ("linear", "union"),
         "base_task_arithmetic": ("task_arithmetic", "base"), "e0_linear": ("linear", "e0")}


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """mergekit's outputs: name -> (state dict, output vocabulary)."""
    from transformers import AutoTokenizer

    cfgs = {k: config(models, m, str(models / s) if s == "e0" else s) for k, (m, s) in CASES.items()}
    root = tmp_path_factory.mktemp("vocab-ref")
    out = run_mergekit_many(cfgs, root)
    return {k: (v, None if isinstance(v, str) else AutoTokenizer.from_pretrained(str(root / f"{k}-mergekit")).get_vocab())
            for k, v in out.items()}


@needs_mergekit
@pytest.mark.parametrize("case", sorted(CASES))
def test_aligned_merge_agrees_with_mergekit_and_loads(models, reference, tmp_path, case):
    method, source = CASES[case]
    cfg = config(models, method, str(models / source) if source == "e0" else source)
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    engine.run(load_recipe(path), tmp_path / "out")
    (ref, kit_vocab), ours = reference[case], read_model(tmp_path / "out")
    assert not isinstance(ref, str), ref
    assert sorted(ours) == sorted(ref)
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    # mergekit orders a union without a base_model by a Python set of the models (it varies between runs):
    # compare the vocabulary tensors token by token
    ours_vocab = tok.get_vocab()
    assert set(ours_vocab) == set(kit_vocab)
    order = torch.tensor([kit_vocab[t] for t, _ in sorted(ours_vocab.items(), key=lambda kv: kv[1])])
    for n in ref:
        want = ref[n].index_select(0, order) if n in ("model.embed_tokens.weight", "lm_head.weight") else ref[n]
        torch.testing.assert_close(ours[n], want, rtol=1e-5, atol=2e-6, msg=lambda m, n=n: f"{n}: {m}")
    rows = ours["model.embed_tokens.weight"].shape[0]
    assert len(tok.get_vocab()) == rows == json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"]
    expected = {"union": 60 + 5, "base": 60, "e0": 64}[source]
    assert rows == expected
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    ids = tok("w1 w5 new_c", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, 3, rows)


def test_the_default_rows_follow_mergekits_rule(models, tmp_path):
    # linear over e0 and e1 with the union vocabulary, by hand: a token both have -> the weighted mean of
    # their own rows; new_a (e0 only) -> e0's row in both; new_c (both) -> each own; w5/w6 swapped in e1
    from safetensors.torch import load_file

    e0, e1 = load_file(models / "e0" / "model.safetensors"), load_file(models / "e1" / "model.safetensors")
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config(models, "linear", "union")))
    engine.run(load_recipe(path), tmp_path / "out")
    out = read_model(tmp_path / "out")["model.embed_tokens.weight"]
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab()
    v0 = AutoTokenizer.from_pretrained(str(models / "e0")).get_vocab()
    v1 = AutoTokenizer.from_pretrained(str(models / "e1")).get_vocab()
    E0, E1 = e0["model.embed_tokens.weight"], e1["model.embed_tokens.weight"]
    for token in ("w5", "w6", "new_c", "w30"):
        want = 0.6 * E0[v0[token]] + 0.4 * E1[v1[token]]
        torch.testing.assert_close(out[vocab[token]], want)
    torch.testing.assert_close(out[vocab["new_a"]], E0[v0["new_a"]])  # 0.6 x + 0.4 x
    torch.testing.assert_close(out[vocab["new_e"]], E1[v1["new_e"]])


def test_a_vocabulary_mismatch_without_a_setting_is_one_error_before_reading(models, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mergebench", "merge", "task_arithmetic", "-b", str(models / "base"),
                           "-e", str(models / "e0"), "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "vocabularies differ" in proc.stderr and "64 rows in expert 1" in proc.stderr and "60 in the base" in proc.stderr
    assert "--tokenizer-source" in proc.stderr and not (tmp_path / "out").exists()
    ok = subprocess.run([sys.executable, "-m", "mergebench", "merge", "task_arithmetic", "-b", str(models / "base"),
                         "-e", str(models / "e0"), "--tokenizer-source", "union", "-o", str(tmp_path / "out"), "-q"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert read_model(tmp_path / "out")["lm_head.weight"].shape[0] == 64
