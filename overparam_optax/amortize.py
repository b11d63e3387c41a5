"""Amortized preconditioning: when the factors of each matrix are recomputed, and their cache.

With ``precondition_every = k > 1`` the factors of every matrix (its SVD basis, or its
matmul-only factors) are computed on updates 0, k, 2k, ... (and on every update before
``warmup_steps``) and kept in the optimizer state; in between, the cached factors are
applied to the new gradient with matmuls only. The cache is a tree shaped like the params:
one entry per leaf whose matrices have factors, ``optax.MaskedNode()`` for every other leaf
(pass-through leaves, single-output leaves that use the closed form, and all leaves when
k = 1), so that ``optax.tree.map_params`` and sharding by parameter work.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from overparam_optax import linalg
from overparam_optax.views import MatrixView

__all__ = [
    "check_every",
    "check_warmup",
    "empty_entry",
    "init_entry",
    "next_age",
    "recompute_now",
]

_INT32_MAX = int(np.iinfo(np.int32).max)


def _static_int(value, name: str, minimum: int, hint: str) -> int:
    """A Python int (or a concrete 0-d integer array) in [minimum, 2**31 - 1]."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} must be known when tracing (it fixes the state's structure and schedule). "
            f"With optax.inject_hyperparams, pass static_args=(..., '{name}')."
        )
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == ():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be {hint}, got {value!r} of type {type(value).__name__}.")
    if not minimum <= value <= _INT32_MAX:
        raise ValueError(f"{name} must be {hint} (at most 2**31 - 1), got {value!r}.")
    return int(value)


#: ``precondition_every`` when it is None and ``method="auto"`` (the defaults): measured as
#: the fast and robust setting on CPU (docs/performance.md).
AUTO_EVERY = 10


def check_every(every, method: str) -> int:
    """``precondition_every`` as a Python int in [1, 2**31 - 1].

    None (the default) means ``AUTO_EVERY`` with ``method="auto"`` and 1 (the factors
    of the current W every update) with a method named explicitly, so that
    ``method="svd"`` alone is the exact rule.
    """
    # None, not an int, is the default so that optax.inject_hyperparams does not inject it.
    if every is None:
        return AUTO_EVERY if method == "auto" else 1
    return _static_int(every, "precondition_every", 1, "a positive int")


def check_warmup(warmup, every: int) -> int:
    """``warmup_steps`` as a Python int (None means 0); only meaningful with caching."""
    if warmup is None:
        return 0
    warmup = _static_int(warmup, "warmup_steps", 0, "a non-negative int")
    if warmup and every == 1:
        raise ValueError(
            f"warmup_steps={warmup} has no effect when the factors are recomputed on every "
            "update (precondition_every=1, the default with a method named explicitly); set "
            "precondition_every > 1 or drop it."
        )
    return warmup


def empty_entry() -> optax.MaskedNode:
    """The cache entry of a leaf without cached factors."""
    return optax.MaskedNode()


def tall_shape(view: MatrixView) -> tuple[int, int, int]:
    """(count, long side, short side): the orientation the factors are computed in."""
    return view.count, max(view.rows, view.cols), min(view.rows, view.cols)


def init_entry(view: MatrixView | None, dtype, N: int, method: str, every: int) -> Any:
    """Zero-filled factors for one leaf (filled by its first update), or an empty entry."""
    if view is None or view.is_vector or every == 1 or N == 1:
        return empty_entry()
    concrete = linalg.resolve_method(method, view.rows, view.cols, N=N)
    return linalg.depth_factors_like(tall_shape(view), linalg.compute_dtype(dtype), N, concrete)


def recompute_now(count: jax.Array, age: jax.Array, every: int, warmup: int) -> jax.Array:
    """Whether this update recomputes the factors.

    ``age`` counts the updates served by the cached factors; it starts at ``every`` (so
    the first update computes them) and never exceeds it, so the schedule keeps going
    after ``count`` saturates at the int32 maximum.
    """
    return (age >= every) | (count < warmup)


def next_age(age: jax.Array, recompute: jax.Array, saw_zero, every: int) -> jax.Array:
    """The age of the cached factors after this update.

    Factors computed from an exactly zero matrix would keep it frozen (P_0 = 0) until the
    next recomputation, so an update that saw one makes the next update recompute.
    """
    age = jnp.where(recompute, 1, jnp.minimum(age + 1, every))
    return jnp.where(saw_zero, every, age).astype(jnp.int32)
