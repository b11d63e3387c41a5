"""The preconditioner against an independent float64 reference, and its properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import overparam_optax as opx
from overparam_optax.experiments.reference import MATRIX_CASES as CASES
from overparam_optax.experiments.reference import make_matrix, reference_precondition

DEPTHS = range(1, 9)


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
