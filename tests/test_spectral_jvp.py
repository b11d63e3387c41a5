"""The derivative of P_W(G) against float64 finite differences of the independent reference.

Repeated singular values (where differentiating through an SVD gives NaN), zero ones (in the
directions where the derivative exists, see spectral_jvp's docstring), square, tall and wide
shapes. Compilation dominates the cost, so each test stacks its matrices of one shape into a
batch and computes every depth in one jitted call.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import overparam_optax as opx
from overparam_optax import methods, spectral_jvp
from overparam_optax.testing import reference_precondition
from overparam_optax.testing import with_singular_values as _with_singular_values

STEP = 1e-4  # fourth-order central differences: truncation ~STEP^4, rounding ~1e-16 / STEP

# Measured maxima of |tangent - FD| / max|FD| (float64, these seeds): 6.5e-12 (square),
# 1.7e-11 (tall), 1.2e-11 (wide), 3.7e-12 (gradients at the identity). About 3x the largest:
FD_TOL = 5e-11
NULL_TOL = 1e-13  # exact zeros up to rounding


def _relative_error(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - expected).max() / max(np.abs(expected).max(), 1e-300))


def _derivative(f, step=STEP):
    """f'(0) to fourth order (Richardson's combination of two central differences)."""
    return (8 * (f(step) - f(-step)) - (f(2 * step) - f(-2 * step))) / (12 * step)


class Case(NamedTuple):
    name: str
    w: np.ndarray
    dw: np.ndarray
    expected: Callable  # (g, dg, N) -> the exact tangent (finite differences or 0)
    depths: tuple = (1, 2, 3, 4, 7)  # where the derivative exists (the docstring's cases)


def _line(w, dw):
    def expected(g, dg, N):
        return _derivative(lambda t: reference_precondition(w + t * dw, g + t * dg, N))

    return expected


def _curve(w, a, b):
    """Along (I + tA) W (I + tB): W's rank for every t (the line along A W + W B is not)."""
    m, n = w.shape

    def expected(g, dg, N):
        def along(t):
            moved = (np.eye(m) + t * a) @ w @ (np.eye(n) + t * b)
            return reference_precondition(moved, g + t * dg, N)

        return _derivative(along)

    return expected


def _rank_deficient_cases(w, rng, name):
    """Directions where P is differentiable at a rank-deficient W, and the null-null one."""
    m, n = w.shape
    u, s, vt = np.linalg.svd(w)
    rank = int(np.sum(s > 1e-10 * s[0]))
    null_left, null_right = u[:, rank:], vt[rank:].T
    a, b = rng.normal(size=(m, m)), rng.normal(size=(n, n))
    off_null = rng.normal(size=w.shape)
    off_null -= null_left @ (null_left.T @ off_null @ null_right) @ null_right.T
    directions = {
        "range_rows": u[:, :rank] @ rng.normal(size=(rank, n)),  # keeps the rank
        "range_columns": rng.normal(size=(m, rank)) @ vt[:rank],  # keeps the rank
        "curve": a @ w + w @ b,
        "off_null_block": off_null,  # differentiable for N <= 3 (only N = 2 is tested)
        "null_block": null_left @ rng.normal(size=(m - rank, n - rank)) @ null_right.T,
    }
    cases = []
    for kind, dw in directions.items():
        expected = _curve(w, a, b) if kind == "curve" else _line(w, dw)
        depths = (1, 2) if kind == "off_null_block" else (1, 2, 3, 4, 7)
        if kind == "null_block":
            expected = None
        cases.append(Case(f"{name}/{kind}", w, dw, expected, depths))
    return cases


def _group(shape_name, rng):
    """The matrices of one shape: full rank (distinct and repeated values) and rank-deficient."""
    if shape_name == "square":
        full = {
            "identity": np.eye(4),
            "scaled_orthogonal": 2.5 * np.linalg.qr(rng.normal(size=(4, 4)))[0],
            "cluster2": _with_singular_values(rng, 4, 4, [3.0, 1.2, 1.2, 0.5]),
            "separated": _with_singular_values(rng, 4, 4, [3.0, 2.0, 1.2, 0.6]),
        }
        deficient = {"repeated_and_zero": _with_singular_values(rng, 4, 4, [1.5, 1.5])}
    elif shape_name == "tall":
        full = {
            "separated": _with_singular_values(rng, 7, 4, [3.0, 2.0, 1.2, 0.6]),
            "cluster3": _with_singular_values(rng, 7, 4, [2.0, 2.0, 2.0, 0.7]),
            "isometry": 1.5 * np.linalg.qr(rng.normal(size=(7, 4)))[0],
        }
        deficient = {
            "rank2": rng.normal(size=(7, 2)) @ rng.normal(size=(2, 4)),
            "repeated_and_zero": _with_singular_values(rng, 7, 4, [1.5, 1.5]),
        }
    else:  # wide
        full = {
            "separated": _with_singular_values(rng, 3, 6, [2.5, 1.5, 0.7]),
            "cluster2": _with_singular_values(rng, 3, 6, [1.5, 1.5, 0.4]),
        }
        deficient = {"rank2": rng.normal(size=(3, 2)) @ rng.normal(size=(2, 6))}
    cases = []
    for name, w in full.items():
        cases.append(Case(name, w, rng.normal(size=w.shape), None))
        cases[-1] = cases[-1]._replace(expected=_line(w, cases[-1].dw))
    for name, w in deficient.items():
        cases += _rank_deficient_cases(w, rng, name)
    zero = np.zeros_like(w)
    cases.append(Case("zero", zero, rng.normal(size=w.shape), None))
    return cases


@functools.partial(jax.jit, static_argnames="depths")
def _tangents(w, g, dw, dg, depths):
    """The JVP of precondition_matrix for every depth (one compilation)."""

    def tangent(N):
        value = functools.partial(opx.precondition_matrix, N=N)
        return jax.jvp(value, (w, g), (dw, dg))[1]

    return [tangent(N) for N in depths]


@pytest.mark.parametrize("shape_name", ["square", "tall", "wide"])
def test_jvp_matches_finite_differences(shape_name, x64):
    """Every case and depth where P is differentiable; the documented value elsewhere."""
    rng = np.random.default_rng(["square", "tall", "wide"].index(shape_name))
    cases = _group(shape_name, rng)
    w = np.stack([case.w for case in cases])
    g, dg = rng.normal(size=w.shape), rng.normal(size=w.shape)
    depths = (1, 2, 3, 4, 7)
    tangents = _tangents(w, g, np.stack([case.dw for case in cases]), dg, depths)
    # The dG part alone (P_W(dG)), for the cases whose dW part is 0 by the convention.
    dg_only = _tangents(w, g, np.zeros_like(w), dg, depths)
    failures, worst = [], 0.0
    for k, case in enumerate(cases):
        for i, N in enumerate(depths):
            if case.name == "zero":  # P = 0 near W = 0 for N >= 2 (derivative 0 for N >= 3)
                expected, tol = (dg[k] if N == 1 else 0 * dg[k]), 0.0
            elif case.expected is None:  # the null-null block of dW contributes exactly 0
                expected, tol = np.asarray(dg_only[i][k]), NULL_TOL
            elif N in case.depths:
                expected, tol = case.expected(g[k], dg[k], N), FD_TOL
            else:
                continue
            error = (
                _relative_error(tangents[i][k], expected)
                if tol
                else float(np.abs(np.asarray(tangents[i][k]) - expected).max())
            )
            if tol == FD_TOL:
                worst = max(worst, error)
            if error > tol:
                failures.append(f"{case.name} N={N}: {error:.2e}")
    assert not failures, failures
    print(f"{shape_name}: max relative error against finite differences {worst:.2e}")


def test_deep_N_at_a_cluster(x64):
    """The triple-index recursion for a depth well beyond the usual ones."""
    rng = np.random.default_rng(3)
    w = _with_singular_values(rng, 5, 4, [3.0, 1.2, 1.2, 0.5])
    g, dw = rng.normal(size=w.shape), rng.normal(size=w.shape)
    (tangent,) = _tangents(w, g, dw, np.zeros_like(g), (24,))
    expected = _line(w, dw)(g, np.zeros_like(g), 24)
    assert _relative_error(tangent, expected) < FD_TOL


def _basis(w, method):
    return methods.resolve(method).factors(w, 2, jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames="depths")
def _tangents_from_bases(w, g, dw, depths):
    """precondition_tangent from the "svd" and the "eigh" basis of w, for every depth."""
    bases = [_basis(w, method) for method in ("svd", "eigh")]
    return [[spectral_jvp.precondition_tangent(*b, g, dw, N) for b in bases] for N in depths]


def test_basis_with_zero_columns_gives_the_same_tangent(x64):
    """An "eigh" basis (u = 0 where s = 0) and an "svd" one (a full u) agree."""
    rng = np.random.default_rng(20)
    w = jnp.asarray(_with_singular_values(rng, 6, 5, [1.5, 1.5, 0.5]))
    g, dw = (jnp.asarray(rng.normal(size=w.shape)) for _ in range(2))
    eigh = _basis(w, "eigh")
    assert np.all(np.asarray(eigh.u)[:, np.asarray(eigh.s) == 0] == 0)
    for from_svd, from_eigh in _tangents_from_bases(w, g, dw, (2, 3, 7)):
        assert _relative_error(from_eigh, np.asarray(from_svd)) < 1e-12


METHODS = ("svd", "eigh", "newton")
# The tangent is the same SVD-based one for every method (only the value differs): every
# depth for "svd", one for the others.
GRAD_CASES = (("svd", 2), ("svd", 3), ("svd", 7), ("eigh", 3), ("newton", 3))


@functools.partial(jax.jit, static_argnames="c")
def _identity_grads(w, g, c):
    """grad in (W, G) of <c, P_W(G)> for GRAD_CASES; jacfwd in W and grad in G alone (N = 3)."""
    weights = jnp.asarray(np.asarray(c))

    def loss(w, g, N, method):
        return jnp.sum(weights * opx.precondition_matrix(w, g, N, method=method))

    grads = {(m, N): jax.grad(loss, argnums=(0, 1))(w, g, N, m) for m, N in GRAD_CASES}
    alone = jax.jacfwd(loss)(w, g, 3, "svd"), jax.grad(loss, argnums=1)(w, g, 3, "svd")
    return grads, alone


def test_grad_through_precondition_matrix_at_the_identity(x64):
    """The issue's case: grad of a loss of P_W(G) in W and G at W = I, every method.

    The loss is linear in P, so the gradient is the transposed tangent alone (newton's value,
    approximate by design, does not enter it).
    """
    rng = np.random.default_rng(4)
    w, g = np.eye(4), rng.normal(size=(4, 4))
    c = rng.normal(size=(4, 4))
    grads, alone = _identity_grads(w, g, tuple(map(tuple, c)))
    for both, one in zip(grads["svd", 3], alone, strict=True):  # zero tangent in G, in W
        np.testing.assert_allclose(one, both, rtol=1e-12, atol=1e-12)

    def reference_loss(w, g, N):
        return np.sum(c * reference_precondition(w, g, N))

    errors = {}
    for N in sorted({N for _, N in GRAD_CASES}):
        fd_w, fd_g = np.zeros_like(w), np.zeros_like(w)
        for index in np.ndindex(w.shape):
            e = np.zeros_like(w)
            e[index] = 1.0
            fd_w[index] = _derivative(lambda t, e=e, N=N: reference_loss(w + t * e, g, N))
            fd_g[index] = _derivative(lambda t, e=e, N=N: reference_loss(w, g + t * e, N))
        for method, depth in GRAD_CASES:
            if depth == N:
                grad_w, grad_g = grads[method, N]
                error = max(_relative_error(grad_w, fd_w), _relative_error(grad_g, fd_g))
                errors[method, N] = error
    bad = {k: v for k, v in errors.items() if v > FD_TOL}
    assert not bad, bad
    print("identity grads, relative error against finite differences:", errors)


@jax.jit
def _float32_derivatives(square, tall, dsquare, dtall):
    """JVPs (every depth on the square batch) and grads of sum(sin(P)) (every method)."""

    def tangent(w, dw, N):
        return jax.jvp(lambda w, g: opx.precondition_matrix(w, g, N), (w, dw), (dw, dw))[1]

    def grad(w, dw, method):
        def loss(w):
            return jnp.sum(jnp.sin(opx.precondition_matrix(w, dw, 3, method=method)))

        return jax.grad(loss)(w)

    out = [tangent(square, dsquare, N) for N in (2, 3, 4, 7)] + [tangent(tall, dtall, 3)]
    return out + [grad(square, dsquare, method) for method in METHODS]


def test_float32_tangent_and_grad_are_finite():
    """Identity, zero and rank-deficient W (square and tall) in float32."""
    rng = np.random.default_rng(0)
    square = np.stack(
        [
            np.eye(4),
            np.zeros((4, 4)),
            np.outer(np.arange(1.0, 5.0), np.ones(4)),
            _with_singular_values(rng, 4, 4, [2.0, 2.0]),
        ]
    )
    tall = np.stack([np.zeros((6, 3)), np.outer(np.arange(1.0, 7.0), np.ones(3))])
    args = [jnp.asarray(x, jnp.float32) for x in (square, tall)]
    args += [jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in args]
    for result in _float32_derivatives(*args):
        assert result.dtype == jnp.float32
        assert np.all(np.isfinite(result))


def test_low_precision_tangent_keeps_the_dtype():
    w = jnp.eye(3, dtype=jnp.bfloat16)
    _, tangent = jax.jvp(lambda w: opx.precondition_matrix(w, w, 3), (w,), (w,))
    assert tangent.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(tangent, np.float32), 4 * np.eye(3) + 3 * np.eye(3))


def test_bad_shapes_name_the_argument():
    u, s, v = jnp.eye(4, 3), jnp.ones(3), jnp.eye(3)
    with pytest.raises(ValueError, match="dw must have shape"):
        spectral_jvp.precondition_tangent(u, s, v, jnp.ones((4, 3)), jnp.ones((3, 4)), 2)
    with pytest.raises(ValueError, match="tall basis"):
        spectral_jvp.precondition_tangent(u.T, s, v, u.T, u.T, 2)
    with pytest.raises(ValueError, match="same shape"):
        opx.precondition_matrix(jnp.ones((2, 3)), jnp.ones((3, 2)), 2)
