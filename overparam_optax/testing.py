"""Test utilities: an independent float64 reference for P_W(G), and test matrices.

The reference shares nothing with the library: matrix powers come from numpy
eigendecompositions of W W^T and W^T W, and the N terms are summed one by one, so a test can
check any method of :func:`overparam_optax.overparam_precondition` against it.
:func:`make_matrix` draws the test matrices of the families in :data:`MATRIX_CASES`, where
a preconditioner can go wrong. Needs numpy only (no optional dependency)::

    >>> import numpy as np
    >>> from overparam_optax import testing
    >>> w = testing.make_matrix("tall", np.random.default_rng(0))
    >>> testing.reference_precondition(w, np.ones_like(w), N=2).shape
    (9, 4)
"""

import numpy as np

__all__ = [
    "MATRIX_CASES",
    "make_matrix",
    "psd_power",
    "reference_precondition",
    "with_singular_values",
]


def psd_power(a: np.ndarray, exponent: float) -> np.ndarray:
    """``a`` to the power ``exponent``, for a symmetric positive semi-definite matrix.

    Computed from an eigendecomposition of the symmetrized ``a``; eigenvalues at rounding
    level count as zero, and ``a**0`` is the identity (also for a singular ``a``).

    Args:
      a: a square, symmetric PSD matrix (e.g. ``W @ W.T``).
      exponent: a non-negative power.

    Returns:
      ``a**exponent`` as a float64 numpy array of ``a``'s shape.
    """
    if exponent == 0:
        return np.eye(a.shape[0])
    eigenvalues, q = np.linalg.eigh((a + a.T) / 2)
    # Eigenvalues at rounding level are the zeros of a rank-deficient a.
    eigenvalues = np.where(eigenvalues > 1e-10 * max(eigenvalues.max(), 0.0), eigenvalues, 0.0)
    return (q * eigenvalues**exponent) @ q.T


def reference_precondition(w, g, N: int) -> np.ndarray:
    """P_W(G) = sum_{j=1..N} (W W^T)^{(j-1)/N} G (W^T W)^{(N-j)/N}, in float64.

    The textbook sum over j with numpy only: nothing is shared with the library.

    Args:
      w: the weight matrix W, shape (m, n).
      g: the gradient G, shape (m, n).
      N: the depth, >= 1.

    Returns:
      P_W(G) as a float64 numpy array of shape (m, n).
    """
    w = np.asarray(w, np.float64)
    g = np.asarray(g, np.float64)
    left, right = w @ w.T, w.T @ w
    return sum(
        psd_power(left, (j - 1) / N) @ g @ psd_power(right, (N - j) / N) for j in range(1, N + 1)
    )


def with_singular_values(
    rng: np.random.Generator, m: int, n: int, singular_values
) -> np.ndarray:
    """An m x n matrix with the given singular values and random singular vectors.

    Args:
      rng: the generator of the random orthogonal factors.
      m: the number of rows.
      n: the number of columns.
      singular_values: at most ``min(m, n)`` values (repeats and zeros allowed); the
        matrix's other singular values are zero.

    Returns:
      ``U[:, :k] diag(singular_values) V[:, :k]^T`` as a float64 numpy array.
    """
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    k = len(singular_values)
    return (u[:, :k] * np.asarray(singular_values)) @ v[:, :k].T


def make_matrix(case: str, rng: np.random.Generator) -> np.ndarray:
    """A test matrix of one of the :data:`MATRIX_CASES` families, drawn from ``rng``.

    Args:
      case: one of :data:`MATRIX_CASES`.
      rng: the generator the random entries come from.

    Returns:
      The matrix, a float64 numpy array.

    Raises:
      ValueError: ``case`` is not one of :data:`MATRIX_CASES`.
    """
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
        return with_singular_values(rng, 7, 5, [2.0, 2.0, 2.0, 0.5, 0.5])
    if case == "repeated_and_zero":
        return with_singular_values(rng, 6, 6, [1.5, 1.5, 0.0, 0.0])
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
