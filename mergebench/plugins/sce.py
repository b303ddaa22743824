"""SCE (FuseChat): Select by variance, Calculate per-expert coefficients, Erase minority signs.

    tau_t  = theta_t - theta_0
    Select:    v = Var_t(tau_t) per entry (population variance across the N experts); keep the
               k = int(#{v != 0} * select_topk) entries of largest v in every tau_t, zero the others
               (select_topk >= 1 keeps everything; ties at the k-th value: lowest flat index first)
    Calculate: eta_t = mean(tau_t^2) / sum_s mean(tau_s^2)      (over the selected task vectors;
               1/N each when that sum is 0, or below ``uniform_below``)
    Erase:     s = +1 where sum_t tau_t >= 0, else -1 (unweighted sum); m_t = [sign(tau_t) = s]
               (zeroed entries never agree)
    theta  = theta_0 + sum_t eta_t m_t tau_t / max(sum_t eta_t m_t, 1e-6)

Not elementwise: the selection ranks the variances of the whole tensor and eta_t averages over it. Merged per
weight tensor, as mergekit and the authors do.

Conventions, and where others differ:
- mergekit's ``sce`` is the code the FuseChat authors merge with (their FuseO1 releases are mergekit ``sce``
  configs), so its conventions are ours, except one: when sum_s mean(tau_s^2) < 1e-6 that code gives every
  expert 1/N. The threshold is absolute, so it fires on ordinary fine-tunes (updates of ~1e-4 to 1e-3 per entry
  make mean squares of 1e-8 to 1e-6) and the paper's magnitude-based coefficients silently become a plain
  disjoint mean. ``uniform_below`` (default 0: the paper's eta, uniform only when every selected update is zero)
  switches; ``mergekit_defaults`` sets 1e-6.
- k counts the entries of non-zero variance, not all entries (mergekit and the authors' code); entries every
  expert moved alike are never selected.
- The sign is elected on the unweighted sum and a zero sum elects +1 (mergekit's ``get_mask``, method "sum");
  TIES in this package elects on the weighted sum and a zero sum elects nothing.
- The denominator is floored at 1e-6 (mergekit): it only matters where the agreeing experts carry less than
  1e-6 of the total coefficient, and shrinks those entries toward the base.
- No expert weights: eta_t replaces them (mergekit ignores ``weight``), so unequal weights are refused.
- mean(tau_t^2) is summed in fixed blocks (thread-count independent, ``merge_ops.ordered_dot``); it agrees
  with mergekit's ``mean`` to float32 rounding.
- mergekit's ``int8_mask`` only changes the dtype of its masks, not the numbers; it is not a parameter here.
"""

from __future__ import annotations

import torch

from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import magnitude_mask, mul_mask_, ordered_dot, spans, task_vectors_
from mergebench.core.registry import MergeMethod, Param
from mergebench.plugins.checks import unweighted_check

MERGEKIT_UNIFORM_BELOW = 1e-6
DENOMINATOR_FLOOR = 1e-6
_COLUMNS = 1 << 18  # entries per block of the elementwise work (the variance across experts, the erase)


def variance_across(taus: list[torch.Tensor]) -> torch.Tensor:
    """Per-entry population variance across experts: torch.var(stack(taus), dim=0, unbiased=False) bit for bit.

    torch.var runs Welford's update in float64 over the experts in order, one entry at a time (38x slower
    than elementwise ops); the same updates as float64 tensor ops on blocks of _COLUMNS entries give its
    values without stacking every expert's whole tensor."""
    flat = [t.reshape(-1) for t in taus]
    out = torch.empty_like(flat[0])
    for start, stop in spans(out.numel(), _COLUMNS):
        mean = torch.zeros(stop - start, dtype=torch.float64, device=out.device)
        m2 = torch.zeros_like(mean)
        for k, f in enumerate(flat, 1):
            x = f[start:stop].to(torch.float64, copy=True)  # a copy even of float64 input: x is overwritten
            delta = x - mean
            mean.add_(delta.div(k))  # mean += delta / k, rounded as torch's Welford step
            m2.add_(delta.mul_(x.sub_(mean)))  # m2 += delta * (x - new mean)
        out[start:stop] = m2.div_(len(flat))
    return out.view(taus[0].shape)


def select_(taus: list[torch.Tensor], select_topk: float) -> None:
    """Zero, in every task vector, the entries outside the top select_topk of non-zero variance across experts."""
    if select_topk >= 1:
        return
    if select_topk <= 0:
        for tau in taus:
            tau.zero_()
        return
    var = variance_across(taus)
    k = int(torch.count_nonzero(var) * select_topk)  # a float32 product truncated, exactly as mergekit
    keep = magnitude_mask(var, k, out=var)  # 1.0 / 0.0 in the variances' memory: no boolean copy beside it
    for tau in taus:
        mul_mask_(tau, keep)


def coefficients(taus: list[torch.Tensor], uniform_below: float) -> torch.Tensor:
    """eta_t = mean(tau_t^2) / sum_s mean(tau_s^2); 1/N each when the sum is 0 or below ``uniform_below``."""
    energy = torch.stack([ordered_dot(tau.reshape(-1), tau.reshape(-1)) / tau.numel() for tau in taus])
    total = float(energy.sum())
    if total == 0 or abs(total) < uniform_below:
        return torch.full_like(energy, 1.0 / len(taus))
    return energy / total


def sce(base, experts, params, ctx):
    """theta_0 + sum_t eta_t m_t tau_t / max(sum_t eta_t m_t, 1e-6)"""
    taus = task_vectors_(base, experts)
    select_(taus, params["select_topk"])
    eta = coefficients(taus, params["uniform_below"]).tolist()
    # elementwise from here: a block of _COLUMNS entries at a time, so no whole temporary beside the inputs
    out, flat = base.view(-1), [tau.reshape(-1) for tau in taus]
    for start, stop in spans(out.numel(), _COLUMNS):
        block = [f[start:stop] for f in flat]
        total = block[0].clone()
        for tau in block[1:]:
            total.add_(tau)
        positive = total >= 0  # the elected sign: +1 where the unweighted sum is >= 0
        numerator, denominator = total.zero_(), torch.zeros_like(total)
        for tau, w in zip(block, eta):
            agree = torch.where(positive, tau > 0, tau < 0)
            erased = agree.to(tau.dtype).mul_(w)  # eta_t where the expert agrees, else 0
            numerator.add_(tau.mul_(erased))
            denominator.add_(erased)
        out[start:stop].add_(numerator.div_(denominator.clamp_(min=DENOMINATOR_FLOOR)))
    return base


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="sce",
            description="Keep the entries the experts disagree on most, weigh experts by update size, drop minority signs.",
            reference="Wan et al., FuseChat: Knowledge Fusion of Chat Models, arXiv:2408.07990",
            params=(
                Param("select_topk", float, 1.0, "fraction of the non-zero-variance entries kept (1: all)",
                      min=0.0, max=1.0),
                Param("uniform_below", float, 0.0, "sum of the experts' mean squared updates below which they weigh "
                      "equally (mergekit: 1e-6)", min=0.0),
            ),
            merge=sce,
            check=unweighted_check("sce"),
            mergekit_defaults={"uniform_below": MERGEKIT_UNIFORM_BELOW},
            search_space={"select_topk": (0.1, 0.5, 1.0)},
        )
    )
