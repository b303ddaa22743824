"""`mergebench demo`: the whole merge workflow on a tiny model, offline, in seconds.

A tiny, untrained Llama base; one expert fine-tuned on each of two toy counting tasks that use
separate blocks of tokens; every registered merge method combines the two experts through the same
engine and file formats used for real models; a table compares next-token accuracy. Each expert
solves only its own task; a good merge solves both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

VOCAB, SEQ = 52, 12  # tokens 0..3 are reserved (pad/bos/eos/unk)
# Each task counts in its own block of 24 tokens, so the two skills can live side by side in one model.
TASKS = {"count by 1": (4, 1), "count by 5": (28, 5)}  # tokens 4-27 and 28-51
BLOCK = 24


def _batch(task: tuple[int, int], n: int, generator: torch.Generator) -> torch.Tensor:
    first, step = task
    starts = torch.randint(0, BLOCK, (n, 1), generator=generator)
    return first + (starts + torch.arange(SEQ).unsqueeze(0) * step) % BLOCK


def _model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _train(model, tasks: list[tuple[int, int]], steps: int, seed: int, lr: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for i in range(steps):
        x = _batch(tasks[i % len(tasks)], 32, generator)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model, task: tuple[int, int], seed: int = 1234) -> float:
    """Next-token accuracy on 256 fresh sequences of one task (first token excluded: it is random)."""
    x = _batch(task, 256, torch.Generator().manual_seed(seed))
    predictions = model(input_ids=x).logits.argmax(-1)[:, :-1]
    return float((predictions == x[:, 1:]).float().mean())


def run_demo(directory: Path, steps: int = 30, seed: int = 0, console: Console | None = None) -> dict[str, dict]:
    """Build, merge and score; returns {model: {task: accuracy}}."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import mergebench
    from mergebench.core.plugin_manager import get_plugin_manager

    console = console or Console()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    directory.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]mergebench demo[/] in {directory}/: a tiny Llama base, two experts, every merge method")

    base = _model(seed)
    base.save_pretrained(directory / "base")
    experts = {}
    for i, (task, step) in enumerate(TASKS.items()):
        expert = AutoModelForCausalLM.from_pretrained(directory / "base")
        _train(expert, [step], steps, seed + 1 + i, lr=3e-3)
        path = directory / f"expert-{i + 1}"
        expert.save_pretrained(path)
        experts[task] = path
    console.print(f"fine-tuned {len(experts)} experts from the base ({steps} steps each)")

    models = {"base": directory / "base", **{f"expert: {t}": p for t, p in experts.items()}}
    skipped = []
    for method in get_plugin_manager().merge_methods():
        chosen = _experts_for(method, list(experts.values()))
        if method.calibration is not None or not chosen:  # data-aware methods need calibration data
            skipped.append(method.name)
            continue
        out = directory / f"merged-{method.name}"
        kwargs = {"base": directory / "base"} if method.needs_base else {}
        result = mergebench.merge(method.name, experts=chosen, output=out, force=True, seed=seed, **kwargs)
        label = f"merged: {method.name}" + (f" ({len(chosen)} of {len(experts)} experts)" if len(chosen) < len(experts) else "")
        models[label] = result.output
    if skipped:
        console.print(f"not merged here (they learn from calibration data): {', '.join(skipped)}")

    scores: dict[str, dict] = {}
    table = Table(title="Next-token accuracy (higher is better)")
    table.add_column("model")
    for task in TASKS:
        table.add_column(task, justify="right")
    table.add_column("mean", justify="right")
    for label, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        scores[label] = {task: accuracy(model, step) for task, step in TASKS.items()}
        mean = sum(scores[label].values()) / len(TASKS)
        table.add_row(label, *(f"{v:.3f}" for v in scores[label].values()), f"{mean:.3f}")
    console.print(table)
    console.print("Each merged model's README.md records its recipe and input hashes; "
                  f"redo one with: mergebench merge {directory}/merged-ties/README.md -o redo --force")
    return scores


def _experts_for(method, experts: list[Path]) -> list[Path]:
    """As many experts as the method takes (two-model methods such as slerp take one besides the base)."""
    from mergebench.core.errors import ParameterError

    params = method.resolve_params({})
    for n in range(len(experts), 0, -1):
        try:
            if method.check is not None:
                method.check(params, (1.0,) * n)
            return experts[:n]
        except ParameterError:
            continue
    return []


def clean(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
