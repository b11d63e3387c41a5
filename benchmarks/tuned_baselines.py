r"""Depth against tuned baselines, in steps and in wall-clock time (issue 13, parts 2-4).

Sections (``--section``, one per call; results of earlier sections are kept):

* ``ethanol`` (part 3) — Ethanol l4 regression (the paper's task as in
  ``reproduce_paper.py``: 128 standardized features, full batch, float64, 10,000 steps).
  Depth-N GD (``overparam_precondition(N)`` + SGD, N = 3 by default) against GD, AdaGrad,
  AdaDelta, Adam and Adam + depth (``optax.chain(overparam_precondition(N),
  optax.adam(lr))``), from w ~ 0.05 N(0, 1) and from near zero (w ~ 1e-3 N(0, 1)), for
  ``--seeds`` (the seed draws the initial w; the data and the full-batch updates are
  deterministic, so the init is all it varies). Every method, seed and init gets its own
  learning-rate search: a quarter-decade grid (10^-5 .. 1), then eighth-decade points
  around the largest stable learning rate (the stability edge) and around the best one.
  Targets: T1 = the best depth-1 GD loss at the horizon (the paper's metric), T2 = the
  best depth-N GD loss. Each method is scored at its fastest stable learning rate for
  each target; wall-clock = steps x the method's measured seconds per step.
* ``fig5`` (part 4, the paper's Figure 5-left) — the same task with explicit deep linear
  networks (hidden width 128, so that the identity is square) started near zero
  (factors ~ 0.01 N(0, 1)) or near the identity (factors ~ I + 0.01 N(0, 1), the last one
  e_1 + 0.01 N(0, 1)), trained by GD on the factors; the implicit rule and depth-1 GD
  start from the same end-to-end vector. The paper's imbalance delta of the last factor
  pair is O(stddev^2) near zero (about 0.2 here) and about sqrt(127) near the identity
  (I against the rank-1 e_1 e_1^T).
* ``mnist`` (part 2) — the MNIST CNN of ``examples/mnist_cnn.py`` with momentum SGD, best
  against best. Phase 1 tunes the learning rate of plain and of implicit depth 2 (the
  method of ``--mnist-method``, by default the library's tracked default; the committed
  record ran version 0.1's ``method="auto", precondition_every=10``, since removed) on a
  grid (``--mnist-lrs``, extended until its top no longer trains, or the best is interior)
  over the first ``--mnist-tune-seeds`` seeds. Phase 2 runs each mode's best rate on the
  remaining seeds, a control that multiplies only the dense kernels' learning rate by c at
  plain's best rate (first ``--mnist-control-seeds`` seeds), the explicit
  2-factor network at the implicit best rate (first ``--mnist-explicit-seeds`` seeds), and
  the exact path (SVD every step) at the implicit best rate (first ``--mnist-exact-seeds``
  seeds) to check the fast path. Runs are trained by
  ``--mnist-workers`` single-threaded processes side by side; wall-clock times to targets
  are steps times seconds per step measured interleaved in the main process, with jax's
  default threading (what users run). Each run writes its own JSON under
  ``<results-dir>/tuned_mnist/`` and is skipped when that file exists with the same
  configuration, so the section resumes after an interruption.

Writes ``benchmarks/results/tuned_baselines.json`` and figures in ``docs/figures/``. The
harness lives beside it in ``benchmarks/``: ``tuning`` (grids, stability, intervals),
``tuned_regression`` (ethanol, fig5), ``tuned_mnist`` and ``tuned_report`` (tables,
figures); this script holds the command line and the record.

Examples (``--section tables`` redraws tables and figures from the JSON)::

  python benchmarks/tuned_baselines.py --section ethanol   # ~30 min on 2 shared cores
  python benchmarks/tuned_baselines.py --section fig5      # ~35 min
  python benchmarks/tuned_baselines.py --section mnist --estimate -1   # hours, from logs
  python benchmarks/tuned_baselines.py --section mnist     # ~2 h on 2 cores, resumable
  python benchmarks/tuned_baselines.py --section mnist --smoke --mnist-data-dir DIR
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from absl import flags

from overparam_experiments import flags as xflags

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("ethanol", "fig5", "mnist")
RESULTS_NAME = "tuned_baselines.json"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value and combination while parsing."""
    _define_regression_flags(flag_values)
    _define_mnist_flags(flag_values)
    fv = flag_values
    flags.DEFINE_enum("section", None, (*SECTIONS, "tables"), "the section to run; 'tables' "
                      "redraws the tables and figures from the JSON", flag_values=fv)
    flags.mark_flag_as_required("section", flag_values=fv)
    flags.DEFINE_integer("estimate", 0, "mnist: time this many steps per mode and estimate the "
                         "section's hours (also from earlier logs); -1: from the logs only. "
                         "Trains nothing; the hours are for one process (--mnist-workers not "
                         "counted)", lower_bound=-1, flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("smoke", False, "mnist: 2 tiny runs (plain, implicit) to check the "
                         "pipeline", flag_values=fv)  # fmt: skip
    xflags.define_output_dir("results-dir", str(REPO / "benchmarks" / "results"),
                             "JSON and tables", flag_values=fv)  # fmt: skip
    xflags.define_output_dir("figures-dir", str(REPO / "docs" / "figures"), "figures",
                             flag_values=fv)  # fmt: skip


def _define_regression_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("data-dir", None, "gas-sensor folder (batchK.dat)", flag_values=fv)
    flags.DEFINE_integer("steps", 10_000, "GD steps", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("depth", 3, "N of depth-N GD (ethanol)", lower_bound=2, flag_values=fv)
    xflags.define_int_list("fig5-depths", "2,3", "depths of the fig5 networks", lower_bound=2,
                           flag_values=fv)  # fmt: skip
    xflags.define_int_list("seeds", "0,1,2,3,4", "seeds", lower_bound=0, flag_values=fv)
    flags.DEFINE_float("init-scale", 0.05, "stddev of the initial w", lower_bound=1e-12,
                       upper_bound=10.0, flag_values=fv)  # fmt: skip
    for name, default, end in (("lr-min", -5.0, "lowest"), ("lr-max", 0.0, "highest")):
        flags.DEFINE_float(name, default, f"log10 of the {end} lr", lower_bound=-10.0,
                           upper_bound=1.0, flag_values=fv)  # fmt: skip
    xflags.require_ordered("lr-min", "lr-max", strict=True, flag_values=fv)
    flags.DEFINE_integer("timing-steps", 2000, "steps of the step-time measurement",
                         lower_bound=1, flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("retime", False, "ethanol: re-measure seconds per step of the stored "
                         "results", flag_values=fv)  # fmt: skip


def _define_mnist_flags(fv: flags.FlagValues) -> None:
    positive = {"lower_bound": 1, "flag_values": fv}
    flags.DEFINE_string("mnist-data-dir", None, "MNIST folder", flag_values=fv)
    flags.DEFINE_integer("mnist-steps", 2000, "steps per run", **positive)
    flags.DEFINE_integer("mnist-batch-size", 64, "64 in the tutorial", **positive)
    xflags.define_float_list("mnist-lrs", "0.01,0.02,0.04,0.08", "the lr grid", positive=True,
                             flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("mnist-max-extensions", 2, "grid points added per mode when the grid "
                         "misses the edge", lower_bound=0, flag_values=fv)  # fmt: skip
    xflags.define_float_list("mnist-multipliers", "2,4", "dense-lr control", positive=True,
                             flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("mnist-tune-seeds", 3, "seeds of the lr grids; the best lr of each "
                         "mode gets all --seeds", **positive)  # fmt: skip
    flags.DEFINE_integer("mnist-control-seeds", 3, "seeds of the dense-lr control", **positive)
    flags.DEFINE_integer("mnist-explicit-seeds", 3, "seeds of the explicit 2-factor network",
                         **positive)  # fmt: skip
    flags.DEFINE_integer("mnist-exact-seeds", 1, "seeds of the exact path (SVD every step)",
                         **positive)  # fmt: skip
    flags.DEFINE_integer("mnist-workers", 2, "single-threaded training processes side by side",
                         **positive)  # fmt: skip
    flags.DEFINE_integer("mnist-timing-windows", 10, "interleaved windows of the step-time "
                         "measurement", **positive)  # fmt: skip
    flags.DEFINE_enum("mnist-method", "tracked", ("tracked", "svd", "eigh", "newton"),
                      "implicit mode's fast path", flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("mnist-every", 10, "steps per window of the step-time measurement "
                         "(the fast path has no recomputation interval since 0.2; the record "
                         "still tags its runs with this value)", **positive)  # fmt: skip
    flags.DEFINE_integer("mnist-dense-width", 512, "dense width of the CNN", **positive)
    flags.DEFINE_integer("mnist-train-size", None, "first K training digits", **positive)
    flags.DEFINE_integer("mnist-test-size", None, "first K test digits", **positive)


def apply_smoke(args):
    """--smoke: one seed, one rate, a tiny network and data set."""
    if args.smoke:
        args.seeds, args.mnist_lrs = args.seeds[:1], args.mnist_lrs[:1]
        args.mnist_steps, args.mnist_batch_size, args.mnist_dense_width = 3, 8, 16
        args.mnist_train_size, args.mnist_test_size = 48, 20
    return args


def parse_args(argv=()):
    """The parsed flags of ``argv`` (for tests and for calling the sections from Python)."""
    return apply_smoke(xflags.parse(define_flags, argv))


def main(args) -> None:
    """Runs one section (or redraws the tables) and merges it into the results JSON."""
    args = apply_smoke(args)
    results_dir = xflags.make_output_dir(args.results_dir, "results-dir")
    figures_dir = xflags.make_output_dir(args.figures_dir, "figures-dir")
    path = results_dir / RESULTS_NAME
    if args.section == "tables" or args.retime:
        if not path.is_file():
            xflags.fail("results-dir", args.results_dir, f"has no {RESULTS_NAME} to redraw")
        redraw(args, path, results_dir, figures_dir)
        return
    run_section(args, path, results_dir, figures_dir)


def redraw(args, path, results_dir, figures_dir) -> dict:
    """--section tables: tables and figures from the JSON; --retime: new step times too."""
    import tuned_report

    log = json.loads(path.read_text())
    if args.retime:
        import jax

        import tuned_regression

        with jax.enable_x64(True):
            X, y = tuned_regression.load_ethanol(args)
            tuned_regression.time_ethanol(log["results"]["ethanol"], X, y, args)
        log["runs"]["ethanol"]["retimed"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        path.write_text(json.dumps(log, indent=1, default=str))
    else:
        tuned_report.plot(log["results"], figures_dir)
    (results_dir / "tuned_baselines_tables.md").write_text(
        tuned_report.tables_markdown(log["results"])
    )
    return log


def run_section(args, path, results_dir, figures_dir) -> dict:
    """Runs ``--section`` and merges its results (and its run record) into the JSON."""
    import jax
    import optax

    import tuned_mnist
    import tuned_regression
    import tuned_report
    from overparam_experiments import timing

    start = time.perf_counter()
    command = " ".join(["python benchmarks/tuned_baselines.py", *sys.argv[1:]])
    if args.section in ("ethanol", "fig5"):
        with jax.enable_x64(True):  # the paper's regression is float64
            section = getattr(tuned_regression, f"{args.section}_section")(args)
    else:
        section = tuned_mnist.mnist_section(args)
    if args.estimate:  # a timing, kept apart from the results
        section["command"] = command
        section["load_average_at_end"] = list(os.getloadavg())
        section["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        (results_dir / "tuned_mnist_estimate.json").write_text(json.dumps(section, indent=1))
        return {"results": {args.section: section}}
    if args.smoke:  # never overwrite real results with a check
        print(json.dumps(section, indent=1, default=str))
        return {"results": {args.section: section}}
    log = json.loads(path.read_text()) if path.exists() else {"results": {}, "runs": {}}
    log["results"][args.section] = section
    figures = tuned_report.plot(log["results"], figures_dir)
    log["runs"][args.section] = {
        "command": command,
        "config": dict(vars(args)),
        "environment": {**timing.environment(), "optax": optax.__version__,
                        "load_average_at_end": list(os.getloadavg())},  # fmt: skip
        "wall_seconds": time.perf_counter() - start,
        "figures": figures,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path.write_text(json.dumps(log, indent=1, default=str))
    tables = tuned_report.tables_markdown(log["results"])
    (results_dir / "tuned_baselines_tables.md").write_text(tables)
    print(tables + f"\nwrote {path} and {figures}", flush=True)
    return log


if __name__ == "__main__":
    xflags.run(define_flags, main)
