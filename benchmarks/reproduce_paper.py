r"""Reproduces the figures of Arora, Cohen & Hazan (ICML 2018) on this project's data.

Sections (``--sections``, default all):

* ``regression`` — Ethanol l_p regression (p = 4, and p = 2 as the negative control), full
  batch, float64, one shared learning-rate grid (10^-5 .. 1 in quarter decades by default),
  10,000 steps, w ~ init_scale * N(0, 1) from ``--seed``:
    - depth-1 GD vs the implicit depth-N update (``overparam_precondition(N)`` + SGD), N = 2,3,4;
    - explicit depth-N linear networks trained by GD from a balanced factorization of the
      same w, against the implicit run with the same learning rate (the validation plot);
    - AdaGrad, AdaDelta and Adam on depth 1, and Adam + ``overparam_precondition(N)``;
    - near-zero initialization: implicit depth N from w ~ 1e-3 * N(0, 1), and explicit
      depth-N networks whose factors are drawn independently near zero.
  Every method gets its own best learning rate on the grid (lowest final loss). The target
  of "steps to target" is the best depth-1 GD loss at the horizon.
* ``seeds`` — depth 1 vs implicit N = 2,3,4 for several initialization seeds (p = 4, 2).
* ``mnist`` — runs ``examples/mnist_cnn.py`` (plain / implicit / explicit, same seed) in a
  subprocess on the MNIST folder given by ``--mnist-data-dir`` (default: the shared full
  MNIST), for each of ``--mnist-optimizers`` (momentum 0.01 and Adam 1e-3 by default) and
  ``--mnist-seeds``, and reads the log each run writes.

Writes ``benchmarks/results/reproduce_paper.json`` (every number, the device, the jax
version, the exact command), ``benchmarks/results/reproduce_paper_tables.md`` (the tables of
``docs/reproduction.md``) and PNG figures into ``docs/figures/``.

Example::

  python benchmarks/reproduce_paper.py --sections regression,seeds   # ~8 min on 2 cores
  python benchmarks/reproduce_paper.py --sections mnist    # 8 runs of 3 modes, ~55 min on 2 cores
  python benchmarks/reproduce_paper.py --sections regression --steps 2000

Sections run separately are merged into the same JSON and tables (each keeps the command
that produced it); ``--mnist-reuse-logs`` re-summarizes finished MNIST runs without
re-training.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

import overparam_optax as opx
from overparam_optax import factorized
from overparam_optax.experiments import data, timing, training
from overparam_optax.experiments import flags as xflags
from overparam_optax.experiments.trajectories import compare_trajectories

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("regression", "seeds", "mnist")
LR_EXPONENTS = (-10.0, 1.0)  # log10 range of the grid (as examples/lp_regression.py)
NEAR_ZERO_SCALE = 1e-3  # end-to-end init scale of the near-zero implicit runs
NEAR_ZERO_FACTOR_STDDEV = 0.05  # per-factor stddev of the near-zero explicit networks
EXPLICIT_HIDDEN = 16  # hidden width of the explicit networks (>= min(128, 1) = 1 suffices)


# ------------------------------------------------------------------------------ methods


def gd(N: int):
    """``make_optimizer(lr)``: GD (N = 1) or GD along the depth-N end-to-end dynamics."""
    if N == 1:
        return optax.sgd
    return lambda lr: optax.chain(opx.overparam_precondition(N), optax.sgd(lr))


def adam_precondition(N: int):
    """``make_optimizer(lr)``: Adam along the depth-N end-to-end dynamics."""
    return lambda lr: optax.chain(opx.overparam_precondition(N), optax.adam(lr))


def _summary(search: training.GridSearchResult, target: float, stride: int) -> dict:
    steps = training.steps_to_reach(search.best_losses, target)
    return {
        "learning_rate": search.best_learning_rate,
        "final_loss": search.best_final_loss,
        "steps_to_target": steps,
        # Over the whole grid: the fastest any learning rate reaches the target.
        "fastest_steps_to_target_any_lr": _fastest(search.losses, target),
        "final_loss_per_lr": [float(v) for v in search.losses[:, -1]],
        "curve_stride": stride,
        "curve": search.best_losses[::stride].tolist(),
    }


def _fastest(losses: np.ndarray, target: float):
    reached = [training.steps_to_reach(curve, target) for curve in losses]
    reached = [s for s in reached if s is not None]
    return min(reached) if reached else None


def _end_to_end_loss(X, y, p):
    return lambda factors: training.lp_regression_loss(factorized.end_to_end(factors), X, y, p)


def regression_section(X, y, args, learning_rates) -> dict:
    """All regression comparisons for one seed; returns {"l4": {...}, "l2": {...}}."""
    stride = max(1, args.steps // 1000)
    key = jax.random.PRNGKey(args.seed)
    w0 = args.init_scale * jax.random.normal(key, (X.shape[1], 1))
    w0_near_zero = NEAR_ZERO_SCALE * jax.random.normal(key, (X.shape[1], 1))
    out = {}
    for p in args.p:
        name = f"l{p:g}"
        loss_fn = lambda w, p=p: training.lp_regression_loss(w, X, y, p)  # noqa: E731
        start = time.perf_counter()
        methods = {
            "GD depth 1": training.grid_search(loss_fn, w0, gd(1), learning_rates, args.steps)
        }
        target = methods["GD depth 1"].best_final_loss
        for N in args.depths:
            methods[f"implicit depth {N}"] = training.grid_search(
                loss_fn, w0, gd(N), learning_rates, args.steps
            )
        for label, make in (
            ("AdaGrad depth 1", optax.adagrad),
            ("AdaDelta depth 1", optax.adadelta),
            ("Adam depth 1", optax.adam),
        ):
            methods[label] = training.grid_search(loss_fn, w0, make, learning_rates, args.steps)
        for N in args.depths:
            methods[f"Adam + implicit depth {N}"] = training.grid_search(
                loss_fn, w0, adam_precondition(N), learning_rates, args.steps
            )
        # Near-zero initialization.
        methods["GD depth 1, near-zero init"] = training.grid_search(
            loss_fn, w0_near_zero, gd(1), learning_rates, args.steps
        )
        for N in args.depths:
            methods[f"implicit depth {N}, near-zero init"] = training.grid_search(
                loss_fn, w0_near_zero, gd(N), learning_rates, args.steps
            )
            factor_key = jax.random.fold_in(key, N)
            shapes = [(X.shape[1], EXPLICIT_HIDDEN)]
            shapes += [(EXPLICIT_HIDDEN, EXPLICIT_HIDDEN)] * (N - 2) + [(EXPLICIT_HIDDEN, 1)]
            near_zero = factorized.near_zero(NEAR_ZERO_FACTOR_STDDEV)
            factors = [
                near_zero(jax.random.fold_in(factor_key, i), s, jnp.float64)
                for i, s in enumerate(shapes)
            ]
            methods[f"explicit depth {N}, near-zero factors"] = training.grid_search(
                _end_to_end_loss(X, y, p), factors, optax.sgd, learning_rates, args.steps
            )
        summaries = {label: _summary(s, target, stride) for label, s in methods.items()}

        # Validation: explicit balanced depth-N nets vs the implicit rule at the same lr.
        validation = {}
        for N in args.depths:
            lr = methods[f"implicit depth {N}"].best_learning_rate
            comparison = compare_trajectories(
                lambda params, loss_fn=loss_fn: loss_fn(params["w"]["kernel"]),
                {"w": {"kernel": w0}},
                N,
                lr,
                args.steps,
                hidden=EXPLICIT_HIDDEN,
                key=jax.random.fold_in(key, 100 + N),
            )
            validation[f"depth {N}"] = {
                "learning_rate": lr,
                "max_relative_gap": float(np.nanmax(comparison.gap)),
                "final_relative_gap": float(comparison.gap[-1]),
                "explicit_final_loss": float(comparison.explicit_loss[-1]),
                "implicit_final_loss": float(comparison.implicit_loss[-1]),
                "explicit_steps_to_target": training.steps_to_reach(
                    comparison.explicit_loss, target
                ),
                "curve_stride": stride,
                "explicit_curve": comparison.explicit_loss[::stride].tolist(),
                "implicit_curve": comparison.implicit_loss[::stride].tolist(),
            }
        out[name] = {
            "target": target,
            "methods": summaries,
            "validation": validation,
            "seconds": time.perf_counter() - start,
        }
        print(f"[regression {name}] done in {out[name]['seconds']:.0f} s", flush=True)
        for label, summary in summaries.items():
            print(
                f"  {label:<40} lr {summary['learning_rate']:<10.3g} final "
                f"{summary['final_loss']:<12.6g} steps-to-target {summary['steps_to_target']}",
                flush=True,
            )
    return out


def seeds_section(X, y, args, learning_rates) -> dict:
    """Depth 1 vs implicit depth N over several initialization seeds."""
    out = {}
    for p in args.p:
        name = f"l{p:g}"
        loss_fn = lambda w, p=p: training.lp_regression_loss(w, X, y, p)  # noqa: E731
        rows = []
        for seed in args.seeds:
            w0 = args.init_scale * jax.random.normal(jax.random.PRNGKey(seed), (X.shape[1], 1))
            base = training.grid_search(loss_fn, w0, gd(1), learning_rates, args.steps)
            row = {
                "seed": seed,
                "target": base.best_final_loss,
                "depth 1": {"learning_rate": base.best_learning_rate, "steps_to_target": None},
            }
            for N in args.depths:
                search = training.grid_search(loss_fn, w0, gd(N), learning_rates, args.steps)
                row[f"depth {N}"] = {
                    "learning_rate": search.best_learning_rate,
                    "final_loss": search.best_final_loss,
                    "steps_to_target": training.steps_to_reach(
                        search.best_losses, base.best_final_loss
                    ),
                    "fastest_steps_to_target_any_lr": _fastest(search.losses, base.best_final_loss),
                }
            rows.append(row)
            print(
                f"[seeds {name}] seed {seed}: "
                + ", ".join(
                    f"{k} {v['steps_to_target']}"
                    for k, v in row.items()
                    if k.startswith("depth ") and k != "depth 1"
                ),
                flush=True,
            )
        out[name] = rows
    return out


MNIST_SMOOTHING = 100  # steps per trailing mean of the (noisy) minibatch training loss
MNIST_OPTIMIZERS = ("sgd", "momentum", "adam")


def _mnist_argv(args, optimizer: str, seed: int, output_dir: pathlib.Path) -> list[str]:
    """The command line of examples/mnist_cnn.py for one optimizer and seed."""
    argv = [
        "--optimizer", optimizer,
        "--steps", str(args.mnist_steps),
        "--batch-size", str(args.mnist_batch_size),
        "--output-dir", str(output_dir),
        "--seed", str(seed),
        "--depth", "2",
    ]  # fmt: skip
    optional = {
        "--lr": args.mnist_lr,
        "--data-dir": args.mnist_data_dir,
        "--dense-width": args.mnist_dense_width,
        "--train-size": args.mnist_train_size,
        "--test-size": args.mnist_test_size,
    }
    for flag, value in optional.items():
        if value:
            argv += [flag, str(value)]
    return argv


def _mnist_summary(log: dict, window: int) -> dict:
    """Per mode: the example's scalars, steps to the plain run's losses, a short curve.

    The targets are the plain run's smoothed training loss after half of the steps and
    after all of them; a mode reaches a target after the fewest steps whose trailing
    ``window``-step mean is at or below it (``training.smoothed_steps_to_reach``; the plain
    run itself may get there early, as the curve is not monotone).
    """
    targets = {}
    if "none" in log["runs"]:
        losses = log["runs"]["none"]["train_loss"]
        plain, steps = training.trailing_mean(losses, window), len(losses)
        targets = {str(steps // 2): float(plain[max(steps // 2 - window, 0)]),
                   str(steps): float(plain[-1])}  # fmt: skip
    runs = {}
    for name, run in log["runs"].items():
        smooth = training.trailing_mean(run["train_loss"], window)
        stride = max(1, len(smooth) // 200)  # about 200 points per curve in the JSON
        runs[name] = {
            **{k: v for k, v in run.items() if k not in ("train_loss", "train_accuracy")},
            "steps_to_plain_loss_at": {
                at: training.smoothed_steps_to_reach(run["train_loss"], target, window)
                for at, target in targets.items()
            },
            "smoothed_train_loss": smooth[::stride].tolist(),
            "smoothed_stride": stride,
            "smoothing_window": window,
        }
    return {"learning_rate": log["config"]["lr"], "targets": targets, "runs": runs}


def _mnist_log(argv: list[str], output_dir: pathlib.Path, reuse: bool) -> dict:
    """Runs the example in a subprocess (or, with ``reuse``, reads the log an identical
    earlier run wrote) and returns its log."""
    log_path = output_dir / "mnist_cnn.json"
    command = " ".join(["python examples/mnist_cnn.py", *argv])
    if reuse and log_path.exists():
        log = json.loads(log_path.read_text())
        if log["command"] == command:
            print(f"reusing {log_path} ({log['timestamp']})", flush=True)
            return log
    # A process of its own: the CNN runs in float32, as the paper's TensorFlow model did.
    print(f"+ {command}", flush=True)
    done = subprocess.run([sys.executable, str(REPO / "examples" / "mnist_cnn.py"), *argv])
    if done.returncode != 0:
        raise SystemExit(f"examples/mnist_cnn.py exited with status {done.returncode}: {command}")
    return json.loads(log_path.read_text())


def mnist_section(args) -> dict:
    """Runs examples/mnist_cnn.py per optimizer and seed; summarizes each run's three modes.

    Each mode is compared with the plain run by the steps it needs to reach the plain run's
    smoothed training loss at half the horizon and at the horizon (:func:`_mnist_summary`).
    """
    configs, log = {}, None
    for optimizer in args.mnist_optimizers:
        for seed in args.mnist_seeds:
            output_dir = pathlib.Path(args.results_dir) / "mnist_cnn" / f"{optimizer}_seed{seed}"
            argv = _mnist_argv(args, optimizer, seed, output_dir)
            log = _mnist_log(argv, output_dir, args.mnist_reuse_logs)
            summary = _mnist_summary(log, min(MNIST_SMOOTHING, args.mnist_steps))
            configs[f"{optimizer}, seed {seed}"] = {"argv": argv, **summary}
    return {"configs": configs, "data": log["data"]}


# ------------------------------------------------------------------------------ output


def _fmt_steps(steps) -> str:
    return "not reached" if steps is None else f"{steps:,}"


def tables_markdown(results: dict, runs: dict) -> str:
    """The markdown tables of every section in ``results``; ``runs`` made each section."""
    lines = []
    for name, section in results.get("regression", {}).items():
        steps = runs["regression"]["config"]["steps"]  # the horizon of that section's run
        lines += [
            f"### Ethanol {name} (target = best depth-1 GD loss at step {steps:,}: "
            f"{section['target']:.6g})",
            "",
            "| method | best lr | final loss | steps to target | fastest on grid |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, s in section["methods"].items():
            lines.append(
                f"| {label} | {s['learning_rate']:.3g} | {s['final_loss']:.6g} | "
                f"{_fmt_steps(s['steps_to_target'])} | "
                f"{_fmt_steps(s['fastest_steps_to_target_any_lr'])} |"
            )
        lines += [
            "",
            "Explicit balanced depth-N networks (GD on the factors) vs the implicit rule, same lr:",
            "",
            "| depth | lr | explicit final loss | implicit final loss | max rel. gap of W_e |",
            "|---|---:|---:|---:|---:|",
        ]
        for depth, v in section["validation"].items():
            lines.append(
                f"| {depth} | {v['learning_rate']:.3g} | {v['explicit_final_loss']:.6g} | "
                f"{v['implicit_final_loss']:.6g} | {v['max_relative_gap']:.2e} |"
            )
        lines.append("")
    for name, rows in results.get("seeds", {}).items():
        depths = [k for k in rows[0] if k.startswith("depth ") and k != "depth 1"]
        lines += [
            f"### Ethanol {name}: steps to the depth-1 target, per init seed",
            "",
            "| seed | target | depth-1 lr | " + " | ".join(depths) + " |",
            "|---" * (3 + len(depths)) + "|",
        ]
        for row in rows:
            lines.append(
                f"| {row['seed']} | {row['target']:.5g} | {row['depth 1']['learning_rate']:.3g} | "
                + " | ".join(_fmt_steps(row[d]["steps_to_target"]) for d in depths)
                + " |"
            )
        lines.append("")
    if "mnist" in results:
        mnist = results["mnist"]
        lines += [
            f"### MNIST CNN ({mnist['data']['train']:,} train / {mnist['data']['test']:,} test "
            "digits)",
            "",
            f"Smoothed loss: the trailing {MNIST_SMOOTHING}-step mean of the minibatch training "
            "loss. \"Steps to plain@k\": steps until a run's smoothed loss first reaches the "
            "plain run's smoothed loss after k steps.",
            "",
        ]
        for config_name, config in mnist["configs"].items():
            ats = list(config["targets"])
            lines += [
                f"**{config_name}** (lr {config['learning_rate']:g}):",
                "",
                "| run | train loss (last 10% of steps) | "
                + " | ".join(f"steps to plain@{at}" for at in ats)
                + " | test accuracy | test loss | seconds |",
                "|---|---:|" + "---:|" * len(ats) + "---:|---:|---:|",
            ]
            for run_name, run in config["runs"].items():
                lines.append(
                    f"| {run_name} | {run['final_train_loss']:.4f} | "
                    + " | ".join(_fmt_steps(run["steps_to_plain_loss_at"][at]) for at in ats)
                    + f" | {run['test_accuracy']:.4f} | {run['test_loss']:.4f} | "
                    f"{run['seconds']:.0f} |"
                )
            lines.append("")
    return "\n".join(lines)


def plot_figures(results: dict, args) -> list[str]:
    """Draws every figure of the sections in ``results`` into --figures-dir; returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = pathlib.Path(args.figures_dir)
    figures.mkdir(parents=True, exist_ok=True)
    written = []
    regression = results.get("regression", {})

    def loss_axes(ax, title, ylabel="training loss"):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)

    def save(fig, name):
        fig.tight_layout()
        path = figures / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

    def curve_axes(ax, section, labels, title):
        for label in labels:
            s = section["methods"][label]
            steps = np.arange(len(s["curve"])) * s["curve_stride"]
            ax.plot(steps, s["curve"], label=f"{label} (lr {s['learning_rate']:.2g})")
        ax.axhline(section["target"], color="gray", linestyle=":", linewidth=1)
        loss_axes(ax, title)

    if regression:
        names = list(regression)
        panels = [
            ("depth", lambda: ["GD depth 1"] + [f"implicit depth {N}" for N in args.depths]),
            (
                "adaptive",
                lambda: (
                    ["GD depth 1", "AdaGrad depth 1", "AdaDelta depth 1", "Adam depth 1"]
                    + [
                        f"implicit depth {args.depths[-1]}",
                        f"Adam + implicit depth {args.depths[-1]}",
                    ]
                ),
            ),
            (
                "init",
                lambda: (
                    ["GD depth 1", "GD depth 1, near-zero init"]
                    + [f"implicit depth {N}, near-zero init" for N in args.depths]
                    + [f"explicit depth {N}, near-zero factors" for N in args.depths]
                ),
            ),
        ]
        for panel, labels in panels:
            fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.3), squeeze=False)
            for ax, name in zip(axes[0], names, strict=True):
                curve_axes(ax, regression[name], labels(), f"Ethanol {name} ({panel})")
            save(fig, f"ethanol_{panel}.png")
        # Validation: explicit vs implicit trajectories.
        fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.3), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            for i, (depth, v) in enumerate(regression[name]["validation"].items()):
                steps = np.arange(len(v["explicit_curve"])) * v["curve_stride"]
                ax.plot(steps, v["implicit_curve"], color=f"C{i}", label=f"implicit {depth}")
                ax.plot(
                    steps, v["explicit_curve"], color=f"C{i}", linestyle="--",
                    label=f"explicit {depth} (balanced init)",
                )  # fmt: skip
            loss_axes(ax, f"Ethanol {name}: explicit nets vs implicit rule")
        save(fig, "ethanol_validation.png")
    if "mnist" in results:
        configs = results["mnist"]["configs"]
        cols = min(2, len(configs))
        rows = -(-len(configs) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
        for ax in axes.flat[len(configs):]:
            ax.set_visible(False)
        for ax, (config_name, config) in zip(axes.flat, configs.items(), strict=False):
            for run_name, run in config["runs"].items():
                window, stride = run["smoothing_window"], run["smoothed_stride"]
                steps = window + np.arange(len(run["smoothed_train_loss"])) * stride
                ax.plot(steps, run["smoothed_train_loss"], label=run_name)
            for target in config["targets"].values():
                ax.axhline(target, color="gray", linestyle=":", linewidth=1)
            loss_axes(
                ax,
                f"MNIST CNN: {config_name}, lr {config['learning_rate']:g}",
                f"training loss ({window}-step trailing mean)",
            )
        save(fig, "mnist_cnn_loss.png")
    return written


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value and combination while parsing."""
    fv = flag_values
    positive = {"lower_bound": 1, "flag_values": fv}
    xflags.define_enum_list("sections", ",".join(SECTIONS), SECTIONS, "sections to run",
                            flag_values=fv)  # fmt: skip
    flags.DEFINE_string("data-dir", None, "gas-sensor folder (batchK.dat)", flag_values=fv)
    xflags.define_float_list("p", "4,2", "loss exponents", positive=True, flag_values=fv)
    xflags.define_int_list("depths", "2,3,4", "implicit depths N (depth 1 is the baseline of "
                           "every comparison)", lower_bound=2, flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("steps", 10_000, "GD steps", **positive)
    for name, default in (("lr-min", -5.0), ("lr-max", 0.0)):
        flags.DEFINE_float(name, default, "log10 of the grid's end", lower_bound=LR_EXPONENTS[0],
                           upper_bound=LR_EXPONENTS[1], flag_values=fv)  # fmt: skip
    xflags.require_ordered("lr-min", "lr-max", flag_values=fv)
    flags.DEFINE_integer("lr-per-decade", 4, "grid points per decade", upper_bound=100,
                         **positive)  # fmt: skip
    flags.DEFINE_float("init-scale", 0.05, "stddev of the initial w", lower_bound=1e-12,
                       upper_bound=10.0, flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("seed", 0, "initial w of the regression", lower_bound=0, flag_values=fv)
    xflags.define_int_list("seeds", "0,1,2,3,4", "seeds section", lower_bound=0, flag_values=fv)
    flags.DEFINE_string("mnist-data-dir", None, "MNIST folder", flag_values=fv)
    flags.DEFINE_integer("mnist-steps", 1000, "MNIST steps", **positive)
    flags.DEFINE_integer("mnist-batch-size", 50, "MNIST batch", **positive)
    xflags.define_enum_list("mnist-optimizers", "momentum,adam", MNIST_OPTIMIZERS,
                            "MNIST base optimizers", flag_values=fv)  # fmt: skip
    xflags.define_int_list("mnist-seeds", "0,1,2,3", "MNIST seeds", lower_bound=0, flag_values=fv)
    flags.DEFINE_boolean("mnist-reuse-logs", False, "summarize the logs of earlier runs with "
                         "the same command instead of re-running", flag_values=fv)  # fmt: skip
    flags.DEFINE_float("mnist-lr", None, "MNIST learning rate", lower_bound=1e-12,
                       upper_bound=1e3, flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("mnist-train-size", None, "first K training digits", **positive)
    flags.DEFINE_integer("mnist-dense-width", None, "for smoke tests", **positive)
    flags.DEFINE_integer("mnist-test-size", None, "first K test digits", **positive)
    xflags.define_output_dir("results-dir", str(REPO / "benchmarks" / "results"),
                             "JSON and tables", flag_values=fv)  # fmt: skip
    xflags.define_output_dir("figures-dir", str(REPO / "docs" / "figures"), "figures",
                             flag_values=fv)  # fmt: skip


def _merge_with_earlier_runs(path: pathlib.Path, results: dict, run: dict) -> dict:
    """The log of this run, keeping the sections of earlier runs that this one did not redo.

    The sections take very different times (minutes for the regression, an hour of CPU for
    the full MNIST run), so they are often run one at a time; each section keeps the command,
    configuration and environment of the run that produced it under ``runs``.
    """
    log = json.loads(path.read_text()) if path.exists() else {"results": {}, "runs": {}}
    for section in SECTIONS:
        if section in results:
            log["results"][section] = results[section]
            log["runs"][section] = run
    if "ethanol_rows" in results:
        log["results"]["ethanol_rows"] = results["ethanol_rows"]
    return log


def main(args) -> dict:
    """Runs the sections asked for (the regressions in float64); returns the merged log."""
    xflags.make_output_dir(args.results_dir, "results-dir")
    xflags.make_output_dir(args.figures_dir, "figures-dir")
    X = y = None
    if {"regression", "seeds"} & set(args.sections):
        data_dir = args.data_dir or data.default_data_dir("gas_sensor_drift")
        if data_dir is None:
            xflags.fail("data-dir", None, "no gas-sensor data: pass it or set OVERPARAM_DATA_DIR")
        try:
            X, y = data.ethanol_regression(data_dir)
        except data.DataError as error:
            xflags.fail("data-dir", data_dir, str(error))
        print(f"Ethanol: {X.shape[0]} rows (the paper: 2,565) from {data_dir}", flush=True)
    if "mnist" in args.sections and args.mnist_data_dir is None:
        args.mnist_data_dir = data.default_data_dir("mnist")
    with jax.enable_x64(True):  # the paper's regression runs are float64
        return _run_sections(args, X, y)


def _run_sections(args, X, y) -> dict:
    results: dict = {}
    learning_rates = training.log_grid(args.lr_min, args.lr_max, args.lr_per_decade)
    if X is not None:
        X, y = jnp.asarray(X), jnp.asarray(y)
        results["ethanol_rows"] = int(X.shape[0])
        if "regression" in args.sections:
            results["regression"] = regression_section(X, y, args, learning_rates)
        if "seeds" in args.sections:
            results["seeds"] = seeds_section(X, y, args, learning_rates)
    if "mnist" in args.sections:
        results["mnist"] = mnist_section(args)

    results_dir = pathlib.Path(args.results_dir)
    figures = plot_figures(results, args)
    run = {
        "command": " ".join(["python benchmarks/reproduce_paper.py", *sys.argv[1:]]),
        "config": {k: v for k, v in vars(args).items()},
        "learning_rates": learning_rates.tolist(),
        "environment": {**timing.environment(), "optax": optax.__version__, "x64": True},
        "figures": figures,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    log = _merge_with_earlier_runs(results_dir / "reproduce_paper.json", results, run)
    (results_dir / "reproduce_paper.json").write_text(json.dumps(log, indent=1, default=str))
    tables = tables_markdown(log["results"], log["runs"])
    (results_dir / "reproduce_paper_tables.md").write_text(tables)
    print("\n" + tables)
    return log


if __name__ == "__main__":
    xflags.run(define_flags, main)
