r"""The deep-matrix-completion sweep: depths, methods, observation counts, scales and seeds.

Runs :func:`overparam_experiments.matrix_completion.run_problem` for every
(observation count, scale, seed) and writes one JSON with every fit's metrics and curves
and the environment record (OpenBLAS capped at one thread by the script itself, as the
exact rule's SVDs need on a small CPU). The default sweep (scale 1e-3, seeds 0-2, 2,000 and
5,000 observations, depths 1-4, a 5,000-step limit) took 8 minutes on a busy shared 2-core
CPU (single-threaded BLAS and XLA); the smaller scales of the 2019 paper (down to 1e-6) need
far more steps at depth 4 (the plateau before the first singular value grows lengthens as
the scale falls) and are available through ``--scales`` with a larger ``--max_steps``.

Example::

  python benchmarks/matrix_completion.py                       # the committed sweep
  python benchmarks/matrix_completion.py --scales 1e-3,1e-4 --seeds 0 --max_steps 20000

Results: ``benchmarks/results/matrix_completion_cpu.json`` (docs/implicit_regularization.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("num_observed", ["2000", "5000"], "comma list of observation counts")
flags.DEFINE_list("scales", ["1e-3"], "comma list of init scales in (0, 1)")
flags.DEFINE_list("seeds", ["0", "1", "2"], "comma list of seeds (non-negative integers)")
flags.DEFINE_list("depths", ["1", "2", "3", "4"], "comma list of depths N (1 to 8)")
flags.DEFINE_list(
    "methods", ["implicit exact", "implicit default", "explicit", "explicit balanced",
                "nuclear norm"], "comma list of methods")  # fmt: skip
flags.DEFINE_integer("max_steps", 5000, "step limit of every run", lower_bound=1)
flags.DEFINE_float("lr_factor", 0.4, "the step is lr_factor * n^2 / (N ||W*||_2^(2-2/N))")
flags.DEFINE_integer("record_every", 250, "steps between recorded singular values",
                     lower_bound=1)  # fmt: skip
flags.DEFINE_string(
    "out", "benchmarks/results/matrix_completion_cpu.json", "the JSON file to write"
)


def _all(values, check) -> bool:
    try:
        return bool(values) and all(check(v) for v in values)
    except ValueError:
        return False


_METHODS = ("implicit exact", "implicit default", "explicit", "explicit balanced", "nuclear norm")
flags.register_validator("num_observed", lambda v: _all(v, lambda x: 1 <= int(x) <= 10_000),
                         "must be a comma list of integers from 1 to 10000")  # fmt: skip
flags.register_validator("scales", lambda v: _all(v, lambda x: 0 < float(x) < 1),
                         "must be a comma list of numbers in (0, 1)")  # fmt: skip
flags.register_validator("seeds", lambda v: _all(v, lambda x: int(x) >= 0),
                         "must be a comma list of non-negative integers")  # fmt: skip
flags.register_validator("depths", lambda v: _all(v, lambda x: 1 <= int(x) <= 8),
                         "must be a comma list of integers from 1 to 8")  # fmt: skip
flags.register_validator("methods", lambda v: _all(v, lambda x: x in _METHODS),
                         f"must be a comma list of {', '.join(_METHODS)}")  # fmt: skip
flags.register_validator("lr_factor", lambda v: 0 < v <= 100, "must be in (0, 100]")
flags.register_validator(
    "methods",
    lambda v: "nuclear norm" not in v or importlib.util.find_spec("cvxpy") is not None,
    "'nuclear norm' needs cvxpy (pip install -e '.[completion]')",
)
flags.register_validator(
    "out",
    lambda v: os.access(next(p for p in pathlib.Path(v).absolute().parents if p.exists()),
                        os.W_OK),
    "must be a file path in a folder that can be written",
)  # fmt: skip


def main(argv):
    del argv
    from overparam_experiments import devices, matrix_completion, timing

    # The exact rule's SVDs: LAPACK's threads would contend with XLA's for the cores.
    devices.limit_blas_threads(1)

    start = time.perf_counter()
    runs = []
    for m in [int(v) for v in FLAGS.num_observed]:
        for scale in [float(v) for v in FLAGS.scales]:
            for seed in [int(v) for v in FLAGS.seeds]:
                records = matrix_completion.run_problem(
                    seed, m, scale, [int(d) for d in FLAGS.depths], FLAGS.methods,
                    max_steps=FLAGS.max_steps, lr_factor=FLAGS.lr_factor,
                    record_every=FLAGS.record_every,
                )  # fmt: skip
                print(f"\nm={m} scale={scale:g} seed={seed} "
                      f"({time.perf_counter() - start:.0f} s so far)")  # fmt: skip
                print(matrix_completion.format_table(records), flush=True)
                runs.extend(records)
    payload = {
        "environment": timing.environment(),
        "settings": {name: FLAGS[name].value for name in (
            "num_observed", "scales", "seeds", "depths", "methods", "max_steps", "lr_factor",
            "record_every")},
        "total_seconds": time.perf_counter() - start,
        "runs": runs,
    }  # fmt: skip
    path = pathlib.Path(FLAGS.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
