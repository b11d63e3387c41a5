"""An independent float64 reference for P_W(G), written the textbook way.

It shares nothing with the library: matrix powers come from numpy eigendecompositions of
W W^T and W^T W, and the N terms are summed one by one. :func:`make_matrix` draws the test
matrices of the families in :data:`MATRIX_CASES`. Used by the tests and by
``benchmarks/accuracy.py``.
"""

import numpy as np

__all__ = ["MATRIX_CASES", "make_matrix", "psd_power", "reference_precondition"]


def psd_power(a: np.ndarray, exponent: float) -> np.ndarray:
    """a^exponent for a symmetric PSD matrix, by eigendecomposition; a^0 := I."""
    if exponent == 0:
        return np.eye(a.shape[0])
    eigenvalues, q = np.linalg.eigh((a + a.T) / 2)
    # Eigenvalues at rounding level are the zeros of a rank-deficient a.
    eigenvalues = np.where(eigenvalues > 1e-10 * max(eigenvalues.max(), 0.0), eigenvalues, 0.0)
    return (q * eigenvalues**exponent) @ q.T


def reference_precondition(w, g, N: int) -> np.ndarray:
    """The textbook sum over j, in float64: nothing shared with the library."""
    w = np.asarray(w, np.float64)
    g = np.asarray(g, np.float64)
    left, right = w @ w.T, w.T @ w
    return sum(
        psd_power(left, (j - 1) / N) @ g @ psd_power(right, (N - j) / N) for j in range(1, N + 1)
    )


def _with_singular_values(rng, m, n, singular_values):
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    k = len(singular_values)
    return (u[:, :k] * np.asarray(singular_values)) @ v[:, :k].T


def make_matrix(case: str, rng: np.random.Generator) -> np.ndarray:
    """A test matrix of one of the :data:`MATRIX_CASES` families, drawn from ``rng``."""
    if case == "square":
        return rng.normal(size=(6, 6))
    if case == "tall":
        return rng.normal(size=(9, 4))
    if case == "wide":
        return rng.normal(size=(3, 8))
    if case == "rank_deficient_tall":
        return rng.normal(size=(8, 2)) @ rng.normal(size=(2, 6))
    if case == "rank_deficient_wide":
        return rng.normal(size=(4, 3)) @ rng.normal(size=(3, 9))
    if case == "zero":
        return np.zeros((5, 3))
    if case == "scaled_identity":
        return 2.5 * np.eye(4)
    if case == "repeated_singular_values":
        return _with_singular_values(rng, 7, 5, [2.0, 2.0, 2.0, 0.5, 0.5])
    if case == "repeated_and_zero":
        return _with_singular_values(rng, 6, 6, [1.5, 1.5, 0.0, 0.0])
    if case == "row_vector":
        return rng.normal(size=(1, 7))
    if case == "column_vector":
        return rng.normal(size=(6, 1))
    raise ValueError(case)


#: The matrix families of the accuracy tests and of ``benchmarks/accuracy.py``: shapes,
#: ranks and repeated or zero singular values where a preconditioner can go wrong.
MATRIX_CASES = [
    "square",
    "tall",
    "wide",
    "rank_deficient_tall",
    "rank_deficient_wide",
    "zero",
    "scaled_identity",
    "repeated_singular_values",
    "repeated_and_zero",
    "row_vector",
    "column_vector",
]
