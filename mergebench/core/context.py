"""What a merge method's maths sees besides the tensors themselves."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch


def tensor_seed(seed: int, name: str, stream: int = 0) -> int:
    """A 63-bit seed from (global seed, tensor name, stream) only: independent of order, shards, threads."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class TensorContext:
    """Per-tensor context: the tensor's name, the expert weights, the seed and any pre-pass result.

    For an ``elementwise`` method the engine may call ``merge`` on consecutive flat chunks of the
    tensor: ``offset`` is the chunk's first element and ``state`` persists across the chunks of one
    tensor. Random draws must come from ``generator_for(expert)`` (one CPU stream per expert,
    consumed in order), so that any chunking gives the same numbers as one whole-tensor call.
    """

    name: str
    weights: tuple[float, ...]
    seed: int = 0
    analysis: Any = None  # what the method's pre-pass computed for this tensor
    offset: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    _generators: dict[int, torch.Generator] = field(default_factory=dict, repr=False)

    def generator_for(self, stream: int) -> torch.Generator:
        """A CPU generator seeded from (seed, name, stream); draws stay on the CPU so devices agree."""
        if stream not in self._generators:
            g = torch.Generator(device="cpu")
            g.manual_seed(tensor_seed(self.seed, self.name, stream))
            self._generators[stream] = g
        return self._generators[stream]

    @property
    def generator(self) -> torch.Generator:
        """The tensor's first random stream (``generator_for(0)``)."""
        return self.generator_for(0)
