"""The package's shape: the wheel's modules need no optional extra, and imports have no side
effects (the library's, the examples' helpers' and the benchmarks' harnesses').

Run in a fresh interpreter, since this test session has imported everything already.
"""

import ast
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

#: The optional extras' packages, and the helpers' distribution.
EXTRAS = ("absl", "matplotlib", "tqdm", "mlxtend", "cvxpy", "chex", "overparam_experiments")
#: What the subprocess makes unimportable (``sys.modules[name] = None``): absl is left out,
#: since flax imports it itself.
BLOCKED = tuple(name for name in EXTRAS if name != "absl")

LIBRARY = f"""
import sys

for name in {BLOCKED!r}:
    sys.modules[name] = None

import jax
from jax._src import xla_bridge

import overparam_optax
import overparam_optax.testing

assert not jax.config.jax_enable_x64, "an import turned on float64"
assert not xla_bridge.backends_are_initialized(), "an import started jax's backends"
print("clean")
"""

HELPERS = """
import sys

import jax
from jax._src import xla_bridge
from absl import app, flags, logging  # noqa: F401  (absl defines its own flags on import)

absl_flags = set(flags.FLAGS)
from overparam_experiments import (  # noqa: F401
    data, devices, flags as script_flags, implicit_regularization, matrix_completion, models,
    text, timing, training, trajectories,
)
import default_report, equivalence_grid, fidelity_tasks, matmul_sections  # noqa: F401
import paper_report, paper_sections, tuned_mnist, tuned_regression, tuned_report, tuning  # noqa

assert set(flags.FLAGS) == absl_flags, "an import defined script flags"
assert "mlxtend" not in sys.modules and "matplotlib" not in sys.modules
assert not jax.config.jax_enable_x64, "an import turned on float64"
assert not xla_bridge.backends_are_initialized(), "an import started jax's backends"
print("clean")
"""


def _run(code: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "benchmarks"), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "clean"


def test_the_library_imports_without_any_extra_and_changes_no_global_state():
    _run(LIBRARY)


def test_no_module_of_the_wheel_imports_an_extra_at_top_level():
    found = []
    for path in sorted((REPO / "overparam_optax").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # the module level only
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in EXTRAS]
    assert not found, found


def test_the_helpers_import_without_defining_flags_or_changing_global_state():
    _run(HELPERS)
