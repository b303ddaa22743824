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
- SVD: exact (no randomised or truncated solver), in float64 on the tensors' device, from the eigendecomposition
  of a Gram matrix (``GramSVD``): for A of m x n with m >= n, A^T A = V diag(s^2) V^T (``torch.linalg.eigh``;
  on the CPU, where only the top k triplets are kept, LAPACK's dsyevr of scipy's OpenBLAS, which computes only those)
  gives all r singular values s and the right vectors, and the left ones are formed only for the triplets kept,
  u_i = A v_i / s_i (m < n: A A^T, and v_i = A^T u_i / s_i). polar(A) over A's numerical rank k is
  A Q_k diag(1/s_k) Q_k^T with A^T A = Q diag(s^2) Q^T (A (A^T A)^(-1/2) on A's range; Q_k diag(1/s_k) Q_k^T A
  from A A^T when A is wide), and it is applied to the small factor first: polar(U) (diag(S) polar(V)^T).
  In exact arithmetic these are the thin SVD's triplets and polar factor. In float64 the Gram matrix of float32
  data carries a rounding of order eps64 s_1^2 (eps64 = 2^-53), which moves a singular value above the
  numerical-rank threshold below (>= max(rows, cols) eps32 s_1) by about eps64 s_1^2 / (2 s_i) <= (eps64 /
  eps32) s_1 ~ 1e-9 s_1, and its vectors by that much over the gap to the next singular value: less than a float32
  SVD's own rounding (eps32 s_1 over the gap), so the result is the exact SVDs' to float32 rounding, and closer
  than float32 LAPACK's: on the 0.1B benchmark's N = 8 tensors (random spectra, singular values 1e-3 apart),
  4e-8 of the largest entry from float64 LAPACK references, where float32 SVDs were 2e-5 to 3e-4 off. A zero
  singular value comes out as about sqrt(eps64) s_1 = 1e-8 s_1, below that threshold (>= 2.4e-7 s_1), so the
  rank rule keeps its meaning. Singular vectors are defined up to sign (and, for equal singular values, up to a
  rotation inside their subspace); every formula above is invariant under both.
- Iso-CTS's projected task vectors tau_t - U_c U_c^T tau_t are decomposed without being formed. Where rows <=
  cols, M M^T's eigenvectors are all of U (orthogonal), so I - U_c U_c^T = U_o U_o^T with U_o the columns of U
  after the common ones, and the projection's SVD is U_o times that of the (r - k_c) x cols matrix U_o^T tau_t.
  Where rows > cols, its Gram matrix is tau_t^T tau_t - z^T z with z = U_c^T tau_t (a projector is idempotent),
  and u_i = (tau_t v_i - U_c z v_i) / s_i; the subtraction's rounding (of order eps64 ||tau_t||^2) moves a
  singular value above its threshold (max(rows, cols) eps32 ||tau_t||) by at most about (eps64 / eps32)
  ||tau_t||, far below the float32 rounding (eps32 ||tau_t||) of the projection formed in float32.
- Iso-CTS's polar(U), U = [U_c | Y] (Y: the task-specific columns), is [U_c | polar(Y)]: U_c's columns are
  orthonormal and Y's lie outside their span, so U^T U is block-diagonal, with I as U_c's block. In float64, U_c
  from eigenvectors (rows <= cols) is orthonormal to rounding; as M v_i / s_i (rows > cols) to about eps64 (s_1 /
  s_i)^2 <= eps64 / (max(rows, cols) eps32)^2 ~ 2e-9 over the kept s_i, and the projected Y is orthogonal to U_c
  to about eps64 / (max(rows, cols) eps32); both below float32 rounding. The numerical rank of Y is counted with
  U's shape and scale (||Y||_2 >= 1 = ||U_c||_2, each task's columns being orthonormal), so it drops what the
  whole U's would. polar(V), V = [V_c | V_s], has no such blocks (V_s is not orthogonal to V_c), but V_c is
  orthonormal (to the same rounding), so V^T V is the identity plus a matrix of rank <= 2 N s
  (``polar_beside_orthonormal``): a 2 N s x 2 N s eigendecomposition instead of an r x r one. On the 0.1B
  benchmark's matrices the two moved the result by at most 6e-8 of the largest entry.
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
order-free, but Gram matrices of the same columns in another order round differently). On the CPU the linear
algebra runs on one thread, because MKL's products and eigendecompositions may round differently on different
thread counts: the streaming engine's workers run one thread each and in-memory sweeps several, so without it a
sweep's chosen point and ``mergebench merge`` of it could differ in the last bits on large matrices. On a GPU the
tensors stay there (no host copies; only scalars such as ranks are read back).

Memory, per matrix of m x n (r = min(m, n)), beyond the N + 1 float32 inputs: a tall matrix (m > n: embeddings,
output heads, up projections) is read in float64 a block of ``ROWS`` rows at a time (a task vector, or Iso's sum of
them formed block by block), never copied whole; a wide one is held in float64 once. Then its r x r Gram matrix
and eigenvectors, and the kept left singular vectors, written straight into one m x (kept) float64 matrix (TSV-M:
N k <= r columns, its task vectors released as they are decomposed; Iso-CTS where rows <= cols: at most r; no
concatenated copy). Iso-CTS on a tall matrix holds no such U, which would be two float32 copies of the tensor beside
its N + 1 inputs: first U_c^T tau_t (k_c x n) for every task, then only U's task-specific columns (m x (r - k_c),
0.4 float32 copies at the default k_c = 0.8 r), U_c's rows being formed from the summed task vectors' where needed
(``TaskDirections``; M's rows formed again in two more passes, 36.4 s against 34.0 s for the 0.1B merge at N = 8).
The delta is written over a scratch input ``ROWS`` rows at a time, without an m x n float64 copy.

Speed: no SVD; the work is r x r eigendecompositions (float64 ``eigh``) and float64 products about the size of
the tensor (a Gram matrix, lower triangle only: about m r^2). Iso-C takes one eigendecomposition per matrix,
TSV-M N + 2 (each task vector, then the two polar factors) and Iso-CTS one of r x r (the sum's) where rows <= cols
(its projected task vectors' Gram matrices are then (r - k_c) x (r - k_c) where the sum has full rank) and N + 1
otherwise, and two of at most 2 N s for its polar factors (below). On one CPU thread a float64 ``eigh``
of 768 x 768 costs about what a float32 SVD of a 768 x 768 matrix does (0.15 s), and a tall 32000 x 768 task
vector takes its Gram matrix (0.7 s) and one such ``eigh`` instead of a 2 s SVD: on the 0.1B benchmark (N = 8)
TSV-M's CPU time fell from 138 s to 97 s (TIES: 11 s), and Iso-CTS no longer fails (MKL's float32 SVD did not
converge on one of its matrices there). On GPUs with slow float64 (consumer cards) the route costs more than on the
CPU relative to float32 maths. On the CPU, TSV-M's and Iso-CTS's per-task decompositions compute only the top k
eigenpairs (scipy's dsyevr: 38 ms instead of 72 ms for 768 x 768 at k = 96) and Gram matrices come from BLAS's
dsyrk (1.4x the blocked products): TSV-M on the 0.1B benchmark at N = 8 went from 53.0 s to 48.7 s. scipy's
OpenBLAS is set to one thread for the process the first time (its rounding, like MKL's, may depend on it).
scipy's wrappers hold the GIL, so two engine workers' dsyevr and dsyrk calls did not overlap (eight dsyevr calls:
0.43 s on one thread and on two; torch's eigh, which releases it: 0.92 s and 0.42 s); the same routines of the
same library called through ctypes (``mergebench.core.lapack``), which lets go of the GIL, give the same bits and
took TSV-M on that benchmark from 49.0 s to 36.6 s.
"""

from __future__ import annotations

from functools import cmp_to_key
from typing import Protocol

import numpy as np
import torch

from mergebench.core import lapack
from mergebench.core.hookspecs import hookimpl
from mergebench.core.merge_ops import one_thread, ordered_map, release_, task_vectors_
from mergebench.core.registry import MergeMethod, Param

EPS32 = torch.finfo(torch.float32).eps
# the authors' alpha grid, 0.1 .. 3.0 by 0.1, every other point
ALPHA_GRID = tuple(round(0.2 * i, 1) for i in range(1, 16))
TSV = ("Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, arXiv:2412.00081")
ISO = ("Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
       "arXiv:2502.04959")

ALPHA = Param("alpha", float, 1.0, "scale applied to the merged task vector", min=0.0, max=10.0)


def numerical_rank(s: torch.Tensor, shape: tuple[int, ...], scale: torch.Tensor | float | None = None) -> int:
    """How many of the descending singular values ``s`` of a matrix of ``shape`` exceed
    max(shape) * eps_float32 * scale (default scale: s[0], numpy's ``matrix_rank`` rule)."""
    if s.numel() == 0:
        return 0
    return int((s > max(shape) * EPS32 * (s[0] if scale is None else scale)).sum())


GRAM_BLOCK = 96  # columns per block of gram()
# rows per block of a tall matrix's float64 work: a float64 copy of one block, never of the tensor. On a largest
# tensor each of the engine's threads holds its blocks, and the allocator keeps what they free: 4096 -> 1024 (session
# 11; 0.1B, N = 8: TSV-M 1.34-1.37 -> 1.17 of the memory bound, Iso-CTS 1.41-1.60 -> 1.30; Iso-CTS's embedding moved by
# 4e-9, a float32 rounding) -> 256 (session 14: anon peak MiB, Iso-C 1155 / 1167 -> 1058, TSV-M 1154 / 1141 -> 1097,
# Iso-CTS 1387 -> 1297; TSV-M in-process 34.5 / 32.8 s -> 33.7 / 36.2 s, its 0.1B output bit-identical)
ROWS = 256


class Summed:
    """sum_t parts_t of float32 matrices in float64, accumulated in order, formed a block of rows at a time."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts, self.shape, self.device = parts, tuple(parts[0].shape), parts[0].device

    def rows(self, i: int, j: int) -> torch.Tensor:
        out = self.parts[0][i:j].double()
        part64 = torch.empty_like(out)  # float64 + float32 in one add_ is 1.4x slower than a copy then the add
        for part in self.parts[1:]:
            out.add_(part64.copy_(part[i:j]))
        return out


class Rows(Protocol):
    """A float64 matrix formed a block of rows at a time when read, never held whole (``Summed``,
    ``LeftVectors``, ``_BasisProduct``)."""

    shape: tuple[int, ...]
    device: torch.device

    def rows(self, i: int, j: int) -> torch.Tensor: ...


Matrix = torch.Tensor | Rows  # a tensor of any float dtype, or rows formed when read, in float64 by blocks of rows


def _rows(x: Matrix, i: int, j: int) -> torch.Tensor:
    """Rows i:j of x in float64 (a view when x is a float64 tensor)."""
    return x[i:j].to(torch.float64) if isinstance(x, torch.Tensor) else x.rows(i, j)


def gram(x: Matrix, threads: int = 1) -> torch.Tensor:
    """The lower triangle of x^T x (all that ``torch.linalg.eigh`` reads; the upper one is zero), summed over
    blocks of ROWS rows: on the CPU by BLAS's dsyrk (which forms only that triangle, 1.4x our blocked products),
    elsewhere one block of columns at a time (about half the multiplications of x^T x). With ``threads`` > 1 the
    blocks of rows are formed (a ``Summed``'s: the task vectors added) on up to that many threads while the
    products are summed in order: the same bits."""
    n = x.shape[1]
    starts = list(range(0, x.shape[0], ROWS))
    if x.device.type == "cpu":
        c = np.zeros((n, n), order="F")
        # b^T b = A A^T for A = b^T, which is b's memory read column-major
        for b in ordered_map(lambda i: _rows(x, i, i + ROWS).contiguous().numpy(), starts, threads):
            c = lapack.syrk_lower_(b, c)
        return torch.from_numpy(c)
    out = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for i in starts:
        b = _rows(x, i, i + ROWS)
        for j in range(0, n, GRAM_BLOCK):
            out[j:, j:j + GRAM_BLOCK] += b[:, j:].T @ b[:, j:j + GRAM_BLOCK]
    return out


def _times(x: Matrix, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w in float64, a block of ROWS rows of x at a time, into ``out`` when given."""
    out = torch.empty(x.shape[0], w.shape[1], dtype=torch.float64, device=w.device) if out is None else out
    return _product_into(out, x, w)


class GramSVD:
    """The thin SVD x = U diag(s) V^T of a float64 matrix from the eigendecomposition of a Gram matrix: x^T x = V
    diag(s^2) V^T, or x x^T = U diag(s^2) U^T when ``left`` (default: the smaller one). ``s`` holds all
    min(rows, cols) singular values, descending, or only the ``top`` largest when asked (their vectors only:
    on the CPU about half the time at top = r / 8); the singular vectors of the other side are computed only
    for the triplets asked for, as x v_i / s_i (or x^T u_i / s_i), which callers keep to s_i above the
    numerical rank (the largest values decide it, so a top-k SVD gives the same rank, capped at k)."""

    def __init__(self, x: Matrix, left: bool | None = None, top: int | None = None, threads: int = 1):
        self.left = x.shape[0] < x.shape[1] if left is None else left
        # x x^T needs whole rows of x^T: a wide matrix is held in float64; a tall one is read by blocks of rows
        self.x = _rows(x, 0, x.shape[0]) if self.left else x
        self.s, self.w = _spectrum(gram(self.x.T if self.left else x, threads), min(self.x.shape), top)

    def _times(self, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.matmul(self.x.T, w, out=out) if self.left else _times(self.x, w, out)

    def top(self, k: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_k, V_k): the singular vectors of the k largest singular values, as columns; the side computed
        from x (V_k where ``left``, else U_k) is written into ``out`` when given."""
        w = self.w[:, :k]
        other = self._times(w, out).div_(self.s[:k])
        return (w, other) if self.left else (other, w)

    def isometry(self, k: int, rhs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (a, b) with a @ b = U_k V_k^T @ rhs (rhs default: the identity), the k-term polar factor: x V_k
        diag(1/s_k) V_k^T, or U_k diag(1/s_k) U_k^T x. The small factors multiply first: a @ b is never formed."""
        w = self.w[:, :k]
        c = (w / self.s[:k]) @ w.T
        if self.left:
            return c, (self.x if rhs is None else self.x @ rhs)
        return self.x, (c if rhs is None else c @ rhs)


def _spectrum(gram: torch.Tensor, r: int, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, w) from a Gram matrix's lower triangle: the r (or ``top``) largest singular values sqrt(eigenvalue),
    descending, and their eigenvectors as columns (r: a Gram matrix of the larger side has only r nonzero
    eigenvalues)."""
    if top is not None and 0 < top < r and gram.device.type == "cpu":
        values, vectors = _top_eigh(gram, top)
    else:
        values, vectors = torch.linalg.eigh(gram)
    return values.flip(0)[:r].clamp_min(0).sqrt(), vectors.flip(1)  # eigh's ascending order, reversed


def _top_eigh(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest eigenvalues (ascending) and their eigenvectors of a symmetric float64 CPU matrix, from its
    lower triangle: LAPACK's dsyevr computes only those (torch's eigh computes all, twice the time at k = n / 8)."""
    values, vectors = lapack.top_eigh(gram.numpy(), k)
    return torch.from_numpy(values), torch.from_numpy(vectors)


class LeftVectors:
    """x V_k diag(1/s_k): a tall matrix's left singular vectors (``GramSVD.top``'s) for the right ones V_k,
    formed a block of rows at a time when read."""

    def __init__(self, x: Matrix, w: torch.Tensor, s: torch.Tensor):
        self.x, self.w, self.s = x, w, s
        self.shape, self.device = (x.shape[0], w.shape[1]), w.device

    def rows(self, i: int, j: int) -> torch.Tensor:
        return (_rows(self.x, i, j) @ self.w).div_(self.s)


def projections(q: Matrix, xs: list[torch.Tensor], threads: int = 1) -> list[torch.Tensor]:
    """Q^T x for each x, summed over blocks of ROWS rows. Each block of Q's rows is formed once per thread: the
    xs are split over up to ``threads`` threads, each summing its own in the same order (the same bits)."""
    zs = [torch.zeros(q.shape[1], x.shape[1], dtype=torch.float64, device=x.device) for x in xs]

    def group(ts: range) -> None:
        for i in range(0, q.shape[0], ROWS):
            q_rows = _rows(q, i, i + ROWS)
            for t in ts:
                zs[t] += q_rows.T @ _rows(xs[t], i, i + ROWS)

    for _ in ordered_map(group, [range(g, len(xs), threads) for g in range(min(threads, len(xs)))], threads):
        pass
    return zs


class ProjectedSVD:
    """The SVD of (I - Q Q^T) x for Q with orthonormal columns, without forming it, from z = Q^T x
    (:func:`projections`): its Gram matrix is x^T x - z^T z (a projector is idempotent), its left singular vectors
    (x v_i - Q z v_i) / s_i, formed a block of rows at a time from Q's rows (:meth:`left_rows`)."""

    def __init__(self, x: torch.Tensor, z: torch.Tensor, top: int | None = None):
        self.x, self.z = x, z
        self.s, self.w = _spectrum(gram(x).sub_(gram(z)), min(x.shape), top)

    def keep(self, k: int) -> None:
        """Keep the top k triplets: their singular values, right vectors (``w``) and z V_k; z goes."""
        self.s, self.w = self.s[:k], self.w[:, :k]
        self.zw, self.z = self.z @ self.w, None

    def left_rows(self, i: int, j: int, qzw: torch.Tensor) -> torch.Tensor:
        """Rows i:j of the kept left singular vectors, given rows i:j of Q z V_k (``q[i:j] @ zw``)."""
        return (_rows(self.x, i, j) @ self.w).sub_(qzw).div_(self.s)


class TaskDirections:
    """Iso-CTS's task-specific left singular vectors Y = [Y_1 .. Y_N] of a tall matrix, held (m x N s float64, about
    0.4 float32 copies of the tensor at the paper's k_c = 0.8 r), and U = [U_c | Y]'s product with a matrix, without
    U_c: U_c = M A_c (M = sum_t tau_t, A_c = V_c diag(1/s_c)), and Y_t = (tau_t V_t - U_c z_t V_t) diag(1/s_t)
    (``ProjectedSVD``) with U_c z_t V_t = M K_t, K_t = A_c z_t V_t (n x s), all formed a block of rows at a time from
    M's rows. U held whole would be m x r float64, two float32 copies of the tensor beside its N + 1 inputs (0.1B,
    N = 8: the embedding's merge peaked at 1310 MiB with it, 1152 MiB without)."""

    def __init__(self, common: LeftVectors, parts: list[ProjectedSVD], threads: int = 1):
        self.total, self.a_c = common.x, common.w / common.s
        widths = [part.s.numel() for part in parts]
        k = torch.cat([self.a_c @ part.zw for part in parts], dim=1) if parts else self.a_c[:, :0]
        self.y = torch.empty(common.shape[0], sum(widths), dtype=torch.float64, device=common.device)

        def block(i: int) -> None:
            mk, start = _rows(self.total, i, i + ROWS) @ k, 0
            for part, width in zip(parts, widths):
                self.y[i:i + ROWS, start:start + width] = part.left_rows(i, i + ROWS, mk[:, start:start + width])
                start += width

        for _ in ordered_map(block, list(range(0, common.shape[0], ROWS)) if parts else [], threads):
            pass

    def basis_times(self, b: torch.Tensor) -> Rows:
        """U b for U = [U_c | Y] (b's first rows U_c's), by rows: M (A_c b_c) + Y b_s."""
        return _BasisProduct(self, self.a_c @ b[:self.a_c.shape[1]], b[self.a_c.shape[1]:])


class _BasisProduct:
    """Rows of M P + Y b_s (``TaskDirections.basis_times``)."""

    def __init__(self, directions: TaskDirections, p: torch.Tensor, b_s: torch.Tensor):
        self.total, self.y, self.p, self.b_s = directions.total, directions.y, p, b_s
        self.shape, self.device = (self.y.shape[0], p.shape[1]), p.device

    def rows(self, i: int, j: int) -> torch.Tensor:
        return (_rows(self.total, i, j) @ self.p).addmm_(self.y[i:j], self.b_s)


def polar(a: torch.Tensor, rhs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of polar(a) @ rhs (see ``GramSVD.isometry``); polar(a) = P Q^T over the numerical rank of
    a = P Sigma Q^T, the nearest matrix with orthonormal columns (if a has full column rank), a partial isometry on
    a's range otherwise."""
    svd = GramSVD(a)
    return svd.isometry(numerical_rank(svd.s, tuple(a.shape)), rhs)


def polar_beside_orthonormal(head: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """polar([head | tail]) over its numerical rank, as ``polar``, for ``head`` with orthonormal columns, from a
    2t x 2t eigendecomposition instead of one of (h + t) x (h + t) (t = tail's columns). X = [head | tail] has
    X^T X = I + E, E = [[0, A], [A^T, B - I]], A = head^T tail, B = tail^T tail; E's range lies in that of
    Q = diag(Q_A, I) (A = Q_A R_A), so X^T X's eigenvalues there are 1 + those of H = Q^T E Q = [[0, R_A],
    [R_A^T, B - I]] (eigenvectors Q W) and 1 elsewhere. With sigma = sqrt(1 + lambda): polar(X) = X (I + Q W
    diag(d) W^T Q^T), d = 1 / sigma - 1 for a kept sigma, -1 (the direction dropped) below the rank threshold."""
    t = tail.shape[1]
    if t == 0:
        return head
    q_a, r_a = torch.linalg.qr(head.T @ tail)  # reduced: q_a h x min(h, t)
    a = q_a.shape[1]
    h = torch.zeros(a + t, a + t, dtype=tail.dtype, device=tail.device)
    h[:a, a:] = r_a
    h[a:, :a] = r_a.T
    h[a:, a:] = tail.T @ tail
    h[a:, a:].diagonal().sub_(1)
    lam, w = torch.linalg.eigh(h)
    sigma = (1 + lam).clamp_min(0).sqrt()
    x_shape = (head.shape[0], head.shape[1] + t)
    # X's numerical rank among these (ascending) sigmas. The largest is X's: with a head, it is >= 1 (the directions
    # outside Q have sigma 1), as X^T X's largest eigenvalue is >= its diagonal's (1 for head's columns)
    kept = torch.arange(len(sigma), device=sigma.device) >= len(sigma) - numerical_rank(sigma.flip(0), x_shape)
    d = torch.where(kept, 1 / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), torch.zeros_like(sigma)) - 1
    qw = torch.cat([q_a @ w[:a], w[a:]])  # Q W
    xqw = torch.cat([head @ q_a, tail], dim=1) @ w  # X Q W = [head Q_A | tail] W
    return torch.cat([head, tail], dim=1).addmm_(xqw * d, qw.T)


def _product_into(out: torch.Tensor, a: Matrix, b: torch.Tensor | None = None, rows: int | None = None,
                  threads: int = 1) -> torch.Tensor:
    """out = a @ b (a itself without b) into ``out``, a block of rows of a at a time (no float64 m x n copy), up to
    ``threads`` blocks at once (each on one thread: the same bits). Each block reads a's rows before writing out's,
    and only its own, so out may be one of the tensors ``a`` is formed from."""
    rows = rows or ROWS

    def block(i: int) -> None:
        out[i:i + rows] = _rows(a, i, i + rows) if b is None else _rows(a, i, i + rows) @ b

    for _ in ordered_map(block, list(range(0, a.shape[0], rows)), threads):
        pass
    return out


def _bit_order(a: torch.Tensor, b: torch.Tensor) -> int:
    """-1, 0 or 1: a's and b's float32 bits compared as int32, at the first flat index where they differ."""
    a, b = a.reshape(-1).view(torch.int32), b.reshape(-1).view(torch.int32)
    for stop in (min(4096, a.numel()), a.numel()):  # distinct tensors nearly always differ in the first entries
        differs = a[:stop] != b[:stop]
        if bool(differs.any()):
            i = torch.argmax(differs.to(torch.uint8))  # the first difference
            return int(torch.sign(a[i].long() - b[i].long()))
    return 0


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
    shape = tuple(base.shape)
    with one_thread(base.device) as threads:
        # each task's U_k (m x k float64, a tall task vector read by row blocks); a task vector is released once its
        # triplets are out, all but the first (the output's memory), so that U = [U_1k .. U_Nk] takes their place
        lefts, ss, vs = [], [], []
        for t, svd in enumerate(ordered_map(lambda tau: GramSVD(tau, top=k), taus, threads)):
            kept = min(k, numerical_rank(svd.s, shape))
            left, v = svd.top(kept)
            lefts.append(left)
            ss.append(svd.s[:kept])
            vs.append(v)
            del svd
            if t:
                release_(taus[t])
        s = torch.cat(ss)
        if s.numel() == 0:  # every task vector is zero
            return taus[0].zero_()
        u = torch.cat(lefts, dim=1)
        del lefts, left
        v = torch.matmul(*polar(torch.cat(vs, dim=1)))
        del vs
        # polar(U) diag(S) polar(V)^T
        return _product_into(taus[0], *polar(u, v.T.mul_(s[:, None])), threads=threads)


def iso_c_delta(base, experts, params, ctx):
    """Iso-C: the summed task vectors with every singular value replaced by their mean."""
    taus = _weighted_task_vectors_(base, experts, ctx.weights)
    if not _is_matrix(base):
        return _mean_(taus)
    with one_thread(base.device) as threads:
        norm = float(_largest_norm(taus))
        svd = GramSVD(Summed(taus))
        kept = numerical_rank(svd.s, tuple(base.shape), max(float(svd.s[0]), norm))
        a, b = svd.isometry(kept)
        return _product_into(taus[0], a, b.mul_(svd.s.mean()), threads=threads)


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
    shape = tuple(base.shape)
    rank, n = min(shape), len(taus)
    k_c, share = iso_cts_sizes(rank, n, params.get("common_space_fraction", 0.8))
    with one_thread(base.device) as threads:
        norm = float(_largest_norm(taus))
        left = shape[0] <= shape[1]
        svd = GramSVD(Summed(taus), left=left, threads=threads)
        common = min(k_c, numerical_rank(svd.s, shape, max(float(svd.s[0]), norm)))
        mass = svd.s[:k_c].sum()  # the authors' mean runs over all r slots, dropped triplets included
        if left:  # rows <= cols: M M^T's eigenvectors are all of U, so the complement of U_c is U's other columns
            u_c, v_c = svd.top(common)
            rest = svd.w[:, common:]  # I - U_c U_c^T = rest rest^T
            del svd
            u, vs, masses = _wide_basis(u_c, v_c, rest, taus, share, shape, threads)
            y = u[:, common:]
        else:
            u_c = LeftVectors(svd.x, svd.w[:, :common], svd.s[:common])
            del svd
            directions, vs, masses = _tall_basis(u_c, taus, share, shape, threads)
            y = directions.y
        for part in masses:
            mass = mass + part
        used = common + y.shape[1]
        if used == 0:
            return taus[0].zero_()
        tail = torch.cat(vs[1:], dim=1) if len(vs) > 1 else vs[0][:, :0]
        v = polar_beside_orthonormal(vs[0], tail)  # V_c is orthonormal
        del vs
        b = v.T * (mass / rank)  # not in place: v may be V_c itself, which U_c's rows are still formed from
        if used > common:  # polar(U) = [U_c | polar(Y)]: U_c is orthonormal, and Y lies outside its span
            specific = GramSVD(y, left=False, threads=threads)
            _, c = specific.isometry(numerical_rank(specific.s, (shape[0], used)), b[common:])
            b = torch.cat([b[:common], c])
        if left:
            return _product_into(taus[0], u, b, threads=threads)
        return _product_into(taus[0], directions.basis_times(b), threads=threads)


def _wide_basis(u_c, v_c, rest, taus, share, shape, threads) -> tuple[torch.Tensor, list, list]:
    """(U = [U_c | Y], the V's, each task's mass) where rows <= cols: tau_t - U_c U_c^T tau_t = rest (rest^T
    tau_t), so each task's directions come from the small rest^T tau_t; U (m x at most r float64, m <= n) is held."""
    common = u_c.shape[1]
    u = torch.empty(shape[0], common + len(taus) * share, dtype=torch.float64, device=u_c.device)
    u[:, :common] = u_c
    used, vs, masses = common, [v_c], []

    def decompose(tau: torch.Tensor) -> tuple[float, GramSVD]:
        return float(torch.linalg.vector_norm(tau)), GramSVD(rest.T @ tau.double(), top=share)

    for norm, part in ordered_map(decompose, taus if share else [], threads):
        # the projection's rounding is relative to tau_t, not to what is left of it
        kept = min(share, numerical_rank(part.s, shape, norm))
        small, v = part.top(kept)
        torch.matmul(rest, small, out=u[:, used:used + kept])
        used += kept
        vs.append(v)
        masses.append(part.s[:share].sum())
    return u[:, :used], vs, masses


def _tall_basis(u_c: LeftVectors, taus, share, shape, threads) -> tuple[TaskDirections, list, list]:
    """(Y, the V's, each task's mass) where rows > cols: each task's directions from the SVD of tau_t - U_c U_c^T
    tau_t (``ProjectedSVD``); U is never held, only its task-specific columns Y (``TaskDirections``)."""
    zs = projections(u_c, taus, threads) if share else []

    def decompose(t: int) -> tuple[float, ProjectedSVD]:
        z, zs[t] = zs[t], None  # the decomposition holds it until its triplets are kept
        return float(torch.linalg.vector_norm(taus[t])), ProjectedSVD(taus[t], z, top=share)

    parts, vs, masses = [], [u_c.w], []
    for norm, part in ordered_map(decompose, list(range(len(zs))), threads):
        masses.append(part.s[:share].sum())
        # the projection's rounding is relative to tau_t, not to what is left of it
        part.keep(min(share, numerical_rank(part.s, shape, norm)))
        parts.append(part)
        vs.append(part.w)
    return TaskDirections(u_c, parts, threads), vs, masses


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
