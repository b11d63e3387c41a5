"""The matmul-only method against Muon's Newton-Schulz, and every method on the CNN shapes.

Issue 12 (item 2) asks for ``method="newton"`` (factors + apply, matmuls only) in at most 2x
the time of optax.contrib's 5-step Newton-Schulz orthogonalization of the same matrix
(``optax.contrib._muon.orthogonalize_via_newton_schulz`` with its default coefficients),
at <= 1e-3 relative error (Frobenius) for spectra of condition number up to 1e3 and every
N <= 8. Sections (each can be skipped):

* ``ratio``: for 1024 x 1024 and 3136 x 512 float32, N = 2..8: time of one jitted
  ``apply_depth_factors(depth_factors(W, N, "newton"), G, N)`` divided by the time of
  Muon's Newton-Schulz on G (same shape), measured interleaved (Muon, then every N, in
  each repeat; the median of the per-repeat ratios), side by side with the relative error
  against the exact float64 P_W(G) for spectra of condition number 1, 1e1, 1e2, 1e3
  (log-spaced singular values, random singular vectors), and the traced matmul count.
  ``--ratio-precisions`` (default HIGHEST) times and checks the method at each matmul
  precision named (``jax.lax.Precision`` or ``jax.lax.DotAlgorithmPreset`` names; on a GPU
  these are real lower-precision passes). Muon is also timed at "highest" precision.
* ``precision``: the same errors with every matmul of the method computed from inputs
  rounded to bfloat16 (one bf16 pass, XLA's DEFAULT on TPU), to bf16 hi+lo with three
  products (HIGH on TPU) and to 10 mantissa bits (TF32, DEFAULT on NVIDIA GPUs), then
  accumulated in float32. This is an emulation on CPU (``jax.lax.reduce_precision`` of
  the operands), not a measurement on the hardware.
* ``tune`` (not run by default; needs scipy): recomputes the coefficient tables of
  linalg's matmul-only method (greedy minimax steps) and prints the largest difference.
* ``depth``: the error of every method for N = 9 .. 1000 on a 96 x 64 matrix of condition
  number 1e3 ("newton" also beyond linalg.NEWTON_MAX_DEPTH, which it refuses in the API,
  to show why the limit is where it is).
* ``cnn``: every method (factors + apply, ``precondition_matrix`` jitted) and Muon's
  Newton-Schulz on the paper's CNN kernels (25x32, 800x64, 3136x512, 512x10), N = 3,
  float32, in subprocesses: OPENBLAS_NUM_THREADS unset (what users get) or 1, each with
  0 and 1 (``--busy-processes``) busy processes (``python -c "while True: pass"``) beside it.

Usage (from the repository root):

    python benchmarks/matmul_method.py            # all sections, ~10 min on 2 CPU cores
    python benchmarks/matmul_method.py --quick    # smoke run (small shapes), seconds
    python benchmarks/matmul_method.py --sections ratio --repeats 7

Writes benchmarks/results/matmul_method_<backend>.json (device, jax version, command), or
with --sections other than the default, matmul_method_<sections>_<backend>.json, so that a
partial run never replaces the full record (--out overrides both).
This script leaves OPENBLAS_NUM_THREADS alone in the main process (the cnn section sets
it per subprocess); --blas-threads is refused.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import flags

from overparam_optax.experiments import flags as xflags
from overparam_optax.experiments import timing as common

REPO = pathlib.Path(__file__).resolve().parents[1]
CNN_SHAPES = ((25, 32), (800, 64), (3136, 512), (512, 10))
PRECISIONS = ("float32", "bf16x3", "tf32", "bf16")
DEFAULT_SECTIONS = ("ratio", "precision", "depth", "cnn")
ALL_SECTIONS = (*DEFAULT_SECTIONS, "tune")
ERROR_DEPTHS = (9, 16, 32, 64, 128, 200, 500, 1000)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line; absl checks every value (depths against newton) while parsing."""
    fv = flag_values
    xflags.define_platform_flags(flag_values=fv)
    xflags.require(["blas-threads"], lambda threads: threads == 0, "--blas-threads is not "
                   "supported here: the cnn section sets OPENBLAS_NUM_THREADS per subprocess, "
                   "and the main process leaves it as users have it", flag_values=fv)
    xflags.define_enum_list("sections", ",".join(DEFAULT_SECTIONS), ALL_SECTIONS,
                            "sections to run", flag_values=fv)  # fmt: skip
    xflags.define_int_list("depths", "2,3,4,5,6,7,8", "ratio: depths N", flag_values=fv)
    xflags.require_depth_for_methods("depths", ("newton",), flag_values=fv)
    xflags.define_float_list("conditions", "1,1e1,1e2,1e3", "ratio: condition numbers",
                             lower_bound=1.0, flag_values=fv)  # fmt: skip
    xflags.define_size_list("shapes", None, "e.g. 1024x1024,3136x512", flag_values=fv)
    flags.DEFINE_integer("repeats", 5, "timed calls", lower_bound=1, flag_values=fv)
    xflags.define_enum_list(
        "ratio-precisions", "HIGHEST", _precision_names(), "ratio: matmul precisions of the "
        "timed method, names of jax.lax.Precision or jax.lax.DotAlgorithmPreset (e.g. "
        "HIGHEST,BF16_BF16_F32_X3,TF32_TF32_F32,DEFAULT)", flag_values=fv,
    )  # fmt: skip
    xflags.define_int_list("precision-depths", "2,3,5,8", "precision: depths N", flag_values=fv)
    xflags.require_depth_for_methods("precision-depths", ("newton",), flag_values=fv)
    xflags.define_int_list(
        "error-depths", ",".join(map(str, ERROR_DEPTHS)), "depth: depths N of the error "
        "table (newton beyond its limit too, through the private path)", flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_integer("cnn-repeats", 15, "cnn: timed calls", lower_bound=1, flag_values=fv)
    xflags.define_int_list("busy-processes", "0,1", "cnn: spinning processes beside the "
                           "timing", lower_bound=0, upper_bound=64, flag_values=fv)  # fmt: skip
    flags.DEFINE_string("cnn-worker", None, "(internal) the cnn worker's JSON path",
                        flag_values=fv)  # fmt: skip


def _precision_names() -> tuple[str, ...]:
    import jax

    names = (*jax.lax.Precision.__members__, *jax.lax.DotAlgorithmPreset.__members__)
    return tuple(dict.fromkeys(names))


def result_name(sections) -> str:
    """The results file's stem: "matmul_method", suffixed with the sections of a subset."""
    if list(sections) == list(DEFAULT_SECTIONS):
        return "matmul_method"
    return "_".join(("matmul_method", *sections))


def _precision(name):
    """The jax.lax.Precision or DotAlgorithmPreset called ``name``, or None."""
    import jax

    for kind in (jax.lax.Precision, jax.lax.DotAlgorithmPreset):
        if name in kind.__members__:
            return kind[name]
    return None


def _muon_ns(matmul_precision=None):
    """Muon's 5-step Newton-Schulz, jitted, under ``jax.default_matmul_precision``
    (None: jax's default, what Muon users get)."""
    import jax
    import jax.numpy as jnp
    from optax.contrib._muon import _DEFAULT_NS_COEFFS, orthogonalize_via_newton_schulz

    coeffs = jnp.asarray(_DEFAULT_NS_COEFFS)

    def orthogonalize(g):
        with jax.default_matmul_precision(matmul_precision):  # applies while jit traces
            return orthogonalize_via_newton_schulz(g, coeffs, 5)

    return jax.jit(orthogonalize)


def _matrix(rng, m, n, condition):
    """A float64 m x n matrix (m >= n) with log-spaced singular values in [1/condition, 1]."""
    import numpy as np

    u, _ = np.linalg.qr(rng.standard_normal((m, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.logspace(0, -np.log10(condition), n) if condition > 1 else np.ones(n)
    return (u * s) @ v.T


def _exact(w, g, N):
    """P_W(G) in float64 from numpy's SVD (the kernel of linalg's module docstring)."""
    import numpy as np

    u, s, vt = np.linalg.svd(w, full_matrices=False)
    x = s ** (2.0 / N)
    kernel = sum(np.outer(x ** (j - 1), x ** (N - j)) for j in range(1, N + 1))
    d = x ** (N - 1)
    b = g @ vt.T
    a = u.T @ b
    return (u @ ((kernel - d[None, :]) * a) + b * d[None, :]) @ vt


def _rel(a, b):
    import numpy as np

    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _emulated_matmul(kind):
    """A drop-in for linalg._mm whose operands are rounded like a lower-precision pass."""
    import jax
    import jax.numpy as jnp

    def rounded(x, mantissa):
        return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=mantissa)

    def mm(x, y, precision):
        del precision
        hi = jax.lax.Precision.HIGHEST
        if kind == "bf16":
            return jnp.matmul(rounded(x, 7), rounded(y, 7), precision=hi)
        if kind == "tf32":
            return jnp.matmul(rounded(x, 10), rounded(y, 10), precision=hi)
        if kind == "bf16x3":
            x_hi, y_hi = rounded(x, 7), rounded(y, 7)
            x_lo, y_lo = rounded(x - x_hi, 7), rounded(y - y_hi, 7)
            return (
                jnp.matmul(x_hi, y_hi, precision=hi)
                + jnp.matmul(x_hi, y_lo, precision=hi)
                + jnp.matmul(x_lo, y_hi, precision=hi)
            )
        raise ValueError(kind)

    return mm


def matmul_counts(m, n, N):
    """Products of method="newton" (factors + apply) for a tall m x n W, counted by tracing."""
    import jax
    import jax.numpy as jnp

    from overparam_optax import linalg

    counts = {"m_n_n": 0, "n_n_n": 0}
    saved = linalg._mm

    def counting(x, y, precision):
        big = max(x.shape[-2], x.shape[-1], y.shape[-1]) > n
        counts["m_n_n" if big else "n_n_n"] += 1
        return saved(x, y, precision)

    linalg._mm = counting
    try:
        jax.eval_shape(
            lambda w, g: linalg.apply_depth_factors(linalg.depth_factors(w, N, "newton"), g, N),
            jax.ShapeDtypeStruct((m, n), jnp.float32),
            jax.ShapeDtypeStruct((m, n), jnp.float32),
        )
    finally:
        linalg._mm = saved
    counts["multiply_adds"] = counts["m_n_n"] * m * n * n + counts["n_n_n"] * n**3
    return counts


def muon_multiply_adds(m, n):
    """Muon's 5 steps on the wide orientation: 2 (small x large x small) products + 1 small^3."""
    small, large = min(m, n), max(m, n)
    return 5 * (2 * small * small * large + small**3)


def _time_interleaved(calls: dict, repeats: int, reference: str):
    """Median over repeats of each call's time / the reference's time in the same repeat."""
    import jax

    for fn, operands in calls.values():
        jax.block_until_ready(fn(*operands))  # compile
    seconds = {k: [] for k in calls}
    for _ in range(repeats):
        for key, (fn, operands) in calls.items():
            begin = time.perf_counter()
            jax.block_until_ready(fn(*operands))
            seconds[key].append(time.perf_counter() - begin)
    ratios = {
        k: common.median([t / r for t, r in zip(v, seconds[reference], strict=True)])
        for k, v in seconds.items()
    }
    return {k: common.median(v) for k, v in seconds.items()}, ratios


def section_ratio(args, shapes, depths, conditions, after_shape=lambda rows: None):
    """Newton (factors + apply) against Muon's Newton-Schulz, per shape, depth and precision.

    Muon is timed at jax's default matmul precision (``muon``, what its users get) and at
    "highest" (``muon_highest``); the ratio is to the former. Each precision in
    ``--ratio-precisions`` is a separate timed call of the method, with its own errors.
    ``after_shape(rows)`` runs after each shape (main saves the rows so far: a run cut off
    by a time limit keeps its finished shapes).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from overparam_optax import linalg

    precisions = args.ratio_precisions
    rows = []
    for m, n in shapes:
        rng = np.random.default_rng(m * 7 + n)
        g64 = rng.standard_normal((m, n))
        g = jnp.asarray(g64, jnp.float32)
        w_time = jnp.asarray(_matrix(rng, m, n, 1e2), jnp.float32)
        calls = {"muon": (_muon_ns(), (g,)), "muon_highest": (_muon_ns("highest"), (g,))}
        newton = {}
        for N in depths:
            for name in precisions:
                precision = _precision(name)
                newton[N, name] = jax.jit(
                    lambda w, g, N=N, p=precision: linalg.apply_depth_factors(
                        linalg.depth_factors(w, N, "newton", precision=p), g, N, precision=p
                    )
                )
                calls[N, name] = (newton[N, name], (w_time, g))
        seconds, ratios = _time_interleaved(calls, args.repeats, "muon")
        errors = {key: {} for key in newton}
        eigh_errors = {N: {} for N in depths}
        for condition in conditions:
            w64 = _matrix(rng, m, n, condition)
            w = jnp.asarray(w64, jnp.float32)
            for N in depths:
                exact = _exact(w64, g64, N)
                for name in precisions:
                    errors[N, name][condition] = _rel(newton[N, name](w, g), exact)
                eigh = linalg.precondition_matrix(w, g, N, method="eigh")
                eigh_errors[N][condition] = _rel(eigh, exact)
        muon_ma = muon_multiply_adds(m, n)
        for N in depths:
            counts = matmul_counts(m, n, N)
            for name in precisions:
                key = (N, name)
                row = {
                    "m": m,
                    "n": n,
                    "N": N,
                    "precision": name,
                    "seconds": seconds[key],
                    "muon_seconds": seconds["muon"],
                    "muon_highest_seconds": seconds["muon_highest"],
                    "ratio_to_muon": ratios[key],
                    "ratio_to_muon_highest": seconds[key] / seconds["muon_highest"],
                    "matmuls": counts,
                    "multiply_add_ratio_to_muon": counts["multiply_adds"] / muon_ma,
                    "relative_error": {f"{c:g}": e for c, e in errors[key].items()},
                    "eigh_relative_error": {f"{c:g}": e for c, e in eigh_errors[N].items()},
                }
                rows.append(row)
                cells = "  ".join(f"k={c:g}: {e:.1e}" for c, e in errors[key].items())
                print(
                    f"{m}x{n} N={N} {name}: {1e3 * seconds[key]:7.1f} ms, muon "
                    f"{1e3 * seconds['muon']:6.1f} ms (highest "
                    f"{1e3 * seconds['muon_highest']:6.1f}), ratio {ratios[key]:4.2f} (counted "
                    f"{row['multiply_add_ratio_to_muon']:4.2f}); error {cells}",
                    flush=True,
                )
        after_shape(rows)
    return rows


def section_precision(args, shapes, depths):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from overparam_optax import linalg

    rows = []
    saved = linalg._mm
    for m, n in shapes:
        rng = np.random.default_rng(m + n)
        w64 = _matrix(rng, m, n, 1e3)
        g64 = rng.standard_normal((m, n))
        w, g = jnp.asarray(w64, jnp.float32), jnp.asarray(g64, jnp.float32)
        for N in depths:
            exact = _exact(w64, g64, N)
            row = {"m": m, "n": n, "N": N, "condition": 1e3, "relative_error": {}}
            for kind in PRECISIONS:
                linalg._mm = saved if kind == "float32" else _emulated_matmul(kind)
                try:
                    fn = jax.jit(
                        lambda w, g, N=N: linalg.apply_depth_factors(
                            linalg.depth_factors(w, N, "newton"), g, N
                        )
                    )
                    row["relative_error"][kind] = _rel(fn(w, g), exact)
                finally:
                    linalg._mm = saved
            rows.append(row)
            cells = "  ".join(f"{k}: {e:.1e}" for k, e in row["relative_error"].items())
            print(f"{m}x{n} N={N} condition 1e3: {cells}", flush=True)
    return rows


def section_depth(args):
    """Errors at depth N for every method (newton beyond its limit through the private path)."""
    import jax.numpy as jnp
    import numpy as np

    from overparam_optax import linalg

    m, n = (24, 16) if args.quick else (96, 64)
    depths = args.error_depths[:3] if args.quick else args.error_depths
    rng = np.random.default_rng(5)
    w64 = _matrix(rng, m, n, 1e3)
    g64 = rng.standard_normal((m, n))
    w, g = jnp.asarray(w64, jnp.float32), jnp.asarray(g64, jnp.float32)
    rows = []
    for N in depths:
        exact = _exact(w64, g64, N)
        row = {"m": m, "n": n, "N": N, "condition": 1e3, "relative_error": {}}
        for method in ("svd", "eigh"):
            out = linalg.apply_depth_factors(linalg.depth_factors(w, N, method), g, N)
            row["relative_error"][method] = _rel(out, exact)
        factors = linalg._newton_polar_root(w, N, jax_highest())  # no depth check
        row["relative_error"]["newton"] = _rel(linalg.apply_depth_factors(factors, g, N), exact)
        row["newton_accepted"] = N <= linalg.NEWTON_MAX_DEPTH
        rows.append(row)
        cells = "  ".join(f"{k}: {e:.1e}" for k, e in row["relative_error"].items())
        print(f"{m}x{n} condition 1e3, N={N}: {cells}", flush=True)
    return rows


def jax_highest():
    import jax

    return jax.lax.Precision.HIGHEST


def _minimize_from(fn, starts):
    """The best of Nelder-Mead minimizations of ``fn`` from each start (scipy's result)."""
    from scipy.optimize import minimize

    options = dict(xatol=1e-12, fatol=1e-14, maxiter=20000)
    runs = (minimize(fn, x0, method="Nelder-Mead", options=options) for x0 in starts)
    return min(runs, key=lambda r: r.fun)


def _polar_step(lower, upper):
    """Greedy minimax odd quintic x (a + b x^2 + c x^4) ~ 1 on [lower, upper] (Polar Express)."""
    import numpy as np
    xs = np.concatenate([np.geomspace(lower, upper, 400), np.linspace(lower, upper, 400)])

    def worst(coeffs):
        a, b, c = coeffs
        return np.max(np.abs(1 - xs * (a + b * xs**2 + c * xs**4)))

    # Polar Express's first step for [1e-3, 1], Muon's quintic and the Newton-Schulz quintic.
    starts = [(8.28721201814563, -23.595886519098837, 17.300387312530933)]
    starts += [(3.4445, -4.775, 2.0315), (1.875, -1.25, 0.375)]
    starts.append((4.0, -6.0, 2.5))
    best = _minimize_from(worst, starts)
    image = xs * (best.x[0] + best.x[1] * xs**2 + best.x[2] * xs**4)
    return tuple(best.x), image.min(), image.max()


def _root_step(lower, upper, p, gamma):
    """Greedy B = a + b m + c m^2 narrowing log(m B^p) on [lower, upper], conditioning <= gamma."""
    import numpy as np
    ms = np.concatenate([np.geomspace(lower, upper, 600), np.linspace(lower, upper, 600)])
    grid = np.linspace(0, upper, 300)

    def spread(coeffs):
        b, c = coeffs
        values = 1 + b * grid + c * grid**2
        if np.any(values <= 0):
            return 1e9
        condition = np.max((1 + abs(b) * grid + abs(c) * grid**2) / values)
        log_image = np.log(ms) + p * np.log(1 + b * ms + c * ms**2)
        return log_image.max() - log_image.min() + max(0.0, 1e3 * (condition - gamma))

    starts = [(-1 / (p + 1), 0), (-0.5 / p, 0), (-2, 1), (-1, 0.3), (-1.5, 0.6), (-0.5, 0.05)]
    starts.append((-0.3, 0.02))
    best = _minimize_from(spread, starts)
    b, c = best.x
    image = ms * (1 + b * ms + c * ms**2) ** p
    lo, hi = image.min(), image.max()
    shift = (lo * hi) ** (-0.5 / p)  # center the new interval on 1 (in log scale)
    return (shift, shift * b, shift * c), lo * shift**p, hi * shift**p


#: (lower end, conditioning bound, steps) of each root table, as chosen with the scalar model.
ROOT_TABLES = {
    2: (1e-3, 8.0, 5),
    3: (1e-3, 8.0, 5),
    4: (3e-4, 5.0, 5),
    5: (1e-3, 8.0, 4),
    7: (1e-3, 8.0, 4),
}


def section_tune(args):
    """Recomputes linalg's coefficient tables (needs scipy) and compares them."""
    from overparam_optax import linalg

    polar, lower, upper = [], 4e-4, 1.0
    for _ in range(len(linalg._POLAR_STEPS)):
        coeffs, lower, upper = _polar_step(lower, upper)
        polar.append(coeffs)
    roots = {}
    for p, (low, gamma, steps) in ROOT_TABLES.items():
        table, lower, upper = [], low, 1.05
        for _ in range(steps):
            coeffs, lower, upper = _root_step(lower, upper, p, gamma)
            table.append(coeffs)
        roots[p] = table
    worst = max(
        abs(x - y)
        for new, old in [(polar, linalg._POLAR_STEPS)]
        + [(roots[p], linalg._ROOT_STEPS[p]) for p in roots]
        for row_new, row_old in zip(new, old, strict=True)
        for x, y in zip(row_new, row_old, strict=True)
    )
    print("polar steps:", [tuple(round(x, 10) for x in c) for c in polar])
    for p, table in roots.items():
        print(f"root steps p={p}:", [tuple(round(x, 10) for x in c) for c in table])
    print(f"largest difference from linalg's tables: {worst:.1e}")
    return {"polar": polar, "root": {str(p): t for p, t in roots.items()}, "max_diff": worst}


def cnn_worker(args) -> None:
    """Times every method on the CNN shapes in this process's environment (a subprocess)."""
    import jax
    import jax.numpy as jnp

    from overparam_optax import linalg

    muon = _muon_ns()
    shapes = CNN_SHAPES if not args.quick else ((25, 32),)
    methods = ("svd", "eigh", "newton")
    calls = {}
    for m, n in shapes:
        key = jax.random.PRNGKey(m * n)
        w = jax.random.normal(key, (m, n), jnp.float32) / (max(m, n) ** 0.5)
        g = jax.random.normal(jax.random.fold_in(key, 1), (m, n), jnp.float32)
        for method in methods:
            fn = jax.jit(
                lambda w, g, method=method: linalg.precondition_matrix(w, g, 3, method=method)
            )
            calls[f"{method}/{m}x{n}"] = (fn, (w, g))
        calls[f"muon/{m}x{n}"] = (muon, (g,))
    first = next(iter(calls))
    seconds, _ = _time_interleaved(calls, args.cnn_repeats, first)
    totals = {}
    for contender in (*methods, "muon"):
        totals[contender] = sum(seconds[f"{contender}/{m}x{n}"] for m, n in shapes)
    payload = {
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "load_average": os.getloadavg(),
        "seconds": seconds,
        "total_seconds": totals,
    }
    pathlib.Path(args.cnn_worker).write_text(json.dumps(payload))


def _cnn_subprocess(args, blas: str | None, busy: int) -> dict:
    """Runs the cnn worker with OPENBLAS_NUM_THREADS=blas (None: unset) and `busy` spinners."""
    env = dict(os.environ)
    env.pop("OPENBLAS_NUM_THREADS", None)
    if blas is not None:
        env["OPENBLAS_NUM_THREADS"] = blas
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "cnn.json"
            command = [sys.executable, __file__, "--cnn-worker", str(out)]
            command += ["--cnn-repeats", str(2 if args.quick else args.cnn_repeats)]
            command += ["--quick"] if args.quick else []
            command += ["--platform", args.platform] if args.platform else []
            subprocess.run(command, env=env, check=True, timeout=1800)
            payload = json.loads(out.read_text())
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    payload["busy_processes"] = busy
    return payload


def section_cnn(args):
    busy_counts = args.busy_processes
    configurations = [(blas, busy) for blas in (None, "1") for busy in busy_counts]
    if args.quick:  # one subprocess, no busy process: a smoke run
        configurations = [(None, 0)]
    results = []
    for blas, busy in configurations:
        payload = _cnn_subprocess(args, blas, busy)
        results.append(payload)
        totals = "  ".join(f"{k} {1e3 * v:7.1f}" for k, v in payload["total_seconds"].items())
        label = f"OPENBLAS_NUM_THREADS={blas or 'unset'}, {busy} busy process(es)"
        print(f"{label:38s} total ms: {totals}", flush=True)
    return results


def main(args) -> dict:
    """Runs the chosen sections, saving the record after each."""
    xflags.setup_platform(args)  # jax is imported already: the environment alone is too late
    if args.cnn_worker:
        cnn_worker(args)
        return {}
    sections, depths, conditions = args.sections, args.depths, args.conditions
    if args.shapes:
        shapes = args.shapes
    elif args.quick:
        shapes = [(48, 24)]
    else:
        shapes = [(1024, 1024), (3136, 512)]
    if args.quick:
        depths, conditions = depths[:2], conditions[-1:]
    payload = {"args": _recorded_args(args)}

    def save():
        common.write_json(args, result_name(sections), payload, REPO / "benchmarks" / "results")

    if "ratio" in sections:

        def save_rows(rows):
            payload["ratio"] = rows
            save()

        payload["ratio"] = section_ratio(args, shapes, depths, conditions, save_rows)
    if "precision" in sections:
        precision_depths = args.precision_depths
        payload["precision"] = section_precision(
            args, shapes, precision_depths[:1] if args.quick else precision_depths
        )
    if "tune" in sections:
        payload["tune"] = section_tune(args)
    if "depth" in sections:
        payload["depth"] = section_depth(args)
    if "cnn" in sections:
        payload["cnn"] = section_cnn(args)
    save()
    return payload


def _recorded_args(args) -> dict:
    """The flags as the record has always stored them: lists as comma text."""
    def text(value):
        if isinstance(value, list):
            return ",".join("x".join(map(str, v)) if isinstance(v, tuple) else f"{v:g}"
                            if isinstance(v, float) else str(v) for v in value)  # fmt: skip
        return value

    return {name: text(value) for name, value in vars(args).items()}


if __name__ == "__main__":
    xflags.run(define_flags, main)
