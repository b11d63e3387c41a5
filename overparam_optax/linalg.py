"""The preconditioner of one gradient matrix (or a batch of them), as plain functions.

:func:`precondition_matrix` computes P_W(G) with a method that decomposes W afresh
(:mod:`overparam_optax.methods`); :func:`precondition_vector` is the closed form for a
single-output matrix. The shared numerics (the depth kernel, the precision policy, the
application from a singular basis) are in :mod:`overparam_optax.numerics`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from overparam_optax import methods, numerics, spectral_jvp

__all__ = ["precondition_matrix", "precondition_vector"]


def precondition_matrix(
    W: jax.Array,
    G: jax.Array,
    N: int,
    *,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
    method: str = "svd",
) -> jax.Array:
    r"""Applies the depth-N end-to-end preconditioner to one gradient matrix.

    .. math::
      P_W(G) = \sum_{j=1}^{N} (W W^\top)^{\frac{j-1}{N}} \, G \, (W^\top W)^{\frac{N-j}{N}}

    This is the direction in which gradient flow on a depth-N balanced linear
    factorization :math:`W = W_N \cdots W_1` moves the end-to-end matrix (Arora et al., 2018,
    Theorem 1). It is computed exactly from a thin SVD of W (rank-aware: a tall or wide
    matrix never needs a square SVD). Leading axes, if any, are batch axes.

    Args:
      W: the end-to-end matrix, shape (..., m, n).
      G: the gradient of the loss with respect to W, same shape.
      N: the depth, a positive Python int. N = 1 returns G unchanged.
      precision: matmul precision (XLA's default on TPU/GPU may use bf16/tf32 passes).
      method: "svd" (default; the exact reference), "eigh" (eigendecomposition of the
        smaller Gram matrix), "newton" (matmul-only: Newton-Schulz polar factor and a
        coupled root iteration, N <=
        :data:`~overparam_optax.methods.newton.NEWTON_MAX_DEPTH`), or an instance of one of
        them. See docs/performance.md for their speed and error. (The transform's
        default, "tracked", carries a basis from update to update:
        :mod:`overparam_optax.methods.tracked`.)

    Returns:
      P_W(G), with G's shape and dtype. Computed in float32 or wider (bf16/f16 inputs are
      upcast), so low-precision parameters do not degrade the SVD.

    Examples:
      >>> import jax.numpy as jnp
      >>> import overparam_optax as opx
      >>> W = jnp.diag(jnp.array([4.0, 1.0]))
      >>> opx.precondition_matrix(W, jnp.ones((2, 2)), N=2)
      Array([[8., 5.],
             [5., 2.]], dtype=float32)

    References:
      Arora, Cohen & Hazan, "On the Optimization of Deep Networks: Implicit
      Acceleration by Overparameterization", ICML 2018.
    """
    N = numerics.check_depth(N)
    W = jnp.asarray(W)
    G = jnp.asarray(G)
    numerics.check_real("precondition_matrix", W=W, G=G)
    if W.ndim < 2 or W.shape != G.shape:
        raise ValueError(
            f"precondition_matrix expects W and G of the same shape (..., m, n); got W "
            f"{W.shape} and G {G.shape}."
        )
    if N == 1 or W.size == 0:  # an empty matrix has an empty update
        return G
    decomposing = methods.resolve(method)
    if not isinstance(decomposing, methods.Decomposing):
        stateless = tuple(
            name for name, cls in methods.REGISTRY.items() if issubclass(cls, methods.Decomposing)
        )
        raise ValueError(
            f"method must be one of {stateless} (a single call has no basis to carry "
            f"over), got {method!r}."
        )
    decomposing.check_depth(N)
    W, lifted = numerics.lift_subnormal(W.astype(numerics.compute_dtype(W.dtype)))
    # Differentiable in W and G for every method, also at repeated and zero singular values.
    out = spectral_jvp.differentiable_precondition(decomposing, W, G, N, precision)
    return numerics.unlift(out, lifted, N).astype(G.dtype)



def precondition_vector(w: jax.Array, g: jax.Array, N: int) -> jax.Array:
    r"""The single-output closed form of :func:`precondition_matrix`.

    For a 1 x n (or n x 1) matrix w, W W^T is the scalar ||w||^2 and W^T W is
    ||w||^2 times the projection onto w, which gives

    .. math::
      P_w(g) = \|w\|^{2 - 2/N} \left( g + (N - 1) \frac{\langle w, g\rangle}{\|w\|^2} w \right).

    w is divided by its largest entry first (the formula is homogeneous), so ||w||^2
    neither overflows nor underflows at any representable scale.

    Leading axes, if any, are batch axes; the last axis is the vector.

    Args:
      w: the weights, shape (..., n).
      g: the gradient, same shape.
      N: the depth, a positive Python int.

    Returns:
      P_w(g) with g's shape and dtype; zero where w = 0 (for N >= 2).
    """
    N = numerics.check_depth(N)
    w = jnp.asarray(w)
    g = jnp.asarray(g)
    numerics.check_real("precondition_vector", w=w, g=g)
    if w.shape != g.shape or w.ndim < 1:
        raise ValueError(
            f"precondition_vector expects w and g of the same shape (..., n); got {w.shape} "
            f"and {g.shape}."
        )
    if N == 1:
        return g
    dtype = numerics.compute_dtype(jnp.promote_types(w.dtype, g.dtype))
    wc, gc = w.astype(dtype), g.astype(dtype)
    wc, lifted = numerics.lift_subnormal(wc[..., None, :])  # subnormal w read as it is
    wc = wc[..., 0, :]
    # Without a derivative: P is homogeneous, so the scale's own derivative cancels (and
    # at |w| ~ 1e-20 it would overflow, 1 / alpha^2, into a NaN).
    alpha = jax.lax.stop_gradient(numerics.max_abs(wc, axes=-1))
    wc = wc / alpha
    t = numerics.half_scale(alpha, N, dtype)
    gc = gc * t
    sq_norm = jnp.sum(wc * wc, axis=-1, keepdims=True)
    # Guard the division only: where w = 0 the scale below is 0, so the projection is moot.
    safe_sq_norm = jnp.where(sq_norm > 0, sq_norm, 1)
    projection = jnp.sum(wc * gc, axis=-1, keepdims=True) / safe_sq_norm * wc
    # 0 where w = 0, through a guarded power: the derivative of x^{1-1/N} is infinite at 0,
    # and an unguarded one would make the derivative there NaN (0 * inf).
    scale = jnp.where(sq_norm > 0, jnp.power(safe_sq_norm, 1.0 - 1.0 / N), 0)
    out = numerics.unlift((scale * (gc + (N - 1) * projection)) * t, lifted, N)
    return out.astype(g.dtype)
