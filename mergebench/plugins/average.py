"""Averaging: the (weighted) mean of the experts' parameters.

    theta = sum_t w_t * theta_t / sum_t w_t

The base is not part of the mean; when given it only supplies the config, tokenizer and dtype.
Same as mergekit's ``linear`` with ``normalize: true``.
"""

from __future__ import annotations

from mergebench.core.errors import ParameterError
from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import weighted_sum
from mergebench.core.registry import MergeMethod


def average(base, experts, params, ctx):
    """sum_t w_t * theta_t / sum_t w_t"""
    return weighted_sum(experts, ctx.weights).div_(sum(ctx.weights))


def _check(params, weights):
    if sum(weights) == 0:
        raise ParameterError("average: the expert weights sum to 0, so their mean is undefined")


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="average",
            description="Weighted mean of the experts' parameters.",
            reference="Wortsman et al., Model soups, arXiv:2203.05482",
            merge=average,
            check=_check,
            needs_base=False,
            ignores_base=True,
            elementwise=True,
        )
    )
