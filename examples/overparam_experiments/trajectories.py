"""Explicit depth-N training vs the preconditioned depth-1 model, side by side.

:func:`compare_trajectories` trains a balanced factorization of a model
(:mod:`overparam_optax.factorized`) with plain gradient descent on every factor, and the
ordinary model with ``overparam_precondition(N)``, from the same end-to-end start, and
records the distance between their end-to-end matrices at every step: the check that the
transform follows the deep trajectory (``benchmarks/equivalence.py``,
``docs/equivalence.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from overparam_experiments.training import run_full_batch
from overparam_optax.factorized import balancedness, collapse, factorize
from overparam_optax.transform import overparam_precondition, overparam_sgd

__all__ = ["TrajectoryComparison", "compare_trajectories"]


class TrajectoryComparison(NamedTuple):
    """What :func:`compare_trajectories` returns (numpy arrays of shape (num_steps,)).

    Attributes:
      gap: ``||W_e^explicit - W_e^implicit||_F / ||W_e^implicit||_F`` at the parameters
        before each update, over all factorized kernels together (``gap[0]`` is the
        initial mismatch, ~1e-16 in float64).
      layer_gaps: the same per layer, a dict from the layer's path ('/'-joined) to an array.
      explicit_loss: the loss of the explicit (factorized) model before each update.
      implicit_loss: the loss of the depth-1 model before each update.
      balancedness: :func:`balancedness` (relative) of the explicit model before each update.
      explicit_params: the explicit model's final (factorized) parameters.
      implicit_params: the depth-1 model's final parameters.
    """

    gap: np.ndarray
    layer_gaps: dict
    explicit_loss: np.ndarray
    implicit_loss: np.ndarray
    balancedness: np.ndarray
    explicit_params: Any
    implicit_params: Any


def _selected_kernel_paths(params, where) -> list[tuple]:
    """Paths of the layers that :func:`factorize` factorizes, in a deterministic order."""
    paths = []

    def visit(node, path):
        if isinstance(node, Mapping):
            kernel = node.get("kernel")
            if kernel is not None and jnp.ndim(kernel) >= 2:
                if where is None or where(path, kernel):
                    paths.append(path)
                return
            for name, sub in node.items():
                visit(sub, path + (name,))

    visit(params, ())
    return paths


def _get(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def _kernel_mask(params, paths: list[tuple]):
    """A bool pytree like params: True exactly on the kernels of the given layers."""
    selected = {path + ("kernel",) for path in paths}

    def visit(node, path):
        if isinstance(node, Mapping):
            return {name: visit(sub, path + (name,)) for name, sub in node.items()}
        return path in selected

    return visit(params, ())


def compare_trajectories(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    depth: int,
    learning_rate: float,
    num_steps: int,
    *,
    hidden: int | Sequence[int] | None = None,
    key: jax.Array | None = None,
    where: Callable[[tuple, jax.Array], bool] | None = None,
    weight_decay: float = 0.0,
) -> TrajectoryComparison:
    """Trains the explicit depth-N model and the preconditioned depth-1 model side by side.

    Both start from the same end-to-end parameters ``params`` (ordinary Dense/Conv
    parameters, nested mappings): the explicit run from ``factorize(params, depth, hidden,
    key=key, where=where)`` with plain full-batch gradient descent on every factor, the
    implicit run from ``params`` itself with ``optax.chain(overparam_precondition(depth,
    mask=...), optax.sgd(learning_rate))``, where the mask selects exactly the factorized
    kernels (everything else, e.g. biases, is plain GD in both runs). Both runs are one
    compiled ``lax.scan`` (:func:`overparam_experiments.training.run_full_batch`).

    With ``weight_decay`` = lambda > 0 the explicit run decays every factor (and bias) by
    lambda, ``theta <- theta - eta * (grad + lambda * theta)``, and the implicit run is
    ``overparam_sgd(eta, N, weight_decay=lambda)``, the paper's
    ``W <- (1 - eta * lambda * N) W - eta * P_W(G)``.

    Gradient descent on the factors is a step-size-``eta`` discretization of the same flow
    that the implicit rule discretizes, so the gap should be O(eta * eta * num_steps): it
    shrinks ~4x when eta is divided by 4 over the same horizon ``eta * num_steps``.

    Args:
      loss_fn: ``loss_fn(params) -> scalar`` for ordinary (collapsed) parameters.
      params: the common end-to-end initialization.
      depth: N.
      learning_rate: eta, shared by both runs.
      num_steps: the number of updates.
      hidden: hidden widths of the explicit model (see :func:`hidden_widths`).
      key: PRNG key for the random orthonormal frames of the balanced init.
      where: which layers to factorize (see :func:`factorize`); default all kernels.
      weight_decay: lambda, applied to every parameter of the explicit model.

    Returns:
      A :class:`TrajectoryComparison`.
    """
    paths = _selected_kernel_paths(params, where)
    if not paths:
        raise ValueError("compare_trajectories: no kernel with ndim >= 2 to factorize.")
    mask = _kernel_mask(params, paths)
    if weight_decay:
        explicit_tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))
        implicit_tx = overparam_sgd(
            learning_rate, depth, weight_decay=weight_decay, mask=mask, method="svd"
        )
    else:
        explicit_tx = optax.sgd(learning_rate)
        implicit_tx = optax.chain(
            overparam_precondition(depth, mask=mask, method="svd"), optax.sgd(learning_rate)
        )

    def init(p):
        return explicit_tx.init(p["explicit"]), implicit_tx.init(p["implicit"])

    def update(grads, state, p=None, **extra):
        del extra
        ue, se = explicit_tx.update(grads["explicit"], state[0], p["explicit"])
        ui, si = implicit_tx.update(grads["implicit"], state[1], p["implicit"])
        return {"explicit": ue, "implicit": ui}, (se, si)

    both = optax.GradientTransformationExtraArgs(init, update)
    start = {
        "explicit": factorize(params, depth, hidden, key=key, where=where),
        "implicit": params,
    }

    def joint_loss(p):
        return loss_fn(collapse(p["explicit"])) + loss_fn(p["implicit"])

    def record(p):
        collapsed = collapse(p["explicit"])
        diffs, norms, layers = [], [], {}
        for path in paths:
            k_e = _get(collapsed, path)["kernel"]
            k_i = _get(p["implicit"], path)["kernel"]
            diff = jnp.sum((k_e - k_i) ** 2)
            norm = jnp.sum(k_i**2)
            diffs.append(diff)
            norms.append(norm)
            layers["/".join(str(n) for n in path)] = jnp.sqrt(diff / norm)
        return {
            "gap": jnp.sqrt(sum(diffs) / sum(norms)),
            "layers": layers,
            "explicit_loss": loss_fn(collapsed),
            "implicit_loss": loss_fn(p["implicit"]),
            "balancedness": balancedness(p["explicit"]),
        }

    final, _, records = run_full_batch(joint_loss, start, both, num_steps, record_fn=record)
    return TrajectoryComparison(
        gap=np.asarray(records["gap"]),
        layer_gaps={k: np.asarray(v) for k, v in records["layers"].items()},
        explicit_loss=np.asarray(records["explicit_loss"]),
        implicit_loss=np.asarray(records["implicit_loss"]),
        balancedness=np.asarray(records["balancedness"]),
        explicit_params=final["explicit"],
        implicit_params=final["implicit"],
    )
