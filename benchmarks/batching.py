"""Does batching same-shaped matrices into one call pay? Stacked vs one call per matrix.

The transform stacks the matrices of equal shape (across leaves) and computes their
factors in one batched call, then splits the result. This measures the alternative, one
call per matrix, side by side (interleaved repeats, medians), for each method, on K
same-shaped matrices, float32, the factors plus their application (what one update does):

    python benchmarks/batching.py                 # 2048-wide MLP-like: 4 x (512 x 512)
    python benchmarks/batching.py --quick         # smoke run

Writes benchmarks/results/batching_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from overparam_optax import linalg

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4, help="same-shaped matrices (K)")
    parser.add_argument("--shapes", default="512x512,3136x512,128x128", help="rows x cols list")
    parser.add_argument("--N", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--out", default=None, help="JSON path (default: results/)")
    args = parser.parse_args(argv)
    if args.count < 2 or args.repeats < 1 or args.N < 2:
        parser.error("--count must be >= 2, --repeats >= 1 and --N >= 2")
    try:
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes must look like 512x512,3136x512, got {args.shapes!r}")
    if args.quick:
        args.shapes, args.repeats = [(16, 8)], 2
    return args


def _timed(fn, *xs) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*xs))
    return time.perf_counter() - start


def measure(shape, count, N, method, repeats) -> dict:
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(count, *shape)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(count, *shape)), jnp.float32)
    stacked = jax.jit(lambda w, g: linalg.precondition_matrix(w, g, N, method=method))
    one_by_one = jax.jit(
        lambda w, g: [
            linalg.precondition_matrix(w[i], g[i], N, method=method) for i in range(count)
        ]
    )
    _timed(stacked, w, g), _timed(one_by_one, w, g)  # compile
    times = {"stacked": [], "one_by_one": []}
    for _ in range(repeats):  # interleaved, so that load drifts hit both alike
        times["stacked"].append(_timed(stacked, w, g))
        times["one_by_one"].append(_timed(one_by_one, w, g))
    medians = {k: float(np.median(v)) for k, v in times.items()}
    return {**medians, "ratio_one_by_one_over_stacked": medians["one_by_one"] / medians["stacked"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = []
    for shape in args.shapes:
        for method in ("svd", "eigh", "newton"):
            result = measure(shape, args.count, args.N, method, args.repeats)
            rows.append({"shape": list(shape), "method": method, **result})
            print(
                f"{shape[0]:>5}x{shape[1]:<5} {method:<7} stacked {result['stacked'] * 1e3:8.1f} ms"
                f"  one by one {result['one_by_one'] * 1e3:8.1f} ms"
                f"  ratio {result['ratio_one_by_one_over_stacked']:.2f}"
            )
    out = {
        "command": " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "cpu": platform.processor() or platform.machine(),
        "jax_version": jax.__version__,
        "count": args.count,
        "N": args.N,
        "rows": rows,
    }
    path = (
        pathlib.Path(args.out) if args.out else RESULTS / f"batching_{jax.default_backend()}.json"
    )
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
