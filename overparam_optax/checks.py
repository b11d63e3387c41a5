"""Input checks shared by the transform and the public math functions.

One check, one wording: a leaf selected for preconditioning and an array passed to
``precondition_matrix`` (or to the factorized-layer utilities) are refused for the same
dtypes with the same message, which names the argument and says what was expected.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["check_real_floating"]

_REMEDY_COMPLEX = "Pass its real and imaginary parts as separate real matrices if that is meant."
_REMEDY_OTHER = "Cast it to a floating-point dtype first (e.g. x.astype(jnp.float32))."


def check_real_floating(name: str, x: Any, remedy: str | None = None) -> None:
    """Raises a ValueError unless ``x`` has a real floating-point dtype.

    Only the dtype is read (never the values), so arrays, tracers and
    ``jax.ShapeDtypeStruct`` leaves all work, and nothing is computed.

    Args:
      name: how the message names the argument, e.g. ``"precondition_matrix: W"`` or
        ``"Parameter ['dense']['kernel']"``.
      x: an array, anything with a ``dtype``, or a dtype.
      remedy: the sentence that ends the message, what the caller can do instead; by
        default one suited to the dtype found (split a complex array, cast an integer one).

    Raises:
      ValueError: for complex, integer and bool dtypes (and any other non-floating one).
    """
    is_dtype = isinstance(x, (type, np.dtype, str))  # jnp.int32, np.dtype("int32"), "int32"
    dtype = jnp.dtype(x if is_dtype else x.dtype)
    found = f"{name} is {dtype}" if is_dtype else f"{name} has dtype {dtype}"
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(
            f"{found}, complex; expected a real floating-point dtype (the library implements "
            "the rule for real matrices only: the Hermitian one would need W W^H). "
            f"{remedy or _REMEDY_COMPLEX}"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{found}; expected a real floating-point dtype (float16, bfloat16, float32 or "
            f"float64). {remedy or _REMEDY_OTHER}"
        )
