"""``method="eigh"``: the basis from an eigendecomposition of the smaller Gram matrix."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from overparam_optax import numerics
from overparam_optax.methods.base import Decomposing
from overparam_optax.numerics import matmul, matrix_transpose

__all__ = ["Eigh", "gram"]


def gram(w: jax.Array, precision) -> jax.Array:
    """W^T W, exactly symmetric (as ``eigh`` wants it)."""
    return numerics.symmetrize(matmul(matrix_transpose(w), w, precision))


@dataclasses.dataclass(frozen=True)
class Eigh(Decomposing):
    """The basis from the eigendecomposition of W^T W on every update.

    W is first divided by its largest entry, so the Gram matrix neither overflows nor
    underflows at any weight scale. The eigenvectors v come from ``eigh`` of W^T W; the
    singular values are then taken as the column norms of B = W v (not as the square roots
    of the eigenvalues) and u = B / s. The eigenvalues of the Gram matrix carry an absolute
    error of order eps * s_max^2, i.e. a relative error eps (s_max / s)^2 on s^2, which for
    condition number 1e3 in float32 reached 1e-2 on the smallest values and 7.6e-3 on P
    (N = 8); the column norms are accurate to about eps * s_max instead, because an
    eigenvector error is mostly mixing with eigenvalues of similar size. Values below
    numpy's rank tolerance max(m, n) * eps * s_max are set to 0 (and their columns of u).
    """

    name = "eigh"

    def factors(self, w, N, precision):
        del N
        alpha = numerics.max_abs(w)
        w = w / alpha
        _, v = jnp.linalg.eigh(gram(w, precision))
        basis = numerics.basis_from_columns(matmul(w, v, precision), v, w.shape[-2:])
        return basis._replace(s=basis.s * alpha[..., 0])

    def apply(self, factors, g, N, precision):
        return numerics.apply_basis(factors, g, N, precision)
