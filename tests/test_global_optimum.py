"""On tiny instances PV's result is PV-stationary and compared with the global optimum."""
import pytest
from hypothesis import given

from pvtheory import (exact_p_step, exact_v_step, global_optimum, global_optimum_miqp, is_pv_stationary, pv, random_problem)
from pvtheory.optimum import count_partitions, restricted_growth_strings
from strategies import OPTIMALITY_GAPS, QUADRATIC_KINDS, problems


@given(problems(kinds=QUADRATIC_KINDS, d=(2, 12), c=(1, 3)))
def test_exact_pv_is_pv_stationary_and_bounded_by_the_global_optimum(case):
    phi, x0, c = case
    result = pv(phi, x0, exact_p_step(), exact_v_step(), max_iters=100)
    assert is_pv_stationary(phi, result.param, exact_p_step("enumerate" if phi.d <= 10 else "auto"), exact_v_step())
    opt = global_optimum(phi, c)
    assert opt.phi <= result.phi + 1e-8 * (1 + abs(result.phi))  # the optimum really is a lower bound
    gap = (result.phi - opt.phi) / max(abs(opt.phi), 1e-12)
    OPTIMALITY_GAPS.append((f"exact PV, c={c}", max(gap, 0.0)))


@given(problems(kinds=("logistic",), d=(2, 7), c=(1, 3)))
def test_exact_pv_on_logistic_is_bounded_by_the_global_optimum(case):
    phi, x0, c = case
    result = pv(phi, x0, exact_p_step(), exact_v_step(), max_iters=100)
    opt = global_optimum(phi, c)
    assert opt.phi <= result.phi + 1e-6 * (1 + abs(result.phi))
    OPTIMALITY_GAPS.append((f"exact PV logistic, c={c}", max((result.phi - opt.phi) / max(abs(opt.phi), 1e-12), 0.0)))


def test_partition_enumeration_visits_each_partition_once():
    for d in range(1, 8):
        for c in range(1, 5):
            labels = list(restricted_growth_strings(d, c))
            assert len(labels) == len(set(labels)) == count_partitions(d, c)
            assert all(max(lab) < c for lab in labels)


@pytest.mark.parametrize("kind,seed", [("least_squares", 0), ("quadratic", 1), ("least_squares", 2)])
def test_enumeration_and_mixed_integer_solver_find_the_same_optimum(kind, seed):
    pytest.importorskip("pyscipopt", reason="the mixed-integer optimum needs SCIP (pip install pyscipopt)")
    phi = random_problem(kind, 7, cond=10, seed=seed)
    a, b = global_optimum(phi, 3), global_optimum_miqp(phi, 3)
    assert abs(a.phi - b.phi) <= 1e-5 * (1 + abs(a.phi))
