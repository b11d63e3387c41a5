"""Sharding: what the linear algebra needs gathered, and the optimizer state's shardings.

Under ``Auto`` mesh axes XLA's partitioner inserts the gathers an SVD or eigh needs by
itself. Under ``Explicit`` axes (``jax.sharding.AxisType.Explicit``) a sharding is part of
an array's type and those ops refuse sharded operands, so the transform gathers each
preconditioned leaf first and gives its update the leaf's sharding back. Under either, the
batch of same-shaped matrices is then split between the devices (:func:`map_over_mesh`).
The optimizer state is sharded like the params
(:func:`~overparam_optax.state_shardings`), the methods' entries included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "explicit_spec",
    "gathered",
    "keep_explicit_shardings",
    "map_over_mesh",
    "whole_on_every_device",
]


def _axis_names(entry) -> tuple:
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def explicit_spec(x: Any) -> jax.sharding.PartitionSpec | None:
    """x's PartitionSpec if it is sharded over an Explicit mesh axis, else None."""
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
    used = {a for entry in spec if entry is not None for a in _axis_names(entry)}
    return spec if used & explicit else None


def _on_own_mesh(x: Any, spec: jax.sharding.PartitionSpec) -> jax.sharding.NamedSharding:
    """A sharding with ``spec`` on the mesh x is sharded over (given whole, so that no
    ``jax.set_mesh`` context is needed)."""
    return jax.sharding.NamedSharding(jax.typeof(x).sharding.mesh, spec)


def gathered(x: jax.Array) -> jax.Array:
    """x replicated across an Explicit mesh (XLA does this by itself for Auto axes)."""
    if explicit_spec(x) is None:
        return x
    return jax.sharding.reshard(x, _on_own_mesh(x, jax.sharding.PartitionSpec()))


def whole_on_every_device(x: jax.Array) -> jax.Array:
    """x replicated over the mesh in context, Auto axes included (else x as it is).

    For the methods' state entries, which ``state_shardings`` splits like their parameter
    while the spread update splits them by matrices: going through the whole array (an all-gather,
    then local slices) is what XLA's partitioner would do anyway, but said here it does
    not warn of an "involuntary full rematerialization" for each of them.

    Args:
      x: an array, inside or outside ``jax.jit``.

    Returns:
      x resharded to replicated over an Explicit mesh, constrained to replicated under a
      mesh with Auto axes (``jax.set_mesh``), or x itself without a mesh (or inside a
      ``shard_map`` whose axes are all Manual).

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((4, 3))
      >>> whole_on_every_device(x) is x  # no mesh in context
      True
    """
    if explicit_spec(x) is not None:
        return gathered(x)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Auto not in mesh.axis_types:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())


def keep_explicit_shardings(new: Any, old: Any) -> Any:
    """``new``, each leaf given the Explicit-mesh sharding of the matching leaf of ``old``.

    What the transform computes from gathered matrices (the updates, the cached factors)
    goes back to the sharding its input came with; under Auto axes or without a mesh a
    sharding is not part of the type and the leaf is left as it is.

    Args:
      new: a tree with the structure of ``old``.
      old: the inputs whose shardings the outputs keep.

    Returns:
      ``new`` with each leaf resharded (``jax.sharding.reshard``) to its ``old`` leaf's
      spec where that leaf is sharded over an Explicit mesh axis, else unchanged.

    Examples:
      >>> import jax.numpy as jnp
      >>> out = keep_explicit_shardings({"w": jnp.zeros(2)}, {"w": jnp.ones(2)})
      >>> float(out["w"][0])  # no Explicit mesh: unchanged
      0.0
    """

    def keep(new_leaf, old_leaf):
        spec = explicit_spec(old_leaf)
        if spec is None:
            return new_leaf
        return jax.sharding.reshard(new_leaf, _on_own_mesh(old_leaf, spec))

    return jax.tree.map(keep, new, old)


def _spread_axes(mesh) -> tuple[tuple, bool]:
    """(axes to spread a batch of matrices over, whether they are Explicit).

    The Explicit axes if the mesh has any (a sharding over them is part of the arrays'
    types), else its Auto axes; Manual axes (inside a shard_map) never.
    """
    kinds = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    explicit = tuple(a for a, k in kinds.items() if k == jax.sharding.AxisType.Explicit)
    if explicit:
        return explicit, True
    return tuple(a for a, k in kinds.items() if k == jax.sharding.AxisType.Auto), False


def map_over_mesh(fn: Callable, count: int, batched: Any, shared: Any) -> Any:
    """``fn(batched, shared)``, each device of the mesh computing its share of axis 0.

    Under a mesh (``jax.set_mesh``) every device would otherwise compute every matrix's
    decomposition. The stack of same-shaped matrices (axis 0 of every array in
    ``batched``) is zero-padded to a multiple of the device count (a zero matrix is well
    defined for every method), split over the mesh's Explicit axes (else its Auto ones),
    and ``fn`` runs under ``jax.shard_map`` on each device's slice, as distributed Shampoo
    and Muon implementations do; ``shared`` (e.g. a flag) is replicated. ``fn`` must treat the
    matrices independently. The outputs stay split along axis 0 and padded: the caller
    gathers (:func:`gathered`) and crops them. Without a mesh, on one device, or for a
    single matrix, this is just ``fn(batched, shared)``.

    Args:
      fn: ``fn(batched, shared) -> outputs``, every output batched on axis 0 like the input
        (``None`` entries allowed), each matrix computed independently of the others.
      count: the number of matrices (the length of axis 0).
      batched: a tree of arrays batched on axis 0.
      shared: a tree given whole to every device.

    Returns:
      ``fn``'s outputs, each with axis 0 padded to a multiple of the device count.

    Examples:
      >>> import jax.numpy as jnp
      >>> out = map_over_mesh(lambda x, c: x * c, 3, jnp.ones((3, 2, 2)), 2.0)
      >>> out.shape, float(out[0, 0, 0])
      ((3, 2, 2), 2.0)
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or count < 2:
        return fn(batched, shared)
    axes, explicit = _spread_axes(mesh)
    devices = math.prod(mesh.shape[a] for a in axes)
    if devices == 1:
        return fn(batched, shared)
    split = jax.sharding.PartitionSpec(axes)

    def place(x):
        x = jnp.pad(x, [(0, -count % devices)] + [(0, 0)] * (x.ndim - 1))
        if explicit:  # the sharding is part of the type: say it
            return jax.sharding.reshard(x, split)
        return jax.lax.with_sharding_constraint(x, split)

    mapped = jax.shard_map(
        fn, in_specs=(split, jax.sharding.PartitionSpec()), out_specs=split, axis_names=set(axes)
    )
    return mapped(jax.tree.map(place, batched), shared)
