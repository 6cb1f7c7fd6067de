"""The paper's convergence statements, quantitatively: each measured decrease against its bound
(pvtheory.bounds), over random problems, sizes, conditioning, c and s; and a step that is too long breaks the
bound, so these tests can fail."""
import math

import torch
from hypothesis import given, strategies as st

from pvtheory import (LeastSquares, continuous_optimum, exact_p_step, exact_v_step, gradient_v_step, init_scalar,
                      linearized_p_step, no_v_step, random_problem, scalar, ste_p_step, subspace_p_step)
from pvtheory.bounds import (certified_run, descent_bound, feasible_minimum, linearized_v_step, support_smoothness,
                             uniform_subspace_smoothness, value_curvature)
from pvtheory.steps import point
from pvtheory.v_steps import solve_values_exactly

KINDS = ("least_squares", "quadratic", "quadratic_psd")


def tol(v: float) -> float:
    return 1e-9 * (1.0 + abs(v))


@st.composite
def perturbed_problems(draw, d=(2, 16), c=(2, 5)):
    """(phi, x0, c): a random quadratic problem and a perturbed rounding of its continuous optimum onto c
    evenly spaced values (far enough from a fixed point that codes move)."""
    kind = draw(st.sampled_from(KINDS))
    dd, cc = draw(st.integers(*d)), draw(st.integers(*c))
    cond = draw(st.sampled_from([1.0, 10.0, 1e3]))
    seed = draw(st.integers(0, 10_000))
    phi = random_problem(kind, dd, cond=cond, seed=seed)
    xc = continuous_optimum(phi)
    noise = torch.randn(dd, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return phi, init_scalar(xc + (xc.std() if dd > 1 else 1.0) * noise, cc, "grid"), cc


def excess(run: dict, bound: str, measured: str) -> float:
    """The largest amount by which a measured phi exceeds its bound, beyond the rounding error of the values
    the bound is computed from (phi before the step can be many orders larger than after it)."""
    return max(r[measured] - r[bound] - tol(max(abs(r["phi"]), abs(r[bound]))) for r in run["rows"])


@given(perturbed_problems())
def test_linearized_p_step_falls_at_least_by_its_descent_guarantee(case):
    phi, x0, _ = case
    run = certified_run(phi, x0, linearized_p_step(), exact_v_step(), 8, L_p=phi.L)
    assert excess(run, "bound_after_p", "phi_after_p") <= 0
    assert min(r["guaranteed_decrease"] for r in run["rows"]) >= -tol(run["rows"][0]["phi"])  # x is a candidate


@given(perturbed_problems(), st.integers(1, 4), st.integers(0, 99))
def test_random_subspace_step_with_1_over_L_s_obeys_its_bound_for_every_draw(case, s, seed):
    phi, x0, _ = case
    s = min(s, phi.d)
    L_s, _ = uniform_subspace_smoothness(phi, s)
    run = certified_run(phi, x0, subspace_p_step(s, "random", seed=seed, L_S=L_s), exact_v_step(), 8, L_p=L_s)
    assert excess(run, "bound_after_p", "phi_after_p") <= 0
    assert min(r["guaranteed_decrease"] for r in run["rows"]) >= -tol(run["rows"][0]["phi"])


def test_a_step_of_2_over_L_s_breaks_the_bound():
    """The same claim with half the smoothness constant (twice the step): on a fixed problem, some of five random
    draws end a P step far above the bound it would promise, while the right step obeys it in every draw."""
    phi = random_problem("least_squares", 10, cond=100, seed=1)
    xc = continuous_optimum(phi)
    x0 = init_scalar(xc + xc.std() * torch.randn(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                     4, "grid")
    L_s, _ = uniform_subspace_smoothness(phi, 2)
    worst = 0.0
    for seed in range(5):
        right = certified_run(phi, x0, subspace_p_step(2, "random", seed=seed, L_S=L_s), exact_v_step(), 30, L_p=L_s)
        wrong = certified_run(phi, x0, subspace_p_step(2, "random", seed=seed, L_S=L_s / 2), exact_v_step(), 30,
                              L_p=L_s / 2)
        assert excess(right, "bound_after_p", "phi_after_p") <= 0
        worst = max(worst, excess(wrong, "bound_after_p", "phi_after_p"))
    assert worst > 1.0


@given(perturbed_problems())
def test_greedy_subspace_moves_obey_the_descent_bound_of_the_coordinates_they_change(case):
    phi, x0, _ = case
    run = certified_run(phi, x0, subspace_p_step(2, "greedy", score="update"), exact_v_step(), 8,
                        L_p=lambda x, y: support_smoothness(phi, x, y))
    assert excess(run, "bound_after_p", "phi_after_p") <= 0


@given(perturbed_problems(), st.integers(1, 5))
def test_uniform_subspace_smoothness_bound_is_at_least_the_exact_value_and_at_most_L(case, s):
    phi, _, _ = case
    s = min(s, phi.d)
    exact, is_exact = uniform_subspace_smoothness(phi, s)
    bound, _ = uniform_subspace_smoothness(phi, s, limit=0)
    assert is_exact
    assert exact <= bound * (1 + 1e-12) + 1e-12 and bound <= phi.L * (1 + 1e-12) + 1e-12
    S = torch.randperm(phi.d)[:s]
    assert phi.L_subspace(S) <= exact * (1 + 1e-12) + 1e-12


@given(perturbed_problems())
def test_linearized_v_step_falls_at_least_by_grad_squared_over_2_L_V(case):
    phi, x0, _ = case
    run = certified_run(phi, x0, linearized_p_step(), linearized_v_step(), 8, L_p=phi.L, v_certificate=True)
    assert excess(run, "bound_after_v", "phi_after_v") <= 0


@given(perturbed_problems(d=(2, 12)))
def test_repeated_v_steps_converge_no_slower_than_one_minus_mu_over_L(case):
    phi, x0, _ = case
    L_V, mu_V = value_curvature(x0, phi)
    star = float(phi.value(point(solve_values_exactly(x0, phi))))
    rate = 1 - max(mu_V, 0.0) / L_V
    param, step = x0, gradient_v_step(1.0 / L_V)
    gap0 = float(phi.value(point(param))) - star
    for k in range(1, 30):
        param, _ = step.update(param, phi, None)
        gap = float(phi.value(point(param))) - star
        assert gap <= gap0 * rate ** k + tol(star) + 1e-9 * gap0


def test_the_v_guarantee_is_not_one_for_a_shorter_step():
    """With a V step shorter than 1/L_V (gradient_v_step's default 1/(L ||D||^2)) the claimed decrease
    ||grad_V||^2 / (2 L_V) is more than the step achieves, on a fixed problem: the guarantee is the step's."""
    phi = random_problem("quadratic", 2, cond=1e3, seed=0)
    x0 = scalar(torch.tensor([0, 1]), torch.tensor([74.8, 81.0], dtype=torch.float64))
    run = certified_run(phi, x0, linearized_p_step(), gradient_v_step(), 1, L_p=phi.L, v_certificate=True)
    assert excess(run, "bound_after_v", "phi_after_v") > 0


@given(perturbed_problems(d=(2, 10), c=(2, 3)))
def test_min_guaranteed_decrease_obeys_the_one_over_K_rate(case):
    """Summed over K iterations the guarantees cannot exceed phi(x^0) - phi*_c, so their minimum is at most that
    over K (phi*_c by enumeration)."""
    phi, x0, c = case
    phi_star, exact = feasible_minimum(phi, c)
    assert exact
    run = certified_run(phi, x0, linearized_p_step(), linearized_v_step(), 12, L_p=phi.L, v_certificate=True)
    phi0 = run["rows"][0]["phi"]
    total = 0.0
    for k, r in enumerate(run["rows"], 1):
        total += r["guaranteed_decrease"] + r["v_guaranteed_decrease"]
        assert total <= phi0 - phi_star + tol(phi0)


@given(perturbed_problems(d=(2, 6), c=(2, 3)))
def test_exact_pv_never_increases_phi_and_never_goes_below_the_feasible_minimum(case):
    phi, x0, c = case
    phi_star, _ = feasible_minimum(phi, c)
    run = certified_run(phi, x0, exact_p_step("enumerate"), exact_v_step(), 4)
    phis = [r["phi"] for r in run["rows"]] + [run["final_phi"]]
    assert all(b <= a + tol(a) for a, b in zip(phis, phis[1:]))
    assert min(phis) >= phi_star - tol(phi_star)


def test_ste_loses_the_descent_guarantee_on_the_counterexample():
    """(x - 0.6)^2 over {0, 1}: STE's move has a negative guarantee (the bound lies above phi(x)) and phi goes up,
    again and again; the linearized P step of the same size never moves."""
    phi = LeastSquares(torch.ones(1, 1, dtype=torch.float64), torch.tensor([0.6], dtype=torch.float64))
    start = scalar(torch.tensor([1]), torch.tensor([0.0, 1.0], dtype=torch.float64))
    ste = certified_run(phi, start, ste_p_step(), no_v_step(), 30, L_p=phi.L)
    phis = [r["phi"] for r in ste["rows"]] + [ste["final_phi"]]
    assert sum(b > a + 1e-12 for a, b in zip(phis, phis[1:])) >= 10
    assert sum(r["guaranteed_decrease"] < -1e-12 for r in ste["rows"]) >= 10
    pv = certified_run(phi, start, linearized_p_step(), no_v_step(), 30, L_p=phi.L)
    assert all(r["changed"] == 0 and r["guaranteed_decrease"] >= 0 for r in pv["rows"])


def test_descent_bound_is_exact_on_a_one_dimensional_quadratic():
    """On phi(x) = (x - 0.6)^2 (L = 2) the descent lemma holds with equality."""
    phi = LeastSquares(torch.ones(1, 1, dtype=torch.float64), torch.tensor([0.6], dtype=torch.float64))
    x, y = torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    assert math.isclose(descent_bound(phi, x, y, phi.L), float(phi.value(y)), rel_tol=1e-12)
