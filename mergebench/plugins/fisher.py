"""Fisher merging: each parameter entry averaged with weights from the experts' diagonal Fisher information.

Matena & Raffel, Merging Models with Fisher-Weighted Averaging (arXiv:2111.09832, eq. 3), per entry j:

    theta*_j = sum_i w_i max(F_i,j, floor) theta_i,j / sum_i w_i max(F_i,j, floor)

F_i is expert i's diagonal empirical Fisher on the calibration data (the mean over examples of the squared
gradient of each example's log-likelihood, :mod:`mergebench.core.calibration`), w_i its weight
(``ctx.weights``: the paper's merging coefficients lambda_i, default 1 each; only their ratios matter).

- ``fisher_floor`` (default 1e-6, the authors' code ``fisher_floor``; FusionBench's
  ``minimal_fisher_weight`` is also 1e-6 but added to F rather than a lower bound): keeps entries that
  no expert's data reaches from dividing by ~0. It is absolute, so where every F_i is below it the entry
  is the weighted mean; with floor 0 an entry where every F_i is 0 is the weighted mean too. The authors'
  ``favor_target_model`` (floor only the first model) is not offered: all experts are alike here.
- ``normalize`` (default false, the paper's equation): when true, each expert's Fisher is first divided by its
  L2 norm over the whole model, ||F_i|| (every parameter its files hold, a tied one counted once; recorded with
  the statistics, so the merge still streams one tensor at a time), as the authors' code (``normalize_fishers``)
  and FusionBench (``normalize_fisher_weight``) do by default: theta*_j = sum_i (w_i / ||F_i||) max(F_i,j, floor)
  theta_i,j / sum_i (w_i / ||F_i||) max(F_i,j, floor). It stops an expert whose Fisher is larger overall (a
  sharper loss, more scored tokens) from outweighing the others everywhere. The floor applies before the
  division, as a bound on F; FusionBench adds its 1e-6 to F and to the norm instead, which differs only where F
  is that small.
- Tensors without a Fisher (none was collected for that name) are the weighted mean. The base, when
  given, takes no part.

Computed in float32 on the merge's device, per whole tensor (the statistics come one tensor at a time), the sums
a block of 2^20 entries at a time, each written over expert 0's scratch copy.
"""

from __future__ import annotations

import torch

from mergebench.core.calibration import CalibrationRequest, Fisher
from mergebench.core.errors import InputError
from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import BLOCK, spans
from mergebench.core.registry import MergeMethod, Param
from mergebench.plugins.regmean import check_weights, weighted_mean


def fisher(base, experts, params, ctx):
    """sum_i c_i max(F_i, floor) theta_i / sum_i c_i max(F_i, floor), per entry; c_i = w_i, or w_i / ||F_i||
    with ``normalize``"""
    fishers = ctx.statistics
    if fishers is None or any(f is None for f in fishers):
        return weighted_mean(experts, ctx.weights)
    values, coefficients = [], []
    for theta, f, weight in zip(experts, fishers, ctx.weights):
        if params.get("normalize"):
            norm = getattr(f, "model_norm", float("nan"))
            if not norm > 0:  # NaN (a bare tensor, or statistics without the norm) or 0 (no information at all)
                raise InputError(f"fisher: normalize needs each expert's whole-model Fisher norm, and the statistics "
                                 f"for tensor '{ctx.name}' give {norm}; merge with normalize false, or compute the "
                                 f"statistics again with this version")
            weight = weight / norm
        f = f.values if isinstance(f, Fisher) else f
        if not isinstance(f, torch.Tensor) or f.shape != theta.shape:
            got = list(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise InputError(f"fisher: the Fisher for tensor '{ctx.name}' is {got}, not shaped as the tensor "
                             f"{list(theta.shape)}; the calibration statistics belong to another model")
        values.append(f.reshape(-1))
        coefficients.append(weight)
    # elementwise: a block of entries at a time, written over expert 0's scratch copy once that block is read,
    # so the sums take no whole tensors of their own
    flat = [theta.view(-1) for theta in experts]
    for start, stop in spans(flat[0].numel(), BLOCK):
        numerator = torch.zeros(stop - start, dtype=flat[0].dtype, device=flat[0].device)
        denominator = torch.zeros_like(numerator)
        for theta, f, weight in zip(flat, values, coefficients):
            # a copy: the statistics may be the caller's (an in-memory sweep reuses them for every point)
            f = f[start:stop].to(theta.device, torch.float32, copy=True).clamp_min_(params["fisher_floor"]).mul_(weight)
            denominator += f
            numerator.addcmul_(f, theta[start:stop])
        unreached = denominator == 0  # only with floor 0: no expert has information there
        out = numerator.div_(torch.where(unreached, torch.ones_like(denominator), denominator))
        if unreached.any():
            out = torch.where(unreached, weighted_mean([theta[start:stop] for theta in flat], ctx.weights), out)
        flat[0][start:stop] = out
    return experts[0]


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="fisher",
            description="Per-entry average weighted by each expert's diagonal Fisher information on calibration data.",
            reference="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, arXiv:2111.09832",
            params=(Param("fisher_floor", float, 1e-6, "lower bound on each Fisher entry (the authors' code's "
                                                       "fisher_floor)", min=0.0),
                    Param("normalize", bool, False, "divide each expert's Fisher by its L2 norm over the whole model "
                                                    "(the authors' code's normalize_fishers)")),
            merge=fisher,
            check=check_weights("fisher"),
            needs_base=False,
            ignores_base=True,
            calibration=lambda params: CalibrationRequest("fisher"),
        )
    )
