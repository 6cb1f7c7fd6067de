"""V steps: the exact V step is optimal for its partition; first-order steps descend."""
import torch
from hypothesis import given

from pvtheory import exact_v_step, gradient_v_step
from pvtheory.v_steps import solve_values_cvxpy, solve_values_exactly, value_gradients
from strategies import QUADRATIC_KINDS, problems


def phi_at(phi, param) -> float:
    return float(phi.value(param.decode().reshape(-1)))


@given(problems(kinds=QUADRATIC_KINDS, d=(2, 30), c=(1, 6)))
def test_exact_v_step_leaves_zero_gradient_within_each_group(case):
    phi, x0, c = case
    param = solve_values_exactly(x0, phi)
    group_grad, _ = value_gradients(param, phi)  # sum of dphi/dx_i over the coordinates of each group
    used = param.used_entries()[0]
    scale = 1.0 + float(phi.grad(param.decode()).abs().max()) + abs(phi_at(phi, param))
    assert float(group_grad[0, used].abs().max()) <= 1e-7 * scale


@given(problems(kinds=QUADRATIC_KINDS + ("logistic",), d=(2, 12), c=(1, 4)))
def test_exact_v_step_agrees_with_cvxpy_optimum(case):
    phi, x0, c = case
    ours = phi_at(phi, solve_values_exactly(x0, phi))
    theirs = phi_at(phi, solve_values_cvxpy(x0, phi))
    assert ours <= theirs + 1e-6 * (1.0 + abs(theirs))
    assert ours >= theirs - 1e-4 * (1.0 + abs(theirs))  # cvxpy's own tolerance


@given(problems(d=(2, 20), c=(1, 5)))
def test_gradient_v_step_with_default_step_never_increases_phi(case):
    phi, x0, c = case
    after, _ = gradient_v_step().update(x0, phi, None)
    assert phi_at(phi, after) <= phi_at(phi, x0) + 1e-10 * (1 + abs(phi_at(phi, x0)))


def test_cvxpy_v_step_respects_bounds():
    from pvtheory import random_problem, init_scalar, continuous_optimum
    phi = random_problem("least_squares", 10, seed=3)
    x0 = init_scalar(continuous_optimum(phi), 3)
    bounded = solve_values_cvxpy(x0, phi, bounds=(-0.1, 0.1))
    assert float(bounded.codebooks.abs().max()) <= 0.1 + 1e-6
    free = phi_at(phi, solve_values_exactly(x0, phi))
    assert phi_at(phi, bounded) >= free - 1e-8


def test_exact_v_step_keeps_unused_values():
    from pvtheory import random_problem, scalar
    phi = random_problem("quadratic", 6, seed=1)
    param = scalar(torch.zeros(6, dtype=torch.long), torch.tensor([0.5, 7.0], dtype=torch.float64))
    out, _ = exact_v_step().update(param, phi, None)
    assert float(out.codebooks[0, 1, 0]) == 7.0
