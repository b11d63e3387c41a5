"""Tests of overparam_optax.factorized: the explicit depth-N baselines.

Float64 tests use the `x64` fixture of conftest.py (a context manager around the test), so
64-bit mode never leaks into other test files.
"""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overparam_optax import factorized as fz


def _random(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


def _low_rank(seed, rows, cols, rank):
    return _random(seed, (rows, rank)) @ _random(seed + 1, (rank, cols))


# --------------------------------------------------------------------------------------
# Balanced initialization.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, cols, rank, depth, hidden",
    [
        (7, 5, 5, 3, None),  # tall, full rank, default width min(7, 5) = 5
        (3, 9, 3, 2, None),  # wide
        (6, 6, 6, 4, 9),  # square, wider hidden layers (random frames)
        (8, 6, 2, 3, 2),  # rank-deficient, hidden = rank (narrower than min(in, out))
        (8, 6, 2, 3, (4, 11)),  # rank-deficient, unequal widths
        (10, 1, 1, 3, 32),  # single output, width 32
    ],
)
def test_balanced_factors_multiply_out_and_are_balanced(x64, rows, cols, rank, depth, hidden):
    matrix = _low_rank(0, rows, cols, rank)
    # Jitted: one compiled program instead of many small eager ones (the test's cost).
    split = jax.jit(lambda m: fz.balanced_factors(m, depth, hidden, key=jax.random.PRNGKey(3)))
    factors = split(matrix)
    widths = fz.hidden_widths(hidden, depth, rows, cols)
    assert [f.shape for f in factors] == list(zip((rows, *widths), (*widths, cols), strict=True))
    assert float(jnp.max(fz.pair_balancedness(factors))) < 1e-12
    fs, matrix = [np.asarray(f) for f in factors], np.asarray(matrix)  # checks on the host
    scale = float(np.linalg.norm(matrix))
    product = fs[0]
    for f in fs[1:]:
        product = product @ f
    np.testing.assert_allclose(product, matrix, atol=1e-12 * scale)
    # Flax orientation: K_i^T K_i == K_{i+1} K_{i+1}^T.
    for a, b in zip(fs[:-1], fs[1:], strict=True):
        np.testing.assert_allclose(a.T @ a, b @ b.T, atol=1e-12 * scale ** (2 / depth))
    # Every factor carries the same singular values, s^(1/N) of the end-to-end ones.
    s = np.linalg.svd(matrix, compute_uv=False)[:rank]
    for f in fs:
        sf = np.linalg.svd(f, compute_uv=False)[:rank]
        np.testing.assert_allclose(sf, s ** (1 / depth), rtol=1e-10)


def test_balanced_factors_without_key_use_identity_frames(x64):
    matrix = _random(1, (4, 3))
    factors = fz.balanced_factors(matrix, 3, hidden=5)
    np.testing.assert_allclose(fz.end_to_end(factors), matrix, atol=1e-13)
    # Identity frames: the hidden layers only use their first min(in, out) = 3 units.
    np.testing.assert_array_equal(np.asarray(factors[0])[:, 3:], 0.0)
    np.testing.assert_array_equal(np.asarray(factors[1])[3:, :], 0.0)
    assert fz.balanced_factors(matrix, 1) == [matrix]


def test_balanced_factors_rejects_a_width_below_the_rank(x64):
    with pytest.raises(ValueError, match="hidden >= rank = 3"):
        fz.balanced_factors(_low_rank(2, 6, 5, 3), 3, hidden=2)
    with pytest.raises(ValueError, match="2 hidden widths"):
        fz.hidden_widths((3,), 3, 4, 4)
    with pytest.raises(ValueError, match="depth"):
        fz.balanced_factors(jnp.eye(2), 0)


def test_factor_kernels_of_a_conv_kernel(x64):
    kernel = _random(4, (3, 3, 2, 5))
    factors = fz.factor_kernels(kernel, 3, key=jax.random.PRNGKey(0))
    assert factors[0].shape == (3, 3, 2, 5)  # default width min(3*3*2, 5) = 5
    assert [f.shape for f in factors[1:]] == [(5, 5), (5, 5)]
    np.testing.assert_allclose(fz.end_to_end(factors), kernel, atol=1e-12)
    assert float(jnp.max(fz.pair_balancedness(factors))) < 1e-12


# --------------------------------------------------------------------------------------
# factorize / collapse / balancedness on parameter trees.
# --------------------------------------------------------------------------------------


def _tree():
    return {
        "params": {
            "conv": {"kernel": _random(5, (3, 3, 2, 4)), "bias": _random(6, (4,))},
            "block": {"dense": {"kernel": _random(7, (6, 3)), "bias": _random(8, (3,))}},
            "scale": _random(9, (3,)),
            "embed": {"embedding": _random(10, (5, 6))},
        }
    }


def test_factorize_then_collapse_is_the_identity(x64):
    tree = _tree()
    deep = jax.jit(lambda t: fz.factorize(t, 3, hidden=7, key=jax.random.PRNGKey(0)))(tree)
    conv, dense = deep["params"]["conv"], deep["params"]["block"]["dense"]
    assert sorted(conv) == ["bias", "kernel_0", "kernel_1", "kernel_2"]
    assert conv["kernel_0"].shape == (3, 3, 2, 7) and conv["kernel_2"].shape == (7, 4)
    assert dense["kernel_0"].shape == (6, 7)
    assert sorted(deep["params"]["embed"]) == ["embedding"]  # no 'kernel': untouched
    np.testing.assert_array_equal(
        deep["params"]["embed"]["embedding"], tree["params"]["embed"]["embedding"]
    )
    back = jax.jit(fz.collapse)(deep)
    chex.assert_trees_all_close(back, tree, atol=1e-12)  # same structure, shapes and values
    assert float(fz.balancedness(deep)) < 1e-12
    # Collapse is exact matrix multiplication, not just a round trip of the SVD.
    np.testing.assert_allclose(
        back["params"]["block"]["dense"]["kernel"],
        dense["kernel_0"] @ dense["kernel_1"] @ dense["kernel_2"],
        rtol=1e-14,
        atol=1e-14,
    )


def test_factorize_where_selects_layers(x64):
    tree = _tree()
    deep = fz.factorize(tree, 2, where=lambda path, kernel: kernel.ndim == 2)
    assert "kernel" in deep["params"]["conv"]
    assert "kernel_1" in deep["params"]["block"]["dense"]


def test_balancedness_detects_a_rescaled_pair(x64):
    factors = fz.balanced_factors(_random(11, (5, 4)), 3, key=jax.random.PRNGKey(1))
    c = 2.0
    skewed = [c * factors[0], factors[1] / c, factors[2]]
    np.testing.assert_allclose(fz.end_to_end(skewed), fz.end_to_end(factors), atol=1e-12)
    # Pair 0: K0^T K0 -> c^2 A and K1 K1^T -> A / c^2 (A the common Gram matrix), relative
    # imbalance (c^2 - c^-2) / c^2 = 1 - c^-4. Pair 1: K1^T K1 -> B / c^2 against B, 1 - c^-2.
    per_pair = fz.pair_balancedness(skewed)
    np.testing.assert_allclose(per_pair, [1 - c**-4, 1 - c**-2], rtol=1e-10)
    layer = {"kernel_0": skewed[0], "kernel_1": skewed[1], "kernel_2": skewed[2]}
    np.testing.assert_allclose(fz.balancedness({"a": layer}), 1 - c**-4, rtol=1e-10)
    absolute = fz.balancedness({"a": layer}, relative=False)
    gram = factors[0].T @ factors[0]
    np.testing.assert_allclose(absolute, (c**2 - c**-2) * jnp.linalg.norm(gram), rtol=1e-10)
    with pytest.raises(ValueError, match="no factorized layer"):
        fz.balancedness({"w": {"kernel": jnp.ones((2, 2))}})


# --------------------------------------------------------------------------------------
# The flax modules equal the collapsed Dense / Conv.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "depth, hidden, use_bias", [(1, None, True), (2, None, True), (3, (3, 9), False), (4, 6, True)]
)
def test_factorized_dense_equals_collapsed_dense(x64, depth, hidden, use_bias):
    module = fz.FactorizedDense(
        5, depth=depth, hidden=hidden, use_bias=use_bias, param_dtype=jnp.float64
    )
    x = _random(12, (2, 3, 7))
    variables = module.init(jax.random.PRNGKey(0), x)
    names = sorted(variables["params"])
    assert names == sorted([f"kernel_{i}" for i in range(depth)] + (["bias"] if use_bias else []))
    if use_bias:  # a nonzero bias, so that adding it is tested too
        variables["params"]["bias"] = _random(13, (5,))
    dense = nn.Dense(5, use_bias=use_bias, param_dtype=jnp.float64)
    expected = dense.apply(fz.collapse(variables), x)
    got = module.apply(variables, x)
    assert got.shape == (2, 3, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert float(fz.balancedness(variables)) < 1e-12  # default init is balanced


@pytest.mark.parametrize(
    "kernel_size, strides, padding, dilation, shape",
    [
        ((3, 3), 1, "SAME", 1, (2, 8, 8, 3)),
        ((3, 3), 2, "VALID", 1, (2, 9, 9, 3)),
        ((3, 2), (1, 2), ((1, 0), (2, 1)), 1, (1, 7, 6, 3)),
        ((3, 3), 1, "SAME", 2, (2, 9, 9, 3)),
        (3, 1, "SAME", 1, (2, 10, 3)),  # an int kernel_size is a 1-D conv, as in nn.Conv
        ((2, 2), 1, "VALID", 1, (5, 5, 3)),  # unbatched input
    ],
)
def test_factorized_conv_equals_collapsed_conv(x64, kernel_size, strides, padding, dilation, shape):
    kwargs = dict(strides=strides, padding=padding, kernel_dilation=dilation)
    module = fz.FactorizedConv(4, kernel_size, depth=3, param_dtype=jnp.float64, **kwargs)
    x = _random(14, shape)
    variables = module.init(jax.random.PRNGKey(1), x)
    variables["params"]["bias"] = _random(15, (4,))
    ks = (kernel_size,) if isinstance(kernel_size, int) else kernel_size
    assert variables["params"]["kernel_0"].shape == (*ks, 3, 4)  # width min(prod(k)*3, 4)
    conv = nn.Conv(4, kernel_size, param_dtype=jnp.float64, **kwargs)
    collapsed = fz.collapse(variables)
    assert collapsed["params"]["kernel"].shape == (*ks, 3, 4)
    expected = conv.apply(collapsed, x)
    got = module.apply(variables, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_module_float32_default_and_factor_inits():
    x = jnp.ones((2, 6), jnp.float32)
    variables = fz.FactorizedDense(6, depth=3).init(jax.random.PRNGKey(0), x)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    # The default balanced init draws the end-to-end kernel from kernel_init (lecun normal).
    kernel = fz.collapse(variables)["params"]["kernel"]
    assert 0.2 < float(jnp.std(kernel)) * math.sqrt(6) < 2.0
    assert float(fz.balancedness(variables)) < 1e-5

    ident = fz.FactorizedDense(6, depth=3, factor_init=fz.near_identity(), use_bias=False)
    v = ident.init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(fz.collapse(v)["params"]["kernel"], jnp.eye(6))
    assert float(fz.balancedness(v)) == 0.0

    noisy = fz.FactorizedDense(6, depth=3, factor_init=fz.near_identity(0.01))
    v = noisy.init(jax.random.PRNGKey(0), x)
    assert 0 < float(jnp.max(jnp.abs(fz.collapse(v)["params"]["kernel"] - jnp.eye(6)))) < 0.2

    tiny = fz.FactorizedDense(3, depth=2, hidden=4, factor_init=fz.near_zero(1e-3))
    v = tiny.init(jax.random.PRNGKey(0), x)
    assert v["params"]["kernel_0"].shape == (6, 4)
    assert float(jnp.max(jnp.abs(v["params"]["kernel_0"]))) < 1e-2
    assert float(fz.balancedness(v, relative=False)) < 1e-4  # delta-balanced near zero


# --------------------------------------------------------------------------------------
# Low precision: computed in float32, returned in the declared dtype.
# --------------------------------------------------------------------------------------

LOW_PRECISION = [jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", [(12, 5), (3, 3, 2, 4)])
def test_low_precision_factors_are_the_float32_factors_rounded(dtype, shape):
    eps = float(jnp.finfo(dtype).eps)
    kernel = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32).astype(dtype)
    split = jax.jit(lambda k: fz.factor_kernels(k, 3, key=jax.random.PRNGKey(1)))
    factors = split(kernel)
    reference = split(kernel.astype(jnp.float32))
    assert [f.dtype for f in factors] == [dtype] * 3
    for got, want in zip(factors, reference, strict=True):
        np.testing.assert_array_equal(got, want.astype(dtype))  # measured: 0 ulp apart
    # The product is rounded once, from a float32 product of the same values.
    product, exact = jax.jit(fz.end_to_end)(factors), jax.jit(fz.end_to_end)(reference)
    assert product.dtype == dtype
    upcast = [f.astype(jnp.float32) for f in factors]
    np.testing.assert_array_equal(product, jax.jit(fz.end_to_end)(upcast).astype(dtype))
    # Measured (seeds 0-4, shapes (12, 5), (4, 9), (3, 3, 2, 4)): the product of the
    # rounded factors is within 0.56 eps of the kernel (relative, Frobenius), and they
    # are balanced to 0.76 eps.
    relative = jnp.linalg.norm(product.astype(jnp.float32) - exact) / jnp.linalg.norm(exact)
    assert float(relative) < eps
    imbalance = jax.jit(fz.pair_balancedness)(factors)
    assert imbalance.dtype == jnp.float32
    np.testing.assert_array_equal(imbalance, jax.jit(fz.pair_balancedness)(upcast))
    assert float(jnp.max(imbalance)) < eps


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("conv", [False, True])
def test_low_precision_modules_init_and_match_their_float32_values(dtype, conv):
    eps = float(jnp.finfo(dtype).eps)
    if conv:
        module = fz.FactorizedConv(4, (3, 3), depth=3, param_dtype=dtype)
        reference = fz.FactorizedConv(4, (3, 3), depth=3)
        plain = nn.Conv(4, (3, 3), param_dtype=dtype)
        x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 5, 3))
    else:
        module = fz.FactorizedDense(4, depth=3, param_dtype=dtype)
        reference = fz.FactorizedDense(4, depth=3)
        plain = nn.Dense(4, param_dtype=dtype)
        x = jax.random.normal(jax.random.PRNGKey(2), (5, 6))
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), x)  # raised NotImplementedError
    assert all(v.dtype == dtype for v in jax.tree.leaves(variables))
    as_float32 = jax.tree.map(lambda v: v.astype(jnp.float32), variables)
    want = jax.jit(reference.apply)(as_float32, x)
    # float32 input: computed in float32 from the low-precision values, as nn.Dense does.
    np.testing.assert_array_equal(jax.jit(module.apply)(variables, x), want)
    collapsed = jax.jit(fz.collapse)(variables)
    assert collapsed["params"]["kernel"].dtype == dtype
    # The collapsed kernel is rounded once more: measured within 0.21 eps of the outputs.
    got = jax.jit(plain.apply)(collapsed, x)
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 0.5 * eps
    balance = jax.jit(fz.balancedness)(variables)
    assert balance.dtype == jnp.float32 and float(balance) < eps
