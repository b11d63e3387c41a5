"""Accuracy and cost of the exact preconditioner, for the record.

Prints the maximum error relative to the largest entry, against the float64 textbook
reference (``overparam_optax.testing``), per dtype over the matrix families of
the tests, and the time of one exact call (jitted, compile excluded, median of repeats) for
the sizes of issue 2. The float64 half runs in jax's x64 mode, switched on for it only.

    python benchmarks/accuracy.py --out benchmarks/results/accuracy_cpu.json
"""

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import overparam_optax as opx
from overparam_experiments import flags as xflags
from overparam_experiments import timing
from overparam_optax.testing import MATRIX_CASES, make_matrix, reference_precondition


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value while parsing."""
    flags.DEFINE_enum("platform", None, xflags.PLATFORMS,
                      "the jax platform (default: jax's own choice)", flag_values=flag_values)
    flags.DEFINE_integer("repeats", 7, "timed calls per size", lower_bound=1,
                         flag_values=flag_values)  # fmt: skip
    xflags.define_size_list("sizes", "256x256,1024x1024,3136x512", "matrix shapes to time",
                            flag_values=flag_values)  # fmt: skip
    xflags.define_output_file("out", None, "JSON path (default: print only)",
                              flag_values=flag_values)  # fmt: skip
    flags.DEFINE_integer("blas-threads", 0, "OPENBLAS_NUM_THREADS (0: as it is)", lower_bound=0,
                         flag_values=flag_values)  # fmt: skip


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


def main(args) -> dict:
    """Measures the errors and the call times; prints them and writes --out if given."""
    xflags.setup_platform(args)
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
        "environment": timing.environment(),
        "max_relative_error": errors,
        "exact_call_seconds_median": timings,
    }
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    xflags.run(define_flags, main)
