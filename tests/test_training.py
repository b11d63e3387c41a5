"""Tests of overparam_experiments.training."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from overparam_experiments import training


def _regression_problem(seed=0, n=12, d=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X @ rng.normal(size=d) + 0.1 * rng.normal(size=n)).astype(np.float32)
    return jnp.asarray(X), jnp.asarray(y)


def test_lp_regression_loss_value_and_shapes():
    X = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = jnp.array([0.0, 1.0, 1.0])
    w = jnp.array([2.0, -1.0])
    residual = np.array([2.0, -2.0, 0.0])
    for p in (2, 4):
        expected = np.mean(np.abs(residual) ** p) / p
        np.testing.assert_allclose(training.lp_regression_loss(w, X, y, p), expected, rtol=1e-6)
        np.testing.assert_allclose(
            training.lp_regression_loss(w[:, None], X, y, p), expected, rtol=1e-6
        )


def _python_loop(loss_fn, params, tx, num_steps):
    # Each piece is jitted on its own (for speed), but the loop itself is plain Python.
    value_and_grad, update = jax.jit(jax.value_and_grad(loss_fn)), jax.jit(tx.update)
    state = tx.init(params)
    losses = []
    for _ in range(num_steps):
        loss, grads = value_and_grad(params)
        losses.append(float(loss))
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, np.array(losses)


@pytest.mark.parametrize("make_tx", [lambda: optax.sgd(0.05), lambda: optax.adam(0.05)])
def test_run_full_batch_matches_python_loop(make_tx):
    X, y = _regression_problem()
    params = {"w": jnp.zeros((3, 1)), "b": jnp.zeros(())}

    def loss_fn(p):
        return training.lp_regression_loss(p["w"], X, y - p["b"], 4)

    final, losses, records = training.run_full_batch(loss_fn, params, make_tx(), 25)
    expected_final, expected_losses = _python_loop(loss_fn, params, make_tx(), 25)
    assert records is None
    chex.assert_shape(losses, (25,))
    np.testing.assert_allclose(losses[0], loss_fn(params), rtol=1e-6)  # loss before step 0
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    chex.assert_trees_all_close(final, expected_final, rtol=1e-5, atol=1e-7)
    assert losses[-1] < 0.5 * losses[0]


def test_run_full_batch_records_params_before_each_step():
    X, y = _regression_problem()
    loss_fn = lambda w: training.lp_regression_loss(w, X, y, 2)  # noqa: E731
    w0 = jnp.ones(3)
    final, losses, records = training.run_full_batch(
        loss_fn, w0, optax.sgd(0.1), 5, record_fn=lambda w: {"w": w, "norm": jnp.sum(w * w)}
    )
    chex.assert_shape(records["w"], (5, 3))
    chex.assert_shape(records["norm"], (5,))
    np.testing.assert_allclose(records["w"][0], w0)
    recomputed = [loss_fn(w) for w in records["w"]]
    np.testing.assert_allclose(losses, recomputed, rtol=1e-6)
    # The last record is the params before the last step: one sgd step gives `final`.
    last_step = records["w"][-1] - 0.1 * jax.grad(loss_fn)(records["w"][-1])
    np.testing.assert_allclose(final, last_step, rtol=1e-6)


def test_run_full_batch_float64():
    with jax.enable_x64(True):
        X, y = _regression_problem()
        X, y = X.astype(jnp.float64), y.astype(jnp.float64)
        w0 = jnp.zeros(3, dtype=jnp.float64)
        final, losses, _ = training.run_full_batch(
            lambda w: training.lp_regression_loss(w, X, y, 2), w0, optax.sgd(0.1), 3
        )
        assert final.dtype == jnp.float64 and losses.dtype == np.float64


def test_run_full_batch_grid_matches_individual_runs():
    X, y = _regression_problem(seed=3)
    loss_fn = lambda w: training.lp_regression_loss(w, X, y, 4)  # noqa: E731
    w0 = jnp.zeros(3)
    learning_rates = [0.001, 0.01, 30.0]  # the last one diverges
    finals, losses, _ = training.run_full_batch_grid(loss_fn, w0, optax.sgd, learning_rates, 40)
    chex.assert_shape(losses, (3, 40))
    chex.assert_shape(finals, (3, 3))
    for k in range(2):
        final, expected, _ = training.run_full_batch(loss_fn, w0, optax.sgd(learning_rates[k]), 40)
        np.testing.assert_allclose(losses[k], expected, rtol=1e-5)
        np.testing.assert_allclose(finals[k], final, rtol=1e-5, atol=1e-7)
    assert losses[1, -1] < losses[0, -1]  # the larger stable rate gets further
    assert not np.isfinite(losses[2, -1])  # divergence stays confined to its own run
    with pytest.raises(ValueError, match="1-D"):
        training.run_full_batch_grid(loss_fn, w0, optax.sgd, [[0.1]], 2)


def test_steps_to_reach():
    losses = np.array([5.0, 3.0, 2.0, 2.5, 1.0])
    assert training.steps_to_reach(losses, 2.0) == 2
    assert training.steps_to_reach(losses, 5.0) == 0
    assert training.steps_to_reach(losses, 0.5) is None
    assert training.steps_to_reach(np.array([np.nan, 1.0]), 1.0) == 1


def test_trailing_mean():
    np.testing.assert_allclose(training.trailing_mean([1, 2, 3, 4], 2), [1.5, 2.5, 3.5])
    np.testing.assert_allclose(training.trailing_mean([1, 2, 3], 3), [2.0])
    with pytest.raises(ValueError, match="window"):
        training.trailing_mean([1, 2, 3], 4)
    with pytest.raises(ValueError, match="window"):
        training.trailing_mean([1, 2, 3], 0)


def test_smoothed_steps_to_reach_a_run_twice_as_fast_needs_half_the_steps():
    steps = np.arange(400)
    plain, fast, slow = (np.exp(-rate * steps) for rate in (0.01, 0.02, 0.001))
    window = 10
    smooth = training.trailing_mean(plain, window)
    # The target "plain after 200 steps": the mean over the window ending there, 190..199.
    target_200, target_400 = smooth[200 - window], smooth[-1]
    np.testing.assert_allclose(target_200, plain[190:200].mean())
    reach = training.smoothed_steps_to_reach
    assert reach(plain, target_200, window) == 200
    assert reach(plain, target_400, window) == 400
    # A trailing mean lags the curve by about half a window, the more so the steeper it is.
    assert 100 <= reach(fast, target_200, window) <= 105
    assert 200 <= reach(fast, target_400, window) <= 205
    assert reach(slow, target_200, window) is None


def _toy_classification(n=120, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n).astype(np.int32)
    centers = np.eye(3, 4, dtype=np.float32) * 3.0
    images = centers[labels] + rng.normal(size=(n, 4)).astype(np.float32)
    return images, labels


def _linear_logits(params, x, train, rng):
    logits = x @ params["w"] + params["b"]
    if train:  # a dropout-like use of the key, so a train/eval mismatch would show
        keep = jax.random.bernoulli(rng, 0.9, x.shape)
        logits = (jnp.where(keep, x, 0.0) / 0.9) @ params["w"] + params["b"]
    return logits


def test_run_minibatch_learns_and_is_deterministic(capsys):
    train, test = _toy_classification(seed=0), _toy_classification(n=60, seed=1)
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    result = training.run_minibatch(
        _linear_logits,
        params,
        optax.sgd(0.1),
        train,
        50,
        batch_size=16,
        seed=7,
        test_data=test,
        eval_batch_size=25,  # 60 = 25 + 25 + 10: a ragged last batch
        log_every=25,
        description="toy",
    )
    assert result.losses.shape == (50,) and result.accuracies.shape == (50,)
    np.testing.assert_allclose(result.losses[0], np.log(3.0), rtol=1e-5)  # zero init
    assert result.losses[-10:].mean() < 0.6 * result.losses[0]
    assert result.test_accuracy > 0.8
    loss, accuracy = training.evaluate_classifier(_linear_logits, result.params, test)
    np.testing.assert_allclose(
        [loss, accuracy], [result.test_loss, result.test_accuracy], rtol=1e-6
    )
    assert "[toy] step 50/50" in capsys.readouterr().out
    again = training.run_minibatch(
        _linear_logits, params, optax.sgd(0.1), train, 50, batch_size=16, seed=7
    )
    np.testing.assert_array_equal(again.losses, result.losses)
    assert again.test_accuracy is None
    other_seed = training.run_minibatch(
        _linear_logits, params, optax.sgd(0.1), train, 50, batch_size=16, seed=8
    )
    assert not np.array_equal(other_seed.losses, result.losses)


def test_run_minibatch_eval_fn_records_evaluations_and_training_time():
    train, test = _toy_classification(seed=0), _toy_classification(n=60, seed=1)
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    seen = []

    def eval_fn(p):
        seen.append(p)
        loss, accuracy = training.evaluate_classifier(_linear_logits, p, test)
        return {"val_loss": loss, "val_accuracy": accuracy}

    result = training.run_minibatch(
        _linear_logits, params, optax.sgd(0.1), train, 23, batch_size=16, seed=7,
        eval_fn=eval_fn, eval_every=10,
    )  # fmt: skip
    steps = [e["step"] for e in result.evaluations]
    assert steps == [0, 10, 20, 23]  # before, every 10 updates, and after the last
    first, last = result.evaluations[0], result.evaluations[-1]
    np.testing.assert_allclose(first["val_loss"], np.log(3.0), rtol=1e-5)  # zero init
    assert last["val_loss"] < 0.8 * first["val_loss"]
    # The last evaluation sees the final parameters.
    np.testing.assert_array_equal(seen[-1]["w"], result.params["w"])
    times = [e["train_seconds"] for e in result.evaluations]
    assert times[0] < 1e-3 and all(b > a for a, b in zip(times, times[1:], strict=False))
    assert result.compile_seconds > 0 and times[-1] <= result.seconds
    # Evaluating does not change the training trajectory.
    plain = training.run_minibatch(
        _linear_logits, params, optax.sgd(0.1), train, 23, batch_size=16, seed=7
    )
    np.testing.assert_array_equal(plain.losses, result.losses)
    assert plain.evaluations == []
    with pytest.raises(ValueError, match="eval_every"):
        training.run_minibatch(
            _linear_logits, params, optax.sgd(0.1), train, 1, batch_size=16, eval_every=-1
        )


def test_run_minibatch_rejects_oversized_batch():
    train = _toy_classification(n=10)
    with pytest.raises(ValueError, match="batch_size"):
        training.run_minibatch(
            _linear_logits,
            {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)},
            optax.sgd(0.1),
            train,
            1,
            batch_size=11,
        )


def test_log_grid_and_grid_search_pick_lowest_final_loss():
    grid = training.log_grid(-5, 0)
    assert len(grid) == 21
    np.testing.assert_allclose(grid[[0, 4, -1]], [1e-5, 1e-4, 1.0])
    X, y = _regression_problem(seed=4)
    loss_fn = lambda w: training.lp_regression_loss(w, X, y, 4)  # noqa: E731
    search = training.grid_search(loss_fn, jnp.zeros(3), optax.sgd, [1e-3, 1e-2, 1e3], 30)
    assert search.losses.shape == (3, 30)
    final = search.losses[:, -1]
    assert not np.isfinite(final[2])  # the diverged run is never chosen
    assert search.best_index == int(np.argmin(final[:2]))
    assert search.best_learning_rate == [1e-3, 1e-2][search.best_index]
    np.testing.assert_array_equal(search.best_losses, search.losses[search.best_index])
    assert search.best_final_loss == final[search.best_index]
