"""The preconditioner against an independent float64 reference, and its properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import overparam_optax as opx
from overparam_optax import methods
from overparam_optax.methods import newton, tracked
from overparam_optax.testing import MATRIX_CASES as CASES
from overparam_optax.testing import make_matrix, reference_precondition
from overparam_optax.testing import with_singular_values as _with_singular_values

DEPTHS = range(1, 9)



def _factors(w, N, method):
    """The factors a decomposing method computes for tall w (float32 products)."""
    return methods.resolve(method).factors(w, N, jax.lax.Precision.HIGHEST)


def _apply(factors, g, N, method):
    return methods.resolve(method).apply(factors, g, N, jax.lax.Precision.HIGHEST)


def _max_relative_error(actual, expected) -> float:
    scale = max(np.abs(expected).max(), 1e-30)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / scale)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("N", DEPTHS)
def test_matches_reference_float32(case, N):
    rng = np.random.default_rng(100 * CASES.index(case) + N)
    w = make_matrix(case, rng)
    g = rng.normal(size=w.shape)
    expected = reference_precondition(w, g, N)
    actual = opx.precondition_matrix(jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32), N)
    assert actual.dtype == jnp.float32
    assert np.all(np.isfinite(actual))
    if case == "zero" and N >= 2:
        np.testing.assert_array_equal(actual, 0.0)
    else:
        # float32 inputs are themselves rounded by ~6e-8; the SVD adds a few ulps of s_max.
        assert _max_relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("N", DEPTHS)
def test_matches_reference_float64(case, N, x64):
    rng = np.random.default_rng(10_000 + 100 * CASES.index(case) + N)
    w = make_matrix(case, rng)
    g = rng.normal(size=w.shape)
    expected = reference_precondition(w, g, N)
    actual = opx.precondition_matrix(jnp.asarray(w), jnp.asarray(g), N)
    assert actual.dtype == jnp.float64
    if case == "zero" and N >= 2:
        np.testing.assert_array_equal(actual, 0.0)
    else:
        assert _max_relative_error(actual, expected) < 1e-10


@pytest.mark.parametrize("N", [2, 3, 8])
def test_vector_closed_form_matches_matrix_formula(N, x64):
    rng = np.random.default_rng(N)
    w = rng.normal(size=(3, 11))  # a batch of three single-output layers
    g = rng.normal(size=(3, 11))
    actual = opx.precondition_vector(jnp.asarray(w), jnp.asarray(g), N)
    for row in range(3):
        expected = reference_precondition(w[row][None, :], g[row][None, :], N)[0]
        assert _max_relative_error(actual[row], expected) < 1e-12
        as_column = opx.precondition_matrix(w[row][:, None], g[row][:, None], N)[:, 0]
        assert _max_relative_error(as_column, expected) < 1e-10


def test_vector_closed_form_zero_weights_is_zero_and_finite():
    out = opx.precondition_vector(jnp.zeros(5), jnp.ones(5), 3)
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)])
@pytest.mark.parametrize("N", [2, 3, 5])
def test_transpose_invariance(shape, N):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=shape), jnp.float32)
    direct = opx.precondition_matrix(w, g, N)
    transposed = opx.precondition_matrix(w.T, g.T, N).T
    np.testing.assert_allclose(transposed, direct, rtol=0, atol=1e-5 * np.abs(direct).max())


@pytest.mark.parametrize("c", [-3.0, 0.5, 7.0])
@pytest.mark.parametrize("N", [1, 2, 4])
def test_homogeneity(c, N, x64):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(6, 4)))
    g = jnp.asarray(rng.normal(size=(6, 4)))
    scaled = opx.precondition_matrix(c * w, g, N)
    expected = abs(c) ** (2 - 2 / N) * opx.precondition_matrix(w, g, N)
    np.testing.assert_allclose(scaled, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["square", "tall", "rank_deficient_wide", "zero"])
@pytest.mark.parametrize("N", [2, 3, 6])
def test_preconditioner_is_positive_semidefinite(case, N):
    rng = np.random.default_rng(2)
    w = make_matrix(case, rng)
    for _ in range(5):
        g = rng.normal(size=w.shape)
        p = opx.precondition_matrix(jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32), N)
        inner = float(np.sum(g * np.asarray(p, np.float64)))
        assert inner >= -1e-5 * np.linalg.norm(g) * np.linalg.norm(p)
    if case != "zero":
        # A descent direction: strictly positive for a full-rank W.
        assert inner > 0


def test_depth_kernel_is_a_geometric_series(x64):
    s = jnp.asarray([3.0, 1.2, 0.4])
    t = jnp.asarray([2.0, 0.0, 0.7, 1.2])
    for N in [1, 2, 5]:
        kernel = np.asarray(opx.depth_kernel(s, t, N))
        for a, sa in enumerate(np.asarray(s)):
            for b, tb in enumerate(np.asarray(t)):
                x, y = sa ** (2 / N), tb ** (2 / N)
                expected = N * x ** (N - 1) if x == y else (x**N - y**N) / (x - y)
                np.testing.assert_allclose(kernel[a, b], expected, rtol=1e-12)


def test_depth_one_is_identity():
    rng = np.random.default_rng(3)
    g = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    np.testing.assert_array_equal(opx.precondition_matrix(w, g, 1), g)
    np.testing.assert_array_equal(opx.precondition_vector(w[0], g[0], 1), g[0])


def test_batched_equals_slice_by_slice():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    batched = opx.precondition_matrix(w, g, 3)
    for i in range(3):
        np.testing.assert_allclose(batched[i], opx.precondition_matrix(w[i], g[i], 3), atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_is_upcast_and_cast_back(dtype):
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(size=(6, 4)), dtype)
    g = jnp.asarray(rng.normal(size=(6, 4)), dtype)
    out = opx.precondition_matrix(w, g, 3)
    assert out.dtype == dtype
    in_float32 = opx.precondition_matrix(w.astype(jnp.float32), g.astype(jnp.float32), 3)
    np.testing.assert_array_equal(out, in_float32.astype(dtype))


def test_non_finite_gradient_does_not_raise():
    w = jnp.eye(3)
    g = jnp.full((3, 3), jnp.nan)
    out = opx.precondition_matrix(w, g, 3)
    assert out.shape == (3, 3)
    assert not np.all(np.isfinite(out))  # the NaN is reported, not hidden


def test_jit_and_static_depth():
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    jitted = jax.jit(opx.precondition_matrix, static_argnums=2)
    np.testing.assert_allclose(jitted(w, g, 4), opx.precondition_matrix(w, g, 4), atol=1e-6)


def test_docstring_example_values():
    out = opx.precondition_matrix(jnp.diag(jnp.array([4.0, 1.0])), jnp.ones((2, 2)), N=2)
    np.testing.assert_allclose(out, [[8.0, 5.0], [5.0, 2.0]], rtol=1e-6)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "3", None])
def test_invalid_depth_raises(bad):
    with pytest.raises(ValueError, match="N"):
        opx.precondition_matrix(jnp.eye(2), jnp.eye(2), bad)


def test_numpy_integer_depth_is_accepted():
    out = opx.precondition_matrix(jnp.eye(2), jnp.eye(2), np.int64(2))
    np.testing.assert_allclose(out, 2 * np.eye(2))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        opx.precondition_matrix(jnp.eye(2), jnp.ones((2, 3)), 2)


# --------------------------------------------------------------------------------------
# Scale and depth robustness of every method (issue 11). P is homogeneous,
# P_{cW}(G) = |c|^{2-2/N} P_W(G); every path normalizes W by a scalar first.
# --------------------------------------------------------------------------------------

METHODS = ["svd", "eigh", "newton"]
SCALE_EXPONENTS = [-30, -20, -10, 0, 10, 20, 30]


def _rel_fro(actual, expected) -> float:
    return float(
        np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected)
    )


def _scaled_case(k: int, N: int):
    """(c, gamma, representable): W -> c W, G -> gamma G with P_{cW}(gamma G) ~ P_W(G)."""
    power = (2 - 2 / N) * k  # log10 of c^{2-2/N}
    representable = abs(power) <= 36  # gamma = 10^-power is a normal float32
    return 10.0**k, (10.0 ** (-power) if representable else 1.0), representable


@pytest.mark.parametrize("N", [2, 3, 8])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_scale_robust(method, N):
    rng = np.random.default_rng(20 + N)
    w0 = _with_singular_values(rng, 8, 5, np.logspace(0, -2, 5))
    g0 = rng.normal(size=(8, 5))
    expected = reference_precondition(w0, g0, N)
    tolerance = 1e-3 if method == "newton" else 1e-4
    for k in SCALE_EXPONENTS:
        c, gamma, representable = _scaled_case(k, N)
        for w, g, exp in [(c * w0, gamma * g0, expected), (c * w0.T, gamma * g0.T, expected.T)]:
            out = opx.precondition_matrix(
                jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32), N, method=method
            )
            assert not np.any(np.isnan(out)), (k, N)
            if representable:
                assert np.all(np.isfinite(out)), (k, N)
                assert _rel_fro(out, exp) < tolerance, (k, N, _rel_fro(out, exp))
            elif k > 0:  # |P| ~ 10^(52 or more): overflows, as the true value would
                assert np.all(np.isinf(out) | (np.abs(out) > 1e37))
            else:  # |P| ~ 10^-52: underflows to (signed) zero
                assert np.all(np.abs(out) < 1e-37)


@pytest.mark.parametrize("N", [2, 3, 8])
def test_tracked_basis_is_scale_robust(N):
    """The default's path, a basis computed afresh and then carried over, at every scale."""
    rng = np.random.default_rng(20 + N)
    w0 = _with_singular_values(rng, 8, 5, np.logspace(0, -2, 5))
    g0 = rng.normal(size=(8, 5))
    expected = reference_precondition(w0, g0, N)
    for k in SCALE_EXPONENTS:
        c, gamma, representable = _scaled_case(k, N)
        w, g = jnp.asarray(c * w0, jnp.float32), jnp.asarray(gamma * g0, jnp.float32)
        basis = tracked.TrackedBasis(jnp.zeros((5, 5), jnp.float32))
        for first in (True, False):
            out, basis, fresh = tracked.precondition(w, g, basis, N)
            assert bool(fresh) == first, (k, N)  # the carried basis holds at every scale
            assert np.all(np.isfinite(basis.v)), (k, N)
            assert not np.any(np.isnan(out)), (k, N)
            if representable:
                assert np.all(np.isfinite(out)), (k, N)
                error = _rel_fro(out, expected)
                assert error < 1e-5, (k, N, error)  # measured <= 2.2e-6 (G normalized too)
            elif k > 0:  # overflows, as the true value would
                assert np.all(np.isinf(out) | (np.abs(out) > 1e37))
            else:  # underflows to (signed) zero
                assert np.all(np.abs(out) < 1e-37)


@pytest.mark.parametrize("method", METHODS)
def test_scale_is_per_matrix_in_a_batch(method):
    rng = np.random.default_rng(30)
    w0 = np.stack([_with_singular_values(rng, 6, 4, [1.0, 0.5, 0.2, 0.05]) for _ in range(3)])
    g0 = rng.normal(size=w0.shape)
    scales = np.array([1e-20, 1.0, 1e20])[:, None, None]
    out = opx.precondition_matrix(
        jnp.asarray(scales * w0, jnp.float32),
        jnp.asarray(g0 / scales, jnp.float32),  # N = 2: P_{cW}(G/c) = P_W(G)
        2,
        method=method,
    )
    bound = {"svd": 2e-6, "eigh": 2e-6, "newton": 5e-5}[method]  # measured 4e-7, 7e-7, 1.5e-5
    for i in range(3):
        assert _rel_fro(out[i], reference_precondition(w0[i], g0[i], 2)) < bound


@pytest.mark.parametrize("method", METHODS)
def test_cached_factors_keep_the_scale(method):
    """Factors of a W of scale 1e15, applied to a later gradient, give P_W of that W."""
    rng = np.random.default_rng(31)
    w0 = _with_singular_values(rng, 9, 6, np.logspace(0, -3, 6))
    c = 1e15
    factors = _factors(jnp.asarray(c * w0, jnp.float32), 3, method)
    for _ in range(2):
        g0 = rng.normal(size=(9, 6))
        out = _apply(factors, jnp.asarray(g0 / c, jnp.float32), 3, method)
        # P_{cW}(G / c) = c^{4/3 - 1} P_W(G) = c^{1/3} P_W(G)
        expected = c ** (1 / 3) * reference_precondition(w0, g0, 3)
        # measured 1.4e-6, 1.6e-5 (eigh: the Gram matrix of a condition-1e3 W), 3.9e-5
        assert _rel_fro(out, expected) < {"svd": 5e-6, "eigh": 5e-5, "newton": 1e-4}[method]


@pytest.mark.parametrize("k", SCALE_EXPONENTS)
@pytest.mark.parametrize("N", [2, 8])
def test_vector_closed_form_is_scale_robust(k, N):
    rng = np.random.default_rng(32)
    w0, g0 = rng.normal(size=(2, 9)), rng.normal(size=(2, 9))
    c, gamma, representable = _scaled_case(k, N)
    out = opx.precondition_vector(
        jnp.asarray(c * w0, jnp.float32), jnp.asarray(gamma * g0, jnp.float32), N
    )
    assert not np.any(np.isnan(out))
    if representable:
        for row in range(2):
            expected = reference_precondition(w0[row][None], g0[row][None], N)[0]
            assert _rel_fro(out[row], expected) < 1e-5


def _deep_case(rng):
    """A 7 x 5 matrix with singular values over two decades and a rank-deficient 6 x 5 one."""
    return [
        _with_singular_values(rng, 7, 5, np.logspace(0, -2, 5)),
        _with_singular_values(rng, 6, 5, [1.0, 1.0, 0.3, 0.0, 0.0]),
    ]


@pytest.mark.parametrize("N", [16, 100, 1000])
@pytest.mark.parametrize("method", ["svd", "eigh"])
def test_exact_methods_are_accurate_at_every_depth(method, N):
    rng = np.random.default_rng(40)
    for w in _deep_case(rng):
        g = rng.normal(size=w.shape)
        factors = _factors(jnp.asarray(w, jnp.float32), N, method)
        out = _apply(factors, jnp.asarray(g, jnp.float32), N, method)
        assert np.all(np.isfinite(out))
        assert _rel_fro(out, reference_precondition(w, g, N)) < 1e-4


@pytest.mark.parametrize("N", [9, 32, 128])
def test_newton_is_accurate_up_to_its_depth_limit(N):
    rng = np.random.default_rng(41)
    for w in [_with_singular_values(rng, 9, 6, np.logspace(0, -3, 6)), *_deep_case(rng)]:
        g = rng.normal(size=w.shape)
        factors = _factors(jnp.asarray(w, jnp.float32), N, "newton")
        out = _apply(factors, jnp.asarray(g, jnp.float32), N, "newton")
        assert _rel_fro(out, reference_precondition(w, g, N)) < 1e-3


def test_newton_refuses_depths_beyond_its_limit():
    limit = newton.NEWTON_MAX_DEPTH
    for N in (limit + 1, 1000):
        with pytest.raises(ValueError, match=f"N <= {limit}.*eigh"):
            opx.precondition_matrix(jnp.eye(3), jnp.eye(3), N, method="newton")
        with pytest.raises(ValueError, match=f"N <= {limit}"):
            newton.Newton().check_depth(N)
        with pytest.raises(ValueError, match=f"N <= {limit}"):
            opx.overparam_precondition(N, method="newton")
    newton.Newton().check_depth(limit)  # the limit itself is supported
    opx.overparam_precondition(limit, method="newton")


def test_vector_closed_form_at_depth_1000():
    rng = np.random.default_rng(42)
    w, g = rng.normal(size=9), rng.normal(size=9)
    out = opx.precondition_vector(jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32), 1000)
    assert _rel_fro(out, reference_precondition(w[None], g[None], 1000)[0]) < 1e-5


def test_depth_kernel_is_exact_for_deep_N(x64):
    s = jnp.asarray([3.0, 1.0, 1.0 - 1e-9, 0.2, 0.0])
    for N in [9, 1000]:
        kernel = np.asarray(opx.depth_kernel(s, s, N))
        sv = np.asarray(s)
        direct = sum(
            np.outer(sv ** (2 * (j - 1) / N), sv ** (2 * (N - j) / N)) for j in range(1, N + 1)
        )
        np.fill_diagonal(direct[-1:, -1:], 0.0)  # k(0, 0) = 0: 0^0 = 1 only for identities
        np.testing.assert_allclose(kernel, direct, rtol=1e-12, atol=0)
