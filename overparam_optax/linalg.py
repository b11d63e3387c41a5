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
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "METHODS",
    "PolarRoot",
    "SpectralBasis",
    "apply_depth_factors",
    "check_depth",
    "compute_dtype",
    "depth_factors",
    "depth_factors_like",
    "depth_kernel",
    "precondition_matrix",
    "precondition_vector",
    "refresh_singular_values",
    "resolve_method",
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


# --------------------------------------------------------------------------------------
# Fast paths (docs/performance.md): one decomposition ("factors") of the tall matrix W,
# then a matmul-only application to G. The factors can be cached and reused for later
# gradients (the transform's ``precondition_every``): applied to G they give exactly
# P_{W_old}(G) for the W they were computed from.
# --------------------------------------------------------------------------------------

#: The values of ``method``; "auto" resolves to one of the others per platform and shape.
METHODS = ("svd", "eigh", "newton", "auto")

#: Default number of coupled-Newton steps of ``method="newton"``. Each step multiplies the
#: smallest resolved eigenvalue ratio of W^T W by about (1 + 1/(2N))^(2N) (>= 2.25), so 20
#: steps resolve singular values down to ~1e-4 of the largest (docs/performance.md).
NEWTON_ITERATIONS = 20


class SpectralBasis(NamedTuple):
    """Thin SVD ``W = u diag(s) v^T`` of a tall (rows >= cols) matrix, batched over leading axes.

    Singular values below the method's rank tolerance are exactly 0 (and so are the
    matching columns of ``u`` for ``method="eigh"``).
    """

    u: jax.Array  # (..., m, n)
    s: jax.Array  # (..., n)
    v: jax.Array  # (..., n, n)


class PolarRoot(NamedTuple):
    """Matmul-only factors of a tall matrix W: ``W = q (W^T W)^{1/2}`` and ``root = (W^T W)^{1/N}``.

    ``q`` is the polar factor (orthonormal columns on the range of W); (W W^T)^p equals
    ``q root^{pN} q^T`` for every p > 0, which is all the preconditioner needs.
    """

    q: jax.Array  # (..., m, n)
    root: jax.Array  # (..., n, n)


def resolve_method(method: str, rows: int, cols: int, platform: str | None = None) -> str:
    """Maps ``method`` to a concrete algorithm for one (rows x cols) matrix shape.

    "auto" picks, from the measurements in docs/performance.md: "eigh" on CPU (LAPACK's
    symmetric eigensolver on the small Gram matrix is several times faster than its SVD),
    and on GPU/TPU "newton" for matrices whose smaller side is at least 128 (matmuls run
    near peak there while the eigensolvers do not), "eigh" below that.

    Args:
      method: one of :data:`METHODS`.
      rows, cols: the matrix shape (the batch does not matter).
      platform: "cpu", "gpu", "tpu", ...; default ``jax.default_backend()``.

    Returns:
      "svd", "eigh" or "newton".
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if method != "auto":
        return method
    platform = jax.default_backend() if platform is None else platform
    if platform == "cpu" or min(rows, cols) < 128:
        return "eigh"
    return "newton"


def _svd_basis(w: jax.Array) -> SpectralBasis:
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    s = _truncate_below_rank_tolerance(s, w.shape[-2:], w.dtype)
    return SpectralBasis(u, s, jnp.swapaxes(vt, -1, -2))


def _gram(w: jax.Array, precision) -> jax.Array:
    gram = jnp.matmul(jnp.swapaxes(w, -1, -2), w, precision=precision)
    return 0.5 * (gram + jnp.swapaxes(gram, -1, -2))  # exactly symmetric for eigh


def _eigh_basis(w: jax.Array, precision) -> SpectralBasis:
    """The basis from the eigendecomposition of the smaller Gram matrix W^T W.

    Its eigenvalues are s^2 with an absolute error of order eps * s_max^2, so singular
    values are resolved only down to about sqrt(eps) * s_max (the squared condition
    number). Eigenvalues at or below eps * lambda_max (round-off level) are set to 0;
    u = W v / s on the others, 0 elsewhere. numpy's rank tolerance applied to the Gram
    matrix (max(m, n) * eps * lambda_max) would zero singular values up to
    sqrt(max(m, n) * eps) * s_max (2% for n = 4096) and was measured to be 10-50x less
    accurate on ill-conditioned W (docs/performance.md).
    """
    lam, v = jnp.linalg.eigh(_gram(w, precision))
    lam = jnp.maximum(lam, 0)
    tolerance = jnp.finfo(w.dtype).eps * jnp.max(lam, axis=-1, keepdims=True)
    s = jnp.where(lam > tolerance, jnp.sqrt(lam), 0)
    inv_s = jnp.where(s > 0, 1 / jnp.where(s > 0, s, 1), 0)
    u = jnp.matmul(w, v, precision=precision) * inv_s[..., None, :]
    return SpectralBasis(u, s, v)


def _newton_polar_root(w: jax.Array, N: int, precision, iterations: int) -> PolarRoot:
    """Polar factor and (W^T W)^{1/N} with matmuls only (no eigensolver, no inverse).

    The coupled Newton iteration for the inverse p-th root (p = 2N) of A = W^T W / c,
    c = ||W^T W||_F so that the spectrum lies in [0, 1]:

        T_k = ((p + 1) I - M_k) / p,   X_{k+1} = X_k T_k,   M_{k+1} = T_k^p M_k,

    from X_0 = I, M_0 = A, keeps M_k = X_k^p A and drives X_k -> A^{-1/p}. Then
    q = W A^{-1/2} / sqrt(c) = W X^N / sqrt(c) and (W^T W)^{1/N} = c^{1/N} A X^{2N-2}.

    Round-off makes the computed Gram matrix indefinite at the eps * c level, and the
    iteration diverges on a negative eigenvalue, so A is shifted by delta = max(sqrt(n),
    4) * eps (relative): every eigenvalue then lies in [delta, 1 + delta] and converges in
    about log(1 / delta) / log(2.25) + 5 <= 20 steps. The shift acts like a rank
    tolerance: singular values well below sqrt(delta) * s_max are treated as ~0 (a
    larger shift was measured more accurate on rank-deficient W and less on full-rank
    ones; docs/performance.md).
    """
    p = 2 * N
    n = w.shape[-1]
    gram = _gram(w, precision)
    c = jnp.sqrt(jnp.sum(gram * gram, axis=(-2, -1), keepdims=True))
    c = jnp.where(c > 0, c, 1)
    eye = jnp.eye(n, dtype=w.dtype)
    delta = max(math.sqrt(n), 4.0) * float(jnp.finfo(w.dtype).eps)
    a = gram / c + delta * eye

    def mm(x, y):
        return jnp.matmul(x, y, precision=precision)

    def power(x, k):  # x^k for a static k >= 1, by repeated squaring
        result, base = None, x
        while k:
            if k & 1:
                result = base if result is None else mm(result, base)
            k >>= 1
            if k:
                base = mm(base, base)
        return result

    def step(_, carry):
        x, m = carry
        t = ((p + 1) * eye - m) / p
        m = mm(power(t, p), m)
        return mm(x, t), 0.5 * (m + jnp.swapaxes(m, -1, -2))

    x, _ = jax.lax.fori_loop(0, iterations, step, (jnp.broadcast_to(eye, a.shape), a))
    x = 0.5 * (x + jnp.swapaxes(x, -1, -2))
    q = mm(w, power(x, N)) / jnp.sqrt(c)
    root = mm(gram / c, power(x, 2 * N - 2)) if N > 1 else gram / c
    root = 0.5 * (root + jnp.swapaxes(root, -1, -2)) * c ** (1.0 / N)
    return PolarRoot(q, root)


def depth_factors(
    w: jax.Array,
    N: int,
    method: str,
    *,
    precision=jax.lax.Precision.HIGHEST,
    iterations: int = NEWTON_ITERATIONS,
) -> SpectralBasis | PolarRoot:
    """The factors of a tall (..., m, n), m >= n, matrix that P_W needs (cacheable).

    Args:
      w: the matrix (or a batch), in the compute dtype; rows >= cols.
      N: the depth.
      method: "svd", "eigh" or "newton" (resolve "auto" first with :func:`resolve_method`).
      precision: matmul precision.
      iterations: coupled-Newton steps for "newton".

    Returns:
      A :class:`SpectralBasis` ("svd", "eigh") or a :class:`PolarRoot` ("newton").
    """
    N = check_depth(N)
    if w.shape[-2] < w.shape[-1]:
        raise ValueError(f"depth_factors expects a tall matrix (rows >= cols), got {w.shape}.")
    if method == "svd":
        return _svd_basis(w)
    if method == "eigh":
        return _eigh_basis(w, precision)
    if method == "newton":
        return _newton_polar_root(w, N, precision, int(iterations))
    raise ValueError(f"depth_factors: method must be 'svd', 'eigh' or 'newton', got {method!r}.")


def depth_factors_like(shape, dtype, N: int, method: str) -> SpectralBasis | PolarRoot:
    """Zero-filled factors with the shapes :func:`depth_factors` returns (for an init).

    ``shape`` is (..., m, n) with m >= n. No linear algebra is done.
    """
    *batch, m, n = shape
    if method in ("svd", "eigh"):
        return SpectralBasis(
            jnp.zeros((*batch, m, n), dtype),
            jnp.zeros((*batch, n), dtype),
            jnp.zeros((*batch, n, n), dtype),
        )
    if method == "newton":
        return PolarRoot(jnp.zeros((*batch, m, n), dtype), jnp.zeros((*batch, n, n), dtype))
    raise ValueError(f"method must be 'svd', 'eigh' or 'newton', got {method!r}.")


def _apply_basis(basis: SpectralBasis, g: jax.Array, N: int, precision) -> jax.Array:
    """P(G) from a thin SVD basis (module docstring), for tall g of the basis's shape."""
    u, s, v = basis
    kernel = depth_kernel(s, s, N)
    d = _singular_value_powers(s, N)[..., -1]  # s^{2(N-1)/N}, the complement multiplier
    m, n = g.shape[-2:]
    if m <= 3 * n:
        # Four m x n x n products: B = G V, A = U^T B, [U ((K - 1 d^T) o A) + B d] V^T.
        b = jnp.matmul(g, v, precision=precision)
        a = jnp.matmul(jnp.swapaxes(u, -1, -2), b, precision=precision)
        inner = jnp.matmul(u, (kernel - d[..., None, :]) * a, precision=precision)
        return jnp.matmul(inner + b * d[..., None, :], jnp.swapaxes(v, -1, -2), precision=precision)
    # Very tall: three m x n x n products and n x n work instead,
    # P = U [((K - 1 d^T) o (U^T G V)) V^T] + G [V diag(d) V^T].
    vt = jnp.swapaxes(v, -1, -2)
    e = jnp.matmul(
        jnp.matmul(jnp.swapaxes(u, -1, -2), g, precision=precision), v, precision=precision
    )
    y = jnp.matmul((kernel - d[..., None, :]) * e, vt, precision=precision)
    complement = jnp.matmul(v * d[..., None, :], vt, precision=precision)
    return jnp.matmul(
        jnp.concatenate([u, g], axis=-1),
        jnp.concatenate([y, complement], axis=-2),
        precision=precision,
    )


def _apply_polar_root(factors: PolarRoot, g: jax.Array, N: int, precision) -> jax.Array:
    """P(G) = G Z^{N-1} + Q [sum_{i=1..N-1} Z^i (Q^T G) Z^{N-1-i}] Q^T-free, Z = (W^T W)^{1/N}."""
    q, z = factors

    def mm(x, y):
        return jnp.matmul(x, y, precision=precision)

    e = mm(jnp.swapaxes(q, -1, -2), g)
    # S_k = sum_{i=1..k} Z^i E Z^{k-i}: S_1 = Z E, S_k = S_{k-1} Z + Z^k E.
    z_pow_e = mm(z, e)
    inner, z_pow = z_pow_e, z
    for _ in range(2, N):
        z_pow_e = mm(z, z_pow_e)
        inner = mm(inner, z) + z_pow_e
        z_pow = mm(z_pow, z)  # Z^{N-1} at the end
    return mm(jnp.concatenate([q, g], axis=-1), jnp.concatenate([inner, z_pow], axis=-2))


def refresh_singular_values(
    basis: SpectralBasis, w: jax.Array, *, precision=jax.lax.Precision.HIGHEST
):
    """Keeps a cached basis's singular vectors and re-estimates its values for the current W.

    s_a = u_a^T W v_a (the Rayleigh quotients, clipped at 0) is exact while W stays
    diagonal in the cached basis, and to first order in the rotation of the basis. It costs
    one m x n x n product. With ``precondition_every > 1`` this tracks the growth of the
    weights between recomputations, which was measured to be the main source of staleness
    error (docs/performance.md); the singular vectors alone are what is kept stale.
    """
    u, s, v = basis
    wv = jnp.matmul(w, v, precision=precision)
    fresh = jnp.maximum(jnp.sum(u * wv, axis=-2), 0)
    return SpectralBasis(u, jnp.where(s > 0, fresh, 0), v)


def apply_depth_factors(
    factors: SpectralBasis | PolarRoot,
    g: jax.Array,
    N: int,
    *,
    precision=jax.lax.Precision.HIGHEST,
) -> jax.Array:
    """Applies cached factors of a tall W to a tall gradient g: P_W(g), matmuls only."""
    N = check_depth(N)
    if N == 1:
        return g
    if isinstance(factors, SpectralBasis):
        return _apply_basis(factors, g, N, precision)
    return _apply_polar_root(factors, g, N, precision)


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
    factorization W = W_N \cdots W_1 moves the end-to-end matrix (Arora et al., 2018,
    Theorem 1). It is computed exactly from a thin SVD of W (rank-aware: a tall or wide
    matrix never needs a square SVD). Leading axes, if any, are batch axes.

    Args:
      W: the end-to-end matrix, shape (..., m, n).
      G: the gradient of the loss with respect to W, same shape.
      N: the depth, a positive Python int. N = 1 returns G unchanged.
      precision: matmul precision (XLA's default on TPU/GPU may use bf16/tf32 passes).
      method: "svd" (default; the exact reference), "eigh" (eigendecomposition of the
        smaller Gram matrix), "newton" (matmul-only coupled Newton iteration) or "auto"
        (per platform and shape, :func:`resolve_method`). See docs/performance.md for
        their speed and error.

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
    method = resolve_method(method, *W.shape[-2:])
    return _precondition_jit(W, G, N, precision, method)


@functools.partial(jax.jit, static_argnames=("N", "precision", "method"))
def _precondition_jit(W: jax.Array, G: jax.Array, N: int, precision, method: str) -> jax.Array:
    """Every method is one path: factors of the tall orientation of W, then their application.

    P is invariant under transposing W and G together, so a wide matrix is transposed first.
    """
    dtype = compute_dtype(jnp.promote_types(W.dtype, G.dtype))
    w, g = W.astype(dtype), G.astype(dtype)
    wide = w.shape[-2] < w.shape[-1]
    if wide:
        w, g = jnp.swapaxes(w, -1, -2), jnp.swapaxes(g, -1, -2)
    factors = depth_factors(w, N, method, precision=precision)
    out = apply_depth_factors(factors, g, N, precision=precision)
    return (jnp.swapaxes(out, -1, -2) if wide else out).astype(G.dtype)


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
