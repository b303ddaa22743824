"""Shared merge maths, written once: task vectors, trimming, sign election, disjoint mean, drop-and-rescale,
exact L1 norms.

All helpers work on float32 tensors of one parameter name. Experts are passed as lists (not stacked)
so that memory stays at one tensor per input; helpers that say so work in place.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from mergebench.core.memory import return_free_heap

Tensor = torch.Tensor


def keep_count(density: float, numel: int) -> int:
    """How many elements a trim to ``density`` keeps: round(density * numel), halves rounded up."""
    return min(numel, max(0, int(density * numel + 0.5)))


def floor_count(fraction: float, numel: int) -> int:
    """int(fraction * numel) within [0, numel]: mergekit's count (Python's int() rounds towards zero)."""
    return min(numel, max(0, int(fraction * numel)))


def task_vectors_(base: Tensor, experts: Sequence[Tensor]) -> list[Tensor]:
    """tau_t = theta_t - theta_0, computed in place in the expert tensors (which the engine owns)."""
    return [e.sub_(base) for e in experts]


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Sum_t w_t * x_t, accumulated in a fixed order so the result is bit-identical on any thread count."""
    out = tensors[0] * weights[0]
    for x, w in zip(tensors[1:], weights[1:]):
        out.add_(x, alpha=w)
    return out


# Entries per block of a whole-tensor method's elementwise temporaries (4 MiB in float32): maths that needs
# whole tensors forms its temporaries a block at a time, so a merge stays near the engine's (N + 2) copies of
# the largest tensor instead of adding copies of it. Each module reads its own name (tests shrink it there).
BLOCK = 1 << 20
# Entries per chunk of an exact selection over a whole tensor (the radix select of ``MagnitudeThreshold`` run by a
# method, arcee_fusion's sample): a few temporaries per chunk, which glibc kept in an engine worker's arena at
# BLOCK (0.1B: arcee_fusion's anon peak 1.055 of the bound, 1.03 at 2**18).
SELECT_CHUNK = 1 << 18


def set_torch_threads(n: int) -> None:
    """torch's intra-op thread count for the calling thread (OpenMP's is per native thread). Queried first: without
    that, a fresh thread's first setting did not hold (measured: the engine's embedding, a worker's first job, ran on
    one thread where two were set)."""
    torch.get_num_threads()
    torch.set_num_threads(n)


@contextmanager
def one_thread(device: torch.device) -> Iterator[int]:
    """One CPU thread for torch's BLAS and LAPACK calls, whose rounding may depend on the thread count (a dot
    product's sum is split across threads). Yields how many threads the caller was given (1 on a GPU), for work
    split by task whose every part runs on one thread (:func:`ordered_map`)."""
    old = torch.get_num_threads()
    if device.type != "cpu" or old == 1:
        yield 1
        return
    torch.set_num_threads(1)
    try:
        yield old
    finally:
        torch.set_num_threads(old)


def ordered_map(fn: Callable[[Any], Any], items: list, threads: int) -> Iterator[Any]:
    """fn(item) for each item, yielded in order. With ``threads`` > 1, up to that many at once, each on one torch
    thread (LAPACK and BLAS run without the GIL): the same results as one thread, on more cores, with at most
    ``threads`` results computed ahead of the caller. The engine gives a tensor of the largest size every core;
    under :func:`one_thread`, per-task work uses them this way (TSV-M's decompositions, DELLA's drops)."""
    if threads <= 1:
        yield from map(fn, items)
        return

    def one(item):
        set_torch_threads(1)
        try:
            return fn(item)
        finally:
            return_free_heap()  # this thread's arena keeps its freed blocks resident otherwise

    with ThreadPoolExecutor(threads) as pool:
        window: deque[Future] = deque()
        for item in items:
            window.append(pool.submit(one, item))
            if len(window) == threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def release_(x: Tensor) -> None:
    """Free a scratch input's memory once the maths is done with it (:class:`~mergebench.core.registry.MergeFn`
    allows it): the tensor becomes empty, and its storage goes unless a view of it is still held."""
    x.set_()


def spans(numel: int, block: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive flat blocks of at most ``block`` entries."""
    return ((start, min(start + block, numel)) for start in range(0, numel, block))


def magnitude_mask(x: Tensor, k: int, out: Tensor | None = None) -> Tensor:
    """Boolean mask of the ``k`` largest |x|; ties at the threshold are broken by flat index (first wins).

    Uses the same exact selection as TIES trimming (:class:`~mergebench.core.analysis.MagnitudeThreshold`).
    With ``out`` (a floating tensor of x's shape, x itself allowed) the mask is written there as 1.0 / 0.0
    instead: no boolean tensor of x's size beside x.
    """
    from mergebench.core.analysis import MagnitudeThreshold, run_analysis  # analysis imports this module

    n = x.numel()
    if k >= n or k <= 0:
        return torch.full_like(x, k > 0, dtype=torch.bool) if out is None else out.fill_(float(k > 0))
    # by chunks, as the engine streams a tensor: |x| and its bits are a chunk's temporaries, not the tensor's
    ((threshold, ties),) = run_analysis(MagnitudeThreshold(0.0, 1, k=k), "x", None, [x], chunk=SELECT_CHUNK)
    flat = x.reshape(-1)
    mask = torch.empty(n, dtype=torch.bool, device=x.device) if out is None else out.view(-1)
    for start, stop in spans(n, BLOCK):
        mask[start:stop], used = threshold_mask(flat[start:stop], threshold, ties)  # the chunk is read first
        ties -= used
    return mask.view(x.shape)


def mul_mask_(x: Tensor, keep: Tensor) -> Tensor:
    """``x.mul_(keep)`` for a boolean ``keep``, bit for bit, by blocks: torch casts the other operand to x's dtype
    whole before multiplying, one more copy of x beside it (measured: 1.00 copies of a 24.6M-entry tensor). The
    mask's bytes are read as uint8 (the same 0 and 1), which casts in half the time: 2**18 entries 272 -> 119 us.
    A 1.0 / 0.0 mask of x's dtype (``magnitude_mask(..., out=)``) multiplies with no cast."""
    keep = keep.view(torch.uint8) if keep.dtype == torch.bool else keep
    if not x.is_contiguous() or keep.shape != x.shape:
        return x.mul_(keep)
    flat, kept = x.view(-1), keep.reshape(-1)
    for start, stop in spans(flat.numel(), BLOCK):
        flat[start:stop].mul_(kept[start:stop])
    return x


def threshold_mask(x: Tensor, threshold: float, ties: int) -> tuple[Tensor, int]:
    """Keep |x| > threshold, plus the first ``ties`` entries (by flat index) with |x| == threshold.

    Returns the mask and how many tied entries it kept, so a caller walking a tensor chunk by chunk
    can carry the remaining allowance to the next chunk.
    """
    a = x.abs().reshape(-1)
    mask = a > threshold
    used = 0
    if ties > 0:
        equal = (a == threshold).nonzero().reshape(-1)[:ties]
        mask[equal] = True
        used = equal.numel()
    return mask.view(x.shape), used


def random_keep_mask(numel: int, density: float | Tensor, generator: torch.Generator) -> Tensor:
    """Bernoulli(density) keep flags for ``numel`` entries, drawn on the CPU from ``generator``.

    Each 32-bit draw of the generator yields two 16-bit uniforms (half the work of one float per
    entry), so the keep probability is density rounded to a multiple of 1/65536 (0.2 -> 0.199997).
    Drawing a tensor in consecutive chunks of even length gives the same flags as one draw.
    ``density`` may also be a flat tensor of ``numel`` per-entry probabilities (same draws, one threshold each).
    """
    words = torch.randint(-(2**31), 2**31, ((numel + 1) // 2,), generator=generator, dtype=torch.int32)
    if isinstance(density, Tensor):  # int32 comparison: a threshold of 32768 (probability 1) keeps everything
        thresholds = torch.round(density.detach().to("cpu", torch.float32) * 65536).to(torch.int32) - 32768
        return words.view(torch.int16)[:numel].to(torch.int32) < thresholds
    threshold = round(density * 65536) - 32768
    if threshold > 32767:  # density 1 (or within 2^-17 of it): keep all; the draws above still advance the stream
        return torch.ones(numel, dtype=torch.bool)
    return words.view(torch.int16)[:numel] < threshold


def random_drop_(tau: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE's drop: zero each entry with probability 1 - density, in place (no rescaling)."""
    if density >= 1.0:
        return tau
    keep = random_keep_mask(tau.numel(), density, generator).view(tau.shape)
    return mul_mask_(tau, keep.to(tau.device))


def drop_and_rescale_(tau: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE: drop each entry with probability 1 - density, rescale survivors by 1/density, in place.

    The draws come from ``generator`` (one stream per expert and tensor), so the result does not
    depend on the device, the thread count, the chunking or the tensor order.
    """
    if density >= 1.0:
        return tau
    return random_drop_(tau, density, generator).div_(density)


def elect_sign(trimmed: Sequence[Tensor], weights: Sequence[float], zero_sum: str = "zero") -> Tensor:
    """TIES step 2: the elected sign per element, sign(sum_t w_t * tau_hat_t) in {-1, 0, +1}.

    ``zero_sum``: the sign elected where that sum is exactly 0: ``"zero"`` (TIES: no sign, so no expert
    agrees and the entry merges to 0) or ``"positive"`` (mergekit: +1 where the sum is >= 0).
    """
    total = weighted_sum(trimmed, weights)
    if zero_sum == "positive":
        return (total >= 0).to(total.dtype).mul_(2).sub_(1)
    return torch.sign(total)


def agreeing_sums(trimmed: Sequence[Tensor], weights: Sequence[float], sign: Tensor) -> tuple[Tensor, Tensor]:
    """sum_t w_t * tau_hat_t * [agree_t] and sum_t w_t * [agree_t], where expert t agrees when its entry is
    non-zero and has the elected ``sign``."""
    numerator = torch.zeros_like(sign)
    denominator = torch.zeros_like(sign)
    for tau, w in zip(trimmed, weights):
        agree = torch.sign(tau).mul_(sign).clamp_(min=0)  # 1 where non-zero with the elected sign, else 0
        numerator.addcmul_(tau, agree, value=w)
        denominator.add_(agree, alpha=w)
    return numerator, denominator


def disjoint_mean(trimmed: Sequence[Tensor], weights: Sequence[float], sign: Tensor) -> Tensor:
    """TIES step 3: weighted mean over experts whose entry is non-zero and agrees with ``sign`` (0 if none).

    sum_t w_t * tau_hat_t * [agree_t] / sum_t w_t * [agree_t]; with unit weights this is the plain mean
    over agreeing experts. Weights must be positive (sign election needs them so), hence a zero
    denominator means a zero numerator and the division can use a clamped denominator.
    """
    numerator, denominator = agreeing_sums(trimmed, weights, sign)
    return numerator.div_(denominator.clamp_(min=torch.finfo(denominator.dtype).tiny))


def ties_merge_(trimmed: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Sign election then disjoint mean over already-sparsified task vectors (shared by TIES and DARE-TIES)."""
    return disjoint_mean(trimmed, weights, elect_sign(trimmed, weights))


# 2**(150 - max(e, 1)): turns the sum of |x| over entries of exponent field e into mantissa units of 2**(e - 150)
_UNITS = [2.0 ** (150 - max(e, 1)) for e in range(256)]


class ExactL1:
    """A running sum |x| over float32 tensors (a streamed tensor's chunks), kept exactly per exponent.

    The total does not depend on the order of the entries nor on how a tensor is split into chunks: an L1
    norm accumulated over a streamed tensor equals the whole tensor's bit for bit. Within one exponent every
    |x| is a multiple of the same power of two and a block's sum stays below 2**53 of them, so each block's
    per-exponent float64 sum is exact (in any order); the blocks' sums are added as int64 mantissa counts
    (exact up to 2**39 entries), turned into one Python integer only when :meth:`steps` is asked for.
    """

    def __init__(self):
        self.per_exponent: Tensor | None = None  # both on the device of the first tensor added
        self.units: Tensor | None = None

    def _start(self, device: torch.device) -> None:
        if self.per_exponent is None:
            self.per_exponent = torch.zeros(256, dtype=torch.int64, device=device)
            self.units = torch.tensor(_UNITS * 2, dtype=torch.float64, device=device)  # per bin of 256 or 512

    def add(self, x: Tensor, kept: Tensor | None = None, subset: ExactL1 | None = None) -> ExactL1:
        """self += sum |x|; with ``kept`` (booleans of x's shape) also ``subset`` += sum |x| over the kept entries,
        both from one scatter into 512 bins (the dropped entries' exponents, then the kept ones')."""
        flat = x.detach().reshape(-1)
        keep = None if kept is None else kept.reshape(-1)
        self._start(x.device)
        if subset is not None:
            subset._start(x.device)
        bins = 256 if keep is None else 512
        units = self.units[:bins]
        for start, stop in spans(flat.numel(), BLOCK):  # blocks of at most 2**29 entries keep the float64 sums exact
            a = flat[start:stop].abs()
            magnitudes = a.double()
            index = a.view(torch.int32).bitwise_right_shift_(23)  # the exponent field, in a's memory
            if keep is not None:
                index.add_(keep[start:stop], alpha=256)  # a kept entry's bin is 256 further on
            # bincount adds in one pass (index_add_ measured 2x slower); exact sums in any order
            sums = torch.bincount(index, weights=magnitudes, minlength=bins)
            overflowed = sums[255::256] != 0  # Inf or NaN (a task vector that overflowed): count their mantissa bits
            counts = ((sums * units).long() if not bool(overflowed.any()) else
                      self._overflowed(sums, units, flat[start:stop].abs().view(torch.int32), index))
            if keep is None:
                self.per_exponent += counts
            else:
                self.per_exponent += counts[:256] + counts[256:]
                subset.per_exponent += counts[256:]
        return self

    @staticmethod
    def _overflowed(sums: Tensor, units: Tensor, bits: Tensor, index: Tensor) -> Tensor:
        """Mantissa counts per bin where the bins of exponent field 255 hold the entries' mantissa bits summed."""
        extra = torch.zeros_like(sums, dtype=torch.int64)
        for b in range(255, sums.numel(), 256):
            extra[b] = ((bits[index == b] & 0x7FFFFF) | (1 << 23)).long().sum()
        sums[255::256] = 0
        return (sums * units).long() + extra

    def steps(self) -> int:
        """The sum as an integer number of 2**-149 (float32's smallest step)."""
        # exponent field e > 0: mantissa * 2**(e - 150) = mantissa * 2**(e - 1) steps; e = 0 (subnormal): 1 step
        counts = [] if self.per_exponent is None else self.per_exponent.tolist()
        return sum(int(m) << (max(e, 1) - 1) for e, m in enumerate(counts) if m)


def exact_l1(x: Tensor) -> int:
    """sum |x| of a float32 tensor, exactly, as an integer number of 2**-149 (see :class:`ExactL1`)."""
    return ExactL1().add(x).steps()


L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescale when either norm is below this


def l1_rescale_factor(before: int, after: int) -> float:
    """The factor that gives a sparsified tensor its L1 norm back (mergekit's ``rescale``): before / after,
    or 1 when either norm (exact sums from :func:`exact_l1`) is below ``L1_EPS``, as mergekit does."""
    if math.ldexp(float(before), -149) < L1_EPS or math.ldexp(float(after), -149) < L1_EPS:
        return 1.0
    return before / after  # exact integers: a correctly rounded quotient


def ordered_sum(x: torch.Tensor, block: int = 1 << 12) -> torch.Tensor:
    """Sum over the last dimension, bit-identical on any torch thread count.

    torch splits one long reduction across its threads, so ``x.sum()`` rounds differently with 1 and 2 threads
    (and in-memory sweeps would disagree with the engine). Here every reduction is a row of at most ``block``
    entries, which one thread sums whole: blocks first, then the partial sums in order. (torch.norm is already
    thread-independent.)"""
    while x.shape[-1] > block:
        n = x.shape[-1]
        full = n - n % block
        parts = x[..., :full].reshape(*x.shape[:-1], full // block, block).sum(-1)
        if full < n:
            parts = torch.cat([parts, x[..., full:].sum(-1, keepdim=True)], dim=-1)
        x = parts
    return x.sum(-1)


def gram(vectors: Sequence[Tensor], threads: int = 1, block: int = 1 << 16, dtype: torch.dtype | None = None) -> Tensor:
    """Every pair's inner product over the last dimension, in float64: ``G[..., a, b] = <v_a, v_b>``.

    Each vector (as rows of its last dimension) is cut into blocks of about ``block`` entries, whole rows or pieces
    of one long row; a block of every vector goes into one buffer, whose products are one batched matrix product in
    the vectors' dtype, and the blocks' products are added in order in float64. Reading each vector once, not once
    per pair, is what makes it fast (model_stock's 28 dot products of 8 task vectors of 1.57M entries: 47 -> 12 ms);
    the fixed blocks, each on one thread, give the same bits on any thread count. With ``threads`` > 1 (inside
    :func:`one_thread`), the blocks are dealt out in turn to that many threads (:func:`ordered_map`). ``dtype``: the
    products' (default: the vectors'); float64 makes float32 vectors' products exact and their block sums float64's."""
    count, last = len(vectors), vectors[0].shape[-1] if vectors[0].dim() else 1
    if vectors[0].numel() == 0:
        return torch.zeros(*vectors[0].shape[:-1], count, count, dtype=torch.float64, device=vectors[0].device)
    flat = [v.reshape(-1, last) for v in vectors]
    rows, width = flat[0].shape[0], min(last, block)
    step = max(1, block // width)  # rows per block
    blocks = [(r, c) for r in range(0, rows, step) for c in range(0, last, width)]
    runs = [blocks[i::threads] for i in range(threads)]  # block j: run j % threads, item j // threads

    def products(run: list[tuple[int, int]]) -> list[Tensor]:
        buffer = torch.empty(min(step, rows), count, width, dtype=dtype or flat[0].dtype, device=flat[0].device)
        out = []
        for r, c in run:
            k, w = min(step, rows - r), min(width, last - c)
            x = buffer[:k, :, :w]
            for i, v in enumerate(flat):
                x[:, i].copy_(v[r:r + k, c:c + w])
            out.append(torch.bmm(x, x.transpose(1, 2)).double())
        return out

    total = torch.zeros(rows, count, count, dtype=torch.float64, device=flat[0].device)
    parts = list(ordered_map(products, runs, threads))
    for j, (r, _) in enumerate(blocks):  # in block order, whatever thread formed each
        g = parts[j % len(runs)][j // len(runs)]
        total[r:r + g.shape[0]] += g
    return total.reshape(*vectors[0].shape[:-1], count, count)


def ordered_dot(a: torch.Tensor, b: torch.Tensor, block: int = 1 << 12, chunk: int = 1 << 20) -> torch.Tensor:
    """``ordered_sum(a * b)`` bit for bit, without the whole product: products of about ``chunk`` entries
    (whole rows, or whole blocks of rows), of which only the first level of block sums is kept. The products go
    into one buffer: a fresh one per chunk is a fresh mapping from the allocator, whose page faults cost more than
    the products (model_stock's 28 dots of 8 task vectors of 24.6M entries: 0.3 s, 1.0-1.2 s when the heap was
    fragmented)."""
    if a.numel() <= chunk:
        return ordered_sum(a * b, block=block)
    n = a.shape[-1]
    a2, b2 = a.reshape(-1, n), b.reshape(-1, n)
    rows, step = a2.shape[0], max(1, chunk // n)
    width = n if n <= block else max(block, chunk // block * block)  # whole blocks, cut where ordered_sum cuts
    buffer = torch.empty(min(step, rows) * min(width, n), dtype=torch.result_type(a, b), device=a.device)

    def multiply(r: int, c: int) -> torch.Tensor:
        x, y = a2[r:r + step, c:c + width], b2[r:r + step, c:c + width]
        return torch.mul(x, y, out=buffer[:x.numel()].view(x.shape))

    if n <= block:  # each row is summed whole: a chunk of rows at a time
        sums = [multiply(r, 0).sum(-1) for r in range(0, rows, step)]
        return torch.cat(sums).reshape(a.shape[:-1])
    firsts = []
    for r in range(0, rows, step):
        parts = []
        for c in range(0, n, width):
            product = multiply(r, c)
            full = product.shape[1] - product.shape[1] % block
            parts.append(product[:, :full].reshape(product.shape[0], -1, block).sum(-1))
            if full < product.shape[1]:  # the rows' tails (only in their last columns)
                parts.append(product[:, full:].sum(-1, keepdim=True))
        firsts.append(torch.cat(parts, dim=1))
    return ordered_sum(torch.cat(firsts), block=block).reshape(a.shape[:-1])