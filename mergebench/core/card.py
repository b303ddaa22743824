"""The model card (README.md) and machine-readable record (mergebench.json) of a merged model.

The card embeds the full recipe, with every input's content hash, so `mergebench merge README.md`
redoes the merge and refuses inputs that changed.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mergebench.core.recipe import RECIPE_MARKER, ModelInput, OutputSlice, Recipe, SliceSource

if TYPE_CHECKING:  # pragma: no cover
    from mergebench.core.engine import MergeResult
    from mergebench.core.registry import MergeMethod


def _pinned_recipe(recipe: Recipe, result: MergeResult) -> Recipe:
    """The recipe with resolved parameters and every input's sha256 filled in."""
    by_role = {i["role"]: i for i in result.inputs}
    base = None
    if recipe.base is not None:
        base = ModelInput(by_role["base"]["path"], sha256=by_role["base"]["sha256"])
    experts = [ModelInput(by_role[f"expert {i + 1}"]["path"], e.weight, by_role[f"expert {i + 1}"]["sha256"],
                          dict(e.parameters)) for i, e in enumerate(recipe.experts)]
    paths = {m.path: p.path for m, p in zip(([recipe.base] if base else []) + recipe.experts, ([base] if base else []) + experts)}
    slices = [OutputSlice([SliceSource(paths[src.model], src.layer_range) for src in sl.sources]) for sl in recipe.slices]
    tok = paths.get(recipe.tokenizer_source, recipe.tokenizer_source)
    return Recipe(recipe.method, experts, base, dict(result.parameters), recipe.seed,
                  recipe.dtype, None, recipe.max_shard_size, slices, tokenizer_source=tok)


def _given_block(recipe: Recipe) -> str:
    if recipe.given is None:
        return ""
    import yaml

    return ("\n## Configuration as given\n\nThe mergekit configuration this merge was asked for; the recipe above is "
            "what it resolved to.\n\n```yaml\n" + yaml.safe_dump(recipe.given, sort_keys=False) + "```\n")


def write_card(directory: Path, recipe: Recipe, method: MergeMethod, result: MergeResult, dtype: str) -> None:
    """``dtype`` describes the output's floating-point dtype(s) in words."""
    from mergebench import __version__

    pinned = _pinned_recipe(recipe, result)
    # whether these parameters draw random numbers (the seed then determines the output)
    random = method.draws_random(result.parameters, [e.parameters for e in recipe.experts])
    when = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    record = {
        "mergebench_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "created": when,
        "method": {"name": method.name, "plugin": method.plugin, "reference": method.reference,
                   "stochastic": random},
        "parameters": result.parameters,
        "seed": result.seed,
        "dtype": dtype,
        "inputs": result.inputs,
        "tensors_merged": result.tensors_merged,
        "tensors_copied": result.tensors_copied,
        "recipe": pinned.to_dict(),
    }
    if result.calibration:
        record["calibration"] = result.calibration  # each expert's calibration data, by content hash
    if recipe.given is not None:
        record["config_given"] = recipe.given  # the mergekit config exactly as the user wrote it
    (directory / "mergebench.json").write_text(json.dumps(record, indent=2) + "\n")

    params = ", ".join(f"{k}={v}" for k, v in result.parameters.items()) or "none"
    rows = "\n".join(
        f"| {i['role']} | `{i['reference']}` | {i.get('weight', '')} | `{i['sha256']}` |" for i in result.inputs
    )
    tags = "\n".join(f"- {t}" for t in ("merge", "mergebench", method.name))
    card = f"""---
library_name: transformers
tags:
{tags}
---

# Merged with mergebench: `{method.name}` of {len(recipe.experts)} expert(s)

- Method: **{method.name}** ({method.reference or 'no reference given'}), from plugin `{method.plugin}`
- Parameters: {params}
- Seed: {result.seed}{' (the method is stochastic: the seed determines the output)' if random else ''}
- Output dtype: {dtype}
- Tensors merged: {result.tensors_merged}; copied unchanged from the base: {result.tensors_copied}
- mergebench {__version__}, torch {torch.__version__}, created {when}

## Inputs

| role | reference | weight | content sha256 |
|---|---|---|---|
{rows}

## Recipe

Redo this merge with `mergebench merge README.md -o OUT` (inputs whose content changed are refused).

```yaml
{RECIPE_MARKER}
{pinned.to_yaml()}```
{_given_block(recipe)}"""
    (directory / "README.md").write_text(card)
