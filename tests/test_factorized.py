"""Tests of overparam_optax.factorized: the explicit depth-N baselines.

Float64 tests use the `x64` fixture of conftest.py (a context manager around the test), so
64-bit mode never leaks into other test files.
"""

import json
import math
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from overparam_optax import factorized as fz
from overparam_optax import training

REPO = pathlib.Path(__file__).resolve().parents[1]


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
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-12)
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
# Explicit depth-N GD vs overparam_precondition(N): the trajectories agree.
# --------------------------------------------------------------------------------------


def _least_squares(seed=0, n=40, d=6, outputs=1):
    """A small least-squares problem whose minimizer is W0 plus a perturbation of half its
    size, so the trajectory stays away from W_e = 0 (where P_W vanishes and the flow is
    stiff relative to ||W_e||)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    w0 = rng.standard_normal((d, outputs)) / math.sqrt(d)
    target = w0 + 0.5 * rng.standard_normal((d, outputs)) / math.sqrt(d)
    Y = jnp.asarray(X @ target + 0.1 * rng.standard_normal((n, outputs)))
    X = jnp.asarray(X)
    return (lambda q: 0.5 * jnp.mean((X @ q["w"]["kernel"] - Y) ** 2)), {
        "w": {"kernel": jnp.asarray(w0)}
    }


def _local_error_bound(loss_fn, params, depth, lr, steps, hidden):
    """Sum over the explicit trajectory of the O(lr^2) part of one GD step on the factors.

    One step multiplies out to prod_i (K_i - lr D_i) = K_e - lr sum_i (...D_i...) + R, and at a
    balanced point the first-order sum is exactly lr P(G) (Arora et al., Thm. 1), so the
    implicit and explicit steps differ by R, the terms with k >= 2 gradients. With
    a = max_i ||K_i||_2 and g = max_i ||D_i||_F, ||R||_F <= (a + lr g)^N - a^N - N lr g a^{N-1}
    (binomial expansion). Summing over the steps gives the accumulated local error.
    """
    start = fz.factorize(params, depth, hidden, key=jax.random.PRNGKey(0))

    def explicit(p):
        return loss_fn(fz.collapse(p))

    def record(p):
        grads = jax.grad(explicit)(p)["w"]
        ks = [p["w"][f"kernel_{i}"] for i in range(depth)]
        a = jnp.max(jnp.stack([jnp.linalg.norm(k, 2) for k in ks]))
        g = jnp.max(jnp.stack([jnp.linalg.norm(grads[f"kernel_{i}"]) for i in range(depth)]))
        return (a + lr * g) ** depth - a**depth - depth * lr * g * a ** (depth - 1)

    _, _, local = training.run_full_batch(explicit, start, optax.sgd(lr), steps, record_fn=record)
    return float(np.sum(local))


@pytest.mark.parametrize("depth", [2, 4])  # N = 3 runs in the tests below
def test_trajectories_agree_and_the_gap_is_first_order_in_lr(x64, depth):
    loss_fn, params = _least_squares()
    lr, steps = 0.05, 100  # horizon lr * steps = 5: the loss drops by > 10x
    coarse = fz.compare_trajectories(
        loss_fn, params, depth, lr, steps, hidden=1, key=jax.random.PRNGKey(0)
    )
    fine = fz.compare_trajectories(
        loss_fn, params, depth, lr / 4, 4 * steps, hidden=1, key=jax.random.PRNGKey(0)
    )
    assert coarse.gap[0] < 1e-13  # the same end-to-end start
    assert coarse.implicit_loss[-1] < 0.1 * coarse.implicit_loss[0]  # it did train
    # The bound: 2x the accumulated local (second-order) error, relative to ||W_e||; the
    # factor 2 covers the O(lr^2) drift from balancedness and the propagation of earlier
    # errors over this short horizon. The binomial bound is worst-case (norms multiplied
    # through): measured gaps sit 30-100x below it, at ~1e-4.
    final_norm = float(jnp.linalg.norm(coarse.implicit_params["w"]["kernel"]))
    bound = 2 * _local_error_bound(loss_fn, params, depth, lr, steps, 1) / final_norm
    assert 1e-6 < bound < 0.2
    assert coarse.gap[-1] < bound
    assert np.max(coarse.gap) < bound
    # First-order consistency: lr / 4 over the same horizon divides the gap by ~4.
    ratio = coarse.gap[-1] / fine.gap[-1]
    assert 3.5 < ratio < 4.5, ratio
    np.testing.assert_allclose(coarse.explicit_loss, coarse.implicit_loss, rtol=2e-2)
    assert np.max(coarse.balancedness) < 0.05


def test_hidden_width_does_not_change_the_explicit_trajectory(x64):
    loss_fn, params = _least_squares(seed=1)
    narrow = fz.compare_trajectories(
        loss_fn, params, 3, 0.05, 100, hidden=1, key=jax.random.PRNGKey(1)
    )
    wide = fz.compare_trajectories(
        loss_fn, params, 3, 0.05, 100, hidden=(32, 7), key=jax.random.PRNGKey(2)
    )
    end_narrow = fz.collapse(narrow.explicit_params)["w"]["kernel"]
    end_wide = fz.collapse(wide.explicit_params)["w"]["kernel"]
    # The gap itself is ~1e-3; the two explicit runs agree to rounding.
    assert narrow.gap[-1] > 1e-5
    np.testing.assert_allclose(end_wide, end_narrow, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(wide.gap, narrow.gap, rtol=1e-7, atol=1e-14)


def test_multi_output_widths_above_min_do_not_matter(x64):
    loss_fn, params = _least_squares(seed=2, d=5, outputs=3)
    runs = [
        fz.compare_trajectories(loss_fn, params, 3, 0.05, 100, hidden=h, key=jax.random.PRNGKey(h))
        for h in (3, 8)
    ]
    ends = [fz.collapse(r.explicit_params)["w"]["kernel"] for r in runs]
    np.testing.assert_allclose(ends[1], ends[0], rtol=1e-10, atol=1e-12)
    assert runs[0].gap[-1] < 1e-2


def test_softmax_regression_and_mlp_with_biases(x64):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((60, 8))
    teacher = rng.standard_normal((8, 4))
    labels = jnp.asarray(np.argmax(X @ teacher + rng.gumbel(size=(60, 4)), axis=1))
    X = jnp.asarray(X)

    def xent(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    softmax = {"fc": {"kernel": _random(20, (8, 4), 0.3)}}
    mlp = {
        "fc1": {"kernel": _random(21, (8, 6), 0.4), "bias": _random(22, (6,), 0.1)},
        "fc2": {"kernel": _random(23, (6, 4), 0.4), "bias": jnp.zeros(4)},
    }

    def mlp_loss(q):
        h = jnp.tanh(X @ q["fc1"]["kernel"] + q["fc1"]["bias"])
        return xent(h @ q["fc2"]["kernel"] + q["fc2"]["bias"])

    for loss_fn, params in [(lambda q: xent(X @ q["fc"]["kernel"]), softmax), (mlp_loss, mlp)]:
        gaps = []
        for lr, steps in [(0.1, 50), (0.025, 200)]:
            r = fz.compare_trajectories(loss_fn, params, 3, lr, steps, key=jax.random.PRNGKey(0))
            assert r.implicit_loss[-1] < 0.5 * r.implicit_loss[0]
            np.testing.assert_allclose(r.explicit_loss, r.implicit_loss, rtol=1e-2)
            gaps.append(r.gap[-1])
            assert np.max(r.gap) < 2e-2  # measured: 1.7e-2 (softmax), 5e-3 (MLP) at lr 0.1
        assert 3.5 < gaps[0] / gaps[1] < 4.5  # measured ~4.1 for both
    # Layer by layer in the nonlinear network; its biases (plain GD in both runs) follow.
    assert set(r.layer_gaps) == {"fc1", "fc2"}
    assert max(v[-1] for v in r.layer_gaps.values()) < 2e-3
    b_e, b_i = r.explicit_params["fc1"]["bias"], r.implicit_params["fc1"]["bias"]
    assert float(jnp.linalg.norm(b_e - b_i)) < 2e-3 * float(jnp.linalg.norm(b_i))


def test_weight_decay_matches_overparam_sgd(x64):
    from overparam_optax import overparam_precondition

    loss_fn, params = _least_squares(seed=4, outputs=2)
    runs = [
        fz.compare_trajectories(loss_fn, params, 3, lr, steps, weight_decay=0.2)
        for lr, steps in [(0.05, 200), (0.0125, 800)]
    ]
    gaps = [r.gap[-1] for r in runs]
    assert gaps[0] < 1e-2
    assert 3.0 < gaps[0] / gaps[1] < 5.5
    # Decaying the end-to-end matrix by lambda instead of N * lambda is a first-order error:
    # that run ends far from the explicit one, at any learning rate.
    wrong_tx = optax.chain(
        overparam_precondition(3), optax.add_decayed_weights(0.2), optax.sgd(0.0125)
    )
    wrong, _, _ = training.run_full_batch(loss_fn, params, wrong_tx, 800)
    explicit_end = fz.collapse(runs[1].explicit_params)["w"]["kernel"]
    wrong_gap = jnp.linalg.norm(wrong["w"]["kernel"] - explicit_end) / jnp.linalg.norm(explicit_end)
    assert float(wrong_gap) > 20 * gaps[1]


# --------------------------------------------------------------------------------------
# The benchmark script runs end to end (smoke test).
# --------------------------------------------------------------------------------------


def test_equivalence_benchmark_quick(tmp_path):
    out_json, out_png = tmp_path / "eq.json", tmp_path / "eq.png"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "equivalence.py"),
        "--quick",
        "--synthetic",
        "--platform",
        "cpu",
        "--out-json",
        str(out_json),
        "--out-png",
        str(out_png),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["dtype"] == "float64" and report["device"]["platform"] == "cpu"
    assert "--quick" in report["command"] and report["versions"]["jax"] == jax.__version__
    tasks = {r["task"] for r in report["runs"]}
    assert tasks == {"ethanol_l2", "ethanol_l4", "mnist_softmax", "mnist_mlp"}
    for r in report["runs"]:
        assert r["finite"] and r["initial_gap"] < 1e-12
        assert 0 < r["final_gap"] < 0.05
        assert len(r["curves"]["gap"]) == len(r["curves"]["step"]) > 1
    widths = [r for r in report["runs"] if r["task"] == "ethanol_l2"]
    assert len(widths) == 2
    assert widths[0]["final_gap"] == pytest.approx(widths[1]["final_gap"], rel=1e-6)
    assert out_png.stat().st_size > 10_000
