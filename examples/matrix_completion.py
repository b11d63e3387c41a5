r"""Deep matrix completion on one matrix: the implicit regularization of depth, measured.

The setup of Arora, Cohen, Hu & Luo (NeurIPS 2019): a 100 x 100 ground truth of rank 5 with
||W*||_F = 100, ``--num_observed`` entries observed uniformly at random, the mean squared error
on them as the loss, full-batch gradient descent from a small Gaussian start (the product of
N Gaussian factors, each of entry std scale^{1/N} / 10) until the train loss is 1e-7 or
``--max_steps``. Depth N is ``optax.chain(overparam_precondition(N), optax.sgd(lr))`` on ONE
matrix (``--method exact`` adds ``method="svd"``; N = 1 is plain gradient descent), beside
gradient descent on the N factors themselves (``--explicit``), on balanced factors of the
same start (``--explicit_balanced``, the setting in which the rule is exact) and the
minimum-nuclear-norm completion (``--nuclear_norm``, needs cvxpy:
``pip install -e ".[completion]"``).

Examples::

  python examples/matrix_completion.py          # one scale and seed, about a minute
  python examples/matrix_completion.py --num_observed 5000 --scale 1e-4 --method both

Writes ``<output_dir>/matrix_completion.json`` and ``<output_dir>/matrix_completion.png``.
On a small, busy machine run it with ``OPENBLAS_NUM_THREADS=1`` and ``XLA_FLAGS=
"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``: the exact rule's
100 x 100 SVD was 10-30 times slower with the default threads on a shared 2-core CPU.
The sweep over scales, seeds and both observation counts is
``benchmarks/matrix_completion.py``; the results are in docs/implicit_regularization.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_observed", 2000, "observed entries", lower_bound=1, upper_bound=10_000)
flags.DEFINE_float("scale", 1e-3, "init scale (std of the start's entries times 10)")
flags.DEFINE_integer("seed", 0, "draws the ground truth, the mask and the factors", lower_bound=0)
flags.DEFINE_list("depths", ["1", "2", "3", "4"], "comma list of depths N (1 to 8)")
flags.DEFINE_enum("method", "exact", ["exact", "default", "both"],
                  "the implicit rule: method='svd' (exact), the default, or both")  # fmt: skip
flags.DEFINE_boolean("explicit", True, "also train the N Gaussian factors themselves")
flags.DEFINE_boolean("explicit_balanced", True, "also train balanced factors of the same start")
flags.DEFINE_boolean("nuclear_norm", True, "also solve min ||X||_* (needs cvxpy)")
flags.DEFINE_integer("max_steps", 5000, "step limit of every run", lower_bound=1)
flags.DEFINE_float("lr_factor", 0.4, "the step is lr_factor * n^2 / (N ||W*||_2^(2-2/N))")
flags.DEFINE_integer("record_every", 100, "steps between recorded singular values",
                     lower_bound=1)  # fmt: skip
flags.DEFINE_string("output_dir", "matrix_completion_results", "where the JSON and PNG go")


def _depths_ok(values) -> bool:
    return bool(values) and all(v.isdigit() and 1 <= int(v) <= 8 for v in values)


def _output_dir_ok(text: str) -> bool:
    path = pathlib.Path(text)
    existing = next((p for p in (path, *path.parents) if p.exists()), pathlib.Path("."))
    return existing.is_dir() and os.access(existing, os.W_OK)


flags.register_validator("depths", _depths_ok, "must be a comma list of integers from 1 to 8")
flags.register_validator("scale", lambda v: 0 < v < 1, "must be in (0, 1)")
flags.register_validator("lr_factor", lambda v: 0 < v <= 100, "must be in (0, 100]")
flags.register_validator("output_dir", _output_dir_ok, "must be a folder that can be written")
flags.register_validator(
    "nuclear_norm",
    lambda v: not v or importlib.util.find_spec("cvxpy") is not None,
    "needs cvxpy (pip install -e '.[completion]'); pass --nonuclear_norm to skip it",
)


def _methods() -> list[str]:
    implicit = {"exact": ["implicit exact"], "default": ["implicit default"]}.get(
        FLAGS.method, ["implicit exact", "implicit default"]
    )
    explicit = ["explicit"] * FLAGS.explicit + ["explicit balanced"] * FLAGS.explicit_balanced
    return implicit + explicit + ["nuclear norm"] * FLAGS.nuclear_norm


def main(argv):
    del argv  # every option is a flag
    from tqdm.auto import tqdm

    from overparam_experiments import matrix_completion, timing

    def progress_factory(label):
        bar = tqdm(total=FLAGS.max_steps, desc=label, unit="step", leave=False)
        return lambda steps, loss: (bar.update(steps - bar.n), bar.set_postfix(loss=f"{loss:.1e}"))

    records = matrix_completion.run_problem(
        FLAGS.seed, FLAGS.num_observed, FLAGS.scale, [int(d) for d in FLAGS.depths], _methods(),
        max_steps=FLAGS.max_steps, lr_factor=FLAGS.lr_factor, record_every=FLAGS.record_every,
        progress_factory=progress_factory,
    )  # fmt: skip
    title = f"m={FLAGS.num_observed}, scale={FLAGS.scale:g}, seed={FLAGS.seed}"
    print(f"\n{title}\n{matrix_completion.format_table(records)}")
    out = pathlib.Path(FLAGS.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"environment": timing.environment(), "flags": FLAGS.flag_values_dict(),
               "runs": records}  # fmt: skip
    (out / "matrix_completion.json").write_text(json.dumps(payload, indent=1) + "\n")
    matrix_completion.plot_runs(records, out / "matrix_completion.png", title)
    print(f"wrote {out / 'matrix_completion.json'} and {out / 'matrix_completion.png'}")


if __name__ == "__main__":
    app.run(main)
