"""Tests of overparam_experiments.trajectories: explicit depth-N GD and the implicit
rule follow the same trajectory, with a gap first order in the learning rate.

Float64 tests use the `x64` fixture of conftest.py (a context manager around the test), so
64-bit mode never leaks into other test files.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from overparam_experiments import training
from overparam_experiments.trajectories import compare_trajectories
from overparam_optax import factorized as fz
from overparam_optax import overparam_precondition


def _random(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


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
    coarse = compare_trajectories(
        loss_fn, params, depth, lr, steps, hidden=1, key=jax.random.PRNGKey(0)
    )
    fine = compare_trajectories(
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
    narrow = compare_trajectories(
        loss_fn, params, 3, 0.05, 100, hidden=1, key=jax.random.PRNGKey(1)
    )
    wide = compare_trajectories(
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
        compare_trajectories(loss_fn, params, 3, 0.05, 100, hidden=h, key=jax.random.PRNGKey(h))
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
            r = compare_trajectories(loss_fn, params, 3, lr, steps, key=jax.random.PRNGKey(0))
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
    loss_fn, params = _least_squares(seed=4, outputs=2)
    runs = [
        compare_trajectories(loss_fn, params, 3, lr, steps, weight_decay=0.2)
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
