"""The optax transform: applies the depth-N preconditioner to every matrix in a tree.

The math is in `linalg.py`; this module decides, leaf by leaf, which axes form the
matrix (dimension numbers), reshapes each leaf into a batch of matrices, and calls it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from overparam_optax import linalg

__all__ = [
    "MatrixDimensionNumbers",
    "OverparamPreconditionState",
    "overparam_precondition",
    "overparam_sgd",
]


class MatrixDimensionNumbers(NamedTuple):
    """Which axes of a parameter form the rows and the columns of its matrix.

    A layer computes y = x W with W of shape (in, out): the ``reduction_axis`` axes
    (contracted with the input) are flattened into the rows, the ``output_axis`` axes
    into the columns, and every other axis is a batch axis, each slice getting its own
    preconditioner (stacked layers from ``nn.scan``, attention heads, ...).

    Defaults, used when ``dimension_numbers`` is None: a leaf with k >= 2 axes has
    ``reduction_axis = (0, ..., k-2)`` and ``output_axis = k-1`` (a flax ``Conv`` kernel
    HWIO becomes the (H*W*I, O) matrix of a k x k conv followed by 1x1 convs); 1-D and
    scalar leaves are left unchanged.

    An empty ``output_axis=()`` makes the leaf a single-output row vector, for which the
    closed form ``||w||^{2-2/N} (g + (N-1) proj_w(g))`` is used: e.g.
    ``MatrixDimensionNumbers(reduction_axis=0, output_axis=())`` for a 1-D leaf.

    Attributes:
      reduction_axis: int or sequence of ints; the input side. Negative values count
        from the end.
      output_axis: int or sequence of ints; the output side.
    """

    reduction_axis: Sequence[int] | int = 0
    output_axis: Sequence[int] | int = 1


class OverparamPreconditionState(NamedTuple):
    """State of :func:`overparam_precondition`.

    Attributes:
      count: number of updates applied so far (int32 scalar).
      cache: with ``precondition_every > 1``, one entry per group of same-shaped matrices
        (in order of first appearance in the params): the factors
        (:class:`~overparam_optax.linalg.SpectralBasis` or
        :class:`~overparam_optax.linalg.PolarRoot`, batched over the group's matrices) last
        computed, in the tall orientation. ``()`` otherwise.
    """

    count: jax.Array
    cache: Any = ()


@dataclasses.dataclass(frozen=True)
class _MatrixView:
    """How one leaf is reshaped into a (batch, rows, cols) stack of matrices and back."""

    permutation: tuple[int, ...]
    permuted_shape: tuple[int, ...]
    batch: int
    rows: int
    cols: int

    def to_matrices(self, x: jax.Array) -> jax.Array:
        return jnp.transpose(x, self.permutation).reshape(self.batch, self.rows, self.cols)

    def from_matrices(self, x: jax.Array) -> jax.Array:
        inverse = [0] * len(self.permutation)
        for position, axis in enumerate(self.permutation):
            inverse[axis] = position
        return jnp.transpose(x.reshape(self.permuted_shape), inverse)


def _as_axes(axes: Sequence[int] | int) -> tuple[int, ...]:
    return (axes,) if isinstance(axes, int) else tuple(axes)


def _matrix_view(path: str, shape: tuple[int, ...], spec: MatrixDimensionNumbers) -> _MatrixView:
    """Validates ``spec`` against a leaf's shape and builds its reshape plan."""
    ndim = len(shape)
    try:
        reduction = _as_axes(spec.reduction_axis)
        output = _as_axes(spec.output_axis)
        if not all(isinstance(a, int) for a in reduction + output):
            raise TypeError
    except TypeError:
        raise ValueError(
            f"Parameter {path}: dimension numbers must hold ints or sequences of ints, got {spec}."
        ) from None
    for axis in reduction + output:
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"Parameter {path} of shape {shape} (rank {ndim}): dimension numbers {spec} "
                f"name axis {axis}, which is out of range for rank {ndim}."
            )
    reduction = tuple(a % ndim for a in reduction)
    output = tuple(a % ndim for a in output)
    if len(set(reduction + output)) != len(reduction + output):
        raise ValueError(
            f"Parameter {path} of shape {shape}: dimension numbers {spec} must name each axis "
            "at most once, and not as both a reduction and an output axis."
        )
    if not reduction:
        raise ValueError(
            f"Parameter {path} of shape {shape}: dimension numbers {spec} need at least one "
            "reduction (input) axis."
        )
    batch_axes = tuple(a for a in range(ndim) if a not in reduction + output)
    permutation = batch_axes + reduction + output
    return _MatrixView(
        permutation=permutation,
        permuted_shape=tuple(shape[a] for a in permutation),
        batch=math.prod(shape[a] for a in batch_axes),
        rows=math.prod(shape[a] for a in reduction),
        cols=math.prod(shape[a] for a in output),
    )


def _default_spec(ndim: int) -> MatrixDimensionNumbers | None:
    if ndim < 2:
        return None
    return MatrixDimensionNumbers(reduction_axis=tuple(range(ndim - 1)), output_axis=ndim - 1)


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, MatrixDimensionNumbers)


def _resolve_views(
    params: Any,
    dimension_numbers: Any,
    mask: Any,
    max_matrix_size: int | None,
) -> tuple[list[str], list[_MatrixView | None], jax.tree_util.PyTreeDef]:
    """Per leaf of ``params``: its path string and its matrix view (None: pass through).

    Only shapes are read, so ``params`` may hold ``jax.ShapeDtypeStruct`` leaves.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
    shapes = [tuple(leaf.shape) for _, leaf in leaves_with_path]

    if callable(dimension_numbers) and not isinstance(dimension_numbers, MatrixDimensionNumbers):
        dimension_numbers = dimension_numbers(params)
    if dimension_numbers is None:
        specs = [_default_spec(len(s)) for s in shapes]
    elif isinstance(dimension_numbers, MatrixDimensionNumbers):
        specs = [dimension_numbers if len(s) >= 2 else None for s in shapes]
    else:
        specs = _flatten_like(dimension_numbers, treedef, paths, "dimension_numbers", _is_spec_leaf)
        for path, spec in zip(paths, specs, strict=True):
            if not _is_spec_leaf(spec):
                raise ValueError(
                    f"dimension_numbers at {path}: expected a MatrixDimensionNumbers or None, "
                    f"got {spec!r}."
                )

    if mask is not None:
        if callable(mask):
            mask = mask(params)
        selected = _flatten_like(mask, treedef, paths, "mask", None)
        specs = [spec if bool(keep) else None for spec, keep in zip(specs, selected, strict=True)]

    views = []
    for path, shape, spec in zip(paths, shapes, specs, strict=True):
        view = None if spec is None else _matrix_view(path, shape, spec)
        if (
            view is not None
            and max_matrix_size is not None
            and view.rows * view.cols > max_matrix_size
        ):
            view = None
        views.append(view)
    return paths, views, treedef


def _flatten_like(tree: Any, treedef, paths: list[str], name: str, is_leaf) -> list[Any]:
    """Flattens ``tree`` and checks it has the structure of the params."""
    leaves, other = jax.tree_util.tree_flatten(tree, is_leaf=is_leaf)
    if other != treedef:
        raise ValueError(
            f"{name} must have the same tree structure as the params. Params leaves: "
            f"{paths[:8]}{' ...' if len(paths) > 8 else ''}; {name} structure: {other}."
        )
    return leaves


def _check_same_structure(updates: Any, params: Any) -> None:
    """Raises a ValueError naming the first path where the two trees disagree."""
    u_leaves, u_def = jax.tree_util.tree_flatten_with_path(updates)
    p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
    if u_def == p_def:
        for (path, u), (_, p) in zip(u_leaves, p_leaves, strict=True):
            if tuple(u.shape) != tuple(p.shape):
                raise ValueError(
                    f"Parameter {jax.tree_util.keystr(path)}: the update has shape "
                    f"{tuple(u.shape)} but the parameter has shape {tuple(p.shape)}."
                )
        return
    u_paths = {jax.tree_util.keystr(p) for p, _ in u_leaves}
    p_paths = {jax.tree_util.keystr(p) for p, _ in p_leaves}
    only_u = sorted(u_paths - p_paths)
    only_p = sorted(p_paths - u_paths)
    raise ValueError(
        "updates and params must have the same tree structure. "
        f"Only in updates: {only_u[:5] or 'none'}; only in params: {only_p[:5] or 'none'}."
    )


def _precondition_leaf(
    view: _MatrixView,
    param: jax.Array,
    update: jax.Array,
    N: int,
    block_size: int | None,
    precision,
) -> jax.Array:
    w = view.to_matrices(param)
    g = view.to_matrices(update)
    if view.cols == 1 or view.rows == 1:
        # Single-output (or single-input) layer: the closed form, no SVD.
        out = linalg.precondition_vector(
            w.reshape(view.batch, -1), g.reshape(view.batch, -1), N
        ).reshape(g.shape)
    elif block_size is not None and max(view.rows, view.cols) > block_size:
        out = _precondition_blocks(w, g, N, block_size, precision)
    else:
        out = linalg.precondition_matrix(w, g, N, precision=precision)
    return view.from_matrices(out).astype(update.dtype)


def _precondition_blocks(w, g, N: int, block_size: int, precision) -> jax.Array:
    """Splits each (rows, cols) matrix into a grid of <= block_size blocks, each its own W.

    Zero padding to whole blocks is exact: padded rows and columns of W are zero, so the
    powers of W W^T and W^T W vanish there and the top-left block of the result is the
    unpadded block's P. The blocks, not the whole matrix, are treated as the factorized
    matrices, which is an approximation of the exact rule (docs/scaling.md).
    """
    batch, rows, cols = w.shape
    block_rows, block_cols = min(block_size, rows), min(block_size, cols)
    grid_rows, grid_cols = -(-rows // block_rows), -(-cols // block_cols)
    pad = ((0, 0), (0, grid_rows * block_rows - rows), (0, grid_cols * block_cols - cols))

    def to_blocks(x):
        x = jnp.pad(x, pad).reshape(batch, grid_rows, block_rows, grid_cols, block_cols)
        return x.transpose(0, 1, 3, 2, 4).reshape(-1, block_rows, block_cols)

    out = linalg.precondition_matrix(to_blocks(w), to_blocks(g), N, precision=precision)
    out = out.reshape(batch, grid_rows, grid_cols, block_rows, block_cols).transpose(0, 1, 3, 2, 4)
    return out.reshape(batch, grid_rows * block_rows, grid_cols * block_cols)[:, :rows, :cols]


def _explicit_spec(x: Any):
    """x's PartitionSpec if it is sharded over an Explicit mesh axis, else None.

    Under explicit sharding (``jax.sharding.AxisType.Explicit``, the default of
    ``jax.make_mesh`` in recent jax) a sharding is part of an array's type, and an SVD,
    eigh, or reshape that merges a sharded axis refuses such operands. Under the default
    ``Auto`` axes XLA's partitioner inserts the needed gathers itself and this is None.
    """
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None
    mesh = getattr(sharding, "mesh", None)
    spec = getattr(sharding, "spec", None)
    if mesh is None or spec is None or getattr(mesh, "empty", True):
        return None
    explicit = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == jax.sharding.AxisType.Explicit
    }
    used = {a for entry in spec if entry is not None for a in _as_axes_names(entry)}
    return spec if used & explicit else None


def _as_axes_names(entry) -> tuple:
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _unsharded(x: Any, needed: bool = True):
    """x replicated across an explicit mesh (what XLA does by itself for Auto axes)."""
    if not needed or _explicit_spec(x) is None:
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def _check_every(every) -> int:
    """precondition_every as a Python int (None -> 1); concrete integer arrays are accepted."""
    if every is None:
        return 1
    if isinstance(every, jax.core.Tracer):
        raise ValueError(
            "precondition_every must be known when tracing (it fixes the state's structure). "
            "With optax.inject_hyperparams, pass static_args=('N', 'precondition_every')."
        )
    value = np.asarray(every)
    if (
        value.shape == ()
        and value.dtype.kind in "iu"
        and value >= 1
        and not isinstance(every, bool)
    ):
        return int(value)
    raise ValueError(f"precondition_every must be a positive int or None, got {every!r}.")


class _MatrixGroup(NamedTuple):
    """Leaves whose matrices share (rows, cols, compute dtype): one batched call for all."""

    indices: tuple[int, ...]  # positions in the flattened params
    tall_shape: tuple[int, int, int]  # (total batch, max side, min side)
    transpose: bool  # rows < cols: the group is handled as its transpose
    dtype: Any
    method: str  # concrete ("svd", "eigh" or "newton")


def _is_plain_matrix(view: _MatrixView | None, block_size: int | None) -> bool:
    """Whether a leaf goes through the batched matrix route (not vector, not blocked)."""
    return (
        view is not None
        and view.rows > 1
        and view.cols > 1
        and not (block_size is not None and max(view.rows, view.cols) > block_size)
    )


def _matrix_groups(views, leaves, block_size, method: str) -> list[_MatrixGroup]:
    """Groups the plain matrix leaves by shape and dtype (trace-time structure only)."""
    members: dict[tuple, list[int]] = {}
    for index, (view, leaf) in enumerate(zip(views, leaves, strict=True)):
        if _is_plain_matrix(view, block_size):
            key = (view.rows, view.cols, jnp.dtype(linalg.compute_dtype(leaf.dtype)))
            members.setdefault(key, []).append(index)
    groups = []
    for (rows, cols, dtype), indices in members.items():
        batch = sum(views[i].batch for i in indices)
        groups.append(
            _MatrixGroup(
                indices=tuple(indices),
                tall_shape=(batch, max(rows, cols), min(rows, cols)),
                transpose=rows < cols,
                dtype=dtype,
                method=linalg.resolve_method(method, rows, cols),
            )
        )
    return groups


def _stack_group(group: _MatrixGroup, views, leaves) -> jax.Array:
    """The group's matrices as one (batch, max side, min side) array in the compute dtype."""
    mats = [views[i].to_matrices(leaves[i]).astype(group.dtype) for i in group.indices]
    out = mats[0] if len(mats) == 1 else jnp.concatenate(mats, axis=0)
    return jnp.swapaxes(out, -1, -2) if group.transpose else out


def _unstack_group(group: _MatrixGroup, views, out: jax.Array, updates) -> list[jax.Array]:
    if group.transpose:
        out = jnp.swapaxes(out, -1, -2)
    pieces, start = [], 0
    for i in group.indices:
        view = views[i]
        piece = out[start : start + view.batch]
        start += view.batch
        pieces.append(view.from_matrices(piece).astype(updates[i].dtype))
    return pieces


def overparam_precondition(
    N: int,
    *,
    dimension_numbers: Any = None,
    mask: Any = None,
    block_size: int | None = None,
    max_matrix_size: int | None = None,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
    method: str = "svd",
    precondition_every: int | None = None,
    refresh_spectrum: bool = True,
    every_step_until: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Preconditions gradients as depth-N linear over-parameterization would.

    Replacing a weight matrix W by a product of N matrices W_N \cdots W_1, and running
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

    P_W scales like ||W||^{2-2/N}: a weight matrix initialized near zero barely moves at
    first. Standard flax initializers and identity-like inits are fine.

    Leaves with more than two axes are reshaped to matrices (or batches of them) per
    :class:`MatrixDimensionNumbers`. Single-output matrices use the closed form
    ||w||^{2-2/N} (g + (N-1) proj_w(g)). The exact path takes a thin SVD of every matrix,
    in float32 or wider whatever the parameter dtype; zero and repeated singular values
    give no NaN, and updates keep their dtype.

    Args:
      N: the depth, a positive Python int. N = 1 is the identity.
      dimension_numbers: None (the defaults in :class:`MatrixDimensionNumbers`), one
        ``MatrixDimensionNumbers`` for every leaf of rank >= 2, a pytree like the params
        with a ``MatrixDimensionNumbers`` or None (pass through) per leaf, or a callable
        from params to such a pytree.
      mask: optional pytree of bools like the params, or a callable returning one; leaves
        marked False pass through unchanged.
      block_size: if set, matrices with a side longer than this are split into a grid of
        blocks of at most ``block_size x block_size``, each preconditioned as its own
        matrix: cheaper, but not the exact rule (docs/scaling.md).
      max_matrix_size: if set, leaves whose matrix has more entries than this pass
        through unchanged.
      precision: precision of the matmuls around the SVD.
      method: how each matrix's factors are computed: "svd" (default, the exact
        reference), "eigh" (eigendecomposition of the smaller Gram matrix W^T W; resolves
        singular values down to ~sqrt(eps) s_max), "newton" (matmul-only coupled Newton
        iteration, for GPU/TPU) or "auto" (per platform and shape,
        :func:`overparam_optax.linalg.resolve_method`). docs/performance.md has the
        measured speed and error of each.
      precondition_every: k >= 1 (None, the default, means 1). With k > 1 the factors of
        every matrix are recomputed only on updates 0, k, 2k, ... (a ``lax.cond`` on the
        step count) and cached in the state; in between, the cached factors of W_old
        (the parameters at the last recomputation) are applied, matmuls only: exactly
        P_{W_old}(G) with ``refresh_spectrum=False``, else W_old's singular vectors with
        the current singular values (below). Costs one
        (rows x min side) plus one (min side)^2 array per matrix of state. Default: exact
        every step, no cache. It decides the state's structure, so under
        ``optax.inject_hyperparams`` list it in ``static_args``.
      refresh_spectrum: with ``precondition_every > 1`` and method "svd"/"eigh" (or
        "auto" resolving to them), re-estimate the singular values every step from the
        current W in the cached singular vectors (s_a = u_a^T W v_a, one extra
        m x n x n product), so that only the vectors are stale. Default True: it cut
        the staleness gap of the MNIST curve several-fold (docs/performance.md). False
        gives exactly P_{W_old}(G).
      every_step_until: with ``precondition_every > 1``, also recompute on every update
        while the step count is below this (a warm-up: the singular vectors rotate
        fastest early in training, where a stale basis costs the most). Enters only the
        ``lax.cond`` predicate, so it may be a traced value. Default 0.

    Matrices of the same shape (across leaves, and the batch axes of each leaf) are
    preconditioned in one batched call. Leaves split by ``block_size`` always use the
    exact SVD path, every step.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Its ``update`` requires ``params``.

    Raises:
      ValueError: at construction, if N is not a positive int; in ``init``/``update``, if
        the dimension numbers or mask do not fit the params (the message names the leaf),
        or if ``update`` is called without params.

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
    N = linalg.check_depth(N)
    if block_size is not None and (not isinstance(block_size, int) or block_size < 2):
        raise ValueError(f"block_size must be an int >= 2 or None, got {block_size!r}.")
    if max_matrix_size is not None and (
        not isinstance(max_matrix_size, int) or max_matrix_size < 1
    ):
        raise ValueError(
            f"max_matrix_size must be a positive int or None, got {max_matrix_size!r}."
        )
    if method not in linalg.METHODS:
        raise ValueError(f"method must be one of {linalg.METHODS}, got {method!r}.")
    precondition_every = _check_every(precondition_every)
    cached = precondition_every > 1 and N > 1

    def init_fn(params):
        # Validate the dimension numbers now (shapes only, no linear algebra), so that a
        # spec that does not fit is reported before the first step.
        _, views, _ = _resolve_views(params, dimension_numbers, mask, max_matrix_size)
        cache = ()
        if cached:  # zeros of the right shapes; the first update (count 0) fills them
            groups = _matrix_groups(views, jax.tree.leaves(params), block_size, method)
            cache = tuple(
                linalg.depth_factors_like(group.tall_shape, group.dtype, N, group.method)
                for group in groups
            )
        return OverparamPreconditionState(count=jnp.zeros([], jnp.int32), cache=cache)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "overparam_precondition needs the current params: call "
                "tx.update(grads, state, params)."
            )
        _check_same_structure(updates, params)
        count = optax.safe_increment(state.count)
        if N == 1:
            return updates, OverparamPreconditionState(count=count, cache=state.cache)
        _, views, treedef = _resolve_views(params, dimension_numbers, mask, max_matrix_size)
        param_leaves, update_leaves = jax.tree.leaves(params), jax.tree.leaves(updates)
        # Explicit sharding (shardings in the types): gather what the linear algebra needs.
        explicit_specs = [
            None if v is None else _explicit_spec(u)
            for v, u in zip(views, update_leaves, strict=True)
        ]
        param_leaves = [
            _unsharded(p, v is not None) for v, p in zip(views, param_leaves, strict=True)
        ]
        update_leaves = [
            _unsharded(u, v is not None) for v, u in zip(views, update_leaves, strict=True)
        ]
        new_leaves = [
            update
            if view is None or _is_plain_matrix(view, block_size)
            else _precondition_leaf(view, param, update, N, block_size, precision)
            for view, param, update in zip(views, param_leaves, update_leaves, strict=True)
        ]
        groups = _matrix_groups(views, param_leaves, block_size, method)
        ws = [_stack_group(group, views, param_leaves) for group in groups]
        gs = [_stack_group(group, views, update_leaves) for group in groups]
        if cached:

            def recompute():
                return tuple(
                    linalg.depth_factors(w, N, group.method, precision=precision)
                    for group, w in zip(groups, ws, strict=True)
                )

            cache = jax.lax.cond(
                (state.count % precondition_every == 0) | (state.count < every_step_until),
                recompute,
                lambda: state.cache,
            )
            if refresh_spectrum:
                cache_now = [
                    linalg.refresh_singular_values(factors, w, precision=precision)
                    if isinstance(factors, linalg.SpectralBasis)
                    else factors
                    for factors, w in zip(cache, ws, strict=True)
                ]
            else:
                cache_now = cache
            outs = [
                linalg.apply_depth_factors(factors, g, N, precision=precision)
                for factors, g in zip(cache_now, gs, strict=True)
            ]
        else:
            cache = ()
            outs = [
                linalg.precondition_matrix(w, g, N, precision=precision, method=group.method)
                for group, w, g in zip(groups, ws, gs, strict=True)
            ]
        for group, out in zip(groups, outs, strict=True):
            for i, piece in zip(
                group.indices, _unstack_group(group, views, out, update_leaves), strict=True
            ):
                new_leaves[i] = piece
        new_leaves = [  # and give each update back the sharding it came with
            leaf if spec is None else jax.sharding.reshard(leaf, spec)
            for leaf, spec in zip(new_leaves, explicit_specs, strict=True)
        ]
        return treedef.unflatten(new_leaves), OverparamPreconditionState(count=count, cache=cache)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _add_depth_scaled_decay(
    weight_decay, N: int, dimension_numbers, mask, max_matrix_size
) -> optax.GradientTransformationExtraArgs:
    """Adds weight_decay * N * W on preconditioned leaves and weight_decay * W elsewhere.

    With decay lambda on every factor, the balanced end-to-end matrix shrinks by
    (1 - eta * lambda * N) per step (the paper's eq. 24): the decay is not preconditioned.
    Leaves that are not factorized (biases) keep the ordinary decay.
    """

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("overparam_sgd with weight_decay needs params in update().")
        _, views, treedef = _resolve_views(params, dimension_numbers, mask, max_matrix_size)
        leaves = [
            u + (weight_decay * (N if view is not None else 1)) * p.astype(u.dtype)
            for view, u, p in zip(
                views, jax.tree.leaves(updates), jax.tree.leaves(params), strict=True
            )
        ]
        return treedef.unflatten(leaves), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def overparam_sgd(
    learning_rate: optax.ScalarOrSchedule,
    N: int = 3,
    weight_decay: float | jax.Array = 0.0,
    *,
    momentum: float | None = None,
    nesterov: bool = False,
    dimension_numbers: Any = None,
    mask: Any = None,
    block_size: int | None = None,
    max_matrix_size: int | None = None,
    method: str = "svd",
    precondition_every: int | None = None,
    every_step_until: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD along the depth-N end-to-end dynamics, with the paper's weight decay.

    .. math::
      W \leftarrow (1 - \eta \lambda N) W - \eta P_W(\nabla L(W))

    for every preconditioned matrix W (Arora et al., 2018, eq. 24), and the plain rule
    W <- (1 - eta * lambda) W - eta * grad for the other leaves. With ``momentum`` the
    same direction is fed to heavy-ball (or Nesterov) momentum.

    Args:
      learning_rate: eta, a float or an optax schedule.
      N: the depth, a positive Python int. Under ``optax.inject_hyperparams`` list it in
        ``static_args``.
      weight_decay: lambda, the decay applied to each factor in the factorized view.
      momentum: optional momentum coefficient (as in ``optax.sgd``).
      nesterov: whether to use Nesterov momentum.
      dimension_numbers, mask, block_size, max_matrix_size, method, precondition_every,
        every_step_until: as in :func:`overparam_precondition`.

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
    N = linalg.check_depth(N)
    options = dict(dimension_numbers=dimension_numbers, mask=mask, max_matrix_size=max_matrix_size)
    return optax.chain(
        overparam_precondition(
            N,
            block_size=block_size,
            method=method,
            precondition_every=precondition_every,
            every_step_until=every_step_until,
            **options,
        ),
        _add_depth_scaled_decay(weight_decay, N, **options),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )
