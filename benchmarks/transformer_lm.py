"""Tunes and measures examples/transformer_lm.py: a learning-rate grid per mode, then seeds.

1. **Grid** (seed ``--grid-seed``): every tuned mode (AdamW and momentum SGD, each with and
   without ``overparam_precondition(2, method="svd")``) at each learning rate of its grid;
   the rate with the lowest final validation loss is chosen (a diverged run counts as
   +inf).
2. **Seeds**: every tuned mode at its chosen rate for each of ``--seeds`` (the grid run is
   reused for the grid seed: same command, same numbers), and the explicit depth-2
   factorized model (momentum SGD at the rate chosen for ``momentum+overparam``) for
   ``--explicit-seeds``.
3. **Summary**: four validation-loss targets, the loss of plain AdamW and of plain momentum
   SGD after half and after all of the steps (the worst over seeds, so that every seed of
   the baseline reaches it); per mode and seed the first evaluated step at or below each
   target and the training seconds to it (compilation and evaluation excluded).
4. **Paired step times**: the five modes' training steps interleaved on the same
   minibatches (load-robust seconds per step; the runs above were timed one after another
   on a shared machine).

Each run is one call of the example (a subprocess) with a single mode, its log kept under
``<results-dir>/transformer_lm/<mode>_lr<lr>_seed<seed>/`` and reused by a later call with
the identical command line (``--no-reuse`` to recompute). Writes
``<results-dir>/transformer_lm_cpu.json``, ``<results-dir>/transformer_lm_tables.md`` and
``<figures-dir>/transformer_lm.png``.

    python benchmarks/transformer_lm.py            # ~20 CPU-minutes on 2 cores
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
from absl import flags

from overparam_experiments import flags as xflags

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "transformer_lm.py"
RESULTS_DIR = REPO / "benchmarks" / "results"
FIGURES_DIR = REPO / "docs" / "figures"
TUNED_MODES = ("adamw", "adamw+overparam", "momentum", "momentum+overparam")
EXPLICIT = "momentum-explicit"
DEFAULT_GRIDS = {
    "adamw": "1e-3,3e-3,1e-2,3e-2",
    "adamw+overparam": "1e-3,3e-3,1e-2,3e-2",
    "momentum": "0.03,0.1,0.3,1.0",
    "momentum+overparam": "0.03,0.1,0.3",
}
# The example's flags that the benchmark pins; the others keep the example's defaults.
RUN_FLAGS = ("steps", "eval_every", "eval_windows", "batch_size", "context", "d_model", "layers")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line (grids, seeds, the example's run size, output places)."""
    fv = flag_values
    for mode, grid in DEFAULT_GRIDS.items():
        xflags.define_float_list(f"grid-{mode.replace('+', '-')}", grid, f"{mode}'s rates",
                                 positive=True, flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("grid-seed", 0, "seed of the grid runs", lower_bound=0, flag_values=fv)
    xflags.define_int_list("seeds", "0,1,2", "seeds of the tuned modes", lower_bound=0,
                           flag_values=fv)  # fmt: skip
    xflags.define_int_list("explicit-seeds", "0,1,2", "seeds of the explicit model",
                           lower_bound=0, flag_values=fv)  # fmt: skip
    sizes = {"steps": 400, "eval-every": 20, "eval-windows": 256, "batch-size": 32,
             "context": 64, "d-model": 64, "layers": 2}  # fmt: skip
    for name, default in sizes.items():
        flags.DEFINE_integer(name, default, "the example's flag", lower_bound=1, flag_values=fv)
    xflags.define_input_file("text-file", None, "train on this file instead", flag_values=fv)
    xflags.define_output_dir("results-dir", str(RESULTS_DIR), "JSON and tables", flag_values=fv)
    xflags.define_output_dir("figures-dir", str(FIGURES_DIR), "the figure", flag_values=fv)
    flags.DEFINE_boolean("no-reuse", False, "recompute every run", flag_values=fv)
    flags.DEFINE_integer("timing-chunk", 5, "steps per timed window", lower_bound=1,
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("timing-repeats", 10, "timed windows", lower_bound=1, flag_values=fv)
    xflags.require(["d-model"], lambda d: d % 4 == 0, "--d-model must be a multiple of the "
                   "example's 4 heads", flag_values=fv)  # fmt: skip


def parse_args(argv=()):
    """The parsed flags, with ``grids``: mode -> its learning rates."""
    return with_grids(xflags.parse(define_flags, argv))


def with_grids(args):
    args.grids = {
        mode: getattr(args, f"grid_{mode.replace('+', '_').replace('-', '_')}")
        for mode in TUNED_MODES
    }
    return args


def _run_dir(args, mode: str, lr: float, seed: int) -> pathlib.Path:
    return pathlib.Path(args.results_dir) / "transformer_lm" / f"{mode}_lr{lr:g}_seed{seed}"


def run_one(args, mode: str, lr: float, seed: int) -> dict:
    """One mode at one rate and seed: the example's log (reused when the command matches)."""
    output_dir = _run_dir(args, mode, lr, seed)
    lr_key = "momentum+overparam" if mode == EXPLICIT else mode
    argv = ["--modes", mode, "--lr", f"{lr_key}={lr:g}", "--seed", str(seed)]
    for name in RUN_FLAGS:
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.text_file:
        argv += ["--text-file", args.text_file]
    argv += ["--no-progress", "--output-dir", str(output_dir)]
    log_path = output_dir / "transformer_lm.json"
    if not args.no_reuse and log_path.exists():
        log = json.loads(log_path.read_text())
        if log["command"] == example_command(argv):
            print(f"reusing {log_path} ({log['timestamp']})", flush=True)
            return log
    return run_example(argv, log_path)


def example_command(argv: list[str]) -> str:
    """The command line the example records in its log for ``argv``."""
    return " ".join(["python examples/transformer_lm.py", *argv])


def run_example(argv: list[str], log_path: pathlib.Path) -> dict:
    """Runs examples/transformer_lm.py with ``argv`` in a subprocess; returns its log."""
    print(f"+ {example_command(argv)}", flush=True)
    done = subprocess.run([sys.executable, str(EXAMPLE), *argv])
    if done.returncode != 0:
        raise SystemExit(f"examples/transformer_lm.py exited with status {done.returncode}: "
                         f"{example_command(argv)}")  # fmt: skip
    return json.loads(log_path.read_text())


# The example's defaults that its models and optimizers depend on, for the paired timing
# (tests/test_examples.py checks them against the example's own).
EXAMPLE_DEFAULTS = {"heads": 4, "mlp_ratio": 4, "warmup": 30, "weight_decay": 0.01, "depth": 2,
                    "method": "svd"}  # fmt: skip


def mode_setup(mode: str, lr: float, args, plain_params):
    """(model, params, tx) of one of the example's modes, as the example builds them."""
    import jax
    import optax

    import overparam_optax as opx
    from overparam_experiments import models

    d = EXAMPLE_DEFAULTS
    warmup = min(d["warmup"], max(args.steps - 1, 0))
    schedule = optax.schedules.warmup_constant_schedule(0.0, lr, warmup) if warmup else lr
    dims = models.transformer_dimension_numbers(plain_params)
    if mode == EXPLICIT:
        params = models.factorize_params(plain_params, d["depth"], dims,
                                         key=jax.random.PRNGKey(1))  # the example's seed 0, plus 1
        return _model(args, d["depth"]), params, optax.sgd(schedule, momentum=0.9)
    if mode.startswith("adamw"):
        tx = optax.adamw(schedule, weight_decay=d["weight_decay"],
                         mask=models.transformer_decay_mask(plain_params))  # fmt: skip
    else:
        tx = optax.sgd(schedule, momentum=0.9)
    if mode.endswith("+overparam"):
        precondition = opx.overparam_precondition(d["depth"], method=d["method"],
                                                  dimension_numbers=dims)  # fmt: skip
        tx = optax.chain(precondition, tx)
    return _model(args), plain_params, tx


def _model(args, depth: int = 1):
    from overparam_experiments import models, text

    d = EXAMPLE_DEFAULTS
    return models.TransformerLM(
        vocab_size=text.VOCAB_SIZE, context=args.context, d_model=args.d_model,
        num_heads=d["heads"], num_layers=args.layers, mlp_ratio=d["mlp_ratio"], depth=depth,
    )  # fmt: skip


def paired_step_times(args, chosen: dict) -> dict:
    """Seconds per training step of every mode, interleaved step by step (load-robust).

    The separate runs above are timed one after another on a shared machine whose load
    drifts; here the five modes' jitted steps (the example's models and optimizers at the
    chosen rates) take turns on the same minibatches, ``--timing-repeats`` windows of
    ``--timing-chunk`` steps each after a warm-up window, and each mode's time is compared
    with plain AdamW's at the same steps (:func:`~overparam_experiments.timing.
    time_interleaved`).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from overparam_experiments import models, text, timing

    corpus = text.load_text_corpus(args.text_file)
    inputs, targets = text.windows(corpus.train, args.context)
    plain = _model(args).init(
        jax.random.PRNGKey(0), jnp.zeros((1, args.context), jnp.int32)
    )["params"]
    steps, carries = {}, {}
    for mode in (*TUNED_MODES, EXPLICIT):
        model, params, tx = mode_setup(mode, chosen[mode], args, plain)
        logits_fn = models.logits_fn_for(model)

        def loss_fn(params, x, y, logits_fn=logits_fn):
            logits = logits_fn(params, x, True, jax.random.PRNGKey(0))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        @jax.jit
        def step(carry, x, y, tx=tx, loss_fn=loss_fn):
            params, state = carry
            grads = jax.grad(loss_fn)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        steps[mode], carries[mode] = step, (params, tx.init(params))
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(inputs), args.batch_size, replace=False) for _ in range(8)]

    def data_fn(i):
        index = batches[i % len(batches)]
        return inputs[index], targets[index]

    medians, ratios, _ = timing.time_interleaved(
        steps, carries, args.timing_chunk, args.timing_repeats, data_fn, "adamw"
    )
    return {
        "chunk": args.timing_chunk,
        "repeats": args.timing_repeats,
        "seconds_per_step": medians,
        "ratio_to_adamw": ratios,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _reach(evaluations: list[dict], target: float) -> tuple[int | None, float | None]:
    for record in evaluations:
        if record["val_loss"] <= target:
            return record["step"], record["train_seconds"]
    return None, None


def _val_loss_at(log: dict, step: int) -> float:
    """The validation loss evaluated after ``step`` updates (+inf if NaN or not evaluated)."""
    (run,) = log["runs"].values()
    for record in run["evaluations"]:
        if record["step"] == step:
            value = record["val_loss"]
            return value if math.isfinite(value) else math.inf
    return math.inf


def _final(log: dict) -> float:
    (run,) = log["runs"].values()
    value = run["final_val_loss"]
    return value if math.isfinite(value) else math.inf


def summarize(logs: dict, chosen: dict, args) -> dict:
    """Targets, and per mode and seed the steps/seconds to them (see the module docstring)."""
    # The plain runs' validation loss at half and at all of the steps, the worst over seeds
    # (so that every seed of the plain run reaches it).
    targets = {}
    for base in ("adamw", "momentum"):
        for at in (args.steps // 2, args.steps):
            values = [_val_loss_at(log, at) for log in logs.get(base, {}).values()]
            if values:
                targets[f"plain {base} @ {at}"] = float(np.max(values))
    modes = {}
    for mode, by_seed in logs.items():
        per_seed = {}
        for seed, log in by_seed.items():
            (run,) = log["runs"].values()
            evaluations = run["evaluations"]
            per_seed[str(seed)] = {
                "final_val_loss": run["final_val_loss"],
                "train_seconds": run["train_seconds"],
                "seconds_per_step": run["seconds_per_step"],
                "compile_seconds": run["compile_seconds"],
                "to_target": {
                    name: dict(zip(("steps", "seconds"), _reach(evaluations, t), strict=True))
                    for name, t in targets.items()
                },
                "val_curve": {
                    "step": [e["step"] for e in evaluations],
                    "val_loss": [e["val_loss"] for e in evaluations],
                    "train_seconds": [e["train_seconds"] for e in evaluations],
                },
                "load_average": log["environment"].get("load_average"),
            }
        finals = [s["final_val_loss"] for s in per_seed.values()]
        modes[mode] = {
            "learning_rate": chosen[mode],
            "seeds": per_seed,
            "final_val_loss_mean": float(np.mean(finals)),
            "seconds_per_step_mean": float(
                np.mean([s["seconds_per_step"] for s in per_seed.values()])
            ),
        }
    return {"targets": targets, "modes": modes}


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


#: (mode, the mode it is compared with), for the table of paired differences.
PAIRED_COMPARISONS = (
    ("adamw+overparam", "adamw"),
    ("momentum+overparam", "momentum"),
    ("momentum+overparam", "momentum-explicit"),
    ("adamw", "momentum"),
)


def _mean_ci(values, sign: str = "") -> str:
    """Values over seeds as "mean ± 95% t-interval" (the mean alone for one seed); ``sign``
    "+" shows the sign of a difference."""
    import tuning

    stats = tuning.mean_ci(values)
    mean = f"{stats['mean']:{sign}.4f}"
    return mean if stats.get("ci95") is None else f"{mean} ± {stats['ci95']:.4f}"


def _paired_differences_table(modes: dict) -> list[str]:
    """Final validation loss of one mode minus another's, paired by seed (a seed fixes the
    initial weights and the minibatches), as mean ± 95% t-interval."""
    lines = [
        "| final validation loss | paired difference, mean ± 95% t-interval | seeds |",
        "|---|---|---|",
    ]
    for a, b in PAIRED_COMPARISONS:
        if a not in modes or b not in modes:
            continue
        first, second = modes[a]["seeds"], modes[b]["seeds"]
        common = [seed for seed in first if seed in second]
        diffs = [first[s]["final_val_loss"] - second[s]["final_val_loss"] for s in common]
        lines.append(f"| {a} minus {b} | {_mean_ci(diffs, '+')} | {len(common)} |")
    return lines


def tables_markdown(result: dict) -> str:
    """The grid table and the measured table, as in docs/transformer.md."""
    grid_seed = result["config"]["grid_seed"]
    lines = [
        f"| mode | learning rate: final validation loss (seed {grid_seed}) | chosen |",
        "|---|---|---|",
    ]
    for mode, grid in result["grid"].items():
        cells = ", ".join(
            f"{float(lr):g}: {loss:.4f}" if math.isfinite(loss) else f"{float(lr):g}: diverged"
            for lr, loss in grid.items()
        )
        lines.append(f"| {mode} | {cells} | {result['chosen'][mode]:g} |")
    summary = result["summary"]
    paired = result.get("paired_step_times") or {"seconds_per_step": {}, "ratio_to_adamw": {}}
    seeds_of = {mode: list(row["seeds"]) for mode, row in summary["modes"].items()}
    lines += [
        "",
        "| mode | lr | final validation loss, mean ± 95% t-interval | per seed "
        f"({', '.join(seeds_of.get('adamw', []))}) | s/step, own runs | s/step, paired "
        "| paired / AdamW |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, row in summary["modes"].items():
        finals = " / ".join(f"{s['final_val_loss']:.4f}" for s in row["seeds"].values())
        seconds_paired = paired["seconds_per_step"].get(mode)
        ratio = paired["ratio_to_adamw"].get(mode)
        loss = _mean_ci([s["final_val_loss"] for s in row["seeds"].values()])
        lines.append(
            f"| {mode} | {row['learning_rate']:g} | {loss} | {finals} | "
            f"{row['seconds_per_step_mean']:.3f} | "
            + ("-" if seconds_paired is None else f"{seconds_paired:.3f}")
            + " | "
            + ("-" if ratio is None else f"{ratio:.2f}")
            + " |"
        )
    lines += ["", *_paired_differences_table(summary["modes"])]
    names = list(summary["targets"])
    lines += [
        "",
        "Steps to each target per seed (- not reached in the run), and the mean training "
        "seconds of the seeds that reached it:",
        "",
        "| mode | " + " | ".join(f"{n} ({summary['targets'][n]:.4f})" for n in names) + " |",
        "|---" * (1 + len(names)) + "|",
    ]
    for mode, row in summary["modes"].items():
        cells = [mode]
        for name in names:
            reached = [s["to_target"][name] for s in row["seeds"].values()]
            steps = " / ".join("-" if r["steps"] is None else str(r["steps"]) for r in reached)
            seconds = _mean_or_none([r["seconds"] for r in reached])
            cells.append(steps + ("" if seconds is None else f" ({seconds:.0f} s)"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: pathlib.Path) -> None:
    """Validation loss vs step and vs training seconds: mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    for index, (mode, row) in enumerate(result["summary"]["modes"].items()):
        curves = [s["val_curve"] for s in row["seeds"].values()]
        steps = np.asarray(curves[0]["step"])
        values = np.asarray([c["val_loss"] for c in curves])
        seconds = np.mean([c["train_seconds"] for c in curves], axis=0)
        label = f"{mode} (lr {row['learning_rate']:g}, {len(curves)} seeds)"
        for ax, x in ((axes[0], steps), (axes[1], seconds)):
            ax.plot(x, values.mean(0), color=f"C{index}", label=label)
            ax.fill_between(x, values.min(0), values.max(0), color=f"C{index}", alpha=0.2)
    targets = result["summary"]["targets"]
    for ax in axes:
        for value in targets.values():
            ax.axhline(value, color="gray", linestyle=":", linewidth=1)
        # The first evaluation (the initial loss, ~5.5-6) would squash the rest.
        ax.set_ylim(0.97 * min(targets.values()), 3.5)
    for ax, xlabel in zip(
        axes, ("step", "training seconds (mean over seeds; shared 2-core CPU)"), strict=True
    ):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("dotted: the plain runs' loss at half and all of the steps", fontsize=9)
    axes[0].legend(fontsize=8)
    config = result["config"]
    fig.suptitle(
        f"byte-level transformer, d_model {config['d_model']}, {config['layers']} layers, "
        f"{config['steps']} steps of {config['batch_size']}x{config['context']} bytes"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> dict:
    """Grid, seeds, summary; writes the JSON, the tables and the figure."""
    args = with_grids(args)
    xflags.make_output_dir(args.results_dir, "results-dir")
    xflags.make_output_dir(args.figures_dir, "figures-dir")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from overparam_experiments import timing
    start = time.time()
    cpu_start = time.process_time()

    grid, chosen, logs = {}, {}, {}
    for mode in TUNED_MODES:
        grid[mode] = {}
        for lr in args.grids[mode]:
            log = run_one(args, mode, lr, args.grid_seed)
            grid[mode][f"{lr:g}"] = _final(log)
        best = min(grid[mode], key=lambda k: grid[mode][k])
        chosen[mode] = float(best)
        logs[mode] = {args.grid_seed: run_one(args, mode, chosen[mode], args.grid_seed)}
    for mode in TUNED_MODES:
        for seed in args.seeds:
            if seed not in logs[mode]:
                logs[mode][seed] = run_one(args, mode, chosen[mode], seed)
    chosen[EXPLICIT] = chosen["momentum+overparam"]
    if args.explicit_seeds:
        logs[EXPLICIT] = {
            seed: run_one(args, EXPLICIT, chosen[EXPLICIT], seed)
            for seed in args.explicit_seeds
        }
    for mode in TUNED_MODES:  # the grid seed only if it is one of --seeds
        logs[mode] = {s: log for s, log in logs[mode].items() if s in args.seeds}

    first = next(iter(logs["adamw"].values()))
    result = {
        "command": " ".join(["python benchmarks/transformer_lm.py", *sys.argv[1:]]),
        "config": {
            **{name: getattr(args, name) for name in RUN_FLAGS},
            "grid_seed": args.grid_seed,
            "seeds": args.seeds,
            "explicit_seeds": args.explicit_seeds,
            "grids": args.grids,
            "example_defaults": {k: v for k, v in first["config"].items() if k not in ("lr",)},
        },
        "data": first["data"],
        "model": first["model"],
        "environment": {**timing.environment(), "optax": first["environment"]["optax"]},
        "grid": grid,
        "chosen": chosen,
        "summary": summarize(logs, chosen, args),
        "paired_step_times": paired_step_times(args, chosen),
        "this_call": {
            "wall_seconds": time.time() - start,
            "cpu_seconds": time.process_time() - cpu_start,
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    results_dir = pathlib.Path(args.results_dir)
    json_path = results_dir / "transformer_lm_cpu.json"
    json_path.write_text(json.dumps(result, indent=1))
    tables = tables_markdown(result)
    (results_dir / "transformer_lm_tables.md").write_text(tables)
    figures_dir = pathlib.Path(args.figures_dir)
    plot(result, figures_dir / "transformer_lm.png")
    print("\n" + tables)
    print(f"wrote {json_path}, {results_dir / 'transformer_lm_tables.md'} and the figure")
    return result


if __name__ == "__main__":
    xflags.run(define_flags, main)
