"""benchmarks/accelerator_suite.py: its --quick run (as CI runs it), its paths, and failures.

The quick run is one subprocess with the MLP as the only step-time target (compilation
dominates it); the other tests call the driver's functions directly, with stand-ins for
the benchmarks where a test is about the driver alone.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import types

import jax
import pytest
from absl import flags

from overparam_experiments import flags as xflags
from tests.scripts import load_script

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accelerator_suite.py"


@pytest.fixture(scope="module")
def suite():
    return load_script("benchmarks/accelerator_suite.py")


def _leaves(node, path=""):
    """Yields (path, leaf) for every leaf of a JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{path}/{i}")
    else:
        yield path, node


def test_quick_run_writes_every_section(tmp_path):
    out = tmp_path / "suite.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--step-targets=2", f"--out={out}"],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["environment"]["backend"] == "cpu"
    assert "accelerator_suite.py --quick" in record["environment"]["command"]
    sections = record["sections"]
    assert set(sections) == {"step_time", "linalg", "equivalence"}
    for path, leaf in _leaves(sections):
        assert not path.endswith("/error"), f"{path}: {leaf}"
        if isinstance(leaf, float):
            assert math.isfinite(leaf), path

    mlp = sections["step_time"]["target2_mlp"]
    assert mlp["ratio_to_explicit"]["explicit_sgd"] == 1.0
    assert all(seconds > 0 for seconds in mlp["seconds_per_step"].values())
    assert "target1_cnn" not in sections["step_time"]
    rows = sections["linalg"]["rows"]
    assert rows and all(row["relative_error_vs_svd"]["svd"] == 0.0 for row in rows)
    assert all(max(row["relative_error_vs_svd"].values()) < 1e-3 for row in rows)
    eq = sections["equivalence"]
    assert eq["dtype"] == "float32" and eq["synthetic"]
    assert all(run["final_gap"] < 0.05 for run in eq["runs"])


def test_every_section_argv_parses_with_its_benchmark(suite):
    for argv in ([], ["--quick", "--sizes=64,128", "--N=2", "--step-targets=3"]):
        args = xflags.parse(suite.define_flags, argv)
        for name, benchmark in suite.BENCHMARKS.items():
            section = xflags.parse(benchmark.define_flags, suite.section_argv(name, args))
            assert section.quick == args.quick
    args = xflags.parse(suite.define_flags, ["--sizes=64,128", "--N=2", "--step-targets=3"])
    step = xflags.parse(suite.step_time.define_flags, suite.section_argv("step_time", args))
    assert (step.N, step.targets) == (2, ["3"])
    linalg = xflags.parse(suite.linalg_scaling.define_flags, suite.section_argv("linalg", args))
    assert linalg.sizes == [64, 128]
    eq = xflags.parse(suite.equivalence.define_flags, suite.section_argv("equivalence", args))
    assert eq.float32 and eq.no_plot and not eq.synthetic


def test_bad_flags_are_refused(suite):
    for argv in (["--sections=gpu"], ["--sizes=0"], ["--step-targets=4"], ["--N=0"]):
        with pytest.raises(flags.Error):
            xflags.parse(suite.define_flags, argv)


def test_default_paths(suite):
    def path(*argv):
        return suite.output_path(xflags.parse(suite.define_flags, list(argv)))

    backend = jax.default_backend()
    assert path() == suite.RESULTS_DIR / f"accelerator_suite_{backend}.json"
    assert path("--sections=linalg").name == f"accelerator_suite_{backend}_linalg.json"
    quick = path("--quick")
    assert quick.parent == pathlib.Path(tempfile.gettempdir())
    assert path("--out=x.json") == pathlib.Path("x.json")


def test_a_failed_section_is_recorded_and_the_others_run(suite, tmp_path, monkeypatch):
    def benchmark(run):
        return types.SimpleNamespace(
            define_flags=lambda flag_values: flags.DEFINE_boolean(
                "quick", False, "", flag_values=flag_values
            ),
            run=run,
            __file__="stand_in.py",
        )

    def fail(args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(suite, "section_argv", lambda name, args: [])
    monkeypatch.setattr(suite.xflags, "setup_platform", lambda args: None)
    monkeypatch.setattr(suite, "BENCHMARKS", {
        "step_time": benchmark(fail),
        "linalg": benchmark(lambda args: {"rows": []}),
    })  # fmt: skip
    out = tmp_path / "suite.json"
    args = xflags.parse(suite.define_flags, [f"--out={out}", "--sections=step_time,linalg"])
    with pytest.raises(SystemExit) as exit_info:
        suite.main(args)
    assert exit_info.value.code == 1
    record = json.loads(out.read_text())
    assert record["sections"]["step_time"]["error"] == "RuntimeError: out of memory"
    assert record["sections"]["linalg"]["rows"] == []
    assert suite.errors(record) == ["step_time"]
