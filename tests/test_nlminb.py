"""plwlab.nlminb, the PORT optimizer R's nlminb runs (its match with R on real fits is in test_analysis.py)."""

import numpy as np
import pytest

from plwlab.analysis.nlminb import nlminb


def rosenbrock(x):
    return 100 * (x[1] - x[0] ** 2) ** 2 + (1 - x[0]) ** 2


def rosenbrock_gradient(x):
    return np.array([-400 * x[0] * (x[1] - x[0] ** 2) - 2 * (1 - x[0]), 200 * (x[1] - x[0] ** 2)])


def test_quadratic_converges_to_its_minimum():
    A, c = np.array([[3.0, 1, 0], [1, 2, 0.5], [0, 0.5, 1]]), np.array([1.0, -2, 3])
    result = nlminb(lambda x: 0.5 * (x - c) @ A @ (x - c) + 7, lambda x: A @ (x - c), np.zeros(3))
    assert result.convergence == 0 and 3 <= result.code <= 6
    np.testing.assert_allclose(result.x, c, atol=1e-6)
    assert result.objective == pytest.approx(7, abs=1e-12)


def test_rosenbrock_from_r_example_start():
    result = nlminb(rosenbrock, rosenbrock_gradient, np.array([-1.2, 1.0]))
    assert result.convergence == 0, result.message
    np.testing.assert_allclose(result.x, [1, 1], atol=1e-8)


def test_limits_are_reported_with_r_codes_and_messages():
    by_iterations = nlminb(rosenbrock, rosenbrock_gradient, np.array([-1.2, 1.0]), iter_max=5)
    assert (by_iterations.code, by_iterations.convergence, by_iterations.iterations) == (10, 1, 5)
    assert by_iterations.message == "iteration limit reached without convergence (10)"
    by_evaluations = nlminb(rosenbrock, rosenbrock_gradient, np.array([-1.2, 1.0]), eval_max=5)
    assert by_evaluations.code == 9 and by_evaluations.evaluations[0] <= 5
    assert by_evaluations.message == "function evaluation limit reached without convergence (9)"


def test_nan_objective_counts_as_infinite_and_a_bad_start_is_named():
    result = nlminb(lambda x: np.nan if x[0] <= 0 else x[0] - np.log(x[0]), lambda x: np.array([1 - 1 / x[0]]),
                    np.array([3.0]))  # fmt: skip
    assert result.convergence == 0 and result.x[0] == pytest.approx(1, abs=1e-6)
    assert result.nan_evaluations >= 1  # the first step from 3 lands at or below 0
    assert nlminb(rosenbrock, rosenbrock_gradient, np.array([-1.2, 1.0])).nan_evaluations == 0
    bad = nlminb(lambda x: np.nan, lambda x: np.zeros(1), np.array([0.0]))
    assert bad.code == 63 and bad.message == "fn cannot be computed at initial par (63)"
