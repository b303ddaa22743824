"""What a merge method's maths sees besides the tensors themselves."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from (global seed, tensor name) only: independent of order, shards, threads."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class TensorContext:
    """Per-tensor context: the tensor's name, the expert weights, the seed and any pre-pass result."""

    name: str
    weights: tuple[float, ...]
    seed: int = 0
    analysis: Any = None  # what the method's whole-model pre-pass computed for this tensor
    _generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def generator(self) -> torch.Generator:
        """A CPU generator seeded from (seed, name); random draws stay on the CPU so devices agree."""
        if self._generator is None:
            self._generator = torch.Generator(device="cpu")
            self._generator.manual_seed(tensor_seed(self.seed, self.name))
        return self._generator
