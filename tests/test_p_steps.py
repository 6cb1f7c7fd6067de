"""P steps: the descent lemma for linearized and subspace steps; the exact solvers agree."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from pvtheory import (exact_v_step, linearized_p_step, pv, random_problem, scalar,
                      continuous_optimum, init_scalar, subspace_p_step)
from pvtheory.p_steps import (exact_p_by_coordinate_descent, exact_p_by_enumeration, exact_p_by_miqp,
                              exact_p_by_separable)
from pvtheory.pv import STOP_FIXED_POINT
from strategies import QUADRATIC_KINDS, problems


def phi_at(phi, param) -> float:
    return float(phi.value(param.decode().reshape(-1)))


def tol(v: float) -> float:
    return 1e-10 * (1.0 + abs(v))


@given(problems(d=(2, 30), c=(1, 6)))
def test_linearized_p_step_with_step_1_over_L_never_increases_phi(case):
    phi, x0, c = case
    after, _ = linearized_p_step().update(x0, phi, None)
    assert phi_at(phi, after) <= phi_at(phi, x0) + tol(phi_at(phi, x0))


@given(problems(d=(2, 30), c=(1, 6)), st.sampled_from(["greedy", "random"]), st.integers(1, 8), st.integers(0, 99))
def test_subspace_p_step_with_step_1_over_L_S_never_increases_phi(case, select, tau, seed):
    phi, x0, c = case
    step = subspace_p_step(tau, select, seed=seed)
    after, _ = step.update(x0, phi, step.init(x0, phi))
    assert phi_at(phi, after) <= phi_at(phi, x0) + tol(phi_at(phi, x0))


@given(problems(kinds=QUADRATIC_KINDS, d=(2, 30), c=(2, 6)), st.integers(1, 6))
def test_greedy_subspace_pv_converges_monotonically_to_a_fixed_point(case, tau):
    phi, x0, c = case
    result = pv(phi, x0, subspace_p_step(tau, "greedy"), exact_v_step(), max_iters=500)
    phis = result.phis()
    assert np.all(np.diff(phis) <= 1e-9 * (1 + np.abs(phis).max()))
    assert result.stop_reason == STOP_FIXED_POINT


@given(problems(kinds=QUADRATIC_KINDS, d=(2, 20), c=(2, 5)), st.integers(0, 99))
def test_random_subspace_pv_never_increases_phi(case, seed):
    phi, x0, c = case
    result = pv(phi, x0, subspace_p_step(2, "random", seed=seed), exact_v_step(), max_iters=50)
    phis = result.phis()
    assert np.all(np.diff(phis) <= 1e-9 * (1 + np.abs(phis).max()))


def test_subspace_step_changes_codes_where_the_full_linearized_step_does_not():
    """The paper's observation: 1/L is too short to move any code; 1/L_S on a small S is not."""
    phi = random_problem("quadratic", 40, cond=1e3, seed=0)
    x0 = init_scalar(continuous_optimum(phi), 4)
    full, _ = linearized_p_step().update(x0, phi, None)
    sub = subspace_p_step(1, "greedy")
    moved, _ = sub.update(x0, phi, sub.init(x0, phi))
    assert int((full.codes != x0.codes).sum()) == 0
    assert int((moved.codes != x0.codes).sum()) == 1
    assert phi_at(phi, moved) < phi_at(phi, x0)


@given(problems(kinds=QUADRATIC_KINDS + ("logistic",), d=(2, 9), c=(1, 3)))
def test_exact_p_step_is_no_worse_than_every_assignment_it_can_see(case):
    phi, x0, c = case
    best = exact_p_by_enumeration(x0, phi)
    cd = exact_p_by_coordinate_descent(x0, phi)
    assert phi_at(phi, best) <= phi_at(phi, cd) + tol(phi_at(phi, cd))
    assert phi_at(phi, cd) <= phi_at(phi, x0) + tol(phi_at(phi, x0))


@given(problems(kinds=("separable",), d=(2, 9), c=(1, 3)))
def test_separable_exact_p_step_equals_enumeration(case):
    phi, x0, c = case
    a, b = exact_p_by_separable(x0, phi), exact_p_by_enumeration(x0, phi)
    assert abs(phi_at(phi, a) - phi_at(phi, b)) <= tol(phi_at(phi, b))


@pytest.mark.parametrize("seed", range(3))
def test_mixed_integer_p_step_equals_enumeration(seed):
    pytest.importorskip("pyscipopt", reason="the mixed-integer P step needs SCIP (pip install pyscipopt)")
    phi = random_problem("least_squares", 7, cond=10, seed=seed)
    x0 = init_scalar(continuous_optimum(phi) + 0.3 * torch.randn(7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 3)
    a, b = exact_p_by_miqp(x0, phi), exact_p_by_enumeration(x0, phi)
    assert abs(phi_at(phi, a) - phi_at(phi, b)) <= 1e-6 * (1 + abs(phi_at(phi, b)))


@pytest.mark.parametrize("seed", range(6))
def test_linearized_step_with_full_memory_is_ste(seed):
    """accumulated(linearized, memory=1) keeps x + r = STE's shadow u, so both pick the same codes."""
    from pvtheory import accumulated, ste_p_step
    phi = random_problem("quadratic", 24, cond=1e2, seed=seed)
    x0 = init_scalar(continuous_optimum(phi) + 0.3 * torch.randn(24, dtype=torch.float64,
                                                               generator=torch.Generator().manual_seed(seed)), 4)
    ste, acc = ste_p_step(), accumulated(linearized_p_step(), 1.0)
    a, b = x0, x0
    sa, sb = ste.init(a, phi), acc.init(b, phi)
    moved = 0
    for _ in range(20):
        new_a, sa = ste.update(a, phi, sa)
        new_b, sb = acc.update(b, phi, sb)
        assert torch.equal(new_a.codes, new_b.codes)
        moved += int((new_a.codes != a.codes).sum())
        a, b = new_a, new_b
        assert torch.allclose(sa, b.decode().reshape(-1) + sb["r"], atol=1e-12)
    assert moved > 0


def test_accumulated_step_without_memory_is_its_inner_step():
    from pvtheory import LocalQuadraticModel, accumulated
    phi = random_problem("quadratic", 40, cond=1e3, seed=1)
    x0 = init_scalar(continuous_optimum(phi), 4)
    x = x0.decode().reshape(-1)
    gen = torch.Generator().manual_seed(0)
    model = LocalQuadraticModel(x, torch.randn(40, dtype=torch.float64, generator=gen),
                                torch.rand(40, dtype=torch.float64, generator=gen) + 0.5)
    inner = subspace_p_step(5, "greedy")
    plain, _ = inner.update(x0, model, inner.init(x0, model))
    wrapped = accumulated(inner, 0.0)
    same, state = wrapped.update(x0, model, wrapped.init(x0, model))
    assert torch.equal(plain.codes, same.codes) and state["r"] is None


def test_memory_moves_a_code_that_no_single_step_can():
    """A constant pull of 0.3 of the spacing never crosses a rounding midpoint in one step; with memory 1
    it does on the second, and the residual keeps what the crossing overshot."""
    from pvtheory import LocalQuadraticModel, accumulated
    x0 = scalar(torch.tensor([0]), torch.tensor([0.0, 1.0], dtype=torch.float64))
    model = lambda p: LocalQuadraticModel(p.decode().reshape(-1), torch.tensor([-0.3], dtype=torch.float64),  # noqa: E731
                                          torch.ones(1, dtype=torch.float64))
    for memory, expected in ((0.0, [0, 0, 0]), (1.0, [0, 1, 1])):
        step, p = accumulated(linearized_p_step(), memory), x0
        state = step.init(p, model(p))
        codes = []
        for _ in range(3):
            p, state = step.update(p, model(p), state)
            codes.append(int(p.codes[0]))
        assert codes == expected, memory
    assert torch.allclose(state["r"], torch.tensor([-0.1], dtype=torch.float64))  # 0.9 - 1.0 after step 3
