"""Training for the micro suite: a byte-level BPE tokenizer, Llama configs in three sizes, one loop.

The loop is deterministic for a seed on the CPU (seeded init, seeded batch order, no dropout
randomness beyond torch's seeded generator) and saves in the Hugging Face layout that ``mergebench
merge`` and the evaluator read. Two kinds of data: plain text (causal-LM loss on every token, for
pretraining) and prompt/target pairs (loss on the target tokens only, for experts and instruction
tuning); the two can be mixed, which keeps instruction tuning from erasing language modelling.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

SIZES = {  # name -> (hidden, layers, heads, intermediate)
    "tiny": (64, 4, 4, 256),
    "small": (128, 4, 4, 512),
    "medium": (256, 4, 8, 1024),
}
SPECIAL = ["<pad>", "<s>", "</s>"]


def train_tokenizer(lines: Sequence[str], out_dir: Path, vocab_size: int = 1024):
    """Byte-level BPE trained on ``lines``, saved in Hugging Face format with pad/bos/eos tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.save_pretrained(out_dir)
    return hf


def llama_config(size: str, vocab_size: int, max_positions: int = 256, dropout: float = 0.0):
    from transformers import LlamaConfig

    hidden, layers, heads, inter = SIZES[size]
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=inter,
                       max_position_embeddings=max_positions, attention_dropout=dropout, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-3
    batch_size: int = 32
    seq_len: int = 128
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    lm_fraction: float = 0.0  # share of each batch drawn from plain text when training on pairs
    dropout: float = 0.0  # attention dropout while training (restored to the model's own value after)


def _encode_pair(tok, prompt: str, target: str, seq_len: int) -> tuple[list[int], list[int]]:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # no BOS: lm-eval's HFLM scores contexts without one, so training matches evaluation
    ids = (p + t)[-seq_len:]
    labels = ([-100] * len(p) + t)[-seq_len:]
    return ids, labels


def _encode_text(tok, text: str, seq_len: int, rng: random.Random) -> tuple[list[int], list[int]]:
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if len(ids) > seq_len:
        start = rng.randrange(len(ids) - seq_len + 1)
        ids = ids[start:start + seq_len]
    return ids, list(ids)


def _collate(items: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(i) for i, _ in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (i, l) in enumerate(items):
        ids[row, :len(i)] = torch.tensor(i)
        labels[row, :len(l)] = torch.tensor(l)
        mask[row, :len(i)] = 1
    return ids, labels, mask


def train(model, tok, cfg: TrainConfig, pairs: Sequence[tuple[str, str]] = (), texts: Sequence[str] = (),
          on_step: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place with AdamW, linear warm-up and cosine decay; returns the loss per step."""
    if not pairs and not texts:
        raise ValueError("nothing to train on")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    n_text = round(cfg.batch_size * (cfg.lm_fraction if pairs else 1.0)) if texts else 0
    losses = []
    attention = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    saved = [m.attention_dropout for m in attention]
    for m in attention:
        m.attention_dropout = cfg.dropout
    model.train()
    for step in range(cfg.steps):
        items = [_encode_pair(tok, *rng.choice(pairs), cfg.seq_len) for _ in range(cfg.batch_size - n_text)]
        items += [_encode_text(tok, rng.choice(texts), cfg.seq_len, rng) for _ in range(n_text)]
        ids, labels, mask = _collate(items, tok.pad_token_id)
        device = next(model.parameters()).device  # the batch goes where the model is (cpu, cuda)
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, cfg.steps, losses[-1])
    model.eval()
    for m, value in zip(attention, saved):
        m.attention_dropout = value
    return losses


def pairs_from_rows(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """(prompt, target) pairs from suite rows: the correct choice or the reference answer."""
    return [(r["query"], r["choices"][r["label"]] if "choices" in r else r["answer"]) for r in rows]


def read_texts(path: Path) -> list[str]:
    """A corpus file: one document per line."""
    return [line for line in Path(path).read_text().splitlines() if line.strip()]


def read_pairs(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """(prompt, target) pairs from suite-format JSONL files (``query`` + ``answer`` or ``choices``/``label``)."""
    import json

    from mergebench.core.errors import InputError

    rows = []
    for path in paths:
        try:
            with open(path) as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read training data ({exc})") from None
    try:
        return pairs_from_rows(rows)
    except (KeyError, IndexError, TypeError):
        raise InputError(f"{', '.join(map(str, paths))}: rows need 'query' and 'answer', or 'choices' and 'label'") from None


def load_model(directory: Path):
    """A causal LM and its tokenizer from a Hugging Face directory, in float32 on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergebench.core.errors import InputError

    try:
        tok = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise InputError(f"{directory}: cannot load the model ({str(exc).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def save_model(model, tok, directory: Path) -> None:
    """Weights (safetensors), config and tokenizer in the Hugging Face layout."""
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
