"""The methods that compute P_W(G), one module each, and the registry of their names.

Every method is a frozen dataclass of its options implementing :class:`Method`: the state
entry of a stack of matrices, the update of the stack, and the entry's sharding. Adding a
method is one module, one line in :data:`REGISTRY` and one test file.
"""

from __future__ import annotations

import types

from overparam_optax.methods.base import Decomposing, Method
from overparam_optax.methods.eigh import Eigh
from overparam_optax.methods.newton import Newton
from overparam_optax.methods.svd import Svd
from overparam_optax.methods.tracked import Tracked, TrackedBasis

__all__ = [
    "METHODS",
    "REGISTRY",
    "Decomposing",
    "Eigh",
    "Method",
    "Newton",
    "Svd",
    "Tracked",
    "TrackedBasis",
    "entry_types",
    "owner",
    "resolve",
]

#: The ``method=`` strings and the method each names, with its default options.
REGISTRY = types.MappingProxyType(
    {"tracked": Tracked, "svd": Svd, "eigh": Eigh, "newton": Newton}
)
#: The values of ``method`` as a string.
METHODS = tuple(REGISTRY)


def resolve(method) -> Method:
    """The method that ``method=`` names: a :data:`METHODS` string (default options) or a
    :class:`Method` instance (e.g. ``Tracked(tolerance=1e-3)``); ValueError otherwise."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method in REGISTRY:
        return REGISTRY[method]()
    raise ValueError(
        f"method must be one of {METHODS} or a method instance such as "
        f"overparam_optax.methods.Tracked(tolerance=1e-3), got {method!r}."
    )


def entry_types() -> tuple[type, ...]:
    """The NamedTuple types of the methods' state entries (for finding them in a state)."""
    return tuple(cls.entry_type for cls in REGISTRY.values() if cls.entry_type is not None)


def owner(entry) -> type[Method] | None:
    """The method class whose state entry ``entry`` is, or None."""
    for cls in REGISTRY.values():
        if cls.entry_type is not None and isinstance(entry, cls.entry_type):
            return cls
    return None
