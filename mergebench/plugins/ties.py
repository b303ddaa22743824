"""TIES-Merging: trim, elect sign, disjoint merge.

    tau_t  = theta_t - theta_0
    tau^_t = tau_t keeping its k = round(density * numel) largest magnitudes (ties: lowest flat index)
    s      = sign(sum_t w_t * tau^_t)                              elected per element
    tau_m  = sum_t w_t tau^_t [tau^_t != 0, sign(tau^_t) = s] / sum_t w_t [same]   (0 where none agree)
    theta  = theta_0 + lambda * tau_m

Conventions, and where others differ:
- The sign is elected on the *weighted, trimmed* task vectors. mergekit (``consensus_method: sum``)
  does the same; peft's ``ties`` (``majority_sign_method="total"``) too.
- The disjoint mean divides by the summed weights of the agreeing experts: mergekit with
  ``normalize: true`` does the same; peft divides by the *count* of agreeing experts after weighting,
  which differs unless all weights are 1.
- ``trim_scope=tensor`` (default) trims each tensor on its own, as mergekit and peft do (both keep
  ``int(density * numel)``, i.e. round down, and break ties at the threshold arbitrarily; we round
  half up and break ties by index, so results can differ in at most a handful of entries per tensor).
  ``trim_scope=global`` trims over the whole task vector, as the original TIES paper does.
- Either way the k-th largest magnitude is found exactly by a streaming radix select
  (:class:`~mergebench.core.analysis.MagnitudeThreshold`): two histogram passes, no sort, no copy.
"""

from __future__ import annotations

from mergebench.core.analysis import MagnitudeThreshold, run_analysis
from mergebench.core.errors import ParameterError
from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import task_vectors_, threshold_mask, ties_merge_
from mergebench.core.registry import MergeMethod, Param
from mergebench.plugins import LAMBDA_GRID

DENSITY_GRID = (0.1, 0.2)  # the paper prunes 90% and 80% of each task vector


def ties_delta(base, experts, params, ctx):
    """TIES merged task vector: trim, elect sign, disjoint mean"""
    if ctx.analysis is None:  # called on a whole tensor without the engine's pre-pass
        ctx.analysis = run_analysis(MagnitudeThreshold(params["density"], len(experts)), ctx.name, base, experts)
    # ctx.analysis: per expert (threshold, tied entries to keep in this tensor); the tie allowance is
    # carried across the chunks of the tensor so chunked and whole-tensor merges agree exactly.
    remaining = ctx.state.setdefault("ties_left", [ties for _, ties in ctx.analysis])
    taus = task_vectors_(base, experts)
    for t, (tau, (threshold, _)) in enumerate(zip(taus, ctx.analysis)):
        mask, used = threshold_mask(tau, threshold, remaining[t])
        remaining[t] -= used
        tau.mul_(mask)
    return ties_merge_(taus, ctx.weights)


def tensor_threshold(params, n_experts):
    if params["trim_scope"] == "tensor":
        return MagnitudeThreshold(params["density"], n_experts)
    return None


def global_threshold(params, n_experts):
    if params["trim_scope"] == "global":
        return MagnitudeThreshold(params["density"], n_experts)
    return None


def positive_weights(params, weights):
    if any(w <= 0 for w in weights):
        raise ParameterError(f"sign election needs positive expert weights, got {list(weights)}")


DENSITY = Param("density", float, 0.2, "fraction of each task vector's entries kept", min=0.0, max=1.0)
LAMBDA = Param("lambda", float, 1.0, "scale applied to the merged task vector", min=0.0, max=10.0)


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="ties",
            description="Trim task vectors by magnitude, elect signs, average the agreeing entries.",
            reference="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, arXiv:2306.01708",
            params=(
                DENSITY,
                LAMBDA,
                Param("trim_scope", str, "tensor", "trim each tensor alone, or the whole task vector",
                      choices=("tensor", "global")),
            ),
            delta=ties_delta,
            scale_param="lambda",
            check=positive_weights,
            elementwise=True,
            tensor_analysis=tensor_threshold,
            analysis=global_threshold,
            search_space={"lambda": LAMBDA_GRID, "density": DENSITY_GRID},
        )
    )
