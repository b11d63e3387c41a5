"""overparam_optax: the implicit acceleration of depth as an optax transformation.

Gradient descent on a depth-N linear factorization W = W_N ... W_1 of a weight matrix
moves W along a preconditioned gradient P_W(G) (Arora, Cohen & Hazan, ICML 2018). This
package applies that preconditioner directly, so the original model trains along the
deep trajectory with no extra parameters:

    tx = optax.chain(overparam_optax.overparam_precondition(N=3), optax.sgd(1e-2))

``overparam_optax.factorized`` holds the explicit depth-N baselines. The helpers of the
examples and benchmarks (data loaders, training loops, trajectory comparison) live in
:mod:`overparam_optax.experiments`, which this package does not import.
"""

from overparam_optax import factorized
from overparam_optax.factorized import FactorizedConv, FactorizedDense, balancedness, collapse
from overparam_optax.linalg import depth_kernel, precondition_matrix, precondition_vector
from overparam_optax.sharding import state_shardings
from overparam_optax.transform import (
    OverparamPreconditionState,
    overparam_precondition,
    overparam_sgd,
)
from overparam_optax.views import MatrixDimensionNumbers

__version__ = "0.2.0"

__all__ = [
    "FactorizedConv",
    "FactorizedDense",
    "MatrixDimensionNumbers",
    "OverparamPreconditionState",
    "balancedness",
    "collapse",
    "depth_kernel",
    "factorized",
    "overparam_precondition",
    "overparam_sgd",
    "precondition_matrix",
    "precondition_vector",
    "state_shardings",
]
