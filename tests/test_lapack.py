"""mergebench.core.lapack: dsyrk and dsyevr called through ctypes give scipy's wrappers' bits (that they let go of
the GIL, and what it saves, is measured in benchmarks/merge_speed.py, docs/benchmarks.md)."""

from __future__ import annotations

import numpy as np
import pytest

from mergebench.core import lapack

openblas = lapack.blas()
pytestmark = pytest.mark.skipif(openblas is None, reason="scipy's OpenBLAS not found: the scipy wrappers are used")
scipy_linalg = lapack.single_threaded_scipy()


@pytest.mark.parametrize("rows,n,blocks", [(1, 1, 1), (7, 5, 3), (4096, 96, 2), (300, 768, 1)])
def test_dsyrk_accumulates_the_lower_triangle_as_scipys_wrapper_does(rows, n, blocks):
    rng = np.random.default_rng(rows + n)
    ours, theirs, want = np.zeros((n, n), order="F"), np.zeros((n, n), order="F"), np.zeros((n, n))
    for _ in range(blocks):
        b = rng.standard_normal((rows, n))
        openblas.dsyrk_lower(b, ours)
        theirs = scipy_linalg.blas.dsyrk(1.0, b.T, beta=1.0, c=theirs, trans=0, lower=1, overwrite_c=1)
        want += b.T @ b
    assert np.array_equal(ours, theirs)
    # the maths, independently: the lower triangle of sum_b b^T b, the upper one untouched
    assert np.allclose(ours, np.tril(want), rtol=1e-12, atol=1e-9 * rows)


@pytest.mark.parametrize("n,k", [(1, 1), (6, 2), (96, 12), (768, 96), (50, 50)])
def test_dsyevr_gives_scipys_top_eigenpairs_bit_for_bit(n, k):
    rng = np.random.default_rng(n * 100 + k)
    x = rng.standard_normal((n + 3, n))
    gram = np.asfortranarray(x.T @ x)
    gram[np.triu_indices(n, 1)] = np.nan  # only the lower triangle is read: spoil the upper one
    values, vectors = openblas.dsyevr_top(np.array(gram, order="F"), k)
    want_values, want_vectors = scipy_linalg.eigh(gram, lower=True, subset_by_index=[n - k, n - 1], driver="evr",
                                                  check_finite=False)
    assert np.array_equal(values, want_values) and np.array_equal(vectors, want_vectors)
    # and they are the top eigenpairs of the symmetric matrix (numpy's eigh, another solver)
    full = np.tril(gram) + np.tril(gram, -1).T
    assert np.allclose(values, np.linalg.eigvalsh(full)[n - k:], rtol=1e-10, atol=1e-8)
    assert np.allclose(full @ vectors, vectors * values, atol=1e-8 * max(1.0, abs(values).max()))


def test_the_subspace_maths_is_the_same_through_scipys_wrappers(monkeypatch):
    """Where scipy's OpenBLAS is not found (``blas()`` is None), lapack's syrk_lower_ and top_eigh (under
    subspace's gram and _top_eigh) call scipy's wrappers: the same bits on the same library."""
    import torch

    from mergebench.plugins import subspace

    x = torch.randn(5000, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours = subspace.gram(x), subspace._top_eigh(subspace.gram(x), 8)
    monkeypatch.setattr(lapack, "blas", lambda: None)
    theirs = subspace.gram(x), subspace._top_eigh(subspace.gram(x), 8)
    assert torch.equal(ours[0], theirs[0])
    assert all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1]))
