"""Expert trainers: full fine-tuning on one category's data, and the multitask baseline on all of it.

Loss on the target tokens only (the prompt is context), AdamW with linear warm-up and cosine decay,
attention dropout while training; deterministic for a seed on the CPU. Saves in the Hugging Face
layout that ``mergebench merge`` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergebench.core.hookspecs import hookimpl
from mergebench.study.components import ExpertTrainer
from mergebench.plugins.base_preparers import train_config, training_params
from mergebench.study.contracts import OnStep
from mergebench.training import load_model, read_pairs, save_model, train


def full_finetune(base: Path, data: list[Path], params: dict[str, Any], workdir: Path,
                  on_step: OnStep | None = None, device: str = "cpu") -> Path:
    """Every parameter of ``base`` trained on the prompt/target pairs in ``data`` (JSONL rows)."""
    model, tok = load_model(base)
    train(model.to(device), tok, train_config(params), pairs=read_pairs(data), on_step=on_step)
    save_model(model.to("cpu"), tok, workdir)
    return workdir


@hookimpl
def register_expert_trainers(register):
    register(ExpertTrainer(
        name="full_finetune",
        description="Full fine-tuning on one held-in category (the paper's experts, scaled down).",
        reference="Yadav et al., arXiv:2410.03617, section 3: 2000 steps, lr 3e-5, cosine, dropout 0.05",
        params=training_params(200, 2e-3, seed=2),
        train=full_finetune))
    register(ExpertTrainer(
        name="multitask",
        description="The multitask baseline: the same trainer over the union of every held-in category.",
        params=training_params(400, 2e-3, seed=3),
        train=full_finetune))
