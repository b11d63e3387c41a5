"""Explicit depth-N factorized layers: the baseline that `overparam_precondition` emulates.

A :class:`FactorizedDense` layer holds N matrices and computes ``x @ K_0 @ K_1 @ ... @ K_{N-1}``
(plus one bias); :class:`FactorizedConv` is a k x k convolution followed by N - 1 1x1
convolutions. Training these with plain gradient descent from a *balanced* initialization
moves the end-to-end matrix the way ``overparam_precondition(N)`` moves a single matrix
(Arora, Cohen & Hazan, ICML 2018, Theorem 1), so the pair is the ground truth against which
the transform is checked (``overparam_experiments.trajectories``,
``benchmarks/equivalence.py``, ``docs/equivalence.md``).

Orientation (read this before comparing formulas with the paper)
----------------------------------------------------------------
The paper writes a depth-N linear network as ``x -> W_N ... W_1 x`` with ``W_j`` of shape
``(d_j, d_{j-1})``, end-to-end matrix ``W_e = W_N ... W_1``, and calls it balanced when

    W_{j+1}^T W_{j+1} = W_j W_j^T,      j = 1 .. N-1.

Flax multiplies from the right, ``x @ kernel`` with ``kernel`` of shape ``(in, out)``. The
factors here are ``K_i = W_{i+1}^T`` (``i = 0 .. N-1``, stored as ``kernel_0 .. kernel_{N-1}``,
``kernel_0`` touching the input), so the collapsed kernel is

    K_e = K_0 K_1 ... K_{N-1} = W_e^T,

and the paper's condition, transposed into this orientation, reads

    K_i^T K_i = K_{i+1} K_{i+1}^T,      i = 0 .. N-2,

both sides being (h_i x h_i) Gram matrices over the i-th hidden width. The preconditioner
is transpose-invariant, ``P_{W^T}(G^T) = P_W(G)^T``, so applying it to the flax kernel
``K_e`` is the same as applying it to the paper's ``W_e``. For a convolution, ``kernel_0`` has
the shape ``(*kernel_size, in, h)`` and enters every formula flattened to ``(prod(kernel_size)
* in, h)``, the same (H*W*I, O) matrix view the transform uses for a Conv kernel.

Hidden width
------------
Theorem 1 of the paper assumes every hidden width is at least ``min(in, out)``; beyond that,
the end-to-end dynamics from a balanced start do not depend on the widths. The default
``hidden=None`` therefore picks ``min(in, out)`` (``min(prod(kernel_size) * in, out)`` for a
convolution): the smallest width at which every end-to-end matrix is representable and the
theorem applies. Wider layers cost more and (in exact arithmetic) change nothing.

Only the last factor has a bias, so that :func:`collapse` maps the parameters of a factorized
layer exactly onto those of ``nn.Dense`` / ``nn.Conv``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from overparam_optax.checks import check_real_floating
from overparam_optax.numerics import check_depth, compute_dtype

__all__ = [
    "FactorizedConv",
    "FactorizedDense",
    "balanced_factors",
    "balancedness",
    "collapse",
    "end_to_end",
    "factorize",
    "factor_kernels",
    "hidden_widths",
    "is_factorized",
    "near_identity",
    "near_zero",
    "pair_balancedness",
]

Initializer = Callable[..., jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------
# Widths and the end-to-end product.
# --------------------------------------------------------------------------------------


def hidden_widths(hidden: int | Sequence[int] | None, depth: int, fan_in: int, fan_out: int):
    """The N - 1 hidden widths of a depth-N factorization of a (fan_in, fan_out) matrix.

    Args:
      hidden: one width for every hidden layer, a sequence of N - 1 widths, or None for
        ``min(fan_in, fan_out)`` (the paper's assumption; see the module docstring).
      depth: N, a positive int.
      fan_in: rows of the end-to-end matrix (``prod(kernel_size) * in`` for a conv).
      fan_out: its columns.

    Returns:
      A tuple of N - 1 positive ints (empty for N = 1).
    """
    depth = check_depth(depth, "depth")
    if hidden is None:
        widths = (min(fan_in, fan_out),) * (depth - 1)
    elif isinstance(hidden, (int, np.integer)):
        widths = (int(hidden),) * (depth - 1)
    else:
        widths = tuple(int(h) for h in hidden)
        if len(widths) != depth - 1:
            raise ValueError(f"depth {depth} needs {depth - 1} hidden widths, got {widths}.")
    if any(h < 1 for h in widths):
        raise ValueError(f"hidden widths must be positive, got {widths}.")
    return widths


def _check_kernels(function: str, kernels: Sequence[Any], names: Sequence[str]) -> None:
    """Refuses complex, integer and bool kernels before any work, naming each one."""
    for name, kernel in zip(names, kernels, strict=True):
        dtyped = kernel if hasattr(kernel, "dtype") else jnp.asarray(kernel)
        check_real_floating(f"{function}: {name}", dtyped)


def _indexed(name: str, count: int) -> list[str]:
    return [f"{name}[{i}]" for i in range(count)]


def _key_path(path: tuple) -> str:
    return "".join(f"[{key!r}]" for key in path)


def _upcast(x: jax.Array) -> jax.Array:
    """x in float32, or wider if it is wider: the SVDs and Gram matrices of a bfloat16 or
    float16 layer are computed at float32 accuracy (XLA has no low-precision SVD)."""
    return x.astype(compute_dtype(x.dtype))


def _as_matrix(kernel: jax.Array) -> jax.Array:
    """Flattens all axes but the last into the input side: (..., out) -> (prod(...), out)."""
    return jnp.reshape(kernel, (-1, kernel.shape[-1]))


def end_to_end(kernels: Sequence[jax.Array], *, precision=_HIGHEST) -> jax.Array:
    """The product of the factors K_0, ..., K_{N-1}, in the shape of a Dense/Conv kernel.

    ``kernels[0]`` may have leading (spatial) axes, as a conv kernel; the others are matrices
    (a trailing axis layout ``(..., h_i, h_{i+1})`` with size-1 leading axes is accepted too).
    The result has the shape ``kernels[0].shape[:-1] + (kernels[-1].shape[-1],)`` and the
    kernels' dtype; the products are computed in float32 (or wider), so a bfloat16 or
    float16 layer is rounded once, at the end.
    """
    if not kernels:
        raise ValueError("end_to_end needs at least one kernel.")
    _check_kernels("end_to_end", kernels, _indexed("kernels", len(kernels)))
    first = jnp.asarray(kernels[0])
    product = _upcast(_as_matrix(first))
    for k in kernels[1:]:
        product = jnp.matmul(product, _upcast(_as_matrix(jnp.asarray(k))), precision=precision)
    product = product.astype(jnp.result_type(*kernels))
    return jnp.reshape(product, first.shape[:-1] + (product.shape[-1],))


# --------------------------------------------------------------------------------------
# Initializers.
# --------------------------------------------------------------------------------------


def _orthonormal_frame(key, rows: int, cols: int, dtype) -> jax.Array:
    """A (rows, cols) matrix with orthonormal columns; Haar-random if key is not None."""
    if key is None:
        return jnp.eye(rows, cols, dtype=dtype)
    gaussian = jax.random.normal(key, (rows, cols), dtype=dtype)
    q, r = jnp.linalg.qr(gaussian)
    # Fixing the signs of diag(r) makes the frame Haar-distributed rather than QR-biased.
    signs = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(dtype)
    return q * signs


def balanced_factors(
    matrix: jax.Array,
    depth: int,
    hidden: int | Sequence[int] | None = None,
    *,
    key: jax.Array | None = None,
    rank_rtol: float | None = None,
    truncate: bool = False,
) -> list[jax.Array]:
    """Splits a (in, out) matrix into N balanced factors whose product is the matrix.

    With the thin SVD ``matrix = U diag(s) V^T`` truncated to ``k = min(in, out, h_1, ...,
    h_{N-1})`` components and ``r = s^(1/N)``, the factors are

        K_0 = U diag(r) Q_1^T,  K_i = Q_i diag(r) Q_{i+1}^T,  K_{N-1} = Q_{N-1} diag(r) V^T,

    where each ``Q_i`` is an (h_i, k) matrix with orthonormal columns (random if ``key`` is
    given, the leading columns of the identity otherwise). Then ``K_0 ... K_{N-1} = matrix``
    and ``K_i^T K_i = Q_{i+1} diag(r^2) Q_{i+1}^T = K_{i+1} K_{i+1}^T`` exactly (up to
    rounding): the flax-orientation balancedness of the module docstring.

    Args:
      matrix: the end-to-end kernel, shape (in, out), in flax orientation (``x @ matrix``).
      depth: N >= 1. N = 1 returns ``[matrix]``.
      hidden: the hidden widths (see :func:`hidden_widths`); default ``min(in, out)``.
      key: PRNG key for the orthonormal frames of the hidden layers, or None.
      rank_rtol: when the narrowest hidden width ``k`` is below ``min(in, out)``, the
        singular values past the k-th must be at most ``rank_rtol * s_max`` (default
        ``100 * eps * max(in, out)``), otherwise the matrix cannot be represented and a
        ValueError is raised. The check runs only on concrete (non-traced) input.
      truncate: skip that check and factor the best rank-k approximation instead (what
        the modules do when ``hidden`` is narrower than ``min(in, out)``).

    Returns:
      The list ``[K_0, ..., K_{N-1}]`` with shapes (in, h_1), (h_1, h_2), ..., (h_{N-1}, out),
      in the matrix's dtype. The SVD and the products are computed in float32 (or wider):
      a bfloat16 or float16 matrix gets the float32 factors of its values, rounded once.
    """
    depth = check_depth(depth, "depth")
    matrix = jnp.asarray(matrix)
    _check_kernels("balanced_factors", [matrix], ["matrix"])
    if matrix.ndim != 2:
        raise ValueError(f"balanced_factors expects a 2-D matrix, got shape {matrix.shape}.")
    if depth == 1:
        return [matrix]
    fan_in, fan_out = matrix.shape
    widths = hidden_widths(hidden, depth, fan_in, fan_out)
    work = _upcast(matrix)
    u, s, vt = jnp.linalg.svd(work, full_matrices=False)
    k = min(fan_in, fan_out, *widths)
    if k < s.shape[0] and not truncate and not isinstance(s, jax.core.Tracer):
        tol = rank_rtol
        if tol is None:
            tol = 100 * float(jnp.finfo(matrix.dtype).eps) * max(fan_in, fan_out)
        s_host = np.asarray(s)
        if s_host[k] > tol * max(float(s_host[0]), np.finfo(np.float64).tiny):
            raise ValueError(
                f"A hidden width of {k} cannot hold this {fan_in}x{fan_out} matrix: its "
                f"singular value #{k + 1} is {s_host[k]:.3g} (largest {s_host[0]:.3g}). Use "
                f"hidden >= rank = {int(np.sum(s_host > tol * s_host[0]))}."
            )
    root = s[:k] ** (1.0 / depth)
    keys = [None] * (depth - 1) if key is None else list(jax.random.split(key, depth - 1))
    frames = [_orthonormal_frame(keys[i], widths[i], k, work.dtype) for i in range(depth - 1)]
    factors = [(u[:, :k] * root) @ frames[0].T]
    for i in range(depth - 2):
        factors.append((frames[i] * root) @ frames[i + 1].T)
    factors.append((frames[-1] * root) @ vt[:k])
    return [f.astype(matrix.dtype) for f in factors]


def near_zero(stddev: float = 1e-3) -> Initializer:
    """Layer-wise near-zero Gaussian init for one factor: ``stddev * N(0, 1)`` entries.

    Such factors are not balanced in the relative sense, but their imbalance is O(stddev^2)
    in absolute terms, which is the paper's delta-balancedness near the origin.
    """

    def init(key, shape, dtype=jnp.float32):
        return stddev * jax.random.normal(key, shape, dtype)

    return init


def near_identity(stddev: float = 0.0) -> Initializer:
    """Near-identity init for one factor (linear-residual style): ``I + stddev * N(0, 1)``.

    The factor is viewed as a (prod(shape[:-1]), shape[-1]) matrix; a rectangular factor
    gets the rectangular identity (ones on the main diagonal). Exactly balanced for
    ``stddev = 0`` when all factors are square.
    """

    def init(key, shape, dtype=jnp.float32):
        rows = math.prod(shape[:-1])
        eye = jnp.eye(rows, shape[-1], dtype=dtype).reshape(shape)
        if stddev == 0.0:
            return eye
        return eye + stddev * jax.random.normal(key, shape, dtype)

    return init


def factor_kernels(
    kernel: jax.Array,
    depth: int,
    hidden: int | Sequence[int] | None = None,
    *,
    key: jax.Array | None = None,
    truncate: bool = False,
) -> list[jax.Array]:
    """Balanced factors of a Dense kernel (in, out) or Conv kernel ``(*kernel_size, in, out)``.

    The kernel is flattened to (prod(leading axes), out), split by :func:`balanced_factors`,
    and ``K_0`` is reshaped back to ``kernel.shape[:-1] + (h_1,)``; so
    ``end_to_end(factor_kernels(kernel, N)) == kernel``.
    """
    kernel = jnp.asarray(kernel)
    _check_kernels("factor_kernels", [kernel], ["kernel"])
    factors = balanced_factors(_as_matrix(kernel), depth, hidden, key=key, truncate=truncate)
    factors[0] = jnp.reshape(factors[0], kernel.shape[:-1] + (factors[0].shape[-1],))
    return factors


# --------------------------------------------------------------------------------------
# Parameter-tree utilities: factorize, collapse, balancedness.
# --------------------------------------------------------------------------------------


def _kernel_names(layer: Mapping, path: tuple = ()) -> list[str]:
    """kernel_0, kernel_1, ... of a layer; a gap in the numbering is a ValueError naming
    the layer's ``path``."""
    names = []
    while f"kernel_{len(names)}" in layer:
        names.append(f"kernel_{len(names)}")
    numbered = [k for k in layer if isinstance(k, str) and re.fullmatch(r"kernel_\d+", k)]
    if len(numbered) != len(names):
        raise ValueError(
            f"the factorized layer at {_key_path(path)}: its kernels must be numbered "
            f"kernel_0 .. kernel_(N-1) without a gap; got {sorted(numbered)} "
            f"(kernel_{len(names)} is missing)."
        )
    return names


def is_factorized(layer: Any) -> bool:
    """True for a mapping holding ``kernel_0`` (a factorized layer's parameters)."""
    return isinstance(layer, Mapping) and "kernel_0" in layer


def _factorized_layers(params, path=()):
    """Yields (path, [K_0, ..., K_{N-1}]) for every factorized layer in a nested mapping."""
    if is_factorized(params):
        yield path, [params[n] for n in _kernel_names(params, path)]
    elif isinstance(params, Mapping):
        for name, sub in params.items():
            yield from _factorized_layers(sub, path + (name,))


def collapse(params: Any, *, precision=_HIGHEST) -> Any:
    """Replaces every factorized layer by the equivalent ordinary Dense/Conv parameters.

    Walks nested mappings (a flax ``variables`` dict, or its ``'params'`` entry, or one
    layer's parameters); each mapping holding ``kernel_0, ..., kernel_{N-1}`` becomes
    ``{'kernel': K_0 @ ... @ K_{N-1}, <other entries, e.g. 'bias'>}`` with the kernel in the
    shape ``nn.Dense`` / ``nn.Conv`` expects. Everything else is returned unchanged, so a
    model whose layers have the same names in a factorized and an ordinary version can be
    applied with ``collapse(explicit_params)`` as the ordinary version's parameters.

    Each product is computed in float32 (or wider) and returned in the factors' dtype.
    A complex, integer or bool factor is a ValueError naming its path.
    """
    return _collapse(params, precision, ())


def _collapse(params: Any, precision, path: tuple) -> Any:
    if is_factorized(params):
        names = _kernel_names(params, path)
        rest = {k: v for k, v in params.items() if k not in names}
        if "kernel" in rest:
            raise ValueError("A factorized layer must not also hold a plain 'kernel'.")
        kernels = [params[n] for n in names]
        _check_kernels("collapse", kernels, [_key_path(path + (n,)) for n in names])
        return {"kernel": end_to_end(kernels, precision=precision), **rest}
    if isinstance(params, Mapping):
        return {name: _collapse(sub, precision, path + (name,)) for name, sub in params.items()}
    return params


def factorize(
    params: Any,
    depth: int,
    hidden: int | Sequence[int] | None = None,
    *,
    key: jax.Array | None = None,
    where: Callable[[tuple, jax.Array], bool] | None = None,
) -> Any:
    """The inverse of :func:`collapse`: balanced factorized parameters with given end-to-end.

    Every mapping holding a ``'kernel'`` with ndim >= 2 (an ``nn.Dense`` / ``nn.Conv`` layer)
    becomes ``{'kernel_0': ..., 'kernel_{N-1}': ..., <other entries>}`` via
    :func:`factor_kernels`, so ``collapse(factorize(p, N)) == p`` up to rounding and the
    explicit and implicit runs start from the same end-to-end matrices. Name the layers
    explicitly (``nn.Dense(..., name='fc1')`` / ``FactorizedDense(..., name='fc1')``) so
    that both models use the same tree.

    Args:
      params: nested mappings of parameters.
      depth: N for every factorized layer.
      hidden: the hidden widths (see :func:`hidden_widths`).
      key: PRNG key for the random orthonormal frames (identity frames if None).
      where: optional ``where(path, kernel) -> bool`` selecting which layers to factorize;
        ``path`` is the tuple of keys leading to the layer. Default: all.
    """
    counter = [0]

    def visit(node, path):
        if isinstance(node, Mapping):
            kernel = node.get("kernel")
            if (
                kernel is not None
                and jnp.ndim(kernel) >= 2
                and (where is None or where(path, kernel))
            ):
                _check_kernels("factorize", [kernel], [_key_path(path + ("kernel",))])
                sub = None if key is None else jax.random.fold_in(key, counter[0])
                counter[0] += 1
                factors = factor_kernels(kernel, depth, hidden, key=sub)
                out = {f"kernel_{i}": f for i, f in enumerate(factors)}
                out.update({k: v for k, v in node.items() if k != "kernel"})
                return out
            return {name: visit(sub, path + (name,)) for name, sub in node.items()}
        return node

    return visit(params, ())


def pair_balancedness(
    kernels: Sequence[jax.Array], *, relative: bool = True, precision=_HIGHEST
) -> jax.Array:
    """The imbalance of each consecutive pair of one layer's factors, shape (N - 1,).

    Entry i is ``||K_i^T K_i - K_{i+1} K_{i+1}^T||_F`` (flax orientation, ``K_0`` flattened
    to a matrix); with ``relative=True`` it is divided by ``max(||K_i^T K_i||_F,
    ||K_{i+1} K_{i+1}^T||_F)``, which makes it invariant to rescaling all factors and puts
    it in [0, 2]: ~1e-16 (float64) / ~1e-7 (float32) for a balanced init, O(1) for unrelated
    factors. ``relative=False`` gives the paper's absolute delta.

    Computed and returned in float32 (or wider) whatever the kernels' dtype: the
    imbalance of bfloat16 factors is measured, not rounded away.
    """
    _check_kernels("pair_balancedness", kernels, _indexed("kernels", len(kernels)))
    mats = [_upcast(_as_matrix(jnp.asarray(k))) for k in kernels]
    out = []
    for a, b in zip(mats[:-1], mats[1:], strict=True):
        gram_a = jnp.matmul(a.T, a, precision=precision)
        gram_b = jnp.matmul(b, b.T, precision=precision)
        diff = jnp.linalg.norm(gram_a - gram_b)
        if relative:
            scale = jnp.maximum(jnp.linalg.norm(gram_a), jnp.linalg.norm(gram_b))
            tiny = jnp.finfo(diff.dtype).tiny
            diff = jnp.where(scale > tiny, diff / jnp.maximum(scale, tiny), 0.0)
        out.append(diff)
    if not out:
        return jnp.zeros((0,), mats[0].dtype)
    return jnp.stack(out)


def balancedness(params: Any, *, relative: bool = True, precision=_HIGHEST) -> jax.Array:
    """The worst imbalance over a tree: the largest :func:`pair_balancedness` of its layers.

    Theory assumes 0 (exact balance at init, which gradient flow then preserves); plain GD
    with step size eta lets it drift by O(eta^2) per step, which is the source of the gap
    between the explicit and the implicit runs. Returns 0 when no layer has depth >= 2;
    raises ValueError when the tree has no factorized layer at all, or (naming its path) a
    factor that is complex, integer or bool. Computed and returned in float32 (or wider),
    whatever the parameters' dtype.
    """
    layers = list(_factorized_layers(params))
    for path, kernels in layers:
        names = [_key_path(path + (f"kernel_{i}",)) for i in range(len(kernels))]
        _check_kernels("balancedness", kernels, names)
    values = [pair_balancedness(ks, relative=relative, precision=precision) for _, ks in layers]
    if not values:
        raise ValueError("balancedness: no factorized layer (no 'kernel_0') in the tree.")
    values = [v for v in values if v.size]
    if not values:
        return jnp.zeros((), jnp.float32)
    return jnp.max(jnp.concatenate(values))


# --------------------------------------------------------------------------------------
# Flax linen modules.
# --------------------------------------------------------------------------------------


def _check_features(module: nn.Module) -> None:
    features = module.features
    if isinstance(features, bool) or not isinstance(features, (int, np.integer)) or features < 1:
        raise ValueError(
            f"{type(module).__name__}: features must be a positive int, got {features!r}."
        )


def _make_factors(module: nn.Module, first_shape: tuple, widths: tuple, features: int):
    """Declares kernel_0 .. kernel_{N-1} on ``module`` (inside its compact __call__)."""
    depth = len(widths) + 1
    shapes = [first_shape + (widths[0] if widths else features,)]
    dims = list(widths) + [features]
    shapes += [(dims[i], dims[i + 1]) for i in range(depth - 1)]
    dtype = module.param_dtype

    if module.factor_init is not None:
        return [
            module.param(f"kernel_{i}", module.factor_init, s, dtype) for i, s in enumerate(shapes)
        ]

    # Balanced init: draw the end-to-end kernel once, split it, hand out the pieces.
    cache: dict[str, list] = {}

    def piece(i):
        def init(key, shape, dtype):
            if "factors" not in cache:
                k_end, k_frames = jax.random.split(key)
                end_shape = first_shape + (features,)
                kernel = module.kernel_init(k_end, end_shape, dtype)
                cache["factors"] = factor_kernels(
                    kernel, depth, widths, key=k_frames, truncate=True
                )
            return cache["factors"][i]

        return init

    return [module.param(f"kernel_{i}", piece(i), s, dtype) for i, s in enumerate(shapes)]


def _apply_factors(y: jax.Array, kernels: Sequence[jax.Array], precision) -> jax.Array:
    """Right-multiplies the last axis of y by each matrix in turn."""
    for k in kernels:
        y = jax.lax.dot_general(y, k, (((y.ndim - 1,), (0,)), ((), ())), precision=precision)
    return y


class FactorizedDense(nn.Module):
    """A drop-in replacement for ``nn.Dense`` holding N factors K_0, ..., K_{N-1} of its kernel.

    Attributes:
      features: output width.
      depth: N, the number of factors (N = 1 is an ``nn.Dense`` with a renamed kernel).
      hidden: hidden width(s), see :func:`hidden_widths`; default ``min(in, features)``.
      use_bias: one bias, added after the last factor.
      dtype: computation dtype (inferred from inputs and params if None).
      param_dtype: parameter dtype; bfloat16 and float16 work (the balanced split is
        computed in float32 and rounded once).
      precision: matmul precision.
      kernel_init: initializer of the *end-to-end* kernel (in, features); it is then split
        into balanced factors (:func:`balanced_factors`, random frames), so at init the layer
        computes the same distribution of functions as ``nn.Dense(kernel_init=...)``. (With
        a hidden width below ``min(in, features)`` the draw is truncated to that rank.)
      factor_init: if given, each factor is instead initialized independently with it, e.g.
        :func:`near_zero` or :func:`near_identity` (not balanced in general).
      bias_init: bias initializer.

    Parameters: ``kernel_0`` (in, h_1), ..., ``kernel_{N-1}`` (h_{N-1}, features), ``bias``.
    """

    features: int
    depth: int = 3
    hidden: int | Sequence[int] | None = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    factor_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        _check_features(self)
        fan_in = jnp.shape(inputs)[-1]
        widths = hidden_widths(self.hidden, self.depth, fan_in, self.features)
        kernels = _make_factors(self, (fan_in,), widths, self.features)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if (self.use_bias)
            else None
        )
        inputs, *kernels = nn.dtypes.promote_dtype(inputs, *kernels, dtype=self.dtype)
        y = _apply_factors(inputs, kernels, self.precision)
        if bias is not None:
            y = y + jnp.asarray(bias, y.dtype)
        return y


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    if isinstance(value, (int, np.integer)):
        return (int(value),) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must have {n} entries, got {value}.")
    return value


def _padding(padding, n: int):
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(f"FactorizedConv does not support padding={padding!r}.")
        return padding.upper()
    if isinstance(padding, (int, np.integer)):
        return [(int(padding), int(padding))] * n
    pads = [(int(p), int(p)) if isinstance(p, (int, np.integer)) else tuple(p) for p in padding]
    if len(pads) != n:
        raise ValueError(f"padding must have {n} entries, got {padding}.")
    return pads


class FactorizedConv(nn.Module):
    """A drop-in replacement for ``nn.Conv``: a k x k conv followed by N - 1 1x1 convs.

    The first factor ``kernel_0`` is an ordinary conv kernel ``(*kernel_size, in, h_1)``; the
    1x1 convolutions are stored as matrices ``kernel_i`` of shape (h_i, h_{i+1}) and applied
    to the channel axis (that is what a stride-1, unpadded 1x1 convolution does). The layer
    is therefore linear in its input with the end-to-end kernel
    ``reshape(flat(kernel_0) @ kernel_1 @ ... @ kernel_{N-1}, (*kernel_size, in, features))``,
    which :func:`collapse` returns, and ``nn.Conv`` with that kernel (and the same
    strides/padding/dilations) computes the same outputs.

    Attributes are those of :class:`FactorizedDense` plus ``kernel_size``, ``strides``,
    ``padding`` ('SAME', 'VALID', an int, or per-dimension ints / (low, high) pairs),
    ``input_dilation`` and ``kernel_dilation`` as in ``nn.Conv``. Grouped and circular
    convolutions are not supported. ``hidden`` defaults to
    ``min(prod(kernel_size) * in, features)``. Inputs are ``(batch..., *spatial, in)`` or
    unbatched ``(*spatial, in)``.
    """

    features: int
    kernel_size: int | Sequence[int]
    depth: int = 3
    hidden: int | Sequence[int] | None = None
    strides: int | Sequence[int] | None = 1
    padding: Any = "SAME"
    input_dilation: int | Sequence[int] | None = 1
    kernel_dilation: int | Sequence[int] | None = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    factor_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        # As in nn.Conv, an int kernel_size means a 1-D convolution.
        if isinstance(self.kernel_size, (int, np.integer)):
            kernel_size = (int(self.kernel_size),)
        else:
            kernel_size = tuple(int(k) for k in self.kernel_size)
        n_spatial = len(kernel_size)
        unbatched = inputs.ndim == n_spatial + 1
        if unbatched:
            inputs = inputs[None]
        batch_shape = inputs.shape[: -(n_spatial + 1)]
        inputs = jnp.reshape(inputs, (-1,) + inputs.shape[-(n_spatial + 1) :])

        _check_features(self)
        fan_in = inputs.shape[-1]
        widths = hidden_widths(
            self.hidden, self.depth, math.prod(kernel_size) * fan_in, self.features
        )
        kernels = _make_factors(self, kernel_size + (fan_in,), widths, self.features)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if (self.use_bias)
            else None
        )
        inputs, *kernels = nn.dtypes.promote_dtype(inputs, *kernels, dtype=self.dtype)

        nd = n_spatial + 2
        spec = (0, nd - 1) + tuple(range(1, nd - 1))
        dimension_numbers = jax.lax.ConvDimensionNumbers(
            lhs_spec=spec, rhs_spec=(nd - 1, nd - 2) + tuple(range(nd - 2)), out_spec=spec
        )
        y = jax.lax.conv_general_dilated(
            inputs,
            kernels[0],
            window_strides=_tuple(self.strides, n_spatial, "strides"),
            padding=_padding(self.padding, n_spatial),
            lhs_dilation=_tuple(self.input_dilation, n_spatial, "input_dilation"),
            rhs_dilation=_tuple(self.kernel_dilation, n_spatial, "kernel_dilation"),
            dimension_numbers=dimension_numbers,
            precision=self.precision,
        )
        y = _apply_factors(y, kernels[1:], self.precision)
        if bias is not None:
            y = y + jnp.asarray(bias, y.dtype)
        y = jnp.reshape(y, batch_shape + y.shape[1:])
        if unbatched:
            y = y[0]
        return y
