"""``mask`` and ``dimension_numbers`` as optax writes them: prefix trees and Muon's specs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers

import overparam_optax as opx
from overparam_optax import MatrixDimensionNumbers
from overparam_optax.testing import reference_precondition

MUON = MuonDimensionNumbers
MATRIX = MatrixDimensionNumbers


def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {
        "dense": {"kernel": (6, 4), "bias": (4,)},
        "block": {"attn": {"q": (4, 4), "k": (4, 5)}, "mlp": {"up": (4, 8), "down": (8, 4)}},
        "stack": (2, 4, 3),
        "conv": {"kernel": (3, 3, 2, 4)},
        "scale": (4,),
    }
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(d, int) for d in s),
    )


def _grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _updates(tx, params, steps=2):
    """The updates of a few steps, the params moving between them (so bases are re-used)."""
    state, out, update = tx.init(params), [], jax.jit(tx.update)
    for step in range(steps):
        updates, state = update(_grads(params, seed=step + 1), state, params)
        out.append(updates)
        params = jax.tree.map(lambda p, u: p - 0.1 * u, params, updates)
    return out


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _differs_from_gradient(updates, params):
    """Per leaf, whether a first update (of the gradient ``_grads(params)``) differs from it."""
    return jax.tree.map(lambda u, g: not np.array_equal(u, g), updates, _grads(params))


def _changed(tx, params):
    """Per leaf, whether the first update differs from the gradient (it was preconditioned)."""
    updates, _ = jax.jit(tx.update)(_grads(params), tx.init(params), params)
    return _differs_from_gradient(updates, params)


def _expand(prefix, params, is_leaf=None):
    """A prefix tree written out in full: each value repeated over its subtree's leaves."""
    return jax.tree.map(
        lambda value, sub: jax.tree.map(lambda _: value, sub), prefix, params, is_leaf=is_leaf
    )


# --------------------------------------------------------------------------------------
# mask: every prefix tree that optax.masked accepts.
# --------------------------------------------------------------------------------------

PREFIX_MASKS = {
    "root-true": True,
    "root-false": False,
    "depth-1": {"dense": True, "block": False, "stack": True, "conv": True, "scale": False},
    "depth-2": {
        "dense": {"kernel": True, "bias": False},
        "block": {"attn": True, "mlp": False},
        "stack": False,
        "conv": True,
        "scale": True,
    },
    "depth-3": {
        "dense": False,
        "block": {"attn": {"q": True, "k": False}, "mlp": True},
        "stack": True,
        "conv": {"kernel": False},
        "scale": False,
    },
    "numpy-and-jax-bools": {
        "dense": np.bool_(True),
        "block": {"attn": jnp.array(False), "mlp": np.array(True)},
        "stack": False,
        "conv": True,
        "scale": False,
    },
}


@pytest.mark.parametrize(
    "name, as_callable",
    [(name, False) for name in PREFIX_MASKS] + [("root-true", True), ("depth-3", True)],
)
def test_prefix_mask_matches_optax_masked(name, as_callable):
    params = _params()
    mask = PREFIX_MASKS[name]
    given = (lambda p: mask) if as_callable else mask
    ours = _updates(opx.overparam_precondition(2, mask=given), params)
    theirs = _updates(optax.masked(opx.overparam_precondition(2), given), params)
    for a, b in zip(ours, theirs, strict=True):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), a, b)
    # Not vacuous: exactly the leaves the mask selects (all have >= 2 axes) are changed.
    # ours[0] is the update of the gradient _grads(params) at these params.
    selected = _expand(mask, params)
    selected = jax.tree.map(lambda keep, p: bool(keep) and p.ndim >= 2, selected, params)
    assert _differs_from_gradient(ours[0], params) == selected


@pytest.mark.parametrize("method", ["tracked", "svd"])
@pytest.mark.parametrize("name", ["depth-1", "depth-2", "depth-3"])
def test_prefix_mask_is_its_full_tree_bitwise(name, method):
    params = _params()
    prefix = PREFIX_MASKS[name]
    full = _expand(prefix, params)
    a = _updates(opx.overparam_precondition(3, method=method, mask=prefix), params)
    b = _updates(opx.overparam_precondition(3, method=method, mask=full), params)
    _assert_same(a, b)


def test_prefix_mask_under_jit_and_in_overparam_sgd():
    params = _params()
    prefix = PREFIX_MASKS["depth-2"]
    full = _expand(prefix, params)
    tx = opx.overparam_sgd(0.1, N=2, weight_decay=0.01, mask=prefix)
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(_grads(params), state, params)
    reference = opx.overparam_sgd(0.1, N=2, weight_decay=0.01, mask=full)
    expected, _ = reference.update(_grads(params), reference.init(params), params)
    close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(close, updates, expected)
    # The depth-scaled decay follows the mask too: a masked-out matrix gets the plain decay.
    plain = opx.overparam_sgd(0.1, N=2, weight_decay=0.01, mask=False)
    plain_updates, _ = plain.update(_grads(params), plain.init(params), params)
    np.testing.assert_allclose(updates["stack"], plain_updates["stack"], rtol=1e-6)
    assert not np.allclose(updates["conv"]["kernel"], plain_updates["conv"]["kernel"])


def test_issue_example_prefix_mask():
    params = {"dense": {"kernel": _params()["dense"]["kernel"], "bias": jnp.ones(4)}}
    grads = _grads(params)
    tx = opx.overparam_precondition(N=2, mask={"dense": True})
    updates, _ = tx.update(grads, tx.init(params), params)
    w, g = params["dense"]["kernel"], grads["dense"]["kernel"]
    np.testing.assert_allclose(
        updates["dense"]["kernel"], reference_precondition(w, g, 2), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(updates["dense"]["bias"], grads["dense"]["bias"])


# --------------------------------------------------------------------------------------
# dimension_numbers: optax.contrib.MuonDimensionNumbers wherever MatrixDimensionNumbers go.
# --------------------------------------------------------------------------------------


def _as(kind, tree):
    """``tree`` with every MuonDimensionNumbers rewritten as ``kind``."""
    return jax.tree.map(
        lambda x: kind(*x) if isinstance(x, MUON) else x,
        tree,
        is_leaf=lambda x: isinstance(x, MUON),
    )


# Each gives a spec (or None) only where muon accepts one: leaves of rank >= 2.
MUON_TREES = {
    "per-leaf": {
        "dense": {"kernel": MUON(0, 1), "bias": None},
        "block": {
            "attn": {"q": MUON(0, 1), "k": None},
            "mlp": {"up": MUON(1, 0), "down": MUON(0, 1)},
        },
        "stack": MUON(1, 2),
        "conv": {"kernel": MUON((0, 1, 2), 3)},
        "scale": None,
    },
    "prefix": {
        "dense": {"kernel": MUON(0, 1), "bias": None},
        "block": MUON(0, 1),
        "stack": MUON(1, 2),
        "conv": None,
        "scale": None,
    },
    "prefix-deeper": {
        "dense": None,
        "block": {"attn": None, "mlp": MUON(0, 1)},
        "stack": MUON((0, 1), 2),
        "conv": {"kernel": MUON((0, 1, 2), 3)},
        "scale": None,
    },
}


@pytest.mark.parametrize(
    "name, as_callable", [(name, False) for name in MUON_TREES] + [("prefix", True)]
)
def test_muon_dimension_numbers_give_the_updates_of_ours(name, as_callable):
    params = _params()
    trees = [MUON_TREES[name], _as(MATRIX, MUON_TREES[name])]
    if as_callable:
        trees = [lambda p, t=t: t for t in trees]
    muon, matrix = (
        _updates(opx.overparam_precondition(2, dimension_numbers=t), params) for t in trees
    )
    _assert_same(muon, matrix)


@pytest.mark.parametrize("spec", [(0, 1), (1, 0), ((0, 1), 2), (2, (0, 1))])
def test_a_single_muon_spec_is_a_single_matrix_spec(spec):
    rank = 2 if spec in ((0, 1), (1, 0)) else 3
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.normal(size=(5, 3, 4)[:rank]), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(2, 4, 3)[:rank]), jnp.float32),
        "bias": jnp.ones(3),
    }
    muon = opx.overparam_precondition(3, dimension_numbers=MUON(*spec))
    matrix = opx.overparam_precondition(3, dimension_numbers=MATRIX(*spec))
    _assert_same(_updates(muon, params), _updates(matrix, params))
    # The 1-D bias passes through, as under one MatrixDimensionNumbers for all leaves.
    assert _changed(muon, params) == {"w": True, "v": True, "bias": False}


def test_muon_spec_at_a_rank_1_leaf_applies_as_ours_do():
    params = _params()
    dims = {"dense": {"kernel": None, "bias": MUON(0, ())}, "block": None, "stack": None}
    dims |= {"conv": None, "scale": MATRIX(0, ())}
    a = _updates(opx.overparam_precondition(2, dimension_numbers=dims), params)
    b = _updates(opx.overparam_precondition(2, dimension_numbers=_as(MATRIX, dims)), params)
    _assert_same(a, b)
    assert not np.array_equal(a[0]["dense"]["bias"], _grads(params)["dense"]["bias"])


@pytest.mark.parametrize("name", list(MUON_TREES))
def test_prefix_spec_is_its_full_tree(name):
    params = _params()
    prefix = _as(MATRIX, MUON_TREES[name])
    full = _expand(prefix, params, is_leaf=lambda x: x is None or isinstance(x, MATRIX))
    a = _updates(opx.overparam_precondition(2, dimension_numbers=prefix), params)
    b = _updates(opx.overparam_precondition(2, dimension_numbers=full), params)
    _assert_same(a, b)


def test_prefix_spec_skips_the_rank_1_leaves_of_its_subtree():
    params = _params()
    dims = {"dense": MUON(0, 1), "block": None, "stack": None, "conv": None, "scale": None}
    explicit = dict(dims, dense={"kernel": MUON(0, 1), "bias": None})
    a = _updates(opx.overparam_precondition(2, dimension_numbers=dims), params)
    b = _updates(opx.overparam_precondition(2, dimension_numbers=explicit), params)
    _assert_same(a, b)
    assert _changed(opx.overparam_precondition(2, dimension_numbers=dims), params)["dense"] == {
        "kernel": True,
        "bias": False,
    }


def _muon_matrix_leaves(dims, params):
    """Per leaf, whether optax.contrib.muon orthogonalizes it (it keeps a Muon momentum)."""
    state = optax.contrib.muon(0.1, muon_weight_dimension_numbers=dims).init(params)
    mu = optax.tree_utils.tree_get(state.inner_states["muon"], "mu")
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return jax.tree.map(lambda x: not is_masked(x), mu, is_leaf=is_masked)


@pytest.mark.parametrize("name", list(MUON_TREES))
def test_the_leaves_muon_treats_as_matrices_are_ours(name):
    params = _params()
    dims = MUON_TREES[name]
    ours = _changed(opx.overparam_precondition(2, dimension_numbers=dims), params)
    assert ours == _muon_matrix_leaves(dims, params)
    assert any(jax.tree.leaves(ours)) and not all(jax.tree.leaves(ours))


def test_stacked_muon_spec_preconditions_slice_by_slice():
    params = _params()
    dims = {"dense": None, "block": None, "stack": MUON(1, 2), "conv": None, "scale": None}
    grads = _grads(params)
    tx = opx.overparam_precondition(2, dimension_numbers=dims)
    updates, _ = tx.update(grads, tx.init(params), params)
    for i in range(2):
        expected = reference_precondition(params["stack"][i], grads["stack"][i], 2)
        np.testing.assert_allclose(updates["stack"][i], expected, rtol=1e-5, atol=1e-5)


def test_issue_example_muon_dimension_numbers():
    params = {"dense": {"kernel": _params()["dense"]["kernel"], "bias": jnp.ones(4)}}
    grads = _grads(params)
    dims = {"dense": {"kernel": MUON(reduction_axis=0, output_axis=1), "bias": None}}
    tx = opx.overparam_precondition(N=2, dimension_numbers=dims)
    updates, _ = tx.update(grads, tx.init(params), params)
    w, g = params["dense"]["kernel"], grads["dense"]["kernel"]
    np.testing.assert_allclose(
        updates["dense"]["kernel"], reference_precondition(w, g, 2), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(updates["dense"]["bias"], grads["dense"]["bias"])


# --------------------------------------------------------------------------------------
# Trees that do not fit: the message names the path and what was expected there.
# --------------------------------------------------------------------------------------

_STRUCTURE = r"must have the same tree structure as the params, or a prefix of it"
_OTHERS = {"block": True, "stack": True, "conv": True, "scale": True}


@pytest.mark.parametrize(
    "mask, match",
    [
        (
            {"dense": {"kernel": True}, **_OTHERS},
            _STRUCTURE + r".*a bool.*at \['dense'\] the params hold \['bias'\], \['kernel'\]",
        ),
        (
            {"dense": True, "block": {"attn": True}, "stack": True, "conv": True, "scale": True},
            _STRUCTURE + r".*at \['block'\] the params hold \['attn'\], \['mlp'\]",
        ),
        (
            {"dense": True, "block": True},
            _STRUCTURE + r".*at the top level the params hold \['block'\], \['conv'\], "
            r"\['dense'\], \['scale'\], \['stack'\]; got \{'dense'",
        ),
        ({"dense": None, **_OTHERS}, _STRUCTURE + r".*at \['dense'\].*got None"),
        (
            {"dense": True, "block": True, "stack": {"a": True}, "conv": True, "scale": True},
            r"mask at \['stack'\]: expected a bool for this parameter, got \{'a': True\}",
        ),
        (
            {"dense": True, "block": True, "stack": None, "conv": True, "scale": True},
            r"mask at \['stack'\]: expected a bool .*got None \(None is an empty subtree",
        ),
        ({"dense": "yes", **_OTHERS}, r"mask at \['dense'\]: expected a bool.*got 'yes'"),
        ({"dense": 1, **_OTHERS}, r"mask at \['dense'\]: expected a bool.*type int"),
        (
            dict(_OTHERS, dense=True, block={"attn": np.ones(2, bool), "mlp": True}),
            r"mask at \['block'\]\['attn'\]: expected a bool.*Per-element masks",
        ),
        ("yes", r"mask at the top level: expected a bool.*got 'yes'"),
    ],
)
@pytest.mark.parametrize("as_callable", [False, True], ids=["tree", "callable"])
def test_bad_mask_names_the_path(mask, match, as_callable):
    given = (lambda p: mask) if as_callable else mask
    with pytest.raises(ValueError, match=match):
        opx.overparam_precondition(2, mask=given).init(_params())
    with pytest.raises(ValueError, match=match):
        opx.overparam_sgd(0.1, N=2, mask=given).init(_params())


_SPEC = r"a MatrixDimensionNumbers, an optax.contrib.MuonDimensionNumbers or None"
_NONE = {"block": None, "stack": None, "conv": None, "scale": None}


@pytest.mark.parametrize(
    "dims, match",
    [
        (
            {"dense": (0, 1), **_NONE},
            _STRUCTURE + ", with " + _SPEC + r" at each of its leaves: at \['dense'\] the "
            r"params hold \['bias'\], \['kernel'\]; got \(0, 1\)",
        ),
        (
            {"dense": {"kernel": "muon", "bias": None}, **_NONE},
            r"dimension_numbers at \['dense'\]\['kernel'\]: expected "
            + _SPEC
            + r" for this parameter, got 'muon'",
        ),
        (
            {"dense": {"kernel": (0, 1), "bias": None}, **_NONE},
            r"dimension_numbers at \['dense'\]\['kernel'\]: expected "
            + _SPEC
            + r" for this parameter, got \(0, 1\)",
        ),
        (
            {"dense": {"kernel": {"reduction_axis": 0, "output_axis": 1}, "bias": None}, **_NONE},
            r"dimension_numbers at \['dense'\]\['kernel'\]: expected .*got \{'reduction_axis'",
        ),
        (
            {"dense": None, "block": {"attn": MUON(0, 1)}, "stack": None, "conv": None},
            _STRUCTURE + r".*at the top level the params hold .*\['scale'\]",
        ),
        (
            dict(_NONE, dense=None, block={"attn": MUON(0, 1)}),
            _STRUCTURE + r".*at \['block'\] the params hold \['attn'\], \['mlp'\]",
        ),
        (
            {"dense": None, "block": MUON(0, 2), "stack": None, "conv": None, "scale": None},
            r"Parameter \['block'\]\['attn'\]\['k'\] of shape \(4, 5\).*axis 2",
        ),
        (
            {"dense": None, **dict(_NONE, stack=MUON("a", 2))},
            r"Parameter \['stack'\]: dimension numbers must hold ints",
        ),
    ],
)
def test_bad_dimension_numbers_name_the_path(dims, match):
    with pytest.raises(ValueError, match=match):
        opx.overparam_precondition(2, dimension_numbers=dims).init(_params())
    with pytest.raises(ValueError, match=match):
        opx.overparam_sgd(0.1, N=2, dimension_numbers=lambda p: dims).init(_params())
