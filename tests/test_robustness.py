"""Bad input to the public math functions and to the transform's tree checks.

Rows of docs/robustness.md that have no better home: every public function of linalg.py,
numerics.py, methods/tracked.py and factorized.py that takes arrays refuses complex, integer
and bool ones (naming the argument), and updates whose containers differ from the params'
are told so.
"""

import flax
import jax
import jax.numpy as jnp
import optax
import pytest

import overparam_optax as opx
from overparam_optax import factorized as fz
from overparam_optax.checks import check_real_floating
from overparam_optax.methods import tracked

BAD_DTYPES = [jnp.complex64, jnp.int32, jnp.bool_]


def _expected(name: str, dtype) -> str:
    """The start of the message for argument ``name`` of dtype ``dtype``."""
    return rf"{name} has dtype {jnp.dtype(dtype).name}.*expected a real floating-point dtype"


def _linalg_calls(bad):
    """(function name, argument name, call) for each array argument, that one made ``bad``."""
    good2, good1 = jnp.eye(3, 2), jnp.ones(3)
    zero_basis = tracked.TrackedBasis(jnp.zeros((2, 2)))
    return [
        ("precondition_matrix", "W", lambda: opx.precondition_matrix(bad((3, 2)), good2, 2)),
        ("precondition_matrix", "G", lambda: opx.precondition_matrix(good2, bad((3, 2)), 2)),
        ("precondition_vector", "w", lambda: opx.precondition_vector(bad((3,)), good1, 2)),
        ("precondition_vector", "g", lambda: opx.precondition_vector(good1, bad((3,)), 2)),
        ("depth_kernel", "s_left", lambda: opx.depth_kernel(bad((3,)), good1, 3)),
        ("depth_kernel", "s_right", lambda: opx.depth_kernel(good1, bad((3,)), 3)),
        (
            r"tracked\.precondition",
            "w",
            lambda: tracked.precondition(bad((3, 2)), good2, zero_basis, 2),
        ),
        (
            r"tracked\.precondition",
            "g",
            lambda: tracked.precondition(good2, bad((3, 2)), zero_basis, 2),
        ),
        (
            r"tracked\.precondition",
            r"basis[._]v",
            lambda: tracked.precondition(good2, good2, tracked.TrackedBasis(bad((2, 2))), 2),
        ),
    ]


def _factorized_calls(bad):
    good = jnp.eye(3, 2)
    layer = {"kernel_0": jnp.eye(3, 2), "kernel_1": bad((2, 2)), "bias": jnp.zeros(2)}
    return [
        ("end_to_end", r"kernels\[1\]", lambda: fz.end_to_end([good, bad((2, 2))])),
        ("balanced_factors", "matrix", lambda: fz.balanced_factors(bad((3, 2)), 2)),
        ("factor_kernels", "kernel", lambda: fz.factor_kernels(bad((3, 3, 2, 4)), 2)),
        ("pair_balancedness", r"kernels\[0\]", lambda: fz.pair_balancedness([bad((3, 2)), good.T])),
        (
            "collapse",
            r"\['params'\]\['fc'\]\['kernel_1'\]",
            lambda: opx.collapse({"params": {"fc": layer}}),
        ),
        (
            "balancedness",
            r"\['fc'\]\['kernel_1'\]",
            lambda: opx.balancedness({"fc": layer}),
        ),
        (
            "factorize",
            r"\['fc'\]\['kernel'\]",
            lambda: fz.factorize({"fc": {"kernel": bad((3, 2))}}, 2),
        ),
    ]


@pytest.mark.parametrize("dtype", BAD_DTYPES)
@pytest.mark.parametrize("calls", [_linalg_calls, _factorized_calls])
def test_public_math_refuses_complex_integer_and_bool_arrays(calls, dtype):
    def bad(shape):
        return jnp.ones(shape, dtype)

    for function, argument, call in calls(bad):
        with pytest.raises(ValueError, match=_expected(f"{function}: {argument}", dtype)):
            call()


def test_dtype_arguments_and_complex_remedies():
    with pytest.raises(ValueError, match=r"init_entry: dtype is int32; expected"):
        check_real_floating("init_entry: dtype", jnp.int32)
    # A complex array is not told to be cast (that would drop its imaginary part).
    with pytest.raises(ValueError, match="real and imaginary parts") as info:
        opx.precondition_matrix(1j * jnp.eye(2), jnp.eye(2), 2)
    assert "astype" not in str(info.value)
    # Python floats and float lists are real floating input.
    assert opx.depth_kernel([1.0, 2.0], [1.0, 0.0], 3).shape == (2, 2)
    assert opx.precondition_vector([3.0, 4.0], [1.0, 0.0], 2).dtype == jnp.float32


def test_checks_work_on_traced_and_abstract_input():
    """Only the dtype is read: jit and eval_shape see the same errors, floats pass."""
    with pytest.raises(ValueError, match="precondition_matrix: W has dtype int32"):
        jax.jit(lambda w: opx.precondition_matrix(w, jnp.eye(2), 2))(jnp.eye(2, dtype=jnp.int32))
    shape = jax.eval_shape(lambda w: opx.precondition_matrix(w, w, 2), jnp.eye(2))
    assert shape.dtype == jnp.float32


# --------------------------------------------------------------------------------------
# Updates and params in different containers (issue 23, item 6).
# --------------------------------------------------------------------------------------


def _tree(kind=dict):
    return kind({"dense": kind({"kernel": jnp.eye(3, 2)}), "bias": jnp.zeros(2)})


@pytest.mark.parametrize(
    "updates, params, where",
    [
        (_tree(), flax.core.freeze(_tree()), "at the top level the updates are a dict and the "
         "params a FrozenDict"),
        ({"dense": flax.core.freeze({"kernel": jnp.eye(3, 2)}), "bias": jnp.zeros(2)}, _tree(),
         r"at \['dense'\] the updates are a FrozenDict and the params a dict"),
        ([jnp.eye(3, 2)], (jnp.eye(3, 2),), "the updates are a list and the params a tuple"),
    ],
)
def test_updates_in_other_containers_say_so(updates, params, where):
    tx = opx.overparam_precondition(2)
    with pytest.raises(ValueError, match="different containers") as info:
        tx.update(updates, tx.init(params), params)
    message = str(info.value)
    assert where.replace("\\", "") in message.replace("\\", "")
    assert "none; only in params: none" not in message
    # optax refuses the same pair when the updates are applied.
    with pytest.raises(ValueError):
        optax.apply_updates(params, updates)


def test_a_shape_mismatch_is_named_before_the_containers():
    params = flax.core.freeze(_tree())
    grads = {"dense": {"kernel": jnp.ones((2, 2))}, "bias": jnp.zeros(2)}
    tx = opx.overparam_precondition(2)
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\]: the update has shape"):
        tx.update(grads, tx.init(params), params)


def test_frozen_dict_params_with_frozen_dict_updates_work():
    params = flax.core.freeze(_tree())
    tx = opx.overparam_precondition(2)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert isinstance(updates, flax.core.FrozenDict)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_selected_leaves_of_other_dtypes_are_named(dtype):
    """docs/robustness.md: "integer or bool matrix selected" (and complex), by the transform."""
    tx = opx.overparam_precondition(2)
    with pytest.raises(ValueError, match=_expected(r"Parameter \['layer'\]\['w'\]", dtype)):
        tx.init({"layer": {"w": jnp.ones((3, 2), dtype)}, "b": jnp.zeros(2)})
    # Masked out, or a vector (never a matrix), the same leaf passes through.
    masked = opx.overparam_precondition(2, mask={"layer": {"w": False}, "b": True})
    masked.init({"layer": {"w": jnp.ones((3, 2), dtype)}, "b": jnp.zeros(2)})
    tx.init({"b": jnp.ones(2, dtype)})
