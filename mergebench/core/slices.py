"""Slices: an output model whose layers come from layer ranges of the inputs (mergekit's ``slices``).

Each output slice takes the same number of layers from each of its sources and merges layer
``start + k`` of every source into the next output layer; one source per slice stacks layers
(a "frankenmerge" with ``passthrough``). As in mergekit, tensors outside the numbered layers are
merged from the first slice's sources when they come before the layers (embeddings: names with
``embed``, ``wte`` or ``wpe``) and from the last slice's sources otherwise (final norm, output head);
gradients run over each slice's layers at t = k / (layers - 1) (t = 1 for a one-layer slice), and
the tensors outside the layers are at t = 0. The output's config gets the new layer count.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from mergebench.core.errors import InputError, ParameterError
from mergebench.core.tensor_params import layer_index

if TYPE_CHECKING:  # pragma: no cover
    from mergebench.core.engine import TensorJob
    from mergebench.core.recipe import Recipe
    from mergebench.core.tensor_io import ModelSource

_LAYER_NUMBER = re.compile(r"((?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)(\.)")
_PRE = ("embed", "wte", "wpe")


def _layer_key(name: str) -> str:
    """The name with its layer number replaced by ``{}`` (braces in names are escaped)."""
    escaped = name.replace("{", "{{").replace("}", "}}")
    return _LAYER_NUMBER.sub(lambda m: m.group(1) + "{}" + m.group(3), escaped, count=1)


def _layers(source: ModelSource) -> dict[int, list[str]]:
    """Per layer index, the layer-relative keys of its tensors, in storage order."""
    out: dict[int, list[str]] = {}
    for name in source.ordered_names():
        i = layer_index(name)
        if i is not None:
            out.setdefault(i, []).append(_layer_key(name))
    return out


def slice_jobs(recipe: Recipe, sources: list[ModelSource], has_base: bool,
               index: dict[str, int]) -> tuple[list[TensorJob], int]:
    """The output's tensors as jobs, and its layer count; ``index``: each input's path -> its source."""
    from mergebench.core.engine import TensorJob

    layers = {}
    jobs_by_slice = []
    out_layer = 0
    for k, out_slice in enumerate(recipe.slices):
        where = f"slice {k + 1}"
        if not out_slice.sources:
            raise ParameterError(f"{where} has no sources")
        members = []
        for src in out_slice.sources:
            if src.model not in index:
                raise ParameterError(f"{where}: model '{src.model}' is neither the base nor one of the experts")
            members.append(index[src.model])
        if len(set(members)) != len(members):
            raise ParameterError(f"{where} lists a model twice")
        if has_base and 0 not in members:
            raise ParameterError(f"{where} does not include the base model, which the merge method uses")
        order = sorted(range(len(members)), key=lambda j: (members[j] != 0 or not has_base, j))  # base first
        members = [members[j] for j in order]
        ranges = [tuple(out_slice.sources[j].layer_range) for j in order]
        lengths = {b - a for a, b in ranges}
        if len(lengths) != 1 or min(lengths) <= 0:
            raise ParameterError(f"{where}: every source must give the same, positive number of layers, got {ranges}")
        count = lengths.pop()
        for s, (a, b) in zip(members, ranges):
            have = layers.setdefault(s, _layers(sources[s]))
            if a < 0 or any(i not in have for i in range(a, b)):
                raise InputError(f"{where}: {sources[s].reference} has layers 0..{max(have, default=-1)}, "
                                 f"not all of layer_range [{a}, {b}]")
        experts = tuple(s - has_base for s in members if not (has_base and s == 0))
        jobs = []
        for offset in range(count):
            t = offset / (count - 1) if count > 1 else 1.0
            keys = layers[members[0]][ranges[0][0] + offset]
            for s, (a, _) in zip(members[1:], ranges[1:]):
                if layers[s][a + offset] != keys:
                    raise InputError(f"{where}: layer {a + offset} of {sources[s].reference} has other tensors than "
                                     f"layer {ranges[0][0] + offset} of {sources[members[0]].reference}")
            for key in keys:
                inputs = tuple((s, key.format(a + offset)) for s, (a, _) in zip(members, ranges))
                jobs.append(TensorJob(key.format(out_layer), inputs, experts, t))
            out_layer += 1
        jobs_by_slice.append((members, experts, jobs))
    outside = [n for n in sources[jobs_by_slice[0][0][0]].ordered_names() if layer_index(n) is None]
    pre = [n for n in outside if any(p in n for p in _PRE)]
    post = [n for n in outside if n not in pre]

    def edge(names: list[str], members: list[int], experts: tuple[int, ...]) -> list[TensorJob]:
        for n in names:
            for s in members:
                if n not in sources[s].tensors:
                    raise InputError(f"{sources[s].reference} has no tensor '{n}'")
        return [TensorJob(n, tuple((s, n) for s in members), experts, 0.0) for n in names]

    first, last = jobs_by_slice[0], jobs_by_slice[-1]
    jobs = edge(pre, first[0], first[1]) + [j for _, _, js in jobs_by_slice for j in js] + edge(post, last[0], last[1])
    for job in jobs:
        shapes = {tuple(sources[s].tensors[n].shape) for s, n in job.inputs}
        floats = {sources[s].tensors[n].is_float for s, n in job.inputs}
        if len(shapes) > 1 or len(floats) > 1:
            raise InputError(f"output tensor '{job.name}': its inputs differ in shape or dtype kind "
                             f"({', '.join(f'{sources[s].reference}:{n}' for s, n in job.inputs)})")
    return jobs, out_layer
