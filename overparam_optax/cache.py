"""The default's cache: the tracked right singular basis of each matrix, shaped like the params.

With ``method="tracked"`` (the default) every matrix keeps its right singular basis V from
one update to the next (:class:`~overparam_optax.linalg.TrackedBasis`); the update rotates
it toward the current W and recomputes it only when the rotation cannot hold the tolerance
(:func:`~overparam_optax.linalg.tracked_precondition`). The cache is a tree shaped like the
params: one entry per leaf whose matrices have a basis, ``optax.MaskedNode()`` for every
other leaf (pass-through leaves, single-output leaves that use the closed form, and every
leaf with a method that decomposes afresh), so that ``optax.tree.map_params`` and sharding
by parameter work. Its types and shapes depend only on the params and the options, never
on the machine or the backend, so a checkpoint restores anywhere.
"""

from __future__ import annotations

from typing import Any

import optax

from overparam_optax import linalg
from overparam_optax.views import MatrixView

__all__ = ["empty_entry", "init_entry", "tall_shape"]


def empty_entry() -> optax.MaskedNode:
    """The cache entry of a leaf without a tracked basis."""
    return optax.MaskedNode()


def tall_shape(view: MatrixView) -> tuple[int, int, int]:
    """(count, long side, short side): the orientation the basis is computed in."""
    return view.count, max(view.rows, view.cols), min(view.rows, view.cols)


def init_entry(view: MatrixView | None, dtype, N: int, method: str) -> Any:
    """The zero basis (computed by the leaf's first update) for one leaf, or an empty entry."""
    if view is None or view.is_vector or method != "tracked" or N == 1:
        return empty_entry()
    return linalg.tracked_basis_like(tall_shape(view), linalg.compute_dtype(dtype))
