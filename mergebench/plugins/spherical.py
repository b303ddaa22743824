"""Spherical merges: slerp, nuslerp, multislerp and karcher, as mergekit 0.1.5 computes them.

None is elementwise: each needs norms or dot products over a whole tensor (or over its rows). Their
elementwise temporaries go by blocks of ``merge_ops.BLOCK`` entries (the same bits as whole ones), so a merge holds
its inputs and at most one whole working tensor (the product inside cos for slerp and nuslerp; multislerp's sum;
karcher writes its output over its first expert of non-zero norm).

slerp (base theta_0 and one expert theta_1; t one value per tensor, outside [0, 1] it extrapolates):
    cos   = <theta_0, theta_1> / (|theta_0| |theta_1|)    over the whole tensor; a norm <= 1e-8 counts as 1
    theta = c_0(t) * theta_0 + c_1(t) * theta_1
    c_0 = sin((1 - t) a) / sin a,  c_1 = sin(t a) / sin a,  a = arccos(cos)
    c_0 = 1 - t,                   c_1 = t                   (lerp) where |cos| > 0.9995
  t = 0 gives the base and t = 1 the expert exactly. Shoemake's slerp (SIGGRAPH 1985) is defined for
  unit vectors; mergekit, the reference for slerp merges, applies the coefficients of the two
  directions' angle to the unnormalised tensors, so norms are interpolated too, and falls back to lerp
  for nearly colinear or antipodal tensors (where sin a ~ 0). There is no other slerp of tensors to
  switch to, so we follow mergekit. mergekit's ``t`` is one value per tensor (gradients and filters vary it); the
  expert's weight is not used.

nuslerp (two experts, base optional; mergekit's own method):
    t = w_2 / (w_1 + w_2)             from the expert weights (0.5 when |w_1 + w_2| < 1e-6)
    v_i = theta_i - theta_0           with a base (then theta = theta_0 + result), else v_i = theta_i
  slerp of v_1 toward v_2 by t, with other guards than slerp's: norms are clamped to >= 1e-7, and lerp
  is used only where 1 - cos^2 <= 1e-16 (exactly colinear in float32). The vectors are:
  - ``nuslerp_flatten: true`` (default): the whole tensor, one vector;
  - ``nuslerp_flatten: false``: slices along the last dim (the rows W[i, :] of a matrix), each its own
    slerp, unless ``nuslerp_row_wise: true``: then slices along dim 0 (the columns W[:, j]; mergekit's
    option name says "row" for these, its code slices dim 0, and we follow the code).
  cos is computed with mergekit's operations (normalise, multiply, sum), so the branch taken agrees with
  mergekit's even where rounding decides it: for exactly antipodal vectors cos rounds to -1 (lerp) or to
  -1 + 6e-8 (the sin formula at a = pi - 3.5e-4), and the two give different results (-0.5 v_1 or about
  -0.71 v_1 at t = 0.75): a mergekit behaviour we reproduce rather than repair.

multislerp (any number of experts, weights w_i, base optional; mergekit's method, Goddard's blog post):
    v_i = theta_i - theta_0 (with a base) or theta_i;  n_i = |v_i|;  u_i = v_i / (n_i + eps)
    w_i <- w_i / sum_j w_j            when ``normalize_weights`` (default true)
    M   = sum_i w_i u_i;  m = M / |M|
    theta = [theta_0 +] (sum_i w_i n_i) * exp_m(sum_i w_i (u_i - <u_i, m> m))
  The tangent-space average vanishes identically: sum_i w_i (u_i - <u_i, m> m) = M - <M, m> m = 0, so
  mergekit's exponential map returns m up to float32 rounding (its cos(|0| + eps) is 1 in float32). We
  compute the same result directly, theta = [theta_0 +] (sum_i w_i n_i) * m, which agrees with mergekit
  to float32 rounding (what remains is mergekit's rounding noise in that zero step, ~1e-7 of the
  output's largest entry). One expert gives that expert's tensor. Where |M| < eps (the directions cancel):
  two experts fall back to [theta_0 +] w_1 v_1 + w_2 v_2 as in mergekit; more experts raise an error as
  in mergekit (a ParameterError naming the tensor), except when every v_i is zero, which gives theta_0
  (or zeros) where mergekit raises.

karcher (any number of experts, no base): the weighted Karcher (Riemannian) mean of the directions on
the unit sphere, scaled by the weighted mean norm:
    alpha_i = w_i / sum_j w_j;  n_i = |theta_i|;  u_i = theta_i / n_i (0 when n_i = 0)
    only experts with n_i > tol take part in the mean, their alphas renormalised;
    m_0 = normalise(sum alpha_i u_i)  (u of the first such expert when that sum's norm < tol)
    repeat max_iter times: g = sum_i alpha_i (a_i / sin a_i) (u_i - cos a_i m), a_i = arccos <m, u_i>
                           (terms with a_i < tol skipped); stop when |g| < tol;
                           m <- normalise(cos|g| m + sin|g| g / |g|)
    theta = (sum_i alpha_i n_i) * m
  mergekit has no per-model weight for karcher and uses alpha_i = 1/N: equal expert weights (the
  default) reproduce it; other weights give the weighted Karcher mean (weights must be > 0).
  One expert gives that expert's tensor. The mean and every step lie in the span of the u_i, so we run
  mergekit's iteration, step for step, on the coefficients of m in that basis: dots are G c and norms
  sqrt(c^T G c) for the float64 Gram matrix G of the units (one pass over the experts, products in float64),
  and one weighted sum in float64 makes the output. That is mergekit's iteration computed exactly (its
  ``dtype: float64`` run, to float32 rounding of the output); mergekit's float32 run differs from it by its
  own rounding, 1.3e-6 of the output's scale where an expert is nearly antipodal (coefficients of both signs,
  ~10x the output), and its float32 stopping test may stop an iteration earlier or later where |g| is
  within rounding of tol. (mergekit's reference for the method is arXiv:2603.04972.)

Each method computes in the float32 tensors the engine gives it; mergekit, with ``dtype: float32``, does
the same, so results agree to float32 rounding. karcher is the exception: its iteration runs in float64 (above),
and it agrees to float32 rounding with mergekit's ``dtype: float64`` run.
"""

from __future__ import annotations

import math

import torch

from mergebench.core.errors import ParameterError
from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import BLOCK, gram, one_thread, spans, task_vectors_
from mergebench.core.registry import MergeMethod, Param
from mergebench.plugins.checks import ONE_EXPERT_HINT, expert_count

Tensor = torch.Tensor
MERGEKIT_SOURCE = "https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/"
T_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))  # 0.1 .. 0.9


# ---- shared spherical maths ---------------------------------------------------------------------

def cosine(v0: Tensor, v1: Tensor, n0: Tensor, n1: Tensor) -> Tensor:
    """sum((v0 / n0) * (v1 / n1)) along the last dim (keepdim), clamped to [-1, 1]; n0, n1: the guarded norms.

    Normalised before multiplying, as mergekit does: the same rounding, so the same lerp/slerp branch at
    exactly (anti)colinear inputs, where the rounding of cos decides it. v1 / n1 is formed by blocks (along
    dim 0, or the last dim for one row) into the product: the same bits with one temporary, not two. The blocks
    share one buffer: a fresh one per block, freed at once, was kept by glibc in an engine worker's arena (8 blocks,
    32 MiB, on a 24.6M-entry tensor)."""
    u = v0 / n0
    dim = 0 if u.dim() > 1 and u.shape[0] > 1 else -1
    length = u.shape[dim] if u.dim() else 1
    step = max(1, BLOCK * length // max(u.numel(), 1))
    buffer = torch.empty(min(step * (u.numel() // max(length, 1)), u.numel()), dtype=u.dtype, device=u.device)
    for start in range(0, length, step):
        k = min(step, length - start)
        n = n1.narrow(dim, start, k) if n1.dim() and n1.shape[dim] > 1 else n1
        block = v1.narrow(dim, start, k)
        u.narrow(dim, start, k).mul_(torch.div(block, n, out=buffer[:block.numel()].view(block.shape)))
    with one_thread(u.device):  # a long sum splits across threads, rounding otherwise: the same bits on any count
        return u.sum(-1, keepdim=True).clamp_(-1.0, 1.0)


def slerp_terms(cos: Tensor, t: float | Tensor, colinear: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(s0, s1, d) with slerp(v0, v1; t) = (s0 v0 + s1 v1) / d: sin((1-t)a), sin(ta), sin a for a = arccos(cos);
    lerp's (1 - t, t, 1) where ``colinear`` (where sin a ~ 0 the quotients are meaningless)."""
    theta = torch.acos(torch.where(colinear, 0.0, cos))  # finite on both branches
    s0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta))
    s1 = torch.where(colinear, t, torch.sin(t * theta))
    return s0, s1, torch.where(colinear, 1.0, torch.sin(theta))


def mix_(v0: Tensor, v1: Tensor, c0: Tensor, c1: Tensor) -> Tensor:
    """c0 v0 + c1 v1, in place in v0 and v1 (two products then one sum, as mergekit rounds)."""
    return v0.mul_(c0).add_(v1.mul_(c1))


def norm(x: Tensor, dim: int | None = None) -> Tensor:
    """The Euclidean norm of x (whole tensor), or along ``dim`` keeping it."""
    return torch.linalg.vector_norm(x) if dim is None else torch.linalg.vector_norm(x, dim=dim, keepdim=True)


# ---- slerp --------------------------------------------------------------------------------------

def slerp(base, experts, params, ctx):
    """slerp of the whole tensor from theta_0 (t = 0) to theta_1 (t = 1), lerp when nearly colinear"""
    (expert,) = experts
    if base.numel() == 0:
        return base
    a, b = base.reshape(1, -1), expert.reshape(1, -1)
    t = torch.tensor(params["t"], dtype=a.dtype, device=a.device)  # mergekit's t is a float32 tensor
    na, nb = norm(a, -1), norm(b, -1)
    na = torch.where(na > 1e-8, na, 1.0)
    nb = torch.where(nb > 1e-8, nb, 1.0)
    cos = cosine(a, b, na, nb)
    s0, s1, d = slerp_terms(cos, t, cos.abs() > 0.9995)
    return mix_(a, b, s0 / d, s1 / d).view(base.shape)  # mergekit's slerp: coefficients first


# ---- nuslerp ------------------------------------------------------------------------------------

def nuslerp(base, experts, params, ctx):
    """slerp of the two experts (or their task vectors) by t = w_2 / (w_1 + w_2), per tensor or per row"""
    w0, w1 = ctx.weights
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    if base is not None:
        task_vectors_(base, experts)
    v0, v1 = experts
    shape = v0.shape
    row_wise = params["nuslerp_row_wise"] and not params["nuslerp_flatten"]
    if params["nuslerp_flatten"]:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    n0, n1 = norm(v0, -1).clamp_(min=1e-7), norm(v1, -1).clamp_(min=1e-7)
    cos = cosine(v0, v1, n0, n1)
    s0, s1, d = slerp_terms(cos, t, (1 - cos.square()) <= 1e-16)
    out = mix_(v0, v1, s0, s1).div_(d)  # mergekit's nuslerp: divided last
    out = (out.transpose(0, -1) if row_wise else out).reshape(shape)
    return out if base is None else out.add_(base)


def _check_nuslerp(params, weights):
    expert_count("nuslerp", 2, "give two experts (and optionally a base)")(params, weights)


# ---- multislerp ---------------------------------------------------------------------------------

def multislerp(base, experts, params, ctx):
    """[theta_0 +] (sum_i w_i |v_i|) * normalise(sum_i w_i v_i / (|v_i| + eps))"""
    if len(experts) == 1:
        return experts[0]
    eps = params["eps"]
    weights = torch.tensor(ctx.weights, dtype=torch.float32)
    if params["normalize_weights"]:
        weights = weights / weights.sum()
    weights = weights.tolist()  # float32 values, as mergekit's weight tensor holds
    vs = task_vectors_(base, experts) if base is not None else experts
    norms = [norm(v) for v in vs]
    # M = sum_i (v_i / (n_i + eps)) * w_i with mergekit's roundings (not one fused multiply-add), so that
    # exactly cancelling directions give exactly 0 and take the same branch below
    direction, term = torch.zeros_like(vs[0]), torch.empty(min(BLOCK, vs[0].numel()), dtype=vs[0].dtype,
                                                                   device=vs[0].device)
    flat = direction.view(-1)
    for v, n, w in zip(vs, norms, weights):
        v = v.reshape(-1)
        for start, stop in spans(flat.numel(), BLOCK):  # a block's term at a time: the same bits as a whole one
            flat[start:stop].add_(torch.div(v[start:stop], n + eps, out=term[:stop - start]).mul_(w))
    direction_norm = norm(direction)
    if direction_norm.item() < eps:
        if len(vs) != 2 and any(n.item() > 0 for n in norms):
            raise ParameterError(
                f"multislerp: in tensor '{ctx.name}' the weighted sum of the experts' directions is zero (antipodal "
                f"experts with weights that balance out); change the weights")
        direction = vs[0].mul_(weights[0])  # mergekit's linear fallback (zero when every v_i is zero)
        for v, w in zip(vs[1:], weights[1:]):
            direction.add_(v.mul_(w))
    else:
        direction.mul_(sum(n * w for n, w in zip(norms, weights)) / direction_norm)
    return direction if base is None else direction.add_(base)


def _check_multislerp(params, weights):
    if params["normalize_weights"] and sum(weights) == 0:
        raise ParameterError("multislerp: the expert weights sum to 0, so normalize_weights: true divides by 0; "
                             "change the weights or set normalize_weights: false")


# ---- karcher ------------------------------------------------------------------------------------

def karcher(base, experts, params, ctx):
    """(sum_i alpha_i |theta_i|) * the alpha-weighted Karcher mean of the directions theta_i / |theta_i|.

    The mean and every step stay in the span of the units, so the iteration runs on their coefficients over the
    float64 Gram matrix of the experts (N x N, one pass over them), and one weighted sum makes the output."""
    if len(experts) == 1:
        return experts[0]
    tol = params["tol"]
    total = sum(ctx.weights)
    alphas = [w / total for w in ctx.weights]
    flat = [x.view(-1) for x in experts]
    with one_thread(flat[0].device) as threads:
        # <theta_i, theta_j> in float64 throughout (float32 products' rounding, times the ~10x cancellation of nearly
        # opposite experts, reached 2e-6 of the output), the same bits on any thread count
        products = gram(flat, threads, dtype=torch.float64).cpu()
    norms = products.diagonal().sqrt()
    scale = sum(a * float(n) for a, n in zip(alphas, norms))
    valid = [i for i, n in enumerate(norms.tolist()) if n > tol]
    if not valid:
        return experts[0].zero_()
    n = norms[valid]
    units = products[valid][:, valid] / torch.outer(n, n)  # <u_i, u_j>
    coeffs = torch.tensor([alphas[i] for i in valid], dtype=torch.float64)
    coeffs /= coeffs.sum()
    mean = karcher_coefficients(units, coeffs, params["max_iter"], tol)
    weights = (mean * scale / n).tolist()  # theta = scale * sum_i mean_i u_i = sum_i (scale mean_i / n_i) theta_i
    # summed in float64: nearly opposite experts get coefficients of both signs, ~10x the output's size
    out = flat[valid[0]]
    acc = torch.empty(min(BLOCK, out.numel()), dtype=torch.float64, device=out.device)
    for start, stop in spans(out.numel(), BLOCK):
        block = acc[:stop - start]
        block.copy_(out[start:stop]).mul_(weights[0])
        for i, w in zip(valid[1:], weights[1:]):
            block.add_(flat[i][start:stop], alpha=w)
        out[start:stop] = block
    return out.view(experts[0].shape)


def karcher_coefficients(units: Tensor, coeffs: Tensor, max_iter: int, tol: float) -> Tensor:
    """The Karcher mean of unit vectors u_i as coefficients m = sum_i c_i u_i, from their Gram matrix ``units``
    (float64): mergekit's iteration (module docstring) with every vector written in that basis, so dots are G c and
    norms sqrt(c^T G c)."""
    def length(c: Tensor) -> float:
        return max(float(c @ units @ c), 0.0) ** 0.5

    mean = coeffs.clone()
    mean_norm = length(mean)
    if mean_norm < tol:
        mean = torch.zeros_like(coeffs)
        mean[0] = 1.0
    else:
        mean /= mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i, dot in enumerate((units @ mean).clamp(-1.0, 1.0).tolist()):
            theta = math.acos(dot)
            if theta < tol:
                continue
            # c (a / sin a) (u - cos a m): the log map of u at m
            step = -dot * mean
            step[i] += 1.0
            tangent += coeffs[i] * (theta / math.sin(theta)) * step
        tangent_norm = length(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + (math.sin(tangent_norm) / tangent_norm) * tangent
        unit_norm = length(mean)
        if unit_norm > tol:
            mean /= unit_norm
    return mean


def _check_karcher(params, weights):
    if any(w <= 0 for w in weights):
        raise ParameterError(f"karcher: expert weights must be positive (they weight a mean), got {list(weights)}")


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="slerp",
            description="Spherical interpolation from the base (t = 0) to one expert (t = 1), tensor by tensor.",
            reference="Shoemake, Animating rotation with quaternion curves, SIGGRAPH 1985; mergekit "
                      + MERGEKIT_SOURCE + "slerp.py",
            params=(Param("t", float, 0.5, "interpolation factor: 0 gives the base, 1 the expert (outside: extrapolation)"),),
            merge=slerp,
            check=expert_count("slerp", 1, ONE_EXPERT_HINT),
            search_space={"t": T_GRID},
        )
    )
    register(
        MergeMethod(
            name="nuslerp",
            description="Spherical interpolation of two experts (or their task vectors) at t = w2 / (w1 + w2).",
            reference="mergekit " + MERGEKIT_SOURCE + "nuslerp.py",
            params=(
                Param("nuslerp_flatten", bool, True, "one slerp over the whole tensor (else one per row or column)"),
                Param("nuslerp_row_wise", bool, False,
                      "without flatten: slerp slices along dim 0 (W[:, j]) instead of the last dim (W[i, :])"),
            ),
            merge=nuslerp,
            check=_check_nuslerp,
            needs_base=False,
            search_space={"nuslerp_flatten": (True, False)},
        )
    )
    register(
        MergeMethod(
            name="multislerp",
            description="Weighted spherical mean of the experts' directions (or task vectors), scaled by the mean norm.",
            reference="Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea; mergekit "
                      + MERGEKIT_SOURCE + "multislerp.py",
            params=(
                Param("normalize_weights", bool, True, "divide the expert weights by their sum"),
                Param("eps", float, 1e-8, "added to each norm before dividing; below it the mean direction is zero",
                      min=0.0),
            ),
            merge=multislerp,
            check=_check_multislerp,
            needs_base=False,
            # equal inputs come back scaled by the summed weights unless those are normalised
            fixed_point=lambda params, weights, _: params["normalize_weights"] or sum(weights) == 1.0,
        )
    )
    register(
        MergeMethod(
            name="karcher",
            description="Karcher (Riemannian) mean of the experts' directions on the sphere, scaled by the mean norm.",
            reference="Karcher, Riemannian center of mass and mollifier smoothing, CPAM 1977; mergekit "
                      + MERGEKIT_SOURCE + "karcher.py",
            params=(
                Param("max_iter", int, 10, "iterations of the Riemannian gradient step at most", min=0),
                Param("tol", float, 1e-5, "stop when the step's norm is below it; norms and angles below it are 0",
                      min=0.0),
            ),
            merge=karcher,
            check=_check_karcher,
            needs_base=False,
            ignores_base=True,
        )
    )
