"""Parameter checks shared by merge-method plugins (``MergeMethod.check``): expert counts and weights."""

from __future__ import annotations

from mergebench.core.errors import ParameterError

ONE_EXPERT_HINT = "give one expert, and the other model as the base"


def expert_count(method: str, n: int, hint: str):
    """A ``check`` refusing any number of experts but ``n`` (methods defined for one or two models)."""

    def check(params, weights):
        if len(weights) != n:
            raise ParameterError(f"{method} takes exactly {n} expert{'s' * (n > 1)}, got {len(weights)}; {hint}")

    return check


def unweighted_check(method: str, min_experts: int = 1, max_experts: int | None = None):
    """A ``check`` for methods that weigh experts by their own rule: equal weights only, and an expert count."""

    def check(params, weights):
        n = len(weights)
        if n < min_experts or (max_experts is not None and n > max_experts):
            want = f"exactly {min_experts}" if min_experts == max_experts else f"at least {min_experts}"
            raise ParameterError(f"{method} needs {want} expert(s) besides the base, got {n}")
        if any(w != weights[0] for w in weights):
            raise ParameterError(f"{method} weighs the experts by its own rule and takes no expert weights (mergekit "
                                 f"ignores them), got {list(weights)}; remove the weights or make them equal")

    return check
