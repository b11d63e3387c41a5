"""Which axes of each parameter form its matrices, and how a leaf becomes a stack of them.

A leaf is *viewed* as a (batch, rows, cols) stack of matrices: the reduction (input) axes
flattened into the rows, the output axes into the columns, every other axis a batch axis.
With ``block_size`` every matrix is further cut into a grid of blocks, each its own matrix.
Nothing here does linear algebra; only shapes are read, so ``jax.ShapeDtypeStruct`` leaves
work as well as arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from optax.contrib import MuonDimensionNumbers

from overparam_optax.checks import check_real_floating

__all__ = ["MatrixDimensionNumbers", "MatrixView", "check_same_structure", "resolve_views"]


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


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """How one leaf is reshaped into a (count, rows, cols) stack of matrices and back.

    ``count`` is the number of matrices the leaf holds: its batch slices times, with
    blocks, the blocks of each slice. ``rows``/``cols`` are those of one matrix (one
    block). ``full_rows``/``full_cols`` are the unblocked matrix's.
    """

    permutation: tuple[int, ...]
    permuted_shape: tuple[int, ...]
    batch: int
    full_rows: int
    full_cols: int
    rows: int
    cols: int

    @property
    def is_empty(self) -> bool:
        return self.batch * self.full_rows * self.full_cols == 0

    @property
    def grid(self) -> tuple[int, int]:
        if self.is_empty:
            return 1, 1
        return -(-self.full_rows // self.rows), -(-self.full_cols // self.cols)

    @property
    def count(self) -> int:
        return self.batch * math.prod(self.grid)

    @property
    def is_vector(self) -> bool:
        """Single output (or single input): the closed form applies, no factors needed."""
        return self.rows == 1 or self.cols == 1

    def to_matrices(self, x: jax.Array) -> jax.Array:
        x = jnp.transpose(x, self.permutation).reshape(self.batch, self.full_rows, self.full_cols)
        if self.grid == (1, 1):
            return x
        # Zero padding to whole blocks is exact: padded rows/cols of W are zero, so they
        # contribute nothing to W W^T or W^T W, and are cropped off in from_matrices.
        grid_rows, grid_cols = self.grid
        pad_rows = grid_rows * self.rows - self.full_rows
        pad_cols = grid_cols * self.cols - self.full_cols
        x = jnp.pad(x, ((0, 0), (0, pad_rows), (0, pad_cols)))
        x = x.reshape(self.batch, grid_rows, self.rows, grid_cols, self.cols)
        return x.transpose(0, 1, 3, 2, 4).reshape(self.count, self.rows, self.cols)

    def from_matrices(self, x: jax.Array) -> jax.Array:
        if self.grid != (1, 1):
            grid_rows, grid_cols = self.grid
            x = x.reshape(self.batch, grid_rows, grid_cols, self.rows, self.cols)
            x = x.transpose(0, 1, 3, 2, 4)
            x = x.reshape(self.batch, grid_rows * self.rows, grid_cols * self.cols)
            x = x[:, : self.full_rows, : self.full_cols]
        inverse = np.argsort(self.permutation)
        return jnp.transpose(x.reshape(self.permuted_shape), inverse)


def _as_axes(axes: Sequence[int] | int) -> tuple[int, ...]:
    return (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _matrix_view(
    path: str, shape: tuple[int, ...], spec: MatrixDimensionNumbers, block_size: int | None
) -> MatrixView:
    """Validates ``spec`` against a leaf's shape and builds its reshape plan."""
    ndim = len(shape)
    try:
        reduction = _as_axes(spec.reduction_axis)
        output = _as_axes(spec.output_axis)
    except TypeError:
        reduction = output = (None,)
    if not all(_is_int(a) for a in reduction + output):
        raise ValueError(
            f"Parameter {path}: dimension numbers must hold ints or sequences of ints, got {spec}."
        )
    for axis in reduction + output:
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"Parameter {path} of shape {shape} (rank {ndim}): dimension numbers {spec} "
                f"name axis {axis}, which is out of range for rank {ndim}."
            )
    reduction = tuple(int(a) % ndim for a in reduction)
    output = tuple(int(a) % ndim for a in output)
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
    rows = math.prod(shape[a] for a in reduction)
    cols = math.prod(shape[a] for a in output)
    # Single-output matrices use the exact closed form and are never blocked.
    blocked = block_size is not None and rows > 1 and cols > 1
    return MatrixView(
        permutation=permutation,
        permuted_shape=tuple(shape[a] for a in permutation),
        batch=math.prod(shape[a] for a in batch_axes),
        full_rows=rows,
        full_cols=cols,
        rows=min(rows, block_size) if blocked else rows,
        cols=min(cols, block_size) if blocked else cols,
    )


def _default_spec(ndim: int) -> MatrixDimensionNumbers | None:
    if ndim < 2:
        return None
    return MatrixDimensionNumbers(reduction_axis=tuple(range(ndim - 1)), output_axis=ndim - 1)


_SPEC_TYPES = (MatrixDimensionNumbers, MuonDimensionNumbers)

_SPEC_EXPECTED = "a MatrixDimensionNumbers, an optax.contrib.MuonDimensionNumbers or None"


def _is_spec(x: Any) -> bool:
    return isinstance(x, _SPEC_TYPES)


def _as_spec(spec: Any) -> MatrixDimensionNumbers | None:
    """Muon's dimension numbers mean what ours do (x W = y); read them as ours once, here."""
    if isinstance(spec, MuonDimensionNumbers):
        return MatrixDimensionNumbers(spec.reduction_axis, spec.output_axis)
    return spec


def _is_strict_leaf(x: Any) -> bool:
    """A leaf holding a value: not None, nor an empty container (both have no leaves)."""
    treedef = jax.tree_util.tree_structure(x)
    return treedef.num_nodes == 1 and treedef.num_leaves == 1


def _spread(
    prefix: Any, params: Any, path: str, name: str, is_value, expected: str
) -> list[tuple[Any, str]]:
    """Per leaf of ``params``, the value of ``prefix`` (a tree prefix of it) that covers it.

    Each value comes with the path where it was given: the leaf's own, or a node above it
    whose subtree it broadcasts to. Containers are matched by their keys, as paths name
    them; subtrees without leaves need no value.
    """
    if is_value(prefix):
        return [(prefix, path)] * len(jax.tree_util.tree_leaves(params))
    if not _is_strict_leaf(params) and not jax.tree_util.tree_leaves(params):
        return []
    where = path or "the top level"
    if _is_strict_leaf(params):
        raise _misfit_at_leaf(name, where, expected, prefix)
    params_children = _children(params)
    prefix_children = {} if _is_strict_leaf(prefix) else _children(prefix)
    if params_children.keys() != prefix_children.keys():
        keys = list(params_children)
        held = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        raise ValueError(
            f"{name} must have the same tree structure as the params, or a prefix of it, "
            f"with {expected} at each of its leaves: at {where} the params hold {held}; got "
            f"{_short_repr(prefix)}."
        )
    spread = []
    for key, child in params_children.items():
        spread += _spread(prefix_children[key], child, path + key, name, is_value, expected)
    return spread


def _misfit_at_leaf(name: str, where: str, expected: str, got: Any) -> ValueError:
    note = ""
    if got is None:  # None is a pytree without leaves, not a value
        note = (
            f" (None is an empty subtree; {name} must have the same tree structure as the "
            "params, or a prefix of it)"
        )
    return ValueError(
        f"{name} at {where}: expected {expected} for this parameter, got {_short_repr(got)}{note}."
    )


def _short_repr(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _specs(dimension_numbers: Any, params: Any, paths: list[str], shapes: list) -> list[Any]:
    """Per leaf, its MatrixDimensionNumbers or None (pass through).

    One spec given for several leaves (at the root or at a node above them) applies to
    those of rank >= 2; a spec at a leaf's own position applies to it whatever its rank.
    """
    if dimension_numbers is None:
        return [_default_spec(len(s)) for s in shapes]
    if _is_spec(dimension_numbers):
        return [_as_spec(dimension_numbers) if len(s) >= 2 else None for s in shapes]
    spread = _spread(
        dimension_numbers,
        params,
        "",
        "dimension_numbers",
        lambda x: x is None or _is_spec(x),
        _SPEC_EXPECTED,
    )
    return [
        _as_spec(spec) if given == path or len(shape) >= 2 else None
        for (spec, given), path, shape in zip(spread, paths, shapes, strict=True)
    ]


def _mask_value(path: str, keep: Any) -> bool:
    """A mask leaf as a Python bool; only booleans (Python, numpy or 0-d jax) are accepted."""
    if isinstance(keep, (bool, np.bool_)):
        return bool(keep)
    if isinstance(keep, (np.ndarray, jax.Array)) and keep.shape == () and keep.dtype == bool:
        if isinstance(keep, jax.core.Tracer):
            raise ValueError(f"mask at {path}: must be known when tracing, got a traced value.")
        return bool(keep)
    raise ValueError(
        f"mask at {path}: expected a bool (True: precondition this leaf, False: pass it "
        f"through), got {keep!r} of type {type(keep).__name__}. Per-element masks are not "
        "supported: a leaf is preconditioned as a whole."
    )


def _leaf_shape(path: str, leaf: Any) -> tuple[int, ...]:
    if isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
        return ()  # a Python scalar leaf, as optax.sgd accepts: passes through
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise ValueError(
            f"Parameter {path}: expected an array, got {leaf!r} of type {type(leaf).__name__}."
        )
    return tuple(leaf.shape)


_LEAF_REMEDY = (
    "Mask the leaf out (mask=...) or pass None as its dimension numbers; a complex leaf can "
    "also be split into real and imaginary parts."
)


def resolve_views(
    params: Any, dimension_numbers: Any, mask: Any, block_size: int | None
) -> tuple[list[str], list[MatrixView | None], jax.tree_util.PyTreeDef]:
    """Per leaf of ``params``: its path string and its matrix view (None: pass through).

    A leaf passes through if it has fewer than two axes (under the default dimension
    numbers), its dimension numbers are None, its mask is False, or its matrices are empty
    (P of an empty matrix is empty). A selected leaf that is complex or not floating-point
    raises a ValueError naming it.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not leaves_with_path:  # e.g. optax.tree.map_params's placeholder: nothing to check
        return [], [], treedef
    paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
    shapes = [
        _leaf_shape(path, leaf) for path, (_, leaf) in zip(paths, leaves_with_path, strict=True)
    ]

    if callable(dimension_numbers) and not _is_spec(dimension_numbers):
        dimension_numbers = dimension_numbers(params)
    specs = _specs(dimension_numbers, params, paths, shapes)

    if mask is not None:
        if callable(mask):
            mask = mask(params)
        spread = _spread(mask, params, "", "mask", _is_strict_leaf, "a bool")
        specs = [
            spec if _mask_value(given or "the top level", keep) else None
            for spec, (keep, given) in zip(specs, spread, strict=True)
        ]

    views = []
    for path, shape, spec, (_, leaf) in zip(paths, shapes, specs, leaves_with_path, strict=True):
        view = None if spec is None else _matrix_view(path, shape, spec, block_size)
        if view is not None and view.is_empty:
            view = None  # an empty matrix: nothing to precondition
        if view is not None:
            check_real_floating(f"Parameter {path}", leaf, _LEAF_REMEDY)
        views.append(view)
    return paths, views, treedef


def _children(tree: Any) -> dict[str, Any]:
    """The direct children of a pytree node, by their key strings (one level only)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is not tree)
    return {jax.tree_util.keystr(path): child for path, child in leaves}


def _is_leaf(tree: Any) -> bool:
    return jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(tree))


def _container_difference(updates: Any, params: Any, path: str = "") -> str | None:
    """Where two trees with the same leaf paths first use different container types."""
    if _is_leaf(updates) or _is_leaf(params):
        return None
    if type(updates) is not type(params):
        return (
            f"at {path or 'the top level'} the updates are a {type(updates).__name__} and "
            f"the params a {type(params).__name__}"
        )
    u_children, p_children = _children(updates), _children(params)
    for key in u_children.keys() & p_children.keys():
        found = _container_difference(u_children[key], p_children[key], path + key)
        if found:
            return found
    return None


def _check_leaf_shapes(u_leaves: list, p_leaves: list) -> None:
    """Names the first leaf whose update and parameter shapes differ (paths already agree)."""
    for (_, u), (path, p) in zip(u_leaves, p_leaves, strict=True):
        if jnp.shape(u) != jnp.shape(p):
            raise ValueError(
                f"Parameter {jax.tree_util.keystr(path)}: the update has shape "
                f"{jnp.shape(u)} but the parameter has shape {jnp.shape(p)}."
            )


def check_same_structure(updates: Any, params: Any) -> None:
    """Raises a ValueError naming the first path where the two trees disagree.

    Trees that hold the same leaves at the same paths in different container types (dict
    gradients for ``FrozenDict`` params, a list for a tuple) are refused too, with a
    message that names the containers: ``optax.apply_updates`` refuses that pair as well.
    """
    u_leaves, u_def = jax.tree_util.tree_flatten_with_path(updates)
    p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
    if u_def == p_def:  # the usual case: no path strings are built
        _check_leaf_shapes(u_leaves, p_leaves)
        return
    u_paths = [jax.tree_util.keystr(p) for p, _ in u_leaves]
    p_paths = [jax.tree_util.keystr(p) for p, _ in p_leaves]
    if u_paths == p_paths:
        _check_leaf_shapes(u_leaves, p_leaves)
        where = _container_difference(updates, params)
        raise ValueError(
            "updates and params hold the same leaves at the same paths but in different "
            f"containers ({where or f'updates {u_def}, params {p_def}'}); optax.apply_updates "
            "refuses such a pair too. Give both the same containers (for FrozenDict params: "
            "flax.core.freeze(grads), or flax.core.unfreeze(params) before init)."
        )
    only_u = sorted(set(u_paths) - set(p_paths))
    only_p = sorted(set(p_paths) - set(u_paths))
    if not only_u and not only_p:
        raise ValueError(
            "updates and params must have the same tree structure; they hold the same paths "
            f"in another order or number: updates {u_def}, params {p_def}."
        )
    raise ValueError(
        "updates and params must have the same tree structure. "
        f"Only in updates: {only_u[:5] or 'none'}; only in params: {only_p[:5] or 'none'}."
    )
