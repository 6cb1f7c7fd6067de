"""Bad input raises one clear ValueError."""
import math

import pytest
import torch

from pvtheory import (LeastSquares, Logistic, Quadratic, SeparableQuadratic, exact_p_step, exact_v_step,
                      global_optimum, init_scalar, kmeans_1d, pv, random_problem, scalar, subspace_p_step)


def test_c_below_one_is_rejected():
    with pytest.raises(ValueError, match="c must be an integer >= 1"):
        init_scalar(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="c must be an integer >= 1"):
        kmeans_1d(torch.zeros(4), -2)
    with pytest.raises(ValueError, match="c must be an integer >= 1"):
        global_optimum(random_problem("quadratic", 3), 0)


def test_disagreeing_shapes_are_rejected():
    with pytest.raises(ValueError, match="b has shape"):
        LeastSquares(torch.ones(3, 2), torch.ones(4))
    with pytest.raises(ValueError, match="Q has shape"):
        Quadratic(torch.eye(3)[:2], torch.ones(3))
    phi = random_problem("quadratic", 5)
    with pytest.raises(ValueError, match="decodes to 4 coordinates, phi expects d = 5"):
        pv(phi, scalar(torch.zeros(4, dtype=torch.long), torch.zeros(2)), exact_p_step(), exact_v_step())
    with pytest.raises(ValueError, match="do not describe a tensor"):
        from pvtheory import Codebooks
        Codebooks(torch.zeros(3, 1, dtype=torch.long), torch.zeros(1, 2, 2), (3, 3))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_in_data_is_rejected(bad):
    A = torch.ones(3, 2)
    A[1, 1] = bad
    with pytest.raises(ValueError, match="A contains NaN or inf"):
        LeastSquares(A, torch.ones(3))
    with pytest.raises(ValueError, match="t contains NaN or inf"):
        SeparableQuadratic(torch.ones(2), torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        init_scalar(torch.tensor([0.0, bad]), 2)
    phi = random_problem("quadratic", 2)
    with pytest.raises(ValueError, match="initial point contains NaN"):
        pv(phi, scalar(torch.zeros(2, dtype=torch.long), torch.tensor([bad, 1.0])), exact_p_step(), exact_v_step())


def test_other_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="positive semidefinite"):
        Quadratic(-torch.eye(2), torch.ones(2))
    with pytest.raises(ValueError, match="symmetric"):
        Quadratic(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.ones(2))
    with pytest.raises(ValueError, match="labels y must be -1 or \\+1"):
        Logistic(torch.ones(2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="tau must be an integer >= 1"):
        subspace_p_step(1.5)  # a count of groups; a fraction is given as fraction=
    with pytest.raises(ValueError, match=r"fraction of the groups must lie in \(0, 1\]"):
        subspace_p_step(fraction=1.5)
    with pytest.raises(ValueError, match="exactly one of them"):
        subspace_p_step(2, fraction=0.5)
    with pytest.raises(ValueError, match="select must be"):
        subspace_p_step(2, "best")
    with pytest.raises(ValueError, match="unknown exact P method"):
        exact_p_step("magic")
