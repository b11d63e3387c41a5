"""The depth-N end-to-end preconditioner P_W(G), one matrix (or a batch) at a time.

Everything numerical lives here; `transform.py` only maps it over a parameter tree.

For an m x n matrix W with SVD W = U diag(s) V^T, the operator

    P_W(G) = sum_{j=1..N} [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N}        (A^0 := I)

is diagonal in the singular bases: entry (a, b) of U_full^T G V_full is multiplied by

    k(s_a, s_b) = sum_{j=1..N} s_a^{2(j-1)/N} s_b^{2(N-j)/N},

where U_full, V_full complete U, V to square orthogonal matrices and the singular values
are padded with zeros. We never form the complements. Assume m >= n (P is invariant under
transposing W and G together, so a wide matrix is transposed first). Then V is square,
only the left complement (I - U U^T) exists, and on it s_a = 0 so only the j = 1 term
survives: k(0, s_b) = s_b^{2(N-1)/N} =: d_b. Writing B = G V and A = U^T B,

    P_W(G) = [ U ((K - 1 d^T) o A) + B diag(d) ] V^T,

with o the elementwise product. The cost is one thin SVD and four m x n x n matmuls.

Zero singular values: 0^0 is 1 only for the identity factors (j = 1 on the left,
j = N on the right); every positive power of 0 is exactly 0. So a zero W gives
P_W(G) = 0 for N >= 2 and no NaN appears, and repeated singular values need no care
because k depends on the values only, never on the (non-unique) singular vectors.
Singular values below numpy's rank tolerance, max(m, n) * eps * s_max, are taken to be
exactly zero (see `_truncate_below_rank_tolerance`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_depth",
    "compute_dtype",
    "depth_kernel",
    "precondition_matrix",
    "precondition_vector",
]


def check_depth(N) -> int:
    """Returns N as a Python int, or raises ValueError if it is not a positive integer."""
    # numpy integers are accepted; bools, floats and traced arrays are not (the number of
    # terms in the sum must be known when tracing).
    if isinstance(N, (int, np.integer)) and not isinstance(N, bool) and N >= 1:
        return int(N)
    raise ValueError(
        f"N (the depth) must be a positive Python int, got {N!r} of type {type(N).__name__}. "
        "With optax.inject_hyperparams, pass static_args=('N',)."
    )


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype the preconditioner computes in: float32, or wider if the input is wider."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def _singular_value_powers(s: jax.Array, N: int) -> jax.Array:
    """Returns p[..., r, j] = s_r^{2j/N} for j = 0..N-1, with s^0 := 1 even for s = 0."""
    s = jnp.maximum(s, 0)  # an SVD never returns negatives, but a Gram route might.
    exponents = 2.0 * jnp.arange(1, N, dtype=s.dtype) / N
    positive = jnp.power(s[..., None], exponents)  # 0^positive == 0 exactly
    return jnp.concatenate([jnp.ones_like(s)[..., None], positive], axis=-1)


def depth_kernel(s_left: jax.Array, s_right: jax.Array, N: int) -> jax.Array:
    """The multiplier k(s_a, s_b) = sum_{j=1..N} s_a^{2(j-1)/N} s_b^{2(N-j)/N}.

    Args:
      s_left: singular values indexing rows, shape (..., k1), non-negative.
      s_right: singular values indexing columns, shape (..., k2), non-negative.
      N: the depth, a positive int.

    Returns:
      An array of shape (..., k1, k2). It is a sum of N rank-one terms, so it is
      computed as one small matmul of the power tables.
    """
    N = check_depth(N)
    p_left = _singular_value_powers(s_left, N)  # (..., k1, N): exponent 2(j-1)/N
    p_right = _singular_value_powers(s_right, N)[..., ::-1]  # exponent 2(N-j)/N
    return jnp.einsum("...aj,...bj->...ab", p_left, p_right)


def _truncate_below_rank_tolerance(s: jax.Array, shape, dtype) -> jax.Array:
    """Sets singular values at rounding level (numpy's matrix_rank tolerance) to exactly 0.

    s -> s^{2/N} is not Lipschitz at 0: a zero singular value that the SVD returns as
    1e-7 * s_max in float32 would contribute (1e-7)^{2/N} (about 2% for N = 8) instead of
    nothing. Values below max(m, n) * eps * s_max are indistinguishable from rounding
    noise, so they are treated as the zeros they most likely are.
    """
    tolerance = max(shape) * jnp.finfo(dtype).eps * jnp.max(s, axis=-1, keepdims=True)
    return jnp.where(s > tolerance, s, 0)


def _precondition_tall(w: jax.Array, g: jax.Array, N: int, precision) -> jax.Array:
    """P_W(G) for m >= n via the thin SVD (module docstring). Batched over leading axes."""
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    s = _truncate_below_rank_tolerance(s, w.shape[-2:], w.dtype)
    v = jnp.swapaxes(vt, -1, -2)
    kernel = depth_kernel(s, s, N)
    d = _singular_value_powers(s, N)[..., -1]  # s^{2(N-1)/N}, the complement multiplier
    b = jnp.matmul(g, v, precision=precision)
    a = jnp.matmul(jnp.swapaxes(u, -1, -2), b, precision=precision)
    inner = jnp.matmul(u, (kernel - d[..., None, :]) * a, precision=precision)
    return jnp.matmul(inner + b * d[..., None, :], vt, precision=precision)


def precondition_matrix(
    W: jax.Array,
    G: jax.Array,
    N: int,
    *,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
) -> jax.Array:
    r"""Applies the depth-N end-to-end preconditioner to one gradient matrix.

    .. math::
      P_W(G) = \sum_{j=1}^{N} (W W^\top)^{\frac{j-1}{N}} \, G \, (W^\top W)^{\frac{N-j}{N}}

    This is the direction in which gradient flow on a depth-N balanced linear
    factorization W = W_N \cdots W_1 moves the end-to-end matrix (Arora et al., 2018,
    Theorem 1). It is computed exactly from a thin SVD of W (rank-aware: a tall or wide
    matrix never needs a square SVD). Leading axes, if any, are batch axes.

    Args:
      W: the end-to-end matrix, shape (..., m, n).
      G: the gradient of the loss with respect to W, same shape.
      N: the depth, a positive Python int. N = 1 returns G unchanged.
      precision: matmul precision (XLA's default on TPU/GPU may use bf16/tf32 passes).

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
    N = check_depth(N)
    W = jnp.asarray(W)
    G = jnp.asarray(G)
    if W.ndim < 2 or W.shape != G.shape:
        raise ValueError(
            f"precondition_matrix expects W and G of the same shape (..., m, n); got W "
            f"{W.shape} and G {G.shape}."
        )
    if N == 1:
        return G
    return _precondition_exact(W, G, N, precision)


@functools.partial(jax.jit, static_argnames=("N", "precision"))
def _precondition_exact(W: jax.Array, G: jax.Array, N: int, precision) -> jax.Array:
    """The exact path, jitted so that eager calls do not dispatch op by op."""
    dtype = compute_dtype(jnp.promote_types(W.dtype, G.dtype))
    w, g = W.astype(dtype), G.astype(dtype)
    if w.shape[-2] < w.shape[-1]:  # wide: use the transpose identity P_{W^T}(G^T) = P_W(G)^T
        out = jnp.swapaxes(
            _precondition_tall(jnp.swapaxes(w, -1, -2), jnp.swapaxes(g, -1, -2), N, precision),
            -1,
            -2,
        )
    else:
        out = _precondition_tall(w, g, N, precision)
    return out.astype(G.dtype)


def precondition_vector(w: jax.Array, g: jax.Array, N: int) -> jax.Array:
    r"""The single-output closed form of :func:`precondition_matrix`.

    For a 1 x n (or n x 1) matrix w, W W^T is the scalar ||w||^2 and W^T W is
    ||w||^2 times the projection onto w, which gives

    .. math::
      P_w(g) = \|w\|^{2 - 2/N} \left( g + (N - 1) \frac{\langle w, g\rangle}{\|w\|^2} w \right).

    Leading axes, if any, are batch axes; the last axis is the vector.

    Args:
      w: the weights, shape (..., n).
      g: the gradient, same shape.
      N: the depth, a positive Python int.

    Returns:
      P_w(g) with g's shape and dtype; zero where w = 0 (for N >= 2).
    """
    N = check_depth(N)
    w = jnp.asarray(w)
    g = jnp.asarray(g)
    if w.shape != g.shape or w.ndim < 1:
        raise ValueError(
            f"precondition_vector expects w and g of the same shape (..., n); got {w.shape} "
            f"and {g.shape}."
        )
    if N == 1:
        return g
    dtype = compute_dtype(jnp.promote_types(w.dtype, g.dtype))
    wc, gc = w.astype(dtype), g.astype(dtype)
    sq_norm = jnp.sum(wc * wc, axis=-1, keepdims=True)
    # Guard the division only: where w = 0 the scale below is 0, so the projection is moot.
    safe_sq_norm = jnp.where(sq_norm > 0, sq_norm, 1)
    projection = jnp.sum(wc * gc, axis=-1, keepdims=True) / safe_sq_norm * wc
    scale = jnp.power(sq_norm, 1.0 - 1.0 / N)
    return (scale * (gc + (N - 1) * projection)).astype(g.dtype)
