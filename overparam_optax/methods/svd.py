"""``method="svd"``: the exact rule on every update, from a thin SVD of W."""

from __future__ import annotations

import dataclasses

from overparam_optax import numerics
from overparam_optax.methods.base import Decomposing

__all__ = ["Svd"]


@dataclasses.dataclass(frozen=True)
class Svd(Decomposing):
    """The exact rule: a thin SVD of every matrix on every update (rank-aware: a tall or
    wide matrix never needs a square SVD), then four m x n x n products."""

    name = "svd"
    factors_are_svd = True

    def factors(self, w, N, precision):
        del N, precision
        return numerics.svd_basis(w)

    def apply(self, factors, g, N, precision):
        return numerics.apply_basis(factors, g, N, precision)
