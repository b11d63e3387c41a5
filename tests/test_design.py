"""The v2 design contract: state shaped like the params, options validated, none ignored."""

import inspect
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import overparam_optax as opx
from overparam_optax.methods import TrackedBasis
from overparam_optax.testing import reference_precondition


def _params(rng):
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(12, 6)), jnp.float32),
            "bias": jnp.ones(6),
        },
        "same": {"kernel": jnp.asarray(rng.normal(size=(12, 6)), jnp.float32)},
        "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
        "wide": jnp.asarray(rng.normal(size=(5, 9)), jnp.float32),
        "head": jnp.asarray(rng.normal(size=(6, 1)), jnp.float32),
    }


def _grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


COMBINATIONS = list(
    itertools.product(
        ["tracked", "svd", "eigh", "newton"],  # method
        [None, 4],  # block_size
        [None, "callable"],  # mask
    )
)


@pytest.mark.parametrize("method, block_size, mask", COMBINATIONS)
def test_map_params_and_state_structure_for_every_option_combination(method, block_size, mask):
    """optax.tree.map_params works (optax's contract), and the factors mirror the params."""
    params = _params(np.random.default_rng(0))
    if mask == "callable":
        mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2 and x.shape[0] != 5, p)  # noqa: E731
    tx = opx.overparam_precondition(3, method=method, block_size=block_size, mask=mask)
    state = tx.init(params)
    # One entry per leaf: the params' structure is a prefix of the factors' structure.
    entries = jax.tree.structure(params).flatten_up_to(state.factors)
    assert len(entries) == len(jax.tree.leaves(params))
    _, state = jax.jit(tx.update)(_grads(params), state, params)
    mapped = optax.tree.map_params(tx, lambda v: v + 0, state)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)
    zeroed = optax.tree.map_params(tx, jnp.zeros_like, state)
    for leaf in jax.tree.leaves(zeroed.factors):
        np.testing.assert_array_equal(leaf, 0)
    assert int(zeroed.count) == 1  # not a parameter-like leaf: left alone
    cached = isinstance(state.factors["dense"]["kernel"], TrackedBasis)
    assert cached == (method == "tracked")  # the other methods decompose afresh: no cache
    if not cached:
        assert isinstance(state.factors["dense"]["kernel"], optax.MaskedNode)
    assert isinstance(state.factors["head"], optax.MaskedNode)  # closed form: nothing cached


def test_defaults_are_the_tracked_basis_and_svd_alone_is_exact():
    """The default: a tracked basis, zeros until the first update; method="svd": no cache."""
    rng = np.random.default_rng(7)
    params = {"w": jnp.asarray(rng.normal(size=(9, 5)), jnp.float32)}
    default = opx.overparam_precondition(3)
    state = default.init(params)
    assert isinstance(state.factors["w"], TrackedBasis)
    assert state.factors["w"].v.shape == (1, 5, 5)
    np.testing.assert_array_equal(state.factors["w"].v, 0)
    assert int(state.decompositions) == 0
    out, state = default.update(_grads(params), state, params)
    assert int(state.decompositions) == 1  # the first update decomposes afresh
    assert _rel(out["w"], reference_precondition(params["w"], _grads(params)["w"], 3)) < 1e-5
    exact = opx.overparam_precondition(3, method="svd")
    assert isinstance(exact.init(params).factors["w"], optax.MaskedNode)
    update = jax.jit(exact.update)
    exact_state = exact.init(params)
    for step in range(3):
        w = {"w": params["w"] * (1 + step)}
        grads = _grads(params, seed=step)
        out, exact_state = update(grads, exact_state, w)
        assert _rel(out["w"], reference_precondition(w["w"], grads["w"], 3)) < 1e-5


def _keyword_options(fn):
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def test_overparam_sgd_accepts_and_forwards_every_option():
    precondition = _keyword_options(opx.overparam_precondition)
    sgd = _keyword_options(opx.overparam_sgd)
    for name, default in precondition.items():
        assert name in sgd, name
        assert sgd[name] == default, name
    params = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(8, 4)), jnp.float32)}
    grads = _grads(params)
    tight = opx.methods.Tracked(tolerance=1e-3)
    for options in (dict(method="eigh", block_size=4), dict(method=tight, block_size=4)):
        a, _ = opx.overparam_sgd(0.1, N=3, **options).update(
            grads, opx.overparam_sgd(0.1, N=3, **options).init(params), params
        )
        pre = opx.overparam_precondition(3, **options)
        b, _ = pre.update(grads, pre.init(params), params)
        np.testing.assert_allclose(a["w"], -0.1 * b["w"], rtol=1e-6)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(block_size=1), "block_size"),
        (dict(block_size=True), "block_size"),
        (dict(block_size=4.0), "block_size"),
        (dict(method="qr"), "method"),
        (dict(method="auto"), "method"),  # removed: the default is "tracked"
        (dict(precision="bogus"), "precision"),
        (dict(plain_gradient_at_zero="no"), "plain_gradient_at_zero"),
        (dict(plain_gradient_at_zero=1), "plain_gradient_at_zero"),
    ],
)
def test_invalid_options_are_rejected_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        opx.overparam_precondition(2, **options)
    with pytest.raises(ValueError, match=match):
        opx.overparam_sgd(0.1, N=2, **options)


def test_newton_beyond_its_depth_limit_is_rejected_at_construction():
    with pytest.raises(ValueError, match="newton.*N <= 128"):
        opx.overparam_precondition(129, method="newton")
    opx.overparam_precondition(2**40)  # the default has no depth limit
    opx.overparam_precondition(2**40, method="svd")


@pytest.mark.parametrize(
    "name",
    [
        "max_matrix_size",
        "refresh_spectrum",
        "every_step_until",
        "precondition_every",
        "warmup_steps",
    ],
)
def test_removed_options_are_errors_not_silently_ignored(name):
    with pytest.raises(TypeError, match=name):
        opx.overparam_precondition(2, **{name: 1})
    with pytest.raises(TypeError, match=name):
        opx.overparam_sgd(0.1, N=2, **{name: 1})


@pytest.mark.parametrize(
    "mask_leaf",
    ["yes", 1, 0.0, None, np.ones(2, bool), jnp.ones((12, 6), bool), jnp.array(1)],
)
def test_mask_leaves_must_be_bools(mask_leaf):
    params = {"w": jnp.ones((12, 6)), "b": jnp.ones(6)}
    mask = {"w": mask_leaf, "b": False}
    if mask_leaf is None:  # None is an empty subtree: a structure error
        match = "same tree structure"
    else:
        match = r"mask at \['w'\].*bool"
    with pytest.raises(ValueError, match=match):
        opx.overparam_precondition(2, mask=mask).init(params)


def test_mask_accepts_numpy_and_jax_bool_scalars():
    params = {"w": jnp.eye(3) + 0.5, "v": jnp.eye(3) + 0.5}
    grads = _grads(params)
    tx = opx.overparam_precondition(2, mask={"w": np.bool_(True), "v": jnp.array(False)})
    out, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["v"], grads["v"])
    assert _rel(out["w"], reference_precondition(params["w"], grads["w"], 2)) < 1e-5


@pytest.mark.parametrize(
    "make_state, match",
    [
        # Another shape for one parameter: the path, the field and both shapes.
        (
            lambda tx, p: tx.init(dict(p, wide=jnp.ones((4, 9)))),
            r"parameter \['wide'\]: cached v has shape \(1, 4, 4\) and dtype float32, "
            r"expected \(1, 5, 5\)",
        ),
        # Made with a method that keeps no cache: the factor types.
        (
            lambda tx, p: opx.overparam_precondition(3, method="svd").init(p),
            r"parameter \['conv'\] has cached MaskedNode factors, these options need TrackedBasis",
        ),
        # A parameter cached that these options mask out.
        (
            lambda tx, p: tx.init(dict(p, dense=dict(p["dense"], bias=jnp.ones((6, 6))))),
            r"caches factors for parameter \['dense'\]\['bias'\], these options do not",
        ),
        # Another tree: both structures.
        (lambda tx, p: tx.init({"w": jnp.ones((3, 3))}), r"structure .*these params need"),
    ],
    ids=["shape", "method", "masked", "structure"],
)
def test_state_misfit_names_the_parameter_and_what_was_expected(make_state, match):
    params = _params(np.random.default_rng(3))
    tx = opx.overparam_precondition(3)
    with pytest.raises(ValueError, match=match):
        tx.update(_grads(params), make_state(tx, params), params)


@pytest.mark.parametrize("method", ["tracked", "svd"])
@pytest.mark.parametrize("N", [2, 3])
def test_zero_initialized_matrix_trains_by_default_and_stays_put_with_the_strict_rule(N, method):
    target = jnp.array([[3.0, -2.0], [1.0, 4.0], [0.5, 0.0]])
    params = {"w": jnp.zeros((3, 2))}

    def loss(p):
        return jnp.sum((p["w"] - target) ** 2)

    def train(tx, steps=300):
        p, state = params, tx.init(params)
        for _ in range(steps):
            updates, state = jax.jit(tx.update)(jax.grad(loss)(p), state, p)
            p = optax.apply_updates(p, updates)
        return p

    trained = train(opx.overparam_sgd(0.02, N=N, method=method))
    np.testing.assert_allclose(trained["w"], target, atol=1e-3)
    strict = train(opx.overparam_sgd(0.02, N=N, method=method, plain_gradient_at_zero=False), 5)
    np.testing.assert_array_equal(strict["w"], 0.0)


def test_after_a_zero_matrix_the_tracked_basis_is_recomputed():
    """A basis tracked from W = 0 says nothing about the W that follows: it is redone."""
    params = {"w": jnp.zeros((4, 3))}
    g = _grads(params)
    tx = opx.overparam_precondition(2)
    state = tx.init(params)
    out, state = tx.update(g, state, params)  # W = 0: plain gradient
    np.testing.assert_array_equal(out["w"], g["w"])
    params = {"w": params["w"] - 0.1 * out["w"]}
    out, state = tx.update(g, state, params)
    assert _rel(out["w"], reference_precondition(params["w"], g["w"], 2)) < 1e-5
    assert int(state.decompositions) == 2


def test_updates_keep_going_when_the_counters_saturate():
    params = {"w": jnp.asarray(np.random.default_rng(4).normal(size=(6, 3)), jnp.float32)}
    tx = opx.overparam_precondition(2)
    update = jax.jit(tx.update)
    top = np.iinfo(np.int32).max
    state = tx.init(params)._replace(
        count=jnp.asarray(top, jnp.int32), decompositions=jnp.asarray(top - 1, jnp.int32)
    )
    direction = _grads(params, seed=9)["w"]
    for step in range(5):
        w = {"w": params["w"] + 1e-3 * step * direction}  # a new W every step
        grads = _grads(params, seed=step)
        out, state = update(grads, state, w)
        assert _rel(out["w"], reference_precondition(w["w"], grads["w"], 2)) < 1e-5
        assert int(state.count) == top
        assert int(state.decompositions) == top


@pytest.mark.parametrize("method", ["tracked", "eigh", "newton"])
def test_block_size_applies_the_method_and_the_cache_to_the_blocks(method):
    """v1 silently used the exact SVD, every step, for blocked leaves."""
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)
    params, grads = {"w": w}, _grads({"w": w})
    tx = opx.overparam_precondition(3, block_size=4, method=method)
    state = tx.init(params)
    if method == "tracked":
        assert state.factors["w"].v.shape == (4, 4, 4)  # a 2 x 2 grid of 4 x 4 blocks
    else:
        assert isinstance(state.factors["w"], optax.MaskedNode)
    out, state = tx.update(grads, state, params)
    if method == "tracked":
        assert int(state.decompositions) == 4  # one basis per block
    exact = "svd" if method == "tracked" else method
    for rows, cols in itertools.product((slice(0, 4), slice(4, 8)), repeat=2):
        block = opx.precondition_matrix(w[rows, cols], grads["w"][rows, cols], 3, method=exact)
        # float32: the batched and the single-block programs round differently (~1e-5).
        np.testing.assert_allclose(out["w"][rows, cols], block, rtol=1e-4, atol=1e-5)


def test_complex_and_integer_matrices_are_rejected_naming_the_leaf():
    tx = opx.overparam_precondition(2)
    with pytest.raises(ValueError, match=r"\['c'\].*complex"):
        tx.init({"c": jnp.eye(3, dtype=jnp.complex64)})
    with pytest.raises(ValueError, match=r"\['i'\].*int32"):
        tx.init({"i": jnp.ones((3, 3), jnp.int32)})
    masked = opx.overparam_precondition(2, mask={"c": False})  # masked out: fine
    masked.init({"c": jnp.eye(3, dtype=jnp.complex64)})


def test_python_scalars_and_empty_matrices_pass_through():
    rng = np.random.default_rng(6)
    params = {
        "scale": 1.5,
        "empty_rows": jnp.zeros((0, 5)),
        "empty_cols": jnp.zeros((5, 0)),
        "empty_conv": jnp.zeros((3, 3, 0, 4)),
        "w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
    }
    grads = {
        "scale": 0.25,
        "empty_rows": jnp.zeros((0, 5)),
        "empty_cols": jnp.zeros((5, 0)),
        "empty_conv": jnp.zeros((3, 3, 0, 4)),
        "w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
    }
    for options in ({}, {"block_size": 2}, {"method": "eigh"}):
        tx = opx.overparam_precondition(3, **options)
        out, _ = tx.update(grads, tx.init(params), params)
        assert out["scale"] == 0.25
        for name in ("empty_rows", "empty_cols", "empty_conv"):
            assert out[name].shape == params[name].shape
        if not options.get("block_size"):
            assert _rel(out["w"], reference_precondition(params["w"], grads["w"], 3)) < 1e-5
    sgd = optax.chain(opx.overparam_precondition(3), optax.sgd(0.1))
    updates, _ = sgd.update(grads, sgd.init(params), params)
    assert updates["scale"] == pytest.approx(-0.025)


def test_state_shardings_split_tracked_bases_like_their_parameter():
    mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))  # the rule needs no devices
    shapes_specs = {
        "fsdp": ((8, 4), P("data", None)),  # split 4 ways: the short side 4 divides
        "wide": ((8, 16), P(None, ("data", "model"))),  # 8 ways; tall view 16 x 8
        "odd": ((6, 5), P("model", None)),  # 2 ways; the short side 5 does not divide
        "dp": ((8, 8), P()),  # replicated parameter, replicated basis
        "head": ((8, 1), P("data", None)),  # closed form: nothing cached
    }
    params = {k: jnp.ones(shape) for k, (shape, _) in shapes_specs.items()}
    param_sh = {k: NamedSharding(mesh, spec) for k, (_, spec) in shapes_specs.items()}
    replicated = NamedSharding(mesh, P())
    factors = opx.state_shardings(
        opx.overparam_precondition(2), params, param_sh, replicated
    ).factors

    def rows(*axes):
        return NamedSharding(mesh, P(None, *axes, None))

    expected = {
        "fsdp": rows("data"),
        "wide": rows(("data", "model")),
        "odd": replicated,
        "dp": replicated,
    }
    for name, sharding in expected.items():
        assert factors[name] == TrackedBasis(sharding, replicated), (name, factors[name])
    assert isinstance(factors["head"], optax.MaskedNode)
    # A method that decomposes afresh keeps no cache: nothing to shard.
    stateless = opx.overparam_precondition(2, method="eigh")
    assert not jax.tree.leaves(opx.state_shardings(stateless, params, param_sh, replicated).factors)


def test_state_shardings_follow_the_params():
    mesh = jax.make_mesh((1,), ("data",))
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    param_sh = {"w": NamedSharding(mesh, P("data")), "b": NamedSharding(mesh, P())}
    replicated = NamedSharding(mesh, P())
    tx = optax.chain(opx.overparam_precondition(2), optax.sgd(0.1, momentum=0.9))
    shardings = opx.state_shardings(tx, params, param_sh, replicated)
    assert shardings[1][0].trace["w"] is param_sh["w"]  # momentum follows its parameter
    assert all(s is replicated for s in shardings[0].factors["w"])  # split 1 way: not split
    assert jax.tree.structure(shardings) == jax.tree.structure(tx.init(params))
    assert shardings[0].count is replicated
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    assert state[1][0].trace["w"].sharding == param_sh["w"]
