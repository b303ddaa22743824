"""linear, passthrough, nearswap, slerp, nuslerp, multislerp and karcher: against mergekit 0.1.5 on tiny float32
Llamas (in memory and through the streaming engine), and against hand-computed values.

One ``mergekit-multi`` process merges every reference config (mergekit's start-up, ~5 s, is paid once).
Each config varies a parameter by tensor name with mergekit's filters, so one merge covers several
settings; our side merges once per setting and compares the tensors that setting's filter selects. The
filters partition the tensor names, so every tensor of every reference is compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from mergebench.core import in_memory
from mergebench.core.api import merge as engine_merge
from mergebench.core.context import TensorContext
from mergebench.core.errors import ParameterError
from mergebench.core.plugin_manager import make_plugin_manager
from mergebench.plugins import spherical

from mergekit_ref import llama_family, llama_tensors, needs_mergekit, read_model, run_mergekit_many, write_llama

T = torch.tensor


@pytest.fixture(scope="module")
def pm():
    return make_plugin_manager(entry_points=False)


def call(pm, method, base, experts, weights=None, expert_params=(), **params):
    """The method's maths on whole tensors (copies: it may write into its inputs)."""
    m = pm.merge_methods().get(method)
    ctx = TensorContext("w", tuple(weights or [1.0] * len(experts)), expert_params=tuple(expert_params))
    return m.merge(None if base is None else base.clone(), [e.clone() for e in experts], m.resolve_params(params), ctx)


# ---- against mergekit 0.1.5 ------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One mergekit config and how we run the same merge. ``variants``: (filter, our parameters), first match
    wins, the last one (filter None) takes the remaining tensors, as in mergekit's parameter filters."""

    method: str
    experts: tuple[str, ...]
    variants: tuple[tuple[str | None, dict[str, Any]], ...]
    base: str | None = None  # ours (and mergekit's base_model unless mk_base says otherwise)
    weights: tuple[float, ...] | None = None
    expert_params: tuple[dict[str, Any], ...] | None = None
    mk_base: str | None = "same"
    mk_dtype: str = "float32"  # mergekit's ``dtype``: the one it computes in

    def mergekit_config(self, paths: dict[str, Path]) -> dict[str, Any]:
        models = []
        for i, name in enumerate(self.experts):
            p = dict(self.expert_params[i]) if self.expert_params else {}
            if self.weights is not None:
                p["weight"] = self.weights[i]
            models.append({"model": str(paths[name]), **({"parameters": p} if p else {})})
        keys = self.variants[-1][1].keys()
        params = {k: [{"filter": f, "value": v[k]} for f, v in self.variants[:-1]] + [{"value": self.variants[-1][1][k]}]
                  for k in keys}
        mk_base = self.base if self.mk_base == "same" else self.mk_base
        return {"merge_method": self.method, **({"base_model": str(paths[mk_base])} if mk_base else {}),
                "models": models, **({"parameters": params} if params else {}), "dtype": self.mk_dtype}

    def selects(self, variant: int, name: str) -> bool:
        """Whether mergekit applied ``variants[variant]`` to tensor ``name`` (its first matching filter)."""
        for i, (f, _) in enumerate(self.variants):
            if f is None or f in name:
                return i == variant
        return False


# "mix": layers 0-1, embeddings and head from a third perturbation of the base; layer 2 = 2 x base (colinear with
# it), layer 3 = -base (antipodal), final norm all zeros (a zero vector: the norm guards)
CASES = {
    "linear": Case("linear", ("e0", "e1", "e2"), (("mlp", {"normalize": False}), (None, {"normalize": True})),
                   weights=(1.0, 2.0, 3.0)),
    # our base only supplies the template here (passthrough ignores it); mergekit's passthrough takes no base
    "passthrough": Case("passthrough", ("e0",), ((None, {}),), base="base", mk_base=None,
                        expert_params=({"scale": 0.5},)),
    "nearswap": Case("nearswap", ("e0",), ((None, {"t": 0.05}),), base="base"),
    "slerp": Case("slerp", ("mix",), (("layers.0.", {"t": 0.0}), ("layers.1.", {"t": 1.0}), (None, {"t": 0.3})),
                  base="base"),
    "nuslerp_base": Case("nuslerp", ("e0", "e1"), (
        ("q_proj", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
        ("self_attn", {"nuslerp_flatten": False, "nuslerp_row_wise": False}),
        (None, {"nuslerp_flatten": True, "nuslerp_row_wise": False})), base="base", weights=(1.0, 3.0)),
    "nuslerp_nobase": Case("nuslerp", ("base", "mix"), (
        ("up_proj", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
        ("mlp", {"nuslerp_flatten": False, "nuslerp_row_wise": False}),
        (None, {"nuslerp_flatten": True, "nuslerp_row_wise": False})), weights=(1.0, 3.0)),
    "multislerp_base": Case("multislerp", ("e0", "e1", "e2"), ((None, {}),), base="base", weights=(1.0, 2.0, 3.0)),
    "multislerp_nobase": Case("multislerp", ("e0", "e1", "mix"), (
        ("mlp", {"normalize_weights": False}), (None, {"normalize_weights": True})), weights=(1.0, 2.0, 3.0)),
    # equal weights on base and mix: layer 3's directions cancel exactly, so the linear fallback gives 0
    "multislerp_pair": Case("multislerp", ("base", "mix"), ((None, {}),), weights=(1.0, 1.0)),
    # against mergekit's iteration computed in float64: ours runs it exactly on the float32 inputs (their Gram matrix
    # in float64), mergekit's float32 run is 1.3e-6 of the output's scale off it where an expert is antipodal
    "karcher": Case("karcher", ("e0", "e1", "mix"), (("mlp", {"max_iter": 1}), (None, {"max_iter": 10})),
                    mk_dtype="float64"),
}
RUNS = [(case, i) for case, c in CASES.items() for i in range(len(c.variants))]


def mix_tensors(base: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def pick(n, t):
        if ".layers.2." in n:
            return 2 * t
        if ".layers.3." in n:
            return -t
        if n == "model.norm.weight":
            return torch.zeros_like(t)
        return other[n]

    return {n: pick(n, t) for n, t in base.items()}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("linear-spherical")
    paths = llama_family(root, n_experts=3)
    paths["mix"] = write_llama(root / "mix", mix_tensors(read_model(paths["base"]), llama_tensors(7, scale=0.5)))
    models = {k: read_model(p) for k, p in paths.items()}
    return root, paths, models


@pytest.fixture(scope="module")
def reference(family):
    root, paths, _ = family
    return run_mergekit_many({k: c.mergekit_config(paths) for k, c in CASES.items()}, root, strict=True)


def assert_matches(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], names: list[str]) -> None:
    assert names, "the filter selected no tensor"
    for n in names:
        # float32 rounding at the tensor's scale: mergekit's multislerp adds its (analytically zero) tangent
        # step's rounding noise, ~1e-7 of the output's largest entry, which exceeds 1e-6 where weights reach 6
        atol = 1e-6 * max(1.0, want[n].abs().max().item())
        torch.testing.assert_close(got[n].float(), want[n].float(), rtol=1e-5, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def test_the_filters_cover_every_tensor_once():
    names = list(llama_tensors(0))
    for case in CASES.values():
        for n in names:
            assert sum(case.selects(i, n) for i in range(len(case.variants))) == 1, n
    assert all(any(CASES["slerp"].selects(i, n) for n in names) for i in range(3))


@needs_mergekit
@pytest.mark.parametrize("path", ["in_memory", "engine"])
@pytest.mark.parametrize("case, variant", RUNS, ids=[f"{c}-{i}" for c, i in RUNS])
def test_matches_mergekit(pm, family, reference, tmp_path, case, variant, path):
    _, paths, models = family
    c = CASES[case]
    params = c.variants[variant][1]
    if path == "in_memory":
        got = in_memory.merge(pm.merge_methods().get(c.method), params, models[c.base] if c.base else None,
                              [models[e] for e in c.experts], weights=c.weights, expert_params=c.expert_params)
    else:
        engine_merge(c.method, base=paths[c.base] if c.base else None, experts=[paths[e] for e in c.experts],
                     output=tmp_path / "out", weights=c.weights, expert_params=c.expert_params, plugin_manager=pm,
                     **params)
        got = read_model(tmp_path / "out")
    want = reference[case]
    assert set(got) == set(want)
    assert_matches(got, want, [n for n in want if c.selects(variant, n)])


@needs_mergekit
def test_the_references_exercise_the_edge_cases(family, reference):
    """The mergekit outputs the comparisons rely on do contain the edge cases (independently of our code)."""
    _, _, models = family
    base, mix = models["base"], models["mix"]
    q2, q3, norm = "model.layers.2.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight", "model.norm.weight"
    slerp = reference["slerp"]
    assert torch.equal(slerp["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])  # t = 0
    assert torch.equal(slerp["model.layers.1.mlp.up_proj.weight"], mix["model.layers.1.mlp.up_proj.weight"])  # t = 1
    torch.testing.assert_close(slerp[q2], 1.3 * base[q2])  # colinear: lerp (1 - t) a + t 2a
    torch.testing.assert_close(slerp[q3], 0.4 * base[q3])  # antipodal: lerp (1 - t) a - t a
    torch.testing.assert_close(slerp[norm], math.sin(0.7 * math.pi / 2) * base[norm])  # zero norm counts as 1
    assert torch.equal(reference["multislerp_pair"][q3], torch.zeros_like(base[q3]))  # cancelling: the fallback
    torch.testing.assert_close(reference["nuslerp_nobase"][q2], 0.25 * base[q2] + 0.75 * mix[q2])  # colinear: lerp


@needs_mergekit
def test_passthrough_scales_a_lone_expert(pm, family, reference):
    _, _, models = family
    got = in_memory.merge(pm.merge_methods().get("passthrough"), {}, None, [models["e0"]],
                          expert_params=[{"scale": 0.5}])
    assert_matches(got, reference["passthrough"], list(got))


def test_linear_unnormalised_sums_equal_experts(pm):
    x = {"w": T([1.0, -2.0])}
    got = in_memory.merge(pm.merge_methods().get("linear"), {"normalize": False}, None, [x, x])
    torch.testing.assert_close(got["w"], T([2.0, -4.0]))


# ---- by hand ---------------------------------------------------------------------------------------

def test_linear_by_hand(pm):
    a, b = T([1.0, 2.0]), T([3.0, -2.0])
    torch.testing.assert_close(call(pm, "linear", None, [a, b], [1.0, 3.0]), T([2.5, -1.0]))
    torch.testing.assert_close(call(pm, "linear", None, [a, b], [1.0, 3.0], normalize=False), T([10.0, -4.0]))
    # the same as our average
    torch.testing.assert_close(call(pm, "linear", None, [a, b], [1.0, 3.0]), call(pm, "average", None, [a, b], [1.0, 3.0]))


def test_passthrough_by_hand(pm):
    x = T([1.0, -3.0])
    assert torch.equal(call(pm, "passthrough", None, [x]), x)
    torch.testing.assert_close(call(pm, "passthrough", None, [x], expert_params=[{"scale": 0.5}]), T([0.5, -1.5]))


def test_nearswap_by_hand(pm):
    base, expert = T([0.0, 0.0, 0.0, 1.0]), T([0.05, 0.2, -0.5, 1.0])
    # |d| = 0.05, 0.2, 0.5, 0 -> w = min(1, 0.1 / |d|) = 1, 0.5, 0.2, 1 (equal entries: the 1e-6 floor)
    torch.testing.assert_close(call(pm, "nearswap", base, [expert], t=0.1), T([0.05, 0.1, -0.1, 1.0]))
    assert torch.equal(call(pm, "nearswap", base, [expert], t=0.0), base)


def test_slerp_of_orthogonal_vectors_by_hand(pm):
    e1, e2 = T([1.0, 0.0]), T([0.0, 1.0])
    h = math.sqrt(0.5)
    torch.testing.assert_close(call(pm, "slerp", e1, [e2], t=0.5), T([h, h]))
    torch.testing.assert_close(call(pm, "slerp", e1, [e2], t=1 / 3), T([math.cos(math.pi / 6), 0.5]))
    # norms are interpolated too: the coefficients of the angle apply to the unnormalised tensors
    torch.testing.assert_close(call(pm, "slerp", 2 * e1, [e2], t=0.5), T([2 * h, h]))
    # a matrix is one vector: the angle is over the whole tensor, not per row
    m0, m1 = T([[1.0, 0.0], [1.0, 0.0]]), T([[0.0, 1.0], [0.0, 1.0]])
    torch.testing.assert_close(call(pm, "slerp", m0, [m1], t=0.5), T([[h, h], [h, h]]))


def test_slerp_endpoints_and_colinear_fallback_by_hand(pm):
    a, b = T([0.3, -1.2, 2.0]), T([1.0, 0.5, -0.7])
    assert torch.equal(call(pm, "slerp", a, [b], t=0.0), a)
    assert torch.equal(call(pm, "slerp", a, [b], t=1.0), b)
    torch.testing.assert_close(call(pm, "slerp", a, [2 * a], t=0.25), 1.25 * a)  # lerp: (1 - t) a + t 2a
    torch.testing.assert_close(call(pm, "slerp", a, [-a], t=0.25), 0.5 * a)  # antipodal: lerp too
    # |cos| just above 0.9995 lerps, just below slerps (the sin formula then bows away from the chord)
    e1, near, far = T([1.0, 0.0]), T([1.0, 0.03]), T([1.0, 0.035])  # cos = 0.99955 and 0.99939
    torch.testing.assert_close(call(pm, "slerp", e1, [near], t=0.5), (e1 + near) / 2)
    # slerp's midpoint is (e1 + far) / (2 cos(a / 2)): 1.5e-4 longer than lerp's here
    half = math.acos(1 / math.sqrt(1 + 0.035 ** 2)) / 2
    torch.testing.assert_close(call(pm, "slerp", e1, [far], t=0.5), (e1 + far) / (2 * math.cos(half)))
    assert (call(pm, "slerp", e1, [far], t=0.5) - (e1 + far) / 2).abs().max() > 1e-4
    assert torch.equal(call(pm, "slerp", torch.zeros(3), [torch.zeros(3)], t=0.5), torch.zeros(3))  # norm guard


def test_nuslerp_by_hand(pm):
    e1, e2 = T([1.0, 0.0]), T([0.0, 1.0])
    a = 0.75 * math.pi / 2  # t = w2 / (w1 + w2) = 3 / 4
    torch.testing.assert_close(call(pm, "nuslerp", None, [e1, e2], [1.0, 3.0]), T([math.cos(a), math.sin(a)]))
    h = math.sqrt(0.5)
    torch.testing.assert_close(call(pm, "nuslerp", None, [e1, e2], [1.0, -1.0]), T([h, h]))  # sum 0: t = 0.5
    # with a base: slerp of the task vectors, added back
    base = T([1.0, 1.0])
    torch.testing.assert_close(call(pm, "nuslerp", base, [base + e1, base + e2], [1.0, 3.0]),
                               base + T([math.cos(a), math.sin(a)]))
    # one vector per row, per column, or the whole tensor
    v0, v1 = T([[1.0, 0.0], [1.0, 0.0]]), T([[0.0, 1.0], [2.0, 0.0]])
    rows = call(pm, "nuslerp", None, [v0, v1], nuslerp_flatten=False)
    torch.testing.assert_close(rows, T([[h, h], [1.5, 0.0]]))  # row 0 orthogonal, row 1 colinear: lerp
    cols = call(pm, "nuslerp", None, [v0, v1], nuslerp_flatten=False, nuslerp_row_wise=True)
    # column 0: (1, 1) to (0, 2), 45 degrees apart; column 1: (0, 0) to (1, 0), the zero vector's norm clamped
    c = math.acos(h)
    col0 = (math.sin(c / 2) * T([1.0, 1.0]) + math.sin(c / 2) * T([0.0, 2.0])) / math.sin(c)
    torch.testing.assert_close(cols, T([[col0[0], h], [col0[1], 0.0]]))
    flat = call(pm, "nuslerp", None, [v0, v1])
    c = math.acos(2 / math.sqrt(2 * 5))
    want = (math.sin(c / 2) * v0 + math.sin(c / 2) * v1) / math.sin(c)
    torch.testing.assert_close(flat, want)


def test_multislerp_by_hand(pm):
    e1, e2 = T([1.0, 0.0]), T([0.0, 1.0])
    h = math.sqrt(0.5)
    # the normalised weighted mean direction, scaled by the weighted mean norm (1.5)
    torch.testing.assert_close(call(pm, "multislerp", None, [2 * e1, e2]), 1.5 * T([h, h]))
    # weights 1, 3: direction (1, 3) / sqrt(10), not slerp's uniform angle
    torch.testing.assert_close(call(pm, "multislerp", None, [e1, e2], [1.0, 3.0]), T([1.0, 3.0]) / math.sqrt(10))
    torch.testing.assert_close(call(pm, "multislerp", None, [e1, e2], [1.0, 3.0], normalize_weights=False),
                               4 * T([1.0, 3.0]) / math.sqrt(10))
    base = T([5.0, -5.0])
    torch.testing.assert_close(call(pm, "multislerp", base, [base + 2 * e1, base + e2]), base + 1.5 * T([h, h]))
    x = T([3.0, 4.0])
    assert torch.equal(call(pm, "multislerp", base, [x]), x)  # one expert: itself
    # cancelling directions: two experts lerp, three raise
    torch.testing.assert_close(call(pm, "multislerp", None, [e1, -e1]), T([0.0, 0.0]))
    with pytest.raises(ParameterError, match="directions is zero"):
        call(pm, "multislerp", None, [e1, -e1, e1, -e1])


def karcher64(tensors, alphas, max_iter, tol):
    """mergekit 0.1.5's ``karcher_merge_tensors`` (merge_methods/karcher.py), its operations in float64."""
    xs = [t.double().reshape(-1) for t in tensors]
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [x / n if n.item() > 0 else torch.zeros_like(x) for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    a = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    us = [units[i] for i in valid]
    mean = sum(w * u for w, u in zip(a, us))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = us[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(a, us):
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return (sum(w * n for w, n in zip(alphas, norms)) * mean).reshape(tensors[0].shape)


@pytest.mark.parametrize("spread", [0.1, 0.03, 0.01])
@pytest.mark.parametrize("max_iter", [1, 10])
def test_karcher_is_mergekits_iteration_computed_exactly(pm, spread, max_iter):
    """Two experts near v and one near -v: the mean's coefficients on the experts reach ~10x the output's size with
    both signs, so float32 products or sums would be ~1e-6 off; ours is the float32 rounding of the float64 run."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, 64, generator=g)
    xs = [v + spread * torch.randn(64, 64, generator=g), v + spread * torch.randn(64, 64, generator=g),
          -v + spread * torch.randn(64, 64, generator=g)]
    want = karcher64(xs, [0.5, 0.25, 0.25], max_iter, 1e-5)
    got = call(pm, "karcher", None, xs, [2.0, 1.0, 1.0], max_iter=max_iter)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1.2e-7 * want.abs().max().item())


def test_karcher_edge_cases_are_mergekits(pm):
    """A zero expert first (the output goes over the first expert that takes part) and directions that cancel (the
    mean starts from the first unit that takes part), against mergekit's iteration in float64."""
    g = torch.Generator().manual_seed(3)
    v, w = torch.randn(40, generator=g), torch.randn(40, generator=g)
    cases = {"zero first": ([torch.zeros(40), v, w, v + 0.1 * w], [1.0, 2.0, 2.0, 0.5]),
             "a pair cancels": ([torch.zeros(40), v, -v, 2 * w], [1.0, 2.0, 2.0, 0.5]),
             "all cancel": ([torch.zeros(40), v, -v], [1.0, 2.0, 2.0])}  # the mean starts from v's direction
    for what, (xs, unequal) in cases.items():
        for weights in ([1.0] * len(xs), unequal):
            alphas = [x / sum(weights) for x in weights]
            want = karcher64(xs, alphas, 10, 1e-5)
            got = call(pm, "karcher", None, xs, weights, max_iter=10)
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1.2e-7 * want.abs().max().item(),
                                       msg=lambda m, what=what: f"{what}: {m}")


def test_karcher_by_hand(pm):
    e1, e2, e3 = T([1.0, 0.0, 0.0]), T([0.0, 1.0, 0.0]), T([0.0, 0.0, 1.0])
    # symmetric: the mean direction of three orthogonal unit vectors, scaled by their mean norm
    torch.testing.assert_close(call(pm, "karcher", None, [e1, e2, e3], max_iter=50, tol=1e-7),
                               T([1.0, 1.0, 1.0]) / math.sqrt(3))
    # on a circle the Karcher mean is the weighted mean angle: weights 2, 1 at 0 and 90 degrees give 30 degrees
    # (the normalised Euclidean mean, multislerp's, gives atan(1/2) = 26.6 degrees)
    a, b = T([1.0, 0.0]), T([0.0, 2.0])
    got = call(pm, "karcher", None, [a, b], [2.0, 1.0], max_iter=100, tol=1e-7)
    scale = (2 * 1.0 + 1 * 2.0) / 3
    torch.testing.assert_close(got, scale * T([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    # max_iter 0: only the starting point, the normalised weighted mean
    got = call(pm, "karcher", None, [a, b], [2.0, 1.0], max_iter=0)
    torch.testing.assert_close(got, scale * T([2.0, 1.0]) / math.sqrt(5))
    # a zero expert takes no part in the direction but counts in the norm
    got = call(pm, "karcher", None, [e1[:2], e2[:2], torch.zeros(2)], max_iter=50, tol=1e-7)
    torch.testing.assert_close(got, (2 / 3) * T([math.sqrt(0.5), math.sqrt(0.5)]))



@pytest.mark.parametrize("shape", [(37, 13), (300,), (1, 9)])
@pytest.mark.parametrize("method, n, base, params", [
    ("slerp", 1, True, {"t": 0.3}),
    ("nuslerp", 2, True, {}),
    ("nuslerp", 2, False, {"nuslerp_flatten": False}),
    ("nuslerp", 2, False, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", 3, True, {}),
    ("multislerp", 3, False, {}),
    ("karcher", 3, False, {}),
])
def test_spherical_temporaries_by_blocks_give_the_whole_tensors_bits(pm, monkeypatch, shape, method, n, base, params):
    """The elementwise temporaries go by blocks of spherical.BLOCK entries (uneven ones here): bit for bit
    what whole-tensor temporaries give; mergekit's agreement is tested above on tensors of one block."""
    g = torch.Generator().manual_seed(3)
    theta0 = torch.randn(shape, generator=g)
    experts = [theta0 + 0.3 * torch.randn(shape, generator=g) for _ in range(n)]
    weights = [1.0, 2.0, 0.5][:n]
    whole = call(pm, method, theta0 if base else None, experts, weights, **params)
    monkeypatch.setattr(spherical, "BLOCK", 7)
    assert torch.equal(call(pm, method, theta0 if base else None, experts, weights, **params), whole)

@pytest.mark.parametrize("method, n, params, weights, match", [
    ("slerp", 2, {}, None, "exactly 1 expert"),
    ("nearswap", 2, {}, None, "exactly 1 expert"),
    ("passthrough", 2, {}, None, "exactly 1 expert"),
    ("nuslerp", 3, {}, None, "exactly 2 experts"),
    ("nuslerp", 1, {}, None, "exactly 2 experts"),
    ("linear", 2, {}, [1.0, -1.0], "sum to 0"),
    ("multislerp", 2, {}, [1.0, -1.0], "sum to 0"),
    ("karcher", 2, {}, [1.0, -1.0], "must be positive"),
])
def test_refused_before_any_tensor_is_read(pm, method, n, params, weights, match):
    x = {"w": T([1.0, 2.0])}
    with pytest.raises(ParameterError, match=match):
        in_memory.merge(pm.merge_methods().get(method), params, x, [x] * n, weights=weights)


def test_linear_unnormalised_accepts_weights_summing_to_zero(pm):
    a, b = T([1.0, 2.0]), T([3.0, -2.0])
    torch.testing.assert_close(call(pm, "linear", None, [a, b], [1.0, -1.0], normalize=False), T([-2.0, 4.0]))


def test_the_cosine_of_two_long_vectors_does_not_depend_on_the_thread_count():
    """slerp's cosine sums one product over a whole flattened tensor. torch splits a long sum across its threads
    (differently rounded), and the engine gives a tensor of the largest size every core: the benchmark's 0.1B
    embedding came out 1.5e-8 apart on 1 and 2 threads until the sum ran on one thread."""
    from concurrent.futures import ThreadPoolExecutor

    from mergebench.core.merge_ops import set_torch_threads

    g = torch.Generator().manual_seed(4)
    pairs = [(torch.randn(1 << 22, generator=g), torch.randn(1 << 22, generator=g)) for _ in range(4)]

    def cosines(threads):
        set_torch_threads(threads)
        return [spherical.cosine(a.clone(), b, spherical.norm(a), spherical.norm(b)) for a, b in pairs]

    with ThreadPoolExecutor(1) as pool:
        one, two = pool.submit(cosines, 1).result(), pool.submit(cosines, 2).result()
    assert all(torch.equal(x, y) for x, y in zip(one, two))
