"""The numerics every method shares: dtypes, the matmul precision policy, the depth kernel,
spectrum normalization and the application of P_W from a singular basis.

For an m x n matrix W with SVD W = U diag(s) V^T, the operator

    P_W(G) = sum_{j=1..N} [W W^T]^{(j-1)/N} G [W^T W]^{(N-j)/N}        (A^0 := I)

is diagonal in the singular bases: entry (a, b) of U_full^T G V_full is multiplied by

    k(s_a, s_b) = sum_{j=1..N} s_a^{2(j-1)/N} s_b^{2(N-j)/N},

where U_full, V_full complete U, V to square orthogonal matrices and the singular values
are padded with zeros. We never form the complements. Assume m >= n (P is invariant under
transposing W and G together, so a wide matrix is transposed first). Then V
is square, only the left complement (I - U U^T) exists, and on it s_a = 0 so only the
j = 1 term survives: k(0, s_b) = s_b^{2(N-1)/N} =: d_b. Writing B = G V and A = U^T B,

    P_W(G) = [ U ((K - 1 d^T) o A) + B diag(d) ] V^T,

with o the elementwise product (:func:`combine`, :func:`apply_basis`).

Zero singular values: 0^0 is 1 only for the identity factors (j = 1 on the left,
j = N on the right); every positive power of 0 is exactly 0. So a zero W gives
P_W(G) = 0 for N >= 2 and no NaN appears, and repeated singular values need no care
because k depends on the values only, never on the (non-unique) singular vectors.
Singular values below numpy's rank tolerance, max(m, n) * eps * s_max, are taken to be
exactly zero (:func:`truncate_below_rank_tolerance`).

Scale. P is homogeneous: ``P_{cW}(G) = |c|^{2-2/N} P_W(G)``. Every method divides W by a
scalar (its largest entry, then a norm bound) before any product or decomposition, works
with singular values at most 1, and applies the factor scale^{2-2/N} in two halves,
t P_hat(t G) with t = scale^{1-1/N} (:func:`half_scale`), so that no intermediate overflows
or falls into the subnormal range when G and the result are representable.

Every product of the preconditioner goes through :func:`matmul`, whose ``precision`` is the
one hook for choosing, emulating or counting products.
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
    "PLATFORM_PRECISION",
    "SpectralBasis",
    "apply_basis",
    "basis_from_columns",
    "check_depth",
    "check_real",
    "combine",
    "compute_dtype",
    "depth_kernel",
    "half_scale",
    "is_exactly_zero",
    "lift_subnormal",
    "matmul",
    "matrix_transpose",
    "max_abs",
    "normalized_spectrum",
    "safe_reciprocal",
    "select",
    "svd_basis",
    "symmetrize",
    "truncate_below_rank_tolerance",
    "unlift",
]


def check_depth(N, name: str = "N") -> int:
    """Returns N as a Python int, or raises ValueError (naming the argument ``name``) if it
    is not a positive integer."""
    # numpy integers are accepted; bools, floats and traced arrays are not (the number of
    # terms in the sum must be known when tracing).
    if isinstance(N, (int, np.integer)) and not isinstance(N, bool) and N >= 1:
        return int(N)
    hint = " With optax.inject_hyperparams, pass static_args=('N',)." if name == "N" else ""
    raise ValueError(
        f"{name} (the depth) must be a positive Python int, got {N!r} of type "
        f"{type(N).__name__}.{hint}"
    )


def check_real(function: str, **arrays) -> None:
    """Refuses complex, integer and bool arguments of a public function, naming each."""
    for name, x in arrays.items():
        check_real_floating(f"{function}: {name}", x)


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype the preconditioner computes in: float32, or wider if the input is wider."""
    return jnp.promote_types(jnp.dtype(dtype), jnp.float32)


def matrix_transpose(x: jax.Array) -> jax.Array:
    """The transpose of the last two axes."""
    return jnp.swapaxes(x, -1, -2)


def symmetrize(x: jax.Array) -> jax.Array:
    """(x + x^T) / 2 over the last two axes."""
    return 0.5 * (x + matrix_transpose(x))


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


def matmul(x: jax.Array, y: jax.Array, precision) -> jax.Array:
    """x @ y: every product of the preconditioner goes through here.

    ``precision`` is a ``jax.lax.Precision`` or ``DotAlgorithmPreset``; or a callable
    ``(x, y) -> x @ y``, which then computes every product (benchmarks emulate a lower
    precision or count products with it); or None: :data:`PLATFORM_PRECISION`'s choice for
    the platform the product is lowered for (``lax.platform_dependent``: the compiled program
    holds only that one), unless ``jax.default_matmul_precision`` is set where the product is
    traced: that wins, as it does for every matmul of jax given no precision.
    """
    if callable(precision):
        return precision(x, y)
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


def max_abs(x: jax.Array, axes=(-2, -1)) -> jax.Array:
    """The largest absolute entry over ``axes`` (kept), or 1 where it is 0: a safe divisor."""
    peak = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    return jnp.where(peak > 0, peak, jnp.ones_like(peak))


def safe_reciprocal(x: jax.Array) -> jax.Array:
    """1 / x where x > 0, else 0 (a zero singular value has no inverse direction)."""
    positive = x > 0
    return jnp.where(positive, 1 / jnp.where(positive, x, 1), 0)


def half_scale(scale: jax.Array, N: int, dtype) -> jax.Array:
    """t = scale^{1-1/N}: the result is t * P_hat(t * G) (P is linear in G).

    Multiplying G by t before the products and the result by t after keeps every
    intermediate between the magnitudes of G and P (their geometric mean), so none
    overflows or falls into the subnormal range when G and P are representable.
    """
    return jnp.power(scale, 1.0 - 1.0 / N).astype(dtype)


def normalized_spectrum(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(s / s_max, s_max) per matrix, s_max (..., 1) replaced by 1 where every s is 0."""
    s_max = jnp.max(s, axis=-1, keepdims=True)
    s_max = jnp.where(s_max > 0, s_max, jnp.ones_like(s_max))
    return s / s_max, s_max


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

    Examples:
      >>> import jax.numpy as jnp
      >>> import overparam_optax as opx
      >>> opx.depth_kernel(jnp.array([1.0, 2.0]), jnp.array([1.0]), N=2)
      Array([[2.],
             [3.]], dtype=float32)
    """
    N = check_depth(N)
    s_left, s_right = jnp.asarray(s_left), jnp.asarray(s_right)
    check_real("depth_kernel", s_left=s_left, s_right=s_right)
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
    kernel = jnp.where(positive, jnp.power(hi, 2.0 * (N - 1) / N) * series, 0)
    return jnp.where(jnp.isnan(a) | jnp.isnan(b), jnp.nan, kernel)  # NaN in, NaN out


def truncate_below_rank_tolerance(s: jax.Array, shape, dtype) -> jax.Array:
    """Sets singular values at rounding level (numpy's matrix_rank tolerance) to exactly 0.

    s -> s^{2/N} is not Lipschitz at 0: a zero singular value that the SVD returns as
    1e-7 * s_max in float32 would contribute (1e-7)^{2/N} (about 2% for N = 8) instead of
    nothing. Values below max(m, n) * eps * s_max are indistinguishable from rounding
    noise, so they are treated as the zeros they most likely are.
    """
    tolerance = max(shape) * jnp.finfo(dtype).eps * jnp.max(s, axis=-1, keepdims=True)
    return jnp.where(s > tolerance, s, 0)


def lift_subnormal(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(w 2^k, k) per matrix: k > 0 lifts a matrix with subnormal entries into the normal range.

    XLA on CPU treats subnormal operands as zero (denormals-are-zero), so a matrix of
    weights near 1e-40 in float32 would be read as exactly zero. Such a matrix, if its
    largest entry leaves room, is scaled by an exact power of two k = nmant + 1 (24 for
    float32), its subnormal entries rebuilt from their bits; every other matrix gets k = 0
    and is returned as it is. The derivative is that of w 2^k. Undo with :func:`unlift`.
    """
    info = jnp.finfo(w.dtype)
    int_dtype = {4: jnp.int32, 8: jnp.int64}.get(w.dtype.itemsize)
    if int_dtype is None:  # no subnormal handling below float32 (inputs are upcast first)
        return w, jnp.zeros(w.shape[:-2], jnp.int32)
    k = info.nmant + 1
    bits = jax.lax.bitcast_convert_type(w, int_dtype)
    exponent = (bits >> info.nmant) & ((1 << info.nexp) - 1)
    mantissa = bits & ((1 << info.nmant) - 1)
    subnormal = (exponent == 0) & (mantissa != 0)
    # Room for 2^k: the largest biased exponent stays below the top one after the lift.
    room = jnp.max(exponent, axis=(-2, -1)) < (1 << info.nexp) - 2 - k
    lift = jnp.any(subnormal, axis=(-2, -1)) & room
    scaled = w * jnp.asarray(2.0**k, w.dtype)  # exact for normal entries
    # A subnormal entry is mantissa * 2^(minexp - nmant); lifted, mantissa * 2^(minexp -
    # nmant + k), a normal number.
    rebuilt = jnp.sign(bits).astype(w.dtype) * mantissa.astype(w.dtype)
    rebuilt = rebuilt * jnp.asarray(2.0 ** (info.minexp - info.nmant + k), w.dtype)
    lifted = jnp.where(subnormal, rebuilt, scaled)
    lifted = scaled + jax.lax.stop_gradient(lifted - scaled)  # derivative of w 2^k
    which = lift[..., None, None]
    return jnp.where(which, lifted, w), jnp.where(lift, k, 0).astype(jnp.int32)


def is_exactly_zero(x: jax.Array, axis) -> jax.Array:
    """Whether every entry over ``axis`` is +0 or -0, read from the bits (XLA on CPU
    compares a subnormal number equal to 0)."""
    int_dtype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, int_dtype)
    magnitude = bits & jnp.asarray(np.iinfo(int_dtype).max, int_dtype)  # no sign bit
    return jnp.all(magnitude == 0, axis=axis)


def unlift(out: jax.Array, k: jax.Array, N: int) -> jax.Array:
    """P_W(G) from P_{2^k W}(G) = 2^{k (2 - 2/N)} P_W(G) (P is homogeneous in W)."""
    factor = jnp.exp2(-(2.0 - 2.0 / N) * k.astype(out.dtype))
    return out * factor.reshape(k.shape + (1,) * (out.ndim - k.ndim))


def select(which: jax.Array, new: Any, old: Any) -> Any:
    """Per matrix (leading axes of ``which``): ``new`` where True, else ``old``."""

    def pick(a, b):
        mask = which.reshape(which.shape + (1,) * (a.ndim - which.ndim))
        return jnp.where(mask, a, b)

    return jax.tree.map(pick, new, old)


class SpectralBasis(NamedTuple):
    """Thin SVD ``W = u diag(s) v^T`` of a tall (rows >= cols) matrix, batched over leading axes.

    Singular values below the rank tolerance are exactly 0 (and so are the matching columns
    of ``u`` where the basis comes from an eigendecomposition). ``s`` is in the units of W;
    the application normalizes by max(s) internally, so any representable scale works.
    """

    u: jax.Array  # (..., m, n)
    s: jax.Array  # (..., n)
    v: jax.Array  # (..., n, n)


def svd_basis(w: jax.Array) -> SpectralBasis:
    """The thin SVD of a tall W, computed on W / max|w_ij| (any scale), rank-truncated."""
    alpha = max_abs(w)
    u, s, vt = jnp.linalg.svd(w / alpha, full_matrices=False)
    s = truncate_below_rank_tolerance(s, w.shape[-2:], w.dtype)
    return SpectralBasis(u, s * alpha[..., 0], matrix_transpose(vt))


def combine(u, a, b, kernel, d, v, precision) -> jax.Array:
    """[U ((K - 1 d^T) o A) + B diag(d)] V^T, with A = U^T G V and B = G V (the SVD-basis
    formula of the module docstring, given its two m x n x n inputs)."""
    inner = matmul(u, (kernel - d[..., None, :]) * a, precision)
    return matmul(inner + b * d[..., None, :], matrix_transpose(v), precision)


def apply_basis(basis: SpectralBasis, g: jax.Array, N: int, precision) -> jax.Array:
    """P(G) from a thin SVD basis (module docstring), for tall g of the basis's shape."""
    u, s, v = basis
    s, s_max = normalized_spectrum(s)  # s in [0, 1]: the kernel cannot overflow
    t = half_scale(s_max[..., None], N, g.dtype)
    g = g * t
    kernel = depth_kernel(s, s, N)
    d = jnp.power(s, 2.0 * (N - 1) / N)  # the complement multiplier
    m, n = g.shape[-2:]
    if m <= 3 * n:
        # Four m x n x n products: B = G V, A = U^T B, [U ((K - 1 d^T) o A) + B d] V^T.
        b = matmul(g, v, precision)
        out = combine(u, matmul(matrix_transpose(u), b, precision), b, kernel, d, v, precision)
    else:
        # Very tall: three m x n x n products and n x n work instead,
        # P = U [((K - 1 d^T) o (U^T G V)) V^T] + G [V diag(d) V^T]. The two terms are two
        # products, not one of concatenations: [U G] [Y; C] has G's tangent in both
        # operands, which reverse mode cannot transpose as a linear map.
        vt = matrix_transpose(v)
        e = matmul(matmul(matrix_transpose(u), g, precision), v, precision)
        y = matmul((kernel - d[..., None, :]) * e, vt, precision)
        complement = matmul(v * d[..., None, :], vt, precision)
        out = matmul(u, y, precision) + matmul(g, complement, precision)
    return out * t


def basis_from_columns(y: jax.Array, v: jax.Array, shape) -> SpectralBasis:
    """The SVD basis of a tall W from y = W v with v orthonormal: s = the column norms of y
    (rank-truncated), u = y / s (0 where s = 0)."""
    s = jnp.sqrt(jnp.sum(y * y, axis=-2))
    s = truncate_below_rank_tolerance(s, shape, y.dtype)
    return SpectralBasis(y * safe_reciprocal(s)[..., None, :], s, v)
