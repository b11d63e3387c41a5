"""The decomposition methods (svd, eigh, newton) and batching, against the exact rule."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import overparam_optax as opx
from overparam_optax import methods
from overparam_optax.methods import newton
from overparam_optax.testing import reference_precondition
from tests.scripts import load_script

REPO = pathlib.Path(__file__).resolve().parents[1]


def _well_conditioned(rng, m, n, low=0.3):
    """A matrix with singular values spread over [low, 1] (a typical trained layer)."""
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = np.linspace(1.0, low, min(m, n))
    return ((u * s) @ v.T).astype(np.float32)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize(
    "shape, N", [((40, 12), 3), ((12, 40), 2), ((30, 30), 4), ((1, 6), 3), ((3, 40, 8), 3)]
)
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_methods_match_exact(shape, N, method):
    rng = np.random.default_rng(0)
    if len(shape) == 3:
        w = np.stack([_well_conditioned(rng, *shape[1:]) for _ in range(shape[0])])
    else:
        w = _well_conditioned(rng, *shape)
    g = rng.standard_normal(shape).astype(np.float32)
    exact = opx.precondition_matrix(w, g, N)
    fast = opx.precondition_matrix(w, g, N, method=method)
    assert fast.shape == exact.shape and fast.dtype == exact.dtype
    assert _rel(fast, exact) < (2e-5 if method != "newton" else 1e-3)


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_methods_zero_and_rank_deficient(method):
    zero = jnp.zeros((6, 4))
    out = opx.precondition_matrix(zero, jnp.ones((6, 4)), 3, method=method)
    np.testing.assert_array_equal(out, 0)
    rng = np.random.default_rng(1)
    low_rank = (rng.standard_normal((8, 2)) @ rng.standard_normal((2, 5))).astype(np.float32)
    g = rng.standard_normal((8, 5)).astype(np.float32)
    exact = opx.precondition_matrix(low_rank, g, 3)
    out = opx.precondition_matrix(low_rank, g, 3, method=method)
    assert np.all(np.isfinite(out))
    assert _rel(out, exact) < {"eigh": 3e-6, "newton": 1e-4}[method]  # measured 7.6e-7, 3.7e-5


def test_eigh_error_on_ill_conditioned_is_bounded():
    # Gram route: singular values below ~sqrt(eps) s_max are not resolved; measured ~2e-4.
    rng = np.random.default_rng(2)
    u, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    w = ((u * np.logspace(0, -3, 64)) @ u.T).astype(np.float32)
    g = rng.standard_normal((64, 64)).astype(np.float32)
    assert (
        _rel(opx.precondition_matrix(w, g, 3, method="eigh"), opx.precondition_matrix(w, g, 3))
        < 3e-3
    )


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        opx.overparam_precondition(3, method="qr")
    with pytest.raises(ValueError, match="method"):  # a single call has no basis to carry
        opx.precondition_matrix(jnp.eye(2), jnp.eye(2), 3, method="tracked")


@pytest.mark.parametrize("method", ["svd", "eigh", "newton"])
def test_cached_factors_reproduce_the_exact_update(method):
    rng = np.random.default_rng(3)
    w = jnp.asarray(_well_conditioned(rng, 20, 7))
    g = jnp.asarray(rng.standard_normal((20, 7)), jnp.float32)
    chosen = methods.resolve(method)
    factors = chosen.factors(w, 3, jax.lax.Precision.HIGHEST)
    out = chosen.apply(factors, g, 3, jax.lax.Precision.HIGHEST)
    tol = 1e-3 if method == "newton" else 2e-5
    assert _rel(out, opx.precondition_matrix(w, g, 3)) < tol


def _tree(rng):
    return {
        "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 4)) * 0.3, jnp.float32)},
        "a": {"kernel": jnp.asarray(_well_conditioned(rng, 10, 6)), "bias": jnp.zeros(6)},
        "b": {"kernel": jnp.asarray(_well_conditioned(rng, 10, 6))},  # same shape: one batch
        "wide": {"kernel": jnp.asarray(_well_conditioned(rng, 5, 9))},
        "head": {"kernel": jnp.asarray(rng.standard_normal((6, 1)), jnp.float32)},
    }


@pytest.mark.parametrize("method", ["tracked", "eigh", "newton"])
def test_transform_methods_match_exact(method):
    rng = np.random.default_rng(4)
    params = _tree(rng)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    exact_tx = opx.overparam_precondition(3, method="svd")
    fast_tx = opx.overparam_precondition(3, method=method)
    exact, _ = exact_tx.update(grads, exact_tx.init(params), params)
    fast, _ = jax.jit(fast_tx.update)(grads, fast_tx.init(params), params)
    tol = 1e-3 if method == "newton" else 5e-5
    chex.assert_trees_all_equal_shapes_and_dtypes(exact, fast)
    for e, f in zip(jax.tree.leaves(exact), jax.tree.leaves(fast), strict=True):
        assert _rel(f, e) < tol or float(jnp.linalg.norm(e)) == 0


def test_batching_same_shapes_equals_per_leaf():
    rng = np.random.default_rng(5)
    params = _tree(rng)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    tx = opx.overparam_precondition(3, method="svd")
    out, _ = tx.update(grads, tx.init(params), params)
    for name in ("a", "b"):
        single = opx.precondition_matrix(params[name]["kernel"], grads[name]["kernel"], 3)
        np.testing.assert_allclose(out[name]["kernel"], single, rtol=1e-5, atol=1e-6)


def test_overparam_sgd_passes_method_through():
    params = {"w": jnp.asarray(_well_conditioned(np.random.default_rng(8), 6, 4))}
    grads = {"w": jnp.ones((6, 4))}
    exact = opx.overparam_sgd(0.1, N=3, method="svd")
    fast = opx.overparam_sgd(0.1, N=3, method="eigh")
    e, _ = exact.update(grads, exact.init(params), params)
    f, _ = fast.update(grads, fast.init(params), params)
    assert _rel(f["w"], e["w"]) < 5e-5


@pytest.mark.parametrize(
    "script, extra",
    [
        ("linalg_scaling.py", []),
        ("step_time.py", ["--targets", "2"]),
        ("matmul_method.py", ["--ratio-precisions", "HIGHEST,BF16_BF16_F32_X3"]),
    ],
)
def test_benchmark_smoke(script, extra, tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--out", str(out)]
    result = subprocess.run(command + extra, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.exists()
    if script == "matmul_method.py":  # one timed, checked row per depth and precision
        rows = json.loads(out.read_text())["ratio"]
        assert {(r["N"], r["precision"]) for r in rows} == {
            (N, p) for N in (2, 3) for p in ("HIGHEST", "BF16_BF16_F32_X3")
        }
        assert all(r["seconds"] > 0 and max(r["relative_error"].values()) < 1e-3 for r in rows)


def test_matmul_method_partial_runs_do_not_replace_the_full_record():
    module = load_script("benchmarks/matmul_method.py")
    assert module.result_name(module.DEFAULT_SECTIONS) == "matmul_method"
    assert module.result_name(["tune"]) == "matmul_method_tune"
    assert module.result_name(["ratio", "cnn"]) == "matmul_method_ratio_cnn"
    from absl import flags

    from overparam_experiments import flags as xflags

    for argv in (["--blas-threads", "2"], ["--ratio-precisions", "HIGHEST,FOO"]):
        with pytest.raises(flags.Error, match=argv[0][2:]):
            xflags.parse(module.define_flags, argv)
    assert xflags.parse(module.define_flags, ["--error-depths", "9,16"]).error_depths == [9, 16]


def test_matmul_method_honours_platform():
    # jax is imported before main runs, so the platform must reach jax.config, not only
    # the environment: asking for a TPU on this CPU-only machine must fail, not run on CPU.
    command = [sys.executable, str(REPO / "benchmarks" / "matmul_method.py"), "--platform",
               "tpu", "--quick", "--sections", "ratio", "--out", os.devnull]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "tpu" in result.stderr.lower()


# --------------------------------------------------------------------------------------
# The matmul-only method ("newton") against the independent float64 reference
# (issue 12, item 2): <= 1e-3 relative error for condition numbers up to 1e3, N <= 8.
# Eager calls of depth_factors/apply_depth_factors (no compilation) keep this fast.
# --------------------------------------------------------------------------------------


def _spectrum_matrix(rng, m, n, s):
    k = len(s)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (u * np.asarray(s, float)) @ v.T


def _families(rng, m, n):
    """Tall m x n test matrices (float64): the spectra of issue 12 plus degenerate cases."""
    k = min(m, n)
    families = {
        f"condition_{c:g}": _spectrum_matrix(rng, m, n, np.logspace(0, -np.log10(c), k))
        for c in (1.0, 1e1, 1e2, 1e3)
    }
    families["two_clusters_1e3"] = _spectrum_matrix(
        rng, m, n, [1.0] * (k // 2) + [1e-3] * (k - k // 2)
    )
    families["rank_deficient_1e3"] = _spectrum_matrix(rng, m, n, np.logspace(0, -3, k // 2))
    families["repeated"] = _spectrum_matrix(rng, m, n, [2.0] * 3 + [0.5] * (k - 3))
    families["gaussian"] = rng.standard_normal((m, n))
    families["zero"] = np.zeros((m, n))
    return families


def _relative_to_reference(actual, w, g, N):
    expected = reference_precondition(w, g, N)
    norm = np.linalg.norm(expected)
    if norm == 0:
        return float(np.abs(np.asarray(actual)).max())
    return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / norm)


@pytest.mark.parametrize("N", range(2, 9))
def test_newton_within_1e3_of_reference_up_to_condition_1e3(N):
    rng = np.random.default_rng(100 + N)
    m, n = 20, 12
    families = _families(rng, m, n)
    w = np.stack(list(families.values()))
    g = rng.standard_normal(w.shape)
    factors = newton.polar_root(jnp.asarray(w, jnp.float32), N, jax.lax.Precision.HIGHEST)
    highest = jax.lax.Precision.HIGHEST
    out = newton.apply_polar_root(factors, jnp.asarray(g, jnp.float32), N, highest)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    errors = {
        name: _relative_to_reference(out[i], w[i], g[i], N) for i, name in enumerate(families)
    }
    assert max(errors.values()) < 1e-3, errors
    np.testing.assert_array_equal(out[list(families).index("zero")], 0.0)


@pytest.mark.parametrize("shape", [(12, 20), (16, 16), (1, 9), (9, 1)])
@pytest.mark.parametrize("N", [3, 8])
def test_newton_wide_square_and_vector_shapes(shape, N):
    rng = np.random.default_rng(7)
    w = _spectrum_matrix(rng, *shape, np.logspace(0, -3, min(shape)))
    g = rng.standard_normal(shape)
    out = opx.precondition_matrix(
        jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32), N, method="newton"
    )
    assert out.shape == shape and out.dtype == jnp.float32
    assert _relative_to_reference(out, w, g, N) < 1e-3


def test_newton_low_precision_parameters_keep_their_dtype():
    rng = np.random.default_rng(8)
    w = jnp.asarray(_well_conditioned(rng, 10, 6), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((10, 6)), jnp.bfloat16)
    out = opx.precondition_matrix(w, g, 3, method="newton")
    assert out.dtype == jnp.bfloat16
    exact = opx.precondition_matrix(w.astype(jnp.float32), g.astype(jnp.float32), 3)
    assert _rel(out.astype(jnp.float32), exact) < 1e-2  # bf16 output rounding


def test_newton_factor_types_and_init():
    w = jnp.asarray(_well_conditioned(np.random.default_rng(9), 3 * 10, 6).reshape(3, 10, 6))
    factors = newton.polar_root(w, 4, jax.lax.Precision.HIGHEST)
    assert isinstance(factors, newton.PolarRoot)
    assert factors.q.shape == (3, 10, 6) and factors.root.shape == (3, 6, 6)
    assert factors.scale.shape == (3,)
    # The factors of a zero W apply to zero, never NaN.
    zero = newton.polar_root(jnp.zeros((3, 10, 6)), 4, jax.lax.Precision.HIGHEST)
    out = newton.apply_polar_root(zero, jnp.ones((3, 10, 6)), 4, jax.lax.Precision.HIGHEST)
    np.testing.assert_array_equal(out, 0)
