"""Model Breadcrumbs as a mergebench plugin.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
arXiv:2312.06795. Each task vector loses its largest-magnitude outliers (the top ``gamma`` fraction)
and its small entries, keeping the ``density`` fraction just below the outliers; the masked task
vectors are then summed as in task arithmetic:

    theta = theta_0 + lambda * sum_t w_t * (tau_t * mask_t)

Everything but the mask choice comes from mergebench's shared helpers.
"""

from __future__ import annotations

from mergebench import hookimpl
from mergebench.core.merge_ops import keep_count, magnitude_mask, task_vectors_, weighted_sum
from mergebench.core.registry import MergeMethod, Param


def breadcrumbs_delta(base, experts, params, ctx):
    """sum_t w_t * tau_t with the top-gamma outliers and the entries below gamma+density removed"""
    taus = task_vectors_(base, experts)
    n = base.numel()
    top = keep_count(params["gamma"], n)
    upto = keep_count(min(1.0, params["gamma"] + params["density"]), n)
    for tau in taus:
        keep = magnitude_mask(tau, upto) & ~magnitude_mask(tau, top)
        tau.mul_(keep)
    return weighted_sum(taus, ctx.weights)


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="breadcrumbs",
            description="Drop each task vector's outliers and small entries, then add them (task arithmetic).",
            reference="Davari & Belilovsky, Model Breadcrumbs, arXiv:2312.06795",
            params=(
                Param("density", float, 0.9, "fraction of entries kept, just below the outliers", min=0.0, max=1.0),
                Param("gamma", float, 0.01, "fraction of largest-magnitude entries dropped as outliers",
                      min=0.0, max=1.0),
                Param("lambda", float, 1.0, "scale applied to the summed masked task vectors", min=-10.0, max=10.0),
            ),
            delta=breadcrumbs_delta,
            scale_param="lambda",
            search_space={"lambda": tuple(round(0.1 * i, 1) for i in range(11))},
        )
    )
