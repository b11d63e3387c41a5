"""The protocol every method implements, and the shared part of the methods that decompose
W afresh on every update.

A method is a frozen dataclass of its options (hashable: it is a static argument of the
compiled update). The transform asks it for three things per group of same-shaped matrices:
the state entry of a stack of tall matrices (``Method.init_entry``), the update of the
stack (``Method.update``: the preconditioned gradients, the new entry, and which matrices
were decomposed afresh), and the sharding of an entry (``Method.entry_sharding``).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from overparam_optax import spectral_jvp

__all__ = ["Decomposing", "Method"]


@dataclasses.dataclass(frozen=True)
class Method(abc.ABC):
    """A way of computing P_W(G) for a stack of tall matrices, with its options as fields."""

    #: The ``method=`` string that names the method with its default options.
    name: ClassVar[str]
    #: The NamedTuple type of the method's state entry, or None for a stateless method.
    entry_type: ClassVar[type | None] = None

    def check_depth(self, N: int) -> None:  # noqa: B027 (most methods take every N)
        """Raises ValueError if the method does not support depth N (at construction)."""

    def init_entry(self, shape: tuple[int, int, int], dtype, N: int) -> Any:
        """The state entry of a (count, m, n), m >= n, stack of matrices before any update.

        It depends on the shape, dtype and options only (never on values or the machine),
        so a state rebuilt from zeros or restored on another backend fits.
        """
        del shape, dtype, N
        return optax.MaskedNode()

    @abc.abstractmethod
    def update(self, w: jax.Array, g: jax.Array, entry: Any, N: int, precision):
        """(P_W(G), new entry, a bool per matrix: decomposed afresh) for tall stacks w, g.

        ``w`` and ``g`` are (count, m, n), m >= n, in the compute dtype; derivatives through
        the result must be finite at repeated and zero singular values.
        """

    @staticmethod
    def entry_sharding(entry: Any, param_sharding: Any, replicated: Any) -> Any:
        """The sharding of each array of an entry, given its parameter's sharding."""
        del param_sharding
        return jax.tree.map(lambda _: replicated, entry)


@dataclasses.dataclass(frozen=True)
class Decomposing(Method):
    """A stateless method: factors of W from a decomposition on every call, then P_W(G)."""

    #: Whether :meth:`factors` is the SVD basis itself (the derivative then reuses it).
    factors_are_svd: ClassVar[bool] = False

    @abc.abstractmethod
    def factors(self, w: jax.Array, N: int, precision) -> tuple:
        """The factors of tall matrices w (..., m, n) that P_W needs."""

    @abc.abstractmethod
    def apply(self, factors: tuple, g: jax.Array, N: int, precision) -> jax.Array:
        """P_W(g) for tall g from :meth:`factors` of W (matmuls only); N >= 2."""

    def update(self, w, g, entry, N, precision):
        del entry
        out = spectral_jvp.differentiable_precondition(self, w, g, N, precision)
        return out, optax.MaskedNode(), jnp.zeros(w.shape[:-2], bool)
