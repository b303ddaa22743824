"""Pre-passes: statistics a method needs from a whole tensor (or the whole model) before merging it.

The engine streams inputs through ``observe`` in flat chunks, in storage order, once per declared
pass, calling ``end_pass`` after each; the merge then gets ``result_for(name)`` as ``ctx.analysis``.
A method declares a per-tensor analysis (``MergeMethod.tensor_analysis``, run over the chunks of one
tensor just before it is merged) or a whole-model one (``MergeMethod.analysis``, run over every
floating-point tensor before any is merged). Analyses keep histograms, never tensors.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any, Callable, Protocol, Sequence

import torch

from mergebench.core.merge_ops import ExactL1, keep_count, l1_rescale_factor

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


class _BucketLows:
    """The low 16 bits of one tensor's entries in an expert's selected bucket, for counting those equal to the
    threshold once it is known: the values themselves (int32) while they take less memory than a histogram of
    int64 bins, then the histogram (a bf16 model's task vectors take few distinct values, so a bucket may hold a
    tenth of a tensor)."""

    def __init__(self) -> None:
        self.values: list[Tensor] = []
        self.size = 0
        self.hist: Tensor | None = None

    def add(self, low: Tensor, hist: Tensor) -> None:
        """``low``: the chunk's low bits in the bucket; ``hist``: their histogram (on the CPU)."""
        if self.hist is not None:
            self.hist += hist
            return
        self.values.append(low)
        self.size += low.numel()
        if self.size > 2 * _LO_BINS:
            self.hist = torch.bincount(torch.cat(self.values), minlength=_LO_BINS).cpu()
            self.values.clear()

    def count(self, low: int) -> int:
        """Entries whose low bits are ``low``."""
        if self.hist is not None:
            return int(self.hist[low])
        return sum(int((v == low).sum()) for v in self.values)


class MagnitudeThreshold:
    """Exact top-k magnitude threshold of each expert's task vector over the tensors it observes.

    k = round(density * number of entries observed). A radix select on the float32 bit patterns of
    |tau| (for non-negative floats, integer order is value order): pass 0 histograms the high 16
    bits to find the bucket that holds the k-th largest magnitude; pass 1 histograms the low 16 bits
    inside that bucket to find the exact value, and counts, per tensor, the entries equal to it, so
    that ties are kept first by (tensor name, flat index) whatever the chunking. Cost: two cheap
    streaming passes instead of a sort; memory: two histograms per expert.

    ``result_for(name)`` is, per expert, ``(threshold, ties)``: keep |tau| > threshold, plus the first
    ``ties`` entries of this tensor with |tau| == threshold. ``density`` is one value or one per
    expert; ``k`` overrides the count derived from it, and ``counts(entries observed)`` (one k per
    expert) overrides both.
    """

    passes = 2

    def __init__(self, density: float | Sequence[float], n_experts: int, k: int | None = None, *,
                 counts: Callable[[int], Sequence[int]] | None = None):
        self.density = density
        self.k = k
        self.n = n_experts
        self.counts = counts
        self.total = 0
        self.hi: list[Tensor | int] = [0] * n_experts  # per expert, histograms (0 until a chunk is seen)
        self.lo: list[Tensor | int] = [0] * n_experts
        self.bucket: list[int] = []
        self.need_in_bucket: list[int] = []
        self.low_wanted: list[int] = []
        self.threshold: list[float] = []
        self.bucket_lows: dict[str, list[_BucketLows]] = {}  # name -> per expert: low bits seen in the bucket
        self.ties: dict[str, list[int]] = {}

    def observe(self, pass_index: int, name: str, base: Tensor | None, experts: Sequence[Tensor]) -> None:
        if pass_index == 0:
            self.total += experts[0].numel()
        lows = self.bucket_lows.setdefault(name, [_BucketLows() for _ in range(self.n)]) if pass_index == 1 else None
        for t, expert in enumerate(experts):
            magnitude = expert.abs() if base is None else (expert - base).abs_()
            bits = magnitude.reshape(-1).view(torch.int32)
            if pass_index == 0:
                self.hi[t] = self.hi[t] + torch.bincount(bits >> 16, minlength=_HI_BINS)[:_HI_BINS].cpu()
            elif self.bucket[t] >= 0:
                low = bits[(bits >> 16) == self.bucket[t]] & 0xFFFF
                if low.numel():
                    hist = torch.bincount(low, minlength=_LO_BINS).cpu()
                    self.lo[t] = self.lo[t] + hist
                    lows[t].add(low, hist)

    @staticmethod
    def _select(hist: Tensor, k: int) -> tuple[int, int]:
        """The bin holding the k-th largest entry (k >= 1) and how many of that bin's entries are needed."""
        upto = torch.cumsum(hist, 0)  # entries in this bin and the lower ones
        total = int(upto[-1])
        # the k-th largest lies in the first bin with more than total - k entries up to it
        b = int(torch.searchsorted(upto, torch.tensor([total - k], dtype=upto.dtype), right=True))
        return b, k - (total - int(upto[b]))

    def _ks(self) -> list[int]:
        """Entries to keep, per expert."""
        if self.counts is not None:
            return [min(self.total, max(0, int(k))) for k in self.counts(self.total)]
        if self.k is not None:
            return [self.k] * self.n
        densities = self.density if isinstance(self.density, Sequence) else [self.density] * self.n
        return [keep_count(d, self.total) for d in densities]

    def end_pass(self, pass_index: int) -> None:
        ks = self._ks()
        if pass_index == 0:
            for t in range(self.n):
                b, need = self._select(self.hi[t], ks[t]) if ks[t] > 0 else (-1, 0)
                self.bucket.append(b)
                self.need_in_bucket.append(need)
            return
        remaining = []
        for t in range(self.n):
            if ks[t] == 0:
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
            for t, lows in enumerate(self.bucket_lows[name]):
                equal = lows.count(self.low_wanted[t])
                take = min(equal, remaining[t])
                remaining[t] -= take
                per_expert.append(take)
            self.ties[name] = per_expert
        self.bucket_lows.clear()

    def result_for(self, name: str) -> list[tuple[float, int]]:
        return list(zip(self.threshold, self.ties.get(name, [0] * self.n)))


class Combined:
    """Several pre-passes streamed together (each sees the passes it declares); the result is the tuple of
    their results."""

    def __init__(self, *parts: TensorAnalysis):
        self.parts = parts
        self.passes = max(p.passes for p in parts)

    def observe(self, pass_index: int, name: str, base: Tensor | None, experts: Sequence[Tensor]) -> None:
        for part in self.parts:
            if pass_index < part.passes:
                part.observe(pass_index, name, base, experts)

    def end_pass(self, pass_index: int) -> None:
        for part in self.parts:
            if pass_index < part.passes:
                part.end_pass(pass_index)

    def result_for(self, name: str) -> tuple:
        return tuple(part.result_for(name) for part in self.parts)


class DrawnMask:
    """One expert's flat keep mask for a tensor as a random sparsifier drew it in the pre-pass, chunk by chunk. A
    span of the merge that is one drawn chunk (the engine chunks both passes alike) is that chunk: the mask is never
    joined into a copy (8 experts' masks of a 24.6M-entry tensor are 197 MB)."""

    def __init__(self, chunks: list[Tensor]):
        self.chunks = chunks
        self.starts = list(accumulate((c.numel() for c in chunks), initial=0))

    def span(self, offset: int, n: int) -> Tensor:
        """The flags of entries offset .. offset + n."""
        i = min(bisect_right(self.starts, offset), len(self.chunks)) - 1  # (an empty tensor: its one empty chunk)
        if self.starts[i] == offset and self.chunks[i].numel() == n:
            return self.chunks[i]
        joined = torch.cat(self.chunks[i:max(bisect_left(self.starts, offset + n), i + 1)])
        return joined[offset - self.starts[i]:offset - self.starts[i] + n]


@dataclass(frozen=True)
class L1Rescale:
    """:class:`L1RescalePass`'s result: the wrapped pre-pass's result (None without one) and, per expert, the
    factor that gives its sparsified task vector back the L1 norm it had before. ``masks``: per expert, the
    keep mask a random sparsifier drew for the whole tensor in the pre-pass (None where it drew none), so
    that the merge applies the very same draws without drawing them again."""

    inner: Any
    factors: tuple[float, ...]
    masks: tuple[DrawnMask | None, ...] | None = None


RECORD_MASKS = "record_masks"  # the pre-pass context's state key under which a random sparsifier keeps its draws


class L1RescalePass:
    """Each expert's exact L1 norm of its task vector before and after sparsification, over one tensor.

    Runs ``inner``'s passes (e.g. the magnitude thresholds the sparsifier needs), then one more pass that
    sparsifies every chunk with ``sparsify_(taus, ctx)`` on a copy of the tensor's context ``ctx`` (its
    ``analysis`` set to ``inner``'s result, fresh ``state`` and fresh random streams) and sums |tau| before
    and after with :class:`~mergebench.core.merge_ops.ExactL1`: the factors are independent of the chunking.
    ``sparsify_`` must keep each entry as it is or zero it (the random and magnitude sparsifiers do; MagPrune's
    division does not, and della takes no L1 pre-pass), so "after" is "before" over the entries still non-zero,
    and both come from one scatter per expert.
    A sparsifier that draws random masks (``draws``) appends each chunk's to ``ctx.state[RECORD_MASKS][expert]``
    and leaves the task vectors as they are (the pass reads the kept entries from the masks: no copy of |tau|, no
    product, no comparison; an expert with nothing drawn keeps everything); the masks
    are kept (one byte per entry and expert, less than the (N + 2) float32 copies the engine's bound allows)
    and handed to the merge, since drawing them is most of a random sparsifier's time.
    """

    def __init__(self, inner: TensorAnalysis | None, n_experts: int,
                 sparsify_: Callable[[list[Tensor], Any], None], ctx: Any, draws: bool = False):
        self.inner = inner
        self.sparsify_ = sparsify_
        self.draws = draws
        self.ctx = ctx
        self.passes = (inner.passes if inner is not None else 0) + 1
        self.before = [ExactL1() for _ in range(n_experts)]
        self.after = [ExactL1() for _ in range(n_experts)]
        self.shadow = None
        self.result: L1Rescale | None = None

    def observe(self, pass_index: int, name: str, base: Tensor | None, experts: Sequence[Tensor]) -> None:
        if pass_index < self.passes - 1:
            self.inner.observe(pass_index, name, base, experts)
            return
        if self.shadow is None:
            analysis = self.inner.result_for(name) if self.inner is not None else None
            self.shadow = replace(self.ctx, analysis=analysis, offset=0, state={RECORD_MASKS: [[] for _ in experts]},
                                  _generators={})
        taus = [e - base for e in experts]
        if self.draws:  # the sparsifier only records its draws here: the kept entries are a recorded mask's
            recorded = self.shadow.state[RECORD_MASKS]
            drawn = [len(masks) for masks in recorded]
            self.sparsify_(taus, self.shadow)
            for t, tau in enumerate(taus):
                kept = recorded[t][-1] if len(recorded[t]) > drawn[t] else torch.ones(tau.numel(), dtype=torch.bool)
                self.before[t].add(tau, kept=kept.to(tau.device), subset=self.after[t])
            return
        magnitudes = [tau.abs() for tau in taus]
        self.sparsify_(taus, self.shadow)
        for t, (magnitude, tau) in enumerate(zip(magnitudes, taus)):
            # a sparsifier keeps an entry as it is or zeroes it, so "after" sums the kept entries of "before"
            self.before[t].add(magnitude, kept=tau != 0, subset=self.after[t])

    def end_pass(self, pass_index: int) -> None:
        if pass_index < self.passes - 1:
            self.inner.end_pass(pass_index)

    def result_for(self, name: str) -> L1Rescale:
        if self.result is None:
            factors = tuple(l1_rescale_factor(b.steps(), a.steps()) for b, a in zip(self.before, self.after))
            if self.shadow is None:
                return L1Rescale(None, factors)
            drawn = self.shadow.state.pop(RECORD_MASKS)  # the chunks' masks
            masks = tuple(DrawnMask(chunks) if chunks else None for chunks in drawn) if any(drawn) else None
            self.result = L1Rescale(self.shadow.analysis, factors, masks)
        return self.result


def run_analysis(analysis: TensorAnalysis, name: str, base: Tensor | None, experts: Sequence[Tensor],
                 chunk: int | None = None) -> Any:
    """Run every pass of ``analysis`` over one whole tensor (one chunk, or chunks of ``chunk`` entries, whose
    temporaries are then a chunk's) and return its result."""
    flat_base = None if base is None else base.reshape(-1)
    flat = [e.reshape(-1) for e in experts]
    n = flat[0].numel()
    step = chunk or max(n, 1)
    for p in range(analysis.passes):
        for start in range(0, max(n, 1), step):
            analysis.observe(p, name, None if flat_base is None else flat_base[start:start + step],
                             [e[start:start + step] for e in flat])
        analysis.end_pass(p)
    return analysis.result_for(name)
