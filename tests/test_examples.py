"""Smoke runs of the examples and benchmarks on tiny synthetic data, and their bad input.

Each script runs in a subprocess, as a user would run it, with a handful of steps and data
written into tmp_path, so nothing is downloaded and the shared data are not needed. Every
script checks its arguments before any work: a bad value exits with status 2 and an
argparse message, and writes nothing.
"""

import gzip
import json
import os
import pathlib
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.scripts import load_script

REPO = pathlib.Path(__file__).resolve().parents[1]


def _write_idx(path: pathlib.Path, array: np.ndarray, magic: int) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 48), ("t10k", 20)):
        _write_idx(
            directory / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28)),
            2051,
        )
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n), 2049)
    return directory


@pytest.fixture(scope="module")
def gas_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gas")
    rng = np.random.default_rng(0)
    for batch, n in ((1, 30), (2, 20)):
        lines = []
        for i in range(n):
            gas = 1 if i % 3 else 2  # mostly Ethanol
            features = " ".join(f"{k}:{v:.6f}" for k, v in enumerate(rng.normal(size=128), 1))
            lines.append(f"{gas};{rng.uniform(10, 500):.6f} {features} \n")
        (directory / f"batch{batch}.dat").write_text("".join(lines))
    return directory


def _run(script: str, *args: str, status: int = 0, cwd=REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == status, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_mnist_cnn_smoke(mnist_dir, tmp_path):
    out = tmp_path / "out"
    result = _run(
        "examples/mnist_cnn.py",
        "--data-dir", str(mnist_dir),
        "--steps", "3",
        "--batch-size", "8",
        "--dense-width", "16",
        "--optimizer", "sgd",
        "--lr", "0.01",
        "--output-dir", str(out),
    )  # fmt: skip
    log = json.loads((out / "mnist_cnn.json").read_text())
    assert set(log["runs"]) == {"none", "implicit N=2", "explicit N=2"}
    assert log["data"] == {"source": str(mnist_dir), "train": 48, "test": 20}
    for run in log["runs"].values():
        assert len(run["train_loss"]) == 3 and np.all(np.isfinite(run["train_loss"]))
        assert 0.0 <= run["test_accuracy"] <= 1.0
    runs = log["runs"]
    # Same init, same first minibatch: the first loss is identical in every mode.
    assert runs["none"]["train_loss"][0] == pytest.approx(runs["implicit N=2"]["train_loss"][0])
    assert runs["none"]["train_loss"][0] == pytest.approx(runs["explicit N=2"]["train_loss"][0])
    # ...and after one step the implicit rule is much closer to the explicit factorization
    # (they differ by O(lr^2)) than plain SGD is (which differs by O(lr)).
    second = {name: run["train_loss"][1] for name, run in runs.items()}
    gap_implicit = abs(second["implicit N=2"] - second["explicit N=2"])
    assert gap_implicit < 0.2 * abs(second["none"] - second["explicit N=2"])
    assert (out / "mnist_cnn_loss.png").stat().st_size > 1000
    assert "test acc" in result.stdout


def test_lp_regression_smoke(gas_dir, tmp_path):
    out = tmp_path / "out"
    _run(
        "examples/lp_regression.py",
        "--data-dir", str(gas_dir),
        "--steps", "30",
        "--depths", "2",
        "--lr-min", "-3", "--lr-max", "-1", "--lr-per-decade", "1",
        "--output-dir", str(out),
    )  # fmt: skip
    log = json.loads((out / "lp_regression.json").read_text())
    assert log["rows"] == 33  # the Ethanol rows of the synthetic batches
    for name in ("l2", "l4"):
        depths = log["results"][name]["depths"]
        assert set(depths) == {"1", "2"}
        for row in depths.values():
            assert len(row["losses"]) == 30 and np.all(np.isfinite(row["losses"]))
    assert (out / "lp_regression.png").exists()


def test_reproduce_paper_smoke(gas_dir, mnist_dir, tmp_path):
    results, figures = tmp_path / "results", tmp_path / "figures"
    _run(
        "benchmarks/reproduce_paper.py",
        "--data-dir", str(gas_dir),
        "--steps", "20",
        "--depths", "2",
        "--seeds", "0,1",
        "--lr-min", "-3", "--lr-max", "-1", "--lr-per-decade", "1",
        "--mnist-data-dir", str(mnist_dir),
        "--mnist-steps", "2",
        "--mnist-optimizers", "momentum",
        "--mnist-seeds", "0",
        "--mnist-batch-size", "8",
        "--mnist-dense-width", "8",
        "--results-dir", str(results),
        "--figures-dir", str(figures),
    )  # fmt: skip
    log = json.loads((results / "reproduce_paper.json").read_text())
    for section in ("regression", "seeds", "mnist"):
        run = log["runs"][section]
        assert run["environment"]["x64"] and run["command"].startswith("python benchmarks/")
    regression = log["results"]["regression"]
    for name in ("l4", "l2"):
        methods = regression[name]["methods"]
        assert {
            "GD depth 1",
            "implicit depth 2",
            "AdaGrad depth 1",
            "Adam + implicit depth 2",
        } <= set(methods)
        assert np.isfinite(methods["GD depth 1"]["final_loss"])
        assert np.isfinite(regression[name]["validation"]["depth 2"]["max_relative_gap"])
    assert len(log["results"]["seeds"]["l4"]) == 2
    (config,) = log["results"]["mnist"]["configs"].values()
    assert set(config["runs"]) == {"none", "implicit N=2", "explicit N=2"}
    assert set(config["targets"]) == {"1", "2"}  # the plain run's loss at half and all steps
    assert all(set(run["steps_to_plain_loss_at"]) == {"1", "2"} for run in config["runs"].values())
    tables = (results / "reproduce_paper_tables.md").read_text()
    assert "| GD depth 1 |" in tables and "MNIST CNN" in tables
    for name in ("ethanol_depth", "ethanol_adaptive", "ethanol_init", "ethanol_validation"):
        assert (figures / f"{name}.png").exists()
    assert (figures / "mnist_cnn_loss.png").exists()

    # A later run of one section replaces that section and keeps the others.
    _run(
        "benchmarks/reproduce_paper.py",
        "--sections", "seeds",
        "--data-dir", str(gas_dir),
        "--steps", "10",
        "--depths", "2",
        "--seeds", "3",
        "--lr-min", "-3", "--lr-max", "-1", "--lr-per-decade", "1",
        "--results-dir", str(results),
        "--figures-dir", str(figures),
    )  # fmt: skip
    merged = json.loads((results / "reproduce_paper.json").read_text())
    assert [row["seed"] for row in merged["results"]["seeds"]["l4"]] == [3]
    assert merged["results"]["regression"] == log["results"]["regression"]
    assert merged["results"]["mnist"] == log["results"]["mnist"]
    assert "--sections seeds" in merged["runs"]["seeds"]["command"]
    assert merged["runs"]["mnist"] == log["runs"]["mnist"]
    tables = (results / "reproduce_paper_tables.md").read_text()
    assert "| GD depth 1 |" in tables and "MNIST CNN" in tables


def test_sharded_mlp_matches_one_device():
    result = _run(
        "examples/sharded_mlp.py", "--cpu-devices", "8", "--steps", "3", "--hidden", "32"
    )
    assert "8 x cpu devices" in result.stdout
    # the script prints the largest sharded-vs-single-device gaps; float32 reorderings only
    relative = float(result.stdout.split("relative ")[-1].split(")")[0])
    loss_gap = float(result.stdout.split("over 3 steps: ")[1].split()[0])
    assert relative < 1e-5 and loss_gap < 1e-5, result.stdout


def test_equivalence_benchmark_quick(tmp_path):
    out_json, out_png = tmp_path / "eq.json", tmp_path / "eq.png"
    _run(
        "benchmarks/equivalence.py",
        "--quick", "--synthetic", "--platform", "cpu",
        "--out-json", str(out_json), "--out-png", str(out_png),
    )  # fmt: skip
    report = json.loads(out_json.read_text())
    assert report["dtype"] == "float64" and report["device"]["platform"] == "cpu"
    assert "--quick" in report["command"] and report["versions"]["jax"] == jax.__version__
    tasks = {r["task"] for r in report["runs"]}
    assert tasks == {"ethanol_l2", "ethanol_l4", "mnist_softmax", "mnist_mlp"}
    for r in report["runs"]:
        assert r["finite"] and r["initial_gap"] < 1e-12
        assert 0 < r["final_gap"] < 0.05
        assert len(r["curves"]["gap"]) == len(r["curves"]["step"]) > 1
    widths = [r for r in report["runs"] if r["task"] == "ethanol_l2"]
    assert len(widths) == 2
    assert widths[0]["final_gap"] == pytest.approx(widths[1]["final_gap"], rel=1e-6)
    assert out_png.stat().st_size > 10_000


def test_transformer_lm_smoke(tmp_path):
    # A corpus of its own: the losses compared below must not move when a doc is edited.
    words = "the of depth matrix gradient descent product layer weight rate step loss".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(np.random.default_rng(0).choice(words, 4000)))
    out = tmp_path / "out"
    result = _run(
        "examples/transformer_lm.py",
        "--text-file", str(corpus),
        "--modes", "momentum,momentum+overparam,momentum-explicit",
        "--lr", "momentum=0.02,momentum+overparam=0.02",
        "--steps", "3", "--warmup", "0", "--eval-every", "1", "--eval-windows", "4",
        "--batch-size", "4", "--context", "16", "--d-model", "16", "--heads", "2",
        "--layers", "2",
        "--output-dir", str(out),
    )  # fmt: skip
    log = json.loads((out / "transformer_lm.json").read_text())
    runs = log["runs"]
    assert set(runs) == {"momentum", "momentum+overparam", "momentum-explicit"}
    assert log["data"]["source"] == str(corpus) and log["data"]["num_files"] == 1
    for run in runs.values():
        assert len(run["train_loss"]) == 3 and np.all(np.isfinite(run["train_loss"]))
        assert [e["step"] for e in run["evaluations"]] == [0, 1, 2, 3]
    # Same init, same first minibatch: the first loss is the same in every mode (the
    # explicit model computes the same function from balanced factors)...
    first = {name: run["train_loss"][0] for name, run in runs.items()}
    assert first["momentum+overparam"] == pytest.approx(first["momentum"], rel=1e-6)
    assert first["momentum-explicit"] == pytest.approx(first["momentum"], rel=1e-4)
    # ...and over the next steps the implicit rule stays much closer to the explicit
    # product than the plain step does (summed over steps: one loss may cross another).
    def gap_to_explicit(mode):
        evals = runs[mode]["evaluations"][1:], runs["momentum-explicit"]["evaluations"][1:]
        pairs = zip(*evals, strict=True)
        return sum(abs(a["val_loss"] - b["val_loss"]) for a, b in pairs)

    assert gap_to_explicit("momentum+overparam") < 0.05 * gap_to_explicit("momentum")
    assert (out / "transformer_lm_loss.png").stat().st_size > 1000
    assert "steps to target" in result.stdout


# --------------------------------------------------------------------------------------
# Bad flags: tests/test_script_flags.py runs every script with bad values. Here: the checks
# that need the data, and the output folder, against a real run's folder.
# --------------------------------------------------------------------------------------


def test_mnist_cnn_output_dir_that_is_a_file_fails_before_training(tmp_path):
    existing = tmp_path / "results"
    existing.write_text("not a folder")
    result = _run("examples/mnist_cnn.py", "--output-dir", str(existing), status=1)
    assert "flag --output-dir=" in result.stderr and "is an existing file" in result.stderr
    assert "MNIST from" not in result.stdout  # stopped before loading the data
    assert existing.read_text() == "not a folder"


def test_mnist_cnn_sizes_beyond_the_data(mnist_dir, tmp_path):
    out = tmp_path / "out"
    common = ["--data-dir", str(mnist_dir), "--output-dir", str(out)]
    result = _run("examples/mnist_cnn.py", *common, "--batch-size", "49", status=1)
    assert "flag --batch-size=49: exceeds the 48 training digits" in result.stderr
    result = _run("examples/mnist_cnn.py", *common, "--test-size", "21", status=1)
    assert "flag --test-size=21: exceeds the 20 digits" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("problem", ["no images", "pixels out of range"])
def test_mnist_cnn_bad_data_is_a_one_line_error(tmp_path, problem):
    """A DataError from the loader is a usage error naming the file: no traceback."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if problem == "no images":
        for prefix in ("train", "t10k"):
            _write_idx(data_dir / f"{prefix}-images-idx3-ubyte.gz", np.zeros((0, 28, 28)), 2051)
            _write_idx(data_dir / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(0), 2049)
        expected = "train-images-idx3-ubyte.gz' holds 0 items"
    else:
        images = np.full((3, 28, 28), 500.0, np.float32)
        labels = np.zeros(3, np.int64)
        np.savez(data_dir / "mnist.npz", x_train=images, y_train=labels, x_test=images,
                 y_test=labels)  # fmt: skip
        expected = "image 0 has pixel values in [500, 500]"
    out = tmp_path / "out"
    result = _run("examples/mnist_cnn.py", "--data-dir", str(data_dir), "--output-dir",
                  str(out), status=1)  # fmt: skip
    assert "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if "Flags parsing error" in line]
    assert f"flag --data-dir={data_dir}" in error and expected in error
    assert not out.exists()


def test_transformer_lm_output_dir_that_is_a_file_fails_before_training(tmp_path):
    existing = tmp_path / "results"
    existing.write_text("not a folder")
    result = _run("examples/transformer_lm.py", "--output-dir", str(existing), status=1)
    assert "flag --output-dir=" in result.stderr and "is an existing file" in result.stderr
    assert "standard library" not in result.stdout  # stopped before reading the corpus
    assert existing.read_text() == "not a folder"


def test_transformer_lm_text_too_short_fails_before_training(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_bytes(b"x" * 100)
    out = tmp_path / "out"
    common = ["--text-file", str(corpus), "--output-dir", str(out)]
    result = _run("examples/transformer_lm.py", *common, status=1)
    assert "flag --text-file=" in result.stderr and "fewer than one batch" in result.stderr
    assert not out.exists()


def test_transformer_lm_long_flag_sets_the_longer_run_unless_overridden():
    from overparam_experiments import flags as xflags

    lm_example = load_script("examples/transformer_lm.py", name="transformer_lm_example")

    def parse_args(argv):
        return lm_example.resolve(xflags.parse(lm_example.define_flags, argv))

    default = parse_args([])
    assert (default.steps, default.d_model, default.layers) == (300, 64, 2)
    long = parse_args(["--long"])
    assert (long.steps, long.d_model, long.layers, long.eval_every) == (2000, 128, 4, 100)
    assert parse_args(["--long", "--steps", "10"]).steps == 10
    assert parse_args(["--lr", "adamw=0.5"]).lr["adamw"] == 0.5
    assert parse_args([]).lr == lm_example.DEFAULT_LEARNING_RATES


def test_transformer_benchmark_times_the_examples_own_modes():
    """benchmarks/transformer_lm.py's paired timing builds each mode as the example does."""
    import jax.numpy as jnp
    import optax

    from overparam_experiments import flags as xflags

    example = load_script("examples/transformer_lm.py", name="transformer_lm_example")
    bench = load_script("benchmarks/transformer_lm.py", name="transformer_lm_benchmark")
    defaults = vars(xflags.parse(example.define_flags, []))
    assert {k: defaults[k] for k in bench.EXAMPLE_DEFAULTS} == bench.EXAMPLE_DEFAULTS
    sizes = ["--steps", "5", "--context", "8", "--d-model", "8", "--layers", "1"]
    rates = {"adamw": 1e-2, "adamw+overparam": 3e-3, "momentum": 0.1, "momentum+overparam": 0.05}
    example_args = example.resolve(xflags.parse(example.define_flags, [
        *sizes, "--lr", ",".join(f"{mode}={lr}" for mode, lr in rates.items())]))  # fmt: skip
    bench_args = bench.parse_args(sizes)
    plain = example.make_model(example_args).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)
    )["params"]
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) * 7 % 256

    def two_updates(model, params, tx):
        def loss(p):
            logits = model.apply({"params": p}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            params = optax.apply_updates(params, updates)
        return params

    for mode in example.MODES:
        lr = rates["momentum+overparam" if mode == "momentum-explicit" else mode]
        ours = two_updates(*example.build_run(mode, example_args, plain))
        theirs = two_updates(*bench.mode_setup(mode, lr, bench_args, plain))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     ours, theirs)  # fmt: skip


@pytest.mark.parametrize("method, reused", [("svd", True), ("tracked", False)])
def test_reproduce_paper_reuses_logs_written_when_svd_was_the_examples_default(
    tmp_path, monkeypatch, method, reused
):
    """A log whose command lacks ``--method svd`` (the example's default until 0.2) is the
    exact rule's run only if its config says svd; otherwise the run is redone."""
    from types import SimpleNamespace

    import paper_sections

    args = SimpleNamespace(mnist_steps=5, mnist_batch_size=8, mnist_lr=None,
                           mnist_data_dir=None, mnist_dense_width=None, mnist_train_size=None,
                           mnist_test_size=None)  # fmt: skip
    argv = paper_sections._mnist_argv(args, "momentum", 0, tmp_path)
    assert argv[argv.index("--method") + 1] == "svd"
    legacy = " ".join(["python examples/mnist_cnn.py", *argv]).replace(" --method svd", "")
    log = {"command": legacy, "config": {"method": method}, "timestamp": "then"}
    (tmp_path / "mnist_cnn.json").write_text(json.dumps(log))

    def run(*_, **__):
        raise RuntimeError("trained again")

    monkeypatch.setattr(paper_sections.subprocess, "run", run)
    if reused:
        assert paper_sections._mnist_log(REPO / "examples" / "mnist_cnn.py", argv, tmp_path,
                                         reuse=True) == log  # fmt: skip
    else:
        with pytest.raises(RuntimeError, match="trained again"):
            paper_sections._mnist_log(REPO / "examples" / "mnist_cnn.py", argv, tmp_path,
                                      reuse=True)  # fmt: skip


# --------------------------------------------------------------------------------------
# examples/mnist_cnn.py's table, figure and help; examples/matrix_completion.py's threads,
# figure, progress and flags.
# --------------------------------------------------------------------------------------


def test_mnist_cnn_help_shows_the_flags_near_the_top():
    result = _run("examples/mnist_cnn.py", "--helpshort", status=1)  # absl exits 1 on help
    lines = result.stdout.splitlines()
    assert any(line.strip() == "flags:" for line in lines[:20]), "\n".join(lines[:25])


def test_mnist_cnn_table_reports_the_steady_state_step_beside_the_total():
    example = load_script("examples/mnist_cnn.py", name="mnist_cnn_example")
    # 10 s of compilation and slow first steps, then 0.1 s a step: steady is 0.1, not 1.
    evaluations = [{"step": 0, "train_seconds": 0.0}, {"step": 5, "train_seconds": 4.5},
                   {"step": 10, "train_seconds": 5.0}]  # fmt: skip
    assert example.steady_seconds_per_step(evaluations) == pytest.approx(0.1)
    run = {"final_train_loss": 0.5, "test_accuracy": 0.9, "test_loss": 0.4, "seconds": 15.0,
           "seconds_per_step": 0.1}  # fmt: skip
    header, row, note = example.format_table({"none": run}).splitlines()
    assert "s total" in header and "ms/step" in header
    assert row.split()[-2:] == ["15.0", "100.0"]
    assert "compilation included" in note and "steady state" in note


def _title_and_legend_boxes(monkeypatch, plot):
    """Draws ``plot()`` and returns, per axes, its title, legend and axes boxes (pixels)."""
    import matplotlib.figure

    boxes = {}
    savefig = matplotlib.figure.Figure.savefig

    def recording_savefig(self, *args, **kwargs):
        savefig(self, *args, **kwargs)
        renderer = self.canvas.get_renderer()
        boxes["figure"] = self.bbox
        boxes["axes"] = [
            (ax.title.get_window_extent(renderer), ax.get_legend(), ax.get_window_extent(renderer))
            for ax in self.axes
        ]
        boxes["renderer"] = renderer

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    plot()
    return boxes


def test_mnist_cnn_figure_title_is_not_clipped(tmp_path, monkeypatch):
    example = load_script("examples/mnist_cnn.py", name="mnist_cnn_example")
    runs = {name: {"train_loss": list(np.linspace(2.3, 0.2, 80))}
            for name in ("none", "implicit N=2", "explicit N=2")}  # fmt: skip
    title = "TensorFlow-models tutorial CNN on MNIST (60000 digits), momentum lr 0.01"
    boxes = _title_and_legend_boxes(
        monkeypatch, lambda: example.plot_losses(runs, tmp_path / "loss.png", title)
    )
    (title_box, _, _), = boxes["axes"]
    assert 0 <= title_box.x0 and title_box.x1 <= boxes["figure"].x1
    assert title_box.y1 <= boxes["figure"].y1


def _completion_records():
    steps = list(range(0, 600, 100))
    records = [
        {"method": method, "depth": depth, "record_steps": steps,
         "relative_errors": list(np.geomspace(1.0, 0.01, len(steps))),
         "singular_values": [list(np.geomspace(50, 0.01, 10) * (k + 1) / 6) for k in steps]}
        for depth in (2, 3, 4) for method in ("implicit exact", "explicit", "explicit balanced")
    ]  # fmt: skip
    return [*records, {"method": "nuclear norm", "depth": None, "relative_error": 0.25}]


def test_matrix_completion_figure_legends_are_off_the_curves(tmp_path, monkeypatch):
    example = load_script("examples/matrix_completion.py", name="matrix_completion_example")
    boxes = _title_and_legend_boxes(
        monkeypatch,
        lambda: example.plot_runs(_completion_records(), tmp_path / "mc.png", "m=2000"),
    )
    for _, legend, axes in boxes["axes"]:
        assert not legend.get_window_extent(boxes["renderer"]).overlaps(axes)


def test_matrix_completion_right_panel_says_what_it_shows(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    example = load_script("examples/matrix_completion.py", name="matrix_completion_example")
    titles = []
    monkeypatch.setattr(plt, "close", lambda fig: titles.extend(a.get_title() for a in fig.axes))
    example.plot_runs(_completion_records(), tmp_path / "mc.png", "m=2000")
    assert "one at a time" not in titles[1]
    assert "top 10 singular values" in titles[1] and "N=4" in titles[1]


def test_matrix_completion_progress_is_plain_lines_in_a_log():
    import io

    example = load_script("examples/matrix_completion.py", name="matrix_completion_example")
    log = io.StringIO()  # not a terminal
    progress = example.Progress(3, stream=log)
    for label in ("N=2 implicit exact", "N=2 explicit", "nuclear norm"):
        callback = progress.fit(label)
        if callback:
            callback(100, 0.5)
    progress.close()
    assert log.getvalue().splitlines() == [
        "fitting N=2 implicit exact", "fitting N=2 explicit", "fitting nuclear norm"
    ]
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_matrix_completion_counts_its_fits():
    example = load_script("examples/matrix_completion.py", name="matrix_completion_example")
    methods = ["implicit exact", "explicit", "explicit balanced", "nuclear norm"]
    assert example.count_fits([1, 2, 3, 4], methods) == 1 + 3 * 3 + 1
    assert example.count_fits([1, 2], ["implicit default"]) == 1


def test_matrix_completion_flags_take_dashes_and_the_old_underscores():
    from overparam_experiments import flags as xflags

    example = load_script("examples/matrix_completion.py", name="matrix_completion_example")
    dashed = xflags.parse(example.define_flags, ["--num-observed", "500", "--max-steps", "7",
                                                 "--noexplicit-balanced", "--lr-factor", "0.2"])
    underscored = xflags.parse(example.define_flags, ["--num_observed", "500", "--max_steps",
                                                      "7", "--noexplicit_balanced",
                                                      "--lr_factor", "0.2"])  # fmt: skip
    assert vars(dashed) == vars(underscored)
    assert (dashed.num_observed, dashed.max_steps, dashed.explicit_balanced) == (500, 7, False)


def test_matrix_completion_caps_the_blas_threads_before_fitting(tmp_path, monkeypatch):
    from overparam_experiments import devices, matrix_completion
    from overparam_experiments import flags as xflags

    example = load_script("examples/matrix_completion.py", name="matrix_completion_example")
    calls = []
    monkeypatch.setattr(devices, "limit_blas_threads", lambda n=1: calls.append(("limit", n)))

    def run_problem(*args, **kwargs):
        calls.append(("fit",))
        return []

    monkeypatch.setattr(matrix_completion, "run_problem", run_problem)
    monkeypatch.setattr(example, "plot_runs", lambda *args: None)
    args = xflags.parse(example.define_flags, ["--output-dir", str(tmp_path), "--nonuclear-norm"])
    example.main(args)
    assert calls == [("limit", 1), ("fit",)]


def test_limit_blas_threads_caps_numpy_and_jax_lapack():
    code = (
        "from overparam_experiments import devices\n"
        "import jax.numpy as jnp\n"
        "assert devices.limit_blas_threads(1) >= 2\n"
        "jnp.linalg.svd(jnp.ones((8, 8)))\n"
        "from threadpoolctl import threadpool_info\n"
        "blas = [i for i in threadpool_info() if i['user_api'] == 'blas']\n"
        "assert len(blas) >= 2 and all(i['num_threads'] == 1 for i in blas), blas\n"
    )
    env = dict(os.environ)
    env.pop("OPENBLAS_NUM_THREADS", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_matrix_completion_output_folder_is_ignored_by_git():
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "matrix_completion_results/" in ignored
