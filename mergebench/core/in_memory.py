"""Merging state dicts in memory, for hyperparameter sweeps over small models.

Same maths and same conventions as the streaming engine (identical inputs are copied, non-float
tensors come from the template, per-tensor seeds), so a sweep's chosen point, written again by
``mergebench merge``, gives the same weights. A method that declares ``delta`` + ``scale_param`` has
its scale-free task vector computed once (:func:`merge_delta`) and each scale applied on top
(:func:`apply_delta`): the trimming, sign election and disjoint mean do not depend on lambda.
Methods that need a whole-model pre-pass (``analysis``) are not supported here; the caller falls
back to the engine.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from mergebench.core.context import TensorContext, content_key
from mergebench.core.errors import MergebenchError
from mergebench.core.registry import MergeMethod

StateDict = Mapping[str, torch.Tensor]


def supports(method: MergeMethod, params: Mapping[str, Any], n_experts: int) -> bool:
    """Whether ``method`` with ``params`` can be merged tensor by tensor (no whole-model pre-pass)."""
    return method.analysis is None or method.analysis(dict(params), n_experts) is None


def _identical(tensors: list[torch.Tensor]) -> bool:
    return all(torch.equal(t, tensors[0]) for t in tensors[1:])


def _per_tensor(method: MergeMethod, params: dict[str, Any], base: StateDict | None, experts: list[StateDict],
                weights: tuple[float, ...], seed: int, fn,
                expert_params: tuple[dict[str, Any], ...] = ()) -> dict[str, torch.Tensor | None]:
    """``fn(base_t, expert_ts, ctx)`` per float tensor; None where every input is the same."""
    if not supports(method, params, len(experts)):
        raise MergebenchError(f"merge method '{method.name}' needs a whole-model pre-pass; merge it with the engine")
    if method.check:
        method.check(params, weights)
    template = base if base is not None else experts[0]
    out: dict[str, torch.Tensor | None] = {}
    for name, t in template.items():
        inputs = ([t] if base is not None else []) + [e[name] for e in experts]
        if not t.is_floating_point() or _identical(inputs):
            out[name] = None
            continue
        # copies: methods work in place on their inputs (the engine hands them scratch buffers), and a
        # sweep merges the same state dicts many times. Elementwise methods see flat tensors, as the
        # engine's chunks are.
        f32 = [x.to(torch.float32, copy=True) for x in inputs]
        if method.elementwise:
            f32 = [x.reshape(-1) for x in f32]
        b, ex = (f32[0], f32[1:]) if base is not None else (None, f32)
        # a stochastic method's streams follow each expert's stored bytes, exactly as in the engine
        streams = tuple(content_key(e[name]) for e in experts) if method.stochastic else None
        ctx = TensorContext(name=name, weights=weights, seed=seed, streams=streams, expert_params=expert_params)
        if method.tensor_analysis is not None:
            per_tensor = method.tensor_analysis(params, len(experts))
            if per_tensor is not None:
                from mergebench.core.analysis import run_analysis

                ctx.analysis = run_analysis(per_tensor, name, b, ex)
        out[name] = fn(b, ex, ctx)
    return out


def _expert_params(method: MergeMethod, given, n: int) -> tuple[dict[str, Any], ...]:
    given = list(given or [{}] * n)
    return tuple(method.resolve_expert_params(g, f"expert {i + 1}") for i, g in enumerate(given))


def merge(method: MergeMethod, params: Mapping[str, Any], base: StateDict | None, experts: list[StateDict],
          weights: tuple[float, ...] | None = None, seed: int = 0,
          expert_params: list[Mapping[str, Any]] | None = None) -> dict[str, torch.Tensor]:
    """The merged state dict (float32 for merged tensors, inputs' dtype for copied ones).

    ``expert_params``: per expert, its own values of the method's per-expert parameters."""
    params = method.resolve_params(params)
    weights = weights or tuple(1.0 for _ in experts)
    merged = _per_tensor(method, params, base, experts, weights, seed,
                         lambda b, ex, ctx: method.merge(b, ex, params, ctx),
                         _expert_params(method, expert_params, len(experts)))
    template = base if base is not None else experts[0]
    return {n: (template[n] if m is None else m).view(template[n].shape) for n, m in merged.items()}


def merge_delta(method: MergeMethod, params: Mapping[str, Any], base: StateDict, experts: list[StateDict],
                weights: tuple[float, ...] | None = None, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """The method's scale-free merged task vector per tensor (None where inputs are identical)."""
    if method.delta is None or method.scale_param is None:
        raise MergebenchError(f"merge method '{method.name}' has no separate task vector to scale")
    params = method.resolve_params(params)
    weights = weights or tuple(1.0 for _ in experts)
    return _per_tensor(method, params, base, experts, weights, seed,
                       lambda b, ex, ctx: method.delta(b, ex, params, ctx))


def apply_delta(base: StateDict, delta: Mapping[str, torch.Tensor | None], scale: float) -> dict[str, torch.Tensor]:
    """theta_0 + scale * delta, with the same operation (and rounding) as the engine's scaled merge."""
    return {n: t if delta[n] is None else
            torch.add(t.to(torch.float32).reshape(delta[n].shape), delta[n], alpha=scale).view(t.shape)
            for n, t in base.items()}
