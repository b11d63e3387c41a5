"""optax's contract for contributed optimizers, run against ``overparam_sgd``.

optax checks every optimizer in ``optax.contrib`` with the same battery
(``optax/contrib/_common_test.py``): extra arguments accepted, no recompilation, working
``optax.tree.map_params``, convergence on small targets (including a matrix parabola that
starts from zeros), ``inject_hyperparams``, dtype preservation, ``optax.MultiSteps``, a
dtype-stable state under ``lax.cond``, and learning-rate schedules. These are the same
checks, written for this package; N, ``method`` and ``tolerance`` are static
hyperparameters, as that battery treats the structural ones of other optimizers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import overparam_optax as opx

CONFIGS = {
    "N2": dict(N=2),  # the default: a tracked basis per matrix in the state
    # tracked, decomposing afresh more often
    "N3-tight": dict(N=3, method=opx.methods.Tracked(tolerance=1e-5)),
    "N3-newton": dict(N=3, method="newton"),  # decomposes afresh on every update, no cache
}
STATIC = ("N", "method")


# 1e-3: vector leaves pass through, so they follow plain SGD, which diverges on the
# Rosenbrock target (curvature ~1000 at the optimum) at 1e-2.
def _opt(config, learning_rate=1e-3):
    return opx.overparam_sgd(learning_rate=learning_rate, **CONFIGS[config])


def _parabola(dtype):
    start = jnp.array([-1.0, 10.0, 1.0], dtype)
    target = jnp.array([1.0, -1.0, 1.0], dtype)
    return start, target, lambda p: jnp.sum((p - target) ** 2)


def _rosenbrock(dtype):
    start = jnp.zeros(2, dtype)
    target = jnp.ones(2, dtype)
    return start, target, lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


def _matrix_parabola(dtype):
    start = jnp.zeros((2, 2), dtype)  # exactly zero: P_0(G) = 0 under the strict rule
    target = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
    return start, target, lambda p: jnp.sum((p - target) ** 2)


def _mixed(dtype):
    start = (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype))
    target = (jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))

    def loss(p):
        return jnp.sum((p[0] - target[0]) ** 2) + jnp.sum((p[1] - target[1]) ** 2)

    return start, target, loss


def _step_fn(opt, loss, **update_kwargs):
    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params, **update_kwargs)
        return optax.apply_updates(params, updates), state

    return step


@pytest.mark.parametrize("config", CONFIGS)
def test_accepts_extra_args_and_does_not_recompile(config):
    opt = _opt(config)
    params, _, loss = _rosenbrock(jnp.float32)
    step = _step_fn(opt, loss, unexpected_extra_arg=1)
    state = opt.init(params)
    for _ in range(3):
        params, state = step(params, state)
    assert step._cache_size() == 1


@pytest.mark.parametrize("target", [_parabola, _rosenbrock, _matrix_parabola, _mixed])
@pytest.mark.parametrize("config", CONFIGS)
def test_map_params_and_convergence(config, target):
    opt = _opt(config)
    params, solution, loss = target(jnp.float32)
    state = opt.init(params)
    state = optax.tree.map_params(opt, lambda v: v, state)  # a no-op, as optax checks
    step = _step_fn(opt, loss)
    (params, state), _ = jax.lax.scan(lambda c, _: (step(*c), None), (params, state), length=30_000)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(solution), strict=True):
        np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("config", CONFIGS)
def test_inject_hyperparams_gives_the_same_updates_and_state(config):
    opt = _opt(config)
    injected = optax.inject_hyperparams(opx.overparam_sgd, static_args=STATIC)(
        learning_rate=1e-3, **CONFIGS[config]
    )
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
    updates, new_state = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
    inj_updates, inj_state = jax.jit(injected.update)(grads, jax.jit(injected.init)(params), params)
    for a, b in zip(jax.tree.leaves(inj_updates), jax.tree.leaves(updates), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(inj_state.inner_state), jax.tree.leaves(new_state), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("config", CONFIGS)
def test_updates_keep_the_params_dtype(config, dtype):
    opt = _opt(config)
    for params in (jnp.array([1.0, 2.0], dtype), jnp.array([[1.0, 2.0], [0.5, 3.0]], dtype)):
        grads = jax.grad(lambda x: jnp.sum(x.astype(jnp.float32) ** 2))(params)
        updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
        assert updates.dtype == params.dtype


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("config", CONFIGS)
def test_multi_steps_accumulates_without_updating(config, dtype):
    opt = optax.MultiSteps(_opt(config), every_k_schedule=4)
    params = jnp.array([[1.0, 2.0], [0.5, 3.0]], dtype)
    grads = jax.grad(lambda x: jnp.sum(x.astype(jnp.float32) ** 2))(params)
    updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
    np.testing.assert_array_equal(updates, jnp.zeros_like(grads))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
@pytest.mark.parametrize("config", CONFIGS)
def test_state_is_shape_and_dtype_stable_under_cond(config, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        opt = _opt(config)
        params = jnp.array([[-1.0, 10.0], [1.0, 2.0]], dtype)
        loss = lambda p: jnp.sum((p - 1) ** 2)  # noqa: E731

        @jax.jit
        def step(params, state):
            grads = jax.grad(loss)(params)
            take = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, state = jax.lax.cond(
                take, lambda: opt.update(grads, state, params), lambda: (params, state)
            )
            return optax.apply_updates(params, updates), state

        state = opt.init(params)
        for _ in range(2):
            params, new_state = step(params, state)
            assert params.dtype == dtype
            assert jax.tree.map(jnp.result_type, new_state) == jax.tree.map(jnp.result_type, state)
            state = new_state


@pytest.mark.parametrize("config", CONFIGS)
def test_learning_rate_schedules_are_accepted(config):
    params, _, loss = _matrix_parabola(jnp.float32)
    params = params + 0.5
    results = []
    for lr in (1e-3, optax.constant_schedule(1e-3)):
        opt = functools.partial(opx.overparam_sgd, **CONFIGS[config])(learning_rate=lr)
        p, state = params, opt.init(params)
        step = _step_fn(opt, loss)
        for _ in range(10):
            p, state = step(p, state)
        results.append(p)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
