"""The micro-suite generator, tokenizer and training loop (issue 4 groundwork)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from mergebench.suites.micro_t0 import HELD_IN, HELD_OUT, HELD_OUT_TEST_FACTOR, USES_KNOWN_PEOPLE, generate
from mergebench.suites.world import World
from mergebench.training import TrainConfig, llama_config, pairs_from_rows, train, train_tokenizer


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.jsonl"))}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    return root, generate(root / "s0", seed=0, train=300, validation=60, test=60)


def rows(manifest, name, split):
    with open(manifest["files"][name][split]) as fh:
        return [json.loads(line) for line in fh]


def test_same_seed_same_files_other_seed_other_files(suite, tmp_path):
    root, _ = suite
    generate(tmp_path / "again", seed=0, train=300, validation=60, test=60)
    generate(tmp_path / "other", seed=1, train=300, validation=60, test=60)
    assert digest(root / "s0") == digest(tmp_path / "again")
    assert digest(root / "s0") != digest(tmp_path / "other")


def test_manifest_has_every_category_and_split(suite):
    _, m = suite
    assert set(m["held_in"]) == set(HELD_IN) and len(m["held_in"]) == 8
    assert set(m["held_out"]) == set(HELD_OUT) and len(m["held_out"]) == 4
    for datasets in m["held_in"].values():
        for name in datasets:
            assert set(m["files"][name]) == {"train", "validation", "test"}
    for datasets in m["held_out"].values():
        for name in datasets:
            assert set(m["files"][name]) == {"validation", "test"}  # zero-shot: no training data


def test_split_sizes_held_out_tests_are_larger_and_coreference_largest(suite):
    _, m = suite
    for datasets in m["held_in"].values():
        for name in datasets:
            assert [len(rows(m, name, s)) for s in ("train", "validation", "test")] == [300, 60, 60]
    sizes = {name: len(rows(m, name, "test")) for datasets in m["held_out"].values() for name in datasets}
    assert sizes == {"micro_completion": 120, "micro_nli": 120, "micro_coreference": 240, "micro_word_sense": 120}
    assert HELD_OUT_TEST_FACTOR == {"micro_coreference": 4}


def test_a_larger_split_starts_with_the_smaller_one(suite, tmp_path):
    # one random stream per (dataset, split): more test examples add rows, they do not redraw the others
    _, m = suite
    bigger = generate(tmp_path / "bigger", seed=0, train=300, validation=60, test=90)
    for name in ("micro_mcqa", "micro_coreference"):
        small, large = rows(m, name, "test"), rows(bigger, name, "test")
        assert len(large) == len(small) * 3 // 2 and large[: len(small)] == small
        assert rows(bigger, name, "validation") == rows(m, name, "validation")


def test_rows_are_well_formed(suite):
    _, m = suite
    for group in ("held_in", "held_out"):
        for datasets in m[group].values():
            for name, info in datasets.items():
                for r in rows(m, name, "test"):
                    assert r["query"]
                    if info["output_type"] == "multiple_choice":
                        assert 0 <= r["label"] < len(r["choices"]) and len(set(r["choices"])) == len(r["choices"])
                    else:
                        assert r["answer"].startswith(" ") and r["answer"].strip()


def test_labels_are_balanced_enough_to_rule_out_constant_answers(suite):
    _, m = suite
    for group in ("held_in", "held_out"):
        for datasets in m[group].values():
            for name, info in datasets.items():
                if info["output_type"] != "multiple_choice":
                    continue
                answers = [r["choices"][r["label"]] for r in rows(m, name, "test")]
                top = max(answers.count(a) for a in set(answers))
                assert top / len(answers) < 0.75, name


def test_expert_training_and_evaluation_people_do_not_overlap():
    world = World(0)
    known_train = {p.name for p in world.known[: len(world.known) * 2 // 3]}
    known_eval = {p.name for p in world.known[len(world.known) * 2 // 3:]}
    assert known_train.isdisjoint(known_eval)
    assert {p.name for p in world.new}.isdisjoint({p.name for p in world.known})
    assert USES_KNOWN_PEOPLE <= {d for c in HELD_IN.values() for d in c}


def test_tokenizer_and_training_loop(suite, tmp_path):
    _, m = suite
    with open(m["files"]["corpus"]["train"]) as fh:
        corpus = fh.read().splitlines()
    tok = train_tokenizer(corpus, tmp_path / "tok", vocab_size=400)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    line = corpus[0]
    assert tok.decode(tok(line, add_special_tokens=False)["input_ids"]) == line
    from transformers import LlamaForCausalLM

    pairs = pairs_from_rows(rows(m, "micro_paraphrase", "train"))
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config("tiny", len(tok)))
        losses = train(model, tok, TrainConfig(steps=30, lr=3e-3, batch_size=8, seq_len=64, warmup=5, seed=3),
                       pairs=pairs, texts=corpus[:200])
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5  # it learns
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # and is deterministic
