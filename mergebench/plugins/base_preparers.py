"""Base preparers: pretrain a Llama-architecture base, instruction-tune one, or load an existing model.

Each returns a model directory in the Hugging Face layout (config, safetensors weights, tokenizer)
that ``mergebench merge``, the expert trainers and the evaluator read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mergebench.core.errors import InputError
from mergebench.core.hookspecs import hookimpl
from mergebench.core.registry import Param
from mergebench.study.components import BasePreparer
from mergebench.study.contracts import PrepareInputs
from mergebench.training import SIZES, TrainConfig, load_model, read_pairs, read_texts, save_model, train



def training_params(steps: int, lr: float, batch_size: int = 32, seed: int = 0) -> tuple[Param, ...]:
    """The optimisation parameters every built-in trainer shares (paper defaults scaled down)."""
    return (
        Param("steps", int, steps, "optimiser steps", min=1),
        Param("lr", float, lr, "peak learning rate (linear warm-up, cosine decay to 0)", min=0.0),
        Param("batch_size", int, batch_size, "sequences per step", min=1),
        Param("seq_len", int, 128, "maximum tokens per sequence (longer ones are cut from the left)", min=8),
        Param("warmup", int, 20, "warm-up steps", min=0),
        Param("weight_decay", float, 0.0, "AdamW weight decay", min=0.0),
        Param("dropout", float, 0.05, "attention dropout while training (the paper's 0.05)", min=0.0, max=0.9),
        Param("seed", int, seed, "seed for initialisation, batch order and dropout"),
    )


def train_config(params: dict[str, Any], lm_fraction: float = 0.0) -> TrainConfig:
    return TrainConfig(steps=params["steps"], lr=params["lr"], batch_size=params["batch_size"],
                       seq_len=params["seq_len"], warmup=params["warmup"], weight_decay=params["weight_decay"],
                       seed=params["seed"], lm_fraction=lm_fraction, dropout=params["dropout"])


def pretrain(params: dict[str, Any], workdir: Path, inputs: PrepareInputs) -> Path:
    """Causal-LM pretraining from a fresh config on the suite's ``corpus`` (one document per line) with the
    tokenizer built with the suite (micro-t0 provides both)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from mergebench.training import llama_config

    if inputs.data is None or inputs.data.tokenizer is None:
        raise InputError("base preparer 'pretrain' needs a suite that builds a corpus and a tokenizer (micro-t0)")
    corpus = inputs.data.require("corpus", "train", "base preparer 'pretrain'")
    tokenizer, on_step = inputs.data.tokenizer, inputs.on_step

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(params["seed"])
    model = LlamaForCausalLM(llama_config(params["size"], len(tok)))
    train(model.to(inputs.device), tok, train_config(params), texts=read_texts(corpus), on_step=on_step)
    save_model(model.to("cpu"), tok, workdir)
    return workdir


def instruction_tune(params: dict[str, Any], workdir: Path, inputs: PrepareInputs) -> Path:
    """Continue training the source base on the suite's instruction pairs (answer-only loss), mixing in
    its corpus text when it has one."""
    if inputs.source is None:
        raise InputError("base preparer 'instruction_tune' starts from another base: give it `from:` in the config")
    if inputs.data is None:
        raise InputError("base preparer 'instruction_tune' needs a suite with an 'instructions' file (micro-t0)")
    data = [inputs.data.require("instructions", "train", "base preparer 'instruction_tune'")]
    corpus, on_step = inputs.data.file("corpus", "train"), inputs.on_step
    model, tok = load_model(inputs.source)
    texts = read_texts(corpus) if corpus else []
    train(model.to(inputs.device), tok, train_config(params, params["lm_fraction"] if texts else 0.0),
          pairs=read_pairs(data), texts=texts, on_step=on_step)
    save_model(model.to("cpu"), tok, workdir)
    return workdir


def _hub_cache_dir(params: dict[str, Any]) -> str | None:
    # read at call time, not at huggingface_hub's import: a config or a worker's environment may set it
    return params.get("cache_dir") or os.environ.get("HF_HUB_CACHE") or None


def find_model(params: dict[str, Any]) -> Path | None:
    """``params["model"]`` as a local model directory: itself, or the hub id's snapshot in the local Hugging Face
    cache (``revision``, ``cache_dir``); None when it is neither. Never downloads."""
    path = Path(params["model"]).expanduser()
    if path.is_dir():
        return path
    try:
        import huggingface_hub

        return Path(huggingface_hub.snapshot_download(params["model"], revision=params.get("revision") or None,
                                                      cache_dir=_hub_cache_dir(params), local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means: not in the cache
        return None


def load(params: dict[str, Any], workdir: Path | None, inputs: PrepareInputs | None = None) -> Path:
    """An existing model directory (or a hub id already in the local cache), used as it is."""
    reference = params["model"]
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: not a Hugging Face model directory (no config.json)")
        return path.resolve()
    found = find_model(params)
    if found is None:
        cache_dir = _hub_cache_dir(params)
        raise InputError(f"{reference}: neither a model directory nor a model in the local Hugging Face cache"
                         f"{f' ({cache_dir})' if cache_dir else ''}; nothing is downloaded (fetch it first, e.g. "
                         f"`huggingface-cli download {reference}`)")
    return found


@hookimpl
def register_base_preparers(register):
    register(BasePreparer(
        name="pretrain",
        description="Pretrain a Llama-architecture base with causal-LM loss on a corpus.",
        params=(Param("size", str, "tiny", "model size", choices=tuple(SIZES)), *training_params(800, 3e-3)),
        prepare=pretrain))
    register(BasePreparer(
        name="instruction_tune",
        description="Continue training a base on an instruction mixture (the paper's Flan step, scaled down).",
        params=(*training_params(150, 1e-3, seed=1),
                Param("lm_fraction", float, 0.5, "share of each batch that is plain corpus text (against forgetting)",
                      min=0.0, max=1.0)),
        prepare=instruction_tune, needs_source=True))
    register(BasePreparer(
        name="load",
        description="Use an existing local model directory or a hub model already in the local cache.",
        params=(Param("model", str, "", "model directory or hub id"),
                Param("revision", str, "", "hub revision (branch, tag or commit) in the cache; empty: main"),
                Param("cache_dir", str, "", "Hugging Face hub cache to look in (empty: HF_HUB_CACHE or the default)")),
        prepare=load, cached=False))
