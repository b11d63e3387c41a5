"""The default: a right singular basis tracked from update to update, against the exact rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import overparam_optax as opx
from overparam_optax import testing as reference
from overparam_optax.methods import tracked


def _no_basis(shape):
    """The zero basis (no basis yet) of a tall matrix of this shape."""
    return tracked.TrackedBasis(jnp.zeros((shape[-1], shape[-1]), jnp.float32))


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


CASES = ["random", "rank_deficient", "repeated", "ill_conditioned"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (8, 8), (16, 5)])
@pytest.mark.parametrize("tolerance", [None, 1e-6])
def test_tracked_follows_the_reference_along_a_moving_matrix(case, shape, tolerance):
    """Fresh on the first update, then tracked while W moves.

    (16, 5) is applied through n x n factors, the others through W V' and G V'
    (``tracked.near_square``).

    The tolerance bounds P's relative error to first order (``tracked.coupling``). Measured
    at the default (3e-6): up to 6.7e-6 on every case, rank-deficient included (where
    the off-diagonal criterion of 0.2 let 1.45e-3 through); at 1e-6, up to 1.9e-6 on random
    and ill-conditioned W and 5.1e-6 where zero or repeated singular values split.
    """
    rng = np.random.default_rng(0)
    w = _start(case, shape, rng)
    direction = rng.standard_normal(shape)
    params = {"w": jnp.asarray(w, jnp.float32)}
    method = tracked.Tracked() if tolerance is None else tracked.Tracked(tolerance)
    tx = opx.overparam_precondition(3, method=method)
    state = tx.init(params)
    update = jax.jit(tx.update)
    worst = 0.0
    for step in range(6):
        g = rng.standard_normal(shape)
        out, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        want = reference.reference_precondition(np.asarray(params["w"], np.float64), g, 3)
        worst = max(worst, _rel(out["w"], want))
        params = {"w": params["w"] + 1e-4 * jnp.asarray(direction * (step + 1), jnp.float32)}
    if tolerance is None:
        bound = 1e-5
    else:
        bound = 6e-6 if case in ("rank_deficient", "repeated") else 2.5e-6
    assert worst < bound, worst
    # The first update decomposes; so does the second where the start's repeated or zero
    # singular values split (1 or 2 of 6). Zero singular values that the moves lift off
    # zero turn fast as a cluster, which rotations do not follow: up to 5 of 6 (12 x 5).
    most = 5 if case == "rank_deficient" else 2
    assert 1 <= int(state.decompositions) <= most


@pytest.mark.parametrize("shape", [(12, 5), (13, 5), (9, 9), (40, 8)])
@pytest.mark.parametrize("near_square", [True, False])
def test_both_application_routes_match_the_reference(shape, near_square):
    """Through n x n factors or through W V' and G V' (whichever the shape makes cheaper,
    forced here both ways), on a rank-deficient W whose complement term is not zero.
    Measured at most 8.1e-7."""
    rng = np.random.default_rng(3)
    w = _start("random", shape, rng)
    w[:, -1] = 0  # a zero singular value
    basis = _no_basis(shape)
    for step in range(3):  # fresh, then tracked
        g = rng.standard_normal(shape)
        out, basis, _ = tracked.precondition(
            jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32), basis, 3, near=near_square
        )
        want = reference.reference_precondition(w, g, 3)
        assert _rel(out, want) < 1.5e-6, step
        w = w + 1e-4 * rng.standard_normal(shape) * (w != 0).any(axis=0)


@pytest.mark.parametrize("norm", [tracked.MAX_ROTATION_NORM, 0.01])
def test_rotation_is_orthogonal_to_its_series_bound(x64, norm):
    """The Cayley series stops at Y^4 (Y = X/2): ||R^T R - I|| <= 2 ||Y||^6, whose bound on
    ||Y|| is the cap over 2 (measured: a third of the bound, at the cap and far below it)."""
    rng = np.random.default_rng(4)
    n = 6
    lam = np.arange(1.0, n + 1)
    off = rng.standard_normal((n, n))
    off = np.triu(off + off.T, 1) * 3  # large couplings: every angle at its clip
    b = jnp.asarray(np.diag(lam) + off + off.T)[None]
    pairs = jnp.ones((1, n, n), bool)
    r = np.asarray(tracked.jacobi_rotation(b, pairs, jax.lax.Precision.HIGHEST, norm))[0]
    error = np.linalg.norm(r.T @ r - np.eye(n), 2)
    assert error <= 2 * (norm / 2) ** 6 * 1.01, error
    assert error >= 2 * (norm / 2) ** 6 * 0.25, error  # the bound is what it costs


@pytest.mark.parametrize("N", [2, 7])
def test_tracked_at_other_depths(N):
    rng = np.random.default_rng(5)
    w = jnp.asarray(_start("ill_conditioned", (10, 6), rng), jnp.float32)
    basis = _no_basis(w.shape)
    for step in range(4):
        g = rng.standard_normal((10, 6))
        out, basis, fresh = tracked.precondition(w, jnp.asarray(g, jnp.float32), basis, N)
        want = reference.reference_precondition(np.asarray(w, np.float64), g, N)
        assert _rel(out, want) < 4e-6  # measured 4.6e-7 (N = 2) and 2.9e-6 (N = 7)
        assert bool(fresh) == (step == 0)
        w = w + 1e-5


def _start(case, shape, rng):
    m, n = shape
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = {
        "random": rng.uniform(0.2, 1.0, k),
        "rank_deficient": np.r_[rng.uniform(0.5, 1.0, 2), np.zeros(k - 2)],
        "repeated": np.r_[np.full(k - 1, 0.7), 0.2],
        "ill_conditioned": np.logspace(0, -3, k),
    }[case]
    return (u * s) @ v.T


@pytest.mark.parametrize("N", [2, 3])
def test_zero_matrix_and_zero_state_give_no_nan(N):
    params = {"w": jnp.zeros((6, 4))}
    tx = opx.overparam_precondition(N)
    out, state = tx.update({"w": jnp.ones((6, 4))}, tx.init(params), params)
    np.testing.assert_array_equal(out["w"], 1.0)  # plain gradient at an exactly zero matrix
    assert np.all(np.isfinite(state.factors["w"].v))


def test_a_state_of_zeros_is_recomputed_not_applied():
    """A state rebuilt from jax.eval_shape with zeros (as some restores do) decomposes afresh."""
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(_start("random", (10, 6), rng), jnp.float32)}
    g = {"w": jnp.asarray(rng.standard_normal((10, 6)), jnp.float32)}
    tx = opx.overparam_precondition(3)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(tx.init, params))
    out, state = tx.update(g, zeros, params)
    want = reference.reference_precondition(np.asarray(params["w"], np.float64), g["w"], 3)
    assert _rel(out["w"], want) < 2e-6
    assert int(state.decompositions) == 1


@pytest.mark.parametrize("max_rounds", [2, tracked.MAX_TRACKING_ROUNDS])
def test_more_rounds_hold_the_tolerance_where_two_do_not(max_rounds):
    """W's basis turns 0.25 rad in one well-separated pair between two updates.

    Two rounds of at most 0.1 rad leave the error bound above the tolerance; the third
    removes the rest, so no SVD is needed. Capped at two rounds, the update decomposes
    afresh. Either way the update matches the float64 reference.
    """
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((12, 6)))
    v, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    s = np.array([3.0, 2.5, 2.0, 1.5, 1.0, 0.5])
    c, t = np.cos(0.25), np.sin(0.25)
    turn = np.eye(6)
    turn[:2, :2] = [[c, -t], [t, c]]
    g = jnp.asarray(rng.standard_normal((12, 6)), jnp.float32)
    basis, decompositions = _no_basis((12, 6)), 0
    for turned in (v, v @ turn):
        w = jnp.asarray((u * s) @ turned.T, jnp.float32)
        out, basis, fresh = tracked.precondition(w, g, basis, 3, max_rounds=max_rounds)
        decompositions += int(fresh)
    assert decompositions == (2 if max_rounds == 2 else 1)
    assert int(basis.rounds) >= 3 if max_rounds > 2 else int(basis.rounds) == 2
    want = reference.reference_precondition(np.asarray(w, np.float64), np.asarray(g), 3)
    assert _rel(out, want) < 2e-6  # measured 6.1e-7 afresh, 1.3e-6 after 3+ rounds


def test_non_finite_weights_never_poison_the_basis():
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(_start("random", (9, 5), rng), jnp.float32)}
    g = {"w": jnp.asarray(rng.standard_normal((9, 5)), jnp.float32)}
    tx = opx.overparam_precondition(3)
    _, state = tx.update(g, tx.init(params), params)
    kept = np.asarray(state.factors["w"].v)
    bad = {"w": params["w"].at[0, 0].set(jnp.nan)}
    out, state = tx.update(g, state, bad)
    assert not np.all(np.isfinite(out["w"]))  # a NaN weight gives a NaN update ...
    np.testing.assert_array_equal(state.factors["w"].v, kept)  # ... but keeps the basis
    out, state = tx.update(g, state, params)  # rolled back (e.g. optax.apply_if_finite)
    want = reference.reference_precondition(np.asarray(params["w"], np.float64), g["w"], 3)
    assert _rel(out["w"], want) < 2e-6
    # apply_if_finite keeps the inner state of the finite step, so the same holds through it.
    safe = optax.apply_if_finite(optax.chain(tx, optax.sgd(0.1)), max_consecutive_errors=3)
    s = safe.init(params)
    _, s = safe.update(g, s, params)
    _, s = safe.update(g, s, bad)
    assert np.all(np.isfinite(jax.tree.leaves(s.inner_state)[-1]))


def test_default_stays_on_the_exact_trajectory_over_many_updates():
    """l4 regression from near zero and from a clustered (near-identity) start, 150 updates."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 16)) / 4
    y = x @ (np.eye(16) + rng.standard_normal((16, 16)) / 4)

    def loss(p):
        return jnp.mean(jnp.sum((x @ p["w"] - y) ** 4, -1))

    for start, lr in (
        (1e-3 * rng.standard_normal((16, 16)), 0.1),
        (np.eye(16) + 0.01 * rng.standard_normal((16, 16)), 0.02),
    ):
        runs = {}
        for method in ("tracked", "svd"):
            tx = optax.chain(opx.overparam_precondition(3, method=method), optax.sgd(lr))
            p = {"w": jnp.asarray(start, jnp.float32)}
            s = tx.init(p)

            @jax.jit
            def step(p, s, tx=tx):
                u, s = tx.update(jax.grad(loss)(p), s, p)
                return optax.apply_updates(p, u), s

            for _ in range(150):
                p, s = step(p, s)
            runs[method] = (p["w"], s)
        gap = _rel(runs["tracked"][0], runs["svd"][0])
        assert gap < 3e-5, gap  # measured 9.6e-6 (near zero) and 5.2e-7 (near identity)
        # Measured 3 and 4 of 150: the basis is carried, not recomputed.
        assert int(runs["tracked"][1][0].decompositions) <= 8


def test_vmap_over_optimizers_keeps_one_conditional_decomposition():
    """An ensemble (vmap over the optimizer): the decomposition stays behind one lax.cond."""
    rng = np.random.default_rng(4)
    ws = jnp.asarray(np.stack([_start("random", (12, 6), rng) for _ in range(3)]), jnp.float32)
    gs = jnp.asarray(rng.standard_normal((3, 12, 6)), jnp.float32)
    tx = opx.overparam_precondition(3)

    def one(w, g, state):
        return tx.update({"w": g}, state, {"w": w})

    states = jax.vmap(lambda w: tx.init({"w": w}))(ws)
    batched = jax.jit(jax.vmap(one))
    # Counted in the compiled program: the lowered one also holds lax.platform_dependent's
    # one-branch cases around each product (the matmul precision), which XLA removes.
    compiled = batched.lower(ws, gs, states).compile().as_text()
    assert compiled.count(" conditional(") == 1
    out, states = batched(ws, gs, states)
    out2, _ = batched(ws, gs, states)  # tracked, not recomputed
    for i in range(3):
        want = reference.reference_precondition(np.asarray(ws[i], np.float64), np.asarray(gs[i]), 3)
        assert _rel(out["w"][i], want) < 2e-6
        assert _rel(out2["w"][i], want) < 2e-6


def test_state_depends_on_params_and_options_only(monkeypatch):
    params = {"a": jnp.ones((128, 128)), "b": jnp.ones((3, 3, 4, 8)), "c": jnp.ones(5)}
    shapes = []
    for threads in ("1", "2", None):
        if threads is None:
            monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OPENBLAS_NUM_THREADS", threads)
        state = jax.eval_shape(opx.overparam_precondition(3).init, params)
        shapes.append(jax.tree.map(lambda x: (x.shape, x.dtype), state))
    assert shapes[0] == shapes[1] == shapes[2]
    factors = shapes[0].factors
    assert isinstance(factors["a"], tracked.TrackedBasis) and factors["a"].v == (
        (1, 128, 128),
        jnp.float32,
    )
    assert isinstance(factors["c"], optax.MaskedNode)


def test_state_is_at_most_the_matrices_bytes():
    """The default's own state holds an n x n basis per m x n (m >= n) matrix: <= 1x its bytes."""
    params = {"a": jnp.ones((784, 256)), "b": jnp.ones((256, 256)), "c": jnp.ones((256, 10))}
    state = opx.overparam_precondition(3).init(params)
    basis_bytes = sum(x.nbytes for x in jax.tree.leaves(state.factors))
    assert basis_bytes <= sum(x.nbytes for x in jax.tree.leaves(params))


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-3, True, "1e-3", float("nan")])
def test_tolerance_is_checked_at_construction(bad):
    with pytest.raises(ValueError, match="tolerance must be a float in"):
        tracked.Tracked(tolerance=bad)


def test_tolerance_belongs_to_the_tracked_method():
    with pytest.raises(TypeError, match="tolerance"):
        opx.overparam_precondition(3, method="svd", tolerance=1e-4)
    with pytest.raises(TypeError, match="tolerance"):
        opx.methods.Svd(tolerance=1e-4)
    tx = opx.overparam_precondition(3, method=tracked.Tracked(tolerance=1e-3))
    assert isinstance(tx.init({"w": jnp.eye(3)}).factors["w"], tracked.TrackedBasis)


@pytest.mark.parametrize("method", ["tracked", tracked.Tracked(tolerance=1e-3)])
def test_inject_hyperparams_with_the_default(method):
    """Injected, the default gives the plain transform's updates and keeps its basis."""
    params = {"w": jnp.eye(3) + 0.1}
    grads = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)), jnp.float32)}
    tx = optax.inject_hyperparams(opx.overparam_sgd, static_args=("N", "method"))(
        learning_rate=0.1, N=2, method=method
    )
    plain = opx.overparam_sgd(0.1, N=2, method=method)
    state, plain_state = tx.init(params), plain.init(params)
    for _ in range(2):
        out, state = jax.jit(tx.update)(grads, state, params)
        want, plain_state = plain.update(grads, plain_state, params)
        np.testing.assert_allclose(out["w"], want["w"], rtol=1e-6, atol=1e-7)
    basis = state.inner_state[0].factors["w"].v[0]
    np.testing.assert_allclose(basis.T @ basis, np.eye(3), atol=1e-6)  # carried, orthonormal


def test_weight_decay_takes_a_schedule():
    params = {"w": jnp.eye(3), "b": jnp.ones(3)}
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    tx = opx.overparam_sgd(1.0, N=3, weight_decay=schedule)
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    out, state = tx.update(zeros, state, params)
    np.testing.assert_allclose(out["w"], -0.3 * np.eye(3), rtol=1e-6)  # N * lambda on matrices
    np.testing.assert_allclose(out["b"], -0.1 * np.ones(3), rtol=1e-6)  # lambda elsewhere
    out, state = tx.update(zeros, state, params)
    np.testing.assert_allclose(out["b"], -0.09 * np.ones(3), rtol=1e-5)  # the schedule moved


@pytest.mark.parametrize("method", ["tracked", "svd", "eigh"])
@pytest.mark.parametrize("start", ["identity", "scaled_orthogonal"])
def test_grad_through_the_update_is_finite_at_repeated_singular_values(method, start):
    """Meta-learning through tx.update at the paper's near-identity start: was NaN."""
    rng = np.random.default_rng(6)
    w0 = np.eye(4) if start == "identity" else 2.0 * np.linalg.qr(rng.standard_normal((4, 4)))[0]
    g = rng.standard_normal((4, 4))
    tx = opx.overparam_precondition(3, method=method)

    def loss(w):
        out, _ = tx.update({"w": jnp.asarray(g, jnp.float32)}, tx.init({"w": w}), {"w": w})
        return jnp.sum(jnp.sin(out["w"]))

    got = np.asarray(jax.grad(loss)(jnp.asarray(w0, jnp.float32)))
    eps, want = 1e-6, np.zeros((4, 4))
    for i in range(4):
        for j in range(4):
            d = np.zeros((4, 4))
            d[i, j] = eps
            plus = np.sum(np.sin(reference.reference_precondition(w0 + d, g, 3)))
            minus = np.sum(np.sin(reference.reference_precondition(w0 - d, g, 3)))
            want[i, j] = (plus - minus) / (2 * eps)
    assert np.all(np.isfinite(got))
    assert np.abs(got - want).max() < 2e-5 * max(1.0, np.abs(want).max())
