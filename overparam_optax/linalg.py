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

Scale. P is homogeneous: ``P_{cW}(G) = |c|^{2-2/N} P_W(G)``. Every path divides W by a scalar
(its largest entry, then a norm bound) before any product or decomposition, works with
singular values at most 1, and applies the factor scale^{2-2/N} in two halves,
t P_hat(t G) with t = scale^{1-1/N}, so that no intermediate overflows or falls into the
subnormal range when G and the result are representable. Gram matrices therefore never
overflow or underflow, whatever the weights' magnitude.

Depth. "svd" and "eigh" evaluate k in a closed form that is exact and O(1) per entry for
every N (see :func:`depth_kernel`). The matmul-only "newton" path supports
N <= :data:`NEWTON_MAX_DEPTH` and refuses deeper N with a ValueError.
"""

from __future__ import annotations

import functools
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from overparam_optax.checks import check_real_floating

__all__ = [
    "DEFAULT_TOLERANCE",
    "METHODS",
    "NEWTON_MAX_DEPTH",
    "PLATFORM_PRECISION",
    "PolarRoot",
    "STATELESS_METHODS",
    "SpectralBasis",
    "TrackedBasis",
    "apply_depth_factors",
    "check_depth",
    "check_newton_depth",
    "compute_dtype",
    "depth_factors",
    "depth_factors_like",
    "depth_kernel",
    "precondition_matrix",
    "precondition_vector",
    "tracked_basis_like",
    "tracked_precondition",
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


def _check_real(function: str, **arrays) -> None:
    """Refuses complex, integer and bool arguments of a public function, naming each."""
    for name, x in arrays.items():
        check_real_floating(f"{function}: {name}", x)


def _fields(name: str, factors: tuple) -> dict:
    """The arrays of a SpectralBasis / PolarRoot, named for :func:`_check_real`."""
    return {f"{name}.{field}": value for field, value in factors._asdict().items()}


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype the preconditioner computes in: float32, or wider if the input is wider."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def _mT(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _sym(x: jax.Array) -> jax.Array:
    return 0.5 * (x + _mT(x))


#: What ``precision=None`` (the transform's default) means on each platform: the fastest
#: matmul algorithm whose rounding the fidelity benchmark measured to keep the default on the
#: exact rule's trajectory (docs/performance.md, "Matmul precision per platform"). CPUs compute
#: float32 products whatever the setting; on NVIDIA GPUs it is three bfloat16 tensor-core passes
#: (TF32, jax's default there, and one bfloat16 pass make the tolerance check decompose far
#: more often); on TPUs the same three passes, which Precision.HIGH names there. Other
#: platforms, and operands wider than float32, use HIGHEST.
PLATFORM_PRECISION = types.MappingProxyType(
    {
        "cpu": jax.lax.Precision.HIGHEST,
        "cuda": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
        "tpu": jax.lax.Precision.HIGH,
    }
)  # read-only: pass precision= to choose another


def _mm(x: jax.Array, y: jax.Array, precision) -> jax.Array:
    """Every product of this module goes through here (benchmarks count and emulate them).

    ``precision=None`` is :data:`PLATFORM_PRECISION`'s choice for the platform the product
    is lowered for (``lax.platform_dependent``: the compiled program holds only that one),
    unless ``jax.default_matmul_precision`` is set where the product is traced: that wins,
    as it does for every matmul of jax given no precision.
    """
    if precision is not None or jax.config.jax_default_matmul_precision is not None:
        return jnp.matmul(x, y, precision=precision)
    highest = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    if jnp.result_type(x, y) != jnp.float32:
        return highest(x, y)
    # Only the platforms that differ from HIGHEST get a branch: each branch is traced.
    per_platform = {
        platform: functools.partial(jnp.matmul, precision=choice)
        for platform, choice in PLATFORM_PRECISION.items()
        if choice != jax.lax.Precision.HIGHEST
    }
    return jax.lax.platform_dependent(x, y, default=highest, **per_platform)


def _max_abs(x: jax.Array, axes=(-2, -1)) -> jax.Array:
    """The largest |entry| over ``axes`` (kept), or 1 where it is 0: a safe divisor."""
    peak = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    return jnp.where(peak > 0, peak, jnp.ones_like(peak))


def _half_scale(scale: jax.Array, N: int, dtype) -> jax.Array:
    """t = scale^{1-1/N}: the result is t * P_hat(t * G) (P is linear in G).

    Multiplying G by t before the products and the result by t after keeps every
    intermediate between |G| and |P| in magnitude (their geometric mean), so none
    overflows or falls into the subnormal range when G and P are representable.
    """
    return jnp.power(scale, 1.0 - 1.0 / N).astype(dtype)


def depth_kernel(s_left: jax.Array, s_right: jax.Array, N: int) -> jax.Array:
    """The multiplier k(s_a, s_b) = sum_{j=1..N} s_a^{2(j-1)/N} s_b^{2(N-j)/N}.

    It is a geometric series: with hi = max(s_a, s_b), lo = min(s_a, s_b) and
    rho = lo / hi <= 1,

        k = hi^{2(N-1)/N} (1 - rho^2) / (1 - rho^{2/N})      (k = N hi^{2(N-1)/N} if rho = 1),

    evaluated with ``expm1`` of the logarithms, so it costs O(1) per entry and is accurate
    for every N (no sum of N terms, no cancellation when s_a ~ s_b, no overflow of a
    power for N in the thousands). A zero value follows the 0^0 = 1 convention of the
    identity factors: k(0, s) = k(s, 0) = s^{2(N-1)/N}, and k(0, 0) = 0 for N >= 2.

    Args:
      s_left: singular values indexing rows, shape (..., k1), non-negative, real floating.
      s_right: singular values indexing columns, shape (..., k2), non-negative.
      N: the depth, a positive int.

    Returns:
      An array of shape (..., k1, k2).
    """
    N = check_depth(N)
    s_left, s_right = jnp.asarray(s_left), jnp.asarray(s_right)
    _check_real("depth_kernel", s_left=s_left, s_right=s_right)
    a = jnp.maximum(s_left, 0)[..., :, None]
    b = jnp.maximum(s_right, 0)[..., None, :]
    if N == 1:
        return jnp.ones(jnp.broadcast_shapes(a.shape, b.shape), jnp.result_type(a, b))
    hi, lo = jnp.maximum(a, b), jnp.minimum(a, b)
    positive = hi > 0
    log_rho = jnp.log(lo / jnp.where(positive, hi, 1))  # -inf where lo == 0
    below = log_rho < 0
    safe = jnp.where(below, log_rho, -1.0)  # keeps the unselected branch finite
    series = jnp.where(below, jnp.expm1(2 * safe) / jnp.expm1((2.0 / N) * safe), float(N))
    return jnp.where(positive, jnp.power(hi, 2.0 * (N - 1) / N) * series, 0)


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
# Decompositions afresh (docs/performance.md): the factors of the tall matrix W from one
# decomposition, then a matmul-only application to G.
# --------------------------------------------------------------------------------------

#: The values of ``method``: "tracked" (the default: a basis carried from update to update,
#: :func:`tracked_precondition`) and the methods that decompose W afresh on every call.
METHODS = ("tracked", "svd", "eigh", "newton")
#: The methods that need no state, each call decomposing W afresh.
STATELESS_METHODS = ("svd", "eigh", "newton")

#: The deepest N that ``method="newton"`` accepts. Its error grows with N (the powers of
#: the computed root Z = (W^T W)^{1/N} compound its relative error): on condition number
#: 1e3 in float32 it was measured 2.2e-4 at N = 128, 6.9e-4 at N = 200 and 8.3e-3 at
#: N = 500 (benchmarks/matmul_method.py, depth section). Deeper N raises a ValueError that
#: points to "eigh" or "svd", whose closed-form kernel is exact for every N.
NEWTON_MAX_DEPTH = 128

# Stage 1 of "newton": quintic Newton-Schulz steps X <- X (a I + b S + c S^2), S = X^T X,
# for the polar factor. Greedy minimax (Polar Express style) for singular values in
# [4e-4, 1]; seven steps bring every one of them to 1 +- 2e-5. This table and the next are
# regenerated by `python benchmarks/matmul_method.py --sections tune` (needs scipy).
_POLAR_STEPS = (
    (8.4965959772, -25.2112587825, 18.7108078519),
    (4.2167280563, -3.1162956547, 0.5769527649),
    (4.1326041042, -3.0733975674, 0.5765247044),
    (3.7848455911, -2.8284708423, 0.5486710797),
    (2.9047386963, -2.1723791250, 0.4744079760),
    (2.0407241554, -1.4239091270, 0.3927723440),
    (1.8762578088, -1.2513968568, 0.3751397136),
)
_NEWTON_SCHULZ_QUINTIC = (1.875, -1.25, 0.375)

# Stage 3 of "newton": coupled iteration for the inverse p-th root of H = (W^T W)^{1/2}
# with multipliers B = a I + b M + c M^2 (M <- B^p M, T <- T B^r), one table per p. Each
# step is the greedy minimax choice that most narrows the spectrum of M around 1 (in
# log scale) subject to a float32 safety bound: (|a| + |b| m + |c| m^2) / B(m) <= 8
# (5 for p = 4) on the current interval, which keeps round-off from being amplified;
# the first interval is [1e-3, 1.05] ([3e-4, 1.05] for p = 4).
_ROOT_STEPS = {
    2: (
        (9.1185806064, -11.2952249616, 5.5600662964),
        (1.6477839332, -0.1777606822, 0.0076205906),
        (1.6937994845, -0.4873253643, 0.0557177469),
        (1.8849873586, -1.1882414187, 0.3121824736),
        (1.8750250648, -1.2498496719, 0.3748246713),
    ),
    3: (
        (4.7820892416, -6.8678652447, 4.0721350011),
        (1.5371833322, -0.2524067193, 0.0171108855),
        (1.5762567594, -0.6879466387, 0.1413875988),
        (1.5558038180, -0.7767833185, 0.2209851821),
        (1.5555555544, -0.7777777723, 0.2222222178),
    ),
    4: (
        (3.7187973400, -3.8458760726, 2.1210498633),
        (1.3595595156, -0.0846004300, 0.0028074349),
        (1.3848214317, -0.2902466067, 0.0324416753),
        (1.4104516279, -0.5480570422, 0.1392516289),
        (1.4062534761, -0.5624884179, 0.1562349430),
    ),
    5: (
        (2.7358826966, -4.6280257633, 3.2353620470),
        (1.3623162225, -0.2873413303, 0.0297117617),
        (1.3232856742, -0.4298272927, 0.1076795049),
        (1.3200022947, -0.4399931154, 0.1199908212),
    ),
    7: (
        (2.1129935762, -3.8379411764, 2.8842967639),
        (1.2494499529, -0.2258849825, 0.0273948778),
        (1.2256947433, -0.3028512825, 0.0773555533),
        (1.2244899961, -0.3061219151, 0.0816319190),
    ),
}
# Steps of the table used per N (the fewest that keep the modelled error <= 3e-4).
_ROOT_STEP_COUNT = {3: 4, 4: 5, 5: 4, 6: 5, 7: 4, 8: 5}


def _root_exponents(N: int) -> tuple[int, int]:
    """(p, r) with r = p (1 - 2/N) an integer: T = H Y^r -> H^{2/N} when Y -> H^{-1/p}."""
    p = N // 2 if N % 2 == 0 else N
    return p, p - 2 * p // N


@functools.cache
def _scaled_newton_steps(p: int, lower: float = 1e-4, upper: float = 1.05, tol: float = 1e-7):
    """Coefficients of scaled coupled Newton steps for the inverse p-th root (N > 8).

    On an interval [l, u] the step B(m) = u^{-1/p} ((p + 1) - m / u) / p maps m to
    g(m / u) with g(y) = y ((p + 1 - y) / p)^p, increasing on [0, 1], so the new interval
    is [g(l / u), 1]: small values grow by ((p + 1) / p)^p >= 2.25 per step, then the
    convergence is quadratic. Computed in Python floats when tracing.
    """
    steps, lo, hi = [], lower, upper
    while lo < 1 - tol and len(steps) < 60:
        scale = hi ** (-1.0 / p)
        steps.append((scale * (p + 1) / p, -scale / (p * hi), 0.0))
        y = lo / hi
        lo, hi = y * ((p + 1 - y) / p) ** p, 1.0
    return tuple(steps)


def _newton_schedule(N: int):
    """(polar steps, root steps) of the matmul-only path for depth N (static)."""
    if N <= 8:
        polar = _POLAR_STEPS
        if N <= 2:
            return polar, ()
        p, _ = _root_exponents(N)
        return polar, _ROOT_STEPS[p][: _ROOT_STEP_COUNT[N]]
    p, _ = _root_exponents(N)
    return _POLAR_STEPS + (_NEWTON_SCHULZ_QUINTIC,), _scaled_newton_steps(p)


class SpectralBasis(NamedTuple):
    """Thin SVD ``W = u diag(s) v^T`` of a tall (rows >= cols) matrix, batched over leading axes.

    Singular values below the method's rank tolerance are exactly 0 (and so are the
    matching columns of ``u`` for ``method="eigh"``). ``s`` is in the units of W; the
    application normalizes by max(s) internally, so any representable scale works.
    """

    u: jax.Array  # (..., m, n)
    s: jax.Array  # (..., n)
    v: jax.Array  # (..., n, n)


class PolarRoot(NamedTuple):
    """Matmul-only factors of a tall matrix W (``method="newton"``), in normalized units.

    With ``scale`` >= the largest singular value of W (a cheap norm bound) and
    W_hat = W / scale (singular values in [0, 1]):

    * ``q`` (..., m, n): the polar factor of W_hat, W_hat = q (W_hat^T W_hat)^{1/2};
      q has orthonormal columns on the range of W (singular values ~1, exactly 0 on its
      null space);
    * ``root`` (..., n, n): Z = (W_hat^T W_hat)^{1/N};
    * ``scale`` (...,): the scalar, so that P_W(G) = scale^{2-2/N} P_{W_hat}(G).

    (W W^T)^{i/N} = scale^{2i/N} q Z^i q^T for i >= 1 (the identity factor i = 0 needs no
    polar factor), which is all the preconditioner needs:
    P_{W_hat}(G) = G Z^{N-1} + q [sum_{i=1..N-1} Z^i (q^T G) Z^{N-1-i}].
    """

    q: jax.Array  # (..., m, n)
    root: jax.Array  # (..., n, n)
    scale: jax.Array  # (...,)


def _svd_basis(w: jax.Array) -> SpectralBasis:
    alpha = _max_abs(w)
    u, s, vt = jnp.linalg.svd(w / alpha, full_matrices=False)
    s = _truncate_below_rank_tolerance(s, w.shape[-2:], w.dtype)
    return SpectralBasis(u, s * alpha[..., 0], _mT(vt))


def _gram(w: jax.Array, precision) -> jax.Array:
    return _sym(_mm(_mT(w), w, precision))  # exactly symmetric for eigh


def _eigh_basis(w: jax.Array, precision) -> SpectralBasis:
    """The basis from the eigendecomposition of the smaller Gram matrix W^T W.

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
    alpha = _max_abs(w)
    w = w / alpha
    _, v = jnp.linalg.eigh(_gram(w, precision))
    b = _mm(w, v, precision)
    s = jnp.sqrt(jnp.sum(b * b, axis=-2))
    s = _truncate_below_rank_tolerance(s, w.shape[-2:], w.dtype)
    inv_s = jnp.where(s > 0, 1 / jnp.where(s > 0, s, 1), 0)
    return SpectralBasis(b * inv_s[..., None, :], s * alpha[..., 0], v)


def _power(x: jax.Array, k: int, precision) -> jax.Array:
    """x^k for a static k >= 1, by repeated squaring."""
    result, base = None, x
    while k:
        if k & 1:
            result = base if result is None else _mm(result, base, precision)
        k >>= 1
        if k:
            base = _mm(base, base, precision)
    return result


def _quadratic(a: float, b: float, c: float, m: jax.Array, m2: jax.Array) -> jax.Array:
    """a I + b M + c M^2 for a batch of square matrices."""
    eye = jnp.eye(m.shape[-1], dtype=m.dtype)
    return a * eye + b * m + c * m2


def _newton_polar_root(w: jax.Array, N: int, precision) -> PolarRoot:
    """Polar factor and (W^T W)^{1/N} of a tall W with matmuls only (no inverse, no eigensolver).

    Three stages, all with fixed, tuned coefficients (docs/performance.md):

    0. Normalize: W_hat = W / alpha (alpha = max |w_ij|), A = W_hat^T W_hat, A^2, and
       c = ||A^2||_F^{1/2} >= s_max(W_hat)^2 (tight to a factor n^{1/4}); X_0 = W_hat / sqrt(c)
       has singular values in [0, 1]. ``scale`` = alpha sqrt(c).
    1. Polar factor: 7 quintic Newton-Schulz steps X <- a X + X (b S + c S^2), S = X^T X,
       with Polar Express-style greedy coefficients for singular values in [4e-4, 1]
       (``_POLAR_STEPS``; step 0 reuses A and A^2). Working on X (m x n) rather than on the
       Gram matrix keeps small singular values relatively accurate in float32.
    2. H = sym(q^T X_0) = (X_0^T X_0)^{1/2}: condition number at most that of W.
    3. Root: Z = H^{2/N}. N = 2: Z = H. Otherwise the coupled iteration for the inverse
       p-th root of H (p = N/2 for even N, p = N for odd N; r = p (1 - 2/N)) carrying the
       positive root instead of the inverse one: M_0 = T_0 = H, then per step
       B = a I + b M + c M^2, T <- T B^r, M <- B^p M (M is not updated after the last
       step). Since M_k = H Y_k^p and T_k = H Y_k^r with Y_k the product of the B's,
       Y -> H^{-1/p} and T -> H^{1 - r/p} = H^{2/N} as M -> I. Tracking T = H Y^r
       (bounded) rather than Y -> H^{-1/p} (large where H is small) avoids the
       cancellation of forming H Y^r at the end (measured 2x less accurate in float32).

    Zero (or exactly rank-deficient) directions stay exactly 0 through every stage. A
    singular value far below 4e-4 s_max is under-resolved: it is treated as smaller than
    it is (see docs/performance.md for the error beyond condition number 1e3).
    """
    polar_steps, root_steps = _newton_schedule(N)
    alpha = _max_abs(w)
    w = w / alpha
    gram = _gram(w, precision)
    gram2 = _sym(_mm(gram, gram, precision))
    c = jnp.sqrt(jnp.sqrt(jnp.sum(gram2 * gram2, axis=(-2, -1), keepdims=True)))
    c = jnp.where(c > 0, c, jnp.ones_like(c))
    x0 = w / jnp.sqrt(c)
    x = x0
    for k, (a, b, cc) in enumerate(polar_steps):
        if k == 0:
            s, s2 = gram / c, gram2 / (c * c)
        else:
            s = _sym(_mm(_mT(x), x, precision))
            s2 = _mm(s, s, precision)
        x = a * x + _mm(x, b * s + cc * s2, precision)
    q = x
    h = _sym(_mm(_mT(q), x0, precision))
    if N <= 2:
        root = h
    else:
        p, r = _root_exponents(N)
        m, t = h, h
        for k, (a, b, cc) in enumerate(root_steps):
            m2 = _mm(m, m, precision)
            mult = _quadratic(a, b, cc, m, m2)
            mult_r = _power(mult, r, precision)
            t = _sym(_mm(t, mult_r, precision))
            if k < len(root_steps) - 1:
                mult_p = _mm(mult_r, _power(mult, p - r, precision), precision)
                m = _sym(_mm(mult_p, m, precision))
        root = t
    scale = (alpha * jnp.sqrt(c))[..., 0, 0]
    return PolarRoot(q, root, scale)


def check_newton_depth(N: int) -> None:
    """Raises ValueError if ``method="newton"`` does not support depth N."""
    if N > NEWTON_MAX_DEPTH:
        raise ValueError(
            f'method="newton" supports N <= {NEWTON_MAX_DEPTH} (its error grows with N; '
            f'docs/performance.md); got N={N}. Use method="eigh" or "svd", exact for every N.'
        )


def depth_factors(
    w: jax.Array,
    N: int,
    method: str,
    *,
    precision=jax.lax.Precision.HIGHEST,
) -> SpectralBasis | PolarRoot:
    """The factors of a tall (..., m, n), m >= n, matrix that P_W needs (cacheable).

    Args:
      w: the matrix (or a batch), in the compute dtype; rows >= cols.
      N: the depth.
      method: one of :data:`STATELESS_METHODS`.
      precision: matmul precision.

    Returns:
      A :class:`SpectralBasis` ("svd", "eigh") or a :class:`PolarRoot` ("newton").
    """
    N = check_depth(N)
    _check_real("depth_factors", w=w)
    if w.shape[-2] < w.shape[-1]:
        raise ValueError(f"depth_factors expects a tall matrix (rows >= cols), got {w.shape}.")
    if method == "svd":
        return _svd_basis(w)
    if method == "eigh":
        return _eigh_basis(w, precision)
    if method == "newton":
        check_newton_depth(N)
        return _newton_polar_root(w, N, precision)
    raise ValueError(f"depth_factors: method must be 'svd', 'eigh' or 'newton', got {method!r}.")


def depth_factors_like(shape, dtype, N: int, method: str) -> SpectralBasis | PolarRoot:
    """Zero-filled factors with the shapes :func:`depth_factors` returns (for an init).

    ``shape`` is (..., m, n) with m >= n. No linear algebra is done.
    """
    N = check_depth(N)
    _check_real("depth_factors_like", dtype=dtype)
    *batch, m, n = shape
    if method in ("svd", "eigh"):
        return SpectralBasis(
            jnp.zeros((*batch, m, n), dtype),
            jnp.zeros((*batch, n), dtype),
            jnp.zeros((*batch, n, n), dtype),
        )
    if method == "newton":
        check_newton_depth(N)
        return PolarRoot(
            jnp.zeros((*batch, m, n), dtype),
            jnp.zeros((*batch, n, n), dtype),
            jnp.zeros(tuple(batch), dtype),
        )
    raise ValueError(f"method must be 'svd', 'eigh' or 'newton', got {method!r}.")


def _combine(u, a, b, kernel, d, v, precision) -> jax.Array:
    """[U ((K - 1 d^T) o A) + B diag(d)] V^T, with A = U^T G V and B = G V (the SVD-basis
    formula of the module docstring, given its two m x n x n inputs)."""
    inner = _mm(u, (kernel - d[..., None, :]) * a, precision)
    return _mm(inner + b * d[..., None, :], _mT(v), precision)


def _apply_basis(basis: SpectralBasis, g: jax.Array, N: int, precision) -> jax.Array:
    """P(G) from a thin SVD basis (module docstring), for tall g of the basis's shape."""
    u, s, v = basis
    s_max = jnp.max(s, axis=-1, keepdims=True)
    s_max = jnp.where(s_max > 0, s_max, jnp.ones_like(s_max))
    s = s / s_max  # in [0, 1]: the kernel cannot overflow
    t = _half_scale(s_max[..., None], N, g.dtype)
    g = g * t
    kernel = depth_kernel(s, s, N)
    d = jnp.power(s, 2.0 * (N - 1) / N)  # the complement multiplier
    m, n = g.shape[-2:]
    if m <= 3 * n:
        # Four m x n x n products: B = G V, A = U^T B, [U ((K - 1 d^T) o A) + B d] V^T.
        b = _mm(g, v, precision)
        out = _combine(u, _mm(_mT(u), b, precision), b, kernel, d, v, precision)
    else:
        # Very tall: three m x n x n products and n x n work instead,
        # P = U [((K - 1 d^T) o (U^T G V)) V^T] + G [V diag(d) V^T].
        vt = _mT(v)
        e = _mm(_mm(_mT(u), g, precision), v, precision)
        y = _mm((kernel - d[..., None, :]) * e, vt, precision)
        complement = _mm(v * d[..., None, :], vt, precision)
        out = _mm(
            jnp.concatenate([u, g], axis=-1),
            jnp.concatenate([y, complement], axis=-2),
            precision=precision,
        )
    return out * t


def _power_sum(z: jax.Array, f: jax.Array, length: int, precision):
    """(Z^L, D_L) with D_L = sum_{i=0..L-1} Z^i F Z^{L-1-i}, by a binary chain (L >= 1).

    D_{2a} = Z^a D_a + D_a Z^a and D_{a+1} = Z D_a + F Z^a: about 3 log2(L) products.
    """
    z_pow, d = z, f
    for bit in bin(length)[3:]:
        d = _mm(z_pow, d, precision) + _mm(d, z_pow, precision)
        z_pow = _mm(z_pow, z_pow, precision)
        if bit == "1":
            d = _mm(z, d, precision) + _mm(f, z_pow, precision)
            z_pow = _mm(z_pow, z, precision)
    return z_pow, d


def _apply_polar_root(factors: PolarRoot, g: jax.Array, N: int, precision) -> jax.Array:
    """P(G) = scale^{2-2/N} [G Z^{N-1} + q Z D_{N-1}(q^T G)] (see :class:`PolarRoot`)."""
    q, z, scale = factors
    t = _half_scale(scale[..., None, None], N, g.dtype)
    g = g * t
    f = _mm(_mT(q), g, precision)
    z_pow, d = _power_sum(z, f, N - 1, precision)
    inner = _mm(z, d, precision)
    return (_mm(g, z_pow, precision) + _mm(q, inner, precision)) * t


def apply_depth_factors(
    factors: SpectralBasis | PolarRoot,
    g: jax.Array,
    N: int,
    *,
    precision=jax.lax.Precision.HIGHEST,
) -> jax.Array:
    """Applies cached factors of a tall W to a tall gradient g: P_W(g), matmuls only."""
    N = check_depth(N)
    _check_real("apply_depth_factors", g=g, **_fields("factors", factors))
    if N == 1:
        return g
    if isinstance(factors, SpectralBasis):
        return _apply_basis(factors, g, N, precision)
    return _apply_polar_root(factors, g, N, precision)


# --------------------------------------------------------------------------------------
# The default: a right singular basis tracked from update to update.
#
# For a tall W (m >= n) everything P_W needs is in the n x n eigenbasis V of W^T W. The
# weights move little per update, so last update's V almost diagonalizes this update's
# Gram matrix: B = (W V)^T (W V) = diag + E with E small. Rotations by the Jacobi angles
# of all pairs at once (E_ab / (b_bb - b_aa) to first order), made orthogonal (to 2e-6 at
# most) by a Cayley transform computed with matmuls, remove E to second order; two rounds
# cost 11 n x n x n products and bring E to rounding level on a smoothly moving spectrum.
# The relative off-diagonal mass left, ||off(B)||_F / ||B||_F, is measured after every
# round: it is the relative Frobenius distance between W^T W and the Gram matrix whose
# exact preconditioner is applied. Where two rounds leave it above the tolerance, more
# rounds follow while each at least halves it (a faster step, clipped rotations of close
# pairs); where it still exceeds the tolerance (the first update, a jump, a crossing or a
# cluster of singular values that moves too fast) the basis is recomputed from a thin SVD.
# --------------------------------------------------------------------------------------

#: The default ``tolerance`` of the tracked basis (docs/performance.md, "Fidelity").
DEFAULT_TOLERANCE = 1e-4

#: Rotation rounds per update; the second removes what the first order of the first left
#: (skipping it where the first already held the tolerance cost up to 10x in the
#: preconditioner's error on ill-conditioned W, measured: the residual is blind to small
#: singular values).
_TRACKING_ROUNDS = 2

#: The most rotation rounds in one update. Rounds past _TRACKING_ROUNDS run only for a
#: matrix above the tolerance whose last round at least halved its residual (_STALL); on
#: the paper's CNN they replace most decompositions afresh of the 3136 x 512 kernel (6
#: n x n x n products a round, against a thin SVD that takes several rounds' time on CPU;
#: docs/performance.md, "Cost").
_MAX_TRACKING_ROUNDS = 6

#: A round that leaves more than this fraction of the residual it started from has
#: stalled: no more rounds, the basis is recomputed if it is still above the tolerance.
_STALL = 0.5

#: The largest angle (radians) by which one round turns a pair of basis vectors; a nearly
#: degenerate pair (a large Jacobi angle) is turned this far and left to the next round.
_MAX_ROTATION = 0.1

#: The largest spectral norm of one round's rotation generator X (a larger one is shortened):
#: it bounds the error of the rotation's truncated series (:func:`_jacobi_rotation`). A cap
#: of 0.1 made that error negligible but raised the preconditioner's error on an
#: ill-conditioned 8 x 8 W from 2.2e-4 to 5.8e-4 (tests/test_tracked.py: more of the
#: rotation is left to the second round).
_MAX_ROTATION_NORM = 0.2


class TrackedBasis(NamedTuple):
    """The cached right singular basis of a tall matrix (the default's state per matrix).

    ``v`` (..., n, n) has orthonormal columns once computed. It is all zeros before the
    first update (or in a state rebuilt from zeros, e.g. from ``jax.eval_shape``): a
    basis that is not orthonormal is never used, the next update decomposes W afresh.
    """

    v: jax.Array  # (..., n, n)


class _Frame(NamedTuple):
    """One update's view of a tall W in the basis ``v``: b = q^T v^T W^T W v q, c = v^T W^T G
    (None where the application does not read it).

    ``q`` (n x n, orthogonal) is this update's rotation of ``v``; the new basis is v q.
    Every field is n x n: W V itself is not kept (the application multiplies W instead),
    so choosing between the tracked and the fresh frame (a ``lax.cond``) passes no m x n
    array through the cond.
    """

    v: jax.Array
    q: jax.Array
    b: jax.Array
    c: jax.Array | None


def tracked_basis_like(shape, dtype) -> TrackedBasis:
    """The zero basis (no basis yet) for tall matrices of shape (..., m, n)."""
    *batch, _, n = shape
    return TrackedBasis(jnp.zeros((*batch, n, n), dtype))


def _off_diagonal(b: jax.Array) -> jax.Array:
    return b * (1 - jnp.eye(b.shape[-1], dtype=b.dtype))


def _resolved_pairs(b: jax.Array, shape) -> jax.Array:
    """Pairs (a, b) of which at least one singular value is above the rank tolerance.

    Entries of B between two directions that W maps to rounding noise (numpy's rank
    tolerance, as :func:`_truncate_below_rank_tolerance`) are noise too: they are neither
    rotated away nor counted against the tolerance.
    """
    lam = jnp.diagonal(b, axis1=-2, axis2=-1)
    tol = (max(shape) * jnp.finfo(b.dtype).eps) ** 2 * jnp.max(lam, axis=-1, keepdims=True)
    big = lam > tol
    return big[..., :, None] | big[..., None, :]


def _jacobi_rotation(b: jax.Array, resolved: jax.Array, precision) -> jax.Array:
    """An orthogonal Q such that Q^T B Q is closer to diagonal than a nearly diagonal B.

    Each pair (a, b) gets the angle of the 2 x 2 Jacobi rotation that zeroes its entry,
    theta_ab = atan(2 E_ab / (b_bb - b_aa)) / 2 (E_ab / (b_bb - b_aa) to first order),
    clipped to _MAX_ROTATION; the antisymmetric X of these angles is mapped to a rotation by
    the Cayley transform (I - X/2)^{-1} (I + X/2), the inverse a series cut after X^4
    (matmuls only; orthogonal to 2 ||X/2||^6, at most 2e-6 at the norm cap). Where the
    pairs are well separated, Q^T B Q = diag + O(E^2); a nearly degenerate pair (coupling
    not small against its gap) turns by at most _MAX_ROTATION per round.
    """
    lam = jnp.diagonal(b, axis1=-2, axis2=-1)
    gap = lam[..., None, :] - lam[..., :, None]
    off = _off_diagonal(b)
    theta = 0.5 * jnp.arctan2(2 * off * jnp.sign(gap), jnp.abs(gap))
    x = jnp.where(resolved, jnp.clip(theta, -_MAX_ROTATION, _MAX_ROTATION), 0)
    # A larger rotation is shortened to spectral norm <= _MAX_ROTATION_NORM, so that the
    # series below holds; what it leaves is the residual check's to judge. ||X||_2^2 =
    # ||X^2||_2 is bounded by the smaller of X^2's Frobenius norm and largest row sum.
    x2 = _mm(x, x, precision)
    bound = jnp.sqrt(
        jnp.minimum(
            jnp.sqrt(jnp.sum(x2 * x2, axis=(-2, -1))),
            jnp.max(jnp.sum(jnp.abs(x2), axis=-1), axis=-1),
        )
    )[..., None, None]
    scale = 0.5 * jnp.minimum(1, _MAX_ROTATION_NORM / jnp.where(bound > 0, bound, 1))
    y, y2 = scale * x, scale**2 * x2
    # Cayley: (I - Y)^{-1} (I + Y) = (I + Y)^2 (I - Y^2)^{-1}, and (I - Y^2)^{-1} =
    # I + Y^2 + Y^4 + O(Y^6): the truncation turns R into R (I - Y^6), orthogonal to
    # 2 ||Y||^6 <= 2e-6 for a capped generator (||Y|| = 0.1) and to float32 rounding for
    # ||Y|| <= 0.05 (the Y^6 term would cost one more n x n product in every round).
    # LAPACK's solve would be cheaper in flops, but on CPU its threads contend with XLA's
    # beside the large products (measured: +17 ms per 512 x 512 solve on 2 cores, cost_cpu.json).
    eye = jnp.eye(b.shape[-1], dtype=b.dtype)
    series = eye + y2 + _mm(y2, y2, precision)
    return _mm(eye + 2 * y + y2, series, precision)


def _jacobi_round(b: jax.Array, pairs: jax.Array, precision):
    """One round: (R^T B R, R) for the rotation R of :func:`_jacobi_rotation` (``pairs``
    the pairs it may turn)."""
    r = _jacobi_rotation(b, pairs, precision)
    return _sym(_mm(_mT(r), _mm(b, r, precision), precision)), r


def _near_square(shape) -> bool:
    """Whether P costs fewer products from W V' and G V' than from n x n factors.

    Counting one product as 2 m n^2 or 2 n^3 FLOPs: the frame and application through n x n
    factors (:class:`_Frame` ``c``) take 5 products with W or G and 6 of n x n, through
    W V' and G V' 7 and 1. The latter is cheaper below m = 2.5 n (a square W: 8 against 11).
    """
    m, n = shape[-2:]
    return 2 * m < 5 * n


def _frame(w: jax.Array, g: jax.Array, v: jax.Array, precision) -> _Frame:
    """y = W v, B = y^T y and C = y^T G in the basis ``v`` (not rotated yet: q = I).

    C is computed only where the application reads it (not :func:`_near_square`).
    """
    n = w.shape[-1]
    y = _mm(w, v, precision)
    if _near_square(w.shape):
        b, c = _sym(_mm(_mT(y), y, precision)), None
    else:
        yy_yg = _mm(_mT(y), jnp.concatenate([y, g], axis=-1), precision)  # one pass over y
        b, c = _sym(yy_yg[..., :n]), yy_yg[..., n:]
    # Built from b (not broadcast from a constant) so that, inside shard_map, the rotation
    # loop's carry varies over the mesh axes as b does.
    q = jnp.eye(n, dtype=w.dtype) + jnp.zeros_like(b)
    return _Frame(v, q, b, c)


def _rotated(frame: _Frame, shape, tolerance: float, precision) -> tuple[_Frame, jax.Array]:
    """The frame after Jacobi rounds, and its relative off-diagonal per matrix.

    Every matrix gets _TRACKING_ROUNDS rounds; then, up to _MAX_TRACKING_ROUNDS in all,
    more for each matrix still above ``tolerance`` whose last round at least halved its
    residual (one that stalls is left to the decomposition afresh). A matrix's rounds
    depend on it alone, not on the others stacked with it.
    """

    def more(carry):
        return jnp.any(carry[-1])

    def round_(carry):  # a loop, not unrolled: the round is compiled once
        i, b, q, residual, active = carry
        # An inactive matrix gets no angles: its rotation is exactly I, so its b and q
        # come through unchanged (cheaper to compile than selecting them).
        pairs = _resolved_pairs(b, shape) & active[..., None, None]
        b, r = _jacobi_round(b, pairs, precision)
        # The first round's q is I: its product is skipped (a cond on the round counter).
        q = jax.lax.cond(i == 0, lambda: r, lambda: _mm(q, r, precision))
        new = _relative_off_diagonal(b, shape)
        i = i + 1
        extra = (i < _MAX_TRACKING_ROUNDS) & (new > tolerance) & (new < _STALL * residual)
        return i, b, q, new, active & ((i < _TRACKING_ROUNDS) | extra)

    residual = _relative_off_diagonal(frame.b, shape)
    carry = (0, frame.b, frame.q, residual, residual >= 0)
    _, b, q, residual, _ = jax.lax.while_loop(more, round_, carry)
    return frame._replace(b=b, q=q), residual


def _relative_off_diagonal(b: jax.Array, shape) -> jax.Array:
    """||off(B)||_F / ||B||_F over the resolved pairs, per matrix (0 for a zero W)."""
    off = jnp.where(_resolved_pairs(b, shape), _off_diagonal(b), 0)
    total = jnp.sum(b * b, axis=(-2, -1))
    return jnp.sqrt(jnp.sum(off * off, axis=(-2, -1)) / jnp.where(total > 0, total, 1))


def _is_orthonormal(v: jax.Array) -> jax.Array:
    """Per matrix: finite, with unit columns (a cheap check; zeros mean 'no basis yet')."""
    norms = jnp.sum(v * v, axis=-2)
    return jnp.all(jnp.abs(norms - 1) < 1e-3, axis=-1) & jnp.all(jnp.isfinite(v), axis=(-2, -1))


def _fresh_frame(w: jax.Array, g: jax.Array, precision) -> _Frame:
    """The frame of a basis computed afresh, from a thin SVD of W.

    An SVD resolves small singular values to eps * s_max, where the eigendecomposition of
    W^T W resolves them only to sqrt(eps) * s_max (measured: 2.3x the exact rule's
    distance to the explicit network on an ill-conditioned start with eigh, see
    docs/performance.md); the basis is computed afresh rarely, so the SVD's cost matters
    little.
    """
    _, _, vt = jnp.linalg.svd(w, full_matrices=False)
    return _frame(w, g, _mT(vt), precision)


def _select(which: jax.Array, new: Any, old: Any) -> Any:
    """Per matrix (leading axes of ``which``): ``new`` where True, else ``old``."""

    def pick(a, b):
        mask = which.reshape(which.shape + (1,) * (a.ndim - which.ndim))
        return jnp.where(mask, a, b)

    return jax.tree.map(pick, new, old)


@functools.cache
def _refresh_where(precision):
    """f(need, w, g, tracked): ``tracked``, with the matrices where ``need`` is set recomputed.

    The decomposition runs only on updates that need it (``lax.cond``). Under ``jax.vmap``
    (e.g. an ensemble of optimizers) a batched predicate would turn the cond into a select
    that decomposes on every update; the custom batching rule keeps one cond for the batch.
    """

    @jax.custom_batching.custom_vmap
    def refresh_where(need, w, g, tracked):
        return jax.lax.cond(
            jnp.any(need),
            lambda: _select(need, _fresh_frame(w, g, precision), tracked),
            lambda: tracked,
        )

    @refresh_where.def_vmap
    def batched(axis_size, in_batched, need, w, g, tracked):
        def leading(x, is_batched):
            return x if is_batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))

        args = jax.tree.map(leading, (need, w, g, tracked), tuple(in_batched))
        out = refresh_where(*args)
        return out, jax.tree.map(lambda _: True, out)

    return refresh_where


def _apply_frame(
    frame: _Frame, w: jax.Array, g: jax.Array, alpha: jax.Array, N: int, precision
):
    """P_W(G) from a frame of w = W / alpha (``alpha`` (..., 1, 1) > 0), and the basis v q.

    With V' = v q and U = w V' S^{-1} this is the SVD-basis formula of :func:`_apply_basis`,
    P = [U ((K - 1 d^T) o (U^T G V')) + G V' diag(d)] V'^T, with every n x n factor folded
    into one final (m x 2n) x (2n x n) product [w G] [R; C]; or, where that takes more
    products (:func:`_near_square`), computed as written from w V' and G V'.
    """
    v_new = _mm(frame.v, frame.q, precision)
    s = jnp.sqrt(jnp.maximum(jnp.diagonal(frame.b, axis1=-2, axis2=-1), 0))
    s = _truncate_below_rank_tolerance(s, g.shape[-2:], g.dtype)
    s_max = jnp.max(s, axis=-1, keepdims=True)
    s_max = jnp.where(s_max > 0, s_max, jnp.ones_like(s_max))
    s_hat = s / s_max
    t = _half_scale(alpha[..., 0] * s_max, N, g.dtype)[..., None]  # (..., 1, 1)
    inv_s = jnp.where(s > 0, 1 / jnp.where(s > 0, s, 1), 0)
    kernel = depth_kernel(s_hat, s_hat, N)
    d = jnp.power(s_hat, 2.0 * (N - 1) / N)
    if _near_square(w.shape):  # the same formula through W V' and G V'
        wv, gv = _mm(w, v_new, precision), _mm(g, v_new, precision) * t
        core = inv_s[..., :, None] * _mm(_mT(wv), gv, precision)  # U^T G V' t
        out = _combine(wv * inv_s[..., None, :], core, gv, kernel, d, v_new, precision)
        return out * t, v_new
    # U^T G V' = S^{-1} q^T (v^T w^T G) V'
    core = inv_s[..., :, None] * _mm(_mT(frame.q), _mm(frame.c, v_new, precision), precision)
    inner = (kernel - d[..., None, :]) * core * t
    right = _mm(_mm(v_new, inv_s[..., :, None] * inner, precision), _mT(v_new), precision)
    complement = _mm(v_new * d[..., None, :], _mT(v_new), precision)
    out = _mm(
        jnp.concatenate([w, g * t], axis=-1),
        jnp.concatenate([right, complement], axis=-2),
        precision,
    )
    return out * t, v_new


def tracked_precondition(
    w: jax.Array,
    g: jax.Array,
    basis: TrackedBasis,
    N: int,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    precision=jax.lax.Precision.HIGHEST,
) -> tuple[jax.Array, TrackedBasis, jax.Array]:
    """P_W(G) for tall W from a basis carried over from the previous update.

    The basis is rotated toward W's current right singular basis (two Jacobi rounds, matmul
    and n x n work only; up to four more for a matrix that two leave above ``tolerance``,
    while each round at least halves its residual). Where the rotated basis still leaves a
    relative off-diagonal ||off(V^T W^T W V)||_F / ||W^T W||_F above ``tolerance``, or
    where ``basis`` is not an orthonormal basis (the first update, a state rebuilt from
    zeros), the basis is recomputed from a thin SVD of W. So the preconditioner applied is
    the exact P for a Gram matrix within relative Frobenius distance ``tolerance`` of
    W^T W, singular values taken as the column norms of W V.

    Args:
      w: tall matrices (..., m, n), m >= n, in the compute dtype.
      g: their gradients, same shape.
      basis: last update's :class:`TrackedBasis` (zeros for none).
      N: the depth.
      tolerance: the largest relative off-diagonal accepted without recomputing.
      precision: matmul precision.

    Returns:
      (P_W(G), the new basis, a bool per matrix: whether it was recomputed). A matrix
      with non-finite entries keeps its previous basis (its result is not finite).
    """
    N = check_depth(N)
    _check_real("tracked_precondition", w=w, g=g, basis_v=basis.v)
    alpha, beta = _max_abs(w), _max_abs(g)
    # Both W and G are divided by their largest entry (P is homogeneous in W and linear in
    # G), so y^T G neither underflows nor overflows whatever their scales.
    w_hat, g_hat = w / alpha, g / beta
    tracked, residual = _rotated(
        _frame(w_hat, g_hat, basis.v, precision), w.shape[-2:], tolerance, precision
    )
    need = ~(_is_orthonormal(basis.v) & (residual <= tolerance))
    frame = _refresh_where(precision)(need, w_hat, g_hat, tracked)
    out, v_new = _apply_frame(frame, w_hat, g_hat, alpha, N, precision)
    out = out * beta
    finite = jnp.all(jnp.isfinite(v_new), axis=(-2, -1))
    return out, TrackedBasis(_select(finite, v_new, basis.v)), need


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
        coupled root iteration, N <= :data:`NEWTON_MAX_DEPTH`). See docs/performance.md
        for their speed and error. (The transform's default, "tracked", carries a basis
        from update to update: :func:`tracked_precondition`.)

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
    _check_real("precondition_matrix", W=W, G=G)
    if W.ndim < 2 or W.shape != G.shape:
        raise ValueError(
            f"precondition_matrix expects W and G of the same shape (..., m, n); got W "
            f"{W.shape} and G {G.shape}."
        )
    if N == 1:
        return G
    if method not in STATELESS_METHODS:
        raise ValueError(
            f"method must be one of {STATELESS_METHODS} (a single call has no basis to carry "
            f"over), got {method!r}."
        )
    if method == "newton":
        check_newton_depth(N)
    # Differentiable in W and G for every method, also at repeated and zero singular values:
    # the JVP comes from an SVD basis (spectral_jvp, which imports this module: import here).
    from overparam_optax.spectral_jvp import differentiable_precondition

    return differentiable_precondition(W, G, N, precision, method)


@functools.partial(jax.jit, static_argnames=("N", "precision", "method"))
def _precondition_jit(W: jax.Array, G: jax.Array, N: int, precision, method: str) -> jax.Array:
    """Every method is one path: factors of the tall orientation of W, then their application.

    P is invariant under transposing W and G together, so a wide matrix is transposed first.
    """
    dtype = compute_dtype(jnp.promote_types(W.dtype, G.dtype))
    w, g = W.astype(dtype), G.astype(dtype)
    wide = w.shape[-2] < w.shape[-1]
    if wide:
        w, g = _mT(w), _mT(g)
    factors = depth_factors(w, N, method, precision=precision)
    out = apply_depth_factors(factors, g, N, precision=precision)
    return (_mT(out) if wide else out).astype(G.dtype)


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
    N = check_depth(N)
    w = jnp.asarray(w)
    g = jnp.asarray(g)
    _check_real("precondition_vector", w=w, g=g)
    if w.shape != g.shape or w.ndim < 1:
        raise ValueError(
            f"precondition_vector expects w and g of the same shape (..., n); got {w.shape} "
            f"and {g.shape}."
        )
    if N == 1:
        return g
    dtype = compute_dtype(jnp.promote_types(w.dtype, g.dtype))
    wc, gc = w.astype(dtype), g.astype(dtype)
    alpha = _max_abs(wc, axes=-1)
    wc = wc / alpha
    t = _half_scale(alpha, N, dtype)
    gc = gc * t
    sq_norm = jnp.sum(wc * wc, axis=-1, keepdims=True)
    # Guard the division only: where w = 0 the scale below is 0, so the projection is moot.
    safe_sq_norm = jnp.where(sq_norm > 0, sq_norm, 1)
    projection = jnp.sum(wc * gc, axis=-1, keepdims=True) / safe_sq_norm * wc
    scale = jnp.power(sq_norm, 1.0 - 1.0 / N)
    return ((scale * (gc + (N - 1) * projection)) * t).astype(g.dtype)
