"""NearSwap: take the expert's value only where it is near the base's.

    d     = |theta_1 - theta_0|                     per entry
    w     = clamp(t / max(d, 1e-6), 0, 1)
    theta = w * theta_1 + (1 - w) * theta_0

Entries the expert moved by at most ``t`` are swapped to the expert's value (w = 1); entries it moved
further are pulled back toward the base, the more the further (w = t / d). t = 0 gives the base. The
1e-6 floor only guards the division: where d < 1e-6 the two values are equal to that precision.

There is no paper: mergekit's implementation is the original (its reference is the model card of
alchemonaut's QuartetAnemoi-70B-t0.0001, merged with t = 0.0001), so its conventions are ours: exactly
one base and one expert, ``t`` one value per tensor (gradients and filters may vary it), the expert's
weight unused.
"""

from __future__ import annotations

import torch

from mergebench.core.hookspecs import hookimpl
from mergebench.core.registry import MergeMethod, Param
from mergebench.plugins.checks import ONE_EXPERT_HINT, expert_count


def nearswap(base, experts, params, ctx):
    """w * theta_1 + (1 - w) * theta_0, w = clamp(t / max(|theta_1 - theta_0|, 1e-6), 0, 1)"""
    (expert,) = experts
    w = (params["t"] / torch.sub(base, expert).abs_().clamp_(min=1e-6)).clamp_(0.0, 1.0)
    out = expert.mul_(w)
    return out.add_(w.neg_().add_(1.0).mul_(base))  # 1 - w exactly; the same products and sum as mergekit


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="nearswap",
            description="Expert's values where they are within t of the base's, interpolated toward the base elsewhere.",
            reference="alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001; mergekit "
                      "https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/nearswap.py",
            params=(Param("t", float, 0.0001, "distance below which the expert's value is taken whole", min=0.0),),
            merge=nearswap,
            check=expert_count("nearswap", 1, ONE_EXPERT_HINT),
            elementwise=True,
            search_space={"t": (0.0001, 0.001, 0.01, 0.1)},
        )
    )
