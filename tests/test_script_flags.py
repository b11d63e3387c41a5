"""Every script refuses bad flag values at once: non-zero exit, one line naming the flag.

Each case runs a script's ``__main__`` as a user would (``sys.argv``, absl's ``app.run``,
``sys.exit``), in a child process forked from one runner that has imported jax, optax,
flax and the library once: about 0.3 s a case instead of the 5-10 s of a cold start on a
busy machine. A few cases also run cold, in their own subprocess. The assertions: the exit
status is not 0, the first line of stderr is absl's flag error and names the flag, no
traceback, nothing trained (each case ends well under the seconds of any real work), and
the default output folders were not created.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CASE_SECONDS = 20  # a forked case that takes longer started real work (or hung)

# The runner: imports once, then forks one child per case, which runs the script as
# __main__ with the case's argv and its stdout/stderr in a pipe.
RUNNER = r"""
import json, os, runpy, signal, sys, time, traceback
import jax, optax, flax.linen, matplotlib, scipy.linalg  # noqa: F401  (warm imports)
import overparam_optax, overparam_optax.factorized  # noqa: F401
from overparam_experiments import data, training, models, text  # noqa: F401

results = []
for script, argv in json.load(sys.stdin):
    read_end, write_end = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: the script, as `python script argv...`
        os.close(read_end)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        signal.alarm(LIMIT)
        sys.argv = [script, *argv]
        sys.path.insert(0, os.path.dirname(script))  # as `python script` puts it first
        code = 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if not isinstance(stop.code, (int, type(None))):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        for chunk in iter(lambda: pipe.read(65536), b""):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    results.append({
        "status": os.waitstatus_to_exitcode(status),
        "output": b"".join(chunks).decode(errors="replace"),
        "seconds": time.perf_counter() - start,
    })
json.dump(results, sys.stdout)
""".replace("LIMIT", str(CASE_SECONDS))


def _no_gpu() -> bool:
    return shutil.which("nvidia-smi") is None and not os.path.exists("/dev/kfd")


def _cases(tmp: pathlib.Path) -> list[tuple[str, list[str], str]]:
    """(script, argv, the flag the error must name) — the issue's cases and more."""
    a_file = tmp / "a_file.txt"
    a_file.write_text("not a folder")
    corrupt = tmp / "corrupt.json"
    corrupt.write_text('{"runs": [1, 2')
    under_file = str(a_file / "sub")
    missing = str(tmp / "no_such_folder")
    empty = tmp / "empty_folder"
    empty.mkdir(exist_ok=True)
    newton_200 = ["--method", "newton", "--depth", "200"]
    absent_platform = "gpu" if _no_gpu() else "tpu"
    return [
        ("examples/mnist_cnn.py", newton_200, "depth"),
        ("examples/mnist_cnn.py", ["--steps", "0"], "steps"),
        ("examples/mnist_cnn.py", ["--depth", "1"], "depth"),
        ("examples/mnist_cnn.py", ["--modes", "none,foo"], "modes"),
        ("examples/mnist_cnn.py", ["--optimizer", "lion"], "optimizer"),
        ("examples/mnist_cnn.py", ["--output-dir", under_file], "output-dir"),
        ("examples/mnist_cnn.py", ["--data-dir", missing], "data-dir"),
        ("examples/mnist_cnn.py", ["--lr", "nan"], "lr"),
        ("examples/sharded_mlp.py", ["--lr", "nan"], "lr"),
        ("examples/lp_regression.py", ["--init-scale", "nan"], "init-scale"),
        ("examples/transformer_lm.py", ["--target-loss", "nan"], "target-loss"),
        ("examples/transformer_lm.py", ["--context", "100000000"], "context"),
        ("examples/matrix_completion.py", ["--lr-factor", "nan"], "lr-factor"),
        ("examples/matrix_completion.py", ["--scale", "nan"], "scale"),
        ("examples/matrix_completion.py", ["--num_observed", "0"], "num-observed"),
        ("benchmarks/transformer_default.py", ["--lr-adamw-overparam", "nan"],
         "lr-adamw-overparam"),  # fmt: skip
        ("benchmarks/fidelity.py", ["--data_dir", missing], "data_dir"),
        ("benchmarks/fidelity.py", ["--data_dir", str(empty)], "data_dir"),
        ("benchmarks/implicit_regularization.py", ["--lr", "nan"], "lr"),
        ("examples/transformer_lm.py", newton_200, "depth"),
        ("examples/transformer_lm.py", ["--d-model", "30", "--heads", "4"], "d-model"),
        ("examples/transformer_lm.py", ["--lr", "adamw=0"], "lr"),
        ("examples/transformer_lm.py", ["--lr", "sgd=0.1"], "lr"),
        ("examples/transformer_lm.py", ["--modes", "adamw,lion"], "modes"),
        ("examples/transformer_lm.py", ["--depth", "1"], "depth"),
        ("examples/transformer_lm.py", ["--text-file", missing], "text-file"),
        ("examples/transformer_lm.py", ["--output-dir", str(a_file)], "output-dir"),
        ("examples/lp_regression.py", ["--init-scale", "1e300"], "init-scale"),
        ("examples/lp_regression.py", ["--lr-min", "300", "--lr-max", "400"], "lr-min"),
        ("examples/lp_regression.py", ["--lr-min", "0", "--lr-max", "-2"], "lr-max"),
        ("examples/lp_regression.py", ["--depths", "1,2"], "depths"),
        ("examples/lp_regression.py", ["--p", "2,nan"], "p"),
        ("examples/lp_regression.py", ["--data-dir", missing], "data-dir"),
        ("examples/lp_regression.py", ["--output-dir", under_file], "output-dir"),
        ("examples/sharded_mlp.py", ["--hidden", "3", "--model-parallel", "8", "--cpu-devices",
                                     "8"], "hidden"),  # fmt: skip
        ("examples/sharded_mlp.py", ["--hidden", "3", "--model-parallel", "8"], "model-parallel"),
        ("examples/sharded_mlp.py", ["--batch-size", "5000"], "batch-size"),
        ("benchmarks/batching.py", ["--N", "200"], "N"),
        ("benchmarks/batching.py", ["--shapes", "10x0"], "shapes"),
        ("benchmarks/batching.py", ["--count", "1"], "count"),
        ("benchmarks/linalg_scaling.py", ["--N", "200"], "N"),
        ("benchmarks/linalg_scaling.py", ["--sizes", "0,64"], "sizes"),
        ("benchmarks/linalg_scaling.py", ["--platform", absent_platform], "platform"),
        ("benchmarks/matmul_method.py", ["--sections", "bogus"], "sections"),
        ("benchmarks/matmul_method.py", ["--depths", "x"], "depths"),
        ("benchmarks/matmul_method.py", ["--depths", "0"], "depths"),
        ("benchmarks/matmul_method.py", ["--depths", "200"], "depths"),
        ("benchmarks/matmul_method.py", ["--shapes", "10x0"], "shapes"),
        ("benchmarks/matmul_method.py", ["--busy-processes", "-1"], "busy-processes"),
        ("benchmarks/matmul_method.py", ["--blas-threads", "2"], "blas-threads"),
        ("benchmarks/matmul_method.py", ["--ratio-precisions", "HIGHEST,FOO"],
         "ratio-precisions"),  # fmt: skip
        ("benchmarks/equivalence.py", ["--replot", str(corrupt)], "replot"),
        ("benchmarks/equivalence.py", ["--tasks", "ethanol_l2,foo"], "tasks"),
        ("benchmarks/accuracy.py", ["--platform", absent_platform], "platform"),
        ("benchmarks/accuracy.py", ["--sizes", "3x"], "sizes"),
        ("benchmarks/blocks.py", ["--steps", "0"], "steps"),
        ("benchmarks/blocks.py", ["--momentum", "2"], "momentum"),
        ("benchmarks/reproduce_paper.py", ["--depths", "1,2"], "depths"),
        ("benchmarks/reproduce_paper.py", ["--sections", "foo"], "sections"),
        ("benchmarks/reproduce_paper.py", ["--figures-dir", str(a_file)], "figures-dir"),
        ("benchmarks/transformer_lm.py", ["--seeds", "0,,1"], "seeds"),
        ("benchmarks/transformer_lm.py", ["--grid-adamw", "0.1,-1"], "grid-adamw"),
        ("benchmarks/tuned_baselines.py", [], "section"),
        ("benchmarks/tuned_baselines.py", ["--section", "mnist", "--mnist-workers", "0"],
         "mnist-workers"),  # fmt: skip
        ("benchmarks/tuned_baselines.py", ["--section", "mnist", "--mnist-lrs", "0.01,0"],
         "mnist-lrs"),  # fmt: skip
        ("benchmarks/tuned_baselines.py", ["--section", "mnist", "--estimate", "-2"],
         "estimate"),  # fmt: skip
        ("benchmarks/tuned_baselines.py", ["--section", "ethanol", "--lr-min", "0",
                                           "--lr-max", "-1"], "lr-min"),  # fmt: skip
        ("benchmarks/tuned_baselines.py", ["--section", "tables", "--results-dir", missing],
         "results-dir"),  # fmt: skip
    ]


def _names_the_flag(first_line: str, flag: str) -> bool:
    """absl's line: ``flag --NAME=...: why`` or, for a combination, ``flags NAME=..., ...``."""
    return (
        f"flag --{flag}=" in first_line
        or (first_line.startswith("FATAL Flags parsing error: flags ") and f"{flag}=" in first_line)
        or f"flag --{flag} must have a value" in first_line  # a required flag left out
    )


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Runs every case (in an empty folder, so that no default output folder is hit)."""
    tmp = tmp_path_factory.mktemp("bad_flags")
    workdir = tmp / "cwd"
    workdir.mkdir()
    cases = _cases(tmp)
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(REPO))
    env.pop("JAX_PLATFORMS", None)
    runner = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps([[str(REPO / script), argv] for script, argv, _ in cases]),
        capture_output=True, text=True, cwd=workdir, env=env, timeout=600,
    )  # fmt: skip
    assert runner.returncode == 0, runner.stderr[-3000:]
    return cases, json.loads(runner.stdout), workdir


def test_every_bad_value_exits_at_once_with_one_line_naming_its_flag(outcomes):
    cases, results, workdir = outcomes
    failures = []
    for (script, argv, flag), result in zip(cases, results, strict=True):
        output = result["output"]
        lines = [line for line in output.splitlines() if line.strip()]
        first = lines[0] if lines else ""
        problems = [
            result["status"] == 0 and "exit status 0",
            not first.startswith("FATAL Flags parsing error:") and "not absl's flag error",
            not _names_the_flag(first, flag) and f"does not name --{flag}",
            "Traceback" in output and "a traceback",
            result["seconds"] > CASE_SECONDS / 2 and f"took {result['seconds']:.0f} s",
        ]
        problems = [p for p in problems if p]
        if problems:
            failures.append(f"{script} {' '.join(argv)}: {problems}\n{output[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert list(workdir.iterdir()) == []  # no default output folder was created


@pytest.mark.parametrize(
    "script, argv, flag",
    [
        ("examples/mnist_cnn.py", ["--method", "newton", "--depth", "200"], "depth"),
        ("benchmarks/matmul_method.py", ["--sections", "bogus"], "sections"),
    ],
)
def test_cold_start_refuses_before_any_work(tmp_path, script, argv, flag):
    """As a user runs it, in a fresh interpreter: refused before training starts."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(REPO))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / script), *argv], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    seconds = time.perf_counter() - start
    first = result.stderr.strip().splitlines()[0]
    assert result.returncode == 1, result.stderr
    assert _names_the_flag(first, flag), first
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert seconds < 60  # the import of jax; the baseline's training alone took longer
    assert list(tmp_path.iterdir()) == []


def _scripts_with_flag_functions() -> list[str]:
    scripts = sorted([*REPO.glob("examples/*.py"), *REPO.glob("benchmarks/*.py")])
    return [str(p.relative_to(REPO)) for p in scripts if "def define_flags(" in p.read_text()]


@pytest.mark.parametrize("script", _scripts_with_flag_functions())
def test_every_float_flag_refuses_nan_and_infinity(script, monkeypatch):
    """absl's bounds let NaN pass (every comparison with it is False); the helper refuses it."""
    from absl import flags as absl_flags

    from overparam_experiments import flags as xflags
    from tests.scripts import load_script

    monkeypatch.syspath_prepend(str((REPO / script).parent))
    module = load_script(script, name=f"nan_check_{pathlib.Path(script).stem}")
    scratch = absl_flags.FlagValues()
    module.define_flags(scratch)
    floats = [n for n in scratch if isinstance(scratch[n].parser, absl_flags.FloatParser)]
    for name in floats:
        for value in ("nan", "inf", "-inf"):
            # An alias (--lr_factor) is reported under the flag it stands for (--lr-factor);
            # an infinity may meet a bound first.
            with pytest.raises(absl_flags.Error, match=rf"^flag --[\w-]+={value}: "):
                xflags.parse(module.define_flags, [f"--{name}={value}"])
