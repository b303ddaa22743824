"""Merge recipes: the YAML form of a merge, also embedded in every merged model's card."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergebench.core.errors import ParameterError

RECIPE_MARKER = "# mergebench recipe"
_KEYS = {"method", "base", "experts", "parameters", "seed", "dtype", "output", "max_shard_size", "slices",
         "tokenizer_source", "calibration"}
_INPUT_KEYS = {"path", "weight", "sha256", "parameters"}


@dataclass
class ModelInput:
    path: str
    weight: Any = 1.0  # a number, or a gradient / filter list (mergebench.core.tensor_params)
    sha256: str | None = None  # when set, the merge fails unless the input still has this hash
    # this expert's own values of the method's per-expert parameters (density, gamma, epsilon, ...)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSource:
    """Layers ``layer_range`` = [start, end) of one input model (the base or a recipe expert by its path)."""

    model: str
    layer_range: tuple[int, int]


@dataclass
class OutputSlice:
    """Output layers merged from the same number of layers of each source (mergekit's ``slices``)."""

    sources: list[SliceSource]


@dataclass
class Recipe:
    method: str
    experts: list[ModelInput]
    base: ModelInput | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str | None = None
    output: str | None = None
    max_shard_size: str | int = "5GB"
    # frankenmerges and per-slice merges: the output's layers slice by slice; empty = every layer of every input
    slices: list[OutputSlice] = field(default_factory=list)
    # the output vocabulary when the inputs' differ: "base", "union" or an input's path (mergebench.core.vocab)
    tokenizer_source: str | None = None
    # data-aware methods: where calibration statistics come from, e.g. {"data": "calib.jsonl", "samples": 128}
    # (mergebench.core.calibration.CalibrationData)
    calibration: dict[str, Any] | None = None
    # the configuration as the user gave it (a mergekit config), recorded in the model card beside the recipe
    given: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        def model(m: ModelInput, weight: bool) -> dict[str, Any]:
            d: dict[str, Any] = {"path": m.path}
            if weight:
                d["weight"] = m.weight
            if m.sha256:
                d["sha256"] = m.sha256
            if m.parameters:
                d["parameters"] = dict(m.parameters)
            return d

        out: dict[str, Any] = {"method": self.method}
        out["base"] = model(self.base, False) if self.base else None
        out["experts"] = [model(e, True) for e in self.experts]
        out["parameters"] = dict(self.parameters)
        out["seed"] = self.seed
        out["dtype"] = self.dtype
        out["max_shard_size"] = self.max_shard_size
        if self.tokenizer_source is not None:
            out["tokenizer_source"] = self.tokenizer_source
        if self.calibration is not None:
            out["calibration"] = dict(self.calibration)
        if self.slices:
            out["slices"] = [{"sources": [{"model": src.model, "layer_range": list(src.layer_range)}
                                          for src in sl.sources]} for sl in self.slices]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _model(value: Any, where: str) -> ModelInput:
    if isinstance(value, str):
        return ModelInput(value)
    if isinstance(value, dict):
        unknown = set(value) - _INPUT_KEYS
        if unknown or "path" not in value:
            raise ParameterError(f"recipe: {where} needs 'path' and may have 'weight', 'sha256', 'parameters' "
                                 f"(got {sorted(value)})")
        weight = value.get("weight", 1.0)
        if not isinstance(weight, (list, dict)):  # a gradient or filters are checked per tensor
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise ParameterError(f"recipe: {where} weight {value.get('weight')!r} is not a number") from None
        own = value.get("parameters") or {}
        if not isinstance(own, dict):
            raise ParameterError(f"recipe: {where} 'parameters' must be a mapping of name: value")
        return ModelInput(str(value["path"]), weight, value.get("sha256"), dict(own))
    raise ParameterError(f"recipe: {where} must be a path or a mapping with 'path', got {value!r}")


def _slices(value: Any, source: str) -> list[OutputSlice]:
    if not value:
        return []
    out = []
    try:
        for entry in value:
            out.append(OutputSlice([SliceSource(str(s["model"]), (int(s["layer_range"][0]), int(s["layer_range"][1])))
                                    for s in entry["sources"]]))
    except (TypeError, KeyError, IndexError, ValueError):
        raise ParameterError(f"{source}: 'slices' is a list of {{sources: [{{model, layer_range: [start, end]}}]}}") from None
    return out


def parse_recipe(data: Any, source: str, pm=None) -> Recipe:
    """A recipe from its YAML data: mergebench's own form, or a mergekit config (``merge_method``)."""
    from mergebench.core.mergekit_config import from_mergekit, is_mergekit_config

    if is_mergekit_config(data):
        return from_mergekit(data, source, pm)
    if not isinstance(data, dict):
        raise ParameterError(f"{source}: a recipe is a YAML mapping with at least 'method' and 'experts'")
    unknown = set(data) - _KEYS
    if unknown:
        raise ParameterError(f"{source}: unknown recipe key(s) {sorted(unknown)} (valid: {sorted(_KEYS)})")
    if "method" not in data or not data.get("experts"):
        raise ParameterError(f"{source}: a recipe needs 'method' and a non-empty 'experts' list")
    if not isinstance(data["experts"], list):
        raise ParameterError(f"{source}: 'experts' must be a list")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ParameterError(f"{source}: 'parameters' must be a mapping of name: value")
    try:
        seed = int(data.get("seed", 0) or 0)
    except (TypeError, ValueError):
        raise ParameterError(f"{source}: 'seed' must be an integer") from None
    return Recipe(
        method=str(data["method"]),
        experts=[_model(e, f"expert {i + 1}") for i, e in enumerate(data["experts"])],
        base=_model(data["base"], "base") if data.get("base") else None,
        parameters=params,
        seed=seed,
        dtype=data.get("dtype"),
        output=data.get("output"),
        max_shard_size=data.get("max_shard_size", "5GB"),
        slices=_slices(data.get("slices"), source),
        tokenizer_source=data.get("tokenizer_source"),
        calibration=data.get("calibration"),
    )


_BLOCK = re.compile(r"```yaml\n(" + re.escape(RECIPE_MARKER) + r".*?)```", re.DOTALL)


def load_recipe(path: Path, pm=None) -> Recipe:
    """A recipe from a YAML file (ours or a mergekit config), or from the recipe block of a merged model's
    README.md card."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParameterError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
    if path.suffix.lower() == ".md":
        m = _BLOCK.search(text)
        if not m:
            raise ParameterError(f"{path}: no mergebench recipe block in this model card")
        text = m.group(1)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParameterError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    return parse_recipe(data, str(path), pm)
