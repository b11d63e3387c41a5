"""The flax models shared by the examples and the benchmarks, each defined once.

* :class:`TutorialCNN` — the tensorflow/models MNIST tutorial CNN of the paper's
  non-linear experiment (``examples/mnist_cnn.py``, ``benchmarks/step_time.py``,
  ``benchmarks/reproduce_paper.py`` through the example).
* :class:`MLP` — a ReLU multi-layer perceptron over flattened inputs
  (``benchmarks/step_time.py``, ``benchmarks/quality.py``).

Both take ``(inputs, train)`` and accept a ``dropout`` PRNG stream, so
:func:`logits_fn_for` adapts either to the ``logits_fn(params, images, train, rng)`` of
:func:`overparam_optax.experiments.training.run_minibatch`. With a depth above 1 their
layers become the explicit factorized layers of :mod:`overparam_optax.factorized`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from overparam_optax import factorized

__all__ = ["MLP", "TutorialCNN", "is_tutorial_layer_selected", "kernel_mask", "logits_fn_for"]


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
