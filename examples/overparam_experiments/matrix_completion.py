"""Deep matrix completion: the end-to-end rule on one matrix vs explicit factors vs nuclear norm.

The setup of Arora, Cohen, Hu & Luo, "Implicit Regularization in Deep Matrix Factorization"
(NeurIPS 2019): a 100 x 100 ground truth of rank 5 scaled to ||W*||_F = 100, a few thousand
entries observed uniformly at random, the mean squared error on the observed entries as the
loss, full-batch gradient descent from a small Gaussian start until the loss reaches 1e-7.

Three ways to fit the observations:

* :func:`train_implicit`: plain gradient descent on ONE 100 x 100 matrix, preconditioned by
  ``overparam_precondition(N)`` (the default) or ``overparam_precondition(N, method="svd")``
  (the exact rule); N = 1 is plain gradient descent. By Arora, Cohen & Hazan (2018) this is
  the end-to-end dynamics of a depth-N linear network started from balanced factors.
* :func:`train_explicit`: gradient descent on the N factors themselves (the 2019 paper's
  model), from the Gaussian factors whose product is the implicit run's start.
* ``"explicit balanced"`` in ``run_problem``: gradient descent on the balanced factors
  of the same start (:func:`balanced_factors_of`), the setting of the end-to-end theorem.
* :func:`nuclear_norm_completion`: the minimum-nuclear-norm matrix that agrees with the
  observations, solved by cvxpy with SCS (the ``completion`` extra), as the paper's code did.

Small Gaussian factors are not balanced (their Gram matrices differ by about
scale^{2/N}, which is large next to the start's own tiny singular values), so the implicit
rule from their product follows the balanced factors exactly and the Gaussian ones only
once the learned singular values dominate that imbalance.

Example::

    >>> import numpy as np
    >>> from overparam_experiments import matrix_completion as mc
    >>> problem = mc.make_problem(seed=0, num_observed=2000)
    >>> problem.target.shape, int(problem.mask.sum()), round(float(np.linalg.norm(problem.target)))
    ((100, 100), 2000, 100)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from overparam_optax.factorized import end_to_end
from overparam_optax.transform import overparam_precondition

__all__ = [
    "IMPLICIT_METHODS",
    "METHODS",
    "CompletionProblem",
    "CompletionResult",
    "NuclearNormResult",
    "effective_rank",
    "gaussian_factors",
    "balanced_factors_of",
    "ground_truth",
    "learning_rate",
    "make_problem",
    "nuclear_norm_completion",
    "observation_mask",
    "relative_error",
    "train_explicit",
    "train_implicit",
]

# "exact": overparam_precondition(N, method="svd"); "default": overparam_precondition(N).
IMPLICIT_METHODS = ("exact", "default")
# Every way to fit one problem, as named in the results.
METHODS = ("implicit exact", "implicit default", "explicit", "explicit balanced", "nuclear norm")


# --------------------------------------------------------------------------------------
# The problem.
# --------------------------------------------------------------------------------------


class CompletionProblem(NamedTuple):
    """A ground truth and the entries observed of it (numpy, float64).

    Attributes:
      target: the (n, n) ground truth W*.
      mask: a bool (n, n) array, True on the observed entries.
    """

    target: np.ndarray
    mask: np.ndarray


def ground_truth(seed: int, n: int = 100, rank: int = 5, frobenius: float = 100.0) -> np.ndarray:
    """A random (n, n) matrix of the given rank, U V^T with Gaussian U, V, scaled to ||.||_F."""
    _check_positive_int(n, "n")
    _check_positive_int(rank, "rank")
    if rank > n:
        raise ValueError(f"rank must be at most n = {n}, got {rank}.")
    rng = np.random.default_rng([seed, 0])
    product = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, n))
    return product * (frobenius / np.linalg.norm(product))


def observation_mask(seed: int, n: int, num_observed: int) -> np.ndarray:
    """A bool (n, n) mask with ``num_observed`` entries, drawn uniformly without replacement."""
    _check_positive_int(num_observed, "num_observed")
    if num_observed > n * n:
        raise ValueError(f"num_observed must be at most n * n = {n * n}, got {num_observed}.")
    rng = np.random.default_rng([seed, 1])
    mask = np.zeros(n * n, dtype=bool)
    mask[rng.choice(n * n, size=num_observed, replace=False)] = True
    return mask.reshape(n, n)


def make_problem(
    seed: int, num_observed: int, n: int = 100, rank: int = 5, frobenius: float = 100.0
) -> CompletionProblem:
    """The ground truth and mask of one seed (the mask depends on the seed and the count)."""
    return CompletionProblem(
        ground_truth(seed, n, rank, frobenius), observation_mask(seed, n, num_observed)
    )


def gaussian_factors(seed: int, n: int, depth: int, scale: float) -> list[np.ndarray]:
    """N i.i.d. Gaussian (n, n) factors with entry std ``scale**(1/N) / sqrt(n)``.

    Their product has entries of std ``scale / sqrt(n)`` and Frobenius norm about
    ``scale * sqrt(n)`` (the 2019 paper's code calls ``scale`` the init scale).
    """
    _check_positive_int(depth, "depth")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}.")
    rng = np.random.default_rng([seed, 2, depth])
    std = scale ** (1.0 / depth) / np.sqrt(n)
    return [std * rng.standard_normal((n, n)) for _ in range(depth)]


def balanced_factors_of(w: np.ndarray, depth: int) -> list[np.ndarray]:
    """N factors ``U S^{1/N}, S^{1/N}, ..., S^{1/N} V^T`` of ``w = U S V^T``: their product is
    ``w`` and they are balanced (K_i^T K_i = K_{i+1} K_{i+1}^T), as the end-to-end theorem
    assumes."""
    _check_positive_int(depth, "depth")
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64))
    root = s ** (1.0 / depth)
    if depth == 1:
        return [np.asarray(w, np.float64)]
    middle = [np.diag(root) for _ in range(depth - 2)]
    return [u * root, *middle, root[:, None] * vt]


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


# --------------------------------------------------------------------------------------
# Metrics.
# --------------------------------------------------------------------------------------


def relative_error(w: np.ndarray, target: np.ndarray) -> float:
    """||W - W*||_F / ||W*||_F over all entries, observed or not."""
    return float(np.linalg.norm(np.asarray(w, np.float64) - target) / np.linalg.norm(target))


def effective_rank(w: np.ndarray) -> float:
    """exp of the entropy of the singular values normalized to sum 1 (Roy & Vetterli, 2007).

    1 for a rank-one matrix, r for r equal singular values; 0 for the zero matrix.
    """
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    total = s.sum()
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def learning_rate(
    depth: int, num_observed: int, target_norm2: float, num_entries: int, factor: float = 0.4
) -> float:
    r"""The step for depth N: ``min(m / 2, factor * n^2 / (N * ||W*||_2^{2 - 2/N}))``.

    The loss is the mean over the m observed entries. Along one entry its curvature is 2/m,
    and m / 2 is the step at which plain gradient descent (N = 1) fits every observed entry
    in one update. Along a rank-one direction u v^T spread over the n^2 = ``num_entries``
    entries it is about (2/m) (m/n^2) = 2/n^2, whatever m, and the depth-N rule multiplies
    the gradient along the top singular pair by about N sigma^{2 - 2/N}, largest at the
    solution (sigma = ||W*||_2); gradient descent is stable below 2 over their product,
    n^2 / (N sigma^{2-2/N}). ``factor`` = 0.4 keeps a margin: of 0.1, 0.4 and 1.6 tried
    on the 2,000-observation problem of seed 0 at scale 1e-3 (explicit factors, depths
    2-4), 1.6 diverged.
    """
    _check_positive_int(depth, "depth")
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor!r}.")
    scaled = factor * num_entries / (depth * target_norm2 ** (2.0 - 2.0 / depth))
    return min(num_observed / 2.0, scaled)


# --------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------


class CompletionResult(NamedTuple):
    """One fit. ``singular_values[k]`` are the top singular values at step ``record_steps[k]``.

    Attributes:
      matrix: the final (n, n) end-to-end matrix (numpy float64).
      steps: the updates taken (those made while the train loss was above the tolerance).
      converged: whether the train loss reached the tolerance within the step limit.
      train_loss: the final mean squared error on the observed entries.
      relative_error: :func:`relative_error` of the final matrix.
      effective_rank: :func:`effective_rank` of the final matrix.
      seconds: wall-clock of the fit, compilation included (indicative only).
      record_steps: the steps at which singular values were recorded (int array).
      singular_values: (len(record_steps), k) array of the top-k singular values.
      train_losses: the train loss at ``record_steps``.
      relative_errors: :func:`relative_error` at ``record_steps``.
    """

    matrix: np.ndarray
    steps: int
    converged: bool
    train_loss: float
    relative_error: float
    effective_rank: float
    seconds: float
    record_steps: np.ndarray
    singular_values: np.ndarray
    train_losses: np.ndarray
    relative_errors: np.ndarray


def _observed_mse(problem: CompletionProblem, dtype) -> Callable[[jax.Array], jax.Array]:
    mask = jnp.asarray(problem.mask, dtype)
    target = jnp.asarray(problem.target, dtype) * mask
    count = float(problem.mask.sum())
    return lambda w: jnp.sum((w * mask - target) ** 2) / count


def implicit_optimizer(depth: int, lr: float, method: str) -> optax.GradientTransformation:
    """Plain GD (N = 1) or GD preconditioned by the depth-N rule, exact or default."""
    _check_positive_int(depth, "depth")
    if method not in IMPLICIT_METHODS:
        raise ValueError(f"method must be one of {IMPLICIT_METHODS}, got {method!r}.")
    if depth == 1:
        return optax.sgd(lr)
    if method == "exact":
        return optax.chain(overparam_precondition(depth, method="svd"), optax.sgd(lr))
    return optax.chain(overparam_precondition(depth), optax.sgd(lr))


def _chunk_runner(loss_of_params, to_matrix, tx, tol: float, chunk: int):
    """A jitted ``(params, opt_state) -> (params, opt_state, losses, matrix)`` over ``chunk``
    steps; a step whose loss is already <= tol leaves the parameters unchanged, so the run
    stops exactly at the first step that reaches the tolerance."""
    value_and_grad = jax.value_and_grad(loss_of_params)

    def step(carry, _):
        params, opt_state = carry
        loss, grads = value_and_grad(params)
        updates, new_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        going = loss > tol
        params = jax.tree.map(lambda a, b: jnp.where(going, a, b), new_params, params)
        opt_state = jax.tree.map(lambda a, b: jnp.where(going, a, b), new_state, opt_state)
        return (params, opt_state), loss

    @jax.jit
    def run(params, opt_state):
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), length=chunk)
        return params, opt_state, losses, to_matrix(params)

    return run


def _fit(
    problem, params, loss_of_params, to_matrix, tx, *, tol, max_steps, record_every,
    num_singular, progress,
) -> CompletionResult:  # fmt: skip
    start = time.perf_counter()
    run = _chunk_runner(loss_of_params, to_matrix, tx, tol, record_every)
    opt_state = tx.init(params)
    w0 = np.asarray(to_matrix(params), np.float64)
    record_steps, svals = [0], [_top_singular_values(w0, num_singular)]
    errors, losses_at = [relative_error(w0, problem.target)], [float(loss_of_params(params))]
    steps, converged = 0, losses_at[0] <= tol
    while not converged and steps < max_steps:
        params, opt_state, losses, w = run(params, opt_state)
        losses = np.asarray(losses)
        hit = np.flatnonzero(losses <= tol)
        steps += int(hit[0]) if hit.size else record_every
        converged = bool(hit.size)
        w = np.asarray(w, np.float64)
        record_steps.append(steps)
        svals.append(_top_singular_values(w, num_singular))
        errors.append(relative_error(w, problem.target))
        losses_at.append(float(losses[hit[0]]) if hit.size else float(loss_of_params(params)))
        if progress is not None:
            progress(steps, losses_at[-1])
        if not np.isfinite(losses_at[-1]):
            break
    matrix = np.asarray(to_matrix(params), np.float64)
    return CompletionResult(
        matrix=matrix,
        steps=steps,
        converged=converged,
        train_loss=losses_at[-1],
        relative_error=relative_error(matrix, problem.target),
        effective_rank=effective_rank(matrix) if np.all(np.isfinite(matrix)) else float("nan"),
        seconds=time.perf_counter() - start,
        record_steps=np.asarray(record_steps),
        singular_values=np.asarray(svals),
        train_losses=np.asarray(losses_at),
        relative_errors=np.asarray(errors),
    )


def _top_singular_values(w: np.ndarray, k: int) -> np.ndarray:
    if not np.all(np.isfinite(w)):  # a diverged run: recorded as NaN, not an SVD failure
        return np.full(min(k, *w.shape), np.nan)
    return np.linalg.svd(w, compute_uv=False)[:k]


def _check_run_args(tol, max_steps, record_every, lr):
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}.")
    _check_positive_int(max_steps, "max_steps")
    _check_positive_int(record_every, "record_every")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}.")


def train_implicit(
    problem: CompletionProblem,
    factors: Sequence[np.ndarray],
    lr: float,
    *,
    method: str = "exact",
    tol: float = 1e-7,
    max_steps: int = 100_000,
    record_every: int = 100,
    num_singular: int = 10,
    dtype=jnp.float32,
    progress: Callable[[int, float], None] | None = None,
) -> CompletionResult:
    """Gradient descent on the single matrix W0 = product of ``factors``, depth-N rule.

    N is ``len(factors)``. Training stops at the first step whose train loss (mean squared
    error on the observed entries) is <= ``tol``, or after ``max_steps`` (rounded up to a
    multiple of ``record_every``); ``progress(steps, loss)`` is called every
    ``record_every`` steps.
    """
    _check_run_args(tol, max_steps, record_every, lr)
    tx = implicit_optimizer(len(factors), lr, method)
    w0 = jnp.asarray(np.linalg.multi_dot(factors) if len(factors) > 1 else factors[0], dtype)
    loss = _observed_mse(problem, dtype)
    return _fit(
        problem, w0, loss, lambda w: w, tx, tol=tol, max_steps=max_steps,
        record_every=record_every, num_singular=num_singular, progress=progress,
    )  # fmt: skip


def train_explicit(
    problem: CompletionProblem,
    factors: Sequence[np.ndarray],
    lr: float,
    *,
    tol: float = 1e-7,
    max_steps: int = 100_000,
    record_every: int = 100,
    num_singular: int = 10,
    dtype=jnp.float32,
    progress: Callable[[int, float], None] | None = None,
) -> CompletionResult:
    """Gradient descent on the N factors themselves (the 2019 paper's deep model).

    The same loss, step size, stopping rule and start (the product of ``factors``) as
    :func:`train_implicit`.
    """
    _check_run_args(tol, max_steps, record_every, lr)
    params = [jnp.asarray(f, dtype) for f in factors]
    mse = _observed_mse(problem, dtype)
    return _fit(
        problem, params, lambda ks: mse(end_to_end(ks)), end_to_end, optax.sgd(lr), tol=tol,
        max_steps=max_steps, record_every=record_every, num_singular=num_singular,
        progress=progress,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Nuclear-norm minimization.
# --------------------------------------------------------------------------------------


class NuclearNormResult(NamedTuple):
    """The minimum-nuclear-norm completion and its metrics (``seconds`` is indicative)."""

    matrix: np.ndarray
    status: str
    relative_error: float
    effective_rank: float
    max_violation: float
    seconds: float


def nuclear_norm_completion(problem: CompletionProblem) -> NuclearNormResult:
    """min ||X||_* subject to X_ij = W*_ij on every observed entry (cvxpy, SCS solver).

    ``max_violation`` is the largest ``|X_ij - W*_ij|`` over the observed entries.

    Raises:
      ImportError: cvxpy is not installed (``pip install overparam_optax[completion]``).
    """
    try:
        import cvxpy as cp
    except ImportError:
        raise ImportError(
            "nuclear_norm_completion needs cvxpy: pip install 'overparam_optax[completion]'."
        ) from None
    start = time.perf_counter()
    rows, cols = np.nonzero(problem.mask)
    x = cp.Variable(problem.target.shape)
    constraints = [x[rows, cols] == problem.target[rows, cols]]
    program = cp.Problem(cp.Minimize(cp.normNuc(x)), constraints)
    program.solve(solver=cp.SCS)
    matrix = np.asarray(x.value, np.float64)
    return NuclearNormResult(
        matrix=matrix,
        status=str(program.status),
        relative_error=relative_error(matrix, problem.target),
        effective_rank=effective_rank(matrix),
        max_violation=float(np.max(np.abs(matrix[rows, cols] - problem.target[rows, cols]))),
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------
# One problem, every method: the records the example and the benchmark write.
# --------------------------------------------------------------------------------------


def result_record(result: CompletionResult | NuclearNormResult, **labels) -> dict:
    """A JSON-ready dict of one fit's metrics and curves (the matrix left out)."""
    record = dict(labels)
    for name, value in result._asdict().items():
        if name == "matrix":
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, (np.floating, np.integer, np.bool_)):
            value = value.item()
        record[name] = value
    return record


def run_problem(
    seed: int,
    num_observed: int,
    scale: float,
    depths: Sequence[int],
    methods: Sequence[str],
    *,
    max_steps: int,
    lr_factor: float = 0.4,
    tol: float = 1e-7,
    record_every: int = 100,
    progress_factory: Callable[[str], Callable[[int, float], None] | None] | None = None,
) -> list[dict]:
    """Fits one problem (seed, number of observations, init scale) by every requested method.

    Args:
      seed: draws the ground truth, the mask and the factors.
      num_observed: the number of observed entries.
      scale: the init scale (the factors' std is ``scale**(1/N) / sqrt(100)``).
      depths: the depths N; depth 1 is fitted once (plain GD; implicit and explicit coincide).
      methods: a subset of :data:`METHODS`.
      max_steps: the step limit of every gradient-descent run.
      lr_factor: passed to :func:`learning_rate` as ``factor``.
      tol: the train-loss tolerance.
      record_every: steps between recorded singular values.
      progress_factory: ``progress_factory(label)`` gives each run's ``progress`` callback.

    Returns:
      One :func:`result_record` per fit, labelled with method, depth, seed, num_observed,
      scale and lr.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got {unknown}.")
    problem = make_problem(seed, num_observed)
    norm2 = float(np.linalg.norm(problem.target, 2))
    labels = {"seed": seed, "num_observed": num_observed, "scale": scale}
    records = []
    for depth in depths:
        factors = gaussian_factors(seed, problem.target.shape[0], depth, scale)
        lr = learning_rate(depth, num_observed, norm2, problem.target.size, lr_factor)
        for method in methods:
            if method == "nuclear norm" or (depth == 1 and method != "implicit exact"):
                continue  # depth 1: one plain-GD run stands for all three
            label = f"m={num_observed} seed={seed} scale={scale:g} N={depth} {method}"
            progress = progress_factory(label) if progress_factory else None
            kwargs = dict(tol=tol, max_steps=max_steps, record_every=record_every,
                          progress=progress)  # fmt: skip
            if method == "explicit":
                result = train_explicit(problem, factors, lr, **kwargs)
            elif method == "explicit balanced":
                start = np.linalg.multi_dot(factors) if depth > 1 else factors[0]
                result = train_explicit(problem, balanced_factors_of(start, depth), lr, **kwargs)
            else:
                result = train_implicit(problem, factors, lr, method=method.split()[1], **kwargs)
            name = "gradient descent" if depth == 1 else method
            records.append(result_record(result, method=name, depth=depth, lr=lr, **labels))
    if "nuclear norm" in methods:
        records.append(result_record(nuclear_norm_completion(problem), method="nuclear norm",
                                     depth=None, **labels))  # fmt: skip
    return records


# --------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------


def format_table(records: Sequence[dict]) -> str:
    """One line per fit: method, depth, steps, converged, train loss, error, effective rank."""
    lines = [
        f"{'method':<17}{'N':>3}{'steps':>8}{'conv':>6}{'train loss':>12}"
        f"{'rel. error':>12}{'eff. rank':>11}{'seconds':>9}"
    ]
    for r in records:
        depth = "-" if r["depth"] is None else str(r["depth"])
        steps = "-" if r.get("steps") is None else f"{r['steps']:,}"
        conv = "-" if r.get("converged") is None else ("yes" if r["converged"] else "no")
        loss = f"{r['train_loss']:.2e}" if "train_loss" in r else "-"
        lines.append(
            f"{r['method']:<17}{depth:>3}{steps:>8}{conv:>6}{loss:>12}"
            f"{r['relative_error']:>12.4f}{r['effective_rank']:>11.3f}{r['seconds']:>9.1f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Summaries over seeds (docs/implicit_regularization.md).
# --------------------------------------------------------------------------------------


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) over seeds; half-width 0 for one value."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float(values.mean()), 0.0
    sem = values.std(ddof=1) / np.sqrt(values.size)
    return float(values.mean()), float(stats.t.ppf(0.975, values.size - 1) * sem)


def _select(runs, num_observed, method, depth):
    chosen = [r for r in runs if r["num_observed"] == num_observed and r["method"] == method
              and r["depth"] == depth]  # fmt: skip
    return sorted(chosen, key=lambda r: (r["scale"], r["seed"]))


def summary_rows(runs: Sequence[dict]) -> list[list[str]]:
    """The rows of the docs' results table: observations, method, N, then relative error and
    effective rank as mean +- 95% t-interval over seeds, steps (range) and runs converged."""
    rows = []
    order = {m: i for i, m in enumerate(("gradient descent", *METHODS))}
    keys = sorted({(r["num_observed"], order[r["method"]], r["depth"] or 0) for r in runs})
    for m, method_index, depth in keys:
        method = ("gradient descent", *METHODS)[method_index]
        chosen = _select(runs, m, method, depth or None)
        err = t_interval([r["relative_error"] for r in chosen])
        erank = t_interval([r["effective_rank"] for r in chosen])
        steps = [r["steps"] for r in chosen if r.get("steps") is not None]
        rows.append([
            f"{m:,}", method, str(depth) if depth else "-",
            f"{err[0]:.4f} ± {err[1]:.4f}", f"{erank[0]:.2f} ± {erank[1]:.2f}",
            f"{min(steps):,}-{max(steps):,}" if steps else "-",
            f"{sum(bool(r['converged']) for r in chosen)}/{len(chosen)}" if steps else "-",
        ])  # fmt: skip
    return rows


def paired_difference(runs, num_observed, a: tuple, b: tuple) -> tuple[float, float, int]:
    """Relative error of a minus that of b, paired by (scale, seed): (mean, 95% half-width,
    pairs); a and b are (method, depth) pairs."""
    first, second = _select(runs, num_observed, *a), _select(runs, num_observed, *b)
    pairs = [(x["relative_error"], y["relative_error"]) for x in first for y in second
             if (x["scale"], x["seed"]) == (y["scale"], y["seed"])]  # fmt: skip
    mean, half = t_interval([x - y for x, y in pairs])
    return mean, half, len(pairs)


#: The paired comparisons of the docs: (a, b), each a (method, depth) pair.
PAIRED_COMPARISONS = (
    (("implicit exact", 2), ("explicit balanced", 2)),
    (("implicit exact", 3), ("explicit balanced", 3)),
    (("implicit exact", 4), ("explicit balanced", 4)),
    (("explicit", 3), ("explicit balanced", 3)),
    (("implicit default", 2), ("implicit exact", 2)),
    (("implicit default", 3), ("implicit exact", 3)),
    (("implicit default", 4), ("implicit exact", 4)),
    (("explicit", 3), ("explicit", 2)),
    (("explicit", 4), ("explicit", 3)),
    (("explicit", 2), ("nuclear norm", None)),
    (("explicit", 3), ("nuclear norm", None)),
    (("implicit exact", 3), ("nuclear norm", None)),
    (("explicit", 4), ("nuclear norm", None)),
    (("implicit exact", 4), ("nuclear norm", None)),
)


def markdown_tables(runs: Sequence[dict]) -> str:
    """The two tables of docs/implicit_regularization.md, rendered from the sweep's runs."""
    lines = [
        "| observed | method | N | relative error | effective rank | steps | converged |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(runs)]
    lines += ["", "| observed | a | b | error(a) - error(b) | pairs |", "|---|---|---|---|---|"]
    for m in sorted({r["num_observed"] for r in runs}):
        for a, b in PAIRED_COMPARISONS:
            mean, half, n = paired_difference(runs, m, a, b)
            if n:
                name = lambda p: p[0] if p[1] is None else f"{p[0]} N={p[1]}"  # noqa: E731
                lines.append(f"| {m:,} | {name(a)} | {name(b)} | {mean:+.4f} ± {half:.4f} | {n} |")
    return "\n".join(lines)
