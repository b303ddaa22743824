"""Arcee Fusion: take the expert's update only where its importance is an outlier (above median + 1.5 IQR).

    tau   = theta_1 - theta_0                           one expert, the other model is the base
    p, q  = softmax(theta_1) + 1e-8, softmax(theta_0) + 1e-8     over the last dimension (a 1-D tensor is one row)
    kl    = sum_j p_j log(p_j / q_j)                    one value per row
    s     = |tau| * kl                                  importance, per entry
    Q1, M, Q3 = s_(floor(q (n - 1))) for q = 1/4, 1/2, 3/4: entries of that rank in the sorted s (n = numel)
    theta = theta_0 + tau * [s >= M + 1.5 (Q3 - Q1)]

Not elementwise: the softmaxes are per row and the threshold comes from quantiles of the whole tensor. The
softmaxes go by blocks of rows and the quantiles by an exact radix select over chunks (kthvalue's values), so
the merge holds the scores beside its inputs and no other whole temporary.

Conventions (there is no paper: mergekit's implementation, by Arcee, is the original):
- Quantiles are the lower nearest rank floor(q (n - 1)) of the sorted scores, not interpolated (numpy's or
  torch.quantile's default), as mergekit. We compute the rank with integers; mergekit multiplies in float32,
  which agrees whenever n <= 2**24 (always when it samples, below).
- ``quantile_sample``: for tensors of more than 1,000,000 entries mergekit estimates the three quantiles from
  1,000,000 entries drawn with replacement from torch's global generator, so its output there is random
  (unseeded unless --random-seed is given) and cannot be reproduced bit for bit. We compute the quantiles
  exactly by default (``quantile_sample: 0``; three linear-time selections over the tensor): the merge is then
  deterministic, independent of the seed, and equal to what mergekit's sample estimates (the sampled
  quartiles sit within a few 1e-4 of the exact ones in rank). ``quantile_sample: S`` reproduces mergekit's
  estimator on tensors of more than S entries (``mergekit_defaults``: S = 1,000,000), drawing from the
  expert's random stream (``ctx.generator_for(0)``); that is why the method is declared stochastic, with
  ``random_when`` saying that only ``quantile_sample`` > 0 draws (the card and a study's ``draws`` go by it).
  Below S entries both agree with mergekit to float32 rounding.
- The threshold is inclusive (>=), as mergekit: where more than three quarters of the scores are equal (say 0,
  rows the expert left unchanged), Q1 = M = Q3 and every entry at or above that value takes the expert's update.
- Kept entries are theta_0 + (theta_1 - theta_0), which may differ from theta_1 in the last bit, as mergekit's.
- The expert's weight is unused (one expert).
"""

from __future__ import annotations

import torch

from mergebench.core.analysis import MagnitudeThreshold, run_analysis
from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import BLOCK, SELECT_CHUNK, ordered_sum, spans
from mergebench.core.registry import MergeMethod, Param
from mergebench.plugins.checks import unweighted_check

SOFTMAX_EPS = 1e-8
MERGEKIT_QUANTILE_SAMPLE = 1_000_000


def importance(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|theta_1 - theta_0| * KL(softmax(theta_1) || softmax(theta_0)) per row, with the 1e-8 offsets of mergekit;
    by blocks of whole rows (each row's maths is its own), so p and q are a block's temporaries, in two buffers
    that every block reuses (fresh ones per block were kept by glibc in the engine worker's arena)."""
    lined = expert.reshape(1, -1) if expert.dim() < 2 else expert
    rows = lined.reshape(-1, lined.shape[-1])
    bases = base.reshape(rows.shape)
    scores = torch.empty_like(rows)
    step = max(1, BLOCK // max(rows.shape[1], 1))
    p_buffer = torch.empty(min(step, rows.shape[0]), rows.shape[1], dtype=rows.dtype, device=rows.device)
    q_buffer = torch.empty_like(p_buffer)
    for r in range(0, rows.shape[0], step):
        e, b = rows[r:r + step], bases[r:r + step]
        p = torch.softmax(e, -1, out=p_buffer[:len(e)]).add_(SOFTMAX_EPS)  # F.softmax's kernel
        q = torch.softmax(b, -1, out=q_buffer[:len(e)]).add_(SOFTMAX_EPS)
        kl = ordered_sum(torch.div(p, q, out=q).log_().mul_(p)).unsqueeze(-1)
        scores[r:r + step] = torch.sub(e, b, out=p).abs_().mul_(kl)
    return scores.view(expert.shape)


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a flat float32 tensor: ``torch.kthvalue``'s value. For non-negative
    entries by the exact radix select of TIES' trimming, over chunks (kthvalue copies the tensor and an int64
    index of it); kthvalue itself where an entry is negative or NaN (a rounding below 0 of a KL near 0)."""
    if flat.numel() and bool(flat.min() >= 0):  # min is NaN where any entry is; no boolean tensor of flat's size
        analysis = MagnitudeThreshold(0.0, 1, k=flat.numel() - k + 1)  # the (n - k + 1)-th largest
        ((threshold, _),) = run_analysis(analysis, "scores", None, [flat], chunk=SELECT_CHUNK)
        return torch.tensor(threshold, dtype=flat.dtype, device=flat.device)
    return torch.kthvalue(flat, k).values


def outlier_threshold(scores: torch.Tensor, sample: int, generator: torch.Generator | None) -> torch.Tensor:
    """M + 1.5 (Q3 - Q1) of ``scores`` (lower nearest-rank quartiles); from ``sample`` entries drawn with replacement
    when sample > 0 and the tensor has more entries than that."""
    flat = scores.reshape(-1)
    if 0 < sample < flat.numel():
        # drawn and gathered by pieces, so the sample's int64 indices are never held whole beside it: the same
        # draws as one call (the CPU generator's stream is consumed entry by entry)
        picked = torch.empty(sample, dtype=flat.dtype, device=flat.device)
        for start, stop in spans(sample, SELECT_CHUNK):
            picked[start:stop] = flat[torch.randint(flat.numel(), (stop - start,), generator=generator).to(flat.device)]
        flat = picked
    last = flat.numel() - 1
    q1, median, q3 = (kth_smallest(flat, rank + 1) for rank in (last // 4, last // 2, 3 * last // 4))
    return median + 1.5 * (q3 - q1)


def arcee_fusion(base, experts, params, ctx):
    """theta_0 + tau * [|tau| kl >= median + 1.5 IQR]"""
    (expert,) = experts
    scores = importance(expert, base)
    sample = params["quantile_sample"]
    # the mask as 1.0 / 0.0 in the scores' own memory: a boolean one would be cast whole beside it to multiply
    keep = scores.ge_(outlier_threshold(scores, sample, ctx.generator_for(0) if sample else None))
    return base.add_(expert.sub_(base).mul_(keep))


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="arcee_fusion",
            description="Take the expert's update where its importance (|update| x row KL) is an outlier.",
            reference="Arcee AI, mergekit https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/"
                      "arcee_fusion.py",
            params=(
                Param("quantile_sample", int, 0, "estimate the quartiles from this many random entries on larger "
                      "tensors (0: exact; mergekit: 1000000)", min=0),
            ),
            merge=arcee_fusion,
            check=unweighted_check("arcee_fusion", min_experts=1, max_experts=1),
            stochastic=True,
            random_when=lambda params, expert_params: params["quantile_sample"] > 0,
            mergekit_defaults={"quantile_sample": MERGEKIT_QUANTILE_SAMPLE},
        )
    )
