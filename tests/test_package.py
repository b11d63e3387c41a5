"""The package's shape: what `import overparam_optax` loads, and imports without side effects.

Run in a fresh interpreter, since this test session has imported everything already.
"""

import os
import subprocess
import sys

CHECK = """
import sys

import jax
from jax._src import xla_bridge

import overparam_optax

loaded = sorted(m for m in sys.modules if m.startswith("overparam_optax.experiments"))
assert not loaded, f"import overparam_optax loaded {loaded}"
assert "mlxtend" not in sys.modules and "matplotlib" not in sys.modules

from absl import app, flags, logging  # noqa: F401  (absl defines its own flags on import)

absl_flags = set(flags.FLAGS)
from overparam_optax.experiments import (  # noqa: F401
    cli, data, devices, models, reference, timing, training, trajectories,
    flags as script_flags, cnn_example, lm_example, tuning, tuned_regression, tuned_mnist,
    tuned_report, paper_sections, paper_report, matmul_sections, equivalence_grid,
)

assert set(flags.FLAGS) == absl_flags, "an import defined script flags"

assert not jax.config.jax_enable_x64, "an import turned on float64"
assert not xla_bridge.backends_are_initialized(), "an import started jax's backends"
print("clean")
"""


def test_import_loads_the_optimizer_only_and_changes_no_global_state():
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    result = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "clean"
