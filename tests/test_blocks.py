"""``block_size`` and skipping large leaves with a mask: what they compute, exactly.

``block_size=b`` must give, for every block of the grid of at most b x b blocks (the last
row and column of blocks may be smaller), P applied to that block of W and G alone, as if
the block were its own weight matrix; the zero padding used to batch the blocks must not
change the result. A leaf masked out must get exactly the plain update. The comparisons
run in float64 (``x64`` fixture), where the library's SVD route and a per-block call agree
to ~1e-12, so any tolerance above that would hide a wrong block.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import overparam_optax as opx
from overparam_optax import MatrixDimensionNumbers
from overparam_optax.testing import reference_precondition

RTOL64 = 1e-10  # float64: the SVD route agrees with a per-block reference to ~1e-13


def _rand(shape, seed, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _blockwise_reference(w, g, N, block_size):
    """P on each block of the <= block_size grid, computed separately with no padding."""
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    rows, cols = w.shape
    br, bc = min(block_size, rows), min(block_size, cols)
    out = np.zeros_like(g)
    for r0 in range(0, rows, br):
        for c0 in range(0, cols, bc):
            sl = np.s_[r0 : r0 + br, c0 : c0 + bc]
            out[sl] = reference_precondition(w[sl], g[sl], N)
    return out


def _update(tx, w, g):
    out, _ = jax.jit(tx.update)({"w": g}, tx.init({"w": w}), {"w": w})
    return np.asarray(out["w"])


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize(
    "shape, block_size",
    [
        ((10, 7), 4),  # ragged both ways: blocks 4/4/2 x 4/3, padded to 12 x 8
        ((12, 8), 4),  # exact multiples: no padding at all
        ((5, 17), 6),  # wide: 1 x 3 grid (the row side fits), last block 5 x 5
        ((9, 3), 4),  # only the long side is split: 3 x 1 grid of 4/4/1 x 3 blocks
        ((7, 7), 3),  # square, last block 1 x 1
    ],
)
def test_each_block_is_the_exact_rule_on_that_block(x64, shape, block_size):
    N = 2 if shape[0] % 2 else 3
    w, g = _rand(shape, 0), _rand(shape, 1)
    out = _update(opx.overparam_precondition(N, block_size=block_size), w, g)
    expected = _blockwise_reference(w, g, N, block_size)
    assert _rel(out, expected) < RTOL64
    # and the blocks are really separate: on a generic W this is not the exact rule.
    assert _rel(out, reference_precondition(w, g, N)) > 1e-3


def test_block_size_at_least_the_longest_side_is_the_exact_rule():
    w, g = _rand((6, 9), 2, jnp.float32), _rand((6, 9), 3, jnp.float32)
    exact = _update(opx.overparam_precondition(3), w, g)
    for block_size in (9, 10, 1000):
        np.testing.assert_array_equal(
            _update(opx.overparam_precondition(3, block_size=block_size), w, g), exact
        )


def test_zero_padding_is_exact(x64):
    """Zero rows/columns of W add nothing: P of the padded block, cropped, is P of the block.

    This is the identity the implementation relies on to batch ragged blocks; checked
    directly on ``precondition_matrix`` with rank-deficient and tall/wide blocks too.
    """
    for shape, padded, rank in [((3, 2), (4, 4), 2), ((2, 5), (6, 6), 2), ((4, 4), (6, 5), 2)]:
        w = _rand((shape[0], rank), 4) @ _rand((rank, shape[1]), 5)
        g = _rand(shape, 6)
        wp = jnp.zeros(padded).at[: shape[0], : shape[1]].set(w)
        gp = jnp.zeros(padded).at[: shape[0], : shape[1]].set(g)
        for N in (2, 5):
            p_padded = np.asarray(opx.precondition_matrix(wp, gp, N))
            p_block = np.asarray(opx.precondition_matrix(w, g, N))
            assert _rel(p_padded[: shape[0], : shape[1]], p_block) < RTOL64
            # the padded region only sees G there, which is zero
            np.testing.assert_allclose(p_padded[shape[0] :, :], 0, atol=1e-12)
            np.testing.assert_allclose(p_padded[:, shape[1] :], 0, atol=1e-12)


def test_block_diagonal_w_shows_exactly_how_blocks_differ(x64):
    """W = diag(W1, W2) on the grid: diagonal blocks agree, off-diagonal ones differ.

    For block-diagonal W the exact rule maps block (i, k) of G through the Gram matrices
    of W_i and W_k; the block rule sees W_ik = 0 there, and P_0 = 0 for N >= 2, so under
    the strict rule an all-zero block of W never moves; by default a zero block gets the
    plain gradient instead. This is the documented difference (docs/scaling.md).
    """
    b = 4
    w1, w2 = _rand((b, b), 7), _rand((b, b), 8)
    w = jnp.zeros((2 * b, 2 * b)).at[:b, :b].set(w1).at[b:, b:].set(w2)
    g = _rand((2 * b, 2 * b), 9)
    strict = _update(
        opx.overparam_precondition(3, block_size=b, plain_gradient_at_zero=False), w, g
    )
    default = _update(opx.overparam_precondition(3, block_size=b), w, g)
    exact = reference_precondition(w, g, 3)
    for sl in (np.s_[:b, :b], np.s_[b:, b:]):
        assert _rel(strict[sl], exact[sl]) < RTOL64
        np.testing.assert_array_equal(default[sl], strict[sl])
    for sl in (np.s_[:b, b:], np.s_[b:, :b]):
        np.testing.assert_allclose(strict[sl], 0, atol=1e-12)
        np.testing.assert_array_equal(default[sl], g[sl])
        assert np.linalg.norm(exact[sl]) > 0.1


def test_blocks_apply_per_slice_of_batched_and_conv_leaves(x64):
    """Blocks are cut from each leaf's matrix view: (H*W*I, O) for a conv kernel, and
    separately for each slice along batch axes."""
    N, b = 2, 8
    conv_w, conv_g = _rand((3, 3, 2, 5), 10), _rand((3, 3, 2, 5), 11)  # matrix 18 x 5
    stack_w, stack_g = _rand((3, 10, 6), 12), _rand((3, 10, 6), 13)  # 3 slices of 10 x 6
    params = {"conv": conv_w, "stack": stack_w}
    grads = {"conv": conv_g, "stack": stack_g}
    dims = {
        "conv": MatrixDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3),  # the default
        "stack": MatrixDimensionNumbers(reduction_axis=1, output_axis=2),
    }
    tx = opx.overparam_precondition(N, block_size=b, dimension_numbers=dims)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)

    expected_conv = _blockwise_reference(
        np.reshape(conv_w, (18, 5)), np.reshape(conv_g, (18, 5)), N, b
    ).reshape(3, 3, 2, 5)
    assert _rel(out["conv"], expected_conv) < RTOL64
    for i in range(3):
        expected = _blockwise_reference(stack_w[i], stack_g[i], N, b)
        assert _rel(out["stack"][i], expected) < RTOL64


def test_single_output_leaves_are_never_blocked(x64):
    """An n x 1 (or 1 x n) matrix uses the exact closed form whatever block_size is."""
    w, g = _rand((50, 1), 14), _rand((50, 1), 15)
    out = _update(opx.overparam_precondition(3, block_size=4), w, g)
    assert _rel(out, reference_precondition(w, g, 3)) < RTOL64


def test_blocks_train_under_jit_in_float32():
    """A few steps with blocks on a ragged layer stay finite and reduce the loss."""
    rng = np.random.default_rng(16)
    x = jnp.asarray(rng.normal(size=(64, 20)), jnp.float32)
    target = x @ jnp.asarray(rng.normal(size=(20, 13)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(20, 13)) * 0.3, jnp.float32)}
    tx = opx.overparam_sgd(0.05, N=3, block_size=8)

    def loss(p):
        return jnp.mean((x @ p["w"] - target) ** 2)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    state = tx.init(params)
    losses = []
    for _ in range(30):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------------------
# Leaves skipped by a mask
# ----------------------------------------------------------------------------------------


def _small(params):
    return jax.tree.map(lambda x: x.size <= 4, params)


def test_skipped_leaves_get_the_plain_decay_in_overparam_sgd():
    """overparam_sgd treats a skipped leaf as an ordinary parameter: SGD with decay lambda
    (not N * lambda), and no preconditioning."""
    lr, lam, N = 0.1, 0.01, 3
    params = {"big": jnp.full((4, 4), 0.5), "small": jnp.eye(2) * 2.0}
    grads = {"big": jnp.ones((4, 4)), "small": jnp.ones((2, 2))}
    tx = opx.overparam_sgd(lr, N=N, weight_decay=lam, mask=_small)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(
        updates["big"], -lr * (grads["big"] + lam * params["big"]), rtol=1e-6
    )
    precond = reference_precondition(params["small"], grads["small"], N)
    np.testing.assert_allclose(
        updates["small"], -lr * (precond + N * lam * params["small"]), rtol=1e-5
    )
