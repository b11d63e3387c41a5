"""benchmarks/tuned_baselines.py and its harness (experiments.tuning, tuned_mnist,
tuned_report): grid refinement and statistics, the MNIST runner, and a smoke run.

The smoke run trains 2 tiny CNNs (plain and implicit, 3 steps) on synthetic IDX files in a
subprocess, as a user would run it, and checks that the per-run logs it writes are reused
by a second call's runner instead of retrained.
"""

import gzip
import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

import tuned_mnist
import tuned_report
import tuning

REPO = pathlib.Path(__file__).resolve().parents[1]




def test_refine_adds_eighth_decades_around_edge_and_best(tb):
    exps = tuning.coarse_exponents(-3, 0, 4)  # -3, -2.75, ..., 0
    is_stable = exps <= -1.5  # edge at 10^-1.5
    final = np.where(is_stable, -exps, np.inf)  # the best is the edge itself
    new = tuning.refine_exponents(exps, is_stable, final, high=0.0)
    assert new == [-2.375, -2.125, -1.875, -1.625, -1.375]
    # All new points sit halfway between quarter-decade points.
    assert all(abs((e * 8) % 2 - 1) < 1e-9 for e in new)


def test_refine_extends_above_a_stable_top(tb):
    exps = tuning.coarse_exponents(-2, 0, 4)
    new = tuning.refine_exponents(exps, np.ones(len(exps), bool), -exps, high=0.0)
    assert max(new) == pytest.approx(5 / 8)
    assert tuning.refine_exponents(exps, np.zeros(len(exps), bool), exps, high=0.0) == []


def test_stable_and_fastest_to(tb):
    steps = np.arange(10.0)
    losses = np.stack([
        1.0 / (1 + steps),        # reaches 0.25 at step 3
        1.0 / (1 + 3 * steps),    # faster: step 1
        np.r_[1.0, 0.1, np.full(8, 2.0)],  # dips below, then ends above the first loss
        np.r_[1.0, 0.05, np.full(8, np.nan)],  # diverges
    ])  # fmt: skip
    assert tuning.stable(losses).tolist() == [True, True, False, False]
    best = tuning.fastest_to(np.log10([1e-3, 1e-2, 1e-1, 1.0]), losses, 0.25)
    assert best == {"steps": 1, "learning_rate": pytest.approx(1e-2)}
    assert tuning.fastest_to(np.log10([1e-3]), losses[:1], 0.01)["steps"] is None


def test_mean_ci_and_ratio(tb):
    out = tuning.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert out["mean"] == 3.0
    assert out["ci95"] == pytest.approx(2.776 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5))
    censored = tuning.mean_ci([1.0, None, 3.0])
    assert censored["reached"] == 2 and "mean" not in censored
    ratio = tuning.ratio_ci([2.0, 4.0], [1.0, 2.0])
    assert ratio["geomean"] == pytest.approx(2.0) and ratio["low"] == pytest.approx(2.0)
    assert tuning.ratio_ci([None, 1.0], [1.0, 1.0]) is None


def _write_idx(path: pathlib.Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_mnist_smoke_runs_and_resumes(tb, tmp_path):
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 48), ("t10k", 20)):
        _write_idx(mnist / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)),
                   2051)  # fmt: skip
        _write_idx(mnist / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), 2049)
    results = tmp_path / "results"
    options = ["--section", "mnist", "--smoke", "--mnist-data-dir", str(mnist),
               "--results-dir", str(results), "--figures-dir", str(tmp_path / "figures")]
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    first = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tuned_baselines.py"),
                            *options], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    logs = sorted((results / "tuned_mnist").glob("*.json"))
    names = [p.name for p in logs]
    assert names == ["implicit_lr0.01_s0_tracked_every10.json", "none_lr0.01_s0.json"]
    for path in logs:
        log = json.loads(path.read_text())
        assert len(log["train_loss"]) == 3 and np.all(np.isfinite(log["train_loss"]))
    assert not (results / "tuned_baselines.json").exists()  # a smoke run writes no results
    # A second call reuses the logs: its runner finds every run stored and starts no pool.
    # (In this process: a second subprocess would spend ~10 s on the smoke's step timing.)
    args = tb.parse_args(options)
    runner = tuned_mnist.MnistRunner(args, 48)
    plan = [run for mode in ("none", "implicit")
            for run in tuned_mnist.mnist_plan(args, mode, args.mnist_lrs, args.seeds)]  # fmt: skip
    reused = runner(plan)
    assert runner.pool is None
    stamps = {json.loads(p.read_text())["timestamp"] for p in logs}
    assert {log["timestamp"] for log in reused} == stamps and len(reused) == 2


def _fake_log(mode, lr, seed, rate, multiplier=1.0, method=None, steps=300):
    """A log whose loss decays like exp(-rate * step), with a little seed noise."""
    noise = np.random.default_rng(seed).normal(0, 0.01, steps)
    losses = 2.3 * np.exp(-rate * np.arange(steps)) * (1 + noise)
    config = {"mode": mode, "lr": lr, "seed": seed, "multiplier": multiplier,
              "method": method, "every": 10 if method == "tracked" else None}  # fmt: skip
    return {"config": config, "train_loss": losses.tolist(), "test_accuracy": 0.9 + 0.01 * rate,
            "seconds": 1.0}  # fmt: skip


def test_mnist_summary_tables_and_figure(tb, tmp_path):
    args = tb.parse_args(["--section", "mnist", "--mnist-steps", "300", "--mnist-multipliers",
                          "2,4"])  # fmt: skip
    seeds = args.seeds
    logs = [_fake_log("none", 0.02, s, 0.004) for s in seeds]
    logs += [_fake_log("implicit", 0.04, s, 0.008, method="tracked") for s in seeds]
    logs += [_fake_log("implicit", 0.04, s, 0.0081, method="svd") for s in seeds[:2]]
    logs += [_fake_log("explicit", 0.04, s, 0.007) for s in seeds[:3]]
    logs += [_fake_log("dense-lr", 0.02, s, 0.005 + 0.001 * c, multiplier=c)
             for s in seeds[:3] for c in (2.0, 4.0)]  # fmt: skip
    times = {"seconds_per_step": {"plain": 0.1, "implicit": 0.125, "implicit exact": 0.2,
                                  "explicit": 0.11, "dense-lr": 0.1}}  # fmt: skip
    summary = tuned_mnist.summarize_mnist(logs, args, 0.02, 0.04, times)
    assert summary["dense_multiplier"] == 4.0  # the faster-decaying control
    implicit = summary["modes"]["implicit N=2 (fast path)"]
    plain = summary["modes"]["plain"]
    # Twice the decay rate: about half of plain's steps to plain's step-300 loss.
    assert implicit["steps_to_plain@300"]["mean"] < 0.6 * plain["steps_to_plain@300"]["mean"]
    assert implicit["seconds_to_plain@300"]["mean"] == pytest.approx(
        0.125 * implicit["steps_to_plain@300"]["mean"])
    assert summary["modes"]["explicit N=2"]["seeds"] == seeds[:3]
    assert summary["modes"]["implicit N=2 (exact)"]["seeds"] == seeds[:2]
    gaps = summary["curve_gaps"]
    assert list(gaps["fast vs exact"]) == ["0", "1"] == list(gaps["explicit vs exact"])
    for seed, gap in gaps["fast vs exact"].items():  # decay rates 0.008 vs 0.0081
        assert 0 < gap["median"] <= gap["max"] < 0.05, seed
    assert gaps["explicit vs exact"]["0"]["max"] > 0.05  # decay rates 0.007 vs 0.0081
    # A best lr run on more seeds than the tuning ones: the grid still averages those only.
    logs += [_fake_log("none", 0.02, 9, 0.001)]
    summary = tuned_mnist.summarize_mnist(logs, args, 0.02, 0.04, times)
    table = tuned_report.tables_markdown({"mnist": summary})
    assert "| implicit N=2 (fast path) | 125 |" in table
    assert "| implicit N=2 (exact) | 200 |" in table
    tune = [tuned_mnist._final(g) for g in logs[: args.mnist_tune_seeds]]
    assert f"| 0.02 | {np.mean(tune):.4g} |" in table
    written = tuned_report.plot({"mnist": summary}, tmp_path)
    assert [pathlib.Path(p).name for p in written] == ["tuned_mnist.png"]


def test_mnist_summary_keeps_a_svd_fast_path_apart_from_the_exact_one(tb):
    args = tb.parse_args(["--section", "mnist", "--mnist-steps", "300", "--mnist-method", "svd"])
    logs = [_fake_log("none", 0.02, s, 0.004) for s in args.seeds]
    logs += [_fake_log("dense-lr", 0.02, s, 0.005, multiplier=c) for s in args.seeds[:1]
             for c in args.mnist_multipliers]  # fmt: skip
    logs += [_fake_log("explicit", 0.04, s, 0.007) for s in args.seeds[:1]]
    fast = [_fake_log("implicit", 0.04, s, 0.008, method="svd") for s in args.seeds]
    for log in fast:
        log["config"]["every"] = args.mnist_every  # svd every 10 steps: the fast path
    exact = [_fake_log("implicit", 0.04, 0, 0.002, method="svd")]  # every step: exact
    times = {"seconds_per_step": dict.fromkeys(
        ("plain", "implicit", "implicit exact", "explicit", "dense-lr"), 0.1)}  # fmt: skip
    summary = tuned_mnist.summarize_mnist(logs + fast + exact, args, 0.02, 0.04, times)
    assert summary["modes"]["implicit N=2 (fast path)"]["seeds"] == args.seeds
    assert summary["modes"]["implicit N=2 (exact)"]["seeds"] == [0]
    finals = summary["learning_rate_grids"]["implicit"]["0.04"]
    assert finals["0"] == pytest.approx(tuned_mnist._final(fast[0]))  # the grid holds the fast path


def test_runner_trains_exact_runs_one_at_a_time_beside_the_others(tb, tmp_path, monkeypatch):
    import concurrent.futures
    import threading
    import time

    lock, running, peak, order = threading.Lock(), {"svd": 0}, {"svd": 0}, []

    def fake_run(run, args):
        with lock:
            order.append(run["seed"])
            if run["method"] == "svd":
                running["svd"] += 1
                peak["svd"] = max(peak["svd"], running["svd"])
        time.sleep(0.05)
        with lock:
            running["svd"] -= run["method"] == "svd"
        return {"config": run}

    monkeypatch.setattr(tuned_mnist, "_worker_run", fake_run)
    args = tb.parse_args(["--section", "mnist", "--results-dir", str(tmp_path)])
    runner = tuned_mnist.MnistRunner(args, train_size=10)
    runner.pool = concurrent.futures.ThreadPoolExecutor(3)
    runs = [{"mode": "implicit", "lr": 0.02, "seed": s, "multiplier": 1.0,
             "method": "svd" if s < 3 else "tracked", "every": None} for s in range(6)]  # fmt: skip
    try:
        logs = runner(runs)
    finally:
        runner.close()
    assert [log["config"] for log in logs] == runs  # in the order asked, every run once
    assert peak["svd"] == 1  # never two exact runs at once, with 3 workers free
    assert order[0] == 0  # the first exact run starts before the others


def test_extend_lrs_stops_at_a_stuck_top_and_halves_a_best_bottom(tb):
    def log(lr, seed, losses):
        return {"config": {"lr": lr, "seed": seed}, "train_loss": losses}

    stuck = [2.31] + [2.3026] * 99  # dead ReLUs: ln(10), a hair under the first loss
    good, better = [2.3] + [0.05] * 99, [2.3] + [0.02] * 99
    logs = [log(0.04, s, good) for s in range(3)] + [log(0.08, s, stuck) for s in range(3)]
    assert tuned_mnist.extend_lrs(logs, [0.04, 0.08]) == [0.02]  # no 0.16; the best is the bottom
    logs = [log(0.04, s, better) for s in range(3)] + [log(0.08, s, good) for s in range(3)]
    assert tuned_mnist.extend_lrs(logs, [0.04, 0.08]) == [0.16, 0.02]
    logs[-1] = log(0.08, 2, [2.3] + [np.nan] * 99)  # one seed diverged at the top
    assert tuned_mnist.extend_lrs(logs, [0.04, 0.08]) == [0.02]


@pytest.mark.parametrize("method", ["tracked", "svd"])
def test_estimate_from_logs_reads_the_committed_step_time_record(tb, method):
    """``--estimate -1`` reads the CNN's step-time record for the method it was timed with."""
    args = tb.parse_args(["--section", "mnist", "--mnist-method", method])
    results = REPO / "benchmarks" / "results"
    record = json.loads((results / tuned_mnist.STEP_TIME_RECORD).read_text())
    contender = tuned_mnist.STEP_TIME_CONTENDERS[method]
    estimate = tuned_mnist.mnist_estimate_from_logs(args)
    assert estimate["fast_path_ratio_to_sgd"] == record["target1_cnn"]["ratio_to_sgd"][contender]
    assert estimate["hours"] > 0


def test_estimate_from_logs_names_the_flag_for_an_untimed_method(tb):
    args = tb.parse_args(["--section", "mnist", "--mnist-method", "eigh"])
    with pytest.raises(ValueError, match="--mnist-method=eigh"):
        tuned_mnist.mnist_estimate_from_logs(args)
