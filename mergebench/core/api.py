"""The Python API that the CLI is a thin shell over."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from mergebench.core.errors import ParameterError
from mergebench.core.engine import MergeResult, ProgressCallback, run
from mergebench.core.plugin_manager import PluginManager
from mergebench.core.recipe import ModelInput, Recipe


def merge(
    method: str,
    *,
    base: str | Path | None = None,
    experts: Sequence[str | Path],
    output: str | Path,
    weights: Sequence[float] | None = None,
    expert_params: Sequence[dict[str, Any]] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    allow_pickle: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    plugin_manager: PluginManager | None = None,
    progress: ProgressCallback | None = None,
    calibration: Mapping[str, Any] | None = None,
    **params: Any,
) -> MergeResult:
    """Merge ``experts`` (onto ``base``) with ``method`` into ``output``.

    Method parameters go as keyword arguments; ``lambda`` may be spelled ``lambda_``:
    ``merge("ties", base="b", experts=["e1", "e2"], output="out", density=0.2, lambda_=0.8)``.
    ``expert_params`` gives each expert its own values of per-expert parameters (e.g. ``[{"density": 0.3}, {}]``).
    ``calibration``: data-aware methods' data, as the recipe key (``{"data": FILE or [FILE per expert], "samples": 128}``).
    """
    params = {k[:-1] if k.endswith("_") else k: v for k, v in params.items()}
    weights = list(weights) if weights is not None else [1.0] * len(experts)
    if len(weights) != len(experts):
        raise ParameterError(f"{len(weights)} weight(s) given for {len(experts)} expert(s); give one per expert")
    recipe = Recipe(
        method=method,
        experts=[ModelInput(str(e), float(w), parameters=dict(p))
                 for e, w, p in zip(experts, weights, expert_params or [{}] * len(experts))],
        base=ModelInput(str(base)) if base is not None else None,
        parameters=params,
        seed=seed,
        dtype=dtype,
        max_shard_size=max_shard_size,
        calibration=dict(calibration) if calibration is not None else None,
    )
    return run(recipe, Path(output), force=force, allow_pickle=allow_pickle, device=device, threads=threads,
               pm=plugin_manager, progress=progress)
