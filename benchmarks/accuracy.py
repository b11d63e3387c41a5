"""Accuracy and cost of the exact preconditioner, for the record.

Prints the maximum error relative to the largest entry, against the float64 textbook
reference (``overparam_optax.experiments.reference``), per dtype over the matrix families of
the tests, and the time of one exact call (jitted, compile excluded, median of repeats) for
the sizes of issue 2. The float64 half runs in jax's x64 mode, switched on for it only.

    python benchmarks/accuracy.py --out benchmarks/results/accuracy_cpu.json
"""

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import overparam_optax as opx
from overparam_optax.experiments import cli
from overparam_optax.experiments.reference import MATRIX_CASES, make_matrix, reference_precondition


def _matrix_size(text: str) -> tuple[int, int]:
    """'MxN' with positive M and N, for --sizes."""
    rows, sep, cols = text.partition("x")
    try:
        if not sep:
            raise argparse.ArgumentTypeError("")
        return cli.positive_int(rows), cli.positive_int(cols)
    except argparse.ArgumentTypeError:
        message = f"must be MxN with positive M and N, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and checks the command line (exit status 2 with a message on a bad value)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--platform", choices=("cpu", "gpu", "cuda", "rocm", "tpu"), default=None,
        help="the jax platform (default: jax's own choice)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=cli.positive_int, default=7)
    parser.add_argument(
        "--sizes", type=cli.comma_list(_matrix_size), default="256x256,1024x1024,3136x512"
    )
    parser.add_argument(
        "--out", type=cli.output_file, default=None, help="JSON path (default: print only)"
    )
    return parser.parse_args(argv)


def max_relative_errors() -> dict:
    """The worst error relative to the largest entry, per dtype, over the matrix families."""
    errors = {}
    for dtype_name in ["float32", "float64"]:
        with jax.enable_x64(dtype_name == "float64"):
            errors[dtype_name] = _worst_error(dtype_name)
        print(f"max relative error, {dtype_name}: {errors[dtype_name]:.2e}")
    return errors


def _worst_error(dtype_name: str) -> float:
    worst = 0.0
    for case_index, case in enumerate(MATRIX_CASES):
        for N in range(1, 9):
            rng = np.random.default_rng(100 * case_index + N)
            w = make_matrix(case, rng)
            g = rng.normal(size=w.shape)
            expected = reference_precondition(w, g, N)
            actual = opx.precondition_matrix(
                jnp.asarray(w, dtype_name), jnp.asarray(g, dtype_name), N
            )
            scale = max(np.abs(expected).max(), 1e-30)
            worst = max(worst, float(np.abs(np.asarray(actual) - expected).max() / scale))
    return worst


def main(argv=None) -> dict:
    """Measures the errors and the call times; prints them and writes --out if given."""
    args = parse_args(argv)
    if args.platform:
        jax.config.update("jax_platforms", args.platform)
    errors = max_relative_errors()

    timings = {}
    for m, n in args.sizes:
        size = f"{m}x{n}"
        key = jax.random.key(0)
        w = jax.random.normal(key, (m, n), jnp.float32)
        g = jax.random.normal(jax.random.fold_in(key, 1), (m, n), jnp.float32)
        call = jax.jit(lambda w, g: opx.precondition_matrix(w, g, 3))
        call(w, g).block_until_ready()
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            call(w, g).block_until_ready()
            seconds.append(time.perf_counter() - start)
        timings[size] = float(np.median(seconds))
        print(f"exact call, {size} float32, N=3: {1e3 * timings[size]:.1f} ms (median)")

    record = {
        "command": "python " + " ".join(sys.argv),
        "device": str(jax.devices()[0]),
        "platform": jax.devices()[0].platform,
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
        "max_relative_error": errors,
        "exact_call_seconds_median": timings,
    }
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
