"""Exact PV (the paper's Algorithm 1): monotone, finite, at most c values."""
import numpy as np
from hypothesis import given

from pvtheory import exact_p_step, exact_v_step, pv
from pvtheory.pv import STOP_FIXED_POINT
from strategies import QUADRATIC_KINDS, problems


def non_increasing(phis: np.ndarray) -> bool:
    tol = 1e-9 * (1.0 + np.abs(phis).max())
    return bool(np.all(np.diff(phis) <= tol))


@given(problems(kinds=QUADRATIC_KINDS + ("logistic",), d=(2, 14), c=(1, 4)))
def test_exact_pv_is_monotone_at_every_half_step(case):
    phi, x0, c = case
    result = pv(phi, x0, exact_p_step(), exact_v_step(), max_iters=100)
    assert non_increasing(result.phis()), result.phis()


@given(problems(kinds=QUADRATIC_KINDS, d=(2, 30), c=(1, 6)))
def test_exact_pv_stops_at_a_fixed_point_with_at_most_c_values(case):
    phi, x0, c = case
    result = pv(phi, x0, exact_p_step(), exact_v_step(), max_iters=200)
    assert result.stop_reason == STOP_FIXED_POINT
    assert result.param.distinct_values() <= c
    # at the fixed point a further P step gains nothing (codes may change only between ties of phi: the
    # last V step may move the values by rounding error)
    again, _ = exact_p_step().update(result.param, phi, None)
    before = float(phi.value(result.param.decode().reshape(-1)))
    assert float(phi.value(again.decode().reshape(-1))) >= before - 1e-9 * (1 + abs(before))
