"""Block-diagonal preconditioning (``block_size``) vs the exact rule on a real training curve.

Trains the same MNIST MLP (784-512-512-10, ReLU, float32) from the same initialization, on
the same minibatches, with ``overparam_sgd(lr, N, momentum)`` four ways:

* ``exact``     the exact depth-N preconditioner on every weight matrix;
* ``block512``  ``block_size=512``: the 784 x 512 layer is split into a 2 x 1 grid (the
  784 rows are zero-padded to 1024), the 512 x 512 and 512 x 10 layers are exact;
* ``block256``  ``block_size=256``: 784 x 512 -> 4 x 2 blocks, 512 x 512 -> 2 x 2,
  512 x 10 -> 2 x 1;
* ``sgd``       plain SGD with the same momentum (N = 1), to give the block-vs-exact
  differences a scale.

and reports (1) the difference between the minibatch-loss curves (moving average over 25
steps) of each run and the exact one, (2) the final test loss and accuracy, and (3) how far
the block update direction is from the exact one on the same gradient: per layer, the
relative Frobenius distance ``||P_block(G) - P_exact(G)|| / ||P_exact(G)||`` and the cosine,
at the initialization and at the end of the exact run (G: the gradient on 2,000 training
digits).

Usage (from the repository root; needs the MNIST IDX files, found through
``overparam_experiments.data.default_data_dir("mnist")`` or ``--data-dir``):

    python benchmarks/blocks.py                 # 200 steps: ~30-60 min on 2 busy CPU cores
    python benchmarks/blocks.py --steps 25      # smoke run

Writes ``benchmarks/results/blocks_<platform>.json`` (device, versions, the exact command,
the summary and the subsampled curves) and ``docs/figures/blocks_<platform>.png``; see
docs/scaling.md.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shlex
import sys

import numpy as np
from absl import flags

from overparam_experiments import flags as xflags

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOOTH = 25


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value while parsing."""
    fv = flag_values
    flags.DEFINE_enum("platform", None, xflags.PLATFORMS,
                      "the jax platform (default: jax's own choice)", flag_values=fv)
    flags.DEFINE_string("data-dir", None, "folder with the MNIST IDX files", flag_values=fv)
    flags.DEFINE_integer("steps", 200, f"training steps (>= {SMOOTH}, the smoothing window)",
                         lower_bound=SMOOTH, flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("batch-size", 128, "digits per step", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("lr", 0.02, "learning rate", lower_bound=1e-12, upper_bound=1e3,
                       flag_values=fv)  # fmt: skip
    flags.DEFINE_float("momentum", 0.9, "momentum", lower_bound=0.0, upper_bound=1.0,
                       flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("depth", 3, "N", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seed", 0, "initial weights and minibatches", lower_bound=0,
                         flag_values=fv)  # fmt: skip
    xflags.define_output_file("out-json", None, "JSON path", flag_values=fv)
    xflags.define_output_file("out-png", None, "figure path", flag_values=fv)
    flags.DEFINE_integer("blas-threads", 0, "OPENBLAS_NUM_THREADS (0: as it is)", lower_bound=0,
                         flag_values=fv)  # fmt: skip


def init_mlp(jax, sizes, seed):
    """LeCun-normal weights (as flax's Dense), zero biases."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
    params = {}
    for i, (key, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        params[f"w{i}"] = jax.random.normal(key, (fan_in, fan_out)) / np.sqrt(fan_in)
        params[f"b{i}"] = jax.numpy.zeros((fan_out,))
    return params


def mlp_logits(params, images, train=False, rng=None):
    """The ReLU MLP of :func:`init_mlp` on flattened images (``train``/``rng`` unused)."""
    del train, rng
    import jax.numpy as jnp

    x = images.reshape(images.shape[0], -1)
    num_layers = len(params) // 2
    for i in range(num_layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < num_layers - 1:
            x = jnp.maximum(x, 0)
    return x


def direction_gap(jax, opx, params, grads, depth, block_size):
    """Per layer: relative distance and cosine of the block vs the exact P_W(G)."""
    exact = opx.overparam_precondition(depth)
    block = opx.overparam_precondition(depth, block_size=block_size)
    p_exact, _ = jax.jit(exact.update)(grads, exact.init(params), params)
    p_block, _ = jax.jit(block.update)(grads, block.init(params), params)
    gaps = {}
    for name in sorted(params):
        if not name.startswith("w"):
            continue
        a, b = np.asarray(p_exact[name], np.float64), np.asarray(p_block[name], np.float64)
        gaps[name] = {
            "shape": list(a.shape),
            "rel_distance": float(np.linalg.norm(b - a) / np.linalg.norm(a)),
            "cosine": float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))),
        }
    return gaps


def main(args) -> dict:
    """Trains the four runs, compares their curves and directions; returns the report."""
    xflags.setup_platform(args)
    import jax
    import optax

    import overparam_optax as opx
    from overparam_experiments import data, timing, training

    data_dir = args.data_dir or data.default_data_dir("mnist")
    if data_dir is None:
        xflags.fail("data-dir", None, "MNIST not found: pass a folder with the four IDX files")
    try:
        train = data.load_mnist(data_dir, split="train")
        test = data.load_mnist(data_dir, split="test")
    except data.DataError as error:
        xflags.fail("data-dir", data_dir, str(error))
    if args.batch_size > len(train[1]):
        xflags.fail("batch-size", args.batch_size, f"exceeds the {len(train[1])} digits")
    params0 = init_mlp(jax, [784, 512, 512, 10], args.seed)

    def make_tx(block_size, depth):
        return opx.overparam_sgd(
            args.lr, N=depth, momentum=args.momentum, block_size=block_size
        )

    runs = {
        "exact": (None, args.depth),
        "block512": (512, args.depth),
        "block256": (256, args.depth),
        "sgd": (None, 1),
    }
    results = {}
    for name, (block_size, depth) in runs.items():
        print(f"[{name}] block_size={block_size} N={depth}", flush=True)
        result = training.run_minibatch(
            mlp_logits,
            params0,
            make_tx(block_size, depth),
            train,
            args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            test_data=test,
            log_every=max(args.steps // 6, 1),
            description=name,
        )
        results[name] = result
        print(
            f"[{name}] test loss {result.test_loss:.4f} accuracy {result.test_accuracy:.4f} "
            f"({result.seconds:.0f} s)",
            flush=True,
        )

    smooth = {name: training.trailing_mean(r.losses, SMOOTH) for name, r in results.items()}
    summary = {}
    for name, r in results.items():
        diff = smooth[name] - smooth["exact"]
        summary[name] = {
            "block_size": runs[name][0],
            "N": runs[name][1],
            "final_train_loss_smoothed": float(smooth[name][-1]),
            "test_loss": r.test_loss,
            "test_accuracy": r.test_accuracy,
            "seconds": r.seconds,
            "max_abs_diff_vs_exact_smoothed": float(np.max(np.abs(diff))),
            "mean_abs_diff_vs_exact_smoothed": float(np.mean(np.abs(diff))),
            "max_rel_diff_vs_exact_smoothed": float(np.max(np.abs(diff) / smooth["exact"])),
        }

    probe = (train[0][:2000], train[1][:2000])

    def probe_grads(params):
        def loss(p):
            logits = mlp_logits(p, probe[0])
            return optax.softmax_cross_entropy_with_integer_labels(logits, probe[1]).mean()

        return jax.grad(loss)(params)

    direction = {}
    for where, params in (("init", params0), ("end_of_exact_run", results["exact"].params)):
        grads = probe_grads(params)
        direction[where] = {
            f"block{bs}": direction_gap(jax, opx, params, grads, args.depth, bs)
            for bs in (512, 256)
        }

    platform_name = jax.devices()[0].platform
    out_json = pathlib.Path(
        args.out_json or REPO / "benchmarks" / "results" / f"blocks_{platform_name}.json"
    )
    out_png = pathlib.Path(
        args.out_png or REPO / "docs" / "figures" / f"blocks_{platform_name}.png"
    )
    stride = max(1, len(smooth["exact"]) // 400)
    env = timing.environment()
    report = {
        "benchmark": "block-diagonal vs exact preconditioner, MNIST MLP 784-512-512-10",
        "command": shlex.join(["python", "benchmarks/blocks.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": env["git_commit"],
        "git_dirty": env["git_dirty"],
        "versions": {
            "python": env["python"],
            "jax": env["jax_version"],
            "optax": optax.__version__,
            "numpy": np.__version__,
        },
        "device": {
            "platform": env["backend"],
            "device_kind": env["device"],
            "device_count": env["num_devices"],
        },
        "config": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "momentum": args.momentum,
            "N": args.depth,
            "seed": args.seed,
            "train_examples": len(train[1]),
            "test_examples": len(test[1]),
            "smoothing_window": SMOOTH,
            "dtype": "float32",
        },
        "summary": summary,
        "direction_gap": direction,
        "curves_smoothed": {
            "step": list(range(SMOOTH - 1, SMOOTH - 1 + len(smooth["exact"]), stride)),
            **{name: [float(v) for v in s[::stride]] for name, s in smooth.items()},
        },
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out_json}")
    print(json.dumps({"summary": summary, "direction_gap": direction}, indent=1))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return report
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    steps = np.arange(SMOOTH - 1, SMOOTH - 1 + len(smooth["exact"]))
    for name in runs:
        ax.plot(steps, smooth[name], label=name, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"minibatch loss ({SMOOTH}-step moving average)")
    ax.set_title(f"MNIST MLP, N={args.depth}: block-diagonal vs exact preconditioner")
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    print(f"wrote {out_png}")
    return report


if __name__ == "__main__":
    xflags.run(define_flags, main)
