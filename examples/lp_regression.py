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
:func:`overparam_optax.experiments.data.default_data_dir`
(``$OVERPARAM_DATA_DIR/gas_sensor_drift`` or this checkout's
``../shared/data/gas_sensor_drift``).

Writes ``<output-dir>/lp_regression.json`` and ``<output-dir>/lp_regression.png``.
Runs in float64 (``main`` turns jax's x64 mode on for its duration).
``benchmarks/reproduce_paper.py`` runs the full set of the paper's figures.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import overparam_optax as opx
from overparam_optax.experiments import cli, data, training


def implicit_gd(N: int):
    """``make_optimizer(lr)`` for plain GD (N = 1) or GD along the depth-N dynamics."""
    if N == 1:
        return optax.sgd
    return lambda lr: optax.chain(opx.overparam_precondition(N), optax.sgd(lr))


def make_parser() -> argparse.ArgumentParser:
    """The command line; every value is checked here, before any work."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder with the batchK.dat files")
    parser.add_argument(
        "--p", type=cli.comma_list(cli.positive_float), default="2,4",
        help="comma list of loss exponents",
    )  # fmt: skip
    parser.add_argument(
        "--depths", type=cli.comma_list(cli.positive_int), default="2,3,4",
        help="comma list of implicit depths N",
    )  # fmt: skip
    parser.add_argument("--steps", type=cli.positive_int, default=10_000)
    parser.add_argument(
        "--lr-min", type=cli.finite_float, default=-5.0, help="log10 of the smallest lr"
    )
    parser.add_argument(
        "--lr-max", type=cli.finite_float, default=0.0, help="log10 of the largest lr"
    )
    parser.add_argument("--lr-per-decade", type=cli.positive_int, default=4)
    parser.add_argument("--init-scale", type=cli.positive_float, default=0.05)
    parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
    parser.add_argument("--output-dir", type=cli.output_dir, default="lp_regression_results")
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parses and checks the command line (exit status 2 with a message on a bad value)."""
    parser = parser or make_parser()
    args = parser.parse_args(argv)
    cli.require_ordered(parser, args.lr_min, args.lr_max, "--lr-min", "--lr-max")
    return args


def main(argv=None) -> dict:
    """Runs the comparison in float64; returns the JSON log (also written to --output-dir)."""
    parser = make_parser()
    args = parse_args(argv, parser)
    data_dir = args.data_dir or data.default_data_dir("gas_sensor_drift")
    if data_dir is None:
        parser.error(
            "no gas-sensor data found: pass --data-dir <folder with batch1.dat ...> or set "
            "OVERPARAM_DATA_DIR to a folder holding gas_sensor_drift/"
        )
    try:
        X, y = data.ethanol_regression(data_dir)
    except data.DataError as error:
        parser.error(f"--data-dir: {error}")
    with jax.enable_x64(True):  # the paper's regression runs are float64
        return _run(args, data_dir, X, y, argv)


def _run(args, data_dir, X, y, argv) -> dict:
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

    output_dir = pathlib.Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log = {
        "command": " ".join(["python examples/lp_regression.py", *(argv or sys.argv[1:])]),
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
    main()
