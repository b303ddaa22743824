"""Merging state dicts in memory, for hyperparameter sweeps over small models.

The same per-tensor path as the streaming engine (:func:`mergebench.core.engine.merge_tensor`: identical
inputs copied, non-float tensors from the template, NaN/Inf checks, content-keyed random streams,
elementwise chunking, per-tensor and whole-model pre-passes, parameters resolved per tensor), over
state dicts instead of memory-mapped files, so a sweep's chosen point, written again by
``mergebench merge``, gives the same weights. A method that declares ``delta`` + ``scale_param`` has
its scale-free task vector computed once (:func:`merge_delta`) and each scale applied on top
(:func:`apply_delta`): the trimming, sign election and disjoint mean do not depend on lambda.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mergebench.core import engine
from mergebench.core.errors import MergebenchError
from mergebench.core.registry import MergeFn, MergeMethod
from mergebench.core.tensor_io import TensorInfo
from mergebench.core.tensor_params import ParameterPlan

StateDict = Mapping[str, torch.Tensor]


class StateDictSource:
    """A state dict behind the interface the engine reads models through (no files, nothing to release)."""

    root = None
    config = None
    files: list[Path] = []

    def __init__(self, state: StateDict, reference: str):
        self.reference = reference
        self._state = state
        self.tensors = {n: TensorInfo(n, t.dtype, tuple(t.shape), Path()) for n, t in state.items()}

    def ordered_names(self) -> list[str]:
        return list(self._state)

    def load(self, name: str) -> torch.Tensor:
        return self._state[name]

    def prefetch(self, name: str) -> None:
        pass

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def _per_tensor(method: MergeMethod, params: Mapping[str, Any], base: StateDict | None, experts: list[StateDict],
                weights: Sequence[Any] | None, seed: int, fn: MergeFn,
                expert_params: Sequence[Mapping[str, Any]] | None,
                statistics: Sequence[Any] | None = None) -> dict[str, torch.Tensor | None]:
    """``fn`` over every tensor through the engine's per-tensor path; None where there was nothing to merge."""
    n = len(experts)
    settings = ParameterPlan(method, params, list(expert_params or [{}] * n), list(weights or [1.0] * n))
    sources: list[Any] = ([StateDictSource(base, "base")] if base is not None else []) + [
        StateDictSource(e, f"expert {i + 1}") for i, e in enumerate(experts)]
    template = sources[0]
    for i, source in enumerate(sources[1:], start=1):
        engine._check_compatible(template, "the base" if base is not None else "expert 1", source,
                                 f"expert {i + (base is None)}")
    jobs = engine.identity_jobs(template.ordered_names(), len(sources), base is not None)
    plan = engine.build_plan(method, settings, sources, base is not None, jobs, torch.float32, torch.device("cpu"))
    plan.statistics = list(statistics) if statistics is not None else None
    analysis = engine.run_analysis(plan)
    buffers = engine._chunk_buffers(plan)
    return {job.name: engine.merge_tensor(plan, job, analysis, seed, buffers, fn) for job in jobs}


def merge(method: MergeMethod, params: Mapping[str, Any], base: StateDict | None, experts: list[StateDict],
          weights: Sequence[Any] | None = None, seed: int = 0,
          expert_params: Sequence[Mapping[str, Any]] | None = None,
          statistics: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
    """The merged state dict (float32 for merged tensors, inputs' dtype for copied ones).

    ``params`` and ``expert_params`` (per expert, its own values of per-expert parameters) may hold
    gradients and filters, as in a recipe. ``statistics``: per expert, its calibration statistics
    (``get(tensor_name)``) for a data-aware method."""
    merged = _per_tensor(method, params, base, experts, weights, seed, method.merge, expert_params, statistics)
    template = base if base is not None else experts[0]
    return {n: template[n] if m is None else m for n, m in merged.items()}


def merge_delta(method: MergeMethod, params: Mapping[str, Any], base: StateDict, experts: list[StateDict],
                weights: Sequence[Any] | None = None, seed: int = 0,
                expert_params: Sequence[Mapping[str, Any]] | None = None,
                statistics: Sequence[Any] | None = None) -> dict[str, torch.Tensor | None]:
    """The method's scale-free merged task vector per tensor (None where inputs are identical)."""
    if method.delta is None or method.scale_param is None:
        raise MergebenchError(f"merge method '{method.name}' has no separate task vector to scale")
    return _per_tensor(method, params, base, experts, weights, seed, method.delta, expert_params, statistics)


def apply_delta(base: StateDict, delta: Mapping[str, torch.Tensor | None], scale: float) -> dict[str, torch.Tensor]:
    """theta_0 + scale * delta, with the same operation (and rounding) as the engine's scaled merge."""
    return {n: t if delta[n] is None else
            torch.add(t.to(torch.float32).reshape(delta[n].shape), delta[n], alpha=scale).view(t.shape)
            for n, t in base.items()}
