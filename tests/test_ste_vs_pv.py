"""The paper's central claim on small fixed problems: STE oscillates, PV converges."""
import numpy as np
import torch

from pvtheory import (LeastSquares, continuous_optimum, exact_p_step, exact_v_step, init_scalar, no_v_step,
                      pv, random_problem, scalar, ste_p_step)
from pvtheory.pv import STOP_FIXED_POINT


def test_ste_oscillates_forever_on_one_coordinate_while_pv_stops():
    """phi(x) = (x - 0.6)^2 on the values {0, 1}: STE with step 1/L cycles through
    the shadow values 1.0, 0.6, 0.2, 0.8, 0.4, 1.0, ... so x flips 4 times in every 5 steps."""
    phi = LeastSquares(torch.ones(1, 1, dtype=torch.float64), torch.tensor([0.6], dtype=torch.float64))
    start = scalar(torch.tensor([1]), torch.tensor([0.0, 1.0], dtype=torch.float64))
    ste = pv(phi, start, ste_p_step(), no_v_step(), max_iters=100)
    assert ste.changed()[-50:].sum() == 40
    late = ste.phis("V")[-50:]
    assert np.allclose(np.sort(np.unique(late.round(12))), [0.16, 0.36])  # never settles on the better point
    exact = pv(phi, start, exact_p_step(), no_v_step(), max_iters=100)
    assert exact.stop_reason == STOP_FIXED_POINT and abs(exact.phi - 0.16) < 1e-12


def test_ste_keeps_oscillating_on_least_squares_while_pv_converges():
    """A fixed 8-dimensional least-squares problem, c = 2, both with exact V steps."""
    phi = random_problem("least_squares", 8, cond=30, seed=22)
    x0 = init_scalar(continuous_optimum(phi), 2)
    exact = pv(phi, x0, exact_p_step(), exact_v_step(), max_iters=100)
    ste = pv(phi, x0, ste_p_step(), exact_v_step(), max_iters=300)
    assert exact.stop_reason == STOP_FIXED_POINT and exact.iterations <= 5
    late = ste.changed()[-100:]
    assert (late > 0).sum() >= 20  # STE never settles: codes still flip in the last 100 steps
    late_phi = ste.phis("V")[-100:]
    assert (np.diff(late_phi) > 1e-9).sum() >= 10  # and phi keeps going up as well as down
    assert ste.phi > exact.phi * 1.5  # it ends far worse than PV's fixed point
