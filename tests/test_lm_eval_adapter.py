"""The lm-eval evaluator on tiny real models, checked against log-likelihoods and generations computed here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from mergebench.core.plugin_manager import make_plugin_manager  # noqa: E402
from mergebench.evaluators.lm_eval_adapter import TaskSpec, evaluate_models, task_config  # noqa: E402

WORDS = "the cat dog bird sat ran flew on in over mat park tree red blue green a".split()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A byte-level BPE tokenizer and two tiny random Llamas saved as users' model directories."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("lmeval")
    g = torch.Generator().manual_seed(0)
    corpus = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (8,), generator=g)) for _ in range(300)]
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
        path = root / f"model{seed}"
        LlamaForCausalLM(config).save_pretrained(path)
        hf_tok.save_pretrained(path)
        paths.append(path)
    return paths, hf_tok


def choice_logliks(model, tok, query: str, choices: list[str]) -> list[float]:
    """Sum of log p(choice tokens | query), tokenised the way lm-eval splits context and continuation."""
    out = []
    for choice in choices:
        whole = tok(query + choice, add_special_tokens=False)["input_ids"]
        n_ctx = len(tok(query, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)[0]
        out.append(sum(float(logp[i - 1, whole[i]]) for i in range(n_ctx, len(whole))))
    return out


def greedy(model, tok, query: str, max_new: int = 6) -> str:
    ids = tok(query, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(max_new):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    text = tok.decode(ids[len(tok(query, add_special_tokens=False)["input_ids"]):])
    return text.split("\n")[0]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_scores_match_independent_loglikelihoods_and_generations(models, tmp_path):
    from transformers import AutoModelForCausalLM

    paths, tok = models
    g = torch.Generator().manual_seed(1)
    mc_rows = []
    for _ in range(40):
        query = " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (5,), generator=g))
        choices = [" " + WORDS[int(i)] for i in torch.randperm(len(WORDS), generator=g)[:3]]
        mc_rows.append({"query": query, "choices": choices, "label": int(torch.randint(3, (1,), generator=g))})
    model0 = AutoModelForCausalLM.from_pretrained(paths[0]).eval()
    gen_rows = [{"query": r["query"], "answer": greedy(model0, tok, r["query"])} for r in mc_rows[:10]]
    tasks = [
        TaskSpec("toy_mc", "multiple_choice", "acc", {"test": write_jsonl(tmp_path / "mc.jsonl", mc_rows)}),
        TaskSpec("toy_gen", "generate_until", "exact_match",
                 {"test": write_jsonl(tmp_path / "gen.jsonl", gen_rows)}, max_gen_toks=6),
    ]
    scores = evaluate_models(paths, tasks, split="test", batch_size=8)
    for path, score in zip(paths, scores):  # the second model's weights were swapped into the first's wrapper
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        hits = [max(range(3), key=lambda c: choice_logliks(model, tok, r["query"], r["choices"])[c]) == r["label"]
                for r in mc_rows]
        assert score["toy_mc"] == pytest.approx(sum(hits) / len(hits))
        assert score.examples["toy_mc"] == [float(h) for h in hits]  # lm-eval's per-sample results, in document order
        gen = [float(r["answer"].strip() == greedy(model, tok, r["query"]).strip()) for r in gen_rows]
        assert score.examples["toy_gen"] == gen and score["toy_gen"] == pytest.approx(sum(gen) / len(gen))
    assert scores[0]["toy_gen"] == 1.0  # the answers are model 0's own greedy continuations
    assert scores[1]["toy_gen"] < 1.0
    assert scores[0]["toy_mc"] != scores[1]["toy_mc"] or scores[0]["toy_gen"] != scores[1]["toy_gen"]


def test_task_configs_use_absolute_paths_and_offline_metrics(tmp_path):
    spec = TaskSpec("s", "generate_until", "rouge_l", {"validation": str(tmp_path / "v.jsonl")})
    config = task_config(spec, "validation")
    assert config["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "v.jsonl")
    assert config["process_results"] == "lm_eval_task_utils.process_rouge_l"
    with pytest.raises(Exception, match="absolute"):
        task_config(TaskSpec("r", "multiple_choice", "acc", {"test": "relative.jsonl"}), "test")
    with pytest.raises(Exception, match="no 'test' split"):
        task_config(spec, "test")


def test_rouge_and_exact_match_scoring():
    from mergebench.evaluators import lm_eval_task_utils as utils

    assert utils.process_exact_match({"answer": "Paris."}, [" paris"])["exact_match"] == 1.0
    assert utils.process_exact_match({"answer": "Paris"}, ["Rome"])["exact_match"] == 0.0
    # LCS of "the cat sat" and "the cat ran" is 2 of 3 words each way: F = 2/3
    assert utils.process_rouge_l({"answer": "the cat sat"}, ["the cat ran"])["rouge_l"] == pytest.approx(2 / 3)


def test_lm_eval_is_a_registered_evaluator():
    evaluator = make_plugin_manager(entry_points=False).evaluators().get("lm-eval")
    assert evaluator.plugin == "mergebench.evaluators.lm_eval_adapter"
    assert evaluator.resolve_params({"split": "validation"}) == {
        "split": "validation", "batch_size": 64, "backend": "hf", "device": "cpu", "dtype": "float32",
        "model_args": "", "limit": 0}


def test_exact_match_tasks_generate_no_further_than_the_longest_answer(tmp_path, pm):
    from mergebench.evaluators.lm_eval_adapter import suite_tasks

    rows = [{"query": "Q", "answer": " Tolbek"}, {"query": "Q", "answer": " Kovo"}]
    files = {}
    for split in ("validation", "test"):
        files[split] = str(tmp_path / f"{split}.jsonl")
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = pm.suites().get("micro-t0")
    from mergebench.study.contracts import SuiteData

    data = SuiteData("micro-t0", tmp_path, {"micro_extractive_qa": files, "micro_summarization": files})
    qa, summary = suite_tasks(suite, data, ["micro_extractive_qa", "micro_summarization"])
    assert qa.max_gen_toks == len(" Tolbek") + 4 and summary.max_gen_toks == 32


def test_memoised_tok_encode_encodes_each_string_once_and_hands_out_copies():
    from mergebench.evaluators.lm_eval_adapter import _memoised_tok_encode

    calls = []

    def encode(string, add_special_tokens=None, left_truncate_len=None):
        calls.append((string, add_special_tokens, left_truncate_len))
        ids = [ord(c) for c in string]
        return ids[-left_truncate_len:] if left_truncate_len else ids

    cached = _memoised_tok_encode(encode)
    first = cached("abc")
    first.append(0)  # a caller extending its list must not change what the next caller gets
    assert cached("abc") == [97, 98, 99]
    assert cached("abc", left_truncate_len=2) == [98, 99]
    assert cached("abc", add_special_tokens=False) == [97, 98, 99]
    assert calls == [("abc", None, None), ("abc", None, 2), ("abc", False, None)]
