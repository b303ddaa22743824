"""RAM and RAM+ (tensor-local): average the entries several experts changed, keep whole those one expert changed.

    tau_t = theta_t - theta_0
    a_t   = |tau_t| > epsilon                          expert t changed the entry ("active")
    c     = sum_t a_t                                  how many experts changed it
    ram:         theta = theta_0 + sum_t a_t tau_t / max(c, 1)
                 unique entries (c = 1): that expert's update whole; shared (c >= 2): the mean of the active
                 updates; unchanged (c = 0): the base, even where some 0 < |tau_t| <= epsilon
    ramplus_tl:  as ram, but expert t's unique entries are scaled by
                 lambda_t = 1 + r * clip(O_t / max(U_t, epsilon), 0, alpha)
                 O_t, U_t = how many entries of this tensor t changed together with others, alone

``ram`` is elementwise. ``ramplus_tl`` counts O_t and U_t in a per-tensor pre-pass (one streaming pass) and is
then elementwise too.

Conventions, and where others differ:
- ``ram`` is the paper's RAM as its authors' code (xiangchi-yuan/mrl, ``arm``; threshold 1e-5) and mergekit
  compute it: the same maths, the same strict ``> epsilon``. Shared updates are divided by c before they are
  summed, as in mergekit, so the rounding matches too.
- RAM+ in the authors' code (``arm-r-v2``) counts O_t and U_t over the *whole model* and scales expert t's unique
  updates by 1 + (R - 1) * min(1, O_t / U_t) (their README: R = 1.2). mergekit's ``ramplus_tl`` ("tensor-local"),
  which this is, counts per tensor and writes the scale as 1 + r * clip(rho, 0, alpha) with defaults r = 0.1,
  alpha = 0.2, so lambda_t <= 1.02. r = R - 1 with alpha = 1 gives the authors' formula, per tensor. The
  whole-model variant is a different method, not registered here. U_t = 0 divides by epsilon (mergekit; the
  ratio then saturates at alpha, and there are no unique entries to scale), where the authors' code divides by
  zero.
- No expert weights (neither the paper nor mergekit has any), so unequal weights are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergebench.core.analysis import run_analysis
from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import task_vectors_
from mergebench.core.registry import MergeMethod, Param
from mergebench.plugins.checks import unweighted_check

EPSILON = Param("epsilon", float, 1e-5, "an entry counts as changed by an expert when |theta_t - theta_0| > epsilon",
                min=0.0)


def active_(taus: Sequence[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Zero the inactive entries of every task vector in place; return the active masks and the counts c."""
    active = [tau.abs() > epsilon for tau in taus]
    count = torch.zeros_like(taus[0])
    for tau, a in zip(taus, active):
        tau.mul_(a)
        count.add_(a)
    return active, count


def ram(base, experts, params, ctx):
    """theta_0 + sum_t a_t tau_t / max(c, 1)"""
    taus = task_vectors_(base, experts)
    _, count = active_(taus, params["epsilon"])
    count.clamp_(min=1)
    total = taus[0].div_(count)
    for tau in taus[1:]:
        total.add_(tau.div_(count))
    return base.add_(total)


class OverlapCounts:
    """Per expert, over one tensor's chunks: entries it changed together with another expert (O_t) and alone (U_t)."""

    passes = 1

    def __init__(self, epsilon: float, n_experts: int):
        self.epsilon = epsilon
        self.shared = [0] * n_experts
        self.unique = [0] * n_experts

    def observe(self, pass_index, name, base, experts):
        active = [(e - base).abs_() > self.epsilon for e in experts]
        count = torch.zeros_like(active[0], dtype=torch.int32)
        for a in active:
            count.add_(a)
        alone, together = count == 1, count > 1
        for t, a in enumerate(active):
            self.shared[t] += int((a & together).sum())
            self.unique[t] += int((a & alone).sum())

    def end_pass(self, pass_index):
        pass

    def result_for(self, name):
        return self.shared, self.unique


def unique_scales(shared: Sequence[int], unique: Sequence[int], r: float, alpha: float, epsilon: float) -> list[float]:
    """lambda_t = 1 + r * clip(O_t / max(U_t, epsilon), 0, alpha), in float32 as mergekit computes it."""
    rho = torch.tensor(shared, dtype=torch.float32) / torch.tensor(unique, dtype=torch.float32).clamp(min=epsilon)
    return (1 + r * rho.clamp(min=0, max=alpha)).tolist()


def overlap_counts(params, ctx):
    return OverlapCounts(params["epsilon"], len(ctx.weights))


def ramplus_tl(base, experts, params, ctx):
    """theta_0 + sum_t a_t tau_t * (lambda_t where c = 1, 1 / c where c >= 2)"""
    eps = params["epsilon"]
    if ctx.analysis is None:  # called on a whole tensor without the engine's pre-pass
        ctx.analysis = run_analysis(OverlapCounts(eps, len(experts)), ctx.name, base, experts)
    scales = unique_scales(*ctx.analysis, params["r"], params["alpha"], eps)
    taus = task_vectors_(base, experts)
    _, count = active_(taus, eps)
    alone = count == 1
    count.clamp_(min=1)
    total = None
    for tau, scale in zip(taus, scales):
        scaled = tau * scale
        term = torch.where(alone, scaled, tau.div_(count))
        total = term if total is None else total.add_(term)
    return base.add_(total)


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="ram",
            description="Average the updates several experts made to an entry; keep an update one expert made alone.",
            reference="Yuan et al., Behavior Knowledge Merge in Reinforced Agentic Models (RAM), arXiv:2601.13572",
            params=(EPSILON,),
            merge=ram,
            check=unweighted_check("ram"),
            elementwise=True,
            search_space={"epsilon": (1e-6, 1e-5, 1e-4)},
        )
    )
    register(
        MergeMethod(
            name="ramplus_tl",
            description="RAM, with each expert's unique updates scaled up by its tensor's shared-to-unique ratio.",
            reference="Yuan et al., Behavior Knowledge Merge in Reinforced Agentic Models (RAM+), arXiv:2601.13572; "
                      "tensor-local form from mergekit",
            params=(
                Param("r", float, 0.1, "strength of the unique-update scaling (the paper's R - 1)", min=0.0),
                Param("alpha", float, 0.2, "cap on the shared-to-unique ratio", min=0.0),
                EPSILON,
            ),
            merge=ramplus_tl,
            check=unweighted_check("ramplus_tl"),
            elementwise=True,
            tensor_analysis=overlap_counts,
            search_space={"r": (0.05, 0.1, 0.2), "alpha": (0.2, 1.0)},
        )
    )
