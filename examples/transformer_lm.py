r"""A byte-level transformer language model trained with and without implicit depth.

A small decoder-only transformer (flax linen; ``TransformerLM`` of
:mod:`overparam_experiments.models`: attention kernels of shape (d_model, heads,
head_dim) and (heads, head_dim, d_model), blocks stacked along a layer axis by ``nn.scan``)
learns next-byte prediction on text that every Python installation has: the source of the
running interpreter's standard library (the ``*.py`` files directly in
``sysconfig.get_path("stdlib")``, sorted by name, concatenated; the first 90% of the bytes
train, the last 10% validate; :mod:`overparam_experiments.text`). Give
``--text-file PATH`` to use any file instead (same 90/10 byte split).

Modes (comma list ``--modes``), all from the same initial weights, on the same minibatches:

* ``adamw`` / ``momentum``: AdamW or SGD with momentum 0.9, the plain baselines;
* ``adamw+overparam`` / ``momentum+overparam``: ``optax.chain(overparam_precondition(N,
  method=--method, dimension_numbers=transformer_dimension_numbers(params)), base)``
  (``--method svd`` by default: the exact rule every step): every block matrix (the
  four attention projections, one preconditioner per projection and layer, and the two MLP
  kernels) moves along the end-to-end dynamics of a depth-N product; embeddings, head,
  LayerNorms and biases are left to the base optimizer;
* ``momentum-explicit``: the same network with every block matrix replaced by an explicit
  depth-N balanced product (``TransformerLM(depth=N)``, same end-to-end weights), trained
  by momentum SGD at the learning rate of ``momentum+overparam``: the model that the
  implicit mode emulates.

Every mode warms its learning rate up linearly over the first ``--warmup`` steps, then
keeps it constant. The validation loss (mean cross-entropy in nats per byte on
``--eval-windows`` fixed windows spread over the validation text) is measured every
``--eval-every`` steps; the summary gives, per mode, the steps and the training seconds
(compilation and evaluation excluded) to reach ``--target-loss`` (default: the highest
final validation loss among the runs, which all of them reach).

Examples::

  python examples/transformer_lm.py                 # default: 5 modes x 300 steps, < 3 min
  python examples/transformer_lm.py --long          # 2,000 steps, d_model 128, 4 layers
  python examples/transformer_lm.py --text-file README.md --modes adamw,adamw+overparam

Writes ``<output-dir>/transformer_lm.json`` (configuration, corpus description, per-step
training losses, validation curves, timings, steps/time to the target, and with
``--method tracked`` how many matrix updates decomposed W afresh) and
``<output-dir>/transformer_lm_loss.png``.
"""


from __future__ import annotations

import sys

from overparam_experiments import flags as xflags
from overparam_experiments import lm_example


def main(args) -> None:
    """Trains every mode of the parsed flags and writes the log and the plot."""
    lm_example.train(args, " ".join(["python examples/transformer_lm.py", *sys.argv[1:]]))


if __name__ == "__main__":
    xflags.run(lm_example.define_flags, main)
