"""Consensus merging (TALL masks) as a mergebench plugin.

Wang, Dimitriadis, Ortiz-Jimenez, Fleuret & Frossard, "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024, arXiv:2405.07813. Task t's TALL mask marks the entries where the
merged model stays closer to expert t than the base is, i.e. the entries task t still relies on after
merging. The consensus mask keeps the entries that at least ``k`` tasks rely on: it drops "selfish" weights
(one task only) and "catastrophic" ones (no task), and task arithmetic adds what is left ("Consensus TA"):

    tau_t   = theta_t - theta_0                                   task vector of expert t
    tau_MTL = sum_t w_t tau_t                                     task arithmetic's merged vector, before lambda
    m_t     = [ |tau_t| >= tall_lambda_t * |tau_MTL - tau_t| ]    TALL mask of task t, per entry
    m       = [ sum_t m_t >= k ]                                  consensus mask
    theta   = theta_0 + lambda * (m * tau_MTL)

Conventions (each changes numbers):
- The masks compare against the unscaled multi-task model theta_0 + tau_MTL (|tau_MTL - tau_t| is its
  distance to theta_t), as the paper and the authors' code build them from the summed task vectors before
  the scale lambda is chosen. So the masks do not depend on lambda: the method gives ``delta`` = m * tau_MTL
  and a sweep reuses it for every lambda.
- Expert weights w_t (the paper: all 1) weight the task vectors inside tau_MTL; each mask compares the
  expert's own unweighted tau_t with that distance.
- ``>=``, as in the paper's equation. The authors' code uses ``>``; the two differ only on entries where both
  sides are exactly equal (e.g. tau_1 = 1, tau_2 = 2, tall_lambda = 0.5: task 1's mask is on here, off there).
- ``tall_lambda`` is per expert (``-P 2:tall_lambda=0.3``), as the paper's lambda_t, which it tunes per task
  on that task's validation set in about 0.2..0.6; by default one value (0.4) for every task. Both sides of
  the comparison are computed in float32.
- ``k`` = 2 is the paper's choice; k = 1 drops only catastrophic weights and k = 0 is task arithmetic. A k
  above the number of experts would leave theta_0 (no entry can be on in more masks than there are
  experts), so it is refused before any tensor is read.
- The paper also applies the consensus mask to TIES's merged vector ("Consensus TIES"); this plugin offers
  the task-arithmetic variant only.

Each output entry depends only on the same entry of the inputs, so the engine streams tensors in chunks;
nothing is random. Task vectors and their weighted sum come from mergebench's shared helpers.
"""

from __future__ import annotations

import torch

from mergebench import MergeMethod, Param, hookimpl
from mergebench.core.errors import ParameterError
from mergebench.core.merge_ops import task_vectors_, weighted_sum

REFERENCE = ("Wang et al., Localizing Task Information for Improved Model Merging and Compression "
             "(TALL masks, Consensus Merging), ICML 2024, arXiv:2405.07813")


def consensus_delta(base, experts, params, ctx):
    """tau_MTL = sum_t w_t tau_t, kept where at least k TALL masks are on and zero elsewhere"""
    taus = task_vectors_(base, experts)
    mtl = weighted_sum(taus, ctx.weights)  # a new tensor: the taus are still intact
    votes = torch.zeros(mtl.shape, dtype=torch.int32, device=mtl.device)
    for tau, tall_lambda in zip(taus, ctx.expert_values("tall_lambda", params)):
        distance = torch.sub(mtl, tau).abs_().mul_(tall_lambda)
        votes.add_(tau.abs_() >= distance)  # tau_t is not needed after its own mask
    return mtl.masked_fill_(votes < params["k"], 0.0)


def check_k(params, weights):
    if params["k"] > len(weights):
        raise ParameterError(f"consensus k={params['k']} needs at least {params['k']} experts, got {len(weights)} "
                             f"(no entry can be on in more masks than there are experts); lower k")


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="consensus",
            description="Task arithmetic on the entries that at least k tasks' TALL masks keep (Consensus TA).",
            reference=REFERENCE,
            params=(
                Param("tall_lambda", float, 0.4, "TALL mask threshold: keep entries with |tau_t| >= tall_lambda "
                      "* |tau_MTL - tau_t|", min=0.0, per_expert=True),
                Param("k", int, 2, "entries kept where at least k task masks are on (0: task arithmetic)", min=0),
                Param("lambda", float, 1.0, "scale applied to the masked merged task vector", min=0.0, max=10.0),
            ),
            delta=consensus_delta,
            scale_param="lambda",
            check=check_k,
            needs_base=True,
            elementwise=True,
            search_space={"lambda": tuple(round(0.1 * i, 1) for i in range(11)), "tall_lambda": (0.2, 0.4, 0.6)},
        )
    )
