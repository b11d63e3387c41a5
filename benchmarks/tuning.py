"""The tuning harness of the tuned-baselines benchmark: grids, stability, statistics.

``benchmarks/tuned_baselines.py`` gives every method its own learning rate: a coarse log
grid, then finer points around the stability edge and the best rate
(:func:`tuned_grid`); a method is scored at its fastest stable rate for a target loss
(:func:`fastest_to`), with 95% t-intervals over seeds (:func:`mean_ci`, :func:`ratio_ci`)
and seconds per step measured on compiled runs (:func:`seconds_per_step`). The sections
that use it: :mod:`tuned_regression` (Ethanol, the paper's
Figure 5) and :mod:`tuned_mnist`; the tables and figures:
:mod:`tuned_report`.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
import optax

from overparam_experiments import training

SECTIONS = ("ethanol", "fig5", "mnist")
RESULTS_NAME = "tuned_baselines.json"
NEAR_ZERO_SCALE = 1e-3  # end-to-end init scale of the near-zero runs (as reproduce_paper.py)
FIG5_HIDDEN = 128
FIG5_ZERO_STDDEV = 0.01
FIG5_IDENTITY_STDDEV = 0.01
CURVE_STRIDE = 50  # loss curves are stored every 50 steps
CURVE_STRIDE_MNIST = 20  # the MNIST mean curves (of 100-step trailing means), every 20 steps
# 97.5% quantiles of Student's t, by degrees of freedom, for 95% confidence intervals.
#: The 97.5% quantile of Student's t by degrees of freedom (two-sided 95% intervals).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}  # fmt: skip


# ------------------------------------------------------------------------------ statistics


def mean_ci(values) -> dict:
    """Mean and 95% t-interval half-width over seeds; ``None`` entries are not reached.

    The interval is given only when every seed reached the target (a censored mean would
    be biased); ``reached`` counts the seeds that did.
    """
    reached = [float(v) for v in values if v is not None]
    out = {"n": len(values), "reached": len(reached), "values": list(values)}
    if len(reached) == len(values) and len(values) >= 2:
        a = np.asarray(reached)
        half = T_975.get(len(a) - 1, 1.96) * a.std(ddof=1) / math.sqrt(len(a))
        out.update(mean=float(a.mean()), ci95=float(half))
    elif len(reached) == len(values) == 1:
        out.update(mean=reached[0], ci95=None)
    return out


def ratio_ci(numerators, denominators) -> dict | None:
    """Geometric-mean ratio with a 95% t-interval (paired over seeds, in log space)."""
    pairs = [(a, b) for a, b in zip(numerators, denominators, strict=True)]
    if len(pairs) < 2 or any(a is None or b is None or a <= 0 or b <= 0 for a, b in pairs):
        return None
    logs = np.log([a / b for a, b in pairs])
    half = T_975.get(len(logs) - 1, 1.96) * logs.std(ddof=1) / math.sqrt(len(logs))
    m = logs.mean()
    return {"geomean": float(np.exp(m)), "low": float(np.exp(m - half)),
            "high": float(np.exp(m + half))}  # fmt: skip


# ------------------------------------------------------------------------------ grids


def coarse_exponents(low: float, high: float, per_decade: int) -> np.ndarray:
    return np.linspace(low, high, int(round((high - low) * per_decade)) + 1)


def stable(losses: np.ndarray) -> np.ndarray:
    """Per run: every loss finite and the last one below the first (no divergence)."""
    return np.all(np.isfinite(losses), axis=1) & (losses[:, -1] < losses[:, 0])


def refine_exponents(exponents, is_stable, final, high: float) -> list[float]:
    """Eighth-decade points near the stability edge and near the best learning rate.

    ``exponents`` are log10 learning rates on a quarter-decade grid. New points are the
    midpoints 1/8, 3/8, 5/8, 7/8 decade below the largest stable exponent and 1/8 above it
    (3/8 and 5/8 more when the edge is the top of the grid), and 1/8 on each side of the
    exponent with the lowest final loss.
    """
    exponents = np.asarray(exponents, np.float64)
    if not np.any(is_stable):
        return []
    edge = float(exponents[is_stable].max())
    best = float(exponents[is_stable][np.argmin(np.asarray(final)[is_stable])])
    offsets = [-7, -5, -3, -1, 1] + ([3, 5] if edge >= high - 1e-9 else [])
    new = {round(edge + k / 8, 6) for k in offsets} | {round(best - 1 / 8, 6),
                                                     round(best + 1 / 8, 6)}  # fmt: skip
    existing = {round(float(e), 6) for e in exponents}
    return sorted(e for e in new - existing if e >= exponents.min() - 1e-9)


def tuned_grid(loss_fn, params, make_optimizer, args):
    """Quarter-decade grid, then eighth-decade refinement; returns (exponents, losses)."""
    exps = coarse_exponents(args.lr_min, args.lr_max, 4)
    losses = training.run_full_batch_grid(loss_fn, params, make_optimizer, 10.0**exps,
                                          args.steps)[1]  # fmt: skip
    ok = stable(losses)
    extra = refine_exponents(exps, ok, np.where(ok, losses[:, -1], np.inf), args.lr_max)
    if extra:
        more = training.run_full_batch_grid(loss_fn, params, make_optimizer,
                                            10.0 ** np.asarray(extra), args.steps)[1]  # fmt: skip
        exps = np.concatenate([exps, extra])
        losses = np.concatenate([losses, more])
    order = np.argsort(exps)
    return exps[order], losses[order]


def fastest_to(exps, losses, target: float) -> dict:
    """The stable learning rate that first reaches ``target`` and ends at or below it."""
    ok = stable(losses)
    best = {"steps": None, "learning_rate": None}
    for e, curve, good in zip(exps, losses, ok, strict=True):
        if not good or curve[-1] > target:
            continue
        steps = training.steps_to_reach(curve, target)
        if steps is not None and (best["steps"] is None or steps < best["steps"]):
            best = {"steps": steps, "learning_rate": float(10.0**e)}
    return best


def grid_record(exps, losses) -> dict:
    """What the JSON keeps of one grid: per-lr finals, the edge, the best-final curve."""
    ok = stable(losses)
    final = np.where(ok, losses[:, -1], np.inf)
    i = int(np.argmin(final))
    return {
        "learning_rates": (10.0**exps).tolist(),
        "final_losses": [float(v) if np.isfinite(v) else None for v in losses[:, -1]],
        "stable": ok.tolist(),
        "edge_learning_rate": float(10.0 ** exps[ok].max()) if ok.any() else None,
        "best_final_learning_rate": float(10.0 ** exps[i]),
        "best_final_loss": float(final[i]),
        "best_final_curve": losses[i, ::CURVE_STRIDE].tolist(),
        "curve_stride": CURVE_STRIDE,
    }


def compiled_run(loss_fn, params, tx, num_steps: int):
    """A compiled full-batch run of ``num_steps`` (compiled by a first call here)."""
    value_and_grad = jax.value_and_grad(loss_fn)

    def body(carry, _):
        p, s = carry
        loss, grads = value_and_grad(p)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    run = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=num_steps)[1])
    run(params).block_until_ready()
    return lambda: run(params).block_until_ready()


def seconds_per_step(runs: dict, num_steps: int, repeats: int = 7) -> dict:
    """Seconds per step of each compiled run: the fastest of ``repeats`` interleaved rounds.

    On a shared machine other processes only ever add time, so the minimum over rounds,
    taken in turns so that every method sees the same spells of load, estimates the cost.
    """
    times = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - start)
    return {label: min(t) / num_steps for label, t in times.items()}


