"""The Ethanol and Figure-5 sections of the tuned-baselines benchmark.

``ethanol``: depth-N GD against GD, AdaGrad, AdaDelta, Adam and Adam + depth on the paper's
l4 regression, each at its own tuned learning rate, from two initial scales. ``fig5``: the
paper's Figure 5-left, explicit deep linear networks started near zero or near the identity
against the implicit rule. ``benchmarks/tuned_baselines.py`` describes both; the harness is
:mod:`tuning`.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import overparam_optax as opx
from overparam_experiments import data, training
from overparam_optax import factorized
from tuning import (
    FIG5_HIDDEN,
    FIG5_IDENTITY_STDDEV,
    FIG5_ZERO_STDDEV,
    NEAR_ZERO_SCALE,
    compiled_run,
    fastest_to,
    grid_record,
    mean_ci,
    ratio_ci,
    seconds_per_step,
    tuned_grid,
)

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


