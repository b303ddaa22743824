"""mergekit 0.1.5 as an independent reference, run from its own virtualenv.

The virtualenv is ``$MERGEKIT_VENV`` or ``.mergekit-venv`` at the repository root (``.ci/run`` builds it
with ``pip install torch==2.13.0 mergekit==0.1.5``); tests that need it are skipped without it.
mergekit and mergebench cannot share one environment (their pins differ), so the reference runs as
``mergekit-yaml`` in a subprocess on models written to disk, the way users run it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]


def venv() -> Path:
    return Path(os.environ.get("MERGEKIT_VENV", ROOT / ".mergekit-venv"))


def available() -> bool:
    return (venv() / "bin" / "mergekit-yaml").exists()


needs_mergekit = pytest.mark.skipif(not available(), reason="mergekit 0.1.5 virtualenv not found (see tests/mergekit_ref.py)")


def run_mergekit(config: dict | str, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    """Merge with ``mergekit-yaml`` (config as a mapping or YAML text) and return the output's tensors."""
    out = Path(out)
    cfg = out.parent / f"{out.name}.mergekit.yml"
    cfg.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    cmd = [str(venv() / "bin" / "mergekit-yaml"), str(cfg), str(out), "--no-lazy-unpickle", "--quiet",
           "--allow-crimes", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"mergekit-yaml failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
    "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 2,
    "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32",
}


def llama_tensors(seed: int, scale: float = 1.0, layers: int = 4) -> dict[str, torch.Tensor]:
    """A tiny Llama's state dict (names and shapes as transformers writes them), seeded normal values."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = LLAMA["hidden_size"], LLAMA["intermediate_size"], LLAMA["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (h, h),
            p + "self_attn.v_proj.weight": (h, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    return {n: torch.randn(s, generator=g) * scale for n, s in shapes.items()}


def write_llama(directory: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    layers = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("model.layers."))
    config = {**LLAMA, "num_hidden_layers": layers, "torch_dtype": str(dtype).removeprefix("torch.")}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({n: t.to(dtype).contiguous() for n, t in tensors.items()}, directory / "model.safetensors")
    return directory


def write_tokenizer(directory: Path, tokens: list[str]) -> None:
    """A word-level tokenizer (one id per token, in order; whitespace-split) saved as transformers does."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(directory))


def llama_family(root: Path, n_experts: int = 4, scale: float = 0.1, dtype: torch.dtype = torch.float32,
                 layers: int = 4) -> dict[str, Path]:
    """A base and ``n_experts`` experts (base plus seeded perturbations of size ``scale``)."""
    base = llama_tensors(0, layers=layers)
    paths = {"base": write_llama(root / "base", base, dtype)}
    for k in range(n_experts):
        noise = llama_tensors(100 + k, scale=scale, layers=layers)
        paths[f"e{k}"] = write_llama(root / f"e{k}", {n: t + noise[n] for n, t in base.items()}, dtype)
    return paths


def read_model(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


_MANY = """
import json, sys, traceback, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
opts = MergeOptions(allow_crimes=True, quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=0)
errors = {}
for name, cfg, out in json.load(open(sys.argv[1])):
    try:
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(cfg))), out, opts)
    except Exception:
        errors[name] = traceback.format_exc()[-2000:]
json.dump(errors, open(sys.argv[2], "w"))
"""


def run_mergekit_many(configs: dict[str, dict], root: Path, strict: bool = False) -> dict[str, dict[str, torch.Tensor] | str]:
    """Several merges in one mergekit process (its import costs seconds): name -> state dict, or the
    error text when mergekit refused that config (``strict``: an AssertionError instead)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    jobs = []
    for name, config in configs.items():
        cfg = root / f"{name}.mergekit.yml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        jobs.append((name, str(cfg), str(root / f"{name}-mergekit")))
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([str(venv() / "bin" / "python"), "-c", _MANY, str(root / "jobs.json"),
                           str(root / "errors.json")], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"mergekit runner failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    errors = json.loads((root / "errors.json").read_text())
    if strict and errors:
        raise AssertionError("mergekit refused: " + "; ".join(f"{k}:\n{v}" for k, v in errors.items()))
    return {name: errors.get(name) or read_model(Path(out)) for name, _, out in jobs}
