"""Two small checks of what depth does that no norm does, run with the end-to-end rule.

* :func:`razin_cohen_run`: the 2 x 2 completion problem of Razin & Cohen (NeurIPS 2020).
  Observed w12 = 1, w21 = 1, w22 = 0; w11 is free. Every solution has determinant -1, but
  from a start with positive determinant the depth-N dynamics (N >= 2) never change the
  determinant's sign, so the loss can only fall by w11 -> infinity with w22 -> 0: every norm
  grows while the effective rank tends to 1. Run on one matrix with
  ``overparam_precondition(N, method="svd")`` ("implicit") or on balanced factors ("explicit").
* :func:`update_field`, :func:`jacobian_asymmetry`, :func:`loop_integral`: the single-output
  update field F(w) = P_w(grad L(w)) of Arora, Cohen & Hazan (ICML 2018, Theorem 2) is not
  the gradient of any function for N >= 2, so no regularizer added to L reproduces it: its
  Jacobian is not symmetric and its integral around a closed loop is not zero. For N = 1
  (F = grad L) both vanish to rounding.

Everything here runs in float64 (``jax.enable_x64`` for the duration of each call).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from overparam_experiments.matrix_completion import balanced_factors_of, effective_rank
from overparam_optax.factorized import end_to_end
from overparam_optax.transform import overparam_precondition

__all__ = [
    "RAZIN_COHEN_MASK",
    "RAZIN_COHEN_TARGET",
    "jacobian_asymmetry",
    "loop_integral",
    "razin_cohen_run",
    "update_field",
]

#: Which entries of the 2 x 2 case are observed (all but w11).
RAZIN_COHEN_MASK = np.array([[False, True], [True, True]])
#: The observed values of the 2 x 2 case (w12 = w21 = 1, w22 = 0).
RAZIN_COHEN_TARGET = np.array([[0.0, 1.0], [1.0, 0.0]])  # w11 is not observed


def _razin_cohen_loss(w):
    mask = jnp.asarray(RAZIN_COHEN_MASK, w.dtype)
    return 0.5 * jnp.sum(mask * (w - jnp.asarray(RAZIN_COHEN_TARGET, w.dtype)) ** 2)


def _metrics(w: np.ndarray) -> dict:
    s = np.linalg.svd(w, compute_uv=False)
    return {
        "loss": float(0.5 * np.sum(RAZIN_COHEN_MASK * (w - RAZIN_COHEN_TARGET) ** 2)),
        "abs_w11": float(abs(w[0, 0])),
        "nuclear_norm": float(s.sum()),
        "frobenius_norm": float(np.sqrt(np.sum(s**2))),
        "effective_rank": effective_rank(w),
        "determinant": float(np.linalg.det(w)),
    }


def razin_cohen_run(
    depth: int,
    model: str = "implicit",
    *,
    init: float = 0.1,
    lr: float = 0.02,
    steps: int = 20_000,
    record_every: int = 200,
) -> dict[str, np.ndarray]:
    """Gradient descent on Razin & Cohen's 2 x 2 problem from W0 = init * I (det > 0).

    Args:
      depth: N >= 1 (N = 1 is plain gradient descent: w11 never moves).
      model: "implicit" (the exact rule on one 2 x 2 matrix) or "explicit" (gradient descent
        on N balanced factors of W0).
      init: the start's scale, > 0.
      lr: the step size.
      steps: the number of updates (a multiple of ``record_every``).
      record_every: steps between records.

    Returns:
      A dict of numpy arrays over the records (step 0 included): "step", "loss" (half the
      squared error on the observed entries), "abs_w11", "nuclear_norm",
      "frobenius_norm", "effective_rank", "determinant".
    """
    if model not in ("implicit", "explicit"):
        raise ValueError(f"model must be 'implicit' or 'explicit', got {model!r}.")
    if not init > 0 or not lr > 0:
        raise ValueError(f"init and lr must be positive, got init={init!r}, lr={lr!r}.")
    if steps < record_every or steps % record_every:
        raise ValueError(f"steps ({steps}) must be a positive multiple of record_every "
                         f"({record_every}).")  # fmt: skip
    with jax.enable_x64(True):
        w0 = init * np.eye(2)
        if model == "implicit":
            params, to_w = jnp.asarray(w0), lambda w: w
            tx = optax.chain(overparam_precondition(depth, method="svd"), optax.sgd(lr))
            if depth == 1:
                tx = optax.sgd(lr)
        else:
            params, to_w = [jnp.asarray(f) for f in balanced_factors_of(w0, depth)], end_to_end
            tx = optax.sgd(lr)
        loss = jax.grad(lambda p: _razin_cohen_loss(to_w(p)))

        def step(carry, _):
            p, state = carry
            updates, state = tx.update(loss(p), state, p)
            return (optax.apply_updates(p, updates), state), None

        advance = jax.jit(lambda c: jax.lax.scan(step, c, length=record_every)[0])
        carry = (params, tx.init(params))
        records = [_metrics(w0)]
        for _ in range(steps // record_every):
            carry = advance(carry)
            records.append(_metrics(np.asarray(to_w(carry[0]))))
    out = {k: np.array([r[k] for r in records]) for k in records[0]}
    out["step"] = np.arange(len(records)) * record_every
    return out


# --------------------------------------------------------------------------------------
# Theorem 2 of Arora, Cohen & Hazan (2018): the update field is not a gradient field.
# --------------------------------------------------------------------------------------


def update_field(
    depth: int, grad_loss: Callable[[jax.Array], jax.Array], method: str = "svd"
) -> Callable[[np.ndarray], np.ndarray]:
    """F(w) = P_w(grad L(w)) for a single output: w is a vector, seen as a (1, d) matrix.

    ``method`` is passed to ``overparam_precondition`` ("svd" is the exact rule); depth 1
    gives F = grad L.
    """
    tx = overparam_precondition(depth, method=method) if depth > 1 else optax.identity()

    def row_field(row):
        out, _ = tx.update(grad_loss(row[0])[None, :], tx.init(row), row)
        return out[0]

    compiled = jax.jit(row_field)

    def field(w: np.ndarray) -> np.ndarray:
        with jax.enable_x64(True):
            return np.asarray(compiled(jnp.asarray(w, jnp.float64)[None, :]))

    return field


def jacobian_asymmetry(field: Callable, w: np.ndarray, eps: float = 1e-5) -> float:
    """||J - J^T||_F / ||J||_F at w, J by central differences (zero for a gradient field,
    up to the differencing error, about eps^2)."""
    w = np.asarray(w, np.float64)
    columns = []
    for i in range(w.size):
        e = np.zeros_like(w)
        e[i] = eps
        columns.append((field(w + e) - field(w - e)) / (2 * eps))
    jac = np.stack(columns, axis=1)
    return float(np.linalg.norm(jac - jac.T) / np.linalg.norm(jac))


def loop_integral(field: Callable, center: np.ndarray, radius: float, points: int = 64) -> float:
    """The integral of F . dw around the circle center + radius (cos t e1 + sin t e2).

    e1, e2 are the first two coordinate axes. The trapezoid rule on a periodic integrand is
    spectrally accurate, so a gradient field gives zero to rounding.
    """
    center = np.asarray(center, np.float64)
    total = 0.0
    for t in np.linspace(0.0, 2 * np.pi, points, endpoint=False):
        direction = np.zeros_like(center)
        direction[:2] = np.cos(t), np.sin(t)
        tangent = np.zeros_like(center)
        tangent[:2] = -np.sin(t), np.cos(t)
        total += float(field(center + radius * direction) @ tangent) * radius
    return total * 2 * np.pi / points


# --------------------------------------------------------------------------------------
# Tables of docs/implicit_regularization.md.
# --------------------------------------------------------------------------------------


def _falls(run: dict) -> list[bool]:
    w11 = run["abs_w11"]
    return [False] + [b < a for a, b in zip(w11, w11[1:], strict=False)]


def _first_step(run: dict, condition) -> str:
    hits = [s for s, ok in zip(run["step"], condition(run), strict=True) if ok]
    return f"{hits[0]:,}" if hits else "never"


def razin_cohen_table(runs: dict) -> str:
    """Final values of every 2 x 2 run, the first recorded step with det below -1e-12 (not
    rounding) and the first at
    which |w11| fell, as a markdown table (``runs`` as in the benchmark's JSON)."""
    lines = [
        "| run | final loss | abs(w11) | nuclear norm | Frobenius norm | effective rank "
        "| det | first det < -1e-12 | first fall of abs(w11) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, run in runs.items():
        lines.append(
            f"| {label} | {run['loss'][-1]:.2e} | {run['abs_w11'][-1]:.2f} "
            f"| {run['nuclear_norm'][-1]:.2f} | {run['frobenius_norm'][-1]:.2f} "
            f"| {run['effective_rank'][-1]:.4f} | {run['determinant'][-1]:.2e} "
            f"| {_first_step(run, lambda r: [d < -1e-12 for d in r['determinant']])} "
            f"| {_first_step(run, _falls)} |"
        )
    return "\n".join(lines)


def field_table(field: dict) -> str:
    """Jacobian asymmetry and loop integral per depth, as a markdown table."""
    lines = ["| N | Jacobian asymmetry | loop integral |", "|---|---|---|"]
    for depth, check in field["depths"].items():
        lines.append(f"| {depth} | {check['jacobian_asymmetry']:.2e} "
                     f"| {check['loop_integral']:.2e} |")  # fmt: skip
    return "\n".join(lines)
