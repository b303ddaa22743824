"""Model Stock: move from the base toward the experts' mean by a ratio set by the angle between their task vectors.

    tau_t = theta_t - theta_0                         t = 1..N, N >= 2
    cos   = mean over pairs a < b of  <tau_a, tau_b> / max(|tau_a| |tau_b|, norm_floor),  clipped to [-1, 1]
    t     = N cos / (1 + (N - 1) cos)                 (t = 0, the base, where |1 + (N - 1) cos| < 1e-6)
    theta = t * (sum_t theta_t / N) + (1 - t) * theta_0

The angle is taken per weight tensor (the paper's "layer-wise" averaging, mergekit's default), or per row with
``filter_wise`` (norms and products over the last dimension, one t per row; a 1-D tensor is one row).
Not elementwise: every output entry depends on whole-tensor (or whole-row) norms.

Conventions, and where others differ:
- N > 2: the paper derives t for N experts at one common angle; with several pairs we (as mergekit) average the
  pairwise cosines.
- ``norm_floor``: mergekit divides by max(|tau_a| |tau_b|, 1e-6), which shrinks the cosine, hence t, wherever
  both task vectors are tiny (|tau_a| |tau_b| < 1e-6: rows of a few entries moved by ~1e-4, or updates of
  ~1e-6 as RL fine-tuning makes), pulling the merge toward the base. The paper's cosine has no floor: ours
  (default 0) is the exact cosine, 0 where a task vector is zero. ``mergekit_defaults`` sets 1e-6.
- The singular case |1 + (N - 1) cos| < 1e-6 (opposite updates, cos = -1/(N - 1)) keeps the base, as mergekit;
  the paper's formula diverges there.
- No expert weights: the paper and mergekit average the experts equally (mergekit ignores a ``weight``), so
  unequal weights are refused rather than silently dropped.
- The pairs' dot products and the norms come from one Gram matrix of the task vectors (``merge_ops.gram``: float32
  products by fixed blocks of 65536 entries, summed in float64), so the merge does not depend on torch's thread
  count and reads each task vector once, not once per pair; mergekit's ``sum`` per pair does depend on it, and the
  two agree to float32 rounding.
"""

from __future__ import annotations

import torch

from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import gram, one_thread
from mergebench.core.registry import MergeMethod, Param
from mergebench.plugins.checks import unweighted_check

MERGEKIT_NORM_FLOOR = 1e-6
SINGULAR = 1e-6  # |1 + (N - 1) cos| below this keeps the base, as mergekit


def model_stock(base, experts, params, ctx):
    """t * mean(theta_t) + (1 - t) * theta_0, t = N cos / (1 + (N - 1) cos)"""
    shape, n = base.shape, len(experts)
    if params["filter_wise"]:
        w0, ws = (base, experts) if base.dim() >= 2 else (base.reshape(1, -1), [e.reshape(1, -1) for e in experts])
    else:
        w0, ws = base.reshape(-1), [e.reshape(-1) for e in experts]
    average = ws[0].clone()  # sum(ws) / N over the experts' own values, as mergekit (not theta_0 + mean tau)
    for w in ws[1:]:
        average.add_(w)
    average.div_(n)
    offsets = [w.sub_(w0) for w in ws]
    with one_thread(base.device) as threads:
        products = gram(offsets, threads)  # float64 (..., n, n): every pair's <tau_a, tau_b>, the norms squared
    norms = products.diagonal(dim1=-2, dim2=-1).sqrt()
    a, b = torch.triu_indices(n, n, 1, device=products.device)
    floor = max(params["norm_floor"], torch.finfo(torch.float32).tiny)  # 0/0 (a zero task vector) gives cos 0
    cosines = (products[..., a, b] / (norms[..., a] * norms[..., b]).clamp(min=floor)).clamp(-1, 1)
    cos = cosines.mean(dim=-1).to(w0.dtype).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos),
                    (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    # t * average + (1 - t) * theta_0, each product rounded as mergekit's, in place in the scratch tensors
    return average.mul_(t).add_(w0.mul_(1 - t)).reshape(shape)


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="model_stock",
            description="Interpolate from the base toward the experts' mean by a ratio from their task vectors' angle.",
            reference="Jang et al., Model Stock: All we need is just a few fine-tuned models, arXiv:2403.19522",
            params=(
                Param("filter_wise", bool, False, "one ratio per row (last dimension) instead of per tensor"),
                Param("norm_floor", float, 0.0, "floor on |tau_a| |tau_b| in the cosine (mergekit: 1e-6)", min=0.0),
            ),
            merge=model_stock,
            check=unweighted_check("model_stock", min_experts=2),
            mergekit_defaults={"norm_floor": MERGEKIT_NORM_FLOOR},
            search_space={"filter_wise": (False, True)},
        )
    )
