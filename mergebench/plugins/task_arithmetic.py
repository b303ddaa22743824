"""Task Arithmetic: add the scaled sum of task vectors to the base.

    theta = theta_0 + lambda * sum_t w_t * (theta_t - theta_0)

Same as mergekit's ``task_arithmetic`` (``normalize: false``) and peft's ``linear`` combination of
task vectors; the paper sweeps lambda over 0..1 in steps of 0.1 on validation data.
"""

from __future__ import annotations

from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import task_vectors_, weighted_sum
from mergebench.core.registry import MergeMethod, Param
from mergebench.plugins import LAMBDA_GRID


def summed_task_vectors(base, experts, params, ctx):
    """sum_t w_t * (theta_t - theta_0)"""
    return weighted_sum(task_vectors_(base, experts), ctx.weights)


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="task_arithmetic",
            description="Base plus lambda times the weighted sum of task vectors.",
            reference="Ilharco et al., Editing Models with Task Arithmetic, arXiv:2212.04089",
            params=(
                Param("lambda", float, 1.0, "scale applied to the summed task vectors", min=-10.0, max=10.0),
            ),
            delta=summed_task_vectors,
            scale_param="lambda",
            elementwise=True,
            search_space={"lambda": LAMBDA_GRID},
        )
    )
