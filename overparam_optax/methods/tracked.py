"""``method="tracked"`` (the default): a right singular basis carried from update to update.

For a tall W (m >= n) everything P_W needs is in the n x n eigenbasis V of W^T W. The
weights move little per update, so last update's V almost diagonalizes this update's
Gram matrix: B = (W V)^T (W V) = diag + E with E small. The preconditioner applied from V
is the exact one of diag(B); what E changes in it is bounded, to first order, by
:func:`coupling`: the largest abs(E_ab) weighted by the slope of the fractional powers of
W^T W at the pair, so a coupling of two small singular values counts as much as one of two
large ones. Where that bound is within the tolerance no round runs. Otherwise rounds of
Jacobi rotations of all pairs at once (E_ab / (b_bb - b_aa) to first order, made
orthogonal by a Cayley transform computed with matmuls) remove E to second order, while
the bound exceeds the tolerance and falls, up to :data:`MAX_TRACKING_ROUNDS`. Where it
still exceeds the tolerance (the first update, a jump, a crossing, or zero singular values
that W's move lifts off zero as a fast-turning cluster) the basis is recomputed from a thin
SVD.

The public functions below are the parts of one update (:func:`precondition`); benchmarks
count and compile them one by one, and tests force a route or a round count through their
arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from overparam_optax import numerics, spectral_jvp
from overparam_optax.methods.base import Method
from overparam_optax.numerics import matmul, matrix_transpose, symmetrize

__all__ = [
    "DEFAULT_TOLERANCE",
    "MAX_ROTATION_NORM",
    "MAX_TRACKING_ROUNDS",
    "Frame",
    "Tracked",
    "TrackedBasis",
    "apply_frame",
    "fresh_frame",
    "initial_frame",
    "coupling",
    "jacobi_rotation",
    "jacobi_round",
    "near_square",
    "precondition",
    "resolved_pairs",
    "rotate",
]

#: The default ``tolerance``: the first-order bound on P's relative error (:func:`coupling`)
#: accepted without recomputing the basis (docs/performance.md, "Fidelity").
DEFAULT_TOLERANCE = 3e-6

#: The most rotation rounds in one update. A round costs 6 n x n x n products, far less
#: than the decomposition it replaces (docs/performance.md, "Cost"); a matrix gets rounds
#: only while its bound exceeds the tolerance and falls.
MAX_TRACKING_ROUNDS = 8

#: Rounding in W V (about eps * s_max per entry) puts couplings of up to this many eps
#: times (s_a + s_b) s_max into B whatever the basis: noise, not an unresolved rotation.
_ROUNDING_ALLOWANCE = 8.0

#: The largest angle (radians) by which one round turns a pair of basis vectors; a nearly
#: degenerate pair (a large Jacobi angle) is turned this far and left to the next round.
_MAX_ROTATION = 0.1

#: The largest spectral norm of one round's rotation generator X (a larger one is
#: shortened): it bounds the error of the rotation's truncated series
#: (:func:`jacobi_rotation`). A smaller cap leaves more of the rotation to later rounds.
MAX_ROTATION_NORM = 0.2


class TrackedBasis(NamedTuple):
    """The cached right singular basis of a tall matrix (the default's state per matrix).

    ``v`` (..., n, n) has orthonormal columns once computed. It is all zeros before the
    first update (or in a state rebuilt from zeros, e.g. from ``jax.eval_shape``): a
    basis that is not orthonormal is never used, the next update decomposes W afresh.
    ``rounds`` (...,) int32 counts the rotation rounds run so far (6 n^3-FLOP products
    each), saturating at the int32 maximum.
    """

    v: jax.Array  # (..., n, n)
    rounds: jax.Array | int = 0  # (...,)


class Frame(NamedTuple):
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


def _check_tolerance(tolerance) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating)):
        raise ValueError(f"tolerance must be a float in (0, 1), got {tolerance!r}.")
    if not (math.isfinite(tolerance) and 0 < tolerance < 1):
        raise ValueError(f"tolerance must be a float in (0, 1), got {tolerance!r}.")
    return float(tolerance)


@dataclasses.dataclass(frozen=True)
class Tracked(Method):
    """The default: each matrix's right singular basis, rotated toward W on every update.

    Attributes:
      tolerance: a float in (0, 1), default
        :data:`~overparam_optax.methods.tracked.DEFAULT_TOLERANCE` (3e-6): the largest
        first-order bound on P's relative error in the rotated basis
        (:func:`~overparam_optax.methods.tracked.coupling`) accepted without recomputing
        the basis. Smaller is closer to the exact rule and decomposes more often
        (``state.decompositions`` counts the decompositions, each basis's ``rounds`` its
        rotation rounds).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import overparam_optax as opx
      >>> method = opx.methods.Tracked(tolerance=1e-3)
      >>> tx = optax.chain(opx.overparam_precondition(3, method=method), optax.sgd(0.1))
      >>> params = {"w": jnp.eye(3)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update(params, state, params)
      >>> int(state[0].decompositions)  # the first update computes the basis
      1
    """

    name = "tracked"
    entry_type = TrackedBasis
    tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self):
        object.__setattr__(self, "tolerance", _check_tolerance(self.tolerance))

    def init_entry(self, shape, dtype, N):
        del N
        count, _, n = shape
        return TrackedBasis(jnp.zeros((count, n, n), dtype), jnp.zeros((count,), jnp.int32))

    def update(self, w, g, entry, N, precision):
        # The value comes from the tracked basis without derivatives; derivatives through
        # the update (meta-learning, unrolled optimization) come from the spectral formula.
        out, basis, fresh = precondition(
            jax.lax.stop_gradient(w),
            jax.lax.stop_gradient(g),
            entry,
            N,
            tolerance=self.tolerance,
            precision=precision,
        )
        out = spectral_jvp.with_basis_tangent(w, g, out, basis.v, N, precision)
        return out, basis, fresh

    @staticmethod
    def entry_sharding(entry, param_sharding, replicated):
        """``v`` (one n x n basis per matrix) split by rows like its parameter.

        A parameter split k ways keeps 1/k of its basis per device; bases of replicated
        parameters and row counts that do not divide stay ``replicated``, as do the round
        counts.
        """
        return TrackedBasis(_rows_split_like(entry.v, param_sharding, replicated), replicated)


def _rows_split_like(factor, param_sharding, replicated):
    spec = getattr(param_sharding, "spec", None)
    mesh = getattr(param_sharding, "mesh", None)
    if spec is None or mesh is None:
        return replicated
    axes = tuple(
        a
        for entry in spec
        if entry is not None
        for a in (tuple(entry) if isinstance(entry, (tuple, list)) else (entry,))
    )
    if len(factor.shape) != 3 or not axes:
        return replicated
    ways = math.prod(mesh.shape[a] for a in axes)
    if ways == 1 or factor.shape[1] % ways:
        return replicated
    rows = axes if len(axes) > 1 else axes[0]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, rows, None))


def _off_diagonal(b: jax.Array) -> jax.Array:
    return b * (1 - jnp.eye(b.shape[-1], dtype=b.dtype))


def resolved_pairs(b: jax.Array, shape) -> jax.Array:
    """Pairs (a, b) of which at least one singular value is above the rank tolerance.

    Entries of B between two directions that W maps to rounding noise (numpy's rank
    tolerance, as :func:`~overparam_optax.numerics.truncate_below_rank_tolerance`) are noise
    too: they are neither rotated away nor counted against the tolerance.
    """
    lam = jnp.diagonal(b, axis1=-2, axis2=-1)
    tol = (max(shape) * jnp.finfo(b.dtype).eps) ** 2 * jnp.max(lam, axis=-1, keepdims=True)
    big = lam > tol
    return big[..., :, None] | big[..., None, :]


def jacobi_rotation(
    b: jax.Array, resolved: jax.Array, precision, max_norm: float = MAX_ROTATION_NORM
) -> jax.Array:
    """An orthogonal Q such that Q^T B Q is closer to diagonal than a nearly diagonal B.

    Each pair (a, b) gets the angle of the 2 x 2 Jacobi rotation that zeroes its entry,
    theta_ab = atan(2 E_ab / (b_bb - b_aa)) / 2 (E_ab / (b_bb - b_aa) to first order),
    clipped to _MAX_ROTATION; the antisymmetric X of these angles, shortened to spectral
    norm ``max_norm``, is mapped to a rotation by the Cayley transform
    (I - X/2)^{-1} (I + X/2), the inverse a series cut after X^4 (matmuls only; orthogonal
    to 2 ||X/2||^6, at most 2e-6 at the default cap). Where the pairs are well separated,
    Q^T B Q = diag + O(E^2); a nearly degenerate pair (coupling not small against its gap)
    turns by at most _MAX_ROTATION per round.
    """
    lam = jnp.diagonal(b, axis1=-2, axis2=-1)
    gap = lam[..., None, :] - lam[..., :, None]
    off = _off_diagonal(b)
    theta = 0.5 * jnp.arctan2(2 * off * jnp.sign(gap), jnp.abs(gap))
    x = jnp.where(resolved, jnp.clip(theta, -_MAX_ROTATION, _MAX_ROTATION), 0)
    # A larger rotation is shortened so that the series below holds; what it leaves is the
    # residual check's to judge. ||X||_2^2 = ||X^2||_2 is bounded by the smaller of X^2's
    # Frobenius norm and largest row sum.
    x2 = matmul(x, x, precision)
    bound = jnp.sqrt(
        jnp.minimum(
            jnp.sqrt(jnp.sum(x2 * x2, axis=(-2, -1))),
            jnp.max(jnp.sum(jnp.abs(x2), axis=-1), axis=-1),
        )
    )[..., None, None]
    scale = 0.5 * jnp.minimum(1, max_norm / jnp.where(bound > 0, bound, 1))
    y, y2 = scale * x, scale**2 * x2
    # Cayley: (I - Y)^{-1} (I + Y) = (I + Y)^2 (I - Y^2)^{-1}, and (I - Y^2)^{-1} =
    # I + Y^2 + Y^4 + O(Y^6): the truncation turns R into R (I - Y^6), orthogonal to
    # 2 ||Y||^6. Matmuls rather than LAPACK's solve: on CPU the solve's threads contend
    # with XLA's beside the large products (docs/performance.md, "Cost").
    eye = jnp.eye(b.shape[-1], dtype=b.dtype)
    series = eye + y2 + matmul(y2, y2, precision)
    return matmul(eye + 2 * y + y2, series, precision)


def jacobi_round(y: jax.Array, b: jax.Array, pairs: jax.Array, precision):
    """One round: (Y R, (Y R)^T (Y R), R) for Y = W V, B = Y^T Y and the rotation R of
    :func:`jacobi_rotation` (``pairs`` the pairs it may turn).

    B is recomputed from the rotated columns rather than rotated itself (R^T B R): the
    rounding of R^T B R is eps ||B|| in every entry, which hides the couplings of small
    singular values (those of W^T W below sqrt(eps) s_max); that of (Y R)^T (Y R) is
    about eps s_max (s_a + s_b) in entry (a, b), as W's own float32 rounding allows.
    """
    r = jacobi_rotation(b, pairs, precision)
    y = matmul(y, r, precision)
    return y, symmetrize(matmul(matrix_transpose(y), y, precision)), r


def near_square(shape) -> bool:
    """Whether P costs fewer products from W V' and G V' than from n x n factors.

    Counting one product as 2 m n^2 or 2 n^3 FLOPs: the frame and application through n x n
    factors (:class:`Frame` ``c``) take 5 products with W or G and 6 of n x n, through
    W V' and G V' 7 and 1. The latter is cheaper below m = 2.5 n (a square W: 8 against 11).
    This is the default ``near`` of :func:`initial_frame` and :func:`apply_frame`.
    """
    m, n = shape[-2:]
    return 2 * m < 5 * n


def initial_frame(w: jax.Array, g: jax.Array, v: jax.Array, precision, near: bool) -> Frame:
    """y = W v, B = y^T y and C = y^T G in the basis ``v`` (not rotated yet: q = I).

    C is computed only where the application reads it (``near`` False: the n x n route).
    """
    n = w.shape[-1]
    y = matmul(w, v, precision)
    if near:
        b, c = symmetrize(matmul(matrix_transpose(y), y, precision)), None
    else:
        yy_yg = matmul(matrix_transpose(y), jnp.concatenate([y, g], axis=-1), precision)
        b, c = symmetrize(yy_yg[..., :n]), yy_yg[..., n:]
    # Built from b (not broadcast from a constant) so that, inside shard_map, the rotation
    # loop's carry varies over the mesh axes as b does.
    q = jnp.eye(n, dtype=w.dtype) + jnp.zeros_like(b)
    return Frame(v, q, b, c)


def rotate(
    frame: Frame,
    w: jax.Array,
    N: int,
    tolerance: float,
    precision,
    max_rounds: int = MAX_TRACKING_ROUNDS,
) -> tuple[Frame, jax.Array, jax.Array]:
    """The frame of ``w`` after Jacobi rounds, its :func:`coupling` bound and rounds per
    matrix.

    A matrix gets a round while its bound exceeds ``tolerance`` and its last round lowered
    it, up to ``max_rounds``: none where the carried basis is already within the tolerance.
    A matrix's rounds depend on it alone, not on the others stacked with it.
    """

    def more(carry):
        return jnp.any(carry[-1])

    shape = w.shape[-2:]

    def round_(carry):  # a loop, not unrolled: the round is compiled once
        i, y, b, q, error, rounds, active = carry
        # An inactive matrix gets no angles: its rotation is exactly I, so its y and q
        # come through unchanged (cheaper to compile than selecting them).
        pairs = resolved_pairs(b, shape) & active[..., None, None]
        y, b, r = jacobi_round(y, b, pairs, precision)
        # The first round's q is I: its product is skipped (a cond on the round counter).
        q = jax.lax.cond(i == 0, lambda: r, lambda: matmul(q, r, precision))
        new = coupling(b, shape, N)
        i, rounds = i + 1, rounds + active
        # A round that did not lower the bound has met what rotations of this kind resolve
        # (a cluster that moves too fast): the rest is the decomposition's.
        active = active & (i < max_rounds) & (new > tolerance) & (new < error)
        return i, y, b, q, new, rounds, active

    error = coupling(frame.b, shape, N)
    rounds = jnp.zeros_like(error, dtype=jnp.int32)  # varying over mesh axes as error does
    y = matmul(w, frame.v, precision)  # initial_frame's product (XLA computes it once)
    carry = (0, y, frame.b, frame.q, error, rounds, error > tolerance)
    _, _, b, q, error, rounds, _ = jax.lax.while_loop(more, round_, carry)
    return frame._replace(b=b, q=q), error, rounds


def coupling(b: jax.Array, shape, N: int) -> jax.Array:
    """A first-order bound on the relative error of P_W applied in the basis of ``b``.

    With lam = diag(B) / max(diag(B)) and E = off(B) / max(diag(B)), the preconditioner
    applied from the basis is the exact one of diag(B). The fractional powers
    (W^T W)^{k/N} (1 <= k < N) by which it differs change, to first order, by E_ab times
    the divided difference of x^{k/N} at (lam_a, lam_b), at most max(lam_a, lam_b)^{k/N-1}
    (x^{k/N} is concave and 0 at 0). So the largest abs(E_ab) / max(lam_a, lam_b)^{1-1/N} over
    the resolved pairs (:func:`resolved_pairs`) bounds P's error relative to its scale: a
    coupling of two small singular values counts as much as one of two large ones, where
    ||off(B)||_F / ||B||_F would not see it. The rounding of W V is discounted first
    (_ROUNDING_ALLOWANCE). 0 for a zero W.
    """
    lam = jnp.maximum(jnp.diagonal(b, axis1=-2, axis2=-1), 0)
    top = jnp.max(lam, axis=-1, keepdims=True)
    top = jnp.where(top > 0, top, 1)
    lam = lam / top
    s = jnp.sqrt(lam)
    noise = _ROUNDING_ALLOWANCE * jnp.finfo(b.dtype).eps * (s[..., :, None] + s[..., None, :])
    off = jnp.maximum(jnp.abs(_off_diagonal(b)) / top[..., None] - noise, 0)
    slope_scale = jnp.power(jnp.maximum(lam[..., :, None], lam[..., None, :]), 1 - 1 / N)
    counted = resolved_pairs(b, shape) & (slope_scale > 0)
    bound = jnp.where(counted, off / jnp.where(counted, slope_scale, 1), 0)
    return jnp.max(bound, axis=(-2, -1))


@functools.cache
def _probes(n: int) -> np.ndarray:
    """Two fixed unit vectors of length n, for the orthonormality check."""
    x = np.random.default_rng(0).standard_normal((n, 2))
    return x / np.linalg.norm(x, axis=0)


def _is_orthonormal(v: jax.Array) -> jax.Array:
    """Per matrix: finite, with unit columns, and V^T V x = x for two fixed probes x.

    A state of zeros means "no basis yet"; a basis that is not orthonormal (columns of unit
    norm but not orthogonal, e.g. repeated) would apply the wrong P and is recomputed. The
    probes cost O(n^2) where V^T V itself would cost n^3.
    """
    norms = jnp.sum(v * v, axis=-2)
    unit = jnp.all(jnp.abs(norms - 1) < 1e-3, axis=-1)
    probes = jnp.asarray(_probes(v.shape[-1]), v.dtype)  # (n, 2)
    # Elementwise products and sums, in full float32 whatever the matmul precision (one
    # bfloat16 pass would miss the 1e-3 test).
    forward = jnp.sum(v[..., :, :, None] * probes[None, :, :], axis=-2)  # V x, (..., n, 2)
    back = jnp.sum(v[..., :, :, None] * forward[..., :, None, :], axis=-3)  # V^T V x
    orthogonal = jnp.all(jnp.abs(back - probes) < 1e-3, axis=(-2, -1))
    return unit & orthogonal & jnp.all(jnp.isfinite(v), axis=(-2, -1))


def fresh_frame(w: jax.Array, g: jax.Array, precision, near: bool) -> Frame:
    """The frame of a basis computed afresh, from a thin SVD of W.

    An SVD resolves small singular values to eps * s_max, where the eigendecomposition of
    W^T W resolves them only to sqrt(eps) * s_max (docs/performance.md, "Fidelity"); the
    basis is computed afresh rarely, so the SVD's cost matters little.
    """
    _, _, vt = jnp.linalg.svd(w, full_matrices=False)
    return initial_frame(w, g, matrix_transpose(vt), precision, near)


@functools.cache
def _refresh_where(precision, near: bool):
    """f(need, w, g, tracked): ``tracked``, with the matrices where ``need`` is set recomputed.

    The decomposition runs only on updates that need it (``lax.cond``). Under ``jax.vmap``
    (e.g. an ensemble of optimizers) a batched predicate would turn the cond into a select
    that decomposes on every update; the custom batching rule keeps one cond for the batch.
    """

    @jax.custom_batching.custom_vmap
    def refresh_where(need, w, g, tracked):
        return jax.lax.cond(
            jnp.any(need),
            lambda: numerics.select(need, fresh_frame(w, g, precision, near), tracked),
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


def apply_frame(
    frame: Frame,
    w: jax.Array,
    g: jax.Array,
    alpha: jax.Array,
    N: int,
    precision,
    near: bool,
    *,
    beta: jax.Array | None = None,
):
    """P_W(beta g) from a frame of w = W / alpha, and the basis v q (``alpha``, ``beta``
    (..., 1, 1) > 0; ``beta`` None is 1).

    The factor (alpha s_max)^{2-2/N} beta is applied in two equal halves, one to g before
    the products and one to the result: every intermediate then lies between the
    normalized products and the result, so none overflows or underflows where W, G and P
    are representable.

    With V' = v q and U = w V' S^{-1} this is the SVD-basis formula of
    :func:`~overparam_optax.numerics.apply_basis`,
    P = [U ((K - 1 d^T) o (U^T G V')) + G V' diag(d)] V'^T, with every n x n factor folded
    into one final (m x 2n) x (2n x n) product [w G] [R; C]; or, where that takes more
    products (``near``, :func:`near_square`), computed as written from w V' and G V'.
    """
    v_new = matmul(frame.v, frame.q, precision)
    s = jnp.sqrt(jnp.maximum(jnp.diagonal(frame.b, axis1=-2, axis2=-1), 0))
    s = numerics.truncate_below_rank_tolerance(s, g.shape[-2:], g.dtype)
    s_hat, s_max = numerics.normalized_spectrum(s)
    # Factor by factor (each representable); the exponential of a summed logarithm would
    # lose |log t| ulps of accuracy at extreme scales.
    t = numerics.half_scale(alpha[..., 0], N, g.dtype)
    if beta is not None:
        t = t * jnp.sqrt(beta[..., 0])
    t = (t * numerics.half_scale(s_max, N, g.dtype))[..., None]  # (..., 1, 1)
    inv_s = numerics.safe_reciprocal(s)
    kernel = numerics.depth_kernel(s_hat, s_hat, N)
    d = jnp.power(s_hat, 2.0 * (N - 1) / N)
    if near:  # the same formula through W V' and G V'
        wv, gv = matmul(w, v_new, precision), matmul(g, v_new, precision) * t
        core = inv_s[..., :, None] * matmul(matrix_transpose(wv), gv, precision)  # U^T G V' t
        out = numerics.combine(wv * inv_s[..., None, :], core, gv, kernel, d, v_new, precision)
        return out * t, v_new
    # U^T G V' = S^{-1} q^T (v^T w^T G) V'
    q_t = matrix_transpose(frame.q)
    core = inv_s[..., :, None] * matmul(q_t, matmul(frame.c, v_new, precision), precision)
    inner = (kernel - d[..., None, :]) * core * t
    v_t = matrix_transpose(v_new)
    right = matmul(matmul(v_new, inv_s[..., :, None] * inner, precision), v_t, precision)
    complement = matmul(v_new * d[..., None, :], v_t, precision)
    out = matmul(
        jnp.concatenate([w, g * t], axis=-1),
        jnp.concatenate([right, complement], axis=-2),
        precision,
    )
    return out * t, v_new


def precondition(
    w: jax.Array,
    g: jax.Array,
    basis: TrackedBasis,
    N: int,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    precision=jax.lax.Precision.HIGHEST,
    near: bool | None = None,
    max_rounds: int = MAX_TRACKING_ROUNDS,
) -> tuple[jax.Array, TrackedBasis, jax.Array]:
    """P_W(G) for tall W from a basis carried over from the previous update.

    The basis is rotated toward W's current right singular basis by Jacobi rounds (matmul
    and n x n work only) while the first-order bound on P's relative error
    (:func:`coupling`) exceeds ``tolerance`` and falls, up to ``max_rounds``. Where the
    bound still exceeds ``tolerance``, or where ``basis`` is not an orthonormal basis (the
    first update, a state rebuilt from zeros), the basis is recomputed from a thin SVD of
    W. Singular values are taken as the column norms of W V.

    Args:
      w: tall matrices (..., m, n), m >= n, in the compute dtype.
      g: their gradients, same shape.
      basis: last update's :class:`TrackedBasis` (zeros for none).
      N: the depth.
      tolerance: the largest error bound accepted without recomputing.
      precision: matmul precision (as :func:`~overparam_optax.numerics.matmul` takes it).
      near: the application route: through W V' and G V' (True) or n x n factors (False);
        None (default) takes the one with fewer products (:func:`near_square`).
      max_rounds: the most rotation rounds per update (>= 0).

    Returns:
      (P_W(G), the new basis, a bool per matrix: whether it was recomputed). A matrix
      with non-finite entries keeps its previous basis (its result is not finite).
    """
    N = numerics.check_depth(N)
    numerics.check_real("tracked.precondition", w=w, g=g, basis_v=basis.v)
    near = near_square(w.shape) if near is None else bool(near)
    alpha, beta = numerics.max_abs(w), numerics.max_abs(g)
    # Both W and G are divided by their largest entry (P is homogeneous in W and linear in
    # G), so y^T G neither underflows nor overflows whatever their scales.
    w_hat, g_hat = w / alpha, g / beta
    tracked, error, rounds = rotate(
        initial_frame(w_hat, g_hat, basis.v, precision, near),
        w_hat,
        N,
        tolerance,
        precision,
        max_rounds,
    )
    need = ~(_is_orthonormal(basis.v) & (error <= tolerance))
    frame = _refresh_where(precision, near)(need, w_hat, g_hat, tracked)
    out, v_new = apply_frame(frame, w_hat, g_hat, alpha, N, precision, near, beta=beta)
    finite = jnp.all(jnp.isfinite(v_new), axis=(-2, -1))
    top = jnp.iinfo(jnp.int32).max
    total = jnp.where(basis.rounds > top - rounds, top, basis.rounds + rounds)
    return out, TrackedBasis(numerics.select(finite, v_new, basis.v), total), need
