"""An independent float64 reference for P_W(G), written the textbook way.

It shares nothing with the library: matrix powers come from numpy eigendecompositions of
W W^T and W^T W, and the N terms are summed one by one. Used by the tests and by
benchmarks/accuracy.py.
"""

import numpy as np


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
