"""How closely a configuration of the transform follows the explicit depth-N network.

For one task (a loss over ordinary Dense/Conv parameters, a start, a learning rate, a
number of steps, optional momentum) :func:`measure_fidelity` trains

* the explicit balanced depth-N factorization of every kernel (``factorized.factorize``)
  with SGD on every factor, in float64: the trajectory the transform is meant to follow;
* the ordinary model with ``optax.chain(overparam_precondition(N, ...), optax.sgd(...))``
  in float32, once per configuration (the exact rule ``method="svd"``, the default, ...),

from the same end-to-end start, and reports for each configuration the relative Frobenius
distance of its kernels to the explicit network's end-to-end kernels (``to_explicit``) and
to the exact rule's (``to_exact``), at checkpoints along the run, with the number of fresh
decompositions the configuration made (``state.decompositions``).

The verdict the fidelity benchmark applies (``benchmarks/fidelity.py``): a configuration
is faithful on a task when its final distance to the explicit network is at most 1.25
times the exact rule's own distance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from matmul_sections import emulated_precision
from overparam_optax import methods
from overparam_optax.factorized import collapse, factorize
from overparam_optax.transform import overparam_precondition

__all__ = ["FidelityTask", "kernel_distance", "measure_fidelity", "tasks"]


class FidelityTask(NamedTuple):
    """A training run to follow: ``loss_fn(params)`` is full-batch, data closed over.

    Attributes:
      name: the task's name in tables.
      loss_fn: loss of ordinary (collapsed) parameters; must work in float32 and float64.
      params: the common end-to-end start (float32 nested mappings with ``'kernel'`` leaves).
      learning_rate: shared by every run.
      num_steps: updates per run.
      momentum: heavy-ball momentum of every run (None: plain gradient descent).
    """

    name: str
    loss_fn: Callable[[Any], jax.Array]
    params: Any
    learning_rate: float
    num_steps: int
    momentum: float | None = None


def _kernels(params) -> dict[str, np.ndarray]:
    """Every kernel with ndim >= 2, keyed by its path, as float64 numpy arrays."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if getattr(path[-1], "key", None) == "kernel" and np.ndim(leaf) >= 2:
            out[jax.tree_util.keystr(path)] = np.asarray(leaf, np.float64)
    return out


def kernel_distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """||a - b||_F / ||b||_F over all kernels together (the same keys in both)."""
    diff = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in b)
    norm = sum(float(np.sum(b[k] ** 2)) for k in b)
    return float(np.sqrt(diff / norm))


def rotation_rounds(state) -> int:
    """The Jacobi rounds that the default's bases ran so far (0 for other methods)."""
    entries = jax.tree.leaves(
        state.factors, is_leaf=lambda x: isinstance(x, methods.TrackedBasis)
    )
    return sum(int(np.sum(e.rounds)) for e in entries if isinstance(e, methods.TrackedBasis))


def _kernel_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: getattr(path[-1], "key", None) == "kernel" and jnp.ndim(leaf) >= 2,
        params,
    )


def _trajectory(loss_fn, params, tx, checkpoints: list[int], to_kernels):
    """(kernels at each checkpoint, final params, final optimizer state)."""

    def segment(params, state, length):
        def step(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(loss_fn)(p), s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (params, state), None, length=length)[0]

    segment = jax.jit(segment, static_argnums=2)  # one compile per segment length
    state, done, found = tx.init(params), 0, []
    for checkpoint in checkpoints:
        params, state = segment(params, state, checkpoint - done)
        done = checkpoint
        found.append(to_kernels(params))
    return found, params, state


def _sgd(task: FidelityTask):
    return optax.sgd(task.learning_rate, momentum=task.momentum)


def measure_fidelity(
    task: FidelityTask,
    N: int,
    configs: Mapping[str, Mapping[str, Any]],
    *,
    num_checkpoints: int = 10,
    key: jax.Array | None = None,
    emulated: Mapping[str, str] | None = None,
) -> dict:
    """Trains the explicit network and each configuration; returns their distances.

    Args:
      task: the run.
      N: the depth.
      configs: name -> keyword options of ``overparam_precondition`` (``{}`` is the
        default); must contain ``"exact"`` (conventionally ``{"method": "svd"}``).
      num_checkpoints: evenly spaced checkpoints along the run (the last is the end).
      key: PRNG key of the balanced factorization's random frames (default: key 0).
      emulated: config name -> a lower matmul precision ("bf16x3", "tf32", "bf16") in which
        that configuration's products run, emulated on any backend: passed as its
        ``precision`` (:func:`matmul_sections.emulated_precision`).

    Returns:
      ``{"checkpoints": [...], "explicit_loss": float, "configs": {name: {"to_explicit":
      [...], "to_exact": [...], "final_loss": float, "decompositions": int,
      "matrix_updates": int}}}``, distances at each checkpoint.
    """
    if "exact" not in configs:
        raise ValueError("configs must include 'exact', the reference configuration.")
    key = jax.random.PRNGKey(0) if key is None else key
    steps = task.num_steps
    checkpoints = sorted(
        {max(1, round(steps * (i + 1) / num_checkpoints)) for i in range(num_checkpoints)}
    )
    with jax.enable_x64(True):
        start64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), task.params)
        explicit, final, _ = _trajectory(
            lambda p: task.loss_fn(collapse(p)),
            factorize(start64, N, key=key),
            _sgd(task),
            checkpoints,
            lambda p: _kernels(collapse(p)),
        )
        explicit_loss = float(task.loss_fn(collapse(final)))
    matrices = len(_kernels(task.params))
    results = {}
    for name, options in configs.items():
        kind = (emulated or {}).get(name, "float32")
        precision = emulated_precision(kind, options.get("precision"))
        options = {**options, "precision": precision}
        tx = optax.chain(overparam_precondition(N, mask=_kernel_mask, **options), _sgd(task))
        found, final, state = _trajectory(task.loss_fn, task.params, tx, checkpoints, _kernels)
        results[name] = {
            "kernels": found,
            "final_loss": float(task.loss_fn(final)),
            "decompositions": int(state[0].decompositions),
            "rotation_rounds": rotation_rounds(state[0]),
            "matrix_updates": steps * matrices,
        }
    exact = results["exact"]["kernels"]
    summary = {}
    for name, r in results.items():
        kernels = r.pop("kernels")
        summary[name] = {
            "to_explicit": [kernel_distance(a, b) for a, b in zip(kernels, explicit, strict=True)],
            "to_exact": [kernel_distance(a, b) for a, b in zip(kernels, exact, strict=True)],
            **r,
        }
    return {"checkpoints": checkpoints, "explicit_loss": explicit_loss, "configs": summary}


# --------------------------------------------------------------------------------------
# The benchmark's tasks.
# --------------------------------------------------------------------------------------


def _softmax_task(images, labels, N: int) -> FidelityTask:
    """Softmax regression on 2,000 digits: W 784 x 10, init 0.05 N(0, 1), lr 0.1, 300 steps."""
    x = jnp.asarray(images[:2000].reshape(2000, -1))
    y = jnp.asarray(labels[:2000])
    w = 0.05 * np.random.default_rng(0).standard_normal((784, 10)).astype(np.float32)

    def loss(p):
        logits = x.astype(p["dense"]["kernel"].dtype) @ p["dense"]["kernel"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return FidelityTask(f"softmax_N{N}", loss, {"dense": {"kernel": jnp.asarray(w)}}, 0.1, 300)


def _lp_start(kind: str, d: int, rng) -> np.ndarray:
    if kind == "near_zero":
        return 1e-3 * rng.standard_normal((d, d))
    if kind == "near_identity":
        return np.eye(d) + 0.01 * rng.standard_normal((d, d))
    u, _ = np.linalg.qr(rng.standard_normal((d, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    if kind == "ill_conditioned":  # singular values from 1 down to 1e-3
        return (u * np.logspace(0, -3, d)) @ v.T
    if kind == "condition_1e4":  # singular values from 1 down to 1e-4
        return (u * np.logspace(0, -4, d)) @ v.T
    if kind == "rank_deficient":  # rank 8 of 64, singular values 0.5
        return 0.5 * u[:, :8] @ v[:, :8].T
    raise ValueError(f"unknown start {kind!r}")


def _lp_task(kind: str, learning_rate: float = 1.0, num_steps: int = 400) -> FidelityTask:
    """l4 regression onto a random 64 x 64 linear map: mean over 256 samples of ||x W - y||_4^4."""
    d, rng = 64, np.random.default_rng(1)
    x = rng.standard_normal((256, d)) / np.sqrt(d)
    y = x @ (rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d))
    w = _lp_start(kind, d, np.random.default_rng(2)).astype(np.float32)

    def loss(p):
        k = p["dense"]["kernel"]
        return jnp.mean(jnp.sum((jnp.asarray(x, k.dtype) @ k - jnp.asarray(y, k.dtype)) ** 4, -1))

    name = f"l4_{kind}" + ("" if learning_rate == 1.0 else f"_lr{learning_rate:g}")
    return FidelityTask(name, loss, {"dense": {"kernel": jnp.asarray(w)}}, learning_rate, num_steps)


def _model_task(name, model, images, labels, count, learning_rate, num_steps) -> FidelityTask:
    """A flax model, full batch on ``count`` digits, momentum 0.9."""
    x = jnp.asarray(images[:count])
    y = jnp.asarray(labels[:count])
    params = model.init(jax.random.PRNGKey(0), x[:1], False)["params"]

    def loss(p):
        dtype = jax.tree.leaves(p)[0].dtype
        logits = model.apply({"params": p}, x.astype(dtype), False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return FidelityTask(name, loss, params, learning_rate, num_steps, momentum=0.9)


def tasks(images: np.ndarray, labels: np.ndarray) -> dict[str, tuple[FidelityTask, int]]:
    """The fidelity benchmark's tasks, name -> (task, depth N), built from MNIST digits."""
    from overparam_experiments.models import MLP, TutorialCNN

    out = {f"softmax_N{N}": (_softmax_task(images, labels, N), N) for N in (2, 3, 4)}
    for kind in ("near_zero", "near_identity", "ill_conditioned", "condition_1e4",
                 "rank_deficient"):
        task = _lp_task(kind)
        out[task.name] = (task, 3)
    fast = _lp_task("near_zero", learning_rate=10.0, num_steps=100)
    out[fast.name] = (fast, 3)
    mlp = MLP(hidden=(256,))
    out["mlp_momentum"] = (
        _model_task("mlp_momentum", _DropTrain(mlp), images, labels, 1000, 0.05, 500),
        3,
    )
    cnn = TutorialCNN()
    out["cnn_momentum"] = (_model_task("cnn_momentum", cnn, images, labels, 64, 0.01, 100), 3)
    return out


class _DropTrain:
    """Adapts a model whose ``__call__`` takes no ``train`` flag to ``apply(v, x, train)``."""

    def __init__(self, model):
        self.model = model

    def init(self, key, x, train):
        del train
        return self.model.init(key, x)

    def apply(self, variables, x, train):
        del train
        return self.model.apply(variables, x)
