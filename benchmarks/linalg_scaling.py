"""Cost of one preconditioner call per method as the matrix grows.

For square n x n and tall 4n x n matrices W (Gaussian entries / sqrt(n): a freshly
initialized layer, condition number ~n for the square ones, the hard case for "eigh") and a
Gaussian gradient G, times one jitted ``precondition_matrix(W, G, N, method=m)`` call for
m in svd, eigh, newton, plus ``apply``: applying cached factors
(``methods.Eigh().apply``), the cost of applying factors already computed. Reports
the relative Frobenius error of each method against the exact path (method="svd") and the
exponent b of a least-squares fit time ~ a * n^b over the sizes >= --fit-from.

Timing: compilation excluded (one warm-up call), jax.block_until_ready, median over
repeats, methods interleaved within each repeat.

Usage (from the repository root):

    python benchmarks/linalg_scaling.py                  # n = 256 .. 4096, a few minutes
    python benchmarks/linalg_scaling.py --quick          # smoke run
    python benchmarks/linalg_scaling.py --platform gpu --sizes 256,512,1024,2048,4096,8192

On CPU "newton" is skipped above --newton-max (default 1024 on CPU: on square matrices it costs
26-66 n^3 matmuls, 2-5x eigh there, and a fixed number of them, so the exponent is fitted
from the smaller n; benchmarks/matmul_method.py times it against Muon).
Writes benchmarks/results/linalg_scaling_<backend>.json.
"""

from __future__ import annotations

import math
import pathlib
import time

import jax
import jax.numpy as jnp
from absl import flags

from overparam_experiments import flags as xflags
from overparam_experiments import timing
from overparam_optax import linalg
from overparam_optax.methods import Eigh

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
FIGURES_DIR = pathlib.Path(__file__).resolve().parents[1] / "docs" / "figures"

METHODS = ("svd", "eigh", "newton", "apply")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value (N against every method) while parsing."""
    fv = flag_values
    xflags.define_platform_flags(flag_values=fv)
    flags.DEFINE_integer("N", 3, "the depth", lower_bound=1, flag_values=fv)
    xflags.require_depth_for_methods("N", ("svd", "eigh", "newton"), flag_values=fv)
    xflags.define_int_list("sizes", None, "n of the n x n runs (default per platform)",
                           flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("tall-max", 1024, "largest n of the 4n x n runs", lower_bound=1,
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("newton-max", None, "largest n timed with newton", lower_bound=1,
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("repeats", 3, "timed calls per size", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("fit-from", 512, "smallest n of the exponent fit", lower_bound=1,
                         flag_values=fv)  # fmt: skip
    xflags.define_output_file("plot", None, "PNG path (default docs/figures/)", flag_values=fv)


def fit_exponent(ns, ts, fit_from):
    """The least-squares slope b of log t = log a + b log n over the sizes n >= fit_from."""
    points = [(math.log(n), math.log(t)) for n, t in zip(ns, ts, strict=True) if n >= fit_from]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def run(args) -> dict:
    """Times every method at every size (the platform set up already).

    Args:
      args: the values of :func:`define_flags` (``xflags.parse(define_flags, argv)``).

    Returns:
      The record: ``args``, ``N``, one row per shape and size (seconds and relative error
      per method) and the fitted exponents.
    """
    backend = jax.default_backend()
    if args.sizes:
        sizes = args.sizes
    elif args.quick:
        sizes = [32, 64]
    else:
        sizes = [256, 512, 1024, 2048, 4096] + ([8192] if backend != "cpu" else [])
    newton_max = args.newton_max or (1024 if backend == "cpu" else max(sizes))
    tall_max = 64 if args.quick else args.tall_max
    N = args.N
    eigh, highest = Eigh(), jax.lax.Precision.HIGHEST

    def make_call(method):
        if method == "apply":
            return jax.jit(
                lambda factors, g: g if N == 1 else eigh.apply(factors, g, N, highest),
                donate_argnums=(),
            )
        return jax.jit(lambda w, g: linalg.precondition_matrix(w, g, N, method=method))

    calls = {m: make_call(m) for m in METHODS}
    factor_fn = jax.jit(lambda w: eigh.factors(w, N, highest))

    rows = []
    for shape_kind in ("square", "tall"):
        for n in sizes:
            if shape_kind == "tall" and n > tall_max:
                continue
            m = n if shape_kind == "square" else 4 * n
            key_w, key_g = jax.random.split(jax.random.PRNGKey(n))
            w = jax.random.normal(key_w, (m, n), jnp.float32) / math.sqrt(n)
            g = jax.random.normal(key_g, (m, n), jnp.float32)
            methods = [x for x in METHODS if not (x == "newton" and n > newton_max)]
            factors = jax.block_until_ready(factor_fn(w))
            operands = {x: ((factors, g) if x == "apply" else (w, g)) for x in methods}
            outputs = {x: jax.block_until_ready(calls[x](*operands[x])) for x in methods}
            exact = outputs["svd"]
            norm = float(jnp.linalg.norm(exact))
            errors = {x: float(jnp.linalg.norm(outputs[x] - exact)) / norm for x in methods}
            repeats = args.repeats if n <= 1024 else 1
            if args.quick:
                repeats = 1
            times = {x: [] for x in methods}
            for _ in range(repeats):
                for x in methods:
                    begin = time.perf_counter()
                    jax.block_until_ready(calls[x](*operands[x]))
                    times[x].append(time.perf_counter() - begin)
            row = {
                "shape": shape_kind,
                "m": m,
                "n": n,
                "seconds": {x: timing.median(times[x]) for x in methods},
                "relative_error_vs_svd": errors,
                "repeats": repeats,
            }
            rows.append(row)
            cells = "  ".join(
                f"{x} {1e3 * row['seconds'][x]:9.1f} ms ({errors[x]:.1e})" for x in methods
            )
            print(f"{shape_kind:>6} {m:5d}x{n:<5d} {cells}", flush=True)

    exponents = {}
    for shape_kind in ("square", "tall"):
        for x in METHODS:
            pts = _timings(rows, shape_kind, x)
            if pts:
                exponents[f"{shape_kind}/{x}"] = fit_exponent(
                    [p[0] for p in pts], [p[1] for p in pts], args.fit_from if not args.quick else 0
                )
    print("fitted exponents (time ~ n^b):")
    for name, b in exponents.items():
        print(f"  {name:>14}: {'n/a' if b is None else f'{b:.2f}'}")

    return {"args": vars(args), "N": N, "rows": rows, "fitted_exponents": exponents}


def main(args) -> dict:
    """Times every method at every size; writes and returns the JSON record (and a plot)."""
    xflags.setup_platform(args)
    payload = run(args)
    if not args.quick:
        _plot(payload["rows"], args, jax.default_backend())
    timing.write_json(args, "linalg_scaling", payload, RESULTS_DIR)
    return payload


def _timings(rows, shape_kind: str, method: str) -> list[tuple[int, float]]:
    """(n, seconds) of one method on one shape family, for the fit and the plot."""
    return [
        (r["n"], r["seconds"][method])
        for r in rows
        if r["shape"] == shape_kind and method in r["seconds"]
    ]


def _plot(rows, args, backend) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, shape_kind in zip(axes, ("square", "tall"), strict=True):
        for x in METHODS:
            pts = _timings(rows, shape_kind, x)
            if pts:
                ax.loglog(*zip(*pts, strict=True), marker="o", label=x)
        ax.set_title(
            f"{shape_kind} ({'n x n' if shape_kind == 'square' else '4n x n'}), N={args.N}"
        )
        sizes = sorted({r["n"] for r in rows if r["shape"] == shape_kind})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("n")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds per call")
    axes[0].legend()
    fig.suptitle(f"precondition_matrix cost per method ({backend})")
    fig.tight_layout()
    path = (
        pathlib.Path(args.plot)
        if args.plot
        else FIGURES_DIR / f"linalg_scaling_{backend}.png"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    xflags.run(define_flags, main)
