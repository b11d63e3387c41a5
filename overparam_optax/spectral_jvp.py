r"""The derivative of the depth-N preconditioner, finite at repeated and zero singular values.

P_W(G) = sum_{j=1..N} (W W^T)^{(j-1)/N} G (W^T W)^{(N-j)/N} is linear in G; this module gives
its derivative in W. Differentiating through an SVD instead divides by s_a^2 - s_b^2, which is
0/0 (NaN) for the identity, a scaled orthogonal matrix or any repeated singular value, although
P itself is smooth there. Here the singular vectors only serve as a basis; nothing is divided
by a difference of singular values.

Derivation (tall W, m >= n; a wide W is transposed with G, as everywhere). Write
Z_L = (W W^T)^{1/N}, Z_R = (W^T W)^{1/N}. Then::

    P = sum_{p+r=N-1} Z_L^p G Z_R^r,                  (Z^0 := I)
    dP = sum_{p+q+r=N-2} [Z_L^p dZ_L Z_L^q G Z_R^r + Z_L^p G Z_R^q dZ_R Z_R^r]
         + sum_{p+r=N-1} Z_L^p dG Z_R^r.

Take the full SVD W = U_f Sh V^T, Sh = [diag(s); 0], eigenvalues l = s^2 of W W^T and W^T W,
mu = l^{1/N} = s^{2/N} (mu = 0 on the left complement), and hats for coordinates in these
bases: Om = U_f^T dW V, Ga = U_f^T G V. The derivative of the spectral function
f(x) = x^{1/N} at W W^T (Daleckii-Krein) is its first divided difference times the
perturbation E_L = U_f^T (dW W^T + W dW^T) U_f = Om Sh^T + Sh Om^T; as x = mu^N,

    f[l_a, l_c] = (mu_a - mu_c) / (mu_a^N - mu_c^N) = 1 / k(s_a, s_c),
    k(s_a, s_c) = sum_{p+r=N-1} mu_a^p mu_c^r   (`numerics.depth_kernel`),

which is also the limit f'(l_a) = 1 / (N mu_a^{N-1}) on equal values: the divided difference
is evaluated as 1/k, never as a difference quotient, so equal values need no limit. Hence
Y_L := dZ_L^ = E_L / k and Y_R := dZ_R^ = E_R / k with E_R = Sh^T Om + Om^T Sh (elementwise
division). Since the Z's are diagonal in these bases, dP^[a, b] is a sum over one more index c:

    dP^[a,b] = sum_c T(a,c,b) (Y_L[a,c] Ga[c,b] + Ga[a,c] Y_R[c,b]) + k(a,b) dG^[a,b],
    T(a,c,b) = h_{N-2}(mu_a, mu_c, mu_b) = sum_{p+q+r=N-2} mu_a^p mu_c^q mu_b^r,

the complete homogeneous polynomial, i.e. the second divided difference of x^N. It is a sum of
non-negative terms, so it is evaluated without cancellation by the recursion (with
H_k[a,b] = h_k(mu_a, mu_b) = mu_a H_{k-1}[a,b] + mu_b^k)

    S_0 = Y_L Ga + Ga Y_R,    S_k = S_{k-1} diag(mu) + (H_k o Y_L) Ga + (H_k o Ga) Y_R,

S_{N-2} = the first sum on the n x n block: N - 1 steps of two n x n products (O(N n^3)).

The left complement and zero singular values. Let R = {a : s_a > 0}; every left index outside
R (zero singular values and the complement of U) has mu = 0, and they are handled together
through the projector Pi_0 = I - U_R U_R^T, so U may hold zero columns where s = 0. With
psi(s) = s / k(s, 0) = s^{(2-N)/N}, d(s) = k(0, s) = s^{2(N-1)/N} and B = G V, Bd = dW V:

    rows in R:   S_{N-2} + psi_a H_{N-2} o (Bd^T Pi_0 B) + K o (U_R^T dG V),   K = [k(s_a, s_b)]
    null rows:   (Pi_0 Bd) (psi Ga o H_{N-2}) + (Pi_0 B)(Y_R o H_{N-2}) + (Pi_0 dG V) diag(d),

and dP = [U_R (rows in R) + (null rows)] V^T, matmuls only given the basis.

Where the derivative does not exist. E_L and E_R vanish identically on the block where both
singular values are zero (l_a = l_c = 0), whereas f'(0) = inf for x^{1/N}, N >= 2: there the
formula reads 0 * inf. Following the 0^0 := 1, 0^p := 0 convention of P itself, this block of
dZ is set to 0 (Y = E / k with Y := 0 where k = 0). The value returned is therefore linear in
(dW, dG) and ignores the null-null block Om_00 = U_0^T dW V_0 of dW (U_0, V_0: the left and
right null spaces): it is exactly the derivative of P restricted to matrices of W's rank, along
the tangent part of dW. Along a straight line W + t dW with rank W = r:

* r = n (full column rank), or N = 1: P is smooth; the value is the derivative.
* Om_00 != 0, 1 <= r < n: the small singular values grow like t and enter P as
  ``|t|^{2/N}``: for N = 2 the one-sided derivatives exist but are not linear in dW; for N >= 3
  they are infinite (in general). No derivative exists; the value returned drops Om_00.
* W = 0: P_{t dW} = ``|t|^{2-2/N}`` P_{dW}; the derivative is 0 for N >= 3 (returned); for N = 2
  only one-sided derivatives +-P_{dW}(G) exist (0, their mean, is returned).
* Om_00 = 0: the singular values grow like t^2 ``|Q|`` with Q = Om_0R S_R^{-1} Om_R0, entering as
  ``|t|^{4/N}``: the value is the derivative for N <= 3, or if Q = 0 (the line keeps the rank, e.g.
  dW = U_R C or C V_R^T), and along every curve of constant rank with velocity dW (such as
  (I + tA) W (I + tB)); for N = 4 and Q != 0 the one-sided derivatives are not linear, for
  N >= 5 and Q != 0 they are infinite.

Singular values below the rank tolerance of `numerics` are exact zeros of the basis, so a
numerically rank-deficient W is differentiated as rank-deficient. Near (not at) a
rank-deficient W with N >= 3 the true derivative is large, psi(s) = s^{-(N-2)/N}; it is
returned as it is, finite for every positive s.

Second derivatives (a JVP of this JVP) go through the SVD's own derivative and are NaN at
repeated singular values; only first derivatives are made safe here. Through the default
method, whose basis is tracked without derivatives, a second derivative in the weights is
refused with a ValueError (:func:`with_basis_tangent`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from overparam_optax import numerics
from overparam_optax.numerics import matrix_transpose as _mT

__all__ = ["differentiable_precondition", "precondition_tangent", "with_basis_tangent"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _positive_power(s: jax.Array, exponent: float) -> jax.Array:
    """s^exponent where s > 0 and exactly 0 where s = 0 (any sign of exponent)."""
    positive = s > 0
    return jnp.where(positive, jnp.power(jnp.where(positive, s, 1), exponent), 0)


def _triple_sum(mu, y_left, gamma, y_right, N: int, precision):
    """(S, H) = (sum_{p+q+r=N-2} D^p Y_L D^q Ga D^r + D^p Ga D^q Y_R D^r, H_{N-2}), D = diag(mu).

    H_k[a, b] = sum_{p=0..k} mu_a^p mu_b^{k-p}; every coefficient is non-negative (N >= 2).
    It takes N - 2 steps, counted in int32.
    """
    if N - 2 > np.iinfo(np.int32).max:
        raise ValueError(
            f"Derivatives through the preconditioner take N - 2 steps (linear in N) and "
            f"support N <= 2**31 + 1; got N={N}. The value itself supports every N."
        )
    mm = functools.partial(numerics.matmul, precision=precision)
    h = jnp.ones_like(y_right)
    total = mm(y_left, gamma) + mm(gamma, y_right)

    def step(_, carry):
        total, h, mu_power = carry
        mu_power = mu_power * mu
        h = mu[..., :, None] * h + mu_power[..., None, :]
        total = total * mu[..., None, :] + mm(h * y_left, gamma) + mm(h * gamma, y_right)
        return total, h, mu_power

    total, h, _ = jax.lax.fori_loop(0, N - 2, step, (total, h, jnp.ones_like(mu)))
    return total, h


def _check_basis_shapes(u, s, v, g, dw, dg) -> None:
    *batch, m, n = u.shape
    if m < n:
        raise ValueError(
            f"precondition_tangent expects a tall basis u (rows >= cols), got {u.shape}."
        )
    expected = {"s": (*batch, n), "v": (*batch, n, n), "g": (*batch, m, n), "dw": (*batch, m, n)}
    given = {"s": s.shape, "v": v.shape, "g": g.shape, "dw": dw.shape}
    if dg is not None:
        expected["dg"], given["dg"] = (*batch, m, n), dg.shape
    for name, shape in expected.items():
        if tuple(given[name]) != tuple(shape):
            raise ValueError(
                f"precondition_tangent: {name} must have shape {tuple(shape)} for u of shape "
                f"{u.shape}, got {tuple(given[name])}."
            )


def precondition_tangent(u, s, v, g, dw, N: int, *, dg=None, precision=_HIGHEST) -> jax.Array:
    """D_W[P_W(G)][dW] (+ P_W(dG) if ``dg`` is given) from a thin SVD W = u diag(s) v^T.

    See the module docstring for the formula and for what is returned where P is not
    differentiable (zero singular values in some directions).

    Args:
      u: (..., m, n), m >= n: left singular vectors; columns where s = 0 may be zero.
      s: (..., n): singular values, >= 0, exact zeros allowed; any order.
      v: (..., n, n): orthogonal right singular vectors.
      g: (..., m, n): the gradient G that P is applied to.
      dw: (..., m, n): the direction dW.
      N: the depth, a positive int.
      dg: optional (..., m, n) direction of G; its term P_W(dG) is added.
      precision: matmul precision.

    Returns:
      The tangent, shape (..., m, n), in the compute dtype (float32 or wider).
    """
    N = numerics.check_depth(N)
    u, s, v, g, dw = (jnp.asarray(x) for x in (u, s, v, g, dw))
    dg = None if dg is None else jnp.asarray(dg)
    _check_basis_shapes(u, s, v, g, dw, dg)
    parts = (u, s, v, g, dw) + (() if dg is None else (dg,))
    dtype = numerics.compute_dtype(jnp.result_type(*parts))
    u, s, v, g, dw = (x.astype(dtype) for x in (u, s, v, g, dw))
    if N == 1:  # P = G
        return jnp.zeros_like(g) if dg is None else dg.astype(dtype)
    # Normalized units (as every method does): with W = c W_hat, c = max s, and G = b G_hat,
    # D_W P_W(G)[dW] = c^{2-2/N} D P_{W_hat}(G)[dW / c] = c^{1-2/N} b D P_{W_hat}(G_hat)[dW],
    # one scalar applied last: in reverse mode no intermediate then under- or overflows
    # where the tangent is representable.
    s = jnp.maximum(s, 0)
    s, s_max = numerics.normalized_spectrum(s)
    beta = numerics.max_abs(g)
    factor = jnp.power(s_max, 1.0 - 2.0 / N)[..., None] * beta
    out = _tangent_normalized(u * (s > 0)[..., None, :], s, v, g / beta, dw, N, precision)
    out = out * factor
    if dg is not None:
        t = numerics.half_scale(s_max, N, dtype)[..., None]
        out = out + numerics.apply_basis(
            numerics.SpectralBasis(u, s, v), dg.astype(dtype) * t, N, precision
        ) * t
    return out


def _tangent_normalized(u_r, s, v, g, dw, N: int, precision) -> jax.Array:
    """The dW term of the module docstring, for s in [0, 1]; u_r is u with zero null columns."""
    mm = functools.partial(numerics.matmul, precision=precision)
    kernel = numerics.depth_kernel(s, s, N)
    inv_kernel = numerics.safe_reciprocal(kernel)  # 0 * inf := 0 on doubly-zero entries
    psi = _positive_power(s, (2.0 - N) / N)  # s / k(s, 0)
    b, bd = mm(g, v), mm(dw, v)
    gamma, omega = mm(_mT(u_r), b), mm(_mT(u_r), bd)
    gamma0, omega0 = b - mm(u_r, gamma), bd - mm(u_r, omega)  # the null-row parts, Pi_0 B
    col, row = s[..., None, :], s[..., :, None]
    y_left = (omega * col + row * _mT(omega)) * inv_kernel  # dZ_L^ on the n x n block
    y_right = (row * omega + _mT(omega) * col) * inv_kernel  # dZ_R^
    mu = _positive_power(s, 2.0 / N)
    top, h_low = _triple_sum(mu, y_left, gamma, y_right, N, precision)
    top = top + psi[..., :, None] * h_low * mm(_mT(bd), gamma0)
    null = mm(omega0, psi[..., :, None] * gamma * h_low) + mm(gamma0, y_right * h_low)
    return mm(mm(u_r, top) + null, _mT(v))


# --------------------------------------------------------------------------------------
# A differentiable P_W(G): the primal as a method computes it, the tangent from an SVD basis.
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("method", "N", "precision"))
def _primal(method, W: jax.Array, G: jax.Array, N: int, precision) -> jax.Array:
    """P_W(G) by a decomposing ``method``: its factors of the tall orientation of W, then
    their application (P is invariant under transposing W and G together)."""
    dtype = numerics.compute_dtype(jnp.promote_types(W.dtype, G.dtype))
    w, g = W.astype(dtype), G.astype(dtype)
    wide = w.shape[-2] < w.shape[-1]
    if wide:
        w, g = _mT(w), _mT(g)
    out = method.apply(method.factors(w, N, precision), g, N, precision)
    return (_mT(out) if wide else out).astype(G.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 3, 4))
def differentiable_precondition(method, W, G, N: int, precision) -> jax.Array:
    """P_W(G) as a decomposing ``method`` computes it (arguments already validated), with
    the JVP of :func:`precondition_tangent` from an SVD of W (tall or wide): finite and exact
    at repeated and zero singular values (module docstring for where P itself has no
    derivative and what is returned there)."""
    return _primal(method, W, G, N, precision)


def _differentiable_precondition_jvp(method, N, precision, primals, tangents):
    W, G = primals
    # A tangent that is zero by construction (grad in W only, or in G only) is skipped.
    dW, dG = (None if isinstance(x, jax.custom_derivatives.SymbolicZero) else x for x in tangents)
    return _value_and_tangent(method, W, G, dW, dG, N, precision)


differentiable_precondition.defjvp(_differentiable_precondition_jvp, symbolic_zeros=True)


@functools.partial(jax.jit, static_argnames=("method", "N", "precision"))
def _value_and_tangent(method, W, G, dW, dG, N: int, precision):
    """(P_W(G), D_W P[dW] + P_W(dG)); dW or dG may be None (zero)."""
    dtype = numerics.compute_dtype(jnp.promote_types(W.dtype, G.dtype))
    w, g = W.astype(dtype), G.astype(dtype)
    dw = jnp.zeros_like(w) if dW is None else dW.astype(dtype)
    dg = None if dG is None else dG.astype(dtype)
    wide = w.shape[-2] < w.shape[-1]
    if wide:  # P is invariant under transposing W and G together
        w, g, dw = _mT(w), _mT(g), _mT(dw)
        dg = None if dg is None else _mT(dg)
    basis = numerics.svd_basis(w)
    if method.factors_are_svd:  # the primal's own path, sharing the decomposition
        out = numerics.apply_basis(basis, g, N, precision)
        out = (_mT(out) if wide else out).astype(G.dtype)
    else:
        out = _primal(method, W, G, N, precision)
    if dW is None and dg is None:
        tangent = jnp.zeros_like(g)
    elif dW is None:
        tangent = numerics.apply_basis(basis, dg, N, precision)
    else:
        tangent = precondition_tangent(*basis, g, dw, N, dg=dg, precision=precision)
    return out, (_mT(tangent) if wide else tangent).astype(G.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def with_basis_tangent(w, g, value, v, N: int, precision) -> jax.Array:
    """``value`` (= P_W(G) for tall w, computed elsewhere), differentiable in w and g.

    For the transform's default: its value comes from a tracked basis ``v`` of w (right
    singular vectors, orthonormal), computed without derivatives; the tangent is
    :func:`precondition_tangent` from that basis, with u and s taken from w v.
    """
    del w, g, v
    return value


def _with_basis_tangent_jvp(N, precision, primals, tangents):
    w, g, value, v = primals
    dw, dg = (
        None if isinstance(x, jax.custom_derivatives.SymbolicZero) else x for x in tangents[:2]
    )
    if dw is None and dg is None:
        return value, jnp.zeros_like(value)
    w, g = _differentiated_once(w), _differentiated_once(g)
    alpha = numerics.max_abs(w)  # column norms of w v / alpha neither under- nor overflow
    basis = numerics.basis_from_columns(
        numerics.matmul(w / alpha, v, precision), v, w.shape[-2:]
    )
    basis = basis._replace(s=basis.s * alpha[..., 0])
    dw = jnp.zeros_like(w) if dw is None else dw
    tangent = precondition_tangent(*basis, g, dw, N, dg=dg, precision=precision)
    return value, tangent.astype(value.dtype)


with_basis_tangent.defjvp(_with_basis_tangent_jvp, symbolic_zeros=True)


@jax.custom_jvp
def _differentiated_once(x):
    """x itself; differentiating it (a second derivative) raises a ValueError.

    The tracked basis v and the value are computed without derivatives, so differentiating
    the tangent above in w would hold v fixed while u and s move with w, and in g would
    miss the value's dependence on g: wrong second derivatives.
    """
    return x


@_differentiated_once.defjvp
def _differentiated_once_jvp(primals, tangents):
    del primals, tangents
    raise ValueError(
        "Second derivatives through method='tracked' (the default) are not supported: its "
        "derivative is exact to first order only. Use "
        "overparam_precondition(N, method='svd') for higher-order derivatives (exact away "
        "from repeated singular values, NaN at them)."
    )
