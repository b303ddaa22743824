"""RegMean: merge each linear layer so that it best reproduces every expert's outputs on that expert's inputs.

For a linear weight W_i (out x in, y = W x) of expert i and the Gram matrix G_i = X_i^T X_i of the
layer's inputs over the calibration data (rows of X_i: one per token, :mod:`mergebench.core.calibration`),
RegMean (Jin et al., arXiv:2212.09849, eq. 2 and section 3.2) minimises sum_i w_i ||X_i W^T - X_i W_i^T||^2:

    G~_i = alpha * G_i + (1 - alpha) * diag(G_i)                 off-diagonal entries scaled by alpha
    W*   = (sum_i w_i W_i G~_i) (sum_i w_i G~_i)^-1               (out x in)

The paper writes it for y = x W (W in x out): W* = (sum_i G~_i)^-1 sum_i G~_i W_i, the transpose of the
line above. ``alpha`` is FusionBench's ``reduce_non_diagonal_ratio``; alpha = 1 is the plain regression
solution, smaller alpha pulls the merge towards the per-input-feature weighted mean. The per-expert weights
w_i (``ctx.weights``, default 1: the paper's unweighted sum) scale each expert's regression term.

- G_i is the sum over tokens (the paper), not FusionBench's mean over tokens: the two differ only when
  experts saw different numbers of tokens, and the sum lets an expert with more data count for more.
- transformers' ``Conv1D`` (GPT-2) stores W as in x out: it is transposed, merged, and transposed back.
- Every other floating-point tensor (embeddings, norms, biases, a tied embedding / output head) and any
  linear weight without a statistic is averaged, sum_i w_i theta_i / sum_i w_i, as in the paper and
  FusionBench. The base, when given, takes no part.

Numerics: A = sum_i w_i G~_i (symmetric positive semi-definite) and B = sum_i w_i G~_i W_i^T are formed in
float64 on the merge's device and A X = B is solved by a Cholesky factorisation (no explicit inverse) of
A scaled to a unit diagonal (D^-1/2 A D^-1/2, D = diag(A)), so that input features of very different
scales (LLM activations have a few huge ones) are judged alike.
- An input feature never active in the data (a zero row and column of every G_i) is left out of the
  solve; its column of W* is the weighted mean.
- When the scaled A is singular or nearly so (fewer tokens than inputs, or collinear inputs, with
  alpha = 1: a Cholesky pivot^2 below 1.2e-7 x in_features, float32's resolution of the accumulated
  Grams times the size, numpy's matrix_rank rule), the regression does not determine W* there. We take
  the weighted mean W_bar plus the minimum-norm correction (in the scaled coordinates), X = W_bar^T +
  pinv(A) (B - A W_bar^T), pinv from an eigendecomposition dropping eigenvalues below that tolerance:
  directions the data constrains get the regression solution, the rest keep the mean.
- With alpha < 1 the scaled A has eigenvalues of at least 1 - alpha, so (for 1 - alpha above the
  tolerance) the Cholesky path is taken.
Memory per linear tensor: beyond the engine's (N + 2) copies of the weight and the N Grams, the solve goes by
blocks of output columns of about 2^20 float64 entries (independent given one factorisation of A) and writes each
over expert 0's scratch copy. Every block of B needs every w_i G~_i, so one of the two is held whole, whichever is
smaller: B (in x out float64; then each w_i G~_i is formed once, added into A and B, and dropped), or, where
out > N x in (output heads), the N w_i G~_i (N x in x in float64). Beside it, A and its factor (two in x in
float64), and the mean and the solve's temporaries for one block. (Holding the N w_i G~_i for every layer, as
before, cost an MLP down projection of 0.1B, in = 2048, 268 MB of float64 at N = 8, twice its float32 Grams.)
"""

from __future__ import annotations

import torch

from mergebench.core.calibration import CalibrationRequest, Gram
from mergebench.core.errors import InputError, ParameterError
from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import BLOCK, weighted_sum
from mergebench.core.registry import MergeMethod, Param

_RTOL_PER_INPUT = 1.2e-7  # float32 machine epsilon: the Grams are accumulated in float32


def weighted_mean(experts, weights):
    """sum_i w_i theta_i / sum_i w_i"""
    return weighted_sum(experts, weights).div_(sum(weights))


def reduce_non_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G): the off-diagonal entries scaled by alpha, the diagonal kept (in place)."""
    diagonal = gram.diagonal().clone()
    gram.mul_(alpha).diagonal().copy_(diagonal)
    return gram


class PSDSolver:
    """Solves A X = B for a symmetric positive semi-definite A, a block of B's columns at a time (the columns
    are independent: one factorisation serves them all); where A is (nearly) singular, ``fallback`` plus the
    minimum-norm correction (module docstring). Solved for Y = D^1/2 X with the unit-diagonal D^-1/2 A D^-1/2
    (D = diag(A)), so the tolerance is relative per input feature, whatever their scales."""

    def __init__(self, a: torch.Tensor):
        d = a.diagonal()
        self.live = d > 0
        self.whole = bool(self.live.all())
        if not self.whole:  # an input never active: its row and column of A are 0, its row of X is free
            self.inner = PSDSolver(a[self.live][:, self.live]) if bool(self.live.any()) else None
            return
        self.scale = d.rsqrt()
        a_hat = a * self.scale[:, None] * self.scale[None, :]
        tol = _RTOL_PER_INPUT * a.shape[0]  # A^ has unit diagonal
        factor, info = torch.linalg.cholesky_ex(a_hat)
        self.factor = factor if int(info) == 0 and float(factor.diagonal().square().min()) > tol else None
        if self.factor is None:  # only this path needs A^ again
            self.a_hat = a_hat
            values, self.vectors = torch.linalg.eigh(a_hat)
            keep = values > tol
            self.inverse = torch.where(keep, 1.0 / torch.where(keep, values, torch.ones_like(values)),
                                       torch.zeros_like(values))

    def solve(self, b: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        if not self.whole:
            out = fallback.clone()
            if self.inner is not None:
                out[self.live] = self.inner.solve(b[self.live], fallback[self.live])
            return out
        b_hat = b * self.scale[:, None]
        if self.factor is not None:
            return torch.cholesky_solve(b_hat, self.factor) * self.scale[:, None]
        start = fallback / self.scale[:, None]
        y = start + self.vectors @ (self.inverse[:, None] * (self.vectors.T @ (b_hat - self.a_hat @ start)))
        return y * self.scale[:, None]


def regmean(base, experts, params, ctx):
    """(sum_i w_i W_i G~_i)(sum_i w_i G~_i)^-1 for linear weights; the weighted mean elsewhere"""
    grams = ctx.statistics
    if grams is None or any(g is None for g in grams) or experts[0].dim() != 2:
        return weighted_mean(experts, ctx.weights)
    if not all(isinstance(g, Gram) for g in grams):
        raise InputError(f"regmean: the statistics for tensor '{ctx.name}' are not Gram matrices")
    transposed = grams[0].transposed
    weights_t = [e if transposed else e.T for e in experts]  # each W_i^T: in x out (a view)
    n_in, n_out = weights_t[0].shape
    for g in grams:
        if tuple(g.matrix.shape) != (n_in, n_in):
            raise InputError(f"regmean: the Gram matrix for tensor '{ctx.name}' is {list(g.matrix.shape)}, but the "
                             f"weight has {n_in} inputs; the calibration statistics belong to another model")
    device = experts[0].device

    def reduced(g: Gram, weight: float) -> torch.Tensor:  # w_i G~_i in float64
        return reduce_non_diagonal(g.matrix.to(device, torch.float64, copy=True), params["alpha"]).mul_(weight)

    step = max(1, BLOCK // n_in)  # output columns per block: B's block is about BLOCK float64 entries
    blocks = [(c, min(step, n_out - c)) for c in range(0, n_out, step)]
    # Each block of B needs every w_i G~_i. Whichever is smaller is held whole: B (in x out float64), each w_i G~_i
    # then formed once, added into A and every block of B, and dropped; or (output heads: out > N in) the N w_i G~_i
    # (N x in x in float64), with B formed one block at a time
    by_expert = n_out <= max(step, len(grams) * n_in)
    a = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
    bs = [torch.zeros(n_in, k, dtype=torch.float64, device=device) for _, k in blocks] if by_expert else None
    kept = None if by_expert else []
    for w_t, g, weight in zip(weights_t, grams, ctx.weights):
        gram = reduced(g, weight)
        a += gram
        if by_expert:
            for b, (c, k) in zip(bs, blocks):
                b.addmm_(gram, w_t[:, c:c + k].to(torch.float64))
        else:
            kept.append(gram)
        del gram
    solver = PSDSolver(a)
    del a
    # W*^T's columns c:c+k need only the experts' columns c:c+k: each block is written over expert 0's (its
    # scratch copy, already read for that block), so the output takes no memory of its own
    out_t = weights_t[0]
    for j, (c, k) in enumerate(blocks):
        if by_expert:
            b, bs[j] = bs[j], None
        else:
            b = torch.zeros(n_in, k, dtype=torch.float64, device=device)
        fallback = torch.zeros(n_in, k, dtype=torch.float64, device=device)  # the weighted mean, in float64
        for i, (w_t, weight) in enumerate(zip(weights_t, ctx.weights)):
            w64 = w_t[:, c:c + k].to(torch.float64)
            if not by_expert:
                b.addmm_(kept[i], w64)
            fallback.add_(w64, alpha=weight)
        fallback.div_(sum(ctx.weights))
        out_t[:, c:c + k] = solver.solve(b, fallback)
    return experts[0]


def check_weights(method: str):
    def check(params, weights):
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ParameterError(f"{method}: expert weights must be >= 0 with a positive sum (they weight each "
                                 f"expert's share of the merge), got {list(weights)}")
    return check


@hookimpl
def register_merge_methods(register):
    register(
        MergeMethod(
            name="regmean",
            description="Linear layers solved to reproduce each expert's outputs on calibration data "
                        "(Gram matrices of their inputs); other tensors averaged.",
            reference="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, arXiv:2212.09849",
            params=(Param("alpha", float, 0.9, "scale of the Gram matrices' off-diagonal entries (1: plain "
                                               "regression; FusionBench's reduce_non_diagonal_ratio)",
                          min=0.0, max=1.0),),
            merge=regmean,
            check=check_weights("regmean"),
            needs_base=False,
            ignores_base=True,
            calibration=lambda params: CalibrationRequest("gram"),
            search_space={"alpha": (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)},
        )
    )
