"""Whole-model pre-passes: statistics a method needs from every tensor before merging any of them.

The engine streams every floating-point tensor through ``observe`` once per declared pass, calling
``end_pass`` after each; the merge pass then hands ``result_for(name)`` to the method as
``ctx.analysis``. Memory stays bounded because analyses keep histograms, not tensors.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from mergebench.core.merge_ops import keep_count

Tensor = torch.Tensor


class TensorAnalysis(Protocol):
    """A streaming whole-model pre-pass declared by a merge method."""

    passes: int

    def observe(self, pass_index: int, name: str, base: Tensor | None, experts: Sequence[Tensor]) -> None:
        """See one tensor's float32 inputs during pass ``pass_index``."""

    def end_pass(self, pass_index: int) -> None:
        """Called once after every tensor has been observed in pass ``pass_index``."""

    def result_for(self, name: str) -> Any:
        """What the merge of tensor ``name`` needs (becomes ``ctx.analysis``)."""


_HI_BINS = 1 << 15  # |x| as float32 bits has a zero sign bit: the high half is below 2**15
_LO_BINS = 1 << 16


class GlobalMagnitudeThreshold:
    """Exact top-k magnitude threshold of each task vector over the whole model (TIES ``trim_scope=global``).

    A radix select on the float32 bit patterns of |tau| (their integer order is their value order):
    pass 0 histograms the high 16 bits to find the bucket holding the k-th largest magnitude, pass 1
    histograms the low 16 bits inside that bucket to find the exact value, and counts per tensor how
    many entries equal it so that ties are kept first by (tensor name, flat index), as per-tensor
    trimming does. ``result_for`` returns, per expert, ``(threshold, ties_to_keep_in_this_tensor)``.
    """

    passes = 2

    def __init__(self, density: float, n_experts: int):
        self.density = density
        self.n = n_experts
        self.total = 0
        self.hi = torch.zeros(n_experts, _HI_BINS, dtype=torch.int64)
        self.lo = torch.zeros(n_experts, _LO_BINS, dtype=torch.int64)
        self.bucket: list[int] = []
        self.need_in_bucket: list[int] = []
        self.bucket_lows: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.threshold: list[float] = []
        self.low_wanted: list[int] = []
        self.ties: dict[str, list[int]] = {}

    @staticmethod
    def _bits(base: Tensor | None, expert: Tensor) -> Tensor:
        tau = expert if base is None else expert - base
        return tau.abs().reshape(-1).view(torch.int32)

    def observe(self, pass_index: int, name: str, base: Tensor | None, experts: Sequence[Tensor]) -> None:
        if pass_index == 0:
            self.total += experts[0].numel()
        lows = []
        for t, expert in enumerate(experts):
            bits = self._bits(base, expert)
            if pass_index == 0:
                self.hi[t] += torch.bincount(bits >> 16, minlength=_HI_BINS)
            else:
                in_bucket = bits[(bits >> 16) == self.bucket[t]] & 0xFFFF
                self.lo[t] += torch.bincount(in_bucket, minlength=_LO_BINS)
                lows.append(torch.unique(in_bucket, return_counts=True))
        if pass_index == 1:
            self.bucket_lows[name] = lows

    @staticmethod
    def _select(hist: Tensor, k: int) -> tuple[int, int]:
        """The bin holding the k-th largest entry (k >= 1) and how many of that bin's entries are needed."""
        above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) - hist  # entries in higher bins
        b = int(torch.nonzero((above < k) & (above + hist >= k))[-1])
        return b, k - int(above[b])

    def end_pass(self, pass_index: int) -> None:
        k = keep_count(self.density, self.total)
        if pass_index == 0:
            for t in range(self.n):
                b, need = self._select(self.hi[t], k) if 0 < k else (-1, 0)
                self.bucket.append(b)
                self.need_in_bucket.append(need)
            return
        remaining = []
        for t in range(self.n):
            if k == 0:
                self.threshold.append(float("inf"))
                self.low_wanted.append(-1)
                remaining.append(0)
                continue
            low, ties = self._select(self.lo[t], self.need_in_bucket[t])
            bits = torch.tensor([(self.bucket[t] << 16) | low], dtype=torch.int32)
            self.threshold.append(float(bits.view(torch.float32)))
            self.low_wanted.append(low)
            remaining.append(ties)
        for name in sorted(self.bucket_lows):  # ties go to the earliest tensors by name: order-independent
            per_expert = []
            for t, (values, counts) in enumerate(self.bucket_lows[name]):
                equal = int(counts[values == self.low_wanted[t]].sum())
                take = min(equal, remaining[t])
                remaining[t] -= take
                per_expert.append(take)
            self.ties[name] = per_expert
        self.bucket_lows.clear()

    def result_for(self, name: str) -> list[tuple[float, int]]:
        return list(zip(self.threshold, self.ties[name]))
