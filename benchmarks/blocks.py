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
``overparam_optax.experiments.data.default_data_dir("mnist")`` or ``--data-dir``):

    python benchmarks/blocks.py                 # 200 steps: ~30-60 min on 2 busy CPU cores
    python benchmarks/blocks.py --steps 20      # smoke run

Writes ``benchmarks/results/blocks_<platform>.json`` (device, versions, the exact command,
the summary and the subsampled curves) and ``docs/figures/blocks_<platform>.png``; see
docs/scaling.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import shlex
import sys

import numpy as np

from overparam_optax.experiments import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOOTH = 25


def make_parser() -> argparse.ArgumentParser:
    """The command line; every value is checked here, before any work."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--platform", choices=("cpu", "gpu", "cuda", "rocm", "tpu"), default=None,
        help="the jax platform (default: jax's own choice)",
    )  # fmt: skip
    parser.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    parser.add_argument("--steps", type=cli.positive_int, default=200)
    parser.add_argument("--batch-size", type=cli.positive_int, default=128)
    parser.add_argument("--lr", type=cli.positive_float, default=0.02)
    parser.add_argument("--momentum", type=cli.nonnegative_float, default=0.9)
    parser.add_argument("--depth", type=cli.positive_int, default=3, help="N")
    parser.add_argument("--seed", type=cli.nonnegative_int, default=0)
    parser.add_argument("--out-json", type=cli.output_file, default=None)
    parser.add_argument("--out-png", type=cli.output_file, default=None)
    return parser


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parses and checks the command line (exit status 2 with a message on a bad value)."""
    parser = parser or make_parser()
    args = parser.parse_args(argv)
    if args.steps < SMOOTH:
        parser.error(f"--steps must be at least {SMOOTH}, the smoothing window")
    return args


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


def main(argv=None) -> dict:
    """Trains the four runs, compares their curves and directions; returns the report."""
    parser = make_parser()
    args = parse_args(argv, parser)
    import jax
    import optax

    import overparam_optax as opx
    from overparam_optax.experiments import data, training

    if args.platform:
        jax.config.update("jax_platforms", args.platform)
    data_dir = args.data_dir or data.default_data_dir("mnist")
    if data_dir is None:
        parser.error("MNIST not found: pass --data-dir (a folder with the four IDX files)")
    try:
        train = data.load_mnist(data_dir, split="train")
        test = data.load_mnist(data_dir, split="test")
    except data.DataError as error:
        parser.error(f"--data-dir: {error}")
    if args.batch_size > len(train[1]):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(train[1])} digits")
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
    report = {
        "benchmark": "block-diagonal vs exact preconditioner, MNIST MLP 784-512-512-10",
        "command": shlex.join(["python", "benchmarks/blocks.py", *sys.argv[1:]])
        if argv is None
        else shlex.join(["python", "benchmarks/blocks.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
        },
        "device": {
            "platform": platform_name,
            "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(),
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
    main()
