r"""A small decoder-only transformer (flax linen) and the dimension numbers its weights need.

Why linen: the explicit over-parameterized baselines of this project
(:class:`~overparam_optax.factorized.FactorizedDense`, ``FactorizedConv``, :func:`factorize`)
are linen modules working on plain parameter dicts, and ``nn.scan`` gives the stacked layer
axis that this example is about. The optax transform sees only a pytree, so an nnx model
(``nnx.state(model, nnx.Param)``) works the same way with the same dimension numbers.

The model (:class:`TransformerLM`): byte embeddings plus learned position embeddings,
``num_layers`` pre-LayerNorm blocks (causal multi-head self-attention, then a GELU MLP of
width ``mlp_ratio * d_model``) stacked with ``nn.scan``, a final LayerNorm and a dense
output head over the 256 byte values. Its weights, with the scan's layer axis L first:

=====================  ===========================  ==========================================
leaf                   shape                        matrix (rows = input, columns = output)
=====================  ===========================  ==========================================
``query/key/value``    (L, d_model, heads, head_dim)  one (d_model, heads*head_dim) per layer
``out``                (L, heads, head_dim, d_model)  one (heads*head_dim, d_model) per layer
``mlp_in``/``mlp_out`` (L, in, out)                 one (in, out) per layer
``embed``, ``head``    (256, d_model), (d_model, 256)  not preconditioned by default
LayerNorm, biases      (L, d) / (L, out) / (d,)     never (not matrices, even when 2-D)
=====================  ===========================  ==========================================

**One preconditioner per projection, not per head.** The query projection computes
q = x W_q with W_q the whole (d_model, heads*head_dim) matrix; the heads are a reshape of
its output. Over-parameterizing the layer replaces *that* matrix by a product
W_q = W_2 W_1 (hidden width min(d_model, heads*head_dim)), and the end-to-end dynamics of
the product are P_{W_q}(G) for the whole matrix (Theorem 1 of Arora et al., 2018). P does
not split over heads: W W^T = sum_h W_h W_h^T couples them, so a per-head preconditioner
(head as a batch axis) is the dynamics of a different model, a separate product
W_h = A_h B_h for every head. The same holds for the output projection, which multiplies
the concatenated heads by one (heads*head_dim, d_model) matrix. The scan's layer axis is a
batch axis: every layer has its own matrices. ``tests/test_transformer.py`` checks both
statements against the float64 reference and against the first-order velocity of the
explicit product.

**Embeddings and output head: not preconditioned by default.** The embedding table
multiplies a one-hot vector, so its gradient lives on the rows of the bytes in the batch;
P_W's left factor (W W^T)^{(j-1)/N} (vocab x vocab) spreads every step over all rows,
moving the embeddings of bytes that were not seen, and with a realistic vocabulary it is
the largest SVD in the model. The head is a real dense layer, but it is as large and feeds
the softmax directly; matrix optimizers (Muon, Shampoo recipes) leave both to the base
optimizer, and so does this default, which keeps the preconditioner on the blocks, where
the paper's argument (a hidden linear map between dense features) applies. Both can be
switched on: :func:`transformer_dimension_numbers` ``(embeddings=True, head=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from overparam_optax.factorized import FactorizedDense, balanced_factors
from overparam_optax.views import MatrixDimensionNumbers

__all__ = [
    "ATTENTION_IN",
    "ATTENTION_OUT",
    "Block",
    "CausalSelfAttention",
    "DENSE",
    "TransformerLM",
    "factorize_params",
    "logits_fn_for",
    "transformer_dimension_numbers",
]

#: A (..., d_model, heads, head_dim) query/key/value kernel: one matrix per projection.
ATTENTION_IN = MatrixDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1))
#: A (..., heads, head_dim, d_model) output-projection kernel: one matrix per projection.
ATTENTION_OUT = MatrixDimensionNumbers(reduction_axis=(-3, -2), output_axis=-1)
#: A (..., in, out) dense kernel (or (..., vocab, d_model) embedding table).
DENSE = MatrixDimensionNumbers(reduction_axis=-2, output_axis=-1)


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with (d_model, heads, head_dim) projection kernels.

    Attributes:
      num_heads: the number of heads.
      head_dim: the width of each head.
      depth: 1 for ordinary kernels (``nn.DenseGeneral``: query/key/value kernels of shape
        (d_model, heads, head_dim), output kernel (heads, head_dim, d_model)); N >= 2
        replaces each projection matrix by an explicit depth-N product
        (:class:`~overparam_optax.factorized.FactorizedDense` on the flattened
        heads*head_dim side). No biases.
    """

    num_heads: int
    head_dim: int
    depth: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        heads, head_dim, d_model = self.num_heads, self.head_dim, x.shape[-1]

        def project_in(name: str) -> jax.Array:
            if self.depth == 1:
                return nn.DenseGeneral((heads, head_dim), use_bias=False, name=name)(x)
            y = FactorizedDense(heads * head_dim, depth=self.depth, use_bias=False, name=name)(x)
            return y.reshape(x.shape[:-1] + (heads, head_dim))

        q, k, v = project_in("query"), project_in("key"), project_in("value")
        mask = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
        o = nn.dot_product_attention(q, k, v, mask=mask, deterministic=True)
        if self.depth == 1:
            return nn.DenseGeneral(d_model, axis=(-2, -1), use_bias=False, name="out")(o)
        o = o.reshape(o.shape[:-2] + (heads * head_dim,))
        return FactorizedDense(d_model, depth=self.depth, use_bias=False, name="out")(o)


class Block(nn.Module):
    """One pre-LayerNorm transformer block, written as an ``nn.scan`` body ``(x, _) -> (x, None)``.

    Attributes:
      num_heads, head_dim: of the attention.
      mlp_hidden: the MLP's hidden width.
      depth: explicit factorization depth of every projection and MLP matrix (1: none).
    """

    num_heads: int
    head_dim: int
    mlp_hidden: int
    depth: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        attention = CausalSelfAttention(self.num_heads, self.head_dim, self.depth, name="attn")
        x = x + attention(nn.LayerNorm(name="ln_attn")(x))
        h = nn.LayerNorm(name="ln_mlp")(x)
        d_model = x.shape[-1]
        if self.depth == 1:
            dense_in = nn.Dense(self.mlp_hidden, name="mlp_in")
            dense_out = nn.Dense(d_model, name="mlp_out")
        else:
            dense_in = FactorizedDense(self.mlp_hidden, depth=self.depth, name="mlp_in")
            dense_out = FactorizedDense(d_model, depth=self.depth, name="mlp_out")
        return x + dense_out(nn.gelu(dense_in(h))), None


class TransformerLM(nn.Module):
    """A decoder-only byte-level transformer: ``tokens (B, T) -> logits (B, T, vocab)``.

    Attributes:
      vocab_size: 256 for bytes.
      context: the longest sequence (size of the learned position table).
      d_model: the residual width.
      num_heads: attention heads; ``head_dim = d_model // num_heads``.
      num_layers: blocks, stacked along a leading layer axis of every block parameter
        (``nn.scan``).
      mlp_ratio: the MLP's hidden width is ``mlp_ratio * d_model``.
      depth: 1 for the ordinary model; N >= 2 replaces every block matrix (the four
        attention projections and the two MLP kernels) by an explicit depth-N product, the
        baseline that ``overparam_precondition(N)`` emulates. Embeddings, head, LayerNorms
        and biases are the same in both.
    """

    vocab_size: int = 256
    context: int = 64
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: int = 4
    depth: int = 1

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of {self.num_heads} heads.")
        length = tokens.shape[-1]
        if length > self.context:
            raise ValueError(f"sequence length {length} exceeds the context {self.context}.")
        embed = nn.Embed(
            self.vocab_size,
            self.d_model,
            embedding_init=nn.initializers.normal(0.02),
            name="embed",
        )
        positions = self.param(
            "pos_embed", nn.initializers.normal(0.02), (self.context, self.d_model)
        )
        x = embed(tokens) + positions[:length]
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.num_layers,
        )(
            self.num_heads,
            self.d_model // self.num_heads,
            self.mlp_ratio * self.d_model,
            self.depth,
            name="blocks",
        )
        x, _ = blocks(x, None)
        x = nn.LayerNorm(name="ln_final")(x)
        return nn.Dense(self.vocab_size, name="head")(x)


def _key_name(entry: Any) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def transformer_dimension_numbers(
    params: Any, *, embeddings: bool = False, head: bool = False
) -> Any:
    """The ``dimension_numbers`` tree of :func:`overparam_precondition` for a transformer.

    The recipe, by the leaf's name and its module's name (copy it and rename for your
    model): query/key/value kernels (..., d_model, heads, head_dim) are
    :data:`ATTENTION_IN`, the ``out`` kernel (..., heads, head_dim, d_model) is
    :data:`ATTENTION_OUT`, every other ``kernel`` is :data:`DENSE` (..., in, out). Axes
    count from the end, so any leading axes (the ``nn.scan`` layer axis, an ensemble axis)
    are batch axes with a preconditioner each. Every other leaf gets ``None`` (passed
    through): biases and LayerNorm parameters, which ``nn.scan`` makes 2-D and the default
    dimension numbers would wrongly treat as matrices.

    Args:
      params: the model's parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      embeddings: also precondition the token table ``embedding`` (vocab, d_model) and the
        position table ``pos_embed`` (context, d_model) as (one-hot input, output) matrices.
        Default False (see the module docstring).
      head: also precondition the output head's kernel. Default False.

    Returns:
      A tree like ``params`` with a :class:`MatrixDimensionNumbers` or None per leaf.
    """

    def rule(path, leaf) -> MatrixDimensionNumbers | None:
        names = [_key_name(p) for p in path]
        name, module = names[-1], (names[-2] if len(names) >= 2 else "")
        if name in ("embedding", "pos_embed"):
            return DENSE if embeddings else None
        if name != "kernel" or np.ndim(leaf) < 2:
            return None
        if module in ("query", "key", "value"):
            return ATTENTION_IN
        if module == "out":
            return ATTENTION_OUT
        if module == "head":
            return DENSE if head else None
        return DENSE

    return jax.tree_util.tree_map_with_path(rule, params)


def _matrix_shape(shape: tuple[int, ...], spec: MatrixDimensionNumbers):
    """(batch shape, rows, cols) of a leaf whose reduction/output axes are its trailing ones."""
    ndim = len(shape)
    reduction = [a % ndim for a in np.atleast_1d(spec.reduction_axis).tolist()]
    output = [a % ndim for a in np.atleast_1d(spec.output_axis).tolist()]
    trailing = sorted(reduction + output)
    if trailing != list(range(ndim - len(trailing), ndim)) or max(reduction) > min(output):
        raise ValueError(f"factorize_params needs trailing (in..., out...) axes, got {spec}.")
    batch_shape = shape[: ndim - len(trailing)]
    rows = int(np.prod([shape[a] for a in reduction]))
    cols = int(np.prod([shape[a] for a in output]))
    return batch_shape, rows, cols


def factorize_params(
    params: Mapping,
    depth: int,
    dimension_numbers: Any,
    *,
    key: jax.Array | None = None,
) -> dict:
    """Parameters of ``TransformerLM(depth=depth)`` with the end-to-end weights of ``params``.

    Every ``kernel`` that has dimension numbers is viewed as a batch of (rows, cols)
    matrices (the scan's layer axis is the batch) and each matrix is split into depth-N
    balanced factors (:func:`overparam_optax.factorized.balanced_factors`, hidden width
    ``min(rows, cols)``), stored as ``kernel_0`` (batch..., rows, h), ...,
    ``kernel_{N-1}`` (batch..., h, cols): the layout of ``FactorizedDense`` under
    ``nn.scan``. So the explicit model computes the same function at initialization as
    the ordinary one, and the explicit and implicit runs start from the same point.

    Args:
      params: the ordinary model's parameters.
      depth: N >= 2.
      dimension_numbers: which kernels to factorize and how they are matrices, e.g.
        :func:`transformer_dimension_numbers` of ``params``; leaves with None are copied.
      key: PRNG key for the random orthonormal frames of the hidden layers (None: identity).

    Returns:
      The explicit model's parameter dict.
    """
    counter = [0]

    def visit(node, specs):
        if not isinstance(node, Mapping):
            return node
        out = {}
        for name, sub in node.items():
            spec = specs[name]
            if name == "kernel" and isinstance(spec, MatrixDimensionNumbers):
                out.update(_factorize_kernel(sub, spec))
            else:
                out[name] = visit(sub, spec)
        return out

    def _factorize_kernel(kernel, spec):
        batch_shape, rows, cols = _matrix_shape(tuple(kernel.shape), spec)
        matrices = np.asarray(kernel).reshape((-1, rows, cols))
        pieces = []
        for matrix in matrices:
            sub = None if key is None else jax.random.fold_in(key, counter[0])
            counter[0] += 1
            pieces.append(balanced_factors(jnp.asarray(matrix), depth, key=sub))
        return {
            f"kernel_{i}": jnp.stack([p[i] for p in pieces]).reshape(
                batch_shape + pieces[0][i].shape
            )
            for i in range(depth)
        }

    return visit(params, dimension_numbers)


def logits_fn_for(model: nn.Module) -> Callable:
    """Adapts a model to ``logits_fn(params, tokens, train, rng)`` of the training helpers."""

    def logits_fn(params, tokens, train, rng):
        del train, rng  # no dropout
        return model.apply({"params": params}, tokens)

    return logits_fn
