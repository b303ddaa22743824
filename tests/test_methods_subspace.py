"""tsv_m, iso_c and iso_cts (mergebench/plugins/subspace.py) against references written out from the papers.

The references below are numpy, float64, one singular direction at a time; they share nothing with the module
but its documented conventions (which tensors, k, the Iso-CTS sizes, the numerical-rank rule). Besides them,
properties that hold by the papers' definitions: Iso-C's spectrum is flat and its directions are the polar
factor of the summed task vectors; TSV-M of tasks in mutually orthogonal subspaces is task arithmetic; one
expert kept at full rank gives theta_0 + alpha tau. fusion-bench 0.2.33 was compared once by a script (see
the module's report), not here. The module's decomposition route (float64 Gram matrices and ``eigh``) is also
checked directly against numpy's float64 SVD.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from mergebench.core import in_memory
from mergebench.core.api import merge as engine_merge
from mergebench.core.conformance import check_method
from mergebench.core.context import TensorContext
from mergebench.core.plugin_manager import make_plugin_manager
from mergebench.plugins import subspace

from conftest import load_dir, write_model

EPS32 = float(np.finfo(np.float32).eps)
NAMES = ("tsv_m", "iso_c", "iso_cts")


@pytest.fixture(scope="module")
def spm():
    """The built-in plugins, plus the subspace module where it is not built in yet."""
    pm = make_plugin_manager(entry_points=False)
    if "tsv_m" not in pm.merge_methods():
        pm.register(subspace, name="mergebench.plugins.subspace")
    return pm


def method(spm, name):
    return spm.merge_methods().get(name)


# ---- the references --------------------------------------------------------------------------------------

def ref_rank(s, shape, scale=None):
    """Singular values above max(shape) * eps_float32 * scale (default: the largest)."""
    if len(s) == 0:
        return 0
    scale = s[0] if scale is None else scale
    return int(sum(1 for x in s if x > max(shape) * EPS32 * scale))


def ref_svd(a):
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return u, s, vt


def ref_polar(a):
    """P Q^T over the numerical rank of a = P S Q^T (the papers' orthogonalisation)."""
    p, s, qt = ref_svd(a)
    out = np.zeros_like(a)
    for i in range(ref_rank(s, a.shape)):
        out += np.outer(p[:, i], qt[i])
    return out


def outer_sum(us, sigmas, vs):
    """sum_i sigma_i u_i v_i^T over the columns of us and vs."""
    out = np.zeros((us.shape[0], vs.shape[0]))
    for i, sigma in enumerate(sigmas):
        out += sigma * np.outer(us[:, i], vs[:, i])
    return out


def ref_taus(base, experts, weights):
    return [w * (e.astype(np.float64) - base.astype(np.float64)) for e, w in zip(experts, weights)]


def ref_tsv_m(base, experts, weights, alpha, fraction=0.0):
    taus, n = ref_taus(base, experts, weights), len(experts)
    r = min(base.shape) if base.ndim == 2 else 0
    k = (r // n if fraction == 0 else int(fraction * r)) if base.ndim == 2 else 0
    if k == 0:
        return base + alpha * sum(taus) / n
    u_cols, v_cols, sigmas = [], [], []
    for tau in taus:
        u, s, vt = ref_svd(tau)
        for i in range(min(k, ref_rank(s, tau.shape))):
            u_cols.append(u[:, i])
            v_cols.append(vt[i])
            sigmas.append(s[i])
    if not sigmas:
        return base.astype(np.float64)
    u_orth = ref_polar(np.stack(u_cols, axis=1))
    v_orth = ref_polar(np.stack(v_cols, axis=1))
    return base + alpha * outer_sum(u_orth, sigmas, v_orth)


def ref_iso_c(base, experts, weights, alpha):
    taus = ref_taus(base, experts, weights)
    if base.ndim != 2:
        return base + alpha * sum(taus) / len(taus)
    u, s, vt = ref_svd(sum(taus))
    kept = ref_rank(s, base.shape, max(s[0], max(np.linalg.norm(tau) for tau in taus)))
    return base + alpha * outer_sum(u[:, :kept], [s.mean()] * kept, vt[:kept].T)


def ref_iso_cts(base, experts, weights, alpha, common_fraction=0.8):
    taus, n = ref_taus(base, experts, weights), len(experts)
    if base.ndim != 2:
        return base + alpha * sum(taus) / n
    r = min(base.shape)
    k_c = int(r * common_fraction)
    specific = round((r - k_c) / n) * n
    if specific > r:
        specific -= n
    k_c, share = r - specific, specific // n
    u, s, vt = ref_svd(sum(taus))
    common = min(k_c, ref_rank(s, base.shape, max(s[0], max(np.linalg.norm(tau) for tau in taus))))
    u_c = u[:, :common]
    slots = list(s[:k_c])
    u_cols, v_cols = [], []
    for tau in taus:
        if share == 0:
            break
        w = tau - u_c @ (u_c.T @ tau)
        uw, sw, vwt = ref_svd(w)
        for i in range(min(share, ref_rank(sw, w.shape, np.linalg.norm(tau)))):
            u_cols.append(uw[:, i])
            v_cols.append(vwt[i])
        slots += list(sw[:share])
    u_cols += [u_c[:, i] for i in range(common)]
    v_cols += [vt[i] for i in range(common)]
    if not u_cols:
        return base.astype(np.float64)
    assert len(slots) == r
    sigma = sum(slots) / r
    u_orth = ref_polar(np.stack(u_cols, axis=1))
    v_orth = ref_polar(np.stack(v_cols, axis=1))
    return base + alpha * outer_sum(u_orth, [sigma] * u_orth.shape[1], v_orth)


REFERENCES = {"tsv_m": (ref_tsv_m, "rank_fraction"), "iso_c": (ref_iso_c, None),
              "iso_cts": (ref_iso_cts, "common_space_fraction")}


# ---- helpers ---------------------------------------------------------------------------------------------

def call(m, base, experts, weights=None, **params):
    """The method's maths on float32 scratch copies, as the engine calls it."""
    weights = tuple(weights or (1.0,) * len(experts))
    return m.merge(base.clone(), [e.clone() for e in experts], {**m.defaults(), **params},
                   TensorContext(name="w", weights=weights))


def reference(name, base, experts, weights=None, **params):
    fn, extra = REFERENCES[name]
    weights = weights or [1.0] * len(experts)
    args = [params.get(extra)] if extra in params else []
    out = fn(base.numpy(), [e.numpy() for e in experts], weights, params.get("alpha", 1.0), *args)
    return torch.from_numpy(np.asarray(out, dtype=np.float64))


def assert_matches(got, want):
    # float32 SVDs against float64 ones: a few 1e-6 of the update's size
    scale = max(float(want.abs().max()), 1e-30)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * scale)


def low_rank(g, shape, rank, scale=1.0):
    """A random matrix of exactly ``rank`` (well separated from 0), in float32."""
    a = torch.randn(shape[0], rank, generator=g, dtype=torch.float64)
    b = torch.randn(rank, shape[1], generator=g, dtype=torch.float64)
    return (scale * a @ b / math.sqrt(rank)).float()


def family(seed, shape, n, scale=0.1, rank=None):
    """A base and n experts; their task vectors are random (full rank) or of the given rank."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if rank is None:
        return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base, [base + low_rank(g, shape, rank, scale) for _ in range(n)]


# ---- against the references ------------------------------------------------------------------------------

CASES = [  # (shape, n, tau rank or None for full)
    ((9, 7), 1, None), ((9, 7), 2, None), ((7, 12), 3, None), ((16, 16), 5, None), ((24, 10), 8, None),
    ((9, 7), 3, 2), ((12, 20), 2, 1), ((16, 11), 4, 3),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,n,rank", CASES)
def test_matches_the_reference_on_matrices(spm, name, shape, n, rank):
    base, experts = family(sum(shape) * 10 + n, shape, n, rank=rank)
    assert_matches(call(method(spm, name), base, experts), reference(name, base, experts))


@pytest.mark.parametrize("name,params", [
    ("tsv_m", {"alpha": 0.7}), ("tsv_m", {"rank_fraction": 0.5}), ("tsv_m", {"rank_fraction": 0.2, "alpha": 2.0}),
    ("tsv_m", {"rank_fraction": 1.0}),
    ("iso_c", {"alpha": 1.6}),
    ("iso_cts", {"common_space_fraction": 0.0}), ("iso_cts", {"common_space_fraction": 0.5, "alpha": 1.3}),
    ("iso_cts", {"common_space_fraction": 0.95}), ("iso_cts", {"common_space_fraction": 1.0}),
])
@pytest.mark.parametrize("shape,n", [((10, 14), 3), ((15, 9), 2), ((6, 6), 4)])
def test_matches_the_reference_for_each_parameter(spm, name, params, shape, n):
    base, experts = family(7, shape, n)
    assert_matches(call(method(spm, name), base, experts, **params), reference(name, base, experts, **params))


@pytest.mark.parametrize("name", NAMES)
def test_expert_weights_scale_each_task_vector_first(spm, name):
    base, experts = family(3, (11, 8), 3)
    weights = [0.5, 2.0, -1.0]
    got = call(method(spm, name), base, experts, weights=weights)
    assert_matches(got, reference(name, base, experts, weights=weights))
    assert not torch.allclose(got, call(method(spm, name), base, experts), atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(13,), (), (2, 3, 4)])
def test_tensors_that_are_not_matrices_get_alpha_times_the_mean_task_vector(spm, name, shape):
    base, experts = family(5, shape, 3)
    want = base.double() + 1.4 * sum(e.double() - base.double() for e in experts) / 3
    torch.testing.assert_close(call(method(spm, name), base, experts, alpha=1.4).double(), want, rtol=0, atol=1e-6)


def test_tsv_m_where_no_task_gets_a_direction_falls_back_to_the_mean(spm):
    base, experts = family(6, (3, 20), 4)  # min(rows, cols) = 3 < N = 4: k = 0
    want = base.double() + sum(e.double() - base.double() for e in experts) / 4
    torch.testing.assert_close(call(method(spm, "tsv_m"), base, experts).double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tsv_m", "iso_cts"])
@pytest.mark.parametrize("shape", [(320, 160), (160, 320)])
def test_a_larger_merge_is_the_float64_reference_to_float32_rounding(spm, name, shape):
    """N = 8 random task vectors (flat spectra, as the 0.1B benchmark's, with singular values close at the cuts):
    the delta is the float64 reference's to 1e-6 of its size (float32 rounding leaves about 5e-8). Float32 SVDs
    (the module's former route) were 1e-5 to 6e-5 off here, and 3e-4 off on the benchmark's 32000 x 768 embedding."""
    g = torch.Generator().manual_seed(40)
    base = torch.zeros(shape)  # the delta alone, not hidden under the rounding of theta_0 + delta
    experts = [0.1 * torch.randn(shape, generator=g) for _ in range(8)]
    want = reference(name, base, experts)
    got = call(method(spm, name), base, experts)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(160, 40), (40, 160)])
def test_tall_matrices_read_by_blocks_of_rows_are_the_float64_reference(spm, name, shape, monkeypatch):
    """A tall task vector (or Iso's sum) is read in float64 by blocks of ROWS rows, never whole: with blocks of
    7 rows (uneven) the merge is still the float64 reference's to 1e-6 of its size, and the scratch inputs
    taken as the output do not feed rows already written back into the product."""
    monkeypatch.setattr(subspace, "ROWS", 7)
    g = torch.Generator().manual_seed(41)
    base = torch.zeros(shape)
    experts = [0.1 * torch.randn(shape, generator=g) for _ in range(4)]
    want = reference(name, base, experts)
    got = call(method(spm, name), base, experts)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6 * float(want.abs().max()))

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(12, 9), (9, 12)])
def test_experts_that_change_a_few_rows_match_the_reference(spm, name, shape):
    """Task vectors of exactly rank <= 2 (e.g. embedding rows of new tokens): their Gram matrices' zero
    eigenvalues may come out a rounding below zero, which must not become NaN singular values."""
    g = torch.Generator().manual_seed(25)
    base = torch.randn(shape, generator=g)
    experts = []
    for t in range(3):
        expert = base.clone()
        expert[2 * t:2 * t + 2] += 0.1 * torch.randn(2, shape[1], generator=g)
        experts.append(expert)
    assert_matches(call(method(spm, name), base, experts), reference(name, base, experts))


# ---- properties from the papers' definitions -------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(8, 5), (13,)])
def test_experts_equal_to_the_base_give_the_base(spm, name, shape):
    base, _ = family(8, shape, 1)
    assert torch.equal(call(method(spm, name), base, [base.clone(), base.clone(), base.clone()], alpha=2.0), base)


@pytest.mark.parametrize("shape", [(9, 7), (7, 12), (16, 16)])
def test_tsv_m_of_one_expert_at_full_rank_is_base_plus_alpha_tau(spm, shape):
    base, (expert,) = family(9, shape, 1)
    torch.testing.assert_close(call(method(spm, "tsv_m"), base, [expert], alpha=0.6), base + 0.6 * (expert - base),
                               rtol=0, atol=1e-6)


def test_tsv_m_of_tasks_in_orthogonal_subspaces_is_task_arithmetic(spm):
    """Each task moves its own rows and columns with rank <= k: nothing to decorrelate, TSV-M adds them."""
    g = torch.Generator().manual_seed(10)
    base = torch.randn(12, 18, generator=g)
    taus = []
    for t in range(3):  # k = 12 // 3 = 4; each task of rank 3 in a 4 x 6 block of its own
        tau = torch.zeros(12, 18)
        tau[4 * t:4 * t + 4, 6 * t:6 * t + 6] = low_rank(g, (4, 6), 3)
        taus.append(tau)
    got = call(method(spm, "tsv_m"), base, [base + tau for tau in taus], alpha=0.8)
    torch.testing.assert_close(got, base + 0.8 * sum(taus), rtol=0, atol=1e-5)


def test_tsv_m_of_identical_experts_is_the_rank_k_truncation(spm):
    """N copies of one task vector: U = [U_k .. U_k] has rank k, and its polar factor over that rank gives
    U_k S_k V_k^T (the authors' P Q^T is not unique here: LAPACK's completion would add arbitrary directions)."""
    base, (expert,) = family(11, (10, 16), 1)
    tau = (expert - base).double()
    u, s, vt = torch.linalg.svd(tau, full_matrices=False)
    k = 10 // 3
    want = base.double() + (u[:, :k] * s[:k]) @ vt[:k]
    torch.testing.assert_close(call(method(spm, "tsv_m"), base, [expert] * 3).double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(9, 14), (14, 9)])
def test_iso_c_has_a_flat_spectrum_along_the_polar_factor_of_the_summed_task_vectors(spm, shape):
    base, experts = family(12, shape, 3)
    delta = (call(method(spm, "iso_c"), base, experts) - base).double()
    total = sum(e.double() - base.double() for e in experts)
    sigma = torch.linalg.svdvals(total)
    torch.testing.assert_close(torch.linalg.svdvals(delta), torch.full_like(sigma, float(sigma.mean())),
                               rtol=1e-5, atol=0)
    # delta = mean(sigma) * polar(total) <=> delta^T total is symmetric positive semi-definite
    gram = delta.T @ total
    torch.testing.assert_close(gram, gram.T, rtol=0, atol=1e-5 * float(gram.abs().max()))
    assert float(torch.linalg.eigvalsh((gram + gram.T) / 2).min()) > -1e-5 * float(gram.abs().max())


def test_iso_c_of_a_rank_deficient_sum_keeps_its_rank(spm):
    """No arbitrary null-space directions: the authors' code would give every one of them the mean sigma."""
    base, experts = family(13, (12, 9), 2, rank=2)
    delta = (call(method(spm, "iso_c"), base, experts) - base).double()
    sigma = torch.linalg.svdvals(sum(e.double() - base.double() for e in experts))
    got = torch.linalg.svdvals(delta)
    torch.testing.assert_close(got[:4], torch.full((4,), float(sigma.mean()), dtype=torch.float64), rtol=1e-5, atol=0)
    assert float(got[4:].max()) < 1e-5 * float(got[0])


def test_iso_cts_with_the_whole_space_common_is_iso_c(spm):
    base, experts = family(14, (10, 13), 4)
    torch.testing.assert_close(call(method(spm, "iso_cts"), base, experts, common_space_fraction=1.0),
                               call(method(spm, "iso_c"), base, experts), rtol=0, atol=1e-5)


def test_iso_cts_of_opposite_task_vectors_adds_no_common_directions(spm):
    """tau_2 = -(1 + 3e-7) tau_1: the sum is a rounding-level remainder. Counted as a common subspace (relative
    to its own largest singular value), its directions would get the mean singular value of the whole merge;
    relative to the task vectors it is nothing, and the two tasks' own directions cancel."""
    g = torch.Generator().manual_seed(16)
    a = 0.1 * torch.randn(12, 9, generator=g)
    base = torch.zeros(12, 9)
    delta = call(method(spm, "iso_cts"), base, [a, -(a * (1 + 3e-7))])
    assert float(delta.norm()) < 1e-5 * float(a.norm())


@pytest.mark.parametrize("shape", [(10, 16), (16, 10)])
def test_iso_cts_where_the_task_vectors_nearly_cancel_takes_their_own_directions_from_outside_the_sum(spm, shape):
    """tau_1 = A + B, tau_2 = -A + C with B and C of rank 1: the sum has rank 2 < k_c = 8, so the common subspace
    is smaller than asked, and each task's own direction (mostly A's) comes from everything outside it."""
    g = torch.Generator().manual_seed(24)
    a = torch.randn(shape, generator=g)
    b, c = low_rank(g, shape, 1), low_rank(g, shape, 1)
    base = torch.zeros(shape)
    experts = [a + b, -a + c]
    assert subspace.iso_cts_sizes(10, 2, 0.8) == (8, 1)
    assert_matches(call(method(spm, "iso_cts"), base, experts), reference("iso_cts", base, experts))


def test_iso_cts_spectrum_is_flat_and_differs_from_iso_c(spm):
    base, experts = family(15, (16, 12), 3)
    delta = (call(method(spm, "iso_cts"), base, experts) - base).double()
    sigma = torch.linalg.svdvals(delta)
    torch.testing.assert_close(sigma, torch.full_like(sigma, float(sigma[0])), rtol=1e-5, atol=0)
    assert not torch.allclose(delta, (call(method(spm, "iso_c"), base, experts) - base).double(), atol=1e-3)


@pytest.mark.parametrize("rank,n,fraction,want", [
    (768, 8, 0.8, (616, 19)),  # int(614.4) = 614; round(154 / 8) = 19 shares of 19: k_c = 768 - 152
    (10, 3, 0.8, (7, 1)),  # 8; round(2 / 3) = 1 share of 1: k_c = 7
    (12, 2, 0.0, (0, 6)),
    (10, 2, 0.5, (6, 2)),  # 5; round(2.5) = 2 (halves to even; half up would give (4, 3))
    (5, 3, 0.0, (2, 1)),  # 0; round(5 / 3) = 2 shares would need 6 > 5 directions: one share fewer
    (4, 8, 0.8, (4, 0)),  # fewer directions than tasks: all common (Iso-C)
])
def test_iso_cts_sizes_follow_the_authors_rounding(rank, n, fraction, want):
    assert subspace.iso_cts_sizes(rank, n, fraction) == want


def test_tsv_k_is_floor_of_rank_over_n_or_of_the_fraction():
    assert subspace.tsv_k(768, 8, 0.0) == 96
    assert subspace.tsv_k(49, 49, 0.0) == 1  # int(49 * (1 / 49)) would be 0
    assert subspace.tsv_k(10, 3, 0.0) == 3
    assert subspace.tsv_k(10, 3, 0.25) == 2


# ---- the decomposition route: float64 Gram matrices against LAPACK's float64 SVD ---------------------------

SVD_CASES = [((40, 12), None), ((12, 40), None), ((20, 20), None), ((30, 16), 5), ((16, 30), 5), ((250, 200), None)]


def svd_input(seed, shape, rank):
    """float32 data (what the methods decompose), in float64."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) if rank is None else low_rank(g, shape, rank)).double()


# ROWS = 7: tall matrices are read by blocks of 7 rows (their Gram matrices and products summed over blocks)
@pytest.mark.parametrize("rows", [subspace.ROWS, 7])
@pytest.mark.parametrize("left", [None, True, False])
@pytest.mark.parametrize("shape,rank", SVD_CASES)
def test_gram_svd_gives_lapacks_singular_values_and_triplets(shape, rank, left, rows, monkeypatch):
    monkeypatch.setattr(subspace, "ROWS", rows)
    x = svd_input(30, shape, rank)
    svd = subspace.GramSVD(x, left=left)
    u, s, vt = (torch.from_numpy(a) for a in np.linalg.svd(x.numpy(), full_matrices=False))
    k = ref_rank(s.tolist(), shape)
    assert k == (rank or min(shape)) and subspace.numerical_rank(svd.s, shape) == k
    assert svd.s.shape == s.shape
    torch.testing.assert_close(svd.s[:k], s[:k], rtol=1e-12, atol=0)
    got_u, got_v = svd.top(k)
    torch.testing.assert_close(got_u.T @ got_u, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(got_v.T @ got_v, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    # each triplet up to its sign: the rank-one terms agree
    for i in range(k):
        torch.testing.assert_close(torch.outer(got_u[:, i], got_v[:, i]), torch.outer(u[:, i], vt[i]),
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("rows", [subspace.ROWS, 7])
@pytest.mark.parametrize("shape,rank", SVD_CASES)
def test_polar_factor_is_lapacks(shape, rank, rows, monkeypatch):
    monkeypatch.setattr(subspace, "ROWS", rows)
    x = svd_input(31, shape, rank)
    a, b = subspace.polar(x)
    torch.testing.assert_close(a @ b, torch.from_numpy(ref_polar(x.numpy())), rtol=0, atol=1e-10)
    rhs = svd_input(32, (shape[1], 7), None)
    a, b = subspace.polar(x, rhs)
    torch.testing.assert_close(a @ b, torch.from_numpy(ref_polar(x.numpy()) @ rhs.numpy()), rtol=0, atol=1e-9)


# (rows, head columns, tail columns, how the tail is made): more tail than head columns and fewer; tails with
# columns inside the head's span, repeated, zero; no head; no tail; two made to put one singular value on either
# side of the rank threshold (60 eps32 times the largest singular value)
@pytest.mark.parametrize("rows,h,t,kind", [(30, 20, 6, "random"), (30, 4, 12, "random"), (30, 12, 9, "in head"),
                                           (30, 12, 9, "repeated"), (30, 12, 5, "zero"), (30, 0, 9, "random"),
                                           (30, 12, 0, "random"), (12, 10, 2, "random"), (60, 8, 8, "near head"),
                                           (60, 0, 4, "short")])
def test_polar_beside_orthonormal_columns_is_lapacks(rows, h, t, kind):
    basis = torch.linalg.qr(svd_input(41, (rows, h + t + 1), None))[0]
    head = basis[:, :h]
    tail = svd_input(42, (rows, t), None)
    if kind == "in head":  # 3 columns that are combinations of head's: the rank drops by 3
        tail[:, :3] = head @ svd_input(43, (h, 3), None)
    elif kind == "repeated":
        tail[:, 4:7] = tail[:, :3]
    elif kind == "zero":
        tail[:, 1] = 0
    elif kind == "near head":  # tail_j = head_j + e n_j: singular values sqrt(2) and e / sqrt(2) per pair, one
        # pair's 6e-6 below the threshold 60 eps32 sqrt(2) = 1.0e-5 (kept under min(shape) = 16: 2.7e-6)
        tail = head + basis[:, h:h + t] * torch.tensor([1e-2] * (t - 1) + [6e-6 * 2 ** 0.5], dtype=torch.float64)
    elif kind == "short":  # no head; columns of norm 0.5, two of them 6e-6 (by singular value) from parallel:
        # above the threshold 60 eps32 times the largest singular value, 0.71 (5.1e-6), below it for a scale of 1
        tail = 0.5 * basis[:, h:h + t]
        tail[:, 1] = tail[:, 0] + 6e-6 * 2 ** 0.5 * basis[:, h + t]
    x = torch.cat([head, tail], dim=1)
    got = subspace.polar_beside_orthonormal(head, tail)
    # a kept singular value of 6e-6 carries the Gram route's rounding, eps64 / 6e-6 (module docstring); keeping or
    # dropping it moves the result by 6e-6 or more
    tol = 1e-6 if kind in ("near head", "short") else 1e-10
    torch.testing.assert_close(got, torch.from_numpy(ref_polar(x.numpy())), rtol=0, atol=tol)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [subspace.ROWS, 7])
@pytest.mark.parametrize("rank", [None, 3])
def test_projected_svd_is_the_svd_of_the_projection(rank, rows, threads, monkeypatch):
    """(I - Q Q^T) x from x^T x - (Q^T x)^T (Q^T x), against LAPACK on the projection formed explicitly; Q^T x from
    ``projections`` (Q's rows formed when read, the xs split over threads) and the left vectors by rows."""
    monkeypatch.setattr(subspace, "ROWS", rows)
    xs = [svd_input(33, (40, 12), rank), svd_input(37, (40, 12), None), svd_input(38, (40, 12), 2)]
    a = svd_input(34, (40, 9), None)
    u_a, s_a, vh_a = (torch.from_numpy(m) for m in np.linalg.svd(a.numpy(), full_matrices=False))
    q = subspace.LeftVectors(a, vh_a.T, s_a)  # a V diag(1/s) by rows: a's left singular vectors, orthonormal
    q_whole = torch.cat([q.rows(i, i + rows) for i in range(0, 40, rows)])
    torch.testing.assert_close(q_whole, u_a, rtol=0, atol=1e-12)
    zs = subspace.projections(q, xs, threads)
    for x, z in zip(xs, zs):
        torch.testing.assert_close(z, q_whole.T @ x, rtol=0, atol=1e-12)
        projected = x - q_whole @ (q_whole.T @ x)
        svd = subspace.ProjectedSVD(x, z)
        u, s, vt = (torch.from_numpy(m) for m in np.linalg.svd(projected.numpy(), full_matrices=False))
        k = ref_rank(s.tolist(), x.shape, float(torch.linalg.norm(x)))
        assert subspace.numerical_rank(svd.s, tuple(x.shape), float(torch.linalg.norm(x))) == k
        torch.testing.assert_close(svd.s[:k], s[:k], rtol=1e-10, atol=0)
        svd.keep(k)
        got_u = torch.cat([svd.left_rows(i, i + rows, q_whole[i:i + rows] @ svd.zw) for i in range(0, 40, rows)])
        for i in range(k):
            torch.testing.assert_close(torch.outer(got_u[:, i], svd.w[:, i]), torch.outer(u[:, i], vt[i]),
                                       rtol=0, atol=1e-9)


def test_products_are_written_a_block_of_rows_at_a_time():
    a, b = svd_input(35, (10, 4), None), svd_input(36, (4, 6), None)
    out = torch.empty(10, 6)
    subspace._product_into(out, a, b, rows=3)
    torch.testing.assert_close(out, (a @ b).float())


@pytest.mark.parametrize("weights", [(0.5, 2.0, -1.0), (1.0, 1.0, 1.0)])
def test_the_task_vectors_come_in_one_order_whatever_the_experts_order(weights):
    """What makes the merge's bits order-free (float64 rounding differences seldom reach a float32 output, so the
    merge alone would rarely show a missing order). Experts 0 and 2 agree on their first 4480 entries."""
    base, experts = family(22, (80, 64), 3)
    experts[2][:70] = experts[0][:70]
    want = subspace._weighted_task_vectors_(base, [e.clone() for e in experts], weights)
    for order in itertools.permutations(range(3)):
        got = subspace._weighted_task_vectors_(base, [experts[i].clone() for i in order], [weights[i] for i in order])
        assert all(torch.equal(a, b) for a, b in zip(got, want)), order


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("weights", [(0.5, 2.0, -1.0), (1.0, 1.0, 1.0)])
def test_the_experts_order_changes_no_bit(spm, name, weights):
    """The task vectors' canonical order makes every permutation of the experts give the same bits. Experts 0 and 2
    agree on their first 4480 entries: with equal weights they are ordered by later ones."""
    base, experts = family(22, (80, 64), 3)
    experts[2][:70] = experts[0][:70]
    want = call(method(spm, name), base, experts, weights=weights)
    for order in ([2, 1, 0], [1, 2, 0], [0, 2, 1], [2, 0, 1]):
        got = call(method(spm, name), base, [experts[i] for i in order], weights=[weights[i] for i in order])
        assert torch.equal(got, want), order


# ---- the engine, registration, conformance ---------------------------------------------------------------

def test_registered_with_the_papers_search_space(spm):
    for name in NAMES:
        m = method(spm, name)
        assert m.scale_param == "alpha" and not m.elementwise and m.needs_base and not m.stochastic
        grid = m.search_space["alpha"]
        assert grid == tuple(round(0.2 * i, 1) for i in range(1, 16)) and grid[-1] == 3.0
    assert method(spm, "iso_cts").defaults()["common_space_fraction"] == 0.8
    assert method(spm, "tsv_m").defaults() == {"alpha": 1.0, "rank_fraction": 0.0}


def _models(root, shapes, n):
    g = torch.Generator().manual_seed(20)
    base = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    paths = {"base": write_model(root / "base", base)}
    experts = []
    for t in range(n):
        expert = {name: x + 0.05 * torch.randn(x.shape, generator=g) for name, x in base.items()}
        experts.append(expert)
        paths[f"e{t}"] = write_model(root / f"e{t}", expert)
    return base, experts, paths


@pytest.mark.parametrize("name", NAMES)
def test_engine_and_in_memory_agree_bit_for_bit(spm, name, tmp_path):
    """The engine's workers run one thread each, in-memory sweeps several; MKL's float64 maths on matrices this
    large can round differently on 1 and 2 threads (it does for iso_cts here), which the one-thread rule hides."""
    shapes = {"big.weight": (256, 1024), "tall.weight": (1024, 256), "w.weight": (12, 9), "norm.weight": (12,)}
    base, experts, paths = _models(tmp_path, shapes, 2)
    params = {"alpha": 1.3}
    engine_merge(name, base=paths["base"], experts=[paths["e0"], paths["e1"]], output=tmp_path / "out",
                 plugin_manager=spm, threads=2, **params)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        memory = in_memory.merge(method(spm, name), params, base, experts)
    finally:
        torch.set_num_threads(threads)
    written = load_dir(tmp_path / "out")
    for tensor in shapes:
        assert torch.equal(written[tensor], memory[tensor]), tensor


@pytest.mark.parametrize("name", NAMES)
def test_conforms(spm, name):
    report = check_method(method(spm, name))
    assert report.ok, [f"{r.name}: {r.detail}" for r in report.failures]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", NAMES)
def test_on_cuda_the_tensors_stay_there_and_agree_with_the_cpu(spm, name):
    base, experts = family(21, (64, 96), 4)
    m = method(spm, name)
    got = m.merge(base.cuda(), [e.cuda() for e in experts], m.defaults(), TensorContext("w", (1.0,) * 4))
    assert got.is_cuda
    assert_matches(got.cpu(), reference(name, base, experts))
