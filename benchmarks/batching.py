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

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from overparam_experiments import flags as xflags
from overparam_experiments import timing
from overparam_optax import linalg

METHODS = ("svd", "eigh", "newton")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value and combination while parsing."""
    fv = flag_values
    flags.DEFINE_integer("count", 4, "same-shaped matrices (K)", lower_bound=2, flag_values=fv)
    xflags.define_size_list("shapes", "512x512,3136x512,128x128", "matrix shapes",
                            flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("N", 3, "the depth", lower_bound=2, flag_values=fv)
    xflags.require_depth_for_methods("N", METHODS, flag_values=fv)  # every method is timed
    flags.DEFINE_integer("repeats", 7, "timed calls", lower_bound=1, flag_values=fv)
    flags.DEFINE_boolean("quick", False, "tiny sizes, for a smoke run", flag_values=fv)
    xflags.define_output_file("out", None, "JSON path (default: results/)", flag_values=fv)


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


def main(args) -> dict:
    """Times every method stacked and one by one; writes the JSON."""
    if args.quick:
        args.shapes, args.repeats = [(16, 8)], 2
    rows = []
    for shape in args.shapes:
        for method in METHODS:
            result = measure(shape, args.count, args.N, method, args.repeats)
            rows.append({"shape": list(shape), "method": method, **result})
            print(
                f"{shape[0]:>5}x{shape[1]:<5} {method:<7} stacked {result['stacked'] * 1e3:8.1f} ms"
                f"  one by one {result['one_by_one'] * 1e3:8.1f} ms"
                f"  ratio {result['ratio_one_by_one_over_stacked']:.2f}"
            )
    out = {
        "environment": timing.environment(),
        "count": args.count,
        "N": args.N,
        "rows": rows,
    }
    path = (
        pathlib.Path(args.out) if args.out else RESULTS / f"batching_{jax.default_backend()}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    xflags.run(define_flags, main)
