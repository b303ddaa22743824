"""Pre-passes: statistics a method needs from a whole tensor (or the whole model) before merging it.

The engine streams inputs through ``observe`` in flat chunks, in storage order, once per declared
pass, calling ``end_pass`` after each; the merge then gets ``result_for(name)`` as ``ctx.analysis``.
A method declares a per-tensor analysis (``MergeMethod.tensor_analysis``, run over the chunks of one
tensor just before it is merged) or a whole-model one (``MergeMethod.analysis``, run over every
floating-point tensor before any is merged). Analyses keep histograms, never tensors.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from mergebench.core.merge_ops import keep_count

Tensor = torch.Tensor


class TensorAnalysis(Protocol):
    """A streaming pre-pass declared by a merge method."""

    passes: int

    def observe(self, pass_index: int, name: str, base: Tensor | None, experts: Sequence[Tensor]) -> None:
        """See the next flat float32 chunk of tensor ``name`` during pass ``pass_index``."""

    def end_pass(self, pass_index: int) -> None:
        """Called once after every chunk has been observed in pass ``pass_index``."""

    def result_for(self, name: str) -> Any:
        """What the merge of tensor ``name`` needs (becomes ``ctx.analysis``)."""


_HI_BINS = 1 << 15  # |x| as float32 bits has a zero sign bit: the high half is below 2**15
_LO_BINS = 1 << 16


class MagnitudeThreshold:
    """Exact top-k magnitude threshold of each expert's task vector over the tensors it observes.

    k = round(density * number of entries observed). A radix select on the float32 bit patterns of
    |tau| (for non-negative floats, integer order is value order): pass 0 histograms the high 16
    bits to find the bucket that holds the k-th largest magnitude; pass 1 histograms the low 16 bits
    inside that bucket to find the exact value, and counts, per tensor, the entries equal to it, so
    that ties are kept first by (tensor name, flat index) whatever the chunking. Cost: two cheap
    streaming passes instead of a sort; memory: two histograms per expert.

    ``result_for(name)`` is, per expert, ``(threshold, ties)``: keep |tau| > threshold, plus the first
    ``ties`` entries of this tensor with |tau| == threshold. ``k`` overrides the count derived from
    ``density``.
    """

    passes = 2

    def __init__(self, density: float, n_experts: int, k: int | None = None):
        self.density = density
        self.k = k
        self.n = n_experts
        self.total = 0
        self.hi = torch.zeros(n_experts, _HI_BINS, dtype=torch.int64)
        self.lo = torch.zeros(n_experts, _LO_BINS, dtype=torch.int64)
        self.bucket: list[int] = []
        self.need_in_bucket: list[int] = []
        self.low_wanted: list[int] = []
        self.threshold: list[float] = []
        self.bucket_lows: dict[str, list[list[Tensor]]] = {}  # name -> per expert: low bits seen in the bucket
        self.ties: dict[str, list[int]] = {}

    def observe(self, pass_index: int, name: str, base: Tensor | None, experts: Sequence[Tensor]) -> None:
        if pass_index == 0:
            self.total += experts[0].numel()
        lows = self.bucket_lows.setdefault(name, [[] for _ in range(self.n)]) if pass_index == 1 else None
        for t, expert in enumerate(experts):
            magnitude = expert.abs() if base is None else (expert - base).abs_()
            bits = magnitude.reshape(-1).view(torch.int32)
            if pass_index == 0:
                self.hi[t] += torch.bincount(bits >> 16, minlength=_HI_BINS)[:_HI_BINS].cpu()
            elif self.bucket[t] >= 0:
                low = bits[(bits >> 16) == self.bucket[t]] & 0xFFFF
                if low.numel():
                    self.lo[t] += torch.bincount(low, minlength=_LO_BINS).cpu()
                    lows[t].append(low)

    @staticmethod
    def _select(hist: Tensor, k: int) -> tuple[int, int]:
        """The bin holding the k-th largest entry (k >= 1) and how many of that bin's entries are needed."""
        above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) - hist  # entries in higher bins
        b = int(torch.nonzero((above < k) & (above + hist >= k))[-1])
        return b, k - int(above[b])

    def end_pass(self, pass_index: int) -> None:
        k = self.k if self.k is not None else keep_count(self.density, self.total)
        if pass_index == 0:
            for t in range(self.n):
                b, need = self._select(self.hi[t], k) if k > 0 else (-1, 0)
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
            for t, chunks in enumerate(self.bucket_lows[name]):
                equal = sum(int((c == self.low_wanted[t]).sum()) for c in chunks)
                take = min(equal, remaining[t])
                remaining[t] -= take
                per_expert.append(take)
            self.ties[name] = per_expert
        self.bucket_lows.clear()

    def result_for(self, name: str) -> list[tuple[float, int]]:
        return list(zip(self.threshold, self.ties.get(name, [0] * self.n)))


def run_analysis(analysis: TensorAnalysis, name: str, base: Tensor | None, experts: Sequence[Tensor]) -> Any:
    """Run every pass of ``analysis`` over one whole tensor (one chunk) and return its result."""
    for p in range(analysis.passes):
        analysis.observe(p, name, None if base is None else base.reshape(-1), [e.reshape(-1) for e in experts])
        analysis.end_pass(p)
    return analysis.result_for(name)
