"""Explicit depth-N factorization vs the depth-1 model with overparam_precondition(N).

From the same end-to-end initialization, trains (1) the explicit factorized model with plain
full-batch gradient descent on every factor (balanced init, ``overparam_optax.factorized``;
the runs are ``overparam_experiments.trajectories.compare_trajectories``)
and (2) the ordinary model with ``optax.chain(overparam_precondition(N), optax.sgd(lr))``,
and reports per step the relative distance of the end-to-end matrices
``||W_e^explicit - W_e^implicit||_F / ||W_e^implicit||_F`` and both losses.

Tasks: the paper's Ethanol l2 and l4 linear regression (single output), softmax regression
on 2,000 MNIST digits (a 784 x 10 matrix), and a one-hidden-layer tanh MLP on the same
digits with both dense layers factorized. Each is run for several depths, for a base
learning rate and a quarter of it over the same horizon ``lr * steps`` (the gap should
shrink ~4x: GD on the factors is a first-order discretization of the same flow), and,
for the single-output tasks, for hidden widths 1, 32 and 100 (which must not matter).

Usage (from the repository root):

    python benchmarks/equivalence.py                   # full run, float64: ~5 CPU-minutes
    python benchmarks/equivalence.py --platform gpu    # the same on a GPU
    python benchmarks/equivalence.py --quick           # CI-sized smoke run (seconds)

Writes ``benchmarks/results/equivalence_<platform>[_float32][_quick].json`` (device, jax
version, the exact command, and per run the summary plus the per-step curves subsampled to
at most 400 points) and ``docs/figures/equivalence_<platform>....png``; see
docs/equivalence.md.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import shlex
import sys
import time
from types import SimpleNamespace

import numpy as np
from absl import flags

import equivalence_grid
from overparam_experiments import flags as xflags

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = ("ethanol_l2", "ethanol_l4", "mnist_softmax", "mnist_mlp")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value (and reads --replot's JSON) while parsing."""
    fv = flag_values
    flags.DEFINE_enum("platform", None, xflags.PLATFORMS,
                      "the jax platform (default: jax's own choice)", flag_values=fv)
    flags.DEFINE_boolean("float32", False, "run in float32 (default: float64 via x64)",
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("quick", False, "tiny CI-sized smoke run", flag_values=fv)
    flags.DEFINE_string("data-dir", None, "folder with the gas-sensor batchK.dat files "
                        "(default: shared/data/gas_sensor_drift)", flag_values=fv)  # fmt: skip
    flags.DEFINE_string("mnist-dir", None, "folder with the MNIST IDX files (default: shared)",
                        flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("synthetic", False, "use random data of the same shapes instead of "
                         "the data sets (for CI without data)", flag_values=fv)  # fmt: skip
    xflags.define_enum_list("tasks", ",".join(TASKS), TASKS, "subset of the tasks",
                            flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("seed", 0, "initial weights", lower_bound=0, flag_values=fv)
    xflags.define_output_file("out-json", None, "JSON path (default: see module doc)",
                              flag_values=fv)  # fmt: skip
    xflags.define_output_file("out-png", None, "plot path (default: see module doc)",
                              flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("no-plot", False, "skip the PNG", flag_values=fv)
    flags.DEFINE_string("replot", None, "only redraw the PNG from a results JSON",
                        flag_values=fv)  # fmt: skip
    flags.register_validator("replot", _replot_problem, flag_values=fv)


def _replot_problem(path) -> bool:
    """--replot must name a results JSON of this benchmark (read once here, while parsing)."""
    if path is None:
        return True
    try:
        report = json.loads(pathlib.Path(path).read_text())
    except OSError as error:
        raise flags.ValidationError(f"cannot read it ({error.strerror or error})") from None
    except ValueError as error:
        raise flags.ValidationError(f"is not valid JSON ({error})") from None
    if not isinstance(report, dict) or not {"runs", "device", "dtype"} <= set(report):
        raise flags.ValidationError("is not a results JSON of this benchmark")
    return True

def main(args) -> dict:
    """Runs the grid (float64 unless --float32); writes and returns the report."""
    if args.replot:
        report = json.loads(pathlib.Path(args.replot).read_text())
        out_png = pathlib.Path(args.out_png or pathlib.Path(args.replot).with_suffix(".png"))
        equivalence_grid.plot(report["runs"], out_png, equivalence_grid.title(report))
        print(f"wrote {out_png}")
        return report
    import jax

    xflags.setup_platform(SimpleNamespace(platform=args.platform, blas_threads=0))
    report = run(args)
    platform_name = jax.devices()[0].platform
    suffix = platform_name + ("_float32" if args.float32 else "") + ("_quick" if args.quick else "")
    out_json = pathlib.Path(
        args.out_json or REPO / "benchmarks" / "results" / f"equivalence_{suffix}.json"
    )
    out_png = pathlib.Path(args.out_png or REPO / "docs" / "figures" / f"equivalence_{suffix}.png")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(equivalence_grid.dump(report) + "\n")
    print(f"wrote {out_json}")
    if not args.no_plot:
        equivalence_grid.plot(report["runs"], out_png, equivalence_grid.title(report))
        print(f"wrote {out_png}")
    return report


def run(args) -> dict:
    """Runs the grid in float64 (float32 with ``args.float32``); returns the report.

    Args:
      args: the values of :func:`define_flags` (``xflags.parse(define_flags, argv)``).

    Returns:
      The report: every run's trajectory gaps and losses, the stress run, the device and
      the versions.
    """
    import jax

    with jax.enable_x64(not args.float32):
        return _run_all(args)


def _run_all(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    dtype = jnp.float32 if args.float32 else jnp.float64
    script = os.path.relpath(pathlib.Path(__file__).resolve(), pathlib.Path.cwd())
    command = shlex.join(["python", script, *sys.argv[1:]])
    grid = equivalence_grid.grid(args.quick)
    started = time.perf_counter()
    results = []
    print(f"device: {jax.devices()[0]}  dtype: {jnp.dtype(dtype).name}  jax {jax.__version__}")
    header = (
        f"{'task':<14} {'N':>2} {'lr':>9} {'steps':>6} {'hidden':>7} {'final gap':>10} "
        f"{'max gap':>10} {'loss expl.':>12} {'loss impl.':>12} {'balanced.':>9} {'s':>6}"
    )
    print(header)
    for task in equivalence_grid.tasks(args, jax, jnp, optax, dtype):
        for depth, lr, steps, hidden in equivalence_grid.runs_for(task["name"], grid):
            r = equivalence_grid.run_one(task, depth, lr, steps, hidden, args.seed, jax)
            r["init"], r["data"] = task["init"], task["data"]
            results.append(r)
            hidden_txt = "min" if hidden is None else str(hidden)
            print(
                f"{r['task']:<14} {depth:>2} {lr:>9.3g} {steps:>6} {hidden_txt:>7} "
                f"{r['final_gap']:>10.3e} {r['max_gap'] or float('nan'):>10.3e} "
                f"{r['final_explicit_loss']:>12.6f} {r['final_implicit_loss']:>12.6f} "
                f"{r['final_balancedness']:>9.2e} {r['seconds']:>6.1f}",
                flush=True,
            )
    # The small-step assumption, violated on purpose: another 0.05 N(0,1) draw on Ethanol l4,
    # one whose predictions hit the heavy-tailed rows (initial loss ~157).
    stress = None
    if not args.quick and "ethanol_l4" in args.tasks:
        from overparam_experiments.training import lp_regression_loss
        from overparam_experiments.trajectories import compare_trajectories

        X, y, _ = equivalence_grid.load_ethanol(args)
        X, y = jnp.asarray(X, dtype), jnp.asarray(y, dtype)
        w0 = 0.05 * jax.random.normal(jax.random.PRNGKey(args.seed), (X.shape[1], 1), dtype)
        cmp = compare_trajectories(
            lambda q: lp_regression_loss(q["w"]["kernel"], X, y, 4),
            {"w": {"kernel": w0}},
            3,
            3e-4,
            50,
            hidden=1,
        )
        bad = np.flatnonzero(~np.isfinite(cmp.implicit_loss))
        stress = {
            "what": "ethanol_l4, W_e = 0.05 N(0,1) (key PRNGKey(seed)), N=3, lr=3e-4, 50 steps",
            "initial_loss": float(cmp.explicit_loss[0]),
            "gap_first_steps": equivalence_grid.finite_list(cmp.gap[:6]),
            "explicit_loss_first_steps": equivalence_grid.finite_list(cmp.explicit_loss[:6]),
            "implicit_loss_first_steps": equivalence_grid.finite_list(cmp.implicit_loss[:6]),
            "implicit_nonfinite_from_step": int(bad[0]) if bad.size else None,
            "explicit_final_loss": float(cmp.explicit_loss[-1]),
        }
        print(f"stress (outside the small-step regime): {stress}")

    total = time.perf_counter() - started
    report = {
        "benchmark": "equivalence",
        "command": command,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": jnp.dtype(dtype).name,
        "quick": args.quick,
        "synthetic": args.synthetic,
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": getattr(__import__("jaxlib"), "__version__", None),
            "optax": optax.__version__,
            "flax": __import__("flax").__version__,
            "numpy": np.__version__,
        },
        "device": equivalence_grid.device_info(),
        "total_seconds": total,
        "gap_definition": "||W_e^explicit - W_e^implicit||_F / ||W_e^implicit||_F over all "
        "factorized kernels, at the parameters before each update",
        "runs": results,
        "stress": stress,
    }
    print(f"total {total:.1f} s")
    return report


if __name__ == "__main__":
    xflags.run(define_flags, main)
