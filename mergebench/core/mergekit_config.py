"""mergekit configurations, read as they are and turned into a mergebench :class:`Recipe`.

Accepted (mergekit 0.1.5's schema): ``merge_method``, ``base_model``, ``models`` (``model`` with
``parameters``), ``slices`` (``sources`` of ``model`` + ``layer_range``, with ``parameters``),
top-level ``parameters``, gradients and filters in any parameter (see
:mod:`mergebench.core.tensor_params`), ``dtype``, ``out_dtype`` and ``tokenizer_source`` (``base``, ``union`` or a model: :mod:`mergebench.core.vocab`).
Any other key, or a form we do not support, is one error naming it; nothing is ignored but mergekit's
``int8_mask``, which only sets the dtype of mergekit's internal masks and never changes a number.

How a config maps onto a recipe:
- the method's ``mergekit_defaults`` (its convention parameters set to mergekit's behaviour, e.g. DARE's
  L1 rescale) are applied first, then the config's top-level ``parameters``;
- a model's ``weight`` becomes the expert's weight, its other parameters the expert's own parameters;
- ``base_model`` becomes the base. For a method that uses a base (``ignores_base`` false), a ``models``
  entry naming the base is the base itself (mergekit merges it as the base too). For a method that
  ignores it (``linear``, ``karcher``, ``passthrough``), the base listed in ``models`` is one more input
  with its weight, and a base not listed takes no part.
- The output dtype is ``out_dtype``, else ``dtype``. mergekit also *computes* in ``dtype``; mergebench
  always computes in float32 and rounds once when writing, so on bfloat16 inputs the two can differ by
  bfloat16 rounding (they agree to float32 rounding when ``dtype: float32``).
"""

from __future__ import annotations

from typing import Any, Mapping

from mergebench.core.errors import ParameterError
from mergebench.core.recipe import ModelInput, OutputSlice, Recipe, SliceSource

SUPPORTED = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source"}
KNOWN_UNSUPPORTED = {
    "modules": "multi-module configs (modules:) are not supported; use models: or slices:",
    "tokenizer": "the tokenizer: block (added tokens, padding) is not supported yet; use tokenizer_source: base",
    "chat_template": "chat_template is not supported; copy the template into the output's tokenizer_config.json",
}


def is_mergekit_config(data: Any) -> bool:
    return isinstance(data, Mapping) and "merge_method" in data


def _model_ref(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ParameterError(f"{where}: a model is a path or a Hugging Face id, got {value!r}")
    if "+" in value and not value.startswith(("/", ".")):
        raise ParameterError(f"{where}: '{value}' applies a LoRA (model+lora), which mergebench does not support; "
                             f"merge the LoRA into its model first")
    return value


def _settings(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ParameterError(f"{where}: 'parameters' must be a mapping of name: value")
    return dict(value)


def _split_weight(params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    params = dict(params)
    return params.pop("weight", 1.0), params


def from_mergekit(data: Mapping[str, Any], source: str, pm=None) -> Recipe:
    """The recipe a mergekit config describes; ``pm`` (the plugin manager) supplies the method's defaults."""
    from mergebench.core.plugin_manager import get_plugin_manager

    for key in data:
        if key in KNOWN_UNSUPPORTED:
            raise ParameterError(f"{source}: {KNOWN_UNSUPPORTED[key]}")
        if key not in SUPPORTED:
            raise ParameterError(f"{source}: mergekit config key '{key}' is not supported "
                                 f"(supported: {', '.join(sorted(SUPPORTED))})")
    method = (pm or get_plugin_manager()).merge_methods().get(str(data["merge_method"]))
    if bool(data.get("models")) == bool(data.get("slices")):
        raise ParameterError(f"{source}: a mergekit config needs exactly one of 'models' or 'slices'")
    base = _model_ref(data["base_model"], f"{source}: base_model") if data.get("base_model") else None
    tok = data.get("tokenizer_source")
    if tok is not None and not isinstance(tok, str):
        raise ParameterError(f"{source}: tokenizer_source must be base, union or a model, got {tok!r}")
    given = _settings(data.get("parameters"), f"{source}: parameters")
    if "int8_mask" in given and "int8_mask" not in {p.name for p in method.params}:
        given.pop("int8_mask")  # mergekit stores its masks as int8 to save memory: it never changes a number
    parameters = {**method.mergekit_defaults, **given}

    experts: list[ModelInput] = []
    by_model: dict[str, ModelInput] = {}
    uses_base = not method.ignores_base

    def add(model: str, params: dict[str, Any], where: str) -> None:
        if uses_base and model == base:
            return  # the base itself: mergekit uses it as the base, not as one more expert
        weight, own = _split_weight(params)
        if model in by_model:
            seen = by_model[model]
            if (seen.weight, seen.parameters) != (weight, own):
                raise ParameterError(f"{where}: model '{model}' appears twice with different parameters")
            return
        entry = ModelInput(model, weight, parameters=own)
        by_model[model] = entry
        experts.append(entry)

    slices: list[OutputSlice] = []
    if data.get("models"):
        if not isinstance(data["models"], list):
            raise ParameterError(f"{source}: 'models' must be a list")
        for i, entry in enumerate(data["models"]):
            where = f"{source}: models[{i}]"
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, Mapping) or "model" not in entry or set(entry) - {"model", "parameters"}:
                raise ParameterError(f"{where} needs 'model' and may have 'parameters' (got {entry!r})")
            add(_model_ref(entry["model"], where), _settings(entry.get("parameters"), where), where)
        recipe_base = base if uses_base else None
    else:
        if not isinstance(data["slices"], list):
            raise ParameterError(f"{source}: 'slices' must be a list")
        for k, out_slice in enumerate(data["slices"]):
            where = f"{source}: slices[{k}]"
            if not isinstance(out_slice, Mapping) or "sources" not in out_slice:
                raise ParameterError(f"{where} needs 'sources'")
            extra = set(out_slice) - {"sources"}
            if extra:
                raise ParameterError(f"{where}: slice key(s) {sorted(extra)} are not supported (give parameters at "
                                     f"the top level or per source)")
            srcs = []
            for j, src in enumerate(out_slice["sources"]):
                w = f"{where}.sources[{j}]"
                if not isinstance(src, Mapping) or set(src) - {"model", "layer_range", "parameters"} \
                        or "model" not in src or "layer_range" not in src:
                    raise ParameterError(f"{w} needs 'model' and 'layer_range' and may have 'parameters' (got {src!r})")
                rng = src["layer_range"]
                if not (isinstance(rng, (list, tuple)) and len(rng) == 2 and all(isinstance(x, int) for x in rng)):
                    raise ParameterError(f"{w}: layer_range must be [start, end], got {rng!r}")
                model = _model_ref(src["model"], w)
                add(model, _settings(src.get("parameters"), w), w)
                srcs.append(SliceSource(model, (rng[0], rng[1])))
            slices.append(OutputSlice(srcs))
        recipe_base = base if uses_base else None
    if not experts:
        raise ParameterError(f"{source}: no model to merge besides the base")
    return Recipe(
        method=method.name,
        experts=experts,
        base=ModelInput(recipe_base) if recipe_base else None,
        parameters=parameters,
        dtype=data.get("out_dtype") or data.get("dtype"),
        slices=slices,
        tokenizer_source=tok,
        given=dict(data),
    )
