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

import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

import overparam_optax as opx
from overparam_experiments import devices, models, text, timing, training
from overparam_experiments import flags as xflags

MODES = ("adamw", "adamw+overparam", "momentum", "momentum+overparam", "momentum-explicit")
# Learning rates chosen on the grids of benchmarks/transformer_lm.py (docs/transformer.md).
#: The learning rate of each optimizer when ``--lr`` is not given.
DEFAULT_LEARNING_RATES = {
    "adamw": 1e-2,
    "adamw+overparam": 3e-3,
    "momentum": 0.1,
    "momentum+overparam": 0.1,
}
DEFAULT_CONTEXT = 64
#: The sizes of ``--long``.
LONG_RUN = {"steps": 2000, "d_model": 128, "layers": 4, "eval_every": 100}
# The measured runs (benchmarks/transformer_lm.py, docs/transformer.md) are these with 400 steps.
#: The default sizes.
DEFAULTS = {"steps": 300, "d_model": 64, "layers": 2, "eval_every": 20}


def base_optimizer(mode: str, schedule, weight_decay: float, decay_mask):
    """AdamW (decay on the weight matrices only) or SGD with momentum 0.9."""
    if mode.startswith("adamw"):
        return optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask)
    return optax.sgd(schedule, momentum=0.9)


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
    decay_mask = models.transformer_decay_mask(plain_params)
    tx = base_optimizer(mode, schedule, args.weight_decay, decay_mask)
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


class _LearningRates(flags.ArgumentParser):
    """``--lr``: ``MODE=VALUE,...`` with known modes and finite positive values."""

    syntactic_help = "MODE=VALUE,..."

    def parse(self, argument):
        if isinstance(argument, dict):
            return dict(argument)
        out = {}
        for item in filter(None, (part.strip() for part in str(argument).split(","))):
            name, sep, number = item.partition("=")
            name = name.strip()
            if not sep:
                raise ValueError(f"expected MODE=VALUE items, got {item!r}")
            if name not in DEFAULT_LEARNING_RATES:
                raise ValueError(f"unknown mode {name!r}; use {', '.join(DEFAULT_LEARNING_RATES)}")
            value = float(number)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}'s rate must be a positive number, got {number!r}")
            out[name] = value
        return out

    def flag_type(self):
        return "learning rates"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The example's command line; absl checks every value and combination while parsing."""
    fv = flag_values
    xflags.define_enum_list(
        "modes", ",".join(MODES), MODES, "modes to train", flag_values=fv
    )
    flags.DEFINE(
        _LearningRates(), "lr", "", "per-mode learning rates, e.g. 'adamw=1e-3,momentum=0.1' "
        "(defaults: " + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_LEARNING_RATES.items())
        + "; momentum-explicit uses momentum+overparam's)", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer("depth", 2, "N of the overparam modes (1 is the plain model)",
                         lower_bound=2, flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("long", False, f"a longer run: {LONG_RUN}", flag_values=fv)
    positive = {"lower_bound": 1, "flag_values": fv}
    flags.DEFINE_integer("steps", None, f"default {DEFAULTS['steps']}", **positive)
    flags.DEFINE_integer("batch-size", 32, "windows per step", **positive)
    flags.DEFINE_integer("context", DEFAULT_CONTEXT, "bytes per window", **positive)
    flags.DEFINE_integer("d-model", None, f"default {DEFAULTS['d_model']}", **positive)
    flags.DEFINE_integer("heads", 4, "attention heads", **positive)
    flags.DEFINE_integer("layers", None, f"default {DEFAULTS['layers']}", **positive)
    flags.DEFINE_integer("mlp-ratio", 4, "MLP width over d_model", **positive)
    flags.DEFINE_integer("warmup", 30, "linear warm-up steps", lower_bound=0, flag_values=fv)
    flags.DEFINE_float("weight-decay", 0.01, "AdamW's, on matrices", lower_bound=0.0,
                       flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("eval-every", None, f"default {DEFAULTS['eval_every']}", **positive)
    flags.DEFINE_integer("eval-windows", 256, "validation windows", **positive)
    flags.DEFINE_float("target-loss", None, "validation loss target", lower_bound=1e-12,
                       flag_values=fv)  # fmt: skip
    xflags.define_input_file("text-file", None, "train on this file instead", flag_values=fv)
    flags.DEFINE_float("validation-fraction", 0.1, "share of the text that validates",
                       lower_bound=1e-6, upper_bound=0.999, flag_values=fv)  # fmt: skip
    flags.DEFINE_enum(
        "method", "svd", ("tracked", "svd", "eigh", "newton"), "how the overparam modes compute "
        "P_W (docs/performance.md); svd, the default here, is the exact rule every step, as "
        "in the measured runs", flag_values=fv,
    )  # fmt: skip
    xflags.require_valid_method_depth("depth", "method", flag_values=fv)
    flags.DEFINE_boolean("precondition-embeddings", False, "also the embeddings",
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("precondition-head", False, "also the head", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "initial weights and minibatches", lower_bound=0,
                         flag_values=fv)  # fmt: skip
    xflags.define_output_dir("output-dir", "transformer_lm_results", "where the log goes",
                             flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("no-progress", False, "no tqdm progress bar", flag_values=fv)
    flags.DEFINE_integer(
        "blas-threads", 1, "OpenBLAS threads of the SVDs on CPU, capped at run time "
        "(threaded OpenBLAS was up to 25x slower on a busy 2-core machine, "
        "docs/performance.md); 0: leave them as they are", lower_bound=0,
        flag_values=fv,
    )  # fmt: skip
    xflags.require(
        ["d-model", "heads", "long"], _heads_divide, "--d-model must be a multiple of --heads",
        flag_values=fv,
    )  # fmt: skip


def _heads_divide(d_model, heads, long) -> bool:
    d_model = d_model or (LONG_RUN if long else DEFAULTS)["d_model"]
    return d_model % heads == 0


def resolve(args):
    """Fills the run-size defaults (``--long`` or not) and the default learning rates."""
    defaults = LONG_RUN if args.long else DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.lr = {**DEFAULT_LEARNING_RATES, **args.lr}
    return args


def train(args, command: str) -> dict:
    """Trains every mode of ``args`` (parsed flags); returns the log, also written to disk.

    ``command`` is recorded in the log (benchmarks/transformer_lm.py reuses a log whose
    command matches).
    """
    args = resolve(args)
    devices.limit_blas_threads(args.blas_threads)
    corpus = text.load_text_corpus(args.text_file, validation_fraction=args.validation_fraction)
    longest = (corpus.train.size - 1) // args.batch_size  # the longest context a batch fits
    if args.context > longest:
        # The text is at fault only when the default window would not fit either.
        if longest >= DEFAULT_CONTEXT:
            xflags.fail(
                "context", args.context,
                f"one batch of {args.batch_size} windows of {args.context + 1} bytes does not "
                f"fit in the training text ({corpus.train.size:,} bytes); use --context "
                f"{longest} or less, or a longer --text-file",
            )  # fmt: skip
        xflags.fail(
            "text-file", args.text_file,
            f"the training text has {corpus.train.size} bytes, fewer than one batch of "
            f"{args.batch_size} windows of {args.context + 1}"
        )
    if corpus.validation.size < args.context + 1:
        xflags.fail(
            "validation-fraction", args.validation_fraction,
            f"the validation text has {corpus.validation.size} bytes, fewer than one window "
            f"of --context + 1 = {args.context + 1}: raise it, or lower --context",
        )
    output_dir = xflags.make_output_dir(args.output_dir)
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
            "tracked_decompositions": training.tracked_decompositions(result.opt_state),
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

    config = dict(vars(args))
    log = {
        "command": command,
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


def main(args) -> None:
    """Trains every mode of the parsed flags and writes the log and the plot."""
    train(args, " ".join(["python examples/transformer_lm.py", *sys.argv[1:]]))


if __name__ == "__main__":
    xflags.run(define_flags, main)
