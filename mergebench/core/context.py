"""What a merge method's maths sees besides the tensors themselves."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch


def tensor_seed(seed: int, name: str, stream: int | str = 0) -> int:
    """A 63-bit seed from (global seed, tensor name, stream) only: independent of order, shards, threads."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def content_key(tensor: torch.Tensor) -> str:
    """An expert's identity for one tensor: a hash of its bytes as stored (dtype and values), so its random
    stream follows its content, not its position in the list (the same experts in any order give the same
    merge) nor its file layout (sharding)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()[:32]  # sha256: hardware-accelerated, ~1.8 GB/s here


@dataclass
class TensorContext:
    """Per-tensor context: the tensor's name, the expert weights, the seed and any pre-pass result.

    For an ``elementwise`` method the engine may call ``merge`` on consecutive flat chunks of the
    tensor: ``offset`` is the chunk's first element and ``state`` persists across the chunks of one
    tensor. Random draws must come from ``generator_for(expert)`` (one CPU stream per expert,
    consumed in order), so that any chunking gives the same numbers as one whole-tensor call. For a
    ``stochastic`` method, ``streams`` holds each expert's :func:`content_key` for this tensor and expert
    ``i``'s stream is keyed by it; without it (a method called directly), by the position ``i``.
    """

    name: str
    weights: tuple[float, ...]
    seed: int = 0
    analysis: Any = None  # what the method's pre-pass computed for this tensor
    # per expert, the calibration statistic the method asked for (``MergeMethod.calibration``) for this tensor
    # (e.g. the Gram matrix of a linear layer's inputs, a diagonal Fisher), or None where there is none
    statistics: tuple[Any, ...] | None = None
    offset: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    streams: tuple[str, ...] | None = None
    # per expert, the values of the parameters declared ``per_expert`` that the recipe set for that expert
    expert_params: tuple[Mapping[str, Any], ...] = ()
    _generators: dict[int, torch.Generator] = field(default_factory=dict, repr=False)

    def generator_for(self, stream: int) -> torch.Generator:
        """A CPU generator seeded from (seed, name, the expert's content key); draws stay on the CPU so devices
        agree."""
        if stream not in self._generators:
            g = torch.Generator(device="cpu")
            key = self.streams[stream] if self.streams is not None else stream
            g.manual_seed(tensor_seed(self.seed, self.name, key))
            self._generators[stream] = g
        return self._generators[stream]

    def expert_values(self, name: str, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """Each expert's value of per-expert parameter ``name``: its own when the recipe gave one, else
        ``params[name]`` (the method-level value)."""
        n = len(self.weights)
        own = self.expert_params or ({},) * n
        return tuple(p.get(name, params[name]) for p in own)

    @property
    def generator(self) -> torch.Generator:
        """The tensor's first random stream (``generator_for(0)``)."""
        return self.generator_for(0)
