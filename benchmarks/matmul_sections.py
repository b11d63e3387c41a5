"""The sections of ``benchmarks/matmul_method.py``: the matmul-only method against Muon.

``section_ratio`` times method="newton" (factors + apply) against Muon's Newton-Schulz per
shape, depth and matmul precision; ``section_precision`` measures its error when the
matmuls run in lower precision (emulated); ``section_depth`` its error at large depths;
``section_tune`` recomputes the coefficient tables of ``overparam_optax.methods.newton``.
The benchmark's docstring describes them.

Every product of the library goes through ``numerics.matmul``, so emulating a precision or
counting products is a callable ``(x, y) -> x @ y`` passed as ``precision``.
"""

from __future__ import annotations

import time

from overparam_experiments import timing as common

PRECISIONS = ("float32", "bf16x3", "tf32", "bf16")


def _precision(name):
    """The jax.lax.Precision or DotAlgorithmPreset called ``name``, or None."""
    import jax

    for kind in (jax.lax.Precision, jax.lax.DotAlgorithmPreset):
        if name in kind.__members__:
            return kind[name]
    return None


def muon_ns(matmul_precision=None):
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
    """P_W(G) in float64 from numpy's SVD (the kernel of numerics' module docstring)."""
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


def factors_and_apply(method, w, g, N, precision):
    """P_W(G) for tall w from ``method``'s factors and their application, the depth checked
    as the API checks it (newton's limit)."""
    from overparam_optax import methods

    chosen = methods.resolve(method)
    chosen.check_depth(N)
    factors = chosen.factors(w, N, precision)
    return g if N == 1 else chosen.apply(factors, g, N, precision)


def emulated_matmul(kind):
    """A matmul ``(x, y) -> x @ y`` (a ``precision=``) whose operands are rounded like a
    lower-precision pass.

    ``kind``: "bf16" (one pass on bfloat16 operands), "tf32" (operands rounded to 10
    mantissa bits) or "bf16x3" (each operand split into a bfloat16 high and low part, three
    passes: hi hi + hi lo + lo hi), each accumulated in float32, as GPUs and TPUs run them.
    """
    import jax
    import jax.numpy as jnp

    def rounded(x, mantissa):
        return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=mantissa)

    def mm(x, y):
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


def emulated_precision(kind: str, precision):
    """The ``precision=`` that emulates ``kind`` in every product of the library
    (:func:`emulated_matmul`); "float32" is ``precision`` itself."""
    return precision if kind == "float32" else emulated_matmul(kind)


def matmul_counts(m, n, N):
    """Products of method="newton" (factors + apply) for a tall m x n W, counted by tracing."""
    import jax
    import jax.numpy as jnp

    from overparam_optax import numerics

    counts = {"m_n_n": 0, "n_n_n": 0}

    def counting(x, y):
        big = max(x.shape[-2], x.shape[-1], y.shape[-1]) > n
        counts["m_n_n" if big else "n_n_n"] += 1
        return numerics.matmul(x, y, jax.lax.Precision.HIGHEST)

    jax.eval_shape(
        lambda w, g: factors_and_apply("newton", w, g, N, counting),
        jax.ShapeDtypeStruct((m, n), jnp.float32),
        jax.ShapeDtypeStruct((m, n), jnp.float32),
    )
    counts["multiply_adds"] = counts["m_n_n"] * m * n * n + counts["n_n_n"] * n**3
    return counts


def muon_multiply_adds(m, n):
    """Muon's 5 steps on the wide orientation: 2 (small x large x small) products + 1 small^3."""
    small, large = min(m, n), max(m, n)
    return 5 * (2 * small * small * large + small**3)


def time_calls_interleaved(calls: dict, repeats: int, reference: str):
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
        calls = {"muon": (muon_ns(), (g,)), "muon_highest": (muon_ns("highest"), (g,))}
        newton = {}
        for N in depths:
            for name in precisions:
                precision = _precision(name)
                newton[N, name] = jax.jit(
                    lambda w, g, N=N, p=precision: factors_and_apply("newton", w, g, N, p)
                )
                calls[N, name] = (newton[N, name], (w_time, g))
        seconds, ratios = time_calls_interleaved(calls, args.repeats, "muon")
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

    rows = []
    for m, n in shapes:
        rng = np.random.default_rng(m + n)
        w64 = _matrix(rng, m, n, 1e3)
        g64 = rng.standard_normal((m, n))
        w, g = jnp.asarray(w64, jnp.float32), jnp.asarray(g64, jnp.float32)
        for N in depths:
            exact = _exact(w64, g64, N)
            row = {"m": m, "n": n, "N": N, "condition": 1e3, "relative_error": {}}
            for kind in PRECISIONS:
                p = emulated_precision(kind, jax_highest())
                fn = jax.jit(lambda w, g, N=N, p=p: factors_and_apply("newton", w, g, N, p))
                row["relative_error"][kind] = _rel(fn(w, g), exact)
            rows.append(row)
            cells = "  ".join(f"{k}: {e:.1e}" for k, e in row["relative_error"].items())
            print(f"{m}x{n} N={N} condition 1e3: {cells}", flush=True)
    return rows


def section_depth(args):
    """Errors at depth N for every method (newton beyond its limit: polar_root skips the check)."""
    import jax.numpy as jnp
    import numpy as np

    from overparam_optax import methods
    from overparam_optax.methods import newton

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
            out = factors_and_apply(method, w, g, N, jax_highest())
            row["relative_error"][method] = _rel(out, exact)
        factors = newton.polar_root(w, N, jax_highest())  # no depth check
        out = g if N == 1 else methods.Newton().apply(factors, g, N, jax_highest())
        row["relative_error"]["newton"] = _rel(out, exact)
        row["newton_accepted"] = N <= newton.NEWTON_MAX_DEPTH
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
    """Recomputes newton's coefficient tables (needs scipy) and compares them."""
    from overparam_optax.methods import newton

    polar, lower, upper = [], 4e-4, 1.0
    for _ in range(len(newton.POLAR_STEPS)):
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
        for new, old in [(polar, newton.POLAR_STEPS)]
        + [(roots[p], newton.ROOT_STEPS[p]) for p in roots]
        for row_new, row_old in zip(new, old, strict=True)
        for x, y in zip(row_new, row_old, strict=True)
    )
    print("polar steps:", [tuple(round(x, 10) for x in c) for c in polar])
    for p, table in roots.items():
        print(f"root steps p={p}:", [tuple(round(x, 10) for x in c) for c in table])
    print(f"largest difference from newton's tables: {worst:.1e}")
    return {"polar": polar, "root": {str(p): t for p, t in roots.items()}, "max_diff": worst}
