"""Reading a model directory's weights whole, for swapping into an evaluation session or an in-memory sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergebench.core.errors import InputError


def load_state_dict(model_dir: Path) -> dict[str, Any]:
    """All tensors of a model directory (safetensors shards)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise InputError(f"{model_dir}: no safetensors weights to evaluate")
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(f))
    return state
