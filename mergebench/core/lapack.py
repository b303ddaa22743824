"""Two float64 LAPACK/BLAS routines of scipy's OpenBLAS, called so that the GIL is let go during the call.

scipy's wrappers (``scipy.linalg.blas.dsyrk``, ``scipy.linalg.eigh(driver="evr")``) hold the GIL while OpenBLAS
runs, so two engine workers' calls run one after the other (measured: eight dsyevr calls took 0.43 s on one thread
and 0.43 s over two). ctypes lets go of the GIL for the call; the library, routine and arguments are the ones
scipy's wrappers use (dsyrk on a column-major A = b^T, dsyevr with range "I", abstol 0 and the optimal workspace),
so the results are the same bits (tests/test_lapack.py). Where that library cannot be found (scipy built against
another BLAS), :func:`blas` is None and :func:`syrk_lower_` and :func:`top_eigh` call scipy's wrappers.

OpenBLAS runs on one thread here (``single_threaded_scipy``): the engine already runs one worker per core, and
BLAS rounding may depend on the thread count.
"""

from __future__ import annotations

import ctypes
from functools import cache
from typing import Any

import numpy as np

_COL_MAJOR, _LOWER, _NO_TRANS = 102, 122, 111  # cblas.h / lapacke.h constants
_c_int, _c_double, _ptr = ctypes.c_int, ctypes.c_double, ctypes.c_void_p


@cache
def single_threaded_scipy() -> Any:
    """scipy.linalg, with OpenBLAS (scipy's and numpy's) set to one thread for the rest of the process."""
    import scipy.linalg
    import scipy.linalg.blas
    from threadpoolctl import ThreadpoolController

    ThreadpoolController().select(internal_api="openblas").limit(limits=1)
    return scipy.linalg


class _OpenBLAS:
    def __init__(self, lib: ctypes.CDLL, prefix: str):
        self.syrk = getattr(lib, f"{prefix}cblas_dsyrk")
        self.syrk.restype = None
        self.syrk.argtypes = [_c_int, _c_int, _c_int, _c_int, _c_int, _c_double, _ptr, _c_int, _c_double, _ptr,
                              _c_int]
        self.syevr = getattr(lib, f"{prefix}LAPACKE_dsyevr")
        self.syevr.restype = _c_int
        self.syevr.argtypes = [_c_int, ctypes.c_char, ctypes.c_char, ctypes.c_char, _c_int, _ptr, _c_int, _c_double,
                               _c_double, _c_int, _c_int, _c_double, ctypes.POINTER(_c_int), _ptr, _ptr, _c_int, _ptr]

    def dsyrk_lower(self, b: np.ndarray, c: np.ndarray) -> None:
        """c += b^T b in c's lower triangle, for b C-contiguous (rows x n) and c Fortran-ordered (n x n) float64:
        scipy's ``dsyrk(1.0, b.T, beta=1.0, c=c, trans=0, lower=1)``."""
        rows, n = b.shape
        assert b.flags.c_contiguous and c.flags.f_contiguous and b.dtype == c.dtype == np.float64
        self.syrk(_COL_MAJOR, _LOWER, _NO_TRANS, n, rows, 1.0, b.ctypes.data, n, 1.0, c.ctypes.data, n)

    def dsyevr_top(self, a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k largest eigenvalues (ascending) and their eigenvectors of the symmetric matrix whose lower
        triangle ``a`` (Fortran-ordered float64, overwritten) holds: scipy's ``eigh(a, lower=True,
        subset_by_index=[n - k, n - 1], driver="evr")``."""
        n = a.shape[0]
        assert a.flags.f_contiguous and a.dtype == np.float64 and 0 < k <= n
        found = _c_int(0)
        w = np.empty(n)
        z = np.empty((n, k), order="F")
        isuppz = np.empty(2 * k, dtype=np.intc)
        info = self.syevr(_COL_MAJOR, b"V", b"I", b"L", n, a.ctypes.data, n, 0.0, 0.0, n - k + 1, n, 0.0,
                          ctypes.byref(found), w.ctypes.data, z.ctypes.data, n, isuppz.ctypes.data)
        if info != 0 or found.value != k:
            raise ArithmeticError(f"LAPACK dsyevr failed (info {info}, {found.value} of {k} eigenvalues)")
        return w[:k].copy(), z


@cache
def blas() -> _OpenBLAS | None:
    """scipy's OpenBLAS (32-bit integers) through ctypes, or None where it is not found."""
    single_threaded_scipy()  # loads scipy's OpenBLAS and sets its thread count
    from threadpoolctl import ThreadpoolController

    for controller in ThreadpoolController().select(internal_api="openblas").lib_controllers:
        try:
            lib = ctypes.CDLL(controller.filepath)
        except OSError:
            continue
        for prefix in ("scipy_", ""):  # scipy's wheels prefix their symbols; numpy's 64-bit build adds "64_"
            if hasattr(lib, f"{prefix}cblas_dsyrk") and hasattr(lib, f"{prefix}LAPACKE_dsyevr"):
                return _OpenBLAS(lib, prefix)
    return None


def syrk_lower_(b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """c += b^T b in c's lower triangle (b C-contiguous rows x n, c Fortran-ordered n x n, both float64); returns c."""
    openblas = blas()
    if openblas is None:
        return single_threaded_scipy().blas.dsyrk(1.0, b.T, beta=1.0, c=c, trans=0, lower=1, overwrite_c=1)
    openblas.dsyrk_lower(b, c)
    return c


def top_eigh(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenvalues (ascending) and their eigenvectors of the symmetric float64 matrix whose lower
    triangle ``a`` holds (``a`` is not changed)."""
    openblas = blas()
    if openblas is None:
        n = a.shape[0]
        return single_threaded_scipy().eigh(a, lower=True, subset_by_index=[n - k, n - 1], driver="evr",
                                            check_finite=False)
    return openblas.dsyevr_top(np.array(a, order="F"), k)
