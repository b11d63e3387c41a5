"""Unusual inputs: right answers or clear errors (docs/robustness.md, the rows that name this
file). Each test states the input, what was wrong before, and the measured error."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import overparam_optax as opx
from overparam_optax.methods import tracked
from overparam_optax.testing import reference_precondition

METHODS = ("tracked", "svd", "eigh", "newton")


def _rel(a, b):
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _update(method, N, w, g, steps=1, **options):
    """The transform's update of one matrix leaf after ``steps`` updates at the same W."""
    tx = opx.overparam_precondition(N, method=method, **options)
    params = {"w": jnp.asarray(w, jnp.float32)}
    state = tx.init(params)
    for _ in range(steps):
        out, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
    return out["w"], state


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(16, 5), (5, 16), (40, 6)])
def test_reverse_mode_through_very_tall_matrices(method, shape):
    """jax.grad through the update of a matrix more than 3x taller than wide (either way):
    it used to fail in JAX's transpose (an AssertionError) for every method. Against
    float64 central differences of the float64 reference; measured <= 3e-4."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=shape)
    direction = rng.normal(size=shape)

    def loss(w):
        out, _ = _update(method, 3, w, jnp.cos(w))
        return jnp.sum(out * direction)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(w0, jnp.float32)), np.float64)

    def reference_loss(w):
        return np.sum(reference_precondition(w, np.cos(w), 3) * direction)

    probe = rng.normal(size=shape)
    h = 1e-5
    fd = (reference_loss(w0 + h * probe) - reference_loss(w0 - h * probe)) / (2 * h)
    assert abs(np.sum(grad * probe) - fd) / abs(fd) < 1e-3, (np.sum(grad * probe), fd)


def _loss_after_two_updates(w, method):
    tx = opx.overparam_precondition(3, method=method)
    params = {"w": w}
    state = tx.init(params)
    for _ in range(2):
        out, state = tx.update({"w": jnp.cos(params["w"])}, state, params)
        params = {"w": params["w"] - 0.1 * out["w"]}
    return jnp.sum(params["w"] ** 2)


def test_second_derivatives_through_the_default_are_refused():
    """They were silently wrong (64% from svd's Hessian: the tracked basis was held fixed);
    now a clear error. First derivatives agree with svd's (measured 1e-7)."""
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 2))
    with pytest.raises(ValueError, match="Second derivatives.*method='svd'"):
        jax.hessian(_loss_after_two_updates)(w, "tracked")
    with pytest.raises(ValueError, match="Second derivatives"):  # a Hessian-vector product
        jax.jvp(lambda x: jax.grad(_loss_after_two_updates)(x, "tracked"), (w,), (w,))
    first = jax.grad(_loss_after_two_updates)(w, "tracked")
    exact = jax.grad(_loss_after_two_updates)(w, "svd")
    assert _rel(first, exact) < 1e-5
    assert jax.hessian(_loss_after_two_updates)(w, "svd").shape == (3, 2, 3, 2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "w_scale, g_scale, N",
    [(1e30, 1e-30, 3), (1e-30, 1e25, 3), (1e20, 1e-10, 50), (1e-20, 1e10, 50)],
)
def test_extreme_scales_are_exact_where_the_result_is_representable(method, w_scale, g_scale, N):
    """The default gave inf, zeros or 81% error on these (its G was normalized and the
    scale applied after); measured <= 3.0e-6 for tracked, svd and eigh, 5e-5 newton."""
    if method == "newton" and N > 8:
        pytest.skip("newton's schedule for N > 8 is measured elsewhere")
    rng = np.random.default_rng(1)
    w0, g0 = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    want = reference_precondition(w0 * w_scale, g0 * g_scale, N)
    out, _ = _update(method, N, w0 * w_scale, g0 * g_scale, steps=2)
    assert np.all(np.isfinite(out))
    assert _rel(out, want) < (2e-4 if method == "newton" else 1e-5)


@pytest.mark.parametrize("at_zero", [True, False])
@pytest.mark.parametrize("N", [2, 3])
def test_zero_single_output_kernel_has_a_finite_derivative(at_zero, N):
    """jax.grad through the update of a zero (5, 1) kernel (a zero-initialized Dense(1)
    head) was NaN; it is 0 (the derivative for N >= 3, the mean of the one-sided ones for
    N = 2; with the plain gradient at zero the update does not depend on w)."""
    tx = opx.overparam_precondition(N, plain_gradient_at_zero=at_zero)

    def loss(w):
        out, _ = tx.update({"k": jnp.ones((5, 1))}, tx.init({"k": w}), {"k": w})
        return jnp.sum(out["k"] ** 2)

    np.testing.assert_array_equal(jax.grad(loss)(jnp.zeros((5, 1))), 0)
    jac = jax.jacfwd(lambda w: opx.precondition_vector(w, jnp.ones(4), N))(jnp.zeros(4))
    np.testing.assert_array_equal(jac, 0)


@pytest.mark.parametrize("method", METHODS)
def test_subnormal_weights_are_read_as_they_are(method):
    """Weights near 1e-40 in float32 were read as zero (XLA's denormals-are-zero on CPU):
    the plain gradient came back, 2.4e25 against a true 5e-15. Measured <= 4.0e-6."""
    rng = np.random.default_rng(2)
    w = (rng.normal(size=(5, 3)) * 1e-40).astype(np.float32)
    g = rng.normal(size=(5, 3)) * 1e25
    want = reference_precondition(w.astype(np.float64), g, 2)
    out, _ = _update(method, 2, w, g)
    assert _rel(out, want) < (1e-3 if method == "newton" else 1e-5)
    if method == "svd":
        direct = opx.precondition_matrix(jnp.asarray(w), jnp.asarray(g, jnp.float32), 2)
        assert _rel(direct, want) < 1e-5
        vector = opx.precondition_vector(jnp.asarray(w[:, 0]), jnp.asarray(g[:, 0]), 2)
        column = reference_precondition(w[:, :1].astype(np.float64), g[:, :1], 2)[:, 0]
        assert _rel(vector, column) < 1e-5


@pytest.mark.parametrize(
    "dtype, found", [(jnp.int32, "int32"), (jnp.complex64, "complex64"), (jnp.bool_, "bool")]
)
def test_gradients_of_the_wrong_kind_are_refused(dtype, found):
    """Integer gradients were truncated to int32, complex ones lost their imaginary part."""
    tx = opx.overparam_precondition(2)
    params = {"dense": {"kernel": jnp.eye(3), "bias": jnp.ones(3)}}
    grads = {"dense": {"kernel": jnp.ones((3, 3), dtype), "bias": jnp.ones(3)}}
    with pytest.raises(ValueError, match=rf"gradient\) of parameter \['dense'\]\['kernel'\] "
                                         rf"has dtype {found}"):  # fmt: skip
        tx.update(grads, tx.init(params), params)


def test_a_basis_with_unit_but_repeated_columns_is_recomputed():
    """Only the column norms used to be checked: a basis with a repeated column was used
    (27% error, no fresh decomposition). Measured 4e-7 after the recomputation."""
    rng = np.random.default_rng(3)
    w, g = rng.normal(size=(8, 4)), rng.normal(size=(8, 4))
    v = np.eye(4)
    v[:, 1] = v[:, 0]
    out, _, fresh = tracked.precondition(
        jnp.asarray(w, jnp.float32),
        jnp.asarray(g, jnp.float32),
        tracked.TrackedBasis(jnp.asarray(v, jnp.float32)),
        3,
    )
    assert bool(fresh)
    assert _rel(out, reference_precondition(w, g, 3)) < 2e-6


def test_a_nan_singular_value_gives_nan_in_the_kernel():
    """It gave 0."""
    kernel = np.asarray(opx.depth_kernel(jnp.array([math.nan, 1.0]), jnp.array([1.0, 0.0]), 3))
    assert np.all(np.isnan(kernel[0])) and np.all(np.isfinite(kernel[1]))


def test_explicit_mesh_params_without_a_mesh_context():
    """Params placed with a NamedSharding of an Explicit-axes mesh (jax.make_mesh's default),
    jitted without jax.set_mesh: it failed inside the gather ("Using PartitionSpec when you
    are not under a mesh context"), where optax.adam works."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    w = jnp.asarray(np.random.default_rng(4).normal(size=(6, 4)), jnp.float32)
    params = {"w": jax.device_put(w, sharding)}
    tx = opx.overparam_precondition(2)
    out, _ = jax.jit(tx.update)(params, tx.init(params), params)
    assert out["w"].sharding.is_equivalent_to(sharding, 2)
    want = reference_precondition(np.asarray(w, np.float64), np.asarray(w), 2)
    assert _rel(out["w"], want) < 1e-5
    adam = optax.adam(0.1)
    jax.jit(adam.update)(params, adam.init(params), params)  # the baseline works too


def test_derivatives_at_depths_past_int32_name_the_limit():
    """jax.grad at N >= 2**31 raised a raw OverflowError from a loop bound; the value works."""
    w = jnp.eye(3) + 0.1
    value = opx.precondition_matrix(w, jnp.ones((3, 3)), 2**31 + 5)
    assert np.all(np.isfinite(value))
    with pytest.raises(ValueError, match="N <= 2\\*\\*31"):
        jax.grad(lambda x: jnp.sum(opx.precondition_matrix(x, jnp.ones((3, 3)), 2**31 + 5)))(w)


def test_empty_matrices_and_zero_features():
    """precondition_matrix on a (0, 5) matrix said "zero-size array to reduction operation
    max"; FactorizedDense(features=0) did not name ``features``."""
    out = opx.precondition_matrix(jnp.ones((0, 5)), jnp.ones((0, 5)), 3)
    assert out.shape == (0, 5)
    with pytest.raises(ValueError, match="FactorizedDense: features must be a positive int"):
        opx.FactorizedDense(features=0, depth=2).init(jax.random.PRNGKey(0), jnp.ones((1, 3)))


# The adversarial pass's findings (docs/robustness.md).


def test_second_derivatives_in_the_gradient_through_the_default_are_refused():
    """The Hessian of <P(G), G> in G alone was half of P + P^T (the value held fixed)."""
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    tx = opx.overparam_precondition(3)
    state = tx.init({"w": w})

    def inner(g):
        return jnp.sum(tx.update({"w": g}, state, {"w": w})[0]["w"] * g)

    with pytest.raises(ValueError, match="Second derivatives"):
        jax.hessian(inner)(jnp.ones((4, 3)))


@pytest.mark.parametrize("N", [2, 3])
def test_vector_closed_form_derivative_at_tiny_weights(N):
    """grad of precondition_vector at |w| ~ 1e-20 was NaN (1 / alpha^2 overflowed).
    Against float64 central differences; measured 1.1e-7 (N = 2) and 1.8e-6 (N = 3)."""
    w0 = np.array([1e-20, 2e-20, 0.0])
    g = np.array([1.0, 2.0, 3.0])
    grad = jax.grad(lambda w: jnp.sum(opx.precondition_vector(w, jnp.asarray(g), N)))(
        jnp.asarray(w0, jnp.float32)
    )
    direction = np.array([0.3, -0.2, 0.5])
    h = 1e-24

    def total(w):
        return reference_precondition(w[:, None], g[:, None], N).sum()

    fd = (total(w0 + h * direction) - total(w0 - h * direction)) / (2 * h)
    assert abs(float(np.dot(np.asarray(grad, np.float64), direction)) - fd) <= 6e-6 * abs(fd)


@pytest.mark.parametrize("method", ["tracked", "svd"])
@pytest.mark.parametrize("scale", [1e-20, 1e-30])
def test_derivatives_at_tiny_weight_scales(method, scale):
    """jax.grad through the update at W ~ 1e-20 was 0 for the default (its column norms
    underflowed), and at 1e-30 for every method (reverse mode's intermediates underflowed).
    Against float64 central differences; measured up to 1.4e-6 (at 1e-30)."""
    rng = np.random.default_rng(5)
    w0 = scale * rng.normal(size=(4, 3))
    ones = np.ones((4, 3))
    tx = opx.overparam_precondition(3, method=method)
    state = tx.init({"w": jnp.asarray(w0, jnp.float32)})

    def loss(w):
        return jnp.sum(tx.update({"w": jnp.asarray(ones, jnp.float32)}, state, {"w": w})[0]["w"])

    grad = np.asarray(jax.grad(loss)(jnp.asarray(w0, jnp.float32)), np.float64)
    direction = rng.normal(size=(4, 3))
    h = scale * 1e-4

    def total(w):
        return reference_precondition(w, ones, 3).sum()

    fd = (total(w0 + h * direction) - total(w0 - h * direction)) / (2 * h)
    assert abs(np.sum(grad * direction) - fd) <= 5e-6 * abs(fd), (np.sum(grad * direction), fd)


def test_a_gap_in_the_kernel_numbering_is_an_error():
    """collapse dropped kernel_2 of {kernel_0, kernel_2} silently."""
    layer = {"fc": {"kernel_0": jnp.ones((3, 3)), "kernel_2": jnp.ones((3, 3))}}
    with pytest.raises(ValueError, match=r"\['fc'\].*kernel_1 is missing"):
        opx.collapse(layer)
    with pytest.raises(ValueError, match="kernel_1 is missing"):
        opx.balancedness(layer)


def test_option_values_a_user_tries():
    """weight_decay=None raised a raw TypeError; an injected block_size got no static_args
    hint; a numpy bool for plain_gradient_at_zero was refused."""
    with pytest.raises(ValueError, match="weight_decay must be a float"):
        opx.overparam_sgd(0.1, N=3, weight_decay=None)
    injected = optax.inject_hyperparams(opx.overparam_precondition, static_args=("N",))(
        N=3, block_size=2
    )
    with pytest.raises(ValueError, match=r"static_args=\('block_size',\)"):
        injected.init({"w": jnp.eye(3)})
    tx = opx.overparam_precondition(3, plain_gradient_at_zero=np.bool_(False))
    params = {"w": jnp.zeros((3, 3))}
    out, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_array_equal(out["w"], 0)  # the strict rule: P_0(G) = 0
