"""Linear (weighted sum or mean) and passthrough (one model, optionally scaled): mergekit's two simplest methods.

linear:
    theta = sum_t w_t * theta_t / sum_t w_t      (normalize: true, the default, as in mergekit)
    theta = sum_t w_t * theta_t                  (normalize: false)

- With ``normalize: true`` this is exactly our ``average`` (mergebench/plugins/average.py), the model
  soup of Wortsman et al.; ``linear`` exists so that mergekit's name and its ``normalize`` switch map
  1:1. ``normalize: false`` is a plain weighted sum, so weights should then sum to 1 themselves.
- The base, when given, is not an input (it only supplies the config and tokenizer, as for
  ``average``). mergekit treats a ``base_model`` that is listed in ``models`` as one more input with
  its own weight: reading a mergekit config, list it as an expert.
- mergekit casts the weights to float32 and accumulates with ``addcmul_``; we accumulate in the same
  order in float32, so results agree to float32 rounding.

passthrough:
    theta = scale * theta_1                      (exactly one expert; ``scale`` per expert, default 1)

- mergekit's own method (no paper): it copies one model's tensor, optionally scaled (``scale`` unset
  there means unscaled; our default 1.0 gives the same bits). Its main use in mergekit, stacking
  layers of different models with ``slices``, is a config feature, not maths.
- passthrough ignores the base, when given, and the expert's weight; neither method has a grid to sweep (the weights are
  the only knob of linear, and a one-model copy has none).
"""

from __future__ import annotations

from mergebench.core.errors import ParameterError
from mergebench.core.hookspecs import hookimpl
from mergebench.plugins.checks import expert_count
from mergebench.core.merge_ops import weighted_sum
from mergebench.core.registry import MergeMethod, Param

MERGEKIT_SOURCE = "https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/"


def linear(base, experts, params, ctx):
    """sum_t w_t * theta_t (/ sum_t w_t when normalize)"""
    out = weighted_sum(experts, ctx.weights)
    return out.div_(sum(ctx.weights)) if params["normalize"] else out


def _check_linear(params, weights):
    if params["normalize"] and sum(weights) == 0:
        raise ParameterError("linear: the expert weights sum to 0, so normalize: true divides by 0; "
                             "change the weights or set normalize: false")


def passthrough(base, experts, params, ctx):
    """scale * theta_1"""
    (scale,) = ctx.expert_values("scale", params)
    return experts[0] if scale == 1.0 else experts[0].mul_(scale)


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="linear",
            description="Weighted sum of the experts' parameters, divided by the summed weights when normalize.",
            reference="Wortsman et al., Model soups, arXiv:2203.05482; mergekit " + MERGEKIT_SOURCE + "linear.py",
            params=(Param("normalize", bool, True, "divide the weighted sum by the sum of the weights"),),
            merge=linear,
            check=_check_linear,
            needs_base=False,
            ignores_base=True,
            fixed_point=lambda params, weights, _: params["normalize"] or sum(weights) == 1.0,
            elementwise=True,
        )
    )
    register(
        MergeMethod(
            name="passthrough",
            description="One expert's parameters unchanged, or multiplied by its scale.",
            reference="mergekit " + MERGEKIT_SOURCE + "passthrough.py",
            params=(Param("scale", float, 1.0, "factor applied to the expert's tensors", per_expert=True),),
            merge=passthrough,
            check=expert_count("passthrough", 1, "give one expert (linear combines several)"),
            needs_base=False,
            ignores_base=True,
            fixed_point=lambda params, weights, own: all(e.get("scale", params["scale"]) == 1.0 for e in own or [{}]),
            elementwise=True,
        )
    )
