"""benchmarks/accelerator_suite.py: its --smoke run (as CI runs it), its paths and its planning.

The smoke run is one subprocess (about 35 CPU-seconds, mostly compilation); the other tests
import the script and call its argument parsing and budget planning directly.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import pytest

from tests.scripts import load_script

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accelerator_suite.py"


@pytest.fixture(scope="module")
def suite():
    """The script as a module (registered while the tests use it: flax's dataclasses look
    their module up in sys.modules)."""
    module = load_script("benchmarks/accelerator_suite.py")
    try:
        yield module
    finally:
        del sys.modules[module.__name__]


def _walk(node, path=""):
    """Yields (path, leaf) for every leaf of a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")
    else:
        yield path, node


def test_smoke_run_writes_every_section_with_finite_numbers(suite, tmp_path):
    out = tmp_path / "suite.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["environment"]["backend"] == "cpu"
    assert record["environment"]["jax_version"] == jax.__version__
    assert "accelerator_suite.py --smoke" in record["environment"]["command"]
    sections = record["sections"]
    assert set(sections) == {"step_time", "linalg", "equivalence", "step_methods"}
    for path, leaf in _walk(record):
        assert not path.endswith("/error"), f"{path}: {leaf}"
        if isinstance(leaf, float):
            assert math.isfinite(leaf), path

    # (a) and (d): every model, every contender somewhere, ratios to SGD from the
    # interleaved runs; the core four in (a), the others in (d).
    timed = set()
    for section, contenders in (
        ("step_time", set(suite.CORE_CONTENDERS)),
        ("step_methods", {"sgd"} | set(suite.STEP_EXTRAS)),
    ):
        models = sections[section]["models"]
        assert set(models) == {"cnn", "mlp", "transformer"}
        for res in models.values():
            assert res["ratio_to_sgd"]["sgd"] == 1.0
            assert not res["skipped"]
            assert all(t > 0 for t in res["seconds_per_step"].values())
            assert set(res["ratio_to_sgd"]) <= contenders
            timed |= set(res["ratio_to_sgd"])
    assert timed == {"sgd", "adamw", "muon"} | {
        f"overparam_{m}" for m in ("default", "svd", "eigh", "newton", "default_highest")
    }

    # (b) every method x precision timed at the first size; the smoke call budget (1e-9 s)
    # skips the second size, and the skips are recorded with their reason.
    rows = sections["linalg"]["rows"]
    assert [row["n"] for row in rows] == [8, 16]
    precisions = ("HIGHEST", "HIGH", "DEFAULT", "BF16_X3")
    labels = {"svd/HIGHEST", "eigh/HIGHEST"} | {f"newton/{p}" for p in precisions}
    assert labels == set(rows[0]["entries"]) == set(sections["linalg"]["entries"])
    for label in labels:
        entry = rows[0]["entries"][label]
        assert entry["seconds"] > 0
        assert entry["relative_error_vs_svd_highest"] < 0.05, label
        assert "call budget" in rows[1]["entries"][label]["skipped"]
    assert rows[0]["entries"]["svd/HIGHEST"]["relative_error_vs_svd_highest"] == 0.0
    assert "coincide" in sections["linalg"]["precision_note"]

    # (c) the preconditioned depth-1 run follows the explicit FactorizedDense run far more
    # closely than plain SGD does, and compare_trajectories agrees.
    eq = sections["equivalence"]
    assert eq["dtype"] == "float32"
    assert eq["initial_output_gap"] < 1e-5
    runs = eq["factorized_dense"]
    assert runs["overparam_default"]["final_gap"] < 0.1 * runs["plain_sgd_control"]["final_gap"]
    assert eq["compare_trajectories"]["final_gap"] < 0.1 * runs["plain_sgd_control"]["final_gap"]

    table = out.with_suffix(".md").read_text()
    for heading in (
        "## Step time /",
        "## Step time of each method",
        "## precondition_matrix",
        "## Equivalence",
        "## Sections",
    ):
        assert heading in table


def test_default_paths(suite):
    smoke = suite.output_path(suite.parse_args(["--smoke"]))
    assert smoke.parent == pathlib.Path(tempfile.gettempdir())
    assert suite.RESULTS_DIR not in smoke.parents
    full = suite.output_path(suite.parse_args([]))
    assert full == suite.RESULTS_DIR / f"accelerator_suite_{jax.default_backend()}.json"
    part = suite.output_path(suite.parse_args(["--sections", "linalg"]))
    assert part.name == f"accelerator_suite_{jax.default_backend()}_linalg.json"


def test_budget_defaults(suite):
    full = suite.parse_args([])
    budgets = [getattr(full, f"{s}_budget") for s in suite.SECTIONS]
    assert budgets == [180, 130, 30, 80]
    assert sum(budgets) <= 8 * 60 - 60
    assert full.call_budget == 2.0
    assert full.sizes == [256, 512, 1024, 2048, 4096, 8192]
    assert suite.parse_args(["--linalg-budget", "30"]).linalg_budget == 30


@pytest.mark.parametrize(
    "argv",
    [["--sizes", "0"], ["--condition", "0.5"], ["--sections", "gpu"], ["--models", "rnn"],
     ["--step-budget", "-1"], ["--call-budget", "nan"]],
)  # fmt: skip
def test_bad_arguments_exit_2(suite, argv, capsys):
    with pytest.raises(SystemExit) as error:
        suite.parse_args(argv)
    assert error.value.code == 2
    assert "error" in capsys.readouterr().err


def test_plan_shrinks_repeats_then_drops_the_slowest(suite):
    # The window length is never shortened: it holds one recomputation of the defaults.
    probe = {"sgd": 0.01, "adamw": 0.012, "overparam_svd": 1.0}
    assert suite._plan(probe, 5, 5, remaining=100.0, smoke=False) == (5, [])
    assert suite._plan(probe, 5, 5, remaining=25.0, smoke=False) == (3, [])
    repeats, dropped = suite._plan(probe, 5, 5, remaining=1.0, smoke=False)
    assert dropped == ["overparam_svd"]
    assert 0.022 * 5 * (repeats + 1) <= 1.0


def test_a_compilation_past_its_limit_is_abandoned(suite):
    step = jax.jit(lambda carry, x: (carry[0] + x, carry[1]))
    carry = (jax.numpy.zeros(3), 0)
    data_fn = lambda i: (jax.numpy.full(3, float(i)),)  # noqa: E731
    compiled, same, seconds, probe = suite._compile_and_probe(step, carry, data_fn, limit=1e-9)
    assert compiled is None and probe is None and same is carry and seconds >= 0
    compiled, carry, _, probe = suite._compile_and_probe(step, carry, data_fn, limit=60.0)
    assert compiled is not None and probe > 0
    assert float(carry[0][0]) == 1.0  # steps 0 and 1 ran


def test_errors_are_found_anywhere_in_a_record(suite):
    record = {
        "sections": {
            "linalg": {"rows": [{"entries": {"svd/HIGH": {"seconds": 1.0}}}]},
            "step_time": {"models": {"cnn": {"failed": {"muon": {"error": "OOM"}}}}},
        }
    }
    assert suite.errors(record) == ["/sections/step_time/models/cnn/failed/muon"]
    record["sections"]["linalg"]["rows"][0]["entries"]["svd/HIGH"] = {"error": "x"}
    assert len(suite.errors(record)) == 2
