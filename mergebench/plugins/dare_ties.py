"""DARE-TIES: random drop-and-rescale of task vectors, then TIES sign election and disjoint mean.

    tau^_t = tau_t * m_t / density,  m_t ~ Bernoulli(density) per element
    theta  = theta_0 + lambda * disjoint_mean(tau^, elected sign)      (as in ``ties``)

Randomness: one CPU stream per (seed, tensor name, expert), consumed in order, two 16-bit uniforms
per 32-bit draw (so density is effectively rounded to a multiple of 1/65536). An expert's stream is keyed
by a hash (sha256) of its stored bytes for that tensor (``TensorContext.streams``), not by its position: the same
experts listed in any order, any sharding, chunking, thread count or device give the same output. mergekit's
``dare_ties`` and peft's ``dare_ties`` do the same maths with other random streams, so outputs agree
in distribution, not bit for bit. The drop is per element, so there is no trim scope to choose.
"""

from __future__ import annotations

from mergebench.core.errors import ParameterError
from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import random_drop_, task_vectors_, ties_merge_
from mergebench.core.registry import MergeMethod
from mergebench.plugins import LAMBDA_GRID
from mergebench.plugins.ties import DENSITY, DENSITY_GRID, LAMBDA, positive_weights


def dare_ties_delta(base, experts, params, ctx):
    """DARE-TIES merged task vector: drop-and-rescale, elect sign, disjoint mean"""
    density = params["density"]
    taus = task_vectors_(base, experts)
    for t, tau in enumerate(taus):
        random_drop_(tau, density, ctx.generator_for(t))
    # DARE rescales every kept entry by 1/density; a positive common factor changes neither the
    # elected signs nor which entries agree, so it is applied once to the merged vector.
    return ties_merge_(taus, ctx.weights).div_(density)


def _check(params, weights):
    if params["density"] <= 0:
        raise ParameterError("parameter 'density' of merge method 'dare_ties' must be > 0 (it rescales by 1/density)")
    positive_weights(params, weights)


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="dare_ties",
            description="Randomly drop and rescale task-vector entries, then TIES sign election and mean.",
            reference="Yu et al., Language Models are Super Mario (DARE), arXiv:2311.03099",
            params=(DENSITY, LAMBDA),
            delta=dare_ties_delta,
            scale_param="lambda",
            stochastic=True,
            elementwise=True,
            check=_check,
            search_space={"lambda": LAMBDA_GRID, "density": DENSITY_GRID},
        )
    )
