r"""Depth against tuned baselines, in steps and in wall-clock time (issue 13, parts 2-4).

Sections (``--section``, one per call; results of earlier sections are kept):

* ``ethanol`` (part 3) — Ethanol l4 regression (the paper's task as in
  ``reproduce_paper.py``: 128 standardized features, full batch, float64, 10,000 steps).
  Depth-N GD (``overparam_precondition(N)`` + SGD, N = 3 by default) against GD, AdaGrad,
  AdaDelta, Adam and Adam + depth (``optax.chain(overparam_precondition(N),
  optax.adam(lr))``), from w ~ 0.05 N(0, 1) and from near zero (w ~ 1e-3 N(0, 1)), for
  ``--seeds`` (the seed draws the initial w; the data and the full-batch updates are
  deterministic, so the init is all it varies). Every method, seed and init gets its own
  learning-rate search: a quarter-decade grid (10^-5 .. 1), then eighth-decade points
  around the largest stable learning rate (the stability edge) and around the best one.
  Targets: T1 = the best depth-1 GD loss at the horizon (the paper's metric), T2 = the
  best depth-N GD loss. Each method is scored at its fastest stable learning rate for
  each target; wall-clock = steps x the method's measured seconds per step.
* ``fig5`` (part 4, the paper's Figure 5-left) — the same task with explicit deep linear
  networks (hidden width 128, so that the identity is square) started near zero
  (factors ~ 0.01 N(0, 1)) or near the identity (factors ~ I + 0.01 N(0, 1), the last one
  e_1 + 0.01 N(0, 1)), trained by GD on the factors; the implicit rule and depth-1 GD
  start from the same end-to-end vector. The paper's imbalance delta of the last factor
  pair is O(stddev^2) near zero (about 0.2 here) and about sqrt(127) near the identity
  (I against the rank-1 e_1 e_1^T).
* ``mnist`` (part 2) — the MNIST CNN of ``examples/mnist_cnn.py`` with momentum SGD, best
  against best. Phase 1 tunes the learning rate of plain and of implicit depth 2 (fast path
  ``method="auto", precondition_every=10``) on a grid (``--mnist-lrs``, extended until its
  top no longer trains, or the best is interior) over the first ``--mnist-tune-seeds``
  seeds. Phase 2 runs each mode's best rate on the remaining seeds, a control that
  multiplies only the dense kernels' learning rate by c at plain's best rate (first
  ``--mnist-control-seeds`` seeds), the explicit
  2-factor network at the implicit best rate (first ``--mnist-explicit-seeds`` seeds), and
  the exact path (SVD every step) at the implicit best rate (first ``--mnist-exact-seeds``
  seeds) to check the fast path. Runs are trained by
  ``--mnist-workers`` single-threaded processes side by side; wall-clock times to targets
  are steps times seconds per step measured interleaved in the main process, with jax's
  default threading (what users run). Each run writes its own JSON under
  ``<results-dir>/tuned_mnist/`` and is skipped when that file exists with the same
  configuration, so the section resumes after an interruption.

Writes ``benchmarks/results/tuned_baselines.json`` and figures in ``docs/figures/``.

Examples (``--section tables`` redraws tables and figures from the JSON)::

  python benchmarks/tuned_baselines.py --section ethanol   # ~30 min on 2 shared cores
  python benchmarks/tuned_baselines.py --section fig5      # ~35 min
  python benchmarks/tuned_baselines.py --section mnist --estimate -1   # hours, from logs
  python benchmarks/tuned_baselines.py --section mnist     # ~2 h on 2 cores, resumable
  python benchmarks/tuned_baselines.py --section mnist --smoke --mnist-data-dir DIR
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import math
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import overparam_optax as opx
from overparam_optax import factorized
from overparam_optax.experiments import cli, data, timing, training

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("ethanol", "fig5", "mnist")
RESULTS_NAME = "tuned_baselines.json"
NEAR_ZERO_SCALE = 1e-3  # end-to-end init scale of the near-zero runs (as reproduce_paper.py)
FIG5_HIDDEN = 128
FIG5_ZERO_STDDEV = 0.01
FIG5_IDENTITY_STDDEV = 0.01
CURVE_STRIDE = 50  # loss curves are stored every 50 steps
CURVE_STRIDE_MNIST = 20  # the MNIST mean curves (of 100-step trailing means), every 20 steps
# 97.5% quantiles of Student's t, by degrees of freedom, for 95% confidence intervals.
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


# ------------------------------------------------------------------------------ ethanol


def gd_depth(N: int):
    if N == 1:
        return optax.sgd
    return lambda lr: optax.chain(opx.overparam_precondition(N), optax.sgd(lr))


def ethanol_methods(N: int) -> dict:
    return {
        "GD": gd_depth(1),
        f"GD depth {N}": gd_depth(N),
        "AdaGrad": optax.adagrad,
        "AdaDelta": optax.adadelta,
        "Adam": optax.adam,
        f"Adam + depth {N}": lambda lr: optax.chain(opx.overparam_precondition(N), optax.adam(lr)),
    }


def load_ethanol(args):
    data_dir = args.data_dir or data.default_data_dir("gas_sensor_drift")
    if data_dir is None:
        raise SystemExit("No gas-sensor data: pass --data-dir or set OVERPARAM_DATA_DIR.")
    X, y = (jnp.asarray(a, jnp.float64) for a in data.ethanol_regression(data_dir))
    print(f"Ethanol: {X.shape[0]} rows (the paper: 2,565)", flush=True)
    return X, y


def ethanol_section(args) -> dict:
    X, y = load_ethanol(args)
    N = args.depth
    methods = ethanol_methods(N)
    base, deep = "GD", f"GD depth {N}"
    loss_fn = lambda w: training.lp_regression_loss(w, X, y, 4.0)  # noqa: E731
    inits = {"0.05 N(0,1)": args.init_scale, "near zero (1e-3 N(0,1))": NEAR_ZERO_SCALE}
    out = {"rows": int(X.shape[0]), "depth": N, "steps": args.steps, "inits": {}}
    start_all = time.perf_counter()
    for init_name, scale in inits.items():
        per_seed = []
        for seed in args.seeds:
            w0 = scale * jax.random.normal(jax.random.PRNGKey(seed), (X.shape[1], 1), jnp.float64)
            grids = {}
            for label, make in methods.items():
                t0 = time.perf_counter()
                grids[label] = tuned_grid(loss_fn, w0, make, args)
                print(f"[ethanol {init_name} seed {seed}] {label}: {len(grids[label][0])} lrs, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
            records = {label: grid_record(*g) for label, g in grids.items()}
            targets = {"T1": records[base]["best_final_loss"],
                       "T2": records[deep]["best_final_loss"]}  # fmt: skip
            for label, g in grids.items():
                records[label]["to_target"] = {t: fastest_to(*g, v) for t, v in targets.items()}
            per_seed.append({"seed": seed, "targets": targets, "methods": records})
        out["inits"][init_name] = {"per_seed": per_seed}
    out["seconds"] = time.perf_counter() - start_all
    return time_ethanol(out, X, y, args)


def time_ethanol(out: dict, X, y, args) -> dict:
    """Seconds per step of each method at its T1-tuned lr (first seed, 0.05 init); summary.

    Run again alone with ``--retime`` (on a quieter machine) to re-measure the times of
    finished results without redoing the grids.
    """
    N = out["depth"]
    methods = ethanol_methods(N)
    loss_fn = lambda w: training.lp_regression_loss(w, X, y, 4.0)  # noqa: E731
    w0 = args.init_scale * jax.random.normal(jax.random.PRNGKey(args.seeds[0]),
                                             (X.shape[1], 1), jnp.float64)  # fmt: skip
    first = out["inits"]["0.05 N(0,1)"]["per_seed"][0]["methods"]
    runs = {}
    for label, make in methods.items():
        lr = first[label]["to_target"]["T1"]["learning_rate"] or first[label][
            "best_final_learning_rate"]
        runs[label] = compiled_run(loss_fn, w0, make(lr), args.timing_steps)
    timing = seconds_per_step(runs, args.timing_steps)
    for label, value in timing.items():
        print(f"[timing] {label}: {1e6 * value:.1f} us/step", flush=True)
    out["seconds_per_step"] = timing
    out["timing_steps"] = args.timing_steps
    out["timing_load_average"] = list(os.getloadavg())
    out["summary"] = summarize_ethanol(out, list(methods), f"GD depth {N}")
    return out


def summarize_ethanol(out: dict, labels: list[str], deep: str) -> dict:
    summary = {}
    for init_name, block in out["inits"].items():
        rows = {}
        for label in labels:
            row = {}
            for t in ("T1", "T2"):
                steps = [s["methods"][label]["to_target"][t]["steps"] for s in block["per_seed"]]
                deep_steps = [s["methods"][deep]["to_target"][t]["steps"]
                              for s in block["per_seed"]]  # fmt: skip
                seconds = [None if v is None else v * out["seconds_per_step"][label]
                           for v in steps]  # fmt: skip
                inf = math.inf
                row[t] = {
                    "steps": mean_ci(steps),
                    # Seeds in which this method reaches the target strictly sooner than
                    # depth-N GD (a seed where a method never reaches it counts as infinite).
                    "seeds_sooner_than_depth": sum(
                        (a if a is not None else inf) < (b if b is not None else inf)
                        for a, b in zip(steps, deep_steps, strict=True)),
                    "seconds": mean_ci(seconds),
                    "steps_ratio_to_depth": ratio_ci(steps, deep_steps),
                    "learning_rates": [s["methods"][label]["to_target"][t]["learning_rate"]
                                       for s in block["per_seed"]],  # fmt: skip
                }
            finals = [s["methods"][label]["best_final_loss"] for s in block["per_seed"]]
            row["best_final_loss"] = mean_ci(finals)
            row["edge_learning_rates"] = [s["methods"][label]["edge_learning_rate"]
                                          for s in block["per_seed"]]  # fmt: skip
            rows[label] = row
        summary[init_name] = rows
    return summary


# ------------------------------------------------------------------------------ fig5


def collapse_right(factors):
    """End-to-end vector K_0 ... K_{N-1}, multiplied from the right (O(N h^2) per call)."""
    v = factors[-1]
    for k in reversed(factors[:-1]):
        v = k @ v
    return v


def fig5_factors(kind: str, N: int, key, d: int):
    shapes = [(d, FIG5_HIDDEN)] + [(FIG5_HIDDEN, FIG5_HIDDEN)] * (N - 2) + [(FIG5_HIDDEN, 1)]
    init = (factorized.near_zero(FIG5_ZERO_STDDEV) if kind == "near-zero"
            else factorized.near_identity(FIG5_IDENTITY_STDDEV))  # fmt: skip
    return [init(jax.random.fold_in(key, i), s, jnp.float64) for i, s in enumerate(shapes)]


def fig5_section(args) -> dict:
    X, y = load_ethanol(args)
    loss_fn = lambda w: training.lp_regression_loss(w, X, y, 4.0)  # noqa: E731
    explicit_loss = lambda fs: loss_fn(collapse_right(fs))  # noqa: E731
    out = {"rows": int(X.shape[0]), "steps": args.steps, "hidden": FIG5_HIDDEN,
           "near_zero_stddev": FIG5_ZERO_STDDEV,
           "near_identity_stddev": FIG5_IDENTITY_STDDEV, "runs": {}}  # fmt: skip
    start_all = time.perf_counter()
    for kind in ("near-zero", "near-identity"):
        for N in args.fig5_depths:
            per_seed = []
            for seed in args.seeds:
                key = jax.random.fold_in(jax.random.PRNGKey(seed), N)
                factors = fig5_factors(kind, N, key, X.shape[1])
                w0 = collapse_right(factors)
                t0 = time.perf_counter()
                grids = {
                    "GD depth 1": tuned_grid(loss_fn, w0, gd_depth(1), args),
                    f"implicit depth {N}": tuned_grid(loss_fn, w0, gd_depth(N), args),
                    f"explicit depth {N}": tuned_grid(explicit_loss, factors, optax.sgd, args),
                }
                records = {label: grid_record(*g) for label, g in grids.items()}
                target = records["GD depth 1"]["best_final_loss"]
                for label, g in grids.items():
                    records[label]["to_target"] = fastest_to(*g, target)
                # Does the implicit rule follow the explicit factors? Same lr, both grids.
                e_exps, e_losses = grids[f"explicit depth {N}"]
                i_exps, i_losses = grids[f"implicit depth {N}"]
                lr_e = records[f"explicit depth {N}"]["best_final_learning_rate"]
                je = int(np.argmin(np.abs(e_exps - np.log10(lr_e))))
                ji = int(np.argmin(np.abs(i_exps - np.log10(lr_e))))
                gap = (np.abs(i_losses[ji] - e_losses[je]) / e_losses[je]
                       if abs(i_exps[ji] - e_exps[je]) < 1e-6 else np.full(1, np.nan))  # fmt: skip
                per_seed.append({
                    "seed": seed,
                    "target": target,
                    "initial_loss": float(loss_fn(w0)),
                    "initial_norm": float(jnp.linalg.norm(w0)),
                    # The paper's delta: ||K_i^T K_i - K_{i+1} K_{i+1}^T||_F per factor pair.
                    "imbalance": [float(v) for v in
                                  factorized.pair_balancedness(factors, relative=False)],
                    "implicit_vs_explicit_max_rel_loss_gap_at_explicit_lr":
                        float(np.nanmax(gap)) if np.isfinite(gap).any() else None,
                    "methods": records,
                })
                print(f"[fig5 {kind} N={N} seed {seed}] target {target:.4g}: "
                      + ", ".join(f"{k} {v['to_target']['steps']}" for k, v in records.items())
                      + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            out["runs"][f"{kind}, depth {N}"] = {"init": kind, "depth": N, "per_seed": per_seed}
    out["summary"] = {
        name: {
            label: {
                "steps": mean_ci([s["methods"][label]["to_target"]["steps"]
                                  for s in block["per_seed"]]),
                "best_final_loss": mean_ci([s["methods"][label]["best_final_loss"]
                                            for s in block["per_seed"]]),
            }
            for label in block["per_seed"][0]["methods"]
        }
        | {"implicit_vs_explicit_max_rel_loss_gap": [
            s["implicit_vs_explicit_max_rel_loss_gap_at_explicit_lr"] for s in block["per_seed"]],
           "imbalance": [s["imbalance"] for s in block["per_seed"]],
           "initial_norm": [s["initial_norm"] for s in block["per_seed"]]}
        for name, block in out["runs"].items()
    }  # fmt: skip
    out["seconds"] = time.perf_counter() - start_all
    return out


# ------------------------------------------------------------------------------ mnist


def _mnist_module():
    spec = importlib.util.spec_from_file_location("mnist_cnn", REPO / "examples" / "mnist_cnn.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # flax modules (dataclasses) look their module up there
    spec.loader.exec_module(module)
    return module


def mnist_plan(args, mode: str, lrs, seeds) -> list[dict]:
    """The runs of one mode (plain or implicit) over learning rates and seeds."""
    return [{"mode": mode, "lr": lr, "seed": seed, "multiplier": 1.0,
             "method": args.mnist_method if mode == "implicit" else None,
             "every": args.mnist_every if mode == "implicit" else None}
            for lr in lrs for seed in seeds]  # fmt: skip


def _trained(log) -> bool:
    """Finite losses that end below half the first one (the run made progress).

    Half, not just below: a CNN whose ReLUs died sits at ln(10) ~ 2.30, a hair under a
    first loss of 2.31.
    """
    return math.isfinite(_final(log)) and _final(log) < 0.5 * log["train_loss"][0]


def extend_lrs(logs: list[dict], lrs: list[float]) -> list[float]:
    """Grid points to add so that the grid spans the stability edge and brackets the best.

    Doubles the largest learning rate while every seed trained there (finite losses ending
    below half the first), and halves the smallest while it has the lowest seed-mean final loss.
    """
    top, bottom = max(lrs), min(lrs)
    extra = []
    if all(_trained(log) for log in logs if log["config"]["lr"] == top):
        extra.append(2 * top)
    if bottom == _best_lr(logs):
        extra.append(bottom / 2)
    return extra


def _run_name(run: dict) -> str:
    name = f"{run['mode']}_lr{run['lr']:g}_s{run['seed']}"
    if run["multiplier"] != 1.0:
        name += f"_c{run['multiplier']:g}"
    if run["mode"] == "implicit":
        name += f"_{run['method']}" + (f"_every{run['every']}" if run["every"] else "")
    return name


def _mnist_run_config(run: dict, args, train_size: int) -> dict:
    return {**run, "steps": args.mnist_steps, "batch_size": args.mnist_batch_size,
            "dense_width": args.mnist_dense_width, "train_size": train_size}  # fmt: skip


def _mnist_log_path(run: dict, args) -> pathlib.Path:
    return pathlib.Path(args.results_dir) / "tuned_mnist" / f"{_run_name(run)}.json"


def _stored_log(run: dict, args, train_size: int) -> dict | None:
    """The stored log of ``run`` if it exists with the same configuration."""
    path = _mnist_log_path(run, args)
    if path.exists():
        log = json.loads(path.read_text())
        if log["config"] == _mnist_run_config(run, args, train_size):
            return log
    return None


def mnist_build(module, run: dict, args, plain_params):
    """(logits_fn, params, tx) of one run; the control scales only the dense kernels' step."""
    ns = argparse.Namespace(optimizer="momentum", lr=run["lr"], depth=2, precondition_conv=False,
                            method=run["method"] or "svd", precondition_every=run["every"],
                            dense_width=args.mnist_dense_width, seed=run["seed"])  # fmt: skip
    mode = "none" if run["mode"] == "dense-lr" else run["mode"]
    logits_fn, params, tx = module.build_run(mode, ns, plain_params)
    if run["mode"] == "dense-lr":
        mask = module.kernel_mask(plain_params, False)
        tx = optax.chain(optax.masked(optax.scale(run["multiplier"]), mask), tx)
    return logits_fn, params, tx


def mnist_one_run(module, run: dict, args, train, test) -> dict:
    """Trains one configuration (or reads its JSON if it exists with the same config)."""
    stored = _stored_log(run, args, len(train[1]))
    if stored is not None:
        return stored
    plain_params = module.TutorialCNN(dense_width=args.mnist_dense_width).init(
        jax.random.PRNGKey(run["seed"]), train[0][:1], False
    )["params"]
    logits_fn, params, tx = mnist_build(module, run, args, plain_params)
    result = training.run_minibatch(logits_fn, params, tx, train, args.mnist_steps,
                                    batch_size=args.mnist_batch_size, seed=run["seed"],
                                    test_data=test)  # fmt: skip
    log = {
        "config": _mnist_run_config(run, args, len(train[1])),
        "train_loss": result.losses.tolist(),
        "test_loss": result.test_loss,
        "test_accuracy": result.test_accuracy,
        "seconds": result.seconds,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = _mnist_log_path(run, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(log))
    print(f"[mnist] {_run_name(run)}: final {np.mean(result.losses[-10:]):.4f}, "
          f"{result.seconds:.0f} s", flush=True)  # fmt: skip
    return log


_WORKER = {}  # per worker process: the example module and the data, loaded once


def _worker_init(args) -> None:
    # One thread per worker: on a small CPU, K single-threaded runs side by side train
    # ~1.6x more steps per second than one run on K threads (measured on 2 cores). Set
    # before the worker's first jax computation; the parent process is not affected.
    # OPENBLAS_NUM_THREADS is left alone: method="auto" reads it (docs/performance.md).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                               "=false intra_op_parallelism_threads=1").strip()  # fmt: skip
    _WORKER.update(module=_mnist_module(), data=load_mnist_splits(args))


def _worker_run(run: dict, args) -> dict:
    train, test = _WORKER["data"]
    return mnist_one_run(_WORKER["module"], run, args, train, test)


def load_mnist_splits(args):
    data_dir = args.mnist_data_dir or data.default_data_dir("mnist")
    train = data.load_mnist(data_dir, split="train")
    test = data.load_mnist(data_dir, split="test")
    if args.mnist_train_size:
        train = (train[0][: args.mnist_train_size], train[1][: args.mnist_train_size])
    if args.mnist_test_size:
        test = (test[0][: args.mnist_test_size], test[1][: args.mnist_test_size])
    return train, test


class MnistRunner:
    """Runs lists of configurations: stored logs are reused, the rest trained by a pool."""

    def __init__(self, args, train_size: int):
        self.args, self.train_size, self.pool = args, train_size, None

    def __call__(self, runs: list[dict]) -> list[dict]:
        logs = [_stored_log(run, self.args, self.train_size) for run in runs]
        todo = [i for i, log in enumerate(logs) if log is None]
        if todo and self.pool is None:
            import multiprocessing

            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.args.mnist_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init, initargs=(self.args,))  # fmt: skip
        # The workers pin XLA's threads, not LAPACK's (method="auto" reads
        # OPENBLAS_NUM_THREADS, so pinning it would change the fast path's branch): two
        # exact-path (SVD) runs at once oversubscribe a small CPU, >4x slower on 2 cores.
        # They go one at a time, beside the other runs.
        exact = [i for i in todo if runs[i]["method"] == "svd"]
        first = self._run(runs[exact[0]]) if exact else None  # the slowest, before the rest
        futures = {i: self._run(runs[i]) for i in todo if i not in exact}
        for k, i in enumerate(exact):  # each submitted when the one before has finished
            logs[i] = (first if k == 0 else self._run(runs[i])).result()
        for i, future in futures.items():
            logs[i] = future.result()
        return logs

    def _run(self, run: dict) -> concurrent.futures.Future:
        return self.pool.submit(_worker_run, run, self.args)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def mnist_section(args) -> dict:
    """Phase 1 tunes each mode's lr on ``--mnist-tune-seeds`` seeds; phase 2 runs the rest."""
    train, test = load_mnist_splits(args)
    if args.estimate:
        with jax.enable_x64(False):
            return mnist_estimate(_mnist_module(), args, train, test)
    tune_seeds, rest = args.seeds[: args.mnist_tune_seeds], args.seeds[args.mnist_tune_seeds :]
    run = MnistRunner(args, len(train[1]))
    try:
        lrs = {mode: list(args.mnist_lrs) for mode in ("none", "implicit")}
        by_mode = {mode: run(mnist_plan(args, mode, lrs[mode], tune_seeds)) for mode in lrs}
        for _ in range(0 if args.smoke else args.mnist_max_extensions):
            extra = {mode: extend_lrs(by_mode[mode], lrs[mode]) for mode in lrs}
            if not any(extra.values()):
                break
            plans = {mode: mnist_plan(args, mode, extra[mode], tune_seeds) for mode in lrs}
            logs = run([r for mode in lrs for r in plans[mode]])
            for mode in lrs:
                lrs[mode] += extra[mode]
                by_mode[mode] += [log for log in logs if log["config"]["mode"] == mode]
        best = {mode: _best_lr(by_mode[mode]) for mode in lrs}
        if args.smoke:
            with jax.enable_x64(False):
                per_step = mnist_step_times(args, best, train)
            return {"smoke": True, "runs": [log["config"] for m in lrs for log in by_mode[m]],
                    "step_times": per_step}  # fmt: skip
        # The exact-path runs (the slowest) first: the runner starts the first before the rest.
        second = [{"mode": "implicit", "lr": best["implicit"], "seed": seed, "multiplier": 1.0,
                   "method": "svd", "every": None}
                  for seed in args.seeds[: args.mnist_exact_seeds]]  # fmt: skip
        second += mnist_plan(args, "none", [best["none"]], rest)
        second += mnist_plan(args, "implicit", [best["implicit"]], rest)
        for seed in args.seeds[: args.mnist_control_seeds]:
            second += [{"mode": "dense-lr", "lr": best["none"], "seed": seed, "multiplier": c,
                        "method": None, "every": None} for c in args.mnist_multipliers]  # fmt: skip
        for seed in args.seeds[: args.mnist_explicit_seeds]:
            second.append({"mode": "explicit", "lr": best["implicit"], "seed": seed,
                           "multiplier": 1.0, "method": None, "every": None})  # fmt: skip
        logs = [log for mode in lrs for log in by_mode[mode]] + run(second)
    finally:
        run.close()
    with jax.enable_x64(False):  # the CNN is float32, as the tutorial's
        per_step = mnist_step_times(args, best, train)
    return summarize_mnist(logs, args, best["none"], best["implicit"], per_step)


def mnist_step_times(args, best: dict, train) -> dict:
    """Seconds per step of each compared configuration, interleaved in this process.

    The pool's single-threaded workers are not what users run; wall-clock times to the
    targets are these (jax's default threading) times the steps.
    """
    module = _mnist_module()
    plain = module.TutorialCNN(dense_width=args.mnist_dense_width).init(
        jax.random.PRNGKey(0), train[0][:1], False)["params"]  # fmt: skip
    configs = {
        "plain": {"mode": "none", "lr": best["none"]},
        "implicit": {"mode": "implicit", "lr": best["implicit"], "method": args.mnist_method,
                     "every": args.mnist_every},  # fmt: skip
        "implicit exact": {"mode": "implicit", "lr": best["implicit"], "method": "svd"},
        "explicit": {"mode": "explicit", "lr": best["implicit"]},
        "dense-lr": {"mode": "dense-lr", "lr": best["none"],
                     "multiplier": args.mnist_multipliers[0]},  # fmt: skip
    }
    steps, carries = {}, {}
    for name, config in configs.items():
        run = {"seed": 0, "multiplier": 1.0, "method": None, "every": None, **config}
        logits_fn, params, tx = mnist_build(module, run, args, plain)

        def loss_fn(p, x, y, rng, logits_fn=logits_fn):
            logits = logits_fn(p, x, True, rng)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        steps[name] = timing.train_step(loss_fn, tx)
        carries[name] = (params, tx.init(params))
    images, labels = train
    b = args.mnist_batch_size

    def data_fn(i):
        at = (i * b) % (len(labels) - b + 1)
        return images[at : at + b], labels[at : at + b], jax.random.PRNGKey(i)

    chunk, repeats = (2, 1) if args.smoke else (args.mnist_every, args.mnist_timing_windows)
    medians, ratios, _ = timing.time_interleaved(steps, carries, chunk, repeats, data_fn, "plain")
    return {"seconds_per_step": medians, "ratio_to_plain": ratios,
            "windows": repeats, "window_steps": chunk}  # fmt: skip


def _smooth(losses, window: int) -> np.ndarray:
    window = max(1, min(window, len(losses)))
    return np.convolve(np.asarray(losses, np.float64), np.ones(window) / window, "valid")


def _final(log) -> float:
    losses = np.asarray(log["train_loss"], np.float64)
    tail = losses[-max(1, len(losses) // 10):]
    return float(np.mean(tail)) if np.all(np.isfinite(losses)) else math.inf


def _best_lr(logs: list[dict]) -> float:
    """The learning rate with the lowest seed-mean final loss (last 10% of steps)."""
    by_lr = {}
    for log in logs:
        by_lr.setdefault(log["config"]["lr"], []).append(_final(log))
    return min(by_lr, key=lambda lr: float(np.mean(by_lr[lr])))


def summarize_mnist(logs, args, lr_plain, lr_implicit, step_times) -> dict:
    """Best against best: final losses, accuracies, steps and seconds to plain's losses."""
    window = min(100, args.mnist_steps)

    def pick(mode, lr, c=1.0, method=None, every=None):
        # (method, every) tells the fast path from the exact one even with --mnist-method svd.
        return {g["config"]["seed"]: g for g in logs
                if g["config"]["mode"] == mode and g["config"]["lr"] == lr
                and g["config"]["multiplier"] == c
                and (g["config"]["method"], g["config"]["every"]) == (method, every)}  # fmt: skip

    groups = {"plain": pick("none", lr_plain),
              "implicit N=2 (fast path)": pick("implicit", lr_implicit, method=args.mnist_method,
                                               every=args.mnist_every),
              "implicit N=2 (exact)": pick("implicit", lr_implicit, method="svd"),
              "explicit N=2": pick("explicit", lr_implicit)}  # fmt: skip
    timed = {"plain": "plain", "implicit N=2 (fast path)": "implicit",
             "implicit N=2 (exact)": "implicit exact", "explicit N=2": "explicit"}  # fmt: skip
    dense = {c: pick("dense-lr", lr_plain, c) for c in args.mnist_multipliers}
    best_c = min(dense, key=lambda c: np.mean([_final(g) for g in dense[c].values()]))
    control = f"dense-lr x{best_c:g} (control)"
    groups[control], timed[control] = dense[best_c], "dense-lr"
    steps = args.mnist_steps
    summary = {"learning_rates": {"plain": lr_plain, "implicit": lr_implicit},
               "learning_rate_grids": _grids(logs), "dense_multiplier": best_c,
               "tune_seeds": args.seeds[: args.mnist_tune_seeds], "seeds": args.seeds,
               "step_times": step_times, "modes": {}}  # fmt: skip
    for name, runs in groups.items():
        seeds = [s for s in args.seeds if s in runs]
        per_step = step_times["seconds_per_step"][timed[name]]
        row = {"seeds": seeds, "seconds_per_step": per_step,
               "final_loss": mean_ci([_final(runs[s]) for s in seeds]),
               "test_accuracy": mean_ci([runs[s]["test_accuracy"] for s in seeds])}  # fmt: skip
        for at in (steps // 2, steps):
            reached = []
            for s in seeds:
                target = _smooth(groups["plain"][s]["train_loss"], window)[max(at - window, 0)]
                hit = training.steps_to_reach(_smooth(runs[s]["train_loss"], window), target)
                reached.append(None if hit is None else hit + window)
            row[f"steps_to_plain@{at}"] = mean_ci(reached)
            row[f"seconds_to_plain@{at}"] = mean_ci(
                [None if n is None else n * per_step for n in reached])
        curves = np.stack([_smooth(runs[s]["train_loss"], window) for s in seeds])
        row["mean_curve"] = curves.mean(axis=0)[::CURVE_STRIDE_MNIST].tolist()
        summary["modes"][name] = row
    summary["curve"] = {"stride": CURVE_STRIDE_MNIST, "window": window}
    # The fast path against the exact rule, and, for scale, the drift between two runs
    # that the paper's theorem equates in the small-step limit: exact rule and explicit net.
    summary["curve_gaps"] = {
        "fast vs exact": _curve_gaps(groups["implicit N=2 (exact)"],
                                     groups["implicit N=2 (fast path)"], window),
        "explicit vs exact": _curve_gaps(groups["implicit N=2 (exact)"],
                                         groups["explicit N=2"], window),
    }  # fmt: skip
    return summary


def _curve_gaps(reference: dict, other: dict, window: int) -> dict:
    """Per common seed: max and median of |other - reference| / reference, smoothed losses."""
    gaps = {}
    for seed in sorted(set(reference) & set(other)):
        a = _smooth(reference[seed]["train_loss"], window)
        b = _smooth(other[seed]["train_loss"], window)
        rel = np.abs(b - a) / a
        gaps[str(seed)] = {"max": float(np.max(rel)), "median": float(np.median(rel))}
    return gaps


def _grids(logs) -> dict:
    """Per mode: lr -> {seed: final loss} (inf: diverged), every seed run at that lr.

    The tables average the tuning seeds only (the best lr also ran on the other seeds).
    """
    grids = {}
    for log in logs:
        config = log["config"]
        exact = config["mode"] == "implicit" and config["every"] is None
        if config["mode"] in ("none", "implicit") and not exact:
            grid = grids.setdefault(config["mode"], {})
            grid.setdefault(f"{config['lr']:g}", {})[str(config["seed"])] = _final(log)
    return grids


def mnist_plan_counts(args) -> dict:
    """Runs per kind in the section's plan (before any grid extension)."""
    n_lr, n_seed, n_c = len(args.mnist_lrs), len(args.seeds), len(args.mnist_multipliers)
    n_tune = min(args.mnist_tune_seeds, n_seed)
    per_mode = n_lr * n_tune + n_seed - n_tune
    n_control = n_c * min(args.mnist_control_seeds, n_seed)
    return {"none": per_mode + n_control, f"implicit {args.mnist_method}": per_mode,
            "explicit": min(args.mnist_explicit_seeds, n_seed),
            "implicit svd": min(args.mnist_exact_seeds, n_seed)}  # fmt: skip


def mnist_estimate_from_logs(args) -> dict:
    """Hours of the plan from earlier timings on this machine, without running anything.

    Per-step seconds of plain, exact implicit and explicit steps come from the 1,000-step
    MNIST runs of reproduce_paper.py (batch 50, one 2-core CPU when it was quieter), scaled
    by batch / 50; the fast implicit step is the plain step times the fast path's step-time
    ratio to SGD measured by step_time.py on the same CNN (all four kernels preconditioned,
    N = 3, so an upper bound for dense kernels only, N = 2).
    """
    results = pathlib.Path(args.results_dir)
    configs = json.loads((results / "reproduce_paper.json").read_text())["results"]["mnist"][
        "configs"]
    per = {}
    for key, mode in (("none", "none"), ("implicit svd", "implicit N=2"),
                      ("explicit", "explicit N=2")):  # fmt: skip
        per[key] = float(np.mean([
            c["runs"][mode]["seconds"] / int(c["argv"][c["argv"].index("--steps") + 1])
            for c in configs.values()]))
    steps_log = json.loads((results / "step_time_target1_cpu.json").read_text())
    ratio = steps_log["target1_cnn"]["ratio_to_sgd"][f"{args.mnist_method}_every"
                                                     f"{args.mnist_every}"]  # fmt: skip
    per[f"implicit {args.mnist_method}"] = per["none"] * ratio
    scale = args.mnist_batch_size / 50
    counts = mnist_plan_counts(args)
    total = sum(counts[k] * per[k] * scale * args.mnist_steps for k in counts)
    return {"earlier_seconds_per_step_batch50": per, "fast_path_ratio_to_sgd": ratio,
            "batch_scale": scale, "runs": counts, "hours": total / 3600}  # fmt: skip


def mnist_estimate(module, args, train, test) -> dict:
    """Times ``--estimate`` steps of each mode now, and estimates from earlier logs too."""
    counts = mnist_plan_counts(args)
    out = {"from_logs": mnist_estimate_from_logs(args), "runs": counts}
    print(f"[estimate] from earlier timings: {out['from_logs']['hours']:.1f} h", flush=True)
    if args.estimate < 0:  # --estimate -1: the estimate from the logs only
        return out
    per_step = {}
    for mode, method, every in (("none", None, None), ("implicit", args.mnist_method,
                                args.mnist_every), ("implicit", "svd", None),
                                ("explicit", None, None)):  # fmt: skip
        ns = argparse.Namespace(optimizer="momentum", lr=args.mnist_lrs[0], depth=2,
                                precondition_conv=False, method=method or "svd",
                                precondition_every=every, dense_width=args.mnist_dense_width,
                                seed=0)  # fmt: skip
        plain = module.TutorialCNN(dense_width=args.mnist_dense_width).init(
            jax.random.PRNGKey(0), train[0][:1], False)["params"]
        logits_fn, params, tx = module.build_run(mode, ns, plain)
        short = training.run_minibatch(logits_fn, params, tx, train, 2,
                                       batch_size=args.mnist_batch_size)  # fmt: skip
        longer = training.run_minibatch(logits_fn, params, tx, train, 2 + args.estimate,
                                        batch_size=args.mnist_batch_size)  # fmt: skip
        key = mode if mode != "implicit" else f"implicit {method}"
        per_step[key] = (longer.seconds - short.seconds) / args.estimate  # compile cancels
        print(f"[estimate] {key}: {per_step[key]:.3f} s/step", flush=True)
    total = sum(counts[k] * per_step[k] * args.mnist_steps for k in counts)
    print(f"[estimate] {sum(counts.values())} runs of {args.mnist_steps} steps: "
          f"{total / 3600:.1f} h at today's load (training only)", flush=True)  # fmt: skip
    out.update(estimate_steps=args.estimate, seconds_per_step=per_step,
               estimated_hours=total / 3600)
    return out


# ------------------------------------------------------------------------------ tables


def fmt_steps(stat: dict) -> str:
    """'mean ± ci' steps over seeds, or how many seeds reached the target."""
    if "mean" not in stat:
        return f"{stat['reached']}/{stat['n']} reached"
    return f"{stat['mean']:,.0f} ± {stat['ci95']:,.0f}"


def fmt_seconds(stat: dict) -> str:
    if "mean" not in stat:
        return f"{stat['reached']}/{stat['n']} reached"
    return f"{stat['mean']:.3f} ± {stat['ci95']:.3f}"


def fmt_loss(stat: dict) -> str:
    return f"{stat['mean']:.4g} ± {stat['ci95']:.2g}"


def fmt_ratio(ratio: dict | None) -> str:
    if ratio is None:
        return "–"
    return f"{ratio['geomean']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"


def fmt_lr_range(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    low, high = min(values), max(values)
    return f"{low:.3g}" if np.isclose(low, high) else f"{low:.3g}–{high:.3g}"


def tables_markdown(results: dict) -> str:
    """The markdown tables of docs/reproduction.md for the sections in ``results``."""
    lines = []
    if "ethanol" in results:
        eth = results["ethanol"]
        N = eth["depth"]
        n_seeds = len(next(iter(eth["inits"].values()))["per_seed"])
        for init_name, rows in eth["summary"].items():
            lines += [
                f"#### Ethanol l4, init {init_name}: {n_seeds} seeds, {eth['steps']:,} steps",
                "",
                f"| method | us/step | stable lr edge | lr for T1 | steps to T1 | seconds to T1 "
                f"| steps to T1 / depth {N} | sooner than depth {N} | steps to T2 "
                f"| seconds to T2 | best final loss |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for label, row in rows.items():
                lines.append(
                    f"| {label} | {1e6 * eth['seconds_per_step'][label]:.0f} "
                    f"| {fmt_lr_range(row['edge_learning_rates'])} "
                    f"| {fmt_lr_range(row['T1']['learning_rates'])} "
                    f"| {fmt_steps(row['T1']['steps'])} | {fmt_seconds(row['T1']['seconds'])} "
                    f"| {fmt_ratio(row['T1']['steps_ratio_to_depth'])} "
                    f"| {row['T1']['seeds_sooner_than_depth']}/{row['T1']['steps']['n']} "
                    f"| {fmt_steps(row['T2']['steps'])} | {fmt_seconds(row['T2']['seconds'])} "
                    f"| {fmt_loss(row['best_final_loss'])} |"
                )
            lines.append("")
    if "mnist" in results and "modes" in results["mnist"]:
        mnist = results["mnist"]
        ats = [k.split("@")[1] for k in next(iter(mnist["modes"].values())) if
               k.startswith("steps_to_plain@")]  # fmt: skip
        lines += [
            f"#### MNIST CNN, momentum SGD (plain lr {mnist['learning_rates']['plain']:g}, "
            f"implicit lr {mnist['learning_rates']['implicit']:g})",
            "",
            "| mode | ms/step | final train loss | test accuracy | "
            + " | ".join(f"steps to plain@{a} | seconds to plain@{a}" for a in ats) + " |",
            "|---|---:|---:|---:|" + "---:|---:|" * len(ats),
        ]
        for name, row in mnist["modes"].items():
            lines.append(
                f"| {name} | {1e3 * row['seconds_per_step']:.0f} | {fmt_loss(row['final_loss'])} "
                f"| {fmt_loss(row['test_accuracy'])} | "
                + " | ".join(f"{fmt_steps(row[f'steps_to_plain@{a}'])} | "
                             f"{fmt_seconds(row[f'seconds_to_plain@{a}'])}" for a in ats)
                + " |"
            )
        grids = mnist["learning_rate_grids"]
        rates = sorted({float(lr) for grid in grids.values() for lr in grid})
        lines += ["", f"Learning-rate grids: final training loss (mean of the last 10% of steps), "
                  f"seed mean over seeds {', '.join(map(str, mnist['tune_seeds']))} "
                  f"(inf: diverged)", "",
                  "| learning rate | " + " | ".join(grids) + " |",
                  "|---:|" + "---:|" * len(grids)]  # fmt: skip
        for lr in rates:
            cells = []
            for grid in grids.values():
                finals = grid.get(f"{lr:g}", {})
                tuned = [finals[str(s)] for s in mnist["tune_seeds"] if str(s) in finals]
                cells.append(f"{np.mean(tuned):.4g}" if tuned else "–")
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        lines.append("")
    if "fig5" in results:
        fig5 = results["fig5"]
        lines += [
            f"#### Deep linear networks on Ethanol l4, near-zero vs near-identity init "
            f"({len(next(iter(fig5['runs'].values()))['per_seed'])} seeds, "
            f"{fig5['steps']:,} steps)",
            "",
            "| init, depth | method | steps to depth-1 GD's final loss | best final loss "
            "| initial norm of w | initial delta (last pair) | max gap implicit vs explicit |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, block in fig5["summary"].items():
            imbalance = [v[-1] for v in block["imbalance"]]
            norms = block["initial_norm"]
            gaps = [g for g in block["implicit_vs_explicit_max_rel_loss_gap"] if g is not None]
            for label, row in block.items():
                if not isinstance(row, dict):
                    continue
                extra = ("| – | – | – |" if not label.startswith("explicit") else
                         f"| {min(norms):.2g}–{max(norms):.2g} "
                         f"| {min(imbalance):.2g}–{max(imbalance):.2g} "
                         f"| {100 * min(gaps):.1f}–{100 * max(gaps):.1f}% |")  # fmt: skip
                lines.append(f"| {name} | {label} | {fmt_steps(row['steps'])} "
                             f"| {fmt_loss(row['best_final_loss'])} {extra}")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figures


def _save(fig, axes, path: pathlib.Path) -> str:
    """Grid and legend on every axis, then the figure to ``path`` (closed); the path."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot(results: dict, figures_dir: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if "ethanol" in results:
        eth = results["ethanol"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
        for ax, (init_name, block) in zip(axes, eth["inits"].items(), strict=True):
            seed0 = block["per_seed"][0]
            for label, rec in seed0["methods"].items():
                curve = np.asarray(rec["best_final_curve"])
                ax.plot(np.arange(len(curve)) * rec["curve_stride"], curve,
                        label=f"{label} (lr {rec['best_final_learning_rate']:.2g})")  # fmt: skip
            for t, ls in (("T1", ":"), ("T2", "--")):
                ax.axhline(seed0["targets"][t], color="gray", linestyle=ls, linewidth=1)
            ax.set(yscale="log", xlabel="step", ylabel="training loss",
                   title=f"Ethanol l4, init {init_name}, seed {seed0['seed']}")  # fmt: skip
        written.append(_save(fig, axes, figures_dir / "tuned_ethanol.png"))
    if "fig5" in results:
        runs = results["fig5"]["runs"]
        kinds = ["near-zero", "near-identity"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), sharey=True)
        for ax, kind in zip(axes, kinds, strict=True):
            color = 0
            for block in runs.values():
                if block["init"] != kind:
                    continue
                seed0 = block["per_seed"][0]
                for label, rec in seed0["methods"].items():
                    if label == "GD depth 1" and block["depth"] != min(
                            b["depth"] for b in runs.values()):
                        continue
                    curve = np.asarray(rec["best_final_curve"])
                    style = "--" if label.startswith("explicit") else "-"
                    ax.plot(np.arange(len(curve)) * rec["curve_stride"], curve, style,
                            color=f"C{color}", label=f"{label} (lr {rec['best_final_learning_rate']:.2g})")  # noqa: E501
                    color += 1
            ax.set(yscale="log", xlabel="step", ylabel="training loss",
                   title=f"Ethanol l4, deep linear net, {kind} init (seed 0)")  # fmt: skip
        written.append(_save(fig, axes, figures_dir / "fig5_init.png"))
    if "mnist" in results and "modes" in results["mnist"]:
        mnist = results["mnist"]
        fig, ax = plt.subplots(figsize=(7, 4.3))
        for name, row in mnist["modes"].items():
            curve = np.asarray(row["mean_curve"])
            steps = mnist["curve"]["window"] + np.arange(len(curve)) * mnist["curve"]["stride"]
            ax.plot(steps, curve, label=f"{name} ({len(row['seeds'])} seeds)")
        ax.set(yscale="log", xlabel="step", ylabel="training loss (100-step mean, seed mean)",
               title="MNIST CNN, momentum SGD, each at its best learning rate")  # fmt: skip
        written.append(_save(fig, [ax], figures_dir / "tuned_mnist.png"))
    return written


# ------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", choices=(*SECTIONS, "tables"), required=True,
                        help="'tables' redraws the tables and figures from the JSON")
    parser.add_argument("--data-dir", default=None, help="gas-sensor folder (batchK.dat)")
    parser.add_argument("--steps", type=cli.positive_int, default=10_000)
    parser.add_argument("--depth", type=cli.positive_int, default=3,
                        help="N of depth-N GD (ethanol)")
    parser.add_argument("--fig5-depths", type=cli.comma_list(cli.positive_int), default="2,3")
    parser.add_argument("--seeds", type=cli.comma_list(cli.nonnegative_int), default="0,1,2,3,4")
    parser.add_argument("--init-scale", type=cli.positive_float, default=0.05)
    parser.add_argument("--lr-min", type=cli.finite_float, default=-5.0,
                        help="log10 of the lowest lr")
    parser.add_argument("--lr-max", type=cli.finite_float, default=0.0,
                        help="log10 of the highest lr")
    parser.add_argument("--timing-steps", type=cli.positive_int, default=2000)
    parser.add_argument("--retime", action="store_true",
                        help="ethanol: re-measure seconds per step of the stored results")
    parser.add_argument("--mnist-data-dir", default=None)
    parser.add_argument("--mnist-steps", type=cli.positive_int, default=2000)
    parser.add_argument("--mnist-batch-size", type=cli.positive_int, default=64,
                        help="64 in the tutorial")
    parser.add_argument("--mnist-lrs", type=cli.comma_list(cli.positive_float),
                        default="0.01,0.02,0.04,0.08")
    parser.add_argument("--mnist-max-extensions", type=cli.nonnegative_int, default=2,
                        help="grid points added per mode when the grid misses the edge")
    parser.add_argument("--mnist-multipliers", type=cli.comma_list(cli.positive_float),
                        default="2,4", help="dense-lr control")
    parser.add_argument("--mnist-tune-seeds", type=cli.positive_int, default=3,
                        help="seeds of the lr grids; the best lr of each mode gets all --seeds")
    parser.add_argument("--mnist-control-seeds", type=cli.positive_int, default=3,
                        help="seeds of the dense-lr control (the first ones)")
    parser.add_argument("--mnist-explicit-seeds", type=cli.positive_int, default=3,
                        help="seeds of the explicit 2-factor network (the first ones)")
    parser.add_argument("--mnist-exact-seeds", type=cli.positive_int, default=1,
                        help="seeds of the exact path (SVD every step; the first ones)")
    parser.add_argument("--mnist-workers", type=cli.positive_int, default=2,
                        help="single-threaded training processes side by side (XLA's "
                             "threads; exact-path runs go one at a time)")
    parser.add_argument("--mnist-timing-windows", type=cli.positive_int, default=10,
                        help="interleaved windows of the step-time measurement")
    parser.add_argument("--mnist-method", default="auto", choices=opx.linalg.METHODS,
                        help="implicit mode's fast path")
    parser.add_argument("--mnist-every", type=cli.positive_int, default=10)
    parser.add_argument("--mnist-dense-width", type=cli.positive_int, default=512)
    parser.add_argument("--mnist-train-size", type=cli.positive_int, default=None)
    parser.add_argument("--mnist-test-size", type=cli.positive_int, default=None)
    parser.add_argument("--estimate", type=int, default=0,
                        help="mnist: time this many steps per mode and estimate the section's "
                        "hours (also from earlier logs); -1: from the logs only. Trains "
                        "nothing; the hours are for one process (--mnist-workers not counted)")
    parser.add_argument("--smoke", action="store_true",
                        help="mnist: 2 tiny runs (plain, implicit) to check the pipeline")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--figures-dir", default=str(REPO / "docs" / "figures"))
    args = parser.parse_args(argv)
    if args.estimate < -1:
        parser.error(f"argument --estimate: must be >= -1, got {args.estimate}")
    if args.smoke:
        args.seeds, args.mnist_lrs = args.seeds[:1], args.mnist_lrs[:1]
        args.mnist_steps, args.mnist_batch_size, args.mnist_dense_width = 3, 8, 16
        args.mnist_train_size, args.mnist_test_size = 48, 20
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    results_dir = pathlib.Path(args.results_dir)
    path = results_dir / RESULTS_NAME
    if args.section == "tables":
        log = json.loads(path.read_text())
        plot(log["results"], pathlib.Path(args.figures_dir))
        (results_dir / "tuned_baselines_tables.md").write_text(tables_markdown(log["results"]))
        return log
    if args.retime:
        log = json.loads(path.read_text())
        with jax.enable_x64(True):
            X, y = load_ethanol(args)
            time_ethanol(log["results"]["ethanol"], X, y, args)
        log["runs"]["ethanol"]["retimed"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        path.write_text(json.dumps(log, indent=1, default=str))
        (results_dir / "tuned_baselines_tables.md").write_text(tables_markdown(log["results"]))
        return log
    if args.section in ("ethanol", "fig5"):
        with jax.enable_x64(True):  # the paper's regression is float64
            section = (ethanol_section if args.section == "ethanol" else fig5_section)(args)
    else:
        section = mnist_section(args)
    results_dir.mkdir(parents=True, exist_ok=True)
    log = json.loads(path.read_text()) if path.exists() else {"results": {}, "runs": {}}
    if args.estimate:  # a timing, kept apart from the results
        section["command"] = " ".join(["python benchmarks/tuned_baselines.py",
                                       *(sys.argv[1:] if argv is None else argv)])  # fmt: skip
        section["load_average_at_end"] = list(os.getloadavg())
        section["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        (results_dir / "tuned_mnist_estimate.json").write_text(json.dumps(section, indent=1))
        return {"results": {args.section: section}}
    if args.smoke:  # never overwrite real results with a check
        print(json.dumps(section, indent=1, default=str))
        return {"results": {args.section: section}}
    log["results"][args.section] = section
    figures = plot(log["results"], pathlib.Path(args.figures_dir))
    log["runs"][args.section] = {
        "command": " ".join(["python benchmarks/tuned_baselines.py",
                             *(sys.argv[1:] if argv is None else argv)]),  # fmt: skip
        "config": {k: v for k, v in vars(args).items()},
        "environment": {"jax": jax.__version__, "optax": optax.__version__,
                        "device": str(jax.devices()[0]), "platform": platform.platform(),
                        "load_average_at_end": list(os.getloadavg())},  # fmt: skip
        "wall_seconds": time.perf_counter() - start,
        "figures": figures,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path.write_text(json.dumps(log, indent=1, default=str))
    tables = tables_markdown(log["results"])
    (results_dir / "tuned_baselines_tables.md").write_text(tables)
    print(tables + f"\nwrote {path} and {figures}", flush=True)
    return log


if __name__ == "__main__":
    main()
