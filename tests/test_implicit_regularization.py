"""Deep matrix completion, Razin & Cohen's 2 x 2 case and the non-gradient update field.

Small problems only (the whole file runs in well under a minute on one core): the
100 x 100 sweep itself is benchmarks/matrix_completion.py.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from overparam_experiments import implicit_regularization as ir
from overparam_experiments import matrix_completion as mc
from tests.conftest import enable_x64

REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# The problem and the metrics.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 3])
def test_ground_truth_has_rank_and_norm(seed):
    w = mc.ground_truth(seed, n=40, rank=3, frobenius=100.0)
    s = np.linalg.svd(w, compute_uv=False)
    assert np.linalg.norm(w) == pytest.approx(100.0, rel=1e-12)
    assert s[2] > 1.0 and s[3] < 1e-12 * s[0]


def test_mask_draws_distinct_entries_and_depends_on_seed():
    a, b = mc.observation_mask(0, 30, 200), mc.observation_mask(1, 30, 200)
    assert a.sum() == 200 and b.sum() == 200 and (a != b).any()


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_gaussian_factors_product_has_the_scale(depth):
    # entries of the product have std scale / sqrt(n); over 100^2 entries within 15%
    factors = mc.gaussian_factors(0, 100, depth, 1e-3)
    product = np.linalg.multi_dot(factors) if depth > 1 else factors[0]
    assert np.std(product) == pytest.approx(1e-3 / 10, rel=0.15)


def test_effective_rank_of_known_spectra():
    assert mc.effective_rank(np.outer([1.0, 2.0], [3.0, 1.0])) == pytest.approx(1.0, abs=1e-9)
    assert mc.effective_rank(np.eye(7)) == pytest.approx(7.0, rel=1e-12)
    assert mc.effective_rank(np.zeros((3, 3))) == 0.0
    # singular values 3, 1: p = (3/4, 1/4), exp of the entropy
    expected = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert mc.effective_rank(np.diag([3.0, 1.0])) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_balanced_factors_multiply_back_and_are_balanced(depth):
    w = np.random.default_rng(depth).standard_normal((6, 6)) * 1e-2
    factors = mc.balanced_factors_of(w, depth)
    assert np.allclose(np.linalg.multi_dot(factors), w, rtol=0, atol=1e-15)
    for a, b in zip(factors, factors[1:], strict=False):
        assert np.allclose(a.T @ a, b @ b.T, rtol=0, atol=1e-14)


def test_learning_rate_caps_depth_one_and_shrinks_with_depth():
    assert mc.learning_rate(1, 2000, 50.0, 10_000) == 1000.0
    assert mc.learning_rate(2, 2000, 50.0, 10_000) == pytest.approx(0.4 * 1e4 / 100, rel=1e-12)
    assert mc.learning_rate(4, 2000, 50.0, 10_000) < mc.learning_rate(3, 2000, 50.0, 10_000)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mc.ground_truth(0, n=5, rank=6), "rank"),
        (lambda: mc.observation_mask(0, 5, 26), "num_observed"),
        (lambda: mc.gaussian_factors(0, 5, 0, 1e-3), "depth"),
        (lambda: mc.gaussian_factors(0, 5, 2, 0.0), "scale"),
        (lambda: mc.implicit_optimizer(2, 0.1, "auto"), "method"),
        (lambda: mc.run_problem(0, 10, 1e-3, [1], ["adam"], max_steps=1), "methods"),
    ],
)
def test_bad_arguments_name_the_parameter(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------------------
# Training on a small completion problem (20 x 20, rank 2).
# --------------------------------------------------------------------------------------


def _small_problem():
    return mc.CompletionProblem(mc.ground_truth(0, n=20, rank=2, frobenius=20.0),
                                mc.observation_mask(0, 20, 200))  # fmt: skip


def test_implicit_exact_and_explicit_balanced_differ_by_the_discretization_only():
    # From balanced factors the rule is the explicit network's end-to-end gradient flow; the
    # two gradient descents differ by O(lr): over the same time (lr * steps) halving the step
    # halves their gap (measured 6.7e-3, 3.4e-3, 1.7e-3 at factors 0.5, 0.25, 0.125).
    problem = _small_problem()
    factors = mc.gaussian_factors(0, 20, 3, 1e-2)
    start = np.linalg.multi_dot(factors)
    gaps = []
    for factor, steps in ((0.5, 200), (0.25, 400)):
        lr = mc.learning_rate(3, 200, np.linalg.norm(problem.target, 2), 400, factor / 2)
        kw = dict(max_steps=steps, record_every=steps, tol=1e-12)
        implicit = mc.train_implicit(problem, factors, lr, method="exact", **kw)
        explicit = mc.train_explicit(problem, mc.balanced_factors_of(start, 3), lr, **kw)
        assert np.linalg.norm(explicit.matrix) > 100 * np.linalg.norm(start)  # it moved
        gaps.append(np.linalg.norm(implicit.matrix - explicit.matrix)
                    / np.linalg.norm(explicit.matrix))  # fmt: skip
    assert gaps[0] < 1e-2
    assert gaps[1] / gaps[0] == pytest.approx(0.5, abs=0.05)


def test_run_stops_at_the_tolerance_and_depth_one_fits_in_one_step():
    problem = _small_problem()
    start = mc.gaussian_factors(0, 20, 1, 1e-3)
    lr = mc.learning_rate(1, 200, 1.0, 400)
    result = mc.train_implicit(problem, start, lr, max_steps=50, record_every=10)
    assert result.converged and result.steps == 1 and result.train_loss < 1e-7
    # unobserved entries keep their (tiny) start: 1 - 200/400 of the truth is missing
    unobserved = np.linalg.norm(problem.target * ~problem.mask) / np.linalg.norm(problem.target)
    assert result.relative_error == pytest.approx(unobserved, rel=1e-3)


def test_nuclear_norm_recovers_a_well_sampled_low_rank_matrix():
    pytest.importorskip("cvxpy")
    problem = mc.CompletionProblem(mc.ground_truth(1, n=20, rank=1, frobenius=20.0),
                                   mc.observation_mask(1, 20, 300))  # fmt: skip
    result = mc.nuclear_norm_completion(problem)
    assert result.status == "optimal" and result.max_violation < 1e-5
    assert result.relative_error < 1e-4 and result.effective_rank < 1.01


# --------------------------------------------------------------------------------------
# Razin & Cohen's 2 x 2 problem.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [3, 4])
def test_razin_cohen_norms_grow_as_rank_falls(depth):
    runs = {m: ir.razin_cohen_run(depth, m, steps=4000, record_every=1000)
            for m in ("implicit", "explicit")}  # fmt: skip
    for run in runs.values():
        assert run["loss"][-1] < 1e-2 * run["loss"][0]
        assert np.all(np.diff(run["loss"]) < 0)
        for norm in ("abs_w11", "nuclear_norm", "frobenius_norm"):
            assert np.all(np.diff(run[norm]) > 0)
        assert run["effective_rank"][-1] < 1.01 and np.all(run["determinant"] > 0)
    # the rule on one matrix follows the balanced factors (measured 5e-4 at 4,000 steps)
    assert runs["implicit"]["abs_w11"][-1] == pytest.approx(runs["explicit"]["abs_w11"][-1],
                                                            rel=3e-3)  # fmt: skip


def test_razin_cohen_depth_two_explicit_keeps_the_sign_the_euler_step_does_not():
    # Explicit factors: det(W) = det(W1) det(W2) decays to rounding and never reaches -1.
    # The rule's step W - lr P_W(G) adds -lr^2 (s1 + s2)^2 g12 g21 to det W, which crosses 0
    # once s2 is that small: the implicit run converges to the rank-2 solution det = -1.
    explicit = ir.razin_cohen_run(2, "explicit", steps=6000, record_every=2000)
    implicit = ir.razin_cohen_run(2, "implicit", steps=6000, record_every=2000)
    assert explicit["determinant"][-1] > -1e-12 and explicit["abs_w11"][-1] > 5.0
    assert implicit["determinant"][-1] == pytest.approx(-1.0, abs=1e-3)


# --------------------------------------------------------------------------------------
# Theorem 2 of Arora, Cohen & Hazan (2018): F(w) = P_w(grad L) is not a gradient field.
# --------------------------------------------------------------------------------------


def _l2_regression_grad():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 3)), rng.standard_normal(8)
    return lambda w: jnp.asarray(x).T @ (jnp.asarray(x) @ w - jnp.asarray(y))


W_POINT = np.array([0.5, -0.3, 0.8])


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_field_is_the_single_output_closed_form(depth):
    grad = _l2_regression_grad()
    field = ir.update_field(depth, grad)
    with enable_x64():
        g = np.asarray(grad(W_POINT))
    norm = np.linalg.norm(W_POINT)
    unit = W_POINT / norm
    expected = norm ** (2 - 2 / depth) * (g + (depth - 1) * (g @ unit) * unit)
    assert np.allclose(field(W_POINT), expected, rtol=1e-12, atol=0)


def test_depth_one_field_is_a_gradient_field():
    field = ir.update_field(1, _l2_regression_grad())
    assert ir.jacobian_asymmetry(field, W_POINT) < 1e-9
    assert abs(ir.loop_integral(field, W_POINT, 0.3)) < 1e-12


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_deep_field_is_not_a_gradient_field(depth):
    field = ir.update_field(depth, _l2_regression_grad())
    # measured: asymmetry 0.185, 0.319, 0.395, loop integral -0.501, -1.44, -2.49 (N = 2, 3, 4)
    assert ir.jacobian_asymmetry(field, W_POINT) > 0.1
    assert abs(ir.loop_integral(field, W_POINT, 0.3)) > 0.4


# --------------------------------------------------------------------------------------
# The scripts refuse bad flags before any work.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, flag",
    [
        ("examples/matrix_completion.py", "--depths=0,2"),
        ("examples/matrix_completion.py", "--scale=2"),
        ("examples/matrix_completion.py", "--method=auto"),
        ("benchmarks/matrix_completion.py", "--seeds=-1"),
        ("benchmarks/matrix_completion.py", "--methods=adam"),
    ],
)
def test_scripts_reject_bad_flags(script, flag, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / script), flag, f"--output_dir={tmp_path}"]
                          if script.startswith("examples") else
                          [sys.executable, str(REPO / script), flag,
                           f"--out={tmp_path / 'x.json'}"],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert proc.returncode != 0
    assert flag.split("=")[0].lstrip("-") in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())
