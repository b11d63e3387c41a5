r"""Razin & Cohen's 2 x 2 case and the non-gradient update field, measured and plotted.

* The 2 x 2 problem (observed w12 = w21 = 1, w22 = 0; start 0.1 I, det > 0) at depths
  2, 3, 4, on one matrix with the exact rule ("implicit") and on balanced factors
  ("explicit"): loss, |w11|, nuclear and Frobenius norms, effective rank, determinant.
* The single-output update field F(w) = P_w(grad L) of an l2 regression (8 x 3, seed 0) at
  depths 1-4: the relative asymmetry of its Jacobian and its integral around a circle.

Example::

  python benchmarks/implicit_regularization.py    # about a minute on one core

Writes ``benchmarks/results/implicit_regularization.json`` and
``docs/figures/razin_cohen.png`` (docs/implicit_regularization.md).
"""

from __future__ import annotations

import json
import math
import pathlib

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 20_000, "updates per 2 x 2 run", lower_bound=1)
flags.DEFINE_integer("record_every", 500, "steps between records", lower_bound=1)
flags.DEFINE_float("lr", 0.02, "step size of the 2 x 2 runs", lower_bound=1e-6, upper_bound=1.0)
flags.DEFINE_string("out", "benchmarks/results/implicit_regularization.json", "the JSON")
flags.DEFINE_string("figure", "docs/figures/razin_cohen.png", "the figure")
flags.register_validator(
    "steps", lambda s: s % FLAGS["record_every"].value == 0, "must be a multiple of record_every"
)
# absl's bounds let NaN through (every comparison with it is False).
flags.register_validator("lr", math.isfinite, "must be a finite number, not NaN")


def _field_checks() -> dict:
    import jax.numpy as jnp
    import numpy as np

    from overparam_experiments import implicit_regularization as ir

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 3)), rng.standard_normal(8)
    point, radius = np.array([0.5, -0.3, 0.8]), 0.3
    out = {"loss": "l2 regression, X 8 x 3 and y from seed 0", "point": point.tolist(),
           "radius": radius, "depths": {}}  # fmt: skip
    for depth in (1, 2, 3, 4):
        field = ir.update_field(depth, lambda w: jnp.asarray(x).T @ (jnp.asarray(x) @ w - y))
        out["depths"][str(depth)] = {
            "jacobian_asymmetry": ir.jacobian_asymmetry(field, point),
            "loop_integral": ir.loop_integral(field, point, radius),
        }
    return out


def _plot(runs: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("loss", "abs_w11", "nuclear_norm", "effective_rank")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for label, run in runs.items():
        depth, model = label.split()
        style = "-" if model == "implicit" else "--"
        for ax, key in zip(axes, keys, strict=True):
            plot = ax.semilogy if key == "loss" else ax.plot
            plot(run["step"], run[key], style, color=f"C{int(depth[2:]) - 2}", label=label)
    for ax, key in zip(axes, keys, strict=True):
        ax.set(xlabel="step", title=key.replace("_", " "))
    axes[0].legend(fontsize=7)
    fig.suptitle("Razin & Cohen 2x2: implicit (solid) vs explicit balanced (dashed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    from overparam_experiments import implicit_regularization as ir
    from overparam_experiments import timing

    runs = {}
    for depth in (2, 3, 4):
        for model in ("implicit", "explicit"):
            run = ir.razin_cohen_run(depth, model, lr=FLAGS.lr, steps=FLAGS.steps,
                                     record_every=FLAGS.record_every)  # fmt: skip
            runs[f"N={depth} {model}"] = {k: v.tolist() for k, v in run.items()}
            last = {k: v[-1] for k, v in run.items()}
            print(f"N={depth} {model:<8} loss {last['loss']:.2e} |w11| {last['abs_w11']:.3f} "
                  f"erank {last['effective_rank']:.4f} det {last['determinant']:.2e}")  # fmt: skip
    fields = _field_checks()
    for depth, check in fields["depths"].items():
        print(f"field N={depth}: asymmetry {check['jacobian_asymmetry']:.3g}, "
              f"loop integral {check['loop_integral']:.3g}")  # fmt: skip
    payload = {"environment": timing.environment(),
               "settings": {"steps": FLAGS.steps, "record_every": FLAGS.record_every,
                            "lr": FLAGS.lr, "init": "0.1 * I"},
               "razin_cohen": runs, "update_field": fields}  # fmt: skip
    path = pathlib.Path(FLAGS.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    _plot(runs, pathlib.Path(FLAGS.figure))
    print(f"wrote {path} and {FLAGS.figure}")


if __name__ == "__main__":
    app.run(main)
