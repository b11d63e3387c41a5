"""The library's default against the exact rule on the transformer of docs/transformer.md.

``benchmarks/transformer_lm.py`` measured the preconditioned modes with the exact rule
(``method="svd"``, a thin SVD of every matrix on every update). This runs the same two
modes, ``adamw+overparam`` and ``momentum+overparam``, at the rates that benchmark chose,
once with the library's default (the tracked basis) and once with the exact rule, on the
same seeds, initial weights and minibatches (one call of ``examples/transformer_lm.py``
per seed and method), and compares their validation curves: the final loss of each, their
difference, the largest difference anywhere on the curve, and how many of the default's
matrix updates decomposed W afresh.

    python benchmarks/transformer_default.py     # ~7 minutes on 2 cores

Writes ``<results-dir>/transformer_default_cpu.json`` and prints the table that
docs/transformer.md quotes.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

from absl import flags

from overparam_experiments import flags as xflags

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "transformer_lm.py"
RESULTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MODES = ("adamw+overparam", "momentum+overparam")
METHODS = ("tracked", "svd")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line (absl; every value checked while parsing)."""
    fv = flag_values
    xflags.define_int_list("seeds", "0,1,2", "seeds (init and minibatch order)", lower_bound=0,
                           flag_values=fv)  # fmt: skip
    flags.DEFINE_float("lr-adamw-overparam", 0.003, "adamw+overparam's rate (the one "
                       "transformer_lm.py chose)", lower_bound=1e-12, flag_values=fv)  # fmt: skip
    flags.DEFINE_float("lr-momentum-overparam", 0.1, "momentum+overparam's rate (the one "
                       "transformer_lm.py chose)", lower_bound=1e-12, flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("steps", 400, "training steps (transformer_lm.py's)", lower_bound=1,
                         flag_values=fv)  # fmt: skip
    xflags.define_output_dir("results-dir", str(RESULTS_DIR), "the JSON and the run logs",
                             flag_values=fv)  # fmt: skip


def run_seed(args, seed: int, method: str) -> dict:
    """Both modes with one method on one seed: the example's log."""
    rates = (f"adamw+overparam={args.lr_adamw_overparam:g},"
             f"momentum+overparam={args.lr_momentum_overparam:g}")  # fmt: skip
    output_dir = pathlib.Path(args.results_dir) / "transformer_default" / f"{method}_seed{seed}"
    argv = ["--modes", ",".join(MODES), "--lr", rates, "--method", method, "--seed", str(seed),
            "--steps", str(args.steps), "--no-progress",
            "--output-dir", str(output_dir)]  # fmt: skip
    command = " ".join(["python examples/transformer_lm.py", *argv])
    print(f"+ {command}", flush=True)
    done = subprocess.run([sys.executable, str(EXAMPLE), *argv])
    if done.returncode != 0:
        raise SystemExit(f"examples/transformer_lm.py exited with status {done.returncode}: "
                         f"{command}")  # fmt: skip
    return json.loads((output_dir / "transformer_lm.json").read_text())


def compare(default: dict, exact: dict) -> dict:
    """One mode and seed: the default's run against the exact rule's."""
    curves = [[e["val_loss"] for e in run["evaluations"]] for run in (default, exact)]
    return {
        "final_val_loss": {"default": default["final_val_loss"], "exact": exact["final_val_loss"]},
        "final_difference": default["final_val_loss"] - exact["final_val_loss"],
        "max_abs_curve_difference": max(abs(a - b) for a, b in zip(*curves, strict=True)),
        "seconds_per_step": {"default": default["seconds_per_step"],
                             "exact": exact["seconds_per_step"]},  # fmt: skip
        **default["tracked_decompositions"],
    }


def table_markdown(result: dict) -> str:
    """The comparison table of docs/transformer.md."""
    lines = [
        "| mode | lr | seed | final validation loss, default / exact | default minus exact "
        "| largest difference on the curve | fresh decompositions / matrix updates |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, entry in result["modes"].items():
        for seed, row in entry["seeds"].items():
            final = row["final_val_loss"]
            lines.append(
                f"| {mode} | {entry['learning_rate']:g} | {seed} | {final['default']:.6f} / "
                f"{final['exact']:.6f} | {row['final_difference']:+.1e} | "
                f"{row['max_abs_curve_difference']:.1e} | "
                f"{row['decompositions']:,} / {row['matrix_updates']:,} |"
            )
    return "\n".join(lines)


def main(args) -> dict:
    from overparam_experiments import timing

    start = time.time()
    rates = {"adamw+overparam": args.lr_adamw_overparam,
             "momentum+overparam": args.lr_momentum_overparam}  # fmt: skip
    modes = {mode: {"learning_rate": rates[mode], "seeds": {}} for mode in MODES}
    for seed in args.seeds:
        logs = {method: run_seed(args, seed, method)["runs"] for method in METHODS}
        for mode in MODES:
            modes[mode]["seeds"][str(seed)] = compare(logs["tracked"][mode], logs["svd"][mode])
    result = {
        "command": " ".join(["python benchmarks/transformer_default.py", *sys.argv[1:]]),
        "environment": timing.environment(),
        "steps": args.steps,
        "modes": modes,
        "wall_seconds": time.time() - start,
    }
    path = pathlib.Path(args.results_dir) / "transformer_default_cpu.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("\n" + table_markdown(result))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    xflags.run(define_flags, main)
