"""Optimizer state (with any cached decomposition) saves, restores, and resumes bit-identically.

Written generically over the state pytree: whatever leaves ``tx.init`` creates (step count,
momentum, the default's tracked bases) must survive a round trip through
flax serialization (and orbax, when installed) unchanged, and a run interrupted at any
step and resumed from the restored state must produce exactly the same parameters and
state as the uninterrupted run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import overparam_optax as opx

# By step 3 the default has carried some bases over and computed others afresh again: the
# resumed run must make the same choices.
STEPS, RESUME_AT = 7, 3


def _problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)
    params = {
        "w1": jnp.asarray(rng.normal(size=(6, 8)) * 0.5, jnp.float32),
        "b1": jnp.zeros((8,), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(8, 3)) * 0.5, jnp.float32),
        "w3": jnp.asarray(rng.normal(size=(8, 8)) * 0.5, jnp.float32),
    }

    def loss_fn(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((jnp.tanh(h @ p["w3"]) @ p["w2"] - y) ** 2)

    return params, loss_fn


TRANSFORMS = {
    "tracked_sgd_momentum": lambda: opx.overparam_sgd(0.05, N=3, momentum=0.9, weight_decay=1e-3),
    "tracked_tight_schedule": lambda: opx.overparam_sgd(
        0.05,
        N=3,
        momentum=0.9,
        method=opx.methods.Tracked(tolerance=1e-5),
        weight_decay=optax.linear_schedule(1e-3, 0, 5),
    ),
    "eigh_adam": lambda: optax.chain(
        opx.overparam_precondition(2, method="eigh"), optax.adam(1e-2)
    ),
    "blocks_adam": lambda: optax.chain(
        opx.overparam_precondition(3, block_size=4), optax.adam(1e-2)
    ),
}


def _step_fn(tx, loss_fn):
    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _run(step, params, state, n):
    for _ in range(n):
        params, state = step(params, state)
    return params, state


def _assert_trees_bitwise_equal(a, b):
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(a)
    b_leaves, b_def = jax.tree_util.tree_flatten_with_path(b)
    assert a_def == b_def
    for (path, x), (_, y) in zip(a_leaves, b_leaves, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        # bitwise (NaN-safe, -0.0 != 0.0): compare the raw bytes
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def _precondition_state(state):
    """The OverparamPreconditionState in an optimizer state tree."""
    found = []

    def visit(node):
        if isinstance(node, opx.OverparamPreconditionState):
            found.append(node)
            return True
        return False

    jax.tree.map(lambda _: None, state, is_leaf=visit)
    (inner,) = found
    return inner


def _has_cache(state):
    """Whether the state holds a non-empty cache (the default's tracked bases)."""
    return bool(jax.tree.leaves(_precondition_state(state).factors))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_flax_serialization_resume_is_bit_identical(name, tmp_path):
    params0, loss_fn = _problem()
    tx = TRANSFORMS[name]()
    step = _step_fn(tx, loss_fn)
    # The default (blocks too) caches a tracked basis per matrix; eigh decomposes afresh.
    assert _has_cache(tx.init(params0)) == (not name.startswith("eigh"))

    straight = _run(step, params0, tx.init(params0), STEPS)

    params, state = _run(step, params0, tx.init(params0), RESUME_AT)
    if _has_cache(state):  # each basis computed on the first update, then carried over
        inner = _precondition_state(state)
        matrices = sum(len(v) for v in jax.tree.leaves(inner.factors) if v.ndim == 3)
        assert matrices <= int(inner.decompositions) < RESUME_AT * matrices
    path = tmp_path / "ckpt.msgpack"
    path.write_bytes(serialization.to_bytes({"params": params, "opt_state": state}))
    del params, state
    # A fresh process would rebuild the template from the model and the optimizer:
    template = {"params": params0, "opt_state": tx.init(params0)}
    restored = serialization.from_bytes(template, path.read_bytes())
    _assert_trees_bitwise_equal(
        restored["opt_state"], _run(step, params0, tx.init(params0), RESUME_AT)[1]
    )
    resumed = _run(step, restored["params"], restored["opt_state"], STEPS - RESUME_AT)

    _assert_trees_bitwise_equal(resumed, straight)


def test_state_dict_round_trip_keeps_every_leaf():
    """The msgpack state dict holds every state leaf with its dtype (int32 count too)."""
    params0, loss_fn = _problem()
    tx = TRANSFORMS["tracked_sgd_momentum"]()
    _, state = _run(_step_fn(tx, loss_fn), params0, tx.init(params0), 1)
    restored = serialization.msgpack_restore(
        serialization.msgpack_serialize(serialization.to_state_dict(state))
    )
    back = serialization.from_state_dict(tx.init(params0), restored)
    _assert_trees_bitwise_equal(back, state)


def test_orbax_resume_is_bit_identical(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params0, loss_fn = _problem()
    tx = TRANSFORMS["tracked_sgd_momentum"]()
    step = _step_fn(tx, loss_fn)
    straight = _run(step, params0, tx.init(params0), STEPS)

    params, state = _run(step, params0, tx.init(params0), RESUME_AT)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()
    abstract = jax.eval_shape(lambda: {"params": params0, "opt_state": tx.init(params0)})
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    checkpointer.close()
    resumed = _run(step, restored["params"], restored["opt_state"], STEPS - RESUME_AT)
    _assert_trees_bitwise_equal(resumed, straight)
