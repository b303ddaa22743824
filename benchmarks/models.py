"""Llama-shaped bf16 models for merge benchmarks, built locally and deterministically.

A base of seeded N(0, 0.02) weights (norms at 1) and experts = base + seeded N(0, 0.002) perturbations,
written as Hugging Face safetensors directories (sharded) with a Llama config.json and a word-level
tokenizer (token i is the word ``w<i>``; ids 0-2 are [UNK], <s>, </s>), so that transformers loads them as
``AutoModelForCausalLM`` (what data-aware methods' calibration runs). Generated once per (size, seed) and
reused; a `.complete` marker makes interrupted builds start over.

Calibration data (:func:`calibration_data`): seeded texts of uniformly drawn words ``w3`` .. ``w<vocab-1>``,
one ``{"text": ...}`` per line, each exactly ``words`` tokens under that tokenizer (it adds no BOS).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mergebench.core.writer import OutputTensor, ShardWriter, plan_shards


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i = self.hidden, self.intermediate
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
            out += [(p + f"self_attn.{n}_proj.weight", (h, h)) for n in "qkvo"]
            out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    @property
    def largest_numel(self) -> int:
        """Entries of the largest tensor (the embedding and the LM head at every size here)."""
        return max(math.prod(shape) for _, shape in self.tensors())

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab,
                "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": max(1, self.hidden // 64),
                "num_key_value_heads": max(1, self.hidden // 64), "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                "bos_token_id": 1, "eos_token_id": 2}


SIZES = {
    "smoke": Shape(vocab=2048, hidden=128, intermediate=512, layers=2),     # ~0.9M parameters
    "0.1B": Shape(vocab=32000, hidden=768, intermediate=2048, layers=8),    # ~106M parameters
    "0.5B": Shape(vocab=32000, hidden=1024, intermediate=4096, layers=24),  # ~469M parameters
}


def _write(directory: Path, shape: Shape, make, shard_bytes: int) -> None:
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = shape.tensors()
    shards = plan_shards([OutputTensor(n, torch.bfloat16, s) for n, s in specs], shard_bytes)
    writer = ShardWriter(tmp, shards)
    for shard in shards:
        for t in shard.tensors:
            writer.write(t.name, make(t.name, t.shape).to(torch.bfloat16))
    writer.finish()
    (tmp / "config.json").write_text(json.dumps(shape.config(), indent=2))
    write_tokenizer(tmp, shape.vocab)
    (tmp / ".complete").write_text("ok")
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


SPECIAL = ("[UNK]", "<s>", "</s>")  # ids 0, 1, 2: the config's bos_token_id and eos_token_id


def write_tokenizer(directory: Path, vocab: int) -> None:
    """A word-level tokenizer over the model's vocabulary (whitespace-split; word ``w<i>`` is id i)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tokens = list(SPECIAL) + [f"w{i}" for i in range(len(SPECIAL), vocab)]
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(directory))


def calibration_data(root: Path, size: str, texts: int, words: int, seed: int = 0) -> Path:
    """root/size/calibration-*.jsonl: ``texts`` lines of ``words`` seeded random words of ``size``'s vocabulary."""
    path = root / size / f"calibration-{texts}x{words}-seed{seed}.jsonl"
    if not path.exists():
        rng = random.Random(seed)
        vocab = SIZES[size].vocab
        lines = [json.dumps({"text": " ".join(f"w{rng.randrange(len(SPECIAL), vocab)}" for _ in range(words))})
                 for _ in range(texts)]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.rename(path)
    return path


def _generator(seed: int, name: str) -> torch.Generator:
    from mergebench.core.context import tensor_seed  # stable across runs, unlike hash()

    return torch.Generator().manual_seed(tensor_seed(seed, name))


def build(root: Path, size: str, n_experts: int, seed: int = 0) -> dict[str, Path]:
    """Base and experts for ``size`` under root/size/, reusing complete ones."""
    shape = SIZES[size]
    out = root / size
    shard_bytes = max(shape.params * 2 // 3 + 1, 1 << 20)  # several shards (3-4), as real checkpoints have

    def base_tensor(name, dims):
        if name.endswith("norm.weight"):
            return torch.ones(dims)
        return torch.randn(dims, generator=_generator(seed, name)) * 0.02

    paths = {"base": out / "base"}
    if not (paths["base"] / ".complete").exists():
        _write(paths["base"], shape, base_tensor, shard_bytes)
    elif not (paths["base"] / "tokenizer.json").exists():  # built before models had tokenizers
        write_tokenizer(paths["base"], shape.vocab)
    for i in range(n_experts):
        path = out / f"expert{i}"
        paths[f"expert{i}"] = path
        if (path / ".complete").exists():
            if not (path / "tokenizer.json").exists():
                write_tokenizer(path, shape.vocab)
            continue

        def expert_tensor(name, dims, i=i):
            noise = torch.randn(dims, generator=_generator(seed + 1000 * (i + 1), name)) * 0.002
            return base_tensor(name, dims).to(torch.bfloat16).float() + noise

        _write(path, shape, expert_tensor, shard_bytes)
    return paths
