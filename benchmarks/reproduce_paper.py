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
import sys
import time

import jax
import jax.numpy as jnp
import optax
from absl import flags

import paper_report
import paper_sections
from overparam_experiments import data, timing, training
from overparam_experiments import flags as xflags
from paper_sections import MNIST_OPTIMIZERS

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("regression", "seeds", "mnist")
LR_EXPONENTS = (-10.0, 1.0)  # log10 range of the grid (as examples/lp_regression.py)


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
            results["regression"] = paper_sections.regression_section(X, y, args, learning_rates)
        if "seeds" in args.sections:
            results["seeds"] = paper_sections.seeds_section(X, y, args, learning_rates)
    if "mnist" in args.sections:
        results["mnist"] = paper_sections.mnist_section(args, REPO / "examples" / "mnist_cnn.py")

    results_dir = pathlib.Path(args.results_dir)
    figures = paper_report.plot_figures(results, args)
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
    tables = paper_report.tables_markdown(log["results"], log["runs"])
    (results_dir / "reproduce_paper_tables.md").write_text(tables)
    print("\n" + tables)
    return log


if __name__ == "__main__":
    xflags.run(define_flags, main)
