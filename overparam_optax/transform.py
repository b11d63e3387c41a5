"""The optax transforms: the depth-N preconditioner applied to every matrix in a tree.

An update reads as a few named steps: views (which axes of each leaf form its matrices,
``views.py``) -> group the matrices of equal shape -> the method updates each group with its
state entries (``methods/``) -> back to the leaves, with the leaves' shardings
(``sharding.py``). Nothing here depends on which method runs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from overparam_optax import linalg, methods, numerics, sharding
from overparam_optax.checks import check_real_floating
from overparam_optax.views import (
    MatrixDimensionNumbers,
    MatrixView,
    check_same_structure,
    resolve_views,
)

__all__ = [
    "MatrixDimensionNumbers",
    "OverparamPreconditionState",
    "overparam_precondition",
    "overparam_sgd",
    "state_shardings",
]


#: The values of ``method`` (see :func:`overparam_precondition`): a name, or a method
#: instance with its options (:mod:`overparam_optax.methods`).
Method = Literal["tracked", "svd", "eigh", "newton"] | methods.Method


class OverparamPreconditionState(NamedTuple):
    """State of :func:`overparam_precondition`.

    Attributes:
      count: number of updates applied so far (int32 scalar, saturating).
      decompositions: how many matrices had their basis computed afresh so far (int32
        scalar, saturating): with the default, the first update of each matrix and every
        update whose tracked basis could not hold the tolerance; 0 with the other methods,
        which decompose every matrix on every update.
      factors: a tree shaped like the params: for each leaf with matrices, the method's
        state entry for them in the tall orientation, batched over the leaf's matrices
        (with the default, :class:`~overparam_optax.methods.TrackedBasis`: their tracked
        right singular bases); ``optax.MaskedNode()`` for every other leaf and for methods
        that keep no state. Its types and shapes depend only on the params and the options,
        never on the machine or the backend, so a checkpoint restores anywhere.
    """

    count: jax.Array
    decompositions: jax.Array
    factors: Any


# --------------------------------------------------------------------------------------
# The steps of an update.
# --------------------------------------------------------------------------------------


class _Group(NamedTuple):
    """Leaves whose matrices share (rows, cols, compute dtype): one batched call for all."""

    indices: tuple[int, ...]  # positions in the flattened params
    transpose: bool  # rows < cols: the group is handled as its transpose (tall)
    dtype: Any


def _groups(views: list[MatrixView | None], leaves) -> list[_Group]:
    """Groups the leaves that have factors by matrix shape and dtype (trace-time only)."""
    members: dict[tuple, list[int]] = {}
    for index, (view, leaf) in enumerate(zip(views, leaves, strict=True)):
        if view is not None and not view.is_vector:
            key = (view.rows, view.cols, jnp.dtype(numerics.compute_dtype(leaf.dtype)))
            members.setdefault(key, []).append(index)
    return [
        _Group(tuple(indices), rows < cols, dtype)
        for (rows, cols, dtype), indices in members.items()
    ]


def _stack(group: _Group, views, leaves) -> jax.Array:
    """The group's matrices as one (count, long side, short side) array in the compute dtype."""
    mats = [views[i].to_matrices(jnp.asarray(leaves[i]).astype(group.dtype)) for i in group.indices]
    out = jnp.concatenate(mats, axis=0) if len(mats) > 1 else mats[0]
    return jnp.swapaxes(out, -1, -2) if group.transpose else out


def _split(group: _Group, views, stacked: Any) -> list[Any]:
    """Inverse of the concatenation in :func:`_stack`, for any tree batched on axis 0."""
    bounds = np.cumsum([views[i].count for i in group.indices])[:-1]
    return [
        jax.tree.map(lambda x, k=k: jnp.split(x, bounds, axis=0)[k], stacked)
        for k in range(len(group.indices))
    ]


def _to_leaf(group: _Group, view: MatrixView, out: jax.Array, like: Any) -> jax.Array:
    if group.transpose:
        out = jnp.swapaxes(out, -1, -2)
    return view.from_matrices(out).astype(jnp.result_type(like))


def _is_zero(w: jax.Array) -> jax.Array:
    """Per matrix of a (count, rows, cols) stack: whether it is exactly zero."""
    return numerics.is_exactly_zero(w, axis=(-2, -1))


def _vector_update(view: MatrixView, param, update, N: int, at_zero: bool) -> jax.Array:
    """Single-output (or single-input) leaves: the closed form, no factors."""
    w = view.to_matrices(param).reshape(view.count, -1)
    g = view.to_matrices(update).reshape(view.count, -1)
    out = linalg.precondition_vector(w, g, N)  # reads subnormal weights as they are
    if at_zero:
        out = jnp.where(numerics.is_exactly_zero(w, axis=-1)[:, None], g, out)
    return view.from_matrices(out.reshape(view.count, view.rows, view.cols))


# --------------------------------------------------------------------------------------
# The transform.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Rule:
    """The validated options that decide how matrices are preconditioned."""

    N: int
    method: methods.Method
    precision: Any
    at_zero: bool  # plain_gradient_at_zero


def _init_entry(rule: _Rule, view: MatrixView | None, dtype) -> Any:
    """One leaf's state entry: the method's for its matrices (tall), or an empty one."""
    if view is None or view.is_vector or rule.N == 1:
        return optax.MaskedNode()
    shape = (view.count, max(view.rows, view.cols), min(view.rows, view.cols))
    return rule.method.init_entry(shape, numerics.compute_dtype(dtype), rule.N)


def _precondition_leaves(rule: _Rule, views, params, updates, entries):
    """New update leaves, new state entries, and how many matrices were decomposed afresh."""
    new_leaves, entries = list(updates), list(entries)
    for i, view in enumerate(views):
        if view is not None and view.is_vector:
            new_leaves[i] = _vector_update(
                view, params[i], updates[i], rule.N, rule.at_zero
            ).astype(jnp.result_type(updates[i]))
    decomposed = jnp.zeros([], jnp.int32)
    for group in _groups(views, params):
        count = sum(views[i].count for i in group.indices)
        stacked = _stacked_entries([entries[i] for i in group.indices])
        # Each device of a mesh computes its share of the group's matrices.
        entry, out, fresh = sharding.map_over_mesh(
            functools.partial(_group_update, rule),
            count,
            (_stack(group, views, params), _stack(group, views, updates), stacked),
            None,
        )
        entry, out, fresh = jax.tree.map(
            lambda x, c=count: sharding.gathered(x)[:c], (entry, out, fresh)
        )
        decomposed = decomposed + jnp.sum(fresh, dtype=jnp.int32)
        # Whole, then each leaf's entry takes the state's sharding.
        entry = jax.tree.map(sharding.whole_on_every_device, entry)
        for i, piece in zip(group.indices, _split(group, views, entry), strict=True):
            entries[i] = piece
        for i, piece in zip(group.indices, _split(group, views, out), strict=True):
            new_leaves[i] = _to_leaf(group, views[i], piece, updates[i])
    return new_leaves, entries, decomposed


def _stacked_entries(entries: list[Any]) -> Any:
    """The state entries of a group's leaves as one stack, whole on every device.

    ``state_shardings`` splits each leaf's entry like its parameter; the update spread over
    the mesh splits the stack by matrices.
    """

    def stack(*leaves):
        return jnp.concatenate([sharding.whole_on_every_device(x) for x in leaves], axis=0)

    return jax.tree.map(stack, *entries)


def _group_update(rule: _Rule, batched, _):
    """(new entries, preconditioned G, which matrices were decomposed afresh) for a stack.

    Each matrix is handled on its own, so a mesh can split the stack between devices.
    """
    w, g, entry = batched
    w, lifted = numerics.lift_subnormal(w)  # read subnormal weights as what they are
    out, entry, fresh = rule.method.update(w, g, entry, rule.N, rule.precision)
    out = numerics.unlift(out, lifted, rule.N)
    if rule.at_zero:
        out = jnp.where(_is_zero(w)[:, None, None], g, out)
    return entry, out, fresh


def _gathered(views: list[MatrixView | None], leaves: list[Any]) -> list[Any]:
    """The leaves that are preconditioned, gathered if an Explicit mesh shards them."""
    return [
        leaf if view is None else sharding.gathered(leaf)
        for view, leaf in zip(views, leaves, strict=True)
    ]


def _static_hint(name: str, value: Any) -> str:
    """The remedy for a traced option: optax.inject_hyperparams makes numbers arrays."""
    if isinstance(value, jax.Array):
        return f" With optax.inject_hyperparams, pass static_args=({name!r},)."
    return ""


def _check_options(block_size, precision, plain_gradient_at_zero) -> bool:
    """Checks the method-independent options of :func:`overparam_precondition`; returns
    ``plain_gradient_at_zero`` as a Python bool."""
    if block_size is not None and (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or block_size < 2
    ):
        raise ValueError(
            f"block_size must be an int >= 2 or None, got {block_size!r}."
            + _static_hint("block_size", block_size)
        )
    if not callable(precision):
        try:  # jax's own check of the value, on a 1 x 1 product traced abstractly
            one = jax.ShapeDtypeStruct((1, 1), jnp.float32)
            jax.eval_shape(lambda x: jnp.matmul(x, x, precision=precision), one)
        except (TypeError, ValueError) as error:
            raise ValueError(f"precision: {error}") from None
    if not isinstance(plain_gradient_at_zero, (bool, np.bool_)):
        raise ValueError(
            f"plain_gradient_at_zero must be a bool, got {plain_gradient_at_zero!r}."
            + _static_hint("plain_gradient_at_zero", plain_gradient_at_zero)
        )
    return bool(plain_gradient_at_zero)


def _check_update_dtypes(paths, views, update_leaves) -> None:
    """Refuses integer, bool and complex updates of preconditioned leaves, naming each.

    Cast to the compute dtype they would be truncated (a complex one would lose its
    imaginary part) without a word.
    """
    for path, view, leaf in zip(paths, views, update_leaves, strict=True):
        if view is not None:
            check_real_floating(
                f"Update (gradient) of parameter {path}",
                leaf,
                "Pass the gradient in the parameter's floating-point dtype.",
            )


def _saturating_add(total: jax.Array, more: jax.Array) -> jax.Array:
    """total + more for non-negative int32 scalars, stopping at the int32 maximum."""
    top = jnp.iinfo(jnp.int32).max
    return jnp.where(total > top - more, top, total + more).astype(jnp.int32)


def _state_misfit(detail: str) -> ValueError:
    return ValueError(
        "the optimizer state does not fit these params (or was made with other options): "
        f"{detail}. Re-run tx.init(params)."
    )


def _rebuilt_entry(path: str, entry: Any, want: Any) -> Any:
    """One leaf's cached factors as ``init`` makes them (``want``), or a ValueError."""
    if isinstance(want, optax.MaskedNode):
        if jax.tree.leaves(entry):
            raise _state_misfit(f"it caches factors for parameter {path}, these options do not")
        return want
    if hasattr(entry, "_fields") and type(entry) is not type(want):
        raise _state_misfit(
            f"parameter {path} has cached {type(entry).__name__} factors, these options "
            f"need {type(want).__name__}"
        )
    try:
        if isinstance(entry, Mapping):
            entry = type(want)(**{name: entry[name] for name in want._fields})
        else:
            entry = type(want)(*entry)
    except (KeyError, TypeError):
        raise _state_misfit(
            f"the entry for parameter {path} is not a {type(want).__name__} with fields "
            f"{want._fields}"
        ) from None
    for name, got, shape in zip(want._fields, entry, want, strict=True):
        if (jnp.shape(got), jnp.result_type(got)) != (shape.shape, shape.dtype):
            raise _state_misfit(
                f"parameter {path}: cached {name} has shape {jnp.shape(got)} and dtype "
                f"{jnp.result_type(got)}, expected {shape.shape} and {shape.dtype}"
            )
    return entry


def _restore_entries(factors: Any, expected: Any, treedef, paths: list[str]) -> list[Any]:
    """Per leaf, the state's cached factors, checked against and rebuilt as ``init`` makes them.

    Wrappers may hand the state back in other containers (flax's ``nnx.Optimizer`` turns
    NamedTuples into its own State mappings, with sorted keys): an entry must hold the
    fields, shapes and dtypes that ``init`` gives it for these params and options. A misfit
    is reported with the parameter's path (``paths``, as ``resolve_views`` gives them).
    """
    try:
        entries = treedef.flatten_up_to(factors)
    except (TypeError, ValueError):
        raise _state_misfit(
            f"its cached factors have the structure {jax.tree_util.tree_structure(factors)}, "
            f"these params need {jax.tree_util.tree_structure(expected)}"
        ) from None
    wanted = treedef.flatten_up_to(expected)
    return [
        _rebuilt_entry(path, entry, want)
        for path, entry, want in zip(paths, entries, wanted, strict=True)
    ]


def overparam_precondition(
    N: int,
    *,
    method: Method = "tracked",
    dimension_numbers: Any = None,
    mask: Any = None,
    block_size: int | None = None,
    precision: jax.lax.PrecisionLike = None,
    plain_gradient_at_zero: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions gradients as depth-N linear over-parameterization would.

    Replacing a weight matrix W by a product of N matrices :math:`W_N \cdots W_1`, and running
    gradient descent with a small step on the factors from a balanced initialization,
    moves the end-to-end matrix along

    .. math::
      P_W(G) = \sum_{j=1}^{N} (W W^\top)^{\frac{j-1}{N}} \, G \, (W^\top W)^{\frac{N-j}{N}}

    where G is the gradient with respect to W (Arora et al., 2018, Theorem 1). This
    transform returns P_W(G) for every matrix-shaped leaf, so that

    .. code-block:: python

      optax.chain(overparam_precondition(N), optax.sgd(lr))

    trains the original (depth-1) model along the depth-N trajectory, with no extra
    parameters. The result is the preconditioned gradient itself (not negated, not
    scaled), so it composes with any optimizer that follows.

    Leaves with more than two axes are viewed as matrices (or stacks of them) per
    :class:`MatrixDimensionNumbers`; single-output matrices use the closed form
    ||w||^{2-2/N} (g + (N-1) proj_w(g)). Everything is computed in float32 or wider
    whatever the parameter dtype; zero and repeated singular values give no NaN; updates
    keep their dtype. Matrices of equal shape (across leaves, and the batch axes of a
    leaf) are preconditioned in one batched call, spread over the devices of a mesh.

    By default each matrix carries its right singular basis from one update to the next
    and rotates it toward the current W with matmuls and small n x n work (n the shorter
    side); the basis is computed afresh (a thin SVD of W) only when the rotation cannot
    hold the method's ``tolerance``: the update is then the exact P for a Gram matrix
    within relative Frobenius distance ``tolerance`` of W^T W. docs/performance.md has its
    distance to the exact rule and to the explicit depth-N network over whole trainings,
    and its cost. ``method="svd"`` is the exact rule from a fresh SVD on every update.

    P_W scales like ||W||^{2-2/N}, so P_0(G) = 0 for N >= 2: a matrix that is exactly
    zero would never move (the saddle that explicit factors share). By default such a
    matrix gets the plain gradient G instead, which departs from the rule only at that
    degenerate point; ``plain_gradient_at_zero=False`` keeps the strict rule.

    Args:
      N: the depth, a positive Python int. N = 1 is the identity (the updates pass
        through unchanged, whatever the other options).
      method: "tracked" (the default: a basis carried in the state and rotated every
        update, recomputed when it cannot hold its tolerance), or a method that decomposes
        every matrix afresh on every update and keeps no state: "svd" (the exact
        reference), "eigh" (eigendecomposition of the smaller Gram matrix W^T W) or
        "newton" (matmul-only iteration); or a method instance with its own options, e.g.
        ``overparam_optax.methods.Tracked(tolerance=1e-3)`` (:mod:`overparam_optax.methods`).
        docs/performance.md has the measured speed and error of each. It decides the
        state's structure: under ``optax.inject_hyperparams`` list it in ``static_args``.
      dimension_numbers: None (the defaults in :class:`MatrixDimensionNumbers`), one
        ``MatrixDimensionNumbers`` for every leaf of rank >= 2, a pytree like the params
        (or a prefix of it, as ``optax.contrib.muon`` takes) with a
        ``MatrixDimensionNumbers`` or None (pass through) at each of its leaves, or a
        callable from params to either. An ``optax.contrib.MuonDimensionNumbers`` may
        stand wherever a ``MatrixDimensionNumbers`` does, with the same meaning. A spec
        at a node above the leaves applies to those of rank >= 2 in its subtree (None to
        all of them); one at a leaf's own position applies to it whatever its rank.
      mask: optional pytree like the params, or a prefix of it (as ``optax.masked``
        takes), of bools: True preconditions the leaf, or every leaf of the subtree, and
        False passes it through; or a callable from params to such a pytree. To skip
        large layers, e.g. ``mask=lambda p: jax.tree.map(lambda x: x.size <= 2**20, p)``.
      block_size: if set, matrices with a side longer than this are cut into a grid of
        blocks of at most ``block_size x block_size``, each treated as its own factorized
        matrix with every other option (method, caching) applying to the blocks: cheaper,
        but not the exact rule (docs/scaling.md).
      precision: precision of every matmul of the preconditioner: a ``jax.lax.Precision``
        or ``jax.lax.DotAlgorithmPreset``; None (default) picks per platform where the
        step is compiled: float32 (HIGHEST) on CPU, three bfloat16 passes
        (``BF16_BF16_F32_X3``) on NVIDIA GPUs, HIGH on TPU
        (:data:`overparam_optax.numerics.PLATFORM_PRECISION`, docs/performance.md), unless
        ``jax.default_matmul_precision`` is set. A callable ``(x, y) -> x @ y`` computes
        every product instead (to emulate another precision or count products).
      plain_gradient_at_zero: whether a matrix (or block, or single-output row) that is
        exactly zero gets the plain gradient instead of P_0(G) = 0. Default True.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Its ``update`` requires ``params``.

    Raises:
      ValueError: at construction, for an invalid option; in ``init``/``update``, if the
        dimension numbers or mask do not fit the params, a selected leaf is complex or
        not floating-point (the message names the leaf), the state was made for other
        params, or ``update`` is called without params.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import overparam_optax as opx
      >>> params = {"w": jnp.eye(3), "b": jnp.zeros(3)}
      >>> tx = optax.chain(opx.overparam_precondition(N=3), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Arora, Cohen & Hazan, "On the Optimization of Deep Networks: Implicit
      Acceleration by Overparameterization", ICML 2018.
    """
    N = numerics.check_depth(N)
    chosen = methods.resolve(method)
    chosen.check_depth(N)
    at_zero = _check_options(block_size, precision, plain_gradient_at_zero)
    rule = _Rule(N, chosen, precision, at_zero)

    def views_of(params):
        return resolve_views(params, dimension_numbers, mask, block_size)

    def init_fn(params):
        # Views are resolved (and validated) now, so a misfit is reported before any step.
        _, views, treedef = views_of(params)
        entries = [
            _init_entry(rule, view, jnp.result_type(leaf))
            for view, leaf in zip(views, treedef.flatten_up_to(params), strict=True)
        ]
        return OverparamPreconditionState(
            count=jnp.zeros([], jnp.int32),
            decompositions=jnp.zeros([], jnp.int32),
            factors=treedef.unflatten(entries),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "overparam_precondition needs the current params: call "
                "tx.update(grads, state, params)."
            )
        check_same_structure(updates, params)
        count = optax.safe_increment(state.count)
        if N == 1:
            return updates, state._replace(count=count)
        # 1. Which matrices each leaf holds, and the cached factors that go with them.
        paths, views, treedef = views_of(params)
        expected = jax.eval_shape(init_fn, params).factors
        old_entries = _restore_entries(state.factors, expected, treedef, paths)
        # 2. Precondition them (gathered first if an Explicit mesh shards them).
        update_leaves = treedef.flatten_up_to(updates)
        _check_update_dtypes(paths, views, update_leaves)
        new_leaves, entries, decomposed = _precondition_leaves(
            rule,
            views,
            _gathered(views, treedef.flatten_up_to(params)),
            _gathered(views, update_leaves),
            old_entries,
        )
        # 3. Each update, and each cache entry, gets back the sharding it came with.
        new_leaves = sharding.keep_explicit_shardings(new_leaves, update_leaves)
        entries = sharding.keep_explicit_shardings(entries, old_entries)
        decompositions = _saturating_add(state.decompositions, decomposed)
        new_state = OverparamPreconditionState(count, decompositions, treedef.unflatten(entries))
        return treedef.unflatten(new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_real_scalar(x: Any) -> bool:
    """A Python or numpy real number (not a bool), or a 0-d floating or integer array."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, float, np.integer, np.floating)):
        return True
    return isinstance(x, (jax.Array, np.ndarray)) and x.ndim == 0 and (
        jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
    )


def _add_depth_scaled_decay(
    weight_decay: optax.ScalarOrSchedule, N: int, dimension_numbers, mask
) -> optax.GradientTransformation:
    """Adds weight_decay * N * W on preconditioned leaves and weight_decay * W elsewhere.

    With decay lambda on every factor, the balanced end-to-end matrix shrinks by
    (1 - eta * lambda * N) per step (the paper's eq. 24): the decay is not preconditioned.
    Leaves that are not factorized (biases) keep the ordinary decay. ``weight_decay`` may
    be an optax schedule, as in ``optax.add_decayed_weights``.
    """

    def preconditioned(params):
        _, views, treedef = resolve_views(params, dimension_numbers, mask, None)
        return treedef.unflatten([view is not None for view in views])

    def others(params):
        return jax.tree.map(lambda selected: not selected, preconditioned(params))

    if callable(weight_decay):
        depth_scaled = lambda count: N * weight_decay(count)  # noqa: E731
    elif not _is_real_scalar(weight_decay):
        raise ValueError(
            f"weight_decay must be a float, a scalar array or an optax schedule, got "
            f"{weight_decay!r}."
        )
    else:
        depth_scaled = N * weight_decay
    return optax.chain(
        optax.add_decayed_weights(depth_scaled, mask=preconditioned),
        optax.add_decayed_weights(weight_decay, mask=others),
    )


def overparam_sgd(
    learning_rate: optax.ScalarOrSchedule,
    N: int = 3,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    momentum: float | None = None,
    nesterov: bool = False,
    method: Method = "tracked",
    dimension_numbers: Any = None,
    mask: Any = None,
    block_size: int | None = None,
    precision: jax.lax.PrecisionLike = None,
    plain_gradient_at_zero: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD along the depth-N end-to-end dynamics, with the paper's weight decay.

    .. math::
      W \leftarrow (1 - \eta \lambda N) W - \eta P_W(\nabla L(W))

    for every preconditioned matrix W (Arora et al., 2018, eq. 24), and the plain rule
    W <- (1 - eta * lambda) W - eta * grad for the other leaves. With ``momentum`` the
    same direction is fed to heavy-ball (or Nesterov) momentum. It is
    ``optax.chain(overparam_precondition(N, ...), <the decay>, optax.sgd(...))``. Its other
    keyword options are those of :func:`overparam_precondition`, with the same defaults,
    and are passed on to it.

    Args:
      learning_rate: eta, a float or an optax schedule.
      N: the depth, a positive Python int. Under ``optax.inject_hyperparams`` list it in
        ``static_args`` (and ``method`` too).
      weight_decay: lambda, the decay applied to each factor in the factorized view: a
        float or an optax schedule (as ``optax.add_decayed_weights`` takes).
      momentum: optional momentum coefficient (as in ``optax.sgd``).
      nesterov: whether to use Nesterov momentum.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires params.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import overparam_optax as opx
      >>> tx = optax.inject_hyperparams(opx.overparam_sgd, static_args=("N",))(
      ...     learning_rate=0.1, N=2)
      >>> params = {"w": jnp.eye(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones((2, 2))}, state, params)

    References:
      Arora, Cohen & Hazan, "On the Optimization of Deep Networks: Implicit
      Acceleration by Overparameterization", ICML 2018.
    """
    return optax.chain(
        overparam_precondition(
            N,
            method=method,
            dimension_numbers=dimension_numbers,
            mask=mask,
            block_size=block_size,
            precision=precision,
            plain_gradient_at_zero=plain_gradient_at_zero,
        ),
        _add_depth_scaled_decay(weight_decay, N, dimension_numbers, mask),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def state_shardings(
    tx: optax.GradientTransformation, params: Any, param_shardings: Any, replicated: Any
) -> Any:
    """Shardings for ``tx.init(params)``: each parameter-like state leaf like its parameter.

    This is ``optax.tree.map_params`` with two rules: a state leaf that mirrors a
    parameter (momentum, Adam's moments, ...) takes that parameter's sharding, and a
    method's state entry (whose shapes differ from the parameter's) takes the sharding its
    method gives it (``Method.entry_sharding`` of :mod:`overparam_optax.methods`: the default's
    tracked bases are split by rows over the mesh axes the parameter is split over, rows
    that do not divide ``replicated``); every other state leaf (step counts) is
    ``replicated``.

    Args:
      tx: the optimizer (any chain containing :func:`overparam_precondition`).
      params: the parameters, or ``jax.ShapeDtypeStruct`` s of them.
      param_shardings: a tree like ``params`` of shardings (``NamedSharding`` s; any other
        kind gives replicated factors).
      replicated: the sharding for every other leaf, e.g. ``NamedSharding(mesh, P())``.

    Returns:
      A tree of shardings with the state's structure, for ``jax.jit``'s
      ``in_shardings``/``out_shardings`` or ``jax.device_put``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import overparam_optax as opx
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("data",))
      >>> params = {"w": jnp.ones((4, 3))}
      >>> tx = optax.chain(opx.overparam_precondition(2),
      ...                  optax.sgd(0.1, momentum=0.9))
      >>> shardings = opx.state_shardings(
      ...     tx, params, {"w": NamedSharding(mesh, P("data"))}, NamedSharding(mesh, P()))
      >>> state = jax.device_put(tx.init(params), shardings)
    """
    abstract_state = jax.eval_shape(tx.init, params)

    entry_types = (optax.MaskedNode, *methods.entry_types())

    def is_entry(x):
        return isinstance(x, entry_types)

    def like_param(state_leaf, param_sharding):
        owner = methods.owner(state_leaf)
        if owner is not None:
            return owner.entry_sharding(state_leaf, param_sharding, replicated)
        if isinstance(state_leaf, optax.MaskedNode):
            return state_leaf
        return param_sharding

    return optax.tree.map_params(
        tx,
        like_param,
        abstract_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=is_entry,
    )
