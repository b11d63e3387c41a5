"""overparam_optax: the implicit acceleration of depth as an optax transformation.

Gradient descent on a depth-N linear factorization W = W_N ... W_1 of a weight matrix
moves W along a preconditioned gradient P_W(G) (Arora, Cohen & Hazan, ICML 2018). This
package applies that preconditioner directly, so the original model trains along the
deep trajectory with no extra parameters:

    tx = optax.chain(overparam_optax.overparam_precondition(N=3), optax.sgd(1e-2))

``overparam_optax.factorized`` holds the explicit depth-N baselines;
:mod:`overparam_optax.testing` (imported only on request) a float64 reference for tests.
"""

from overparam_optax import factorized, methods
from overparam_optax.factorized import FactorizedConv, FactorizedDense, balancedness, collapse
from overparam_optax.linalg import precondition_matrix, precondition_vector
from overparam_optax.numerics import depth_kernel
from overparam_optax.transform import (
    OverparamPreconditionState,
    overparam_precondition,
    overparam_sgd,
    state_shardings,
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
    "methods",
    "overparam_precondition",
    "overparam_sgd",
    "precondition_matrix",
    "precondition_vector",
    "state_shardings",
]
