"""The flax models shared by the examples and the benchmarks, each defined once.

* :class:`TutorialCNN` — the tensorflow/models MNIST tutorial CNN of the paper's
  non-linear experiment (``examples/mnist_cnn.py``, ``benchmarks/step_time.py``,
  ``benchmarks/reproduce_paper.py`` through the example).
* :class:`MLP` — a ReLU multi-layer perceptron over flattened inputs
  (``benchmarks/step_time.py``, ``benchmarks/fidelity.py``).
* :class:`TransformerLM` — a small decoder-only byte-level transformer with
  (d_model, heads, head_dim) attention kernels and ``nn.scan``-stacked blocks
  (``examples/transformer_lm.py``), with :func:`transformer_dimension_numbers`, the
  recipe for its ``dimension_numbers``, and :func:`factorize_params` for its explicit
  factorized variant.

All take ``(inputs, train)`` and accept a ``dropout`` PRNG stream, so
:func:`logits_fn_for` adapts each to the ``logits_fn(params, images, train, rng)`` of
:func:`overparam_experiments.training.run_minibatch`. With a depth above 1 their
layers become the explicit factorized layers of :mod:`overparam_optax.factorized`.

Why flax linen: the explicit over-parameterized baselines (``FactorizedDense``,
``FactorizedConv``, :func:`overparam_optax.factorized.factorize`) are linen modules working
on plain parameter dicts, and ``nn.scan`` gives the stacked layer axis. The optax transform
sees only a pytree, so an nnx model (``nnx.state(model, nnx.Param)``) takes the same
dimension numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from overparam_optax import factorized
from overparam_optax.views import MatrixDimensionNumbers

__all__ = [
    "ATTENTION_IN",
    "ATTENTION_OUT",
    "DENSE",
    "MLP",
    "Block",
    "CausalSelfAttention",
    "TransformerLM",
    "TutorialCNN",
    "factorize_params",
    "factorize_tutorial_cnn",
    "is_tutorial_layer_selected",
    "kernel_mask",
    "logits_fn_for",
    "transformer_decay_mask",
    "transformer_dimension_numbers",
]


class TutorialCNN(nn.Module):
    """The CNN of tensorflow/models ``tutorials/image/mnist/convolutional.py``, in flax linen.

    The network the paper over-parameterized (examples/mnist_cnn.py says why and where from):
    conv 5x5x32 + ReLU + 2x2 max-pool, conv 5x5x64 + ReLU + 2x2 max-pool, dense 3136 -> 512 +
    ReLU + dropout 0.5, dense 512 -> 10, on (batch, 28, 28, 1) images; 1,663,370 parameters
    with ``dense_width=512``. The layers are named ``conv1``, ``conv2``, ``fc1``, ``fc2``.

    Attributes:
      dense_depth: 1 for ordinary ``nn.Dense`` layers; N >= 2 replaces both dense layers by
        depth-N :class:`~overparam_optax.factorized.FactorizedDense` layers.
      conv_depth: the same for the two convolutions (``FactorizedConv``).
      dense_width: the hidden dense layer's width (512 in the tutorial; smaller for tests).
    """

    dense_depth: int = 1
    conv_depth: int = 1
    dense_width: int = 512

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        if self.conv_depth == 1:
            conv = nn.Conv
        else:
            conv = functools.partial(factorized.FactorizedConv, depth=self.conv_depth)
        if self.dense_depth == 1:
            dense = nn.Dense
        else:
            dense = functools.partial(factorized.FactorizedDense, depth=self.dense_depth)
        x = conv(32, (5, 5), padding="SAME", name="conv1")(images)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = conv(64, (5, 5), padding="SAME", name="conv2")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # 7 * 7 * 64 = 3136
        x = nn.relu(dense(self.dense_width, name="fc1")(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return dense(10, name="fc2")(x)


class MLP(nn.Module):
    """A ReLU MLP classifier: flatten, ``len(hidden)`` Dense + ReLU layers, a Dense output.

    The layers keep flax's automatic names (``Dense_0``, ``Dense_1``, ...; with
    ``dense_depth >= 2``, ``FactorizedDense_0``, ...).

    Attributes:
      hidden: the hidden widths, e.g. ``(512, 512)`` for 784-512-512-10.
      num_classes: the output width.
      dense_depth: 1 for ``nn.Dense``; N >= 2 for depth-N ``FactorizedDense`` layers
        (balanced init, hidden width ``min(in, out)``).
    """

    hidden: Sequence[int] = (512, 512)
    num_classes: int = 10
    dense_depth: int = 1

    @nn.compact
    def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout; the argument keeps the signature of TutorialCNN
        if self.dense_depth == 1:
            dense = nn.Dense
        else:
            dense = functools.partial(factorized.FactorizedDense, depth=self.dense_depth)
        x = inputs.reshape((inputs.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(dense(width)(x))
        return dense(self.num_classes)(x)


def logits_fn_for(model: nn.Module):
    """Adapts a model to ``logits_fn(params, images, train, rng)`` of ``run_minibatch``.

    ``rng`` becomes the model's ``dropout`` stream.
    """

    def logits_fn(params, images, train, rng):
        return model.apply({"params": params}, images, train, rngs={"dropout": rng})

    return logits_fn


def is_tutorial_layer_selected(layer_name: str, precondition_conv: bool) -> bool:
    """Whether a :class:`TutorialCNN` layer is over-parameterized: the dense layers, and the
    convolutions too when ``precondition_conv``."""
    return layer_name.startswith("fc") or (precondition_conv and layer_name.startswith("conv"))


def kernel_mask(params, precondition_conv: bool):
    """A bool tree like a :class:`TutorialCNN`'s params: True on the kernels to precondition.

    Those are the dense kernels, and the conv kernels too with ``precondition_conv``
    (:func:`is_tutorial_layer_selected`); biases are always False.
    """

    def is_selected(path, leaf):
        layer, name = path[0].key, path[-1].key
        return (
            name == "kernel"
            and leaf.ndim >= 2
            and is_tutorial_layer_selected(layer, precondition_conv)
        )

    return jax.tree_util.tree_map_with_path(is_selected, params)


def factorize_tutorial_cnn(plain_params, depth: int, *, precondition_conv: bool, key):
    """The params of ``TutorialCNN(dense_depth=depth, ...)`` with the same end-to-end kernels.

    Each selected kernel of a plain :class:`TutorialCNN` (:func:`is_tutorial_layer_selected`)
    is split into ``depth`` balanced factors (:func:`overparam_optax.factorized.factorize`),
    so the explicit network starts where the plain and implicit runs start.
    """
    return factorized.factorize(
        plain_params,
        depth,
        key=key,
        where=lambda path, kernel: is_tutorial_layer_selected(path[0], precondition_conv),
    )


# --------------------------------------------------------------------------------------
# A small transformer language model.
# --------------------------------------------------------------------------------------

#: A (..., d_model, heads, head_dim) query/key/value kernel, one matrix per projection.
ATTENTION_IN = MatrixDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1))
#: A (..., heads, head_dim, d_model) output-projection kernel, one matrix per projection.
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
            y = factorized.FactorizedDense(
                heads * head_dim, depth=self.depth, use_bias=False, name=name
            )(x)
            return y.reshape(x.shape[:-1] + (heads, head_dim))

        q, k, v = project_in("query"), project_in("key"), project_in("value")
        mask = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
        o = nn.dot_product_attention(q, k, v, mask=mask, deterministic=True)
        if self.depth == 1:
            return nn.DenseGeneral(d_model, axis=(-2, -1), use_bias=False, name="out")(o)
        o = o.reshape(o.shape[:-2] + (heads * head_dim,))
        return factorized.FactorizedDense(d_model, depth=self.depth, use_bias=False, name="out")(o)


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
            dense_in = factorized.FactorizedDense(self.mlp_hidden, depth=self.depth, name="mlp_in")
            dense_out = factorized.FactorizedDense(d_model, depth=self.depth, name="mlp_out")
        return x + dense_out(nn.gelu(dense_in(h))), None


class TransformerLM(nn.Module):
    """A decoder-only byte-level transformer: ``tokens (B, T) -> logits (B, T, vocab)``.

    Byte embeddings plus learned position embeddings, ``num_layers`` pre-LayerNorm blocks
    (:class:`Block`: causal multi-head self-attention, then a GELU MLP) stacked with
    ``nn.scan``, a final LayerNorm and a dense head. Parameters, with the scan's layer axis
    L first: ``blocks/attn/{query,key,value}/kernel`` (L, d_model, heads, head_dim),
    ``blocks/attn/out/kernel`` (L, heads, head_dim, d_model), ``blocks/mlp_in`` and
    ``blocks/mlp_out`` kernels (L, in, out) and biases (L, out), LayerNorm scales and biases
    (L, d_model), ``embed/embedding`` (vocab, d_model), ``pos_embed`` (context, d_model),
    ``head`` kernel (d_model, vocab) and bias.

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
    def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout; the argument keeps the signature of TutorialCNN
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

    **One preconditioner per projection, not per head.** The query projection computes
    q = x W_q with W_q the whole (d_model, heads*head_dim) matrix; the heads are a reshape
    of its output. Over-parameterizing the layer replaces *that* matrix by a product
    W_q = W_2 W_1, whose end-to-end dynamics are P_{W_q}(G) for the whole matrix (Theorem 1
    of Arora et al., 2018). P does not split over heads: W W^T = sum_h W_h W_h^T couples
    them, so a per-head preconditioner (head as a batch axis) is the dynamics of another
    model, a separate product W_h = A_h B_h for every head. The output projection likewise
    multiplies the concatenated heads by one (heads*head_dim, d_model) matrix. The scan's
    layer axis is a batch axis: every layer has its own matrices.

    **Embeddings and head: not preconditioned by default.** The embedding table multiplies
    a one-hot vector, so its gradient lives on the rows of the bytes in the batch; P_W's
    left factor (W W^T)^{(j-1)/N} (vocab x vocab) spreads each step over all rows, moving
    the embeddings of bytes that were not seen, and with a realistic vocabulary it is the
    largest SVD of the model. The head is a real dense layer, but as large, and it feeds
    the softmax directly. Matrix optimizers (Muon, Shampoo recipes) leave both to the base
    optimizer; so does this default, keeping the preconditioner on the blocks, the hidden
    linear maps between dense features that the paper's argument is about.

    Args:
      params: the model's parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      embeddings: also precondition the token table ``embedding`` (vocab, d_model) and the
        position table ``pos_embed`` (context, d_model) as (one-hot input, output) matrices.
        Default False (see above).
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


def transformer_decay_mask(params):
    """True on a :class:`TransformerLM`'s weight matrices and embedding tables (factors
    included): where AdamW's weight decay applies."""

    def is_matrix(path, leaf):
        name = _key_name(path[-1])
        return name.startswith("kernel") or name in ("embedding", "pos_embed")

    return jax.tree_util.tree_map_with_path(is_matrix, params)


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
            pieces.append(factorized.balanced_factors(jnp.asarray(matrix), depth, key=sub))
        return {
            f"kernel_{i}": jnp.stack([p[i] for p in pieces]).reshape(
                batch_shape + pieces[0][i].shape
            )
            for i in range(depth)
        }

    return visit(params, dimension_numbers)
