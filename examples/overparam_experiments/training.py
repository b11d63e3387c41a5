"""The small training helpers shared by the examples and the benchmarks.

* :func:`run_full_batch` — full-batch training with the whole loop inside ``jax.lax.scan``
  (one compiled program, fast for 10,000 steps); used for the paper's regression figures.
* :func:`run_full_batch_grid` — the same for many learning rates at once, vectorized with
  ``jax.vmap`` (the learning-rate grid searches of the reproduction).
* :func:`grid_search` — that, plus the choice of the best learning rate.
* :func:`run_minibatch` / :func:`evaluate_classifier` — minibatch training and batched
  evaluation of a classifier (the MNIST CNN example).
* :func:`lp_regression_loss`, :func:`steps_to_reach` and :func:`smoothed_steps_to_reach` —
  the paper's l_p loss and its iterations-to-target metric (plain, and on a trailing mean
  for noisy minibatch losses, :func:`trailing_mean`).

Optimizers are any ``optax.GradientTransformation``; ``update`` is always called with the
parameters, as :func:`overparam_optax.overparam_precondition` requires.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from overparam_optax import OverparamPreconditionState

__all__ = [
    "GridSearchResult",
    "MinibatchResult",
    "evaluate_classifier",
    "grid_search",
    "log_grid",
    "lp_regression_loss",
    "run_full_batch",
    "run_full_batch_grid",
    "run_minibatch",
    "smoothed_steps_to_reach",
    "steps_to_reach",
    "tracked_decompositions",
    "trailing_mean",
]

Params = Any


# --------------------------------------------------------------------------------------
# Losses and metrics.
# --------------------------------------------------------------------------------------


def lp_regression_loss(w: jax.Array, X: jax.Array, y: jax.Array, p: float) -> jax.Array:
    r"""The l_p regression loss of Arora et al. (2018): mean of (1/p)|x^T w - y|^p.

    .. math::
      L(w) = \frac{1}{n} \sum_{i=1}^{n} \frac{1}{p} |x_i^\top w - y_i|^p

    Args:
      w: the weights, shape ``(d,)`` or ``(d, 1)`` (a one-output end-to-end matrix; both
        give the same loss).
      X: the inputs, shape ``(n, d)``.
      y: the targets, shape ``(n,)``.
      p: the exponent (the paper uses 2 and 4).

    Returns:
      The scalar loss, in the promoted dtype of the inputs.

    Examples:
      >>> import jax.numpy as jnp
      >>> lp_regression_loss(jnp.ones(2), jnp.eye(2), jnp.zeros(2), p=2)
      Array(0.5, dtype=float32)
    """
    residual = jnp.reshape(X @ w, (-1,)) - y
    return jnp.mean(jnp.abs(residual) ** p) / p


def steps_to_reach(losses: np.ndarray, target: float) -> int | None:
    """Iterations-to-target: the first step whose loss is at or below ``target``.

    Args:
      losses: losses per step, as returned by :func:`run_full_batch` (``losses[t]`` is the
        loss after t updates).
      target: the loss to reach.

    Returns:
      The smallest ``t`` with ``losses[t] <= target``, or None if it is never reached.
    """
    reached = np.flatnonzero(np.asarray(losses) <= target)
    return int(reached[0]) if reached.size else None


def trailing_mean(values, window: int) -> np.ndarray:
    """Means over every ``window`` consecutive values: entry i is ``mean(values[i:i+window])``.

    Args:
      values: a 1-D sequence of length n (e.g. per-step minibatch losses).
      window: a positive int, at most n.

    Returns:
      A float64 numpy array of length ``n - window + 1``.
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}.")
    if not 1 <= window <= len(values):
        raise ValueError(f"window must be in 1..{len(values)}, got {window}.")
    return np.convolve(values, np.ones(window) / window, "valid")


def smoothed_steps_to_reach(losses, target: float, window: int) -> int | None:
    """Iterations-to-target for noisy losses: steps until a ``window``-step mean reaches it.

    The answer is ``t + window`` for the first ``t`` with ``mean(losses[t:t+window]) <=
    target``: the number of steps after which the trailing mean of the last ``window``
    losses first gets there. A run that descends steadily lags its raw curve by about half a
    window; compare runs smoothed with the same window.

    Args:
      losses: per-step losses, as returned by :func:`run_minibatch`.
      target: the loss to reach.
      window: steps per mean (:func:`trailing_mean`).

    Returns:
      The number of steps, or None if no window's mean reaches ``target``.
    """
    reached = steps_to_reach(trailing_mean(losses, window), target)
    return None if reached is None else reached + window


# --------------------------------------------------------------------------------------
# Full-batch training.
# --------------------------------------------------------------------------------------


def _full_batch_scan(loss_fn, params, tx, num_steps, record_fn):
    """The traced body shared by run_full_batch and run_full_batch_grid."""
    value_and_grad = jax.value_and_grad(loss_fn)

    def step(carry, _):
        params, opt_state = carry
        loss, grads = value_and_grad(params)
        record = record_fn(params) if record_fn is not None else None
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, record)

    (params, _), (losses, records) = jax.lax.scan(
        step, (params, tx.init(params)), xs=None, length=num_steps
    )
    return params, losses, records


def run_full_batch(
    loss_fn: Callable[[Params], jax.Array],
    params: Params,
    tx: optax.GradientTransformation,
    num_steps: int,
    *,
    record_fn: Callable[[Params], Any] | None = None,
) -> tuple[Params, np.ndarray, Any]:
    """Full-batch training, compiled as a single ``jax.lax.scan`` over the steps.

    Works in whatever precision the parameters and the loss use: enable
    ``jax.config.update("jax_enable_x64", True)`` and pass float64 parameters and data for
    a float64 run.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``; the data are closed over (constants of the
        compiled program).
      params: the initial parameters, any pytree.
      tx: the optimizer. ``tx.update(grads, state, params)`` is called with the params.
      num_steps: the number of updates.
      record_fn: optional ``record_fn(params) -> pytree`` evaluated at the same
        parameters as the loss, every step (e.g. the end-to-end matrix).

    Returns:
      ``(final_params, losses, records)``: the parameters after ``num_steps`` updates; a
      numpy array of shape ``(num_steps,)`` where ``losses[t]`` is the loss at the
      parameters *before* update t (so ``losses[0]`` is the initial loss); and the
      records stacked along a new leading axis of size ``num_steps`` (as numpy arrays),
      or None without ``record_fn``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> loss = lambda w: jnp.sum((w - 3.0) ** 2)
      >>> w, losses, _ = run_full_batch(loss, jnp.zeros(2), optax.sgd(0.1), 100)
      >>> losses.shape, bool(losses[-1] < 1e-6)
      ((100,), True)
    """
    run = jax.jit(lambda p: _full_batch_scan(loss_fn, p, tx, int(num_steps), record_fn))
    final_params, losses, records = run(params)
    return final_params, np.asarray(losses), jax.device_get(records)


def run_full_batch_grid(
    loss_fn: Callable[[Params], jax.Array],
    params: Params,
    make_optimizer: Callable[[jax.Array], optax.GradientTransformation],
    learning_rates,
    num_steps: int,
    *,
    record_fn: Callable[[Params], Any] | None = None,
) -> tuple[Params, np.ndarray, Any]:
    """:func:`run_full_batch` for many learning rates at once, vectorized with ``jax.vmap``.

    All runs start from the same ``params``. The optimizer is built *inside* the vmapped
    function from a traced scalar learning rate, so ``make_optimizer`` must accept a
    ``jax.Array`` (``optax.sgd``, ``optax.adam``, ``overparam_optax.overparam_sgd`` and any
    ``optax.chain(..., optax.scale_by_learning_rate(lr))`` do; with hyperparameters
    that must be Python numbers, wrap them in ``optax.inject_hyperparams``). A run that
    diverges fills its losses with ``inf``/``nan`` without disturbing the others.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``.
      params: the common initial parameters.
      make_optimizer: ``make_optimizer(learning_rate) -> GradientTransformation``.
      learning_rates: a 1-D sequence of learning rates, length K.
      num_steps: the number of updates of every run.
      record_fn: as in :func:`run_full_batch`.

    Returns:
      ``(final_params, losses, records)`` as in :func:`run_full_batch` with a new leading
      axis of size K: ``losses`` has shape ``(K, num_steps)``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> loss = lambda w: jnp.sum((w - 3.0) ** 2)
      >>> _, losses, _ = run_full_batch_grid(loss, jnp.zeros(2), optax.sgd, [0.01, 0.1], 50)
      >>> losses.shape
      (2, 50)
    """
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    learning_rates = jnp.asarray(learning_rates, dtype=dtype)
    if learning_rates.ndim != 1:
        raise ValueError(f"learning_rates must be 1-D, got shape {learning_rates.shape}.")

    def one_run(learning_rate):
        tx = make_optimizer(learning_rate)
        return _full_batch_scan(loss_fn, params, tx, int(num_steps), record_fn)

    final_params, losses, records = jax.jit(jax.vmap(one_run))(learning_rates)
    return final_params, np.asarray(losses), jax.device_get(records)


def log_grid(low_exponent: float, high_exponent: float, per_decade: int = 4) -> np.ndarray:
    """A log-spaced learning-rate grid, both ends included.

    Args:
      low_exponent: the grid starts at ``10 ** low_exponent``.
      high_exponent: and ends at ``10 ** high_exponent``.
      per_decade: points per factor of 10 (4: quarter decades, the paper's grid).

    Returns:
      A float64 numpy array; ``log_grid(-5, 0)`` has the 21 values 1e-5, 10**-4.75, ..., 1.
    """
    count = int(round((high_exponent - low_exponent) * per_decade)) + 1
    return 10.0 ** np.linspace(low_exponent, high_exponent, count)


class GridSearchResult(NamedTuple):
    """What :func:`grid_search` returns.

    Attributes:
      learning_rates: the grid, shape ``(K,)``.
      losses: the loss curves, shape ``(K, num_steps)`` (``inf``/``nan`` where a run diverged).
      best_index: index of the learning rate with the lowest final loss (a diverged run
        counts as +inf; 0 if every run diverged).
    """

    learning_rates: np.ndarray
    losses: np.ndarray
    best_index: int

    @property
    def best_learning_rate(self) -> float:
        """The learning rate of the best run."""
        return float(self.learning_rates[self.best_index])

    @property
    def best_losses(self) -> np.ndarray:
        """The loss curve of the best run, shape ``(num_steps,)``."""
        return self.losses[self.best_index]

    @property
    def best_final_loss(self) -> float:
        """The last loss of the best run."""
        return float(self.losses[self.best_index, -1])


def grid_search(
    loss_fn: Callable[[Params], jax.Array],
    params: Params,
    make_optimizer: Callable[[jax.Array], optax.GradientTransformation],
    learning_rates,
    num_steps: int,
) -> GridSearchResult:
    """Runs :func:`run_full_batch_grid` and picks the learning rate with the best final loss.

    Args:
      loss_fn, params, make_optimizer, learning_rates, num_steps: as in
        :func:`run_full_batch_grid`.

    Returns:
      A :class:`GridSearchResult`.
    """
    _, losses, _ = run_full_batch_grid(loss_fn, params, make_optimizer, learning_rates, num_steps)
    final = np.where(np.isfinite(losses[:, -1]), losses[:, -1], np.inf)
    return GridSearchResult(np.asarray(learning_rates, np.float64), losses, int(np.argmin(final)))


# --------------------------------------------------------------------------------------
# Minibatch training of classifiers.
# --------------------------------------------------------------------------------------

# logits_fn(params, images, train, rng) -> logits; rng drives dropout when train is True.
LogitsFn = Callable[[Params, jax.Array, bool, jax.Array], jax.Array]


class MinibatchResult(NamedTuple):
    """What :func:`run_minibatch` returns.

    Attributes:
      params: the parameters after the last step.
      losses: float numpy array ``(num_steps,)``: the cross-entropy of each step's
        minibatch at the parameters before that step.
      accuracies: float numpy array ``(num_steps,)``: the same minibatch's accuracy.
      test_loss: the mean cross-entropy on ``test_data`` at the end (None without it).
      test_accuracy: the accuracy on ``test_data`` at the end (None without it).
      seconds: wall-clock seconds of the training loop, compilation included (the time
        spent in ``eval_fn`` excluded).
      evaluations: with ``eval_fn``, one dict per evaluation, in order: ``step`` (the
        number of updates done), ``train_seconds`` (wall-clock seconds of those updates,
        compilation excluded, evaluations excluded) and the entries returned by
        ``eval_fn``. Empty without it.
      compile_seconds: seconds spent compiling the training step (ahead of the loop).
      opt_state: the optimizer state after the last step.
    """

    params: Params
    losses: np.ndarray
    accuracies: np.ndarray
    test_loss: float | None
    test_accuracy: float | None
    seconds: float
    evaluations: list = []
    compile_seconds: float | None = None
    opt_state: Any = None


def tracked_decompositions(opt_state) -> dict | None:
    """How often the default decomposed W afresh, from a trained optimizer state.

    Every :class:`overparam_optax.OverparamPreconditionState` in ``opt_state`` (at any depth
    of a chain) that keeps tracked bases counts: its ``decompositions``, and its matrix
    updates, ``count`` times the matrices its bases hold (a stacked leaf of shape
    (..., n, n) holds one per leading index).

    Args:
      opt_state: an optimizer state, e.g. of ``optax.chain(overparam_precondition(N), ...)``.

    Returns:
      ``{"decompositions": int, "matrix_updates": int}``, or None where no transform in
      the state keeps tracked bases (a stateless ``method``, or no such transform).

    Example::

      counts = tracked_decompositions(opt_state)   # {"decompositions": 12, ...}
    """
    states = jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, OverparamPreconditionState)
    )
    tracked = [s for s in states
               if isinstance(s, OverparamPreconditionState) and jax.tree.leaves(s.factors)]
    if not tracked:
        return None
    # A basis is (matrices, n, n); its round counts (matrices,) are not matrices.
    updates = sum(int(s.count) * sum(math.prod(v.shape[:-2]) for v in jax.tree.leaves(s.factors)
                                     if v.ndim == 3)
                  for s in tracked)  # fmt: skip
    return {"decompositions": sum(int(s.decompositions) for s in tracked),
            "matrix_updates": updates}  # fmt: skip


def _cross_entropy_and_accuracy(logits, labels):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return loss, accuracy


def evaluate_classifier(
    logits_fn: LogitsFn,
    params: Params,
    data: tuple[np.ndarray, np.ndarray],
    *,
    batch_size: int = 1000,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a classifier on a data set, in batches.

    Args:
      logits_fn: ``logits_fn(params, images, train, rng) -> logits``; called with
        ``train=False``.
      params: the parameters.
      data: ``(images, labels)`` with integer labels.
      batch_size: examples per forward pass (bounds memory; the last batch may be smaller).

    Returns:
      ``(loss, accuracy)`` as Python floats, averaged over all examples.
    """
    images, labels = data

    @jax.jit
    def batch_sums(params, x, y):
        logits = logits_fn(params, x, False, jax.random.PRNGKey(0))
        loss, accuracy = _cross_entropy_and_accuracy(logits, y)
        return loss * y.shape[0], accuracy * y.shape[0]

    total_loss = total_correct = 0.0
    for start in range(0, len(labels), batch_size):
        loss, correct = batch_sums(
            params, images[start : start + batch_size], labels[start : start + batch_size]
        )
        total_loss += float(loss)
        total_correct += float(correct)
    return total_loss / len(labels), total_correct / len(labels)


def _progress_bar(enabled: bool, total: int, description: str | None):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=description, unit="step", leave=True)


def run_minibatch(
    logits_fn: LogitsFn,
    params: Params,
    tx: optax.GradientTransformation,
    train_data: tuple[np.ndarray, np.ndarray],
    num_steps: int,
    *,
    batch_size: int = 50,
    seed: int = 0,
    test_data: tuple[np.ndarray, np.ndarray] | None = None,
    eval_batch_size: int = 1000,
    progress: bool = False,
    log_every: int = 0,
    description: str | None = None,
    eval_fn: Callable[[Params], dict] | None = None,
    eval_every: int = 0,
) -> MinibatchResult:
    """Minibatch training of a classifier with softmax cross-entropy.

    Minibatches are drawn without replacement from a new permutation of the training set
    each epoch; the permutations and the dropout keys depend only on ``seed``, so runs
    that share a seed see exactly the same minibatches in the same order (a fair
    comparison of optimizers).

    Args:
      logits_fn: ``logits_fn(params, images, train, rng) -> logits``; ``rng`` is a PRNG key
        for dropout (a different one every step).
      params: the initial parameters.
      tx: the optimizer; ``update`` is called with the params.
      train_data: ``(images, labels)`` numpy arrays, integer labels.
      num_steps: the number of updates.
      batch_size: examples per update.
      seed: seeds the minibatch order and the dropout keys.
      test_data: optional ``(images, labels)`` evaluated once at the end.
      eval_batch_size: examples per forward pass in the evaluation.
      progress: show a tqdm progress bar (if tqdm is installed) with the running loss.
      log_every: if positive, also print the mean minibatch loss every that many steps.
      description: a label for the progress bar and the printed lines.
      eval_fn: optional ``eval_fn(params) -> dict`` of Python floats (e.g. a validation
        loss), called before the first update, after every ``eval_every`` updates and
        after the last; its results and the training time up to that point are recorded
        in ``evaluations``. Its own time is not counted as training time.
      eval_every: the evaluation period in updates (0: only before and after training).

    Returns:
      A :class:`MinibatchResult`.
    """
    images, labels = train_data
    num_examples = len(labels)
    if batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples.")
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {eval_every}.")
    order_rng = np.random.default_rng(seed)
    dropout_key = jax.random.PRNGKey(seed)

    @jax.jit
    def train_step(params, opt_state, x, y, step):
        def loss_fn(params):
            logits = logits_fn(params, x, True, jax.random.fold_in(dropout_key, step))
            return _cross_entropy_and_accuracy(logits, y)

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    label = f"[{description}] " if description else ""
    opt_state = tx.init(params)
    losses, accuracies, evaluations = [], [], []
    permutation, cursor = order_rng.permutation(num_examples), 0
    start_time = time.perf_counter()
    # Compiled ahead of the loop, so that the training times below exclude compilation.
    first = permutation[:batch_size]
    compiled_step = train_step.lower(params, opt_state, images[first], labels[first], 0).compile()
    compile_seconds = time.perf_counter() - start_time
    loop_start, eval_seconds, shown = time.perf_counter(), 0.0, {}

    def evaluate(step, params):
        nonlocal eval_seconds
        jax.block_until_ready(params)
        now = time.perf_counter()
        train_seconds = now - loop_start - eval_seconds
        metrics = eval_fn(params)
        evaluations.append({"step": step, "train_seconds": train_seconds, **metrics})
        shown.update({k: f"{v:.4f}" for k, v in metrics.items() if isinstance(v, float)})
        eval_seconds += time.perf_counter() - now

    if eval_fn is not None:
        evaluate(0, params)
    bar = _progress_bar(progress, num_steps, description)
    for step in range(num_steps):
        if cursor + batch_size > num_examples:  # a new epoch; drop the incomplete tail
            permutation, cursor = order_rng.permutation(num_examples), 0
        batch = permutation[cursor : cursor + batch_size]
        cursor += batch_size
        params, opt_state, loss, accuracy = compiled_step(
            params, opt_state, images[batch], labels[batch], step
        )
        losses.append(loss)
        accuracies.append(accuracy)
        if eval_fn is not None and (
            step == num_steps - 1 or (eval_every > 0 and (step + 1) % eval_every == 0)
        ):
            evaluate(step + 1, params)
        # Reading a loss back waits for the device; do it only when something is shown.
        if bar is not None and (step % 10 == 9 or step == num_steps - 1):
            bar.set_postfix(loss=f"{float(loss):.4f}", **shown)
            bar.update(step + 1 - bar.n)
        if log_every > 0 and (step + 1) % log_every == 0:
            recent = float(jnp.mean(jnp.stack(losses[-log_every:])))
            print(f"{label}step {step + 1}/{num_steps}  loss {recent:.4f}", flush=True)
    losses = np.asarray(jnp.stack(losses)) if losses else np.zeros((0,), np.float32)
    accuracies = np.asarray(jnp.stack(accuracies)) if accuracies else np.zeros((0,), np.float32)
    seconds = time.perf_counter() - start_time - eval_seconds
    if bar is not None:
        bar.close()
    test_loss = test_accuracy = None
    if test_data is not None:
        test_loss, test_accuracy = evaluate_classifier(
            logits_fn, params, test_data, batch_size=eval_batch_size
        )
    return MinibatchResult(
        params,
        losses,
        accuracies,
        test_loss,
        test_accuracy,
        seconds,
        evaluations=evaluations,
        compile_seconds=compile_seconds,
        opt_state=opt_state,
    )
