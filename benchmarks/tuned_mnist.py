"""The MNIST section of the tuned-baselines benchmark: the paper's CNN, best against best.

Phase 1 tunes the learning rate of the plain network and of implicit depth 2 over a few
seeds; phase 2 runs each best rate on the other seeds, plus controls (a larger dense
learning rate, the explicit factorized network, the exact path). Runs are trained by a pool
of single-threaded processes and each is kept as its own JSON, so the section resumes.
``benchmarks/tuned_baselines.py`` describes it; the models and modes are those of
``examples/mnist_cnn.py`` with momentum SGD at depth 2 (:func:`cnn_mode`).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import pathlib
import time
from types import MappingProxyType

import jax
import numpy as np
import optax

import overparam_optax as opx
from overparam_experiments import data, models, timing, training
from tuning import CURVE_STRIDE_MNIST, mean_ci

# ------------------------------------------------------------------------------ mnist



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


def cnn_mode(mode: str, lr: float, method: str, dense_width: int, seed: int, plain_params):
    """(logits_fn, params, tx) of examples/mnist_cnn.py's ``mode`` with momentum SGD, N = 2."""
    base = optax.sgd(lr, momentum=0.9)
    plain = models.logits_fn_for(models.TutorialCNN(dense_width=dense_width))
    if mode == "none":
        return plain, plain_params, base
    if mode == "implicit":
        mask = models.kernel_mask(plain_params, False)
        precondition = opx.overparam_precondition(2, mask=mask, method=method)
        return plain, plain_params, optax.chain(precondition, base)
    if mode == "explicit":
        params = models.factorize_tutorial_cnn(plain_params, 2, precondition_conv=False,
                                               key=jax.random.PRNGKey(seed + 1))  # fmt: skip
        model = models.TutorialCNN(dense_depth=2, dense_width=dense_width)
        return models.logits_fn_for(model), params, base
    raise ValueError(f"Unknown mode {mode!r}; expected none, implicit or explicit.")


def mnist_build(run: dict, args, plain_params):
    """(logits_fn, params, tx) of one run; the control scales only the dense kernels' step."""
    mode = "none" if run["mode"] == "dense-lr" else run["mode"]
    logits_fn, params, tx = cnn_mode(mode, run["lr"], run["method"] or "svd",
                                     args.mnist_dense_width, run["seed"], plain_params)  # fmt: skip
    if run["mode"] == "dense-lr":
        mask = models.kernel_mask(plain_params, False)
        tx = optax.chain(optax.masked(optax.scale(run["multiplier"]), mask), tx)
    return logits_fn, params, tx


def mnist_one_run(run: dict, args, train, test) -> dict:
    """Trains one configuration (or reads its JSON if it exists with the same config)."""
    stored = _stored_log(run, args, len(train[1]))
    if stored is not None:
        return stored
    plain_params = models.TutorialCNN(dense_width=args.mnist_dense_width).init(
        jax.random.PRNGKey(run["seed"]), train[0][:1], False
    )["params"]
    logits_fn, params, tx = mnist_build(run, args, plain_params)
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


_WORKER = {}  # per worker process: the data, loaded once


def _worker_init(args) -> None:
    # One thread per worker: on a small CPU, K single-threaded runs side by side train
    # ~1.6x more steps per second than one run on K threads (measured on 2 cores). Set
    # before the worker's first jax computation; the parent process is not affected.
    # OPENBLAS_NUM_THREADS is left alone: users' LAPACK runs with its default threads.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                               "=false intra_op_parallelism_threads=1").strip()  # fmt: skip
    _WORKER.update(data=load_mnist_splits(args))


def _worker_run(run: dict, args) -> dict:
    train, test = _WORKER["data"]
    return mnist_one_run(run, args, train, test)


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
        # The workers pin XLA's threads, not LAPACK's: two exact-path (SVD) runs at once
        # oversubscribe a small CPU, >4x slower on 2 cores. They go one at a time, beside
        # the other runs.
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
            return mnist_estimate(args, train, test)
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
    plain = models.TutorialCNN(dense_width=args.mnist_dense_width).init(
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
        logits_fn, params, tx = mnist_build(run, args, plain)

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


#: The step-time record of the CNN that the estimate from logs reads (``benchmarks/step_time.py
#: --targets 1``, idle), and its contender for each ``--mnist-method`` it timed.
STEP_TIME_RECORD = "step_time_tracked_idle_cpu.json"
STEP_TIME_CONTENDERS = MappingProxyType({"tracked": "default", "svd": "svd"})


def mnist_estimate_from_logs(args) -> dict:
    """Hours of the plan from earlier timings on this machine, without running anything.

    Per-step seconds of plain, exact implicit and explicit steps come from the 1,000-step
    MNIST runs of reproduce_paper.py (batch 50, one 2-core CPU when it was quieter), scaled
    by batch / 50; the implicit step of ``--mnist-method`` is the plain step times that
    method's step-time ratio to SGD in :data:`STEP_TIME_RECORD` (the same CNN, all four
    kernels preconditioned, N = 3, so an upper bound for dense kernels only, N = 2).

    Raises:
      ValueError: for a ``--mnist-method`` that record did not time.
    """
    contender = STEP_TIME_CONTENDERS.get(args.mnist_method)
    if contender is None:
        raise ValueError(
            f"--mnist-method={args.mnist_method}: {STEP_TIME_RECORD} has no step time for it "
            f"(it times {', '.join(STEP_TIME_CONTENDERS)}); estimate by timing steps "
            "instead (--estimate STEPS)"
        )
    results = pathlib.Path(args.results_dir)
    configs = json.loads((results / "reproduce_paper.json").read_text())["results"]["mnist"][
        "configs"]
    per = {}
    for key, mode in (("none", "none"), ("implicit svd", "implicit N=2"),
                      ("explicit", "explicit N=2")):  # fmt: skip
        per[key] = float(np.mean([
            c["runs"][mode]["seconds"] / int(c["argv"][c["argv"].index("--steps") + 1])
            for c in configs.values()]))
    steps_log = json.loads((results / STEP_TIME_RECORD).read_text())
    ratio = steps_log["target1_cnn"]["ratio_to_sgd"][contender]
    per[f"implicit {args.mnist_method}"] = per["none"] * ratio
    scale = args.mnist_batch_size / 50
    counts = mnist_plan_counts(args)
    total = sum(counts[k] * per[k] * scale * args.mnist_steps for k in counts)
    return {"earlier_seconds_per_step_batch50": per, "fast_path_ratio_to_sgd": ratio,
            "batch_scale": scale, "runs": counts, "hours": total / 3600}  # fmt: skip


def mnist_estimate(args, train, test) -> dict:
    """Times ``--estimate`` steps of each mode now, and estimates from earlier logs too."""
    counts = mnist_plan_counts(args)
    out = {"from_logs": None, "runs": counts}
    if args.estimate < 0 or args.mnist_method in STEP_TIME_CONTENDERS:
        out["from_logs"] = mnist_estimate_from_logs(args)
        print(f"[estimate] from earlier timings: {out['from_logs']['hours']:.1f} h", flush=True)
    if args.estimate < 0:  # --estimate -1: the estimate from the logs only
        return out
    per_step = {}
    for mode, method in (("none", None), ("implicit", args.mnist_method), ("implicit", "svd"),
                         ("explicit", None)):  # fmt: skip
        plain = models.TutorialCNN(dense_width=args.mnist_dense_width).init(
            jax.random.PRNGKey(0), train[0][:1], False)["params"]
        logits_fn, params, tx = cnn_mode(mode, args.mnist_lrs[0], method or "svd",
                                         args.mnist_dense_width, 0, plain)  # fmt: skip
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


