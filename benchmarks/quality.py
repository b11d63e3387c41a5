"""Equal quality of the fast configuration, and the staleness trade-off (target 4 of issue 5).

Trains the same model from the same initialization on the same data, once with the exact
transform (method="svd", every step) and once per fast configuration, and compares the
training curves:

* Ethanol-l4: the paper's l4 linear regression on the Ethanol rows of the gas-sensor drift
  data (``overparam_optax.experiments.data.ethanol_regression``), w of shape (128, 1), full batch,
  ``run_full_batch``. A single-output matrix always takes the closed form (no
  decomposition), so every configuration must give the same curve: a check of the wiring.
* MNIST: an MLP 784-512-512-10 (ReLU), minibatch SGD with ``run_minibatch`` (batch 128, the
  same minibatches for every run), N = 3, all three kernels preconditioned. The fast
  configurations: method="eigh" every step, and method="auto" with precondition_every =
  k for several k (the staleness sweep; "auto" resolves per shape by
  linalg.resolve_method), and the fast configuration: k = --fast-every after --warmup exact
  steps (warmup_steps).

Metrics per run, against the exact run: the largest relative gap between the two
minibatch-loss curves smoothed over --window steps, the final smoothed gap, the final test
accuracy, and the relative distance between the final parameters. The target: the default
fast configuration (--fast-every) within 1% of exact on both curves.

Usage (from the repository root; the data come from ``default_data_dir`` or the flags):

    python benchmarks/quality.py               # a few minutes on 2 CPU cores
    python benchmarks/quality.py --quick       # smoke run

Writes benchmarks/results/quality_<backend>.json and docs/figures/quality_<backend>.png.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

import overparam_optax as opx
from overparam_optax.experiments import data, timing, training
from overparam_optax.experiments import flags as xflags
from overparam_optax.experiments.models import MLP, logits_fn_for

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
FIGURES_DIR = pathlib.Path(__file__).resolve().parents[1] / "docs" / "figures"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value and combination while parsing."""
    fv = flag_values
    positive = {"lower_bound": 1, "flag_values": fv}
    xflags.define_platform_flags(flag_values=fv)
    flags.DEFINE_integer("N", 3, "the depth", **positive)
    flags.DEFINE_integer("steps", 400, "MNIST steps", **positive)
    flags.DEFINE_integer("ethanol-steps", 3000, "Ethanol steps", **positive)
    flags.DEFINE_float("ethanol-lr", 1e-3, "Ethanol learning rate", lower_bound=1e-12,
                       upper_bound=1e3, flag_values=fv)  # fmt: skip
    flags.DEFINE_float("lr", 0.05, "MNIST learning rate", lower_bound=1e-12, upper_bound=1e3,
                       flag_values=fv)  # fmt: skip
    xflags.define_int_list("everies", "5,10,25,100", "recomputation intervals k",
                           flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("fast-every", 10, "k of the fast config", **positive)
    flags.DEFINE_integer("warmup", 100, "exact steps before the fast config caches",
                         lower_bound=0, flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("window", 25, "smoothing window (<= --steps)", **positive)
    flags.DEFINE_string("mnist-dir", None, "MNIST folder", flag_values=fv)
    flags.DEFINE_string("gas-dir", None, "gas-sensor folder", flag_values=fv)
    xflags.define_output_file("plot", None, "PNG path", flag_values=fv)
    xflags.require(["window", "steps", "quick"], lambda w, s, q: q or w <= s,
                   "--window must not exceed --steps", flag_values=fv)  # fmt: skip


def smooth(values, window):
    """Means over ``window`` consecutive values (the values themselves if fewer)."""
    values = np.asarray(values, np.float64)
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def gaps(curve, reference, window):
    """Largest and final relative gap between two curves smoothed over ``window`` steps."""
    a, b = smooth(curve, window), smooth(reference, window)
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-12)
    return float(rel.max()), float(rel[-1])


def main(args) -> dict:
    """Trains every configuration; writes and returns the JSON record."""
    xflags.setup_platform(args)
    N = args.N
    steps = 20 if args.quick else args.steps
    window = 5 if args.quick else args.window
    everies = [2] if args.quick else args.everies
    fast_every = 2 if args.quick else args.fast_every
    configs = {"exact": dict(method="svd"), "eigh": dict(method="eigh")}
    for k in everies:
        configs[f"auto_every{k}"] = dict(method="auto", precondition_every=k)
    warmup = 4 if args.quick else args.warmup
    # The fast configuration: cached basis every k steps after a warm-up of exact steps.
    fast_name = f"auto_every{fast_every}_warm{warmup}"
    configs[fast_name] = dict(method="auto", precondition_every=fast_every, warmup_steps=warmup)

    results: dict = {"args": vars(args), "N": N, "fast_config": fast_name}

    # Ethanol-l4 (single output: closed form in every configuration).
    gas_dir = args.gas_dir or data.default_data_dir("gas_sensor_drift")
    if gas_dir is not None:
        X, y = data.ethanol_regression(gas_dir)
        X, y = jnp.asarray(X, jnp.float32), jnp.asarray(y, jnp.float32)
        w0 = 0.05 * jax.random.normal(jax.random.PRNGKey(1), (X.shape[1], 1))
        e_steps = 50 if args.quick else args.ethanol_steps
        curves = {}
        for name in ("exact", fast_name):
            tx = optax.chain(
                opx.overparam_precondition(N, **configs[name]), optax.sgd(args.ethanol_lr)
            )
            _, losses, _ = training.run_full_batch(
                lambda w: training.lp_regression_loss(w, X, y, 4.0), w0, tx, e_steps
            )
            curves[name] = losses
        max_gap, final_gap = gaps(curves[fast_name], curves["exact"], 1)
        results["ethanol_l4"] = {
            "rows": int(X.shape[0]),
            "steps": e_steps,
            "lr": args.ethanol_lr,
            "max_rel_gap": max_gap,
            "final_rel_gap": final_gap,
            "final_loss": {k: float(v[-1]) for k, v in curves.items()},
            "curves": {k: v[:: max(1, e_steps // 300)].tolist() for k, v in curves.items()},
        }
        print(
            f"Ethanol-l4 ({X.shape[0]} rows, {e_steps} steps): {fast_name} vs exact "
            f"max gap {max_gap:.2e}, final {final_gap:.2e}"
        )
    else:
        print("Ethanol-l4 skipped: no gas_sensor_drift data (--gas-dir).")

    # MNIST MLP.
    mnist_dir = args.mnist_dir or data.default_data_dir("mnist")
    train = data.load_mnist(mnist_dir, split="train")
    test = data.load_mnist(mnist_dir, split="test")
    if args.quick:
        train = (train[0][:512], train[1][:512])
        test = (test[0][:256], test[1][:256])
    width = 64 if args.quick else 512

    model = MLP(hidden=(width, width))
    params0 = model.init(jax.random.PRNGKey(0), train[0][:2])["params"]
    logits_fn = logits_fn_for(model)

    def kernels(p):
        return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", p)

    runs = {}
    for name, options in configs.items():
        tx = optax.chain(opx.overparam_precondition(N, mask=kernels, **options), optax.sgd(args.lr))
        runs[name] = training.run_minibatch(
            logits_fn, params0, tx, train, steps, batch_size=128, seed=0, test_data=test
        )
        print(
            f"  {name:>14}: final loss {float(np.mean(runs[name].losses[-window:])):.4f}, "
            f"test acc {runs[name].test_accuracy:.4f}, {runs[name].seconds:.1f} s",
            flush=True,
        )

    exact = runs["exact"]
    flat_exact = np.concatenate([np.ravel(x) for x in jax.tree.leaves(exact.params)])
    summary = {}
    for name, run in runs.items():
        max_gap, final_gap = gaps(run.losses, exact.losses, window)
        flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(run.params)])
        summary[name] = {
            "max_rel_gap": max_gap,
            "final_rel_gap": final_gap,
            "test_accuracy": run.test_accuracy,
            "test_loss": run.test_loss,
            "param_rel_distance": float(
                np.linalg.norm(flat - flat_exact) / np.linalg.norm(flat_exact)
            ),
            "seconds": run.seconds,
        }
    print(f"\nMNIST MLP 784-{width}-{width}-10, N={N}, {steps} steps, batch 128, lr {args.lr}")
    print(f"{'config':>20} {'max gap':>9} {'final gap':>9} {'test acc':>9} {'param dist':>10}")
    for name, row in summary.items():
        print(
            f"{name:>20} {row['max_rel_gap']:9.2e} {row['final_rel_gap']:9.2e} "
            f"{row['test_accuracy']:9.4f} {row['param_rel_distance']:10.2e}"
        )
    fast = summary[fast_name]
    verdict = "met" if fast["max_rel_gap"] <= 0.01 else "MISSED"
    print(f"target: {fast_name} within 1% of exact on the smoothed MNIST curve: {verdict}")
    results["mnist"] = {
        "width": width,
        "steps": steps,
        "lr": args.lr,
        "window": window,
        "summary": summary,
        "curves": {name: run.losses.tolist() for name, run in runs.items()},
    }
    if not args.quick:
        _plot(results, args, jax.default_backend())
    timing.write_json(args, "quality", results, RESULTS_DIR)
    return results


def _plot(results, args, backend) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("ethanol_l4", "mnist") if k in results]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.5 * (len(panels) + 1), 4))
    axes = np.atleast_1d(axes)
    gap_ax = axes[-1]
    mnist = results["mnist"]
    exact = smooth(mnist["curves"]["exact"], mnist["window"])
    for name, curve in mnist["curves"].items():
        if name != "exact":
            gap = (smooth(curve, mnist["window"]) - exact) / exact
            gap_ax.plot(100 * gap, label=name, linewidth=1.0)
    for bound in (-1, 1):
        gap_ax.axhline(bound, color="k", linestyle=":", linewidth=1)
    gap_ax.set_title("MNIST: (smoothed loss - exact) / exact")
    gap_ax.set_xlabel("step")
    gap_ax.set_ylabel("% of the exact loss")
    gap_ax.legend(fontsize=7)
    for ax, key in zip(axes[:-1], panels, strict=True):
        curves = results[key]["curves"]
        window = results["mnist"]["window"] if key == "mnist" else 1
        for name, curve in curves.items():
            style = "-" if name == "exact" else "--"
            ax.plot(smooth(curve, window), style, label=name, linewidth=1.2)
        ax.set_yscale("log")
        ax.set_title("Ethanol l4 (full batch)" if key == "ethanol_l4" else "MNIST MLP (smoothed)")
        ax.set_xlabel("step" if key == "mnist" else "step (subsampled)")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    fig.suptitle(f"exact vs fast configurations, N={results['N']} ({backend})")
    fig.tight_layout()
    path = pathlib.Path(args.plot) if args.plot else FIGURES_DIR / f"quality_{backend}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    xflags.run(define_flags, main)
