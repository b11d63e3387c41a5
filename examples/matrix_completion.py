r"""Deep matrix completion on one matrix: the implicit regularization of depth, measured.

The setup of Arora, Cohen, Hu & Luo (NeurIPS 2019): a 100 x 100 ground truth of rank 5 with
||W*||_F = 100, ``--num-observed`` entries observed uniformly at random, the mean squared error
on them as the loss, full-batch gradient descent from a small Gaussian start (the product of
N Gaussian factors, each of entry std scale^{1/N} / 10) until the train loss is 1e-7 or
``--max-steps``. Depth N is ``optax.chain(overparam_precondition(N), optax.sgd(lr))`` on ONE
matrix (``--method exact`` adds ``method="svd"``; N = 1 is plain gradient descent), beside
gradient descent on the N factors themselves (``--explicit``), on balanced factors of the
same start (``--explicit-balanced``, the setting in which the rule is exact) and the
minimum-nuclear-norm completion (``--nuclear-norm``, needs cvxpy:
``pip install -e ".[completion]"``).

Examples::

  python examples/matrix_completion.py          # one scale and seed, about a minute
  python examples/matrix_completion.py --num-observed 5000 --scale 1e-4 --method both

Writes ``<output-dir>/matrix_completion.json`` and ``<output-dir>/matrix_completion.png``.
The sweep over scales, seeds and both observation counts is
``benchmarks/matrix_completion.py``; the results are in docs/implicit_regularization.md.
"""

from __future__ import annotations

import importlib.util
import json
import sys

from absl import flags

from overparam_experiments import flags as xflags

# The underscore spellings of the flags that had them before the dashed ones.
UNDERSCORE_ALIASES = ("num-observed", "explicit-balanced", "nuclear-norm", "max-steps",
                      "lr-factor", "record-every", "output-dir")  # fmt: skip


def _depths_ok(values) -> bool:
    return bool(values) and all(v.isdigit() and 1 <= int(v) <= 8 for v in values)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The example's command line; absl checks every value while parsing."""
    fv = flag_values
    flags.DEFINE_integer("num-observed", 2000, "observed entries", lower_bound=1,
                         upper_bound=10_000, flag_values=fv)  # fmt: skip
    flags.DEFINE_float("scale", 1e-3, "init scale (std of the start's entries times 10)",
                       flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("seed", 0, "draws the ground truth, the mask and the factors",
                         lower_bound=0, flag_values=fv)  # fmt: skip
    flags.DEFINE_list("depths", ["1", "2", "3", "4"], "comma list of depths N (1 to 8)",
                      flag_values=fv)  # fmt: skip
    flags.DEFINE_enum("method", "exact", ["exact", "default", "both"],
                      "the implicit rule: method='svd' (exact), the default, or both",
                      flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("explicit", True, "also train the N Gaussian factors themselves",
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("explicit-balanced", True, "also train balanced factors of the same "
                         "start", flag_values=fv)  # fmt: skip
    flags.DEFINE_boolean("nuclear-norm", True, "also solve min ||X||_* (needs cvxpy)",
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("max-steps", 5000, "step limit of every run", lower_bound=1,
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_float("lr-factor", 0.4, "the step is lr-factor * n^2 / (N ||W*||_2^(2-2/N))",
                       flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("record-every", 100, "steps between recorded singular values",
                         lower_bound=1, flag_values=fv)  # fmt: skip
    xflags.define_output_dir("output-dir", "matrix_completion_results",
                             "where the JSON and PNG go", flag_values=fv)  # fmt: skip
    for name in UNDERSCORE_ALIASES:
        flags.DEFINE_alias(name.replace("-", "_"), name, flag_values=fv)
    flags.register_validator("depths", _depths_ok, "must be a comma list of integers from 1 "
                             "to 8", flag_values=fv)  # fmt: skip
    flags.register_validator("scale", lambda v: 0 < v < 1, "must be in (0, 1)", flag_values=fv)
    flags.register_validator("lr-factor", lambda v: 0 < v <= 100, "must be in (0, 100]",
                             flag_values=fv)  # fmt: skip
    flags.register_validator(
        "nuclear-norm",
        lambda v: not v or importlib.util.find_spec("cvxpy") is not None,
        "needs cvxpy (pip install -e '.[completion]'); pass --nonuclear-norm to skip it",
        flag_values=fv,
    )  # fmt: skip


def methods_of(args) -> list[str]:
    """The fits the flags ask for, as named by ``matrix_completion.run_problem``."""
    implicit = {"exact": ["implicit exact"], "default": ["implicit default"]}.get(
        args.method, ["implicit exact", "implicit default"]
    )
    explicit = ["explicit"] * args.explicit + ["explicit balanced"] * args.explicit_balanced
    return implicit + explicit + ["nuclear norm"] * args.nuclear_norm


def count_fits(depths: list[int], methods: list[str]) -> int:
    """How many fits ``run_problem`` makes (depth 1 is one plain-GD fit)."""
    descent = [m for m in methods if m != "nuclear norm"]
    count = sum(("implicit exact" in descent) if d == 1 else len(descent) for d in depths)
    return count + ("nuclear norm" in methods)


class Progress:
    """One progress bar over all the fits on a terminal; one line per fit otherwise.

    A bar per fit, redrawn inside another, leaves its escape codes in a log file.
    """

    def __init__(self, total: int, stream=None):
        from tqdm.auto import tqdm

        self.stream = stream or sys.stderr
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(total=total, unit="fit", file=self.stream, dynamic_ncols=True)
        self.started = 0

    def fit(self, label: str):
        """Called as each fit starts; returns its ``progress(steps, loss)`` callback."""
        if self.bar is None:
            print(f"fitting {label}", file=self.stream, flush=True)
            return None
        if self.started:
            self.bar.update(1)
        self.started += 1
        self.bar.set_description(label)
        return lambda steps, loss: self.bar.set_postfix(step=steps, loss=f"{loss:.1e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()


def plot_runs(records, path, title: str) -> None:
    """Relative error against steps for every fit (left), and the top singular values of the
    largest depth's implicit exact (solid), explicit (dashed) and explicit balanced (dotted)
    fits (right); the legends sit below the panels, off the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [r for r in records if "record_steps" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for r in runs:
        label = f"{r['method']} N={r['depth']}"
        left.semilogy(r["record_steps"], r["relative_errors"], label=label)
    for r in records:
        if r["method"] == "nuclear norm":
            left.axhline(r["relative_error"], color="k", ls=":", label="nuclear norm")
    left.set(xlabel="step", ylabel="relative error (all entries)",
             title=f"relative error to the ground truth\n{title}")  # fmt: skip
    deepest = max((r["depth"] for r in runs), default=None)
    styles = {"implicit exact": "-", "explicit": "--", "explicit balanced": ":"}
    for r in runs:
        style = styles.get(r["method"])
        if r["depth"] == deepest and style is not None:
            sv = np.asarray(r["singular_values"], dtype=float)
            right.semilogy(r["record_steps"], sv, style, lw=1)
            right.plot([], [], style, color="gray", label=f"{r['method']} N={deepest}")
    count = len(runs[0]["singular_values"][0]) if runs and runs[0]["singular_values"] else 0
    right.set(xlabel="step", ylabel="singular value",
              title=f"top {count} singular values of the end-to-end matrix, N={deepest}\n"
                    "(each line one singular value)")  # fmt: skip
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(args) -> None:
    """Fits the problem of the flags by every method, prints the table, writes JSON and PNG."""
    from overparam_experiments import devices

    # The exact rule's 100 x 100 SVDs: LAPACK's threads would contend with XLA's.
    devices.limit_blas_threads(1)
    from overparam_experiments import matrix_completion, timing

    out = xflags.make_output_dir(args.output_dir)
    depths, methods = [int(d) for d in args.depths], methods_of(args)
    progress = Progress(count_fits(depths, methods))
    try:
        records = matrix_completion.run_problem(
            args.seed, args.num_observed, args.scale, depths, methods,
            max_steps=args.max_steps, lr_factor=args.lr_factor,
            record_every=args.record_every, progress_factory=progress.fit,
        )  # fmt: skip
    finally:
        progress.close()
    title = f"m={args.num_observed}, scale={args.scale:g}, seed={args.seed}"
    print(f"\n{title}\n{matrix_completion.format_table(records)}")
    payload = {"environment": timing.environment(), "flags": dict(vars(args)),
               "runs": records}  # fmt: skip
    (out / "matrix_completion.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot_runs(records, out / "matrix_completion.png", title)
    print(f"wrote {out / 'matrix_completion.json'} and {out / 'matrix_completion.png'}")


if __name__ == "__main__":
    xflags.run(define_flags, main)
