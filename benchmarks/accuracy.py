"""Accuracy and cost of the exact preconditioner, for the record.

Prints the maximum error relative to the largest entry, against the float64 textbook
reference in tests/reference.py, per dtype over the test families, and the time of one
exact call (jitted, compile excluded, median of repeats) for the sizes of issue 2.

    python benchmarks/accuracy.py --out benchmarks/results/accuracy_cpu.json
"""

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", default=None, help="cpu, gpu or tpu (default: jax's choice)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", default="256x256,1024x1024,3136x512")
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = parser.parse_args()
    if args.platform:
        os.environ["JAX_PLATFORMS"] = args.platform

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import overparam_optax as opx
    from tests.reference import reference_precondition
    from tests.test_linalg import CASES, make_matrix

    errors = {}
    for dtype_name in ["float32", "float64"]:
        jax.config.update("jax_enable_x64", dtype_name == "float64")
        worst = 0.0
        for case_index, case in enumerate(CASES):
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
        errors[dtype_name] = worst
        print(f"max relative error, {dtype_name}: {worst:.2e}")
    jax.config.update("jax_enable_x64", False)

    timings = {}
    for size in args.sizes.split(","):
        m, n = (int(v) for v in size.split("x"))
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


if __name__ == "__main__":
    main()
