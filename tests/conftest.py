"""Shared fixtures. Tests never load whatever third-party plugins happen to be installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["MERGEBENCH_LOAD_PLUGINS"] = ""  # before any plugin manager is built
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mergebench.core.plugin_manager import make_plugin_manager, reset_plugin_manager  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MERGEBENCH_HOME", str(tmp_path_factory.mktemp("home")))
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def pm():
    """A fresh plugin manager with only the built-in plugins."""
    return make_plugin_manager(entry_points=False)


def write_model(directory: Path, tensors: dict[str, torch.Tensor], config: dict | None = None,
                shards: int = 1) -> Path:
    """A Hugging Face-style model directory written with the reference safetensors writer."""
    directory.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else {"model_type": "toy", "architectures": ["ToyModel"]}
    (directory / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    if shards == 1:
        save_file({n: t.contiguous() for n, t in tensors.items()}, directory / "model.safetensors")
        return directory
    weight_map = {}
    per = -(-len(names) // shards)
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, directory / fname)
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def toy_tensors(seed: int, dtype=torch.float32, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0.weight": (torch.randn(16, 8, generator=g) * scale).to(dtype),
        "layer.0.bias": (torch.randn(16, generator=g) * scale).to(dtype),
        "layer.1.weight": (torch.randn(4, 16, generator=g) * scale).to(dtype),
        "position_ids": torch.arange(8, dtype=torch.int64),
    }


@pytest.fixture
def toy_models(tmp_path):
    """A base and three experts (base plus seeded perturbations) in float32."""
    base = toy_tensors(0)
    paths = {"base": write_model(tmp_path / "base", base)}
    for i in range(3):
        noise = toy_tensors(100 + i, scale=0.1)
        expert = {n: (t + noise[n] if t.is_floating_point() else t) for n, t in base.items()}
        paths[f"e{i}"] = write_model(tmp_path / f"e{i}", expert)
    return paths


def method_plugin(method):
    """A plugin object registering one MergeMethod (``pm.register(method_plugin(m))``)."""
    from mergebench import hookimpl

    class Plugin:
        __name__ = f"plugin_{method.name}"

        @hookimpl
        def register_merge_methods(self, register):
            register(method)

    return Plugin()


def reference_uniforms16(numel: int, seed: int) -> torch.Tensor:
    """merge_ops' documented random stream, drawn here independently: 32-bit draws viewed as pairs of 16-bit
    words, read as unsigned [0, 65536) (int64)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31, ((numel + 1) // 2,), generator=g, dtype=torch.int32)
    return words.view(torch.int16)[:numel].to(torch.int64) + 32768


def load_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, read with the reference safetensors reader."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="session")
def tiny_llamas(tmp_path_factory):
    """A tiny bf16 Llama base and two experts saved by transformers (sharded), as users' models are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    state = base.state_dict()
    paths = {"base": root / "base"}
    for i in range(2):
        g = torch.Generator().manual_seed(10 + i)
        expert = LlamaForCausalLM(config).to(torch.bfloat16)
        expert.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in state.items()})
        expert.save_pretrained(root / f"e{i}", max_shard_size="8KB")
        paths[f"e{i}"] = root / f"e{i}"
    return paths


def write_hub_snapshot(cache: Path, repo_id: str, source: Path,
                       commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """``source``'s files in the hub cache layout huggingface_hub writes (blobs named by sha256, snapshot
    symlinks, refs/main); returns the snapshot directory."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in Path(source).iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs" / digest).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / digest)
    return snapshot
