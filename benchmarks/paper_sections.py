"""The sections of ``benchmarks/reproduce_paper.py``: the paper's regression, seeds, MNIST.

``regression_section``: Ethanol l_p regression, depth-1 GD against the implicit depth-N
rule, explicit deep linear networks and Adam (with and without depth), each at its best
learning rate on one grid. ``seeds_section``: the l4 comparison over several initial
draws. ``mnist_section``: the paper's CNN by ``examples/mnist_cnn.py`` in a subprocess per
optimizer and seed. The benchmark's docstring describes them; tables and figures are
:mod:`paper_report`.
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

import overparam_optax as opx
from overparam_experiments import training
from overparam_experiments.trajectories import compare_trajectories
from overparam_optax import factorized

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
        "--method", "svd",  # the exact rule, as in the recorded runs (docs/reproduction.md)
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


def _mnist_log(example: pathlib.Path, argv: list[str], output_dir: pathlib.Path,
               reuse: bool) -> dict:  # fmt: skip
    """Runs the example in a subprocess (or, with ``reuse``, reads the log an identical
    earlier run wrote) and returns its log."""
    log_path = output_dir / "mnist_cnn.json"
    command = " ".join(["python examples/mnist_cnn.py", *argv])
    # The recorded logs were written when svd was the example's default: the same run
    # without "--method svd" on its command line.
    implied_svd = command.replace(" --method svd", "")
    if reuse and log_path.exists():
        log = json.loads(log_path.read_text())
        if log["command"] == command or (
            log["command"] == implied_svd and log["config"]["method"] == "svd"
        ):
            print(f"reusing {log_path} ({log['timestamp']})", flush=True)
            return log
    # A process of its own: the CNN runs in float32, as the paper's TensorFlow model did.
    print(f"+ {command}", flush=True)
    done = subprocess.run([sys.executable, str(example), *argv])
    if done.returncode != 0:
        raise SystemExit(f"examples/mnist_cnn.py exited with status {done.returncode}: {command}")
    return json.loads(log_path.read_text())


def mnist_section(args, example: pathlib.Path) -> dict:
    """Runs ``example`` (examples/mnist_cnn.py) per optimizer and seed; summarizes each run's
    three modes.

    Each mode is compared with the plain run by the steps it needs to reach the plain run's
    smoothed training loss at half the horizon and at the horizon (``_mnist_summary``).
    """
    configs, log = {}, None
    for optimizer in args.mnist_optimizers:
        for seed in args.mnist_seeds:
            output_dir = pathlib.Path(args.results_dir) / "mnist_cnn" / f"{optimizer}_seed{seed}"
            argv = _mnist_argv(args, optimizer, seed, output_dir)
            log = _mnist_log(example, argv, output_dir, args.mnist_reuse_logs)
            summary = _mnist_summary(log, min(MNIST_SMOOTHING, args.mnist_steps))
            configs[f"{optimizer}, seed {seed}"] = {"argv": argv, **summary}
    return {"configs": configs, "data": log["data"]}


