r"""Ethanol l_p regression: plain gradient descent vs the implicit depth-N update.

The linear-regression experiment of Arora, Cohen & Hazan (ICML 2018): predict the Ethanol
concentration from the 128 features of the UCI gas-sensor drift data (standardized), with
the loss mean (1/p)|x^T w - y|^p, by full-batch gradient descent. Depth 1 is plain GD on w;
depth N >= 2 is ``optax.chain(overparam_precondition(N), optax.sgd(lr))``, the end-to-end
dynamics of a depth-N linear network. Every method gets its own best learning rate on one
shared log grid (the lowest final loss wins), and starts from the same w ~ init_scale *
N(0, 1). The paper finds depth accelerating l4 regression and doing nothing for l2.

Examples::

  python examples/lp_regression.py --data-dir ../shared/data/gas_sensor_drift
  python examples/lp_regression.py --p 4 --depths 2 --steps 2000 --seed 1

With no ``--data-dir`` the data folder is looked up with
:func:`overparam_experiments.data.default_data_dir`
(``$OVERPARAM_DATA_DIR/gas_sensor_drift`` or this checkout's
``../shared/data/gas_sensor_drift``).

Writes ``<output-dir>/lp_regression.json`` and ``<output-dir>/lp_regression.png``.
Runs in float64 (``main`` turns jax's x64 mode on for its duration).
``benchmarks/reproduce_paper.py`` runs the full set of the paper's figures.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

import overparam_optax as opx
from overparam_experiments import data, training
from overparam_experiments import flags as xflags

# log10 of the learning rates the grid may span: beyond 10 every run here diverges, and
# below 1e-10 none moves in 10^4 steps.
LR_EXPONENTS = (-10.0, 1.0)


def implicit_gd(N: int):
    """``make_optimizer(lr)`` for plain GD (N = 1) or GD along the depth-N dynamics."""
    if N == 1:
        return optax.sgd
    return lambda lr: optax.chain(opx.overparam_precondition(N), optax.sgd(lr))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value and combination while parsing."""
    fv = flag_values
    flags.DEFINE_string("data-dir", None, "folder with the batchK.dat files", flag_values=fv)
    xflags.define_float_list("p", "2,4", "loss exponents", positive=True, flag_values=fv)
    xflags.define_int_list("depths", "2,3,4", "implicit depths N", lower_bound=2, flag_values=fv)
    flags.DEFINE_integer("steps", 10_000, "GD steps", lower_bound=1, flag_values=fv)
    flags.DEFINE_float(
        "lr-min", -5.0, "log10 of the smallest lr", lower_bound=LR_EXPONENTS[0],
        upper_bound=LR_EXPONENTS[1], flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_float(
        "lr-max", 0.0, "log10 of the largest lr", lower_bound=LR_EXPONENTS[0],
        upper_bound=LR_EXPONENTS[1], flag_values=fv,
    )  # fmt: skip
    xflags.require_ordered("lr-min", "lr-max", flag_values=fv)
    flags.DEFINE_integer("lr-per-decade", 4, "grid points per decade", lower_bound=1,
                         upper_bound=100, flag_values=fv)  # fmt: skip
    flags.DEFINE_float(
        "init-scale", 0.05, "stddev of the initial w", lower_bound=1e-12, upper_bound=10.0,
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer("seed", 0, "draws the initial w", lower_bound=0, flag_values=fv)
    xflags.define_output_dir(
        "output-dir", "lp_regression_results", "where the JSON and the plot go", flag_values=fv
    )


def main(args) -> dict:
    """Runs the comparison in float64; returns the JSON log (also written to --output-dir)."""
    data_dir = args.data_dir or data.default_data_dir("gas_sensor_drift")
    if data_dir is None:
        xflags.fail(
            "data-dir", None, "no gas-sensor data found: pass the folder with batch1.dat ... "
            "or set OVERPARAM_DATA_DIR to a folder holding gas_sensor_drift/",
        )  # fmt: skip
    try:
        X, y = data.ethanol_regression(data_dir)
    except data.DataError as error:
        xflags.fail("data-dir", data_dir, str(error))
    output_dir = xflags.make_output_dir(args.output_dir)
    with jax.enable_x64(True):  # the paper's regression runs are float64
        return _run(args, data_dir, X, y, output_dir)


def _run(args, data_dir, X, y, output_dir) -> dict:
    X, y = jnp.asarray(X), jnp.asarray(y)
    w0 = args.init_scale * jax.random.normal(jax.random.PRNGKey(args.seed), (X.shape[1], 1))
    learning_rates = training.log_grid(args.lr_min, args.lr_max, args.lr_per_decade)
    print(
        f"Ethanol regression: {X.shape[0]} rows x {X.shape[1]} features from {data_dir} "
        f"(the full data set has 2,565 rows); {args.steps} steps, {len(learning_rates)} "
        f"learning rates 1e{args.lr_min:g}..1e{args.lr_max:g}, seed {args.seed}",
        flush=True,
    )

    results = {}
    for p in args.p:
        loss_fn = lambda w, p=p: training.lp_regression_loss(w, X, y, p)  # noqa: E731
        curves = {}
        for N in [1, *args.depths]:
            search = training.grid_search(loss_fn, w0, implicit_gd(N), learning_rates, args.steps)
            curves[N] = search
        _require_a_finite_run(curves, p, args)
        target = curves[1].best_final_loss
        rows = {}
        print(f"\nl{p:g} loss; target = best depth-1 loss at step {args.steps}: {target:.6g}")
        print(f"{'depth':>6}{'best lr':>12}{'final loss':>14}{'steps to target':>17}")
        for N, search in curves.items():
            steps = training.steps_to_reach(search.best_losses, target)
            rows[N] = {
                "learning_rate": search.best_learning_rate,
                "final_loss": search.best_final_loss,
                "steps_to_target": steps,
                "losses": search.best_losses.tolist(),
            }
            print(
                f"{N:>6}{search.best_learning_rate:>12.3g}{search.best_final_loss:>14.6g}"
                f"{'-' if steps is None else steps:>17}"
            )
        results[f"l{p:g}"] = {"target": target, "depths": rows}

    log = {
        "command": " ".join(["python examples/lp_regression.py", *sys.argv[1:]]),
        "config": {k: (str(v) if k == "data_dir" else v) for k, v in vars(args).items()},
        "rows": int(X.shape[0]),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "results": results,
    }
    (output_dir / "lp_regression.json").write_text(json.dumps(log, indent=1))
    _plot(results, output_dir / "lp_regression.png")
    print(f"\nwrote {output_dir / 'lp_regression.json'} and {output_dir / 'lp_regression.png'}")
    return log


def _require_a_finite_run(curves: dict, p: float, args) -> None:
    """Exits (status 1) when every learning rate of a depth diverged: no result to report."""
    diverged = [N for N, search in curves.items() if not np.isfinite(search.best_final_loss)]
    if diverged:
        sys.exit(
            f"l{p:g} loss: every learning rate in 1e{args.lr_min:g}..1e{args.lr_max:g} diverged "
            f"for depths {diverged} (from --init-scale {args.init_scale:g}); lower --lr-max "
            "or --init-scale"
        )


def _plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        for N, row in result["depths"].items():
            label = "depth 1 (GD)" if N == 1 else f"implicit depth {N}"
            ax.plot(np.asarray(row["losses"]), label=f"{label}, lr {row['learning_rate']:.2g}")
        ax.axhline(result["target"], color="gray", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"Ethanol, {name} loss")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    xflags.run(define_flags, main)
