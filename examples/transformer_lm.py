r"""A byte-level transformer language model trained with and without implicit depth.

A small decoder-only transformer (flax linen; ``TransformerLM`` of
:mod:`overparam_optax.experiments.models`: attention kernels of shape (d_model, heads,
head_dim) and (heads, head_dim, d_model), blocks stacked along a layer axis by ``nn.scan``)
learns next-byte prediction on text that every Python installation has: the source of the
running interpreter's standard library (the ``*.py`` files directly in
``sysconfig.get_path("stdlib")``, sorted by name, concatenated; the first 90% of the bytes
train, the last 10% validate; :mod:`overparam_optax.experiments.text`). Give
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
training losses, validation curves, timings, steps/time to the target) and
``<output-dir>/transformer_lm_loss.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import overparam_optax as opx
from overparam_optax.experiments import cli, models, text, timing, training

MODES = ("adamw", "adamw+overparam", "momentum", "momentum+overparam", "momentum-explicit")
# Learning rates chosen on the grids of benchmarks/transformer_lm.py (docs/transformer.md).
DEFAULT_LEARNING_RATES = {
    "adamw": 1e-2,
    "adamw+overparam": 3e-3,
    "momentum": 0.1,
    "momentum+overparam": 0.1,
}
LONG_RUN = {"steps": 2000, "d_model": 128, "layers": 4, "eval_every": 100}
# The measured runs (benchmarks/transformer_lm.py, docs/transformer.md) are these with 400 steps.
DEFAULTS = {"steps": 300, "d_model": 64, "layers": 2, "eval_every": 20}


def base_optimizer(mode: str, schedule, weight_decay: float, decay_mask):
    """AdamW (decay on the weight matrices only) or SGD with momentum 0.9."""
    if mode.startswith("adamw"):
        return optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask)
    return optax.sgd(schedule, momentum=0.9)


def decay_mask(params):
    """True on the weight matrices and embedding tables (factors included), for AdamW."""

    def is_matrix(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        return name.startswith("kernel") or name in ("embedding", "pos_embed")

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def learning_rate(mode: str, args) -> float:
    """``--lr MODE=VALUE`` or the default; momentum-explicit uses momentum+overparam's."""
    key = "momentum+overparam" if mode == "momentum-explicit" else mode
    return args.lr[key]


def build_run(mode: str, args, plain_params):
    """(model, initial params, optimizer) of one mode; all start from ``plain_params``."""
    model = make_model(args)
    warmup = min(args.warmup, max(args.steps - 1, 0))
    lr = learning_rate(mode, args)
    schedule = optax.schedules.warmup_constant_schedule(0.0, lr, warmup) if warmup else lr
    dims = models.transformer_dimension_numbers(
        plain_params, embeddings=args.precondition_embeddings, head=args.precondition_head
    )
    if mode == "momentum-explicit":
        params = models.factorize_params(
            plain_params, args.depth, dims, key=jax.random.PRNGKey(args.seed + 1)
        )
        model = make_model(args, depth=args.depth)
        return model, params, base_optimizer(mode, schedule, args.weight_decay, None)
    tx = base_optimizer(mode, schedule, args.weight_decay, decay_mask(plain_params))
    if mode.endswith("+overparam"):
        precondition = opx.overparam_precondition(
            args.depth, method=args.method, dimension_numbers=dims
        )
        tx = optax.chain(precondition, tx)
    return model, plain_params, tx


def make_model(args, depth: int = 1) -> models.TransformerLM:
    """The model of the command line (``depth`` > 1: the explicit factorized variant)."""
    return models.TransformerLM(
        vocab_size=text.VOCAB_SIZE,
        context=args.context,
        d_model=args.d_model,
        num_heads=args.heads,
        num_layers=args.layers,
        mlp_ratio=args.mlp_ratio,
        depth=depth,
    )


def make_evaluator(logits_fn, inputs: np.ndarray, targets: np.ndarray, batch_size: int):
    """``params -> {"val_loss", "val_accuracy"}`` on fixed windows, compiled once."""

    @jax.jit
    def sums(params, x, y):
        logits = logits_fn(params, x, False, jax.random.PRNGKey(0))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return loss.sum(), jnp.sum(jnp.argmax(logits, -1) == y)

    def evaluate(params) -> dict:
        total_loss = total_correct = 0.0
        for start in range(0, len(inputs), batch_size):
            loss, correct = sums(
                params, inputs[start : start + batch_size], targets[start : start + batch_size]
            )
            total_loss += float(loss)
            total_correct += float(correct)
        return {"val_loss": total_loss / targets.size, "val_accuracy": total_correct / targets.size}

    return evaluate


def first_reaching(evaluations: list[dict], target: float) -> dict:
    """The first evaluation at or below ``target``: its step and training seconds (or None)."""
    for record in evaluations:
        if record["val_loss"] <= target:
            return {"steps": record["step"], "seconds": record["train_seconds"]}
    return {"steps": None, "seconds": None}


def plot(runs: dict, path: pathlib.Path, title: str, target: float) -> None:
    """Training loss (smoothed) and validation loss vs step, validation loss vs seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    for index, (name, run) in enumerate(runs.items()):
        color = f"C{index}"
        losses = np.asarray(run["train_loss"])
        window = max(1, len(losses) // 30)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes[0].plot(np.arange(window, len(losses) + 1), smooth, color=color, label=name)
        steps = [e["step"] for e in run["evaluations"]]
        values = [e["val_loss"] for e in run["evaluations"]]
        seconds = [e["train_seconds"] for e in run["evaluations"]]
        axes[1].plot(steps, values, color=color, marker=".", label=name)
        axes[2].plot(seconds, values, color=color, marker=".", label=name)
    for ax, xlabel, ylabel in (
        (axes[0], "step", f"training loss (moving average of {window} steps)"),
        (axes[1], "step", "validation loss (nats/byte)"),
        (axes[2], "training seconds (compilation, evaluation excluded)", "validation loss"),
    ):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1:]:
        ax.axhline(target, color="gray", linestyle=":", linewidth=1)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _learning_rates(text_value: str) -> dict:
    """argparse ``type=`` of ``--lr``: ``MODE=VALUE,...`` with known modes, positive values."""
    out = {}
    for item in cli.comma_list(str)(text_value):
        name, sep, number = item.partition("=")
        name = name.strip()
        if not sep:
            raise argparse.ArgumentTypeError(f"expected MODE=VALUE items, got {item!r}")
        if name not in DEFAULT_LEARNING_RATES:
            raise argparse.ArgumentTypeError(
                f"unknown mode {name!r}; use {', '.join(DEFAULT_LEARNING_RATES)}"
            )
        out[name] = cli.positive_float(number.strip())
    return out


def _mode(text_value: str) -> str:
    if text_value not in MODES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(MODES)}")
    return text_value


def _depth(text_value: str) -> int:
    value = cli.positive_int(text_value)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (1 is the plain model), got {value}")
    return value


def _fraction(text_value: str) -> float:
    value = cli.positive_float(text_value)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text_value!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, validated (a bad value exits with status 2 and a message)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--modes",
        type=cli.comma_list(_mode),
        default=list(MODES),
        help="comma list: " + ", ".join(MODES),
    )
    parser.add_argument(
        "--lr",
        type=_learning_rates,
        default={},
        help="per-mode learning rates, e.g. 'adamw=1e-3,momentum=0.1' (defaults: "
        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_LEARNING_RATES.items())
        + "; momentum-explicit uses momentum+overparam's)",
    )
    parser.add_argument("--depth", type=_depth, default=2, help="N of the overparam modes")
    parser.add_argument("--long", action="store_true", help=f"a longer run: {LONG_RUN}")
    positive = cli.positive_int
    parser.add_argument("--steps", type=positive, default=None, help=f"default {DEFAULTS['steps']}")
    parser.add_argument("--batch-size", type=positive, default=32, help="windows per step")
    parser.add_argument("--context", type=positive, default=64, help="bytes per window")
    parser.add_argument(
        "--d-model", type=positive, default=None, help=f"default {DEFAULTS['d_model']}"
    )
    parser.add_argument("--heads", type=positive, default=4)
    parser.add_argument(
        "--layers", type=positive, default=None, help=f"default {DEFAULTS['layers']}"
    )
    parser.add_argument("--mlp-ratio", type=positive, default=4)
    parser.add_argument(
        "--warmup", type=cli.nonnegative_int, default=30, help="linear warm-up steps"
    )
    parser.add_argument(
        "--weight-decay", type=cli.nonnegative_float, default=0.01, help="AdamW's, on matrices"
    )
    parser.add_argument(
        "--eval-every", type=positive, default=None, help=f"default {DEFAULTS['eval_every']}"
    )
    parser.add_argument("--eval-windows", type=positive, default=256, help="validation windows")
    parser.add_argument(
        "--target-loss", type=cli.positive_float, default=None, help="validation loss target"
    )
    parser.add_argument("--text-file", default=None, help="train on this file instead")
    parser.add_argument("--validation-fraction", type=_fraction, default=0.1)
    parser.add_argument(
        "--method",
        choices=("svd", "eigh", "newton", "auto"),
        default="svd",
        help="how the overparam modes compute P_W (docs/performance.md); svd, the default "
        "here, is the exact rule every step, as in the measured runs; auto is the library's "
        "fast default (factors every 10 steps)",
    )
    parser.add_argument("--precondition-embeddings", action="store_true")
    parser.add_argument("--precondition-head", action="store_true")
    parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
    parser.add_argument("--output-dir", type=cli.output_dir, default="transformer_lm_results")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument(
        "--blas-threads",
        type=cli.nonnegative_int,
        default=1,
        help="OPENBLAS_NUM_THREADS for the SVDs on CPU, set before jax loads LAPACK (threaded "
        "OpenBLAS was up to 25x slower on a busy 2-core machine, docs/performance.md); 0: "
        "leave the environment as it is",
    )
    args = parser.parse_args(argv)
    defaults = LONG_RUN if args.long else DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.d_model % args.heads:
        parser.error(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")
    args.lr = {**DEFAULT_LEARNING_RATES, **args.lr}
    if args.text_file is not None and not pathlib.Path(args.text_file).is_file():
        parser.error(f"--text-file {args.text_file!r} is not a file")
    args.parser = parser
    return args


def main(argv=None) -> dict:
    """Trains every mode; returns the JSON log (also written to --output-dir)."""
    args = parse_args(argv)
    if args.blas_threads > 0:  # read by OpenBLAS when jax first loads LAPACK, not before
        os.environ["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    corpus = text.load_text_corpus(args.text_file, validation_fraction=args.validation_fraction)
    if corpus.train.size < args.batch_size * args.context + 1:
        args.parser.error(
            f"the training text has {corpus.train.size} bytes, fewer than one batch of "
            f"{args.batch_size} windows of {args.context + 1}"
        )
    if corpus.validation.size < args.context + 1:
        args.parser.error(
            f"the validation text has {corpus.validation.size} bytes, fewer than one window"
        )
    train_inputs, train_targets = text.windows(corpus.train, args.context)
    val_inputs, val_targets = text.evenly_spaced_windows(
        corpus.validation, args.context, args.eval_windows
    )
    print(
        f"{corpus.source}: {corpus.train.size:,} train / {corpus.validation.size:,} validation "
        f"bytes ({len(corpus.files)} files); {len(train_inputs):,} training windows of "
        f"{args.context}, {len(val_inputs)} validation windows; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}",
        flush=True,
    )
    plain_model = make_model(args)
    plain_params = plain_model.init(
        jax.random.PRNGKey(args.seed), jnp.zeros((1, args.context), jnp.int32)
    )["params"]
    num_params = sum(x.size for x in jax.tree.leaves(plain_params))

    runs = {}
    for mode in args.modes:
        model, params, tx = build_run(mode, args, plain_params)
        logits_fn = models.logits_fn_for(model)
        result = training.run_minibatch(
            logits_fn,
            params,
            tx,
            (train_inputs, train_targets),
            args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.no_progress,
            log_every=max(1, args.steps // 5) if args.no_progress else 0,
            description=mode,
            eval_fn=make_evaluator(logits_fn, val_inputs, val_targets, 128),
            eval_every=args.eval_every,
        )
        final = result.evaluations[-1]
        runs[mode] = {
            "mode": mode,
            "learning_rate": learning_rate(mode, args),
            "depth": args.depth if mode.endswith(("+overparam", "-explicit")) else 1,
            "train_loss": result.losses.tolist(),
            "evaluations": result.evaluations,
            "final_val_loss": final["val_loss"],
            "final_val_accuracy": final["val_accuracy"],
            "seconds": result.seconds,
            "train_seconds": final["train_seconds"],
            "compile_seconds": result.compile_seconds,
            "seconds_per_step": final["train_seconds"] / args.steps,
        }
        print(
            f"[{mode}] validation loss {final['val_loss']:.4f} nats/byte, accuracy "
            f"{final['val_accuracy']:.4f} ({final['train_seconds']:.1f} s training, "
            f"{result.compile_seconds:.1f} s compiling)",
            flush=True,
        )

    finite = [r["final_val_loss"] for r in runs.values() if math.isfinite(r["final_val_loss"])]
    target = args.target_loss
    if target is None:  # the worst final loss, which every run that did not diverge reaches
        target = max(finite, default=0.0)
    for run in runs.values():
        reached = first_reaching(run["evaluations"], target)
        run["steps_to_target"], run["seconds_to_target"] = reached["steps"], reached["seconds"]

    print(f"\ntarget validation loss {target:.4f}")
    print(
        f"{'mode':<20}{'lr':>8}{'val loss':>10}{'steps to target':>17}{'s to target':>13}"
        f"{'s/step':>8}"
    )
    for name, run in runs.items():
        steps = run["steps_to_target"]
        seconds = run["seconds_to_target"]
        print(
            f"{name:<20}{run['learning_rate']:>8g}{run['final_val_loss']:>10.4f}"
            f"{steps if steps is not None else '-':>17}"
            f"{f'{seconds:.1f}' if seconds is not None else '-':>13}"
            f"{run['seconds_per_step']:>8.3f}"
        )

    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "parser"}
    log = {
        "command": " ".join(
            ["python examples/transformer_lm.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "config": config,
        "model": {"parameters": int(num_params), "head_dim": args.d_model // args.heads},
        "data": {
            **corpus.describe(),
            "training_windows": len(train_inputs),
            "validation_windows": len(val_inputs),
        },
        "environment": {**timing.environment(), "optax": optax.__version__},
        "target_val_loss": target,
        "runs": runs,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    json_path = output_dir / "transformer_lm.json"
    json_path.write_text(json.dumps(log, indent=1))
    png_path = output_dir / "transformer_lm_loss.png"
    plot(
        runs,
        png_path,
        f"byte-level transformer ({num_params:,} parameters), {args.steps} steps of "
        f"{args.batch_size}x{args.context} bytes, seed {args.seed}",
        target,
    )
    print(f"\nwrote {json_path} and {png_path}")
    return log


if __name__ == "__main__":
    main()
