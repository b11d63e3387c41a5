"""The optax contract of overparam_precondition / overparam_sgd, leaf handling and errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import overparam_optax as opx
from overparam_optax import MatrixDimensionNumbers
from overparam_optax.testing import reference_precondition


def _params(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(6, 4)), dtype),
            "bias": jnp.asarray(rng.normal(size=(4,)), dtype),
        },
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 5)), dtype)},
        "scale": jnp.asarray(1.5, dtype),
    }


def _grads_like(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _rel_err(actual, expected):
    expected = np.asarray(expected, np.float64)
    return np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("N", [1, 2, 3, 5])
def test_leaves_follow_default_dimension_numbers(N):
    params = _params()
    grads = _grads_like(params)
    tx = opx.overparam_precondition(N)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    # 2-D leaf: the full formula.
    expected = reference_precondition(params["dense"]["kernel"], grads["dense"]["kernel"], N)
    # Measured (x86 CPU, float32): at most 3.4e-7 here and 1.0e-6 for the conv matrix below,
    # over N = 2, 3, 5 (0 at N = 1); the bounds leave 4x.
    assert _rel_err(updates["dense"]["kernel"], expected) < 1.5e-6
    # 4-D conv kernel HWIO: the (H*W*I, O) matrix.
    w = np.asarray(params["conv"]["kernel"]).reshape(18, 5)
    g = np.asarray(grads["conv"]["kernel"]).reshape(18, 5)
    conv_update = np.asarray(updates["conv"]["kernel"]).reshape(18, 5)
    assert _rel_err(conv_update, reference_precondition(w, g, N)) < 4e-6
    # 1-D and scalar leaves pass through untouched.
    np.testing.assert_array_equal(updates["dense"]["bias"], grads["dense"]["bias"])
    np.testing.assert_array_equal(updates["scale"], grads["scale"])


def test_stacked_layers_with_dimension_numbers_are_preconditioned_slice_by_slice():
    rng = np.random.default_rng(2)
    # (layers, heads, in, out): layers and heads are batch axes.
    w = jnp.asarray(rng.normal(size=(3, 2, 5, 4)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 2, 5, 4)), jnp.float32)
    dims = MatrixDimensionNumbers(reduction_axis=2, output_axis=3)
    tx = opx.overparam_precondition(3, dimension_numbers={"w": dims})
    out, _ = tx.update({"w": g}, tx.init({"w": w}), {"w": w})
    for layer in range(3):
        for head in range(2):
            expected = reference_precondition(w[layer, head], g[layer, head], 3)
            assert _rel_err(out["w"][layer, head], expected) < 1e-4


def test_axes_in_any_order_and_multiple_output_axes():
    rng = np.random.default_rng(3)
    # (out, batch, in1, in2) with output axis first: the matrix is (in1*in2, out) per batch.
    w = rng.normal(size=(4, 2, 3, 5))
    g = rng.normal(size=(4, 2, 3, 5))
    dims = MatrixDimensionNumbers(reduction_axis=(2, 3), output_axis=0)
    tx = opx.overparam_precondition(2, dimension_numbers=dims)
    params = {"w": jnp.asarray(w, jnp.float32)}
    out, _ = tx.update({"w": jnp.asarray(g, jnp.float32)}, tx.init(params), params)
    for b in range(2):
        wm = w[:, b].reshape(4, 15).T
        gm = g[:, b].reshape(4, 15).T
        expected = reference_precondition(wm, gm, 2)
        actual = np.asarray(out["w"][:, b]).reshape(4, 15).T
        assert _rel_err(actual, expected) < 1e-4


def test_vector_option_uses_the_single_output_closed_form():
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.normal(size=(7,)), jnp.float32), "b": jnp.ones(3)}
    grads = _grads_like(params)
    dims = {"w": MatrixDimensionNumbers(reduction_axis=0, output_axis=()), "b": None}
    tx = opx.overparam_precondition(4, dimension_numbers=dims)
    out, _ = tx.update(grads, tx.init(params), params)
    expected = reference_precondition(params["w"][None, :], grads["w"][None, :], 4)[0]
    assert _rel_err(out["w"], expected) < 1e-5
    np.testing.assert_array_equal(out["b"], grads["b"])


@pytest.mark.parametrize("as_callable", [False, True])
def test_mask_selects_leaves(as_callable):
    params = _params()
    grads = _grads_like(params)
    mask = {"dense": {"kernel": False, "bias": False}, "conv": {"kernel": True}, "scale": False}
    tx = opx.overparam_precondition(3, mask=(lambda p: mask) if as_callable else mask)
    out, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["dense"]["kernel"], grads["dense"]["kernel"])
    assert not np.allclose(out["conv"]["kernel"], grads["conv"]["kernel"])


def test_composes_with_optax_masked_and_partition():
    params = _params()
    grads = _grads_like(params)
    only_dense = {
        "dense": {"kernel": True, "bias": False},
        "conv": {"kernel": False},
        "scale": False,
    }
    masked = optax.masked(opx.overparam_precondition(2), only_dense)
    out, _ = masked.update(grads, masked.init(params), params)
    expected = reference_precondition(params["dense"]["kernel"], grads["dense"]["kernel"], 2)
    assert _rel_err(out["dense"]["kernel"], expected) < 1e-4
    np.testing.assert_array_equal(out["conv"]["kernel"], grads["conv"]["kernel"])

    labels = jax.tree.map(lambda m: "deep" if m else "plain", only_dense)
    partition = optax.partition(
        {
            "deep": optax.chain(opx.overparam_precondition(2), optax.sgd(1.0)),
            "plain": optax.sgd(1.0),
        },
        labels,
    )
    out, _ = jax.jit(partition.update)(grads, partition.init(params), params)
    assert _rel_err(-out["dense"]["kernel"], expected) < 1e-4
    np.testing.assert_allclose(-out["conv"]["kernel"], grads["conv"]["kernel"], rtol=1e-6)


def test_chain_with_sgd_is_minus_lr_times_preconditioned_gradient():
    params = _params()
    grads = _grads_like(params)
    tx = optax.chain(opx.overparam_precondition(3), optax.sgd(0.1))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    expected = -0.1 * reference_precondition(params["dense"]["kernel"], grads["dense"]["kernel"], 3)
    assert _rel_err(updates["dense"]["kernel"], expected) < 1e-4


def test_init_accepts_shape_dtype_structs_and_state_is_a_namedtuple():
    params = _params()
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    tx = opx.overparam_precondition(3)
    state = tx.init(abstract)
    assert isinstance(state, opx.OverparamPreconditionState)
    assert isinstance(state, tuple) and hasattr(state, "_fields")
    # Abstract evaluation of init and of a whole update step also works.
    abstract_state = jax.eval_shape(tx.init, abstract)
    out_shapes = jax.eval_shape(tx.update, abstract, abstract_state, abstract)[0]
    assert jax.tree.map(lambda s: s.shape, out_shapes) == jax.tree.map(lambda p: p.shape, params)


def test_init_does_no_linear_algebra():
    params = _params()
    jaxpr = jax.make_jaxpr(opx.overparam_precondition(3).init)(params)
    primitives = {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
    assert not primitives & {"svd", "eigh", "dot_general", "qr"}


def test_update_without_params_raises():
    params = _params()
    tx = opx.overparam_precondition(2)
    with pytest.raises(ValueError, match="params"):
        tx.update(_grads_like(params), tx.init(params))
    sgd = opx.overparam_sgd(0.1, N=2)
    with pytest.raises(ValueError, match="params"):
        sgd.update(_grads_like(params), sgd.init(params))


def test_tree_mismatch_names_the_leaf():
    params = _params()
    grads = _grads_like(params)
    grads["dense"]["extra"] = jnp.ones(2)
    tx = opx.overparam_precondition(2)
    with pytest.raises(ValueError, match=r"\['dense'\]\['extra'\]"):
        tx.update(grads, tx.init(params), params)
    grads = _grads_like(params)
    grads["dense"]["kernel"] = jnp.ones((4, 6))
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*shape"):
        tx.update(grads, tx.init(params), params)


def test_dimension_numbers_that_do_not_fit_name_the_leaf():
    params = {"layer": {"kernel": jnp.ones((3, 4))}}
    bad = {"layer": {"kernel": MatrixDimensionNumbers(reduction_axis=0, output_axis=2)}}
    with pytest.raises(ValueError, match=r"\['layer'\]\['kernel'\].*axis 2"):
        opx.overparam_precondition(2, dimension_numbers=bad).init(params)
    overlapping = {"layer": {"kernel": MatrixDimensionNumbers(reduction_axis=0, output_axis=0)}}
    with pytest.raises(ValueError, match=r"\['layer'\]\['kernel'\]"):
        opx.overparam_precondition(2, dimension_numbers=overlapping).init(params)
    with pytest.raises(ValueError, match="same tree structure"):
        opx.overparam_precondition(2, dimension_numbers={"other": None}).init(params)
    with pytest.raises(ValueError, match="same tree structure"):
        opx.overparam_precondition(2, mask={"layer": {}}).init(params)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, jnp.array(3)])
def test_invalid_depth_raises_at_construction(bad):
    with pytest.raises(ValueError, match="N"):
        opx.overparam_precondition(bad)
    with pytest.raises(ValueError, match="N"):
        opx.overparam_sgd(0.1, N=bad)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_updates_keep_the_dtype(dtype):
    params = _params(dtype)
    grads = _grads_like(params)
    tx = optax.chain(opx.overparam_precondition(3), optax.sgd(0.1))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_tree_all_finite(updates)
    # Low precision is computed in float32: compare with the float32 result.
    if dtype != jnp.float32:
        p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        g32 = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
        precondition = opx.overparam_precondition(3)
        low, _ = precondition.update(grads, precondition.init(params), params)
        u32, _ = precondition.update(g32, precondition.init(p32), p32)
        np.testing.assert_array_equal(low["dense"]["kernel"], u32["dense"]["kernel"].astype(dtype))


def test_zero_matrix_strict_rule_gives_zero_update_without_nan():
    params = {"w": jnp.zeros((5, 3)), "v": jnp.zeros((4, 1))}
    grads = {"w": jnp.ones((5, 3)), "v": jnp.ones((4, 1))}
    tx = opx.overparam_precondition(3, plain_gradient_at_zero=False)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["w"], 0.0)
    np.testing.assert_array_equal(out["v"], 0.0)


def test_apply_if_finite_skips_non_finite_steps():
    params = _params()
    tx = optax.apply_if_finite(optax.chain(opx.overparam_precondition(3), optax.sgd(0.1)), 3)
    state = tx.init(params)
    bad = _grads_like(params)
    bad["dense"]["kernel"] = bad["dense"]["kernel"].at[0, 0].set(jnp.nan)
    updates, state = jax.jit(tx.update)(bad, state, params)
    assert int(state.notfinite_count) == 1
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(u, 0.0)
    updates, state = jax.jit(tx.update)(_grads_like(params), state, params)
    assert int(state.notfinite_count) == 0
    assert np.all(np.isfinite(updates["dense"]["kernel"]))


def test_multi_steps_averages_then_preconditions():
    params = _params()
    g1, g2 = _grads_like(params, 1), _grads_like(params, 2)
    tx = optax.MultiSteps(optax.chain(opx.overparam_precondition(2), optax.sgd(1.0)), 2)
    state = tx.init(params)
    u1, state = tx.update(g1, state, params)
    np.testing.assert_array_equal(u1["dense"]["kernel"], 0.0)
    u2, state = tx.update(g2, state, params)
    mean = (np.asarray(g1["dense"]["kernel"]) + np.asarray(g2["dense"]["kernel"])) / 2
    expected = -reference_precondition(params["dense"]["kernel"], mean, 2)
    assert _rel_err(u2["dense"]["kernel"], expected) < 1e-4


def test_overparam_sgd_is_the_papers_rule_with_depth_scaled_decay():
    params = _params()
    grads = _grads_like(params)
    lr, decay, N = 0.05, 0.01, 3
    tx = opx.overparam_sgd(lr, N=N, weight_decay=decay)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    w, g = params["dense"]["kernel"], grads["dense"]["kernel"]
    expected = -lr * (reference_precondition(w, g, N) + decay * N * np.asarray(w))
    assert _rel_err(updates["dense"]["kernel"], expected) < 1e-4
    # Biases are not factorized: plain SGD with plain decay.
    b, gb = params["dense"]["bias"], grads["dense"]["bias"]
    np.testing.assert_allclose(updates["dense"]["bias"], -lr * (gb + decay * b), rtol=1e-6)


def test_inject_hyperparams_with_a_traced_learning_rate():
    params = _params()
    grads = _grads_like(params)
    tx = optax.inject_hyperparams(opx.overparam_sgd, static_args=("N",))(learning_rate=0.1, N=2)
    state = tx.init(params)

    @jax.jit
    def step(state, lr):
        state.hyperparams["learning_rate"] = lr
        return tx.update(grads, state, params)

    u1, _ = step(state, 0.1)
    u2, _ = step(state, 0.2)
    np.testing.assert_allclose(u2["dense"]["kernel"], 2 * u1["dense"]["kernel"], rtol=1e-5)
    # Without static_args, N would be traced: the error says what to do.
    with pytest.raises(ValueError, match="static_args"):
        optax.inject_hyperparams(opx.overparam_sgd)(learning_rate=0.1, N=2).init(params)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(2)(x)


def test_flax_train_state_trains():
    model = _MLP()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 5)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).normal(size=(16, 2)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.chain(opx.overparam_precondition(3), optax.sgd(0.05))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    def loss_fn(p):
        return jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)

    @jax.jit
    def train_step(state):
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(20):
        state, loss = train_step(state)
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]


def test_flax_nnx_optimizer_trains():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(5, 8, rngs=rngs)
            self.out = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x)))

    model = Model(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 5)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).normal(size=(16, 2)), jnp.float32)
    optimizer = nnx.Optimizer(
        model, optax.chain(opx.overparam_precondition(2), optax.sgd(0.05)), wrt=nnx.Param
    )

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0]


def test_mask_recipe_skips_large_leaves():
    """The docstring's recipe for skipping large layers (the v1 max_matrix_size option)."""
    params = {"small": jnp.eye(3) + 0.5, "large": jnp.eye(8) + 0.5}
    grads = _grads_like(params)
    tx = opx.overparam_precondition(2, mask=lambda p: jax.tree.map(lambda x: x.size <= 20, p))
    out, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["large"], grads["large"])
    assert _rel_err(out["small"], reference_precondition(params["small"], grads["small"], 2)) < 1e-4
