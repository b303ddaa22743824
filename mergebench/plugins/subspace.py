"""Subspace merging: TSV-M, Iso-C and Iso-CTS, built on the singular vectors of each weight matrix's task vectors.

Per tensor, with tau_t = w_t (theta_t - theta_0) (t = 1..N; the expert weight w_t scales the task vector
first, as fusion-bench's per-model ``alpha`` does; default 1) and r = min(rows, cols):

    tsv_m    each tau_t = U_t S_t V_t^T; keep its top k triplets, k = floor(r / N) (``rank_fraction`` = 0) or
             floor(rank_fraction * r); U = [U_1k .. U_Nk], S = [S_1k .. S_Nk], V = [V_1k .. V_Nk];
             delta = polar(U) diag(S) polar(V)^T
    iso_c    M = sum_t tau_t = U S V^T;  delta = mean(S) U V^T                    (isotropic spectrum)
    iso_cts  M = sum_t tau_t = U S V^T; common subspace U_c = U[:, :k_c]; per task, the top s triplets of
             tau_t - U_c U_c^T tau_t; U = [U_ts,1 .. U_ts,N, U_c], V likewise, S = [S_ts,1 .. S_ts,N, S[:k_c]];
             delta = mean(S) polar(U) polar(V)^T
    theta = theta_0 + alpha * delta

polar(A) = P Q^T for A = P Sigma Q^T (thin SVD), the orthonormal matrix nearest to A (orthogonal Procrustes):
the papers' decorrelation ("U_orth = P Q^T from U_cat = P S Q^T, same for V").

Sources: Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, arXiv:2412.00081
(code: AntoAndGar/task_singular_vectors, ``compute_and_sum_svd_mem_reduction``); Marczak et al., No Task Left
Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, arXiv:2502.04959 (code:
danielm1405/iso-merging, ``iso_c`` and ``iso_cts``). fusion-bench 0.2.33 carries both unchanged
(``method/task_singular_vector/utils/TSVM_utils.py``, ``method/isotropic_merging/iso_utils.py``).

Conventions that change numbers (the authors' code unless said):
- Which tensors: every 2-D tensor, embeddings and output head included (the authors apply the rule to every
  2-D tensor of CLIP's ViT, positional embedding and projection included, and exclude only tensors named
  ``text_projection``). Every other tensor (norms, biases, scalars, >2-D) gets the mean of the task vectors,
  sum_t tau_t / N, scaled by alpha like the rest (the authors' fallback, in all three).
- SVD: exact thin SVD (``torch.linalg.svd(full_matrices=False)``, float32, on the tensors' device), no
  randomised or truncated solver. Singular vectors are defined up to sign (and, for equal singular values,
  up to a rotation inside their subspace); every formula above is invariant under both, so the choice
  LAPACK or cuSOLVER makes does not change the result beyond float32 rounding.
- Numerical rank: a singular triplet of a decomposed matrix A counts only where sigma > max(rows, cols) *
  eps_float32 * scale. The others have arbitrary singular vectors (any orthonormal completion LAPACK picks),
  and the authors' code keeps them: in a rank-deficient matrix Iso-C gives those arbitrary directions the full
  mean singular value, and TSV-M's polar factor of U mixes them into the other tasks' directions (its polar
  factor is not unique where U has dependent columns, e.g. experts sharing directions). We drop them, so the
  result is unique; on full-rank inputs (any real fine-tune) nothing is dropped and the result is the
  authors'. scale is A's largest singular value (numpy's ``matrix_rank`` rule) for TSV-M's task vectors and
  inside polar(); for Iso's sum of task vectors, the larger of that and max_t ||tau_t||_F; for Iso-CTS's
  projected task vectors, ||tau_t||_F before projection: a sum's and a projection's rounding is relative to
  their inputs, and Iso gives every kept direction the mean singular value, so rounding noise left by
  cancelling task vectors, or by projecting out a task vector that lies in the common subspace, must not count.
  Mean singular values are still taken over all r slots (dropped ones included), as the authors' code.
- TSV-M's k: floor(r / N) by default (the authors compute int(r * (1 / N)), which agrees except where 1/N's
  float rounding makes r * (1/N) fall just below an integer, e.g. N = 49). Where k = 0 (r < N) the authors'
  code keeps nothing, dropping the matrix's update: we use the mean fallback for it instead. Ties in
  singular value at the cut (sigma_k = sigma_k+1) make the kept subspace non-unique, as in the paper;
  random-looking real spectra do not have them. ``rank_fraction`` > 0 sets k = floor(rank_fraction * r)
  for every task (N k may then exceed r; polar() then has rank < N k and keeps its numerical rank).
- TSV-M concatenates only the kept triplets (m x Nk); the authors zero-pad to m x r, which changes nothing
  (zero columns meet zero singular values).
- Iso-C sums the task vectors (the paper; fusion-bench's ``iso_c`` too). The TSV authors' later copy of it
  (src/utils/iso.py) takes the mean: their alpha a is our a / N.
- Iso-CTS sizes, as the authors' code: k_c = int(r * common_space_fraction) (default 0.8, the paper's), then
  k_c = r - round((r - k_c) / N) * N with Python's round (halves to even) so the task-specific part splits
  evenly, s = (r - k_c) / N per task. Where that rounding would make k_c negative (r < N, small fractions;
  the authors' code then fails), one task-specific share fewer is kept. common_space_fraction = 1 is Iso-C.
- alpha: the papers tune it on validation over 0.1, 0.2, ..., 3.0 (the authors' code:
  ``np.linspace(0, 3, 31)[1:]``, for TSV-M too); TSV-M's default is alpha = 1, and fusion-bench defaults all
  three to 1, as we do. ``search_space`` takes every other point of that grid: 0.2, 0.4, ..., 3.0.

Reproducibility: the tasks are taken in a canonical order (their weighted task vectors' float32 bits compared
lexicographically in flat order), so the experts' order changes nothing, not even the last bits (the maths is
order-free, but SVDs of the same columns in another order round differently). On the CPU the linear algebra
runs on one thread, because MKL's SVD rounds differently on different thread counts: the streaming engine's
workers run one thread each and in-memory sweeps several, so without it a sweep's chosen point and
``mergebench merge`` of it would differ in the last bits on large matrices. On a GPU the tensors stay there
(no host copies; only scalars such as ranks are read back).

Memory, per matrix of m x n, beyond the N + 1 float32 inputs: LAPACK's copy of the matrix being decomposed,
its U (m x r) and V^T (r x n), the kept triplets (TSV-M: N k (m + n) <= r (m + n); Iso-CTS: r (m + n)) and
Iso-CTS's sum of the task vectors; the delta is written over a scratch input. Speed: Iso-C takes one SVD per
matrix, TSV-M N + 2 and Iso-CTS N + 3 (each task vector, then the two polar factors).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import cmp_to_key

import torch

from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import task_vectors_
from mergebench.core.registry import MergeMethod, Param

EPS32 = torch.finfo(torch.float32).eps
# the authors' alpha grid, 0.1 .. 3.0 by 0.1, every other point
ALPHA_GRID = tuple(round(0.2 * i, 1) for i in range(1, 16))
TSV = ("Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, arXiv:2412.00081")
ISO = ("Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
       "arXiv:2502.04959")

ALPHA = Param("alpha", float, 1.0, "scale applied to the merged task vector", min=0.0, max=10.0)


@contextmanager
def _one_thread(device: torch.device):
    """One CPU thread for LAPACK: its SVD's rounding depends on the thread count (see the module docstring)."""
    old = torch.get_num_threads()
    if device.type != "cpu" or old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def numerical_rank(s: torch.Tensor, shape: tuple[int, ...], scale: torch.Tensor | float | None = None) -> int:
    """How many of the descending singular values ``s`` of a matrix of ``shape`` exceed
    max(shape) * eps_float32 * scale (default scale: s[0], numpy's ``matrix_rank`` rule)."""
    if s.numel() == 0:
        return 0
    return int((s > max(shape) * EPS32 * (s[0] if scale is None else scale)).sum())


def thin_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(x, full_matrices=False)``, always decomposing the tall orientation: LAPACK's path for
    a wide matrix is about twice as slow on the CPU as the same factorisation of its transpose."""
    if x.shape[0] >= x.shape[1]:
        return torch.linalg.svd(x, full_matrices=False)
    u, s, vh = torch.linalg.svd(x.T, full_matrices=False)
    return vh.T, s, u.T


def polar(a: torch.Tensor) -> torch.Tensor:
    """P Q^T over the numerical rank of a = P Sigma Q^T: the nearest matrix with orthonormal columns (if a has
    full column rank), a partial isometry on a's range otherwise."""
    p, s, qh = thin_svd(a)
    k = numerical_rank(s, tuple(a.shape))
    return p[:, :k] @ qh[:k]


def _bit_order(a: torch.Tensor, b: torch.Tensor) -> int:
    """-1, 0 or 1: a's and b's float32 bits compared as int32, at the first flat index where they differ."""
    a, b = a.reshape(-1).view(torch.int32), b.reshape(-1).view(torch.int32)
    i = torch.argmax((a != b).to(torch.uint8))  # the first difference (0 when there is none)
    return int(torch.sign(a[i].long() - b[i].long()))


def _weighted_task_vectors_(base, experts, weights) -> list[torch.Tensor]:
    """tau_t = w_t (theta_t - theta_0), in place in the scratch expert tensors, in a canonical order (their
    bits, lexicographically): the maths is order-free, and so are its float32 roundings then."""
    taus = task_vectors_(base, experts)
    for tau, w in zip(taus, weights):
        if w != 1.0:
            tau.mul_(w)
    return sorted(taus, key=cmp_to_key(_bit_order))


def _sum_(taus: list[torch.Tensor]) -> torch.Tensor:
    """sum_t tau_t, accumulated in order into the first (scratch) tensor."""
    out = taus[0]
    for tau in taus[1:]:
        out.add_(tau)
    return out


def _mean_(taus: list[torch.Tensor]) -> torch.Tensor:
    """The fallback for tensors that are not matrices: sum_t tau_t / N."""
    return _sum_(taus).div_(len(taus))


def _largest_norm(taus: list[torch.Tensor]) -> torch.Tensor:
    """max_t ||tau_t||_F: the scale of the rounding in a sum of the task vectors."""
    return torch.stack([torch.linalg.vector_norm(tau) for tau in taus]).max()


def _is_matrix(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.numel() > 0


def tsv_k(rank: int, n: int, fraction: float) -> int:
    """Singular triplets kept per task: floor(rank / n), or floor(fraction * rank) when fraction > 0."""
    return rank // n if fraction <= 0 else int(fraction * rank)


def tsv_m_delta(base, experts, params, ctx):
    """TSV-M: the top-k singular triplets of every task vector, U and V decorrelated by their polar factors."""
    taus = _weighted_task_vectors_(base, experts, ctx.weights)
    k = tsv_k(min(base.shape), len(taus), params.get("rank_fraction", 0.0)) if _is_matrix(base) else 0
    if k == 0:
        return _mean_(taus)
    with _one_thread(base.device):
        us, ss, vs = [], [], []
        for tau in taus:
            u, s, vh = thin_svd(tau)
            kept = min(k, numerical_rank(s, tuple(tau.shape)))
            us.append(u[:, :kept].clone())
            ss.append(s[:kept].clone())
            vs.append(vh[:kept].clone())
            del u, s, vh
        s = torch.cat(ss)
        if s.numel() == 0:  # every task vector is zero
            return taus[0].zero_()
        u = polar(torch.cat(us, dim=1))
        del us
        v = polar(torch.cat(vs, dim=0).T)
        del vs
        return torch.matmul(u.mul_(s), v.T, out=taus[0])


def iso_c_delta(base, experts, params, ctx):
    """Iso-C: the summed task vectors with every singular value replaced by their mean."""
    taus = _weighted_task_vectors_(base, experts, ctx.weights)
    if not _is_matrix(base):
        return _mean_(taus)
    with _one_thread(base.device):
        norm = _largest_norm(taus)
        total = _sum_(taus)
        u, s, vh = thin_svd(total)
        kept = numerical_rank(s, tuple(total.shape), torch.maximum(s[0], norm))
        return torch.matmul(u[:, :kept].mul(s.mean()), vh[:kept], out=total)


def iso_cts_sizes(rank: int, n: int, common_fraction: float) -> tuple[int, int]:
    """(k_c, s): the common subspace's size and each task's share, k_c + n s = rank (the authors' rounding)."""
    common = int(rank * common_fraction)
    specific = round((rank - common) / n) * n  # Python's round: halves to even, as the authors' code
    if specific > rank:  # only for tiny ranks: keep k_c >= 0
        specific -= n
    return rank - specific, specific // n


def iso_cts_delta(base, experts, params, ctx):
    """Iso-CTS: the summed task vectors' top subspace plus each task's top directions outside it, decorrelated,
    with an isotropic spectrum."""
    taus = _weighted_task_vectors_(base, experts, ctx.weights)
    if not _is_matrix(base):
        return _mean_(taus)
    rank, n = min(base.shape), len(taus)
    k_c, share = iso_cts_sizes(rank, n, params.get("common_space_fraction", 0.8))
    with _one_thread(base.device):
        norm = _largest_norm(taus)
        total = taus[0].clone()
        for tau in taus[1:]:
            total.add_(tau)
        u, s, vh = thin_svd(total)
        del total
        common = min(k_c, numerical_rank(s, tuple(base.shape), torch.maximum(s[0], norm)))
        u_c, vh_c = u[:, :common].clone(), vh[:common].clone()
        mass = s[:k_c].sum()  # the authors' mean runs over all r slots, dropped triplets included
        del u, s, vh
        us, vs = [], []
        for tau in taus:
            if share == 0:
                break
            norm = torch.linalg.vector_norm(tau)
            specific = tau.sub_(u_c @ (u_c.T @ tau))  # tau_t - U_c U_c^T tau_t, in place (scratch)
            u, s, vh = thin_svd(specific)
            # the projection's rounding is relative to tau_t, not to what is left of it
            kept = min(share, numerical_rank(s, tuple(specific.shape), norm))
            us.append(u[:, :kept].clone())
            vs.append(vh[:kept].clone())
            mass = mass + s[:share].sum()
            del u, s, vh
        us.append(u_c)
        vs.append(vh_c)
        u = polar(torch.cat(us, dim=1))
        del us
        v = polar(torch.cat(vs, dim=0).T)
        del vs
        if u.shape[1] == 0:
            return taus[0].zero_()
        return torch.matmul(u.mul_(mass / rank), v.T, out=taus[0])


RANK_FRACTION = Param("rank_fraction", float, 0.0,
                      "fraction of each task vector's singular triplets kept (of min(rows, cols)); 0: 1/N, the paper's",
                      min=0.0, max=1.0)
COMMON_SPACE_FRACTION = Param("common_space_fraction", float, 0.8,
                              "fraction of min(rows, cols) given to the summed task vectors' top subspace",
                              min=0.0, max=1.0)

TSV_M = MergeMethod(
    name="tsv_m",
    description="Keep each task vector's top singular triplets, decorrelate them across tasks, add them.",
    reference=TSV, params=(ALPHA, RANK_FRACTION), delta=tsv_m_delta, scale_param="alpha",
    search_space={"alpha": ALPHA_GRID})
ISO_C = MergeMethod(
    name="iso_c",
    description="Sum the task vectors and flatten their singular spectrum to its mean (isotropic merging).",
    reference=ISO, params=(ALPHA,), delta=iso_c_delta, scale_param="alpha", search_space={"alpha": ALPHA_GRID})
ISO_CTS = MergeMethod(
    name="iso_cts",
    description="Iso-C on the common subspace plus each task's own top directions, decorrelated, isotropic.",
    reference=ISO, params=(ALPHA, COMMON_SPACE_FRACTION), delta=iso_cts_delta, scale_param="alpha",
    search_space={"alpha": ALPHA_GRID})


@hookimpl
def register_merge_methods(register):
    for method in (TSV_M, ISO_C, ISO_CTS):
        register(method)
