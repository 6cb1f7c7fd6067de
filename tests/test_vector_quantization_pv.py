"""The same PV loop over vector (g > 1) and additive (M > 1) codebooks: the LLM case, small."""
import numpy as np
import torch
from hypothesis import given, strategies as st

from pvtheory import (Autograd, adam_v_step, continuous_optimum, exact_v_step, linearized_p_step, pv,
                      random_problem, residual_kmeans, subspace_p_step)
from pvtheory.baselines import stochastic_round


def monotone(phis):
    return bool(np.all(np.diff(phis) <= 1e-9 * (1 + np.abs(phis).max())))


@given(st.integers(0, 999), st.integers(1, 2), st.sampled_from([2, 4]), st.sampled_from(["least_squares", "quadratic"]),
       st.sampled_from(["linearized", "greedy", "random"]))
def test_pv_over_additive_codebooks_never_increases_phi(seed, M, g, kind, p):
    phi = random_problem(kind, 16, cond=30, seed=seed)
    x0 = residual_kmeans(continuous_optimum(phi), (16,), M=M, K=4, g=g, seed=seed)
    step = {"linearized": linearized_p_step(), "greedy": subspace_p_step(1, "greedy"),
            "random": subspace_p_step(2, "random", seed=seed)}[p]
    result = pv(phi, x0, step, exact_v_step(), max_iters=60)
    assert monotone(result.phis())
    assert result.param.codes.shape == (16 // g, M)


def test_adam_v_step_lowers_phi_over_a_few_steps():
    phi = random_problem("least_squares", 24, seed=5)
    x0 = residual_kmeans(continuous_optimum(phi) + 0.5, (24,), M=1, K=4, g=2)
    result = pv(phi, x0, subspace_p_step(1), adam_v_step(lr=0.05), max_iters=40)
    assert result.phi < result.trace[0]["phi"] * 0.9


def test_autograd_objective_gradient_matches_the_closed_form():
    phi = random_problem("least_squares", 8, seed=2)
    auto = Autograd(lambda x: ((x @ phi.A.T - phi.b) ** 2).sum(-1), d=8, L=phi.L)
    x = torch.randn(8, dtype=torch.float64)
    assert torch.allclose(auto.grad(x), phi.grad(x)) and torch.allclose(auto.value(x), phi.value(x))


def test_stochastic_rounding_is_unbiased():
    values = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    y = torch.full((200_000,), 1.5, dtype=torch.float64)
    codes = stochastic_round(y, values, torch.Generator().manual_seed(0))
    assert set(codes.unique().tolist()) == {1, 2}  # only the two neighbours 1 and 3
    assert abs(float(values[codes].mean()) - 1.5) < 0.01


def test_objectives_accept_numpy_points():
    phi = random_problem("logistic", 5, seed=0)
    x = np.linspace(-1, 1, 5)
    assert torch.allclose(phi.value(x), phi.value(torch.as_tensor(x)))
    assert torch.allclose(phi.grad(x), phi.grad(torch.as_tensor(x)))
