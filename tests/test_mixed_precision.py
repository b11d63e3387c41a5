"""bfloat16 / float16 params and grads: computed in float32, cast back, and training tracks f32.

The contract (docs/scaling.md): the preconditioner upcasts low-precision inputs to float32
for the decomposition and every matmul around it, and the update comes back in the
gradient's dtype. So a low-precision update must equal the float32 computation on the same
(upcast) values, rounded once to the low dtype.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import overparam_optax as opx

LOW_DTYPES = [jnp.bfloat16, jnp.float16]


def _tree(seed, dtype):
    rng = np.random.default_rng(seed)
    return {
        "dense": jnp.asarray(rng.normal(size=(12, 7)) * 0.5, dtype),
        "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4)) * 0.5, dtype),
        "head": jnp.asarray(rng.normal(size=(7, 1)) * 0.5, dtype),
        "bias": jnp.asarray(rng.normal(size=(7,)), dtype),
    }


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("block_size", [None, 4])
def test_low_precision_update_is_the_f32_result_rounded_once(dtype, block_size):
    params, grads = _tree(0, dtype), _tree(1, dtype)
    tx = opx.overparam_precondition(3, block_size=block_size)
    update = jax.jit(tx.update)
    low, _ = update(grads, tx.init(params), params)
    up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    f32, _ = update(up(grads), tx.init(up(params)), up(params))
    for name in params:
        assert low[name].dtype == dtype, name
        assert bool(jnp.all(jnp.isfinite(low[name]))), name
        expected = np.asarray(f32[name].astype(dtype).astype(jnp.float32))
        got = np.asarray(low[name].astype(jnp.float32))
        # One rounding of the same float32 value: equal up to at most one ulp of the low
        # dtype (XLA may fuse the final cast differently in the two programs).
        ulp = np.abs(expected) * float(jnp.finfo(dtype).eps) + float(jnp.finfo(dtype).tiny)
        assert np.all(np.abs(got - expected) <= ulp), name


def _linalg_dtypes(jaxpr):
    """Operand dtypes of every decomposition and matmul in a jaxpr, recursively."""
    found = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("svd", "eigh", "qr", "cholesky", "dot_general", "lu"):
            found.extend((name, v.aval.dtype) for v in eqn.invars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_linalg_dtypes(sub))
    return found


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_decomposition_and_matmuls_run_in_float32(dtype):
    params, grads = _tree(2, dtype), _tree(3, dtype)
    tx = opx.overparam_precondition(3)
    jaxpr = jax.make_jaxpr(tx.update)(grads, tx.init(params), params).jaxpr
    ops = _linalg_dtypes(jaxpr)
    assert any(name in ("svd", "eigh", "qr", "dot_general") for name, _ in ops)
    low = [(name, d) for name, d in ops if d in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))]
    assert not low, f"linear algebra in low precision: {low}"


def test_float16_large_weights_do_not_overflow():
    """||W||^2 = 4e4 * 64 would overflow float16 (max 65504); float32 inside avoids it."""
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.normal(size=(64, 16)) * 200.0, jnp.float16)
    g = jnp.asarray(rng.normal(size=(64, 16)) * 1e-3, jnp.float16)
    out = opx.precondition_matrix(w, g, 2)
    assert out.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(out)))
    ref = opx.precondition_matrix(w.astype(jnp.float32), g.astype(jnp.float32), 2)
    atol = 1e-3 * float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=2e-3, atol=atol)


def _teacher_data(n=256, d=16, k=4, seed=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w_teacher = rng.normal(size=(d, k)).astype(np.float32) / np.sqrt(d)
    return x, np.tanh(x @ w_teacher * 2.0).astype(np.float32)


def _train(dtype, steps=60):
    """A 16-32-4 tanh MLP, params, activations and grads all in ``dtype``; loss in f32."""
    x, y = _teacher_data()
    rng = np.random.default_rng(6)
    params = {
        "w1": jnp.asarray(rng.normal(size=(16, 32)) / 4.0, dtype),
        "b1": jnp.zeros((32,), dtype),
        "w2": jnp.asarray(rng.normal(size=(32, 4)) / np.sqrt(32), dtype),
    }
    x, y = jnp.asarray(x, dtype), jnp.asarray(y, jnp.float32)
    tx = opx.overparam_sgd(0.05, N=3, momentum=0.9)

    def loss_fn(p):
        pred = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
        return jnp.mean((pred.astype(jnp.float32) - y) ** 2)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    state, losses = tx.init(params), []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
    return np.asarray(losses)


def test_bfloat16_training_tracks_float32():
    """bf16 keeps 8 significant bits: per-step losses drift by ~1% (measured: at most 0.95%);
    the run must still follow the float32 curve closely and converge as far."""
    f32 = _train(jnp.float32)
    bf16 = _train(jnp.bfloat16)
    assert f32[-1] < 0.2 * f32[0]  # the run actually learns
    rel = np.abs(bf16 - f32) / f32
    assert rel.max() < 0.05, rel.max()
    assert rel[-10:].mean() < 0.03, rel[-10:].mean()


# --------------------------------------------------------------------------------------
# The matmul precision of precision=None (the default), per platform: lowered for each
# platform here, on any machine (numerics.PLATFORM_PRECISION; docs/performance.md).
# --------------------------------------------------------------------------------------

BF16_X3 = "lhs_precision_type = bf16, rhs_precision_type = bf16, accumulation_type = f32"


def _lowered_update(platform, dtype=jnp.float32, **options):
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(24, 16)), dtype)}
    tx = opx.overparam_precondition(3, **options)
    traced = jax.jit(tx.update).trace(params, tx.init(params), params)
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert dots
    return dots


@pytest.mark.parametrize("method", ["tracked", "svd", "newton"])
def test_default_precision_is_three_bf16_passes_on_gpu(method):
    dots = _lowered_update("cuda", method=method)
    assert all(BF16_X3 in d and "num_primitive_operations = 3" in d for d in dots), dots[0]


@pytest.mark.parametrize("method", ["tracked", "newton"])
def test_default_precision_is_highest_on_cpu_and_high_on_tpu(method):
    assert all("precision = [HIGHEST, HIGHEST]" in d for d in _lowered_update("cpu", method=method))
    # On TPU jax's own SVD adds HIGHEST products; every product of ours is HIGH.
    tpu = _lowered_update("tpu", method=method)
    assert any("precision = [HIGH, HIGH]" in d for d in tpu)
    assert not any("DEFAULT" in d or BF16_X3 in d for d in tpu)


def test_an_explicit_precision_and_float64_override_the_platform_choice():
    explicit = _lowered_update("cuda", precision=jax.lax.Precision.HIGHEST)
    assert all("precision = [HIGHEST, HIGHEST]" in d for d in explicit)
    with jax.enable_x64(True):  # bfloat16 passes are for float32 operands only
        wide = _lowered_update("cuda", dtype=jnp.float64)
    assert all("precision = [HIGHEST, HIGHEST]" in d for d in wide)


def test_jax_default_matmul_precision_wins_over_the_platform_choice():
    with jax.default_matmul_precision("highest"):
        dots = _lowered_update("cuda")
    assert not any(BF16_X3 in d for d in dots)
