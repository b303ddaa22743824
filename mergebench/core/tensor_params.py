"""Parameter settings that vary by tensor: gradients over the layers and filters by tensor name.

A setting is what a recipe or a mergekit config gives for one parameter, in one of mergekit's forms:

- a scalar: ``0.5``;
- a gradient: ``[0.0, 0.5, 1.0]``, interpolated piecewise-linearly at the tensor's position
  ``t = layer / (layers - 1)`` (non-numeric lists pick ``values[int(t * (len - 1))]``);
- filters: ``[{filter: self_attn, value: 0.3}, {filter: mlp, value: [0, 1]}, {value: 0.5}]``: the
  first entry whose ``filter`` is a substring of the tensor's name (or is absent, or ``*``) wins, and
  its value may itself be a gradient.

Same semantics as mergekit 0.1.5 (``config.evaluate_setting``, ``parameter_resolver``): tensors outside
the numbered layers (embeddings, final norm, output head) are at ``t = 0``; a per-expert setting, when
absent for an expert, falls back to the method-level one. Everything is resolved for every tensor
before any tensor is read, so a bad value is an error at once, not an hour into a merge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from mergebench.core.errors import ParameterError
from mergebench.core.registry import MergeMethod

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.7.mlp...`` -> 7), None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def is_varying(setting: Any) -> bool:
    """Whether ``setting`` is a gradient or a filter list (its value depends on the tensor)."""
    return isinstance(setting, (list, tuple, Mapping))


def _scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float, str))


def evaluate(setting: Any, name: str, t: float) -> Any:
    """``setting``'s value for tensor ``name`` at layer position ``t``; None when no filter matches."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if _scalar(setting) or setting is None:
        return setting
    values = list(setting)
    if not values:
        return None
    if all(_scalar(v) for v in values):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    for entry in values:
        if not isinstance(entry, Mapping) or "value" not in entry or set(entry) - {"filter", "value"}:
            raise ParameterError(f"a filtered setting is a list of {{filter, value}} entries, got {entry!r}")
        f = entry.get("filter")
        if f is None or f == "*" or f in name:
            return evaluate(entry["value"], name, t)
    return None


@dataclass(frozen=True)
class TensorParams:
    """What a method's maths gets for one tensor: every parameter, each expert's weight and own values."""

    params: Mapping[str, Any]
    weights: tuple[float, ...]
    expert_params: tuple[Mapping[str, Any], ...]


class ParameterPlan:
    """A method's settings resolved per tensor; ``for_tensor(name, t, experts)`` is cached by its values.

    ``experts`` selects which recipe experts take part in a tensor (all of them, except in slices).
    """

    def __init__(self, method: MergeMethod, settings: Mapping[str, Any], expert_settings: Sequence[Mapping[str, Any]],
                 weights: Sequence[Any]):
        self.method = method
        self.settings = dict(settings)
        self.expert_settings = [dict(s) for s in expert_settings]
        self.weight_settings = list(weights)
        known = {p.name: p for p in method.params}
        for key in self.settings:
            if key not in known:
                method.resolve_params({key: None})  # raises the registry's "unknown parameter" message
        for i, own in enumerate(self.expert_settings):
            constant = {k: v for k, v in own.items() if not is_varying(v)}
            method.resolve_expert_params(constant, f"expert {i + 1}")  # names, per-expert-ness, values
            for k in own:
                if is_varying(own[k]):  # its name and per-expert-ness now, its values per tensor
                    method.resolve_expert_params({k: known[k].default if k in known else None}, f"expert {i + 1}")
        self.varies = (any(is_varying(v) for v in self.settings.values())
                       or any(is_varying(v) for own in self.expert_settings for v in own.values())
                       or any(is_varying(w) for w in self.weight_settings))

    def for_tensor(self, name: str, t: float = 0.0, experts: Sequence[int] | None = None) -> TensorParams:
        experts = range(len(self.weight_settings)) if experts is None else experts
        given = {k: v for k, v in ((k, evaluate(s, name, t)) for k, s in self.settings.items()) if v is not None}
        params = self.method.resolve_params(given)
        weights = []
        own: list[dict[str, Any]] = []
        for i in experts:
            w = evaluate(self.weight_settings[i], name, t)
            try:
                weights.append(float(1.0 if w is None else w))
            except (TypeError, ValueError):
                raise ParameterError(f"expert {i + 1}'s weight for tensor '{name}' is not a number: {w!r}") from None
            values = {k: v for k, v in ((k, evaluate(s, name, t)) for k, s in self.expert_settings[i].items())
                      if v is not None}
            own.append(self.method.resolve_expert_params(values, f"expert {i + 1}"))
        return TensorParams(params, tuple(weights), tuple(own))

    def method_level(self) -> dict[str, Any]:
        """The method-level parameters as one mapping: resolved values where constant, settings as given
        where they vary (what a model card and a result record)."""
        constant = {k: v for k, v in self.settings.items() if not is_varying(v)}
        resolved = self.method.resolve_params(constant)
        return {k: (self.settings[k] if k in self.settings and is_varying(self.settings[k]) else v)
                for k, v in resolved.items()}
