"""The same PV loop over vector (g > 1) and additive (M > 1) codebooks: the LLM case, small."""
import numpy as np
import torch
from hypothesis import given, strategies as st

from pvtheory import (Autograd, adam_v_step, continuous_optimum, exact_v_step, linearized_p_step, pv,
                      random_problem, residual_kmeans, subspace_p_step)
from pvtheory.baselines import stochastic_rounding_p_step
from pvtheory.codes import Codebooks, scalar
from pvtheory.objectives import ObservedGradient


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


def _rounded(param, y: torch.Tensor, seed: int = 0):
    """One stochastic rounding step from param towards y (the step x - 1 * grad with grad = x - y)."""
    step = stochastic_rounding_p_step(lr=1.0, seed=seed)
    x = param.decode().reshape(-1)
    new, _ = step.update(param, ObservedGradient(x - y.reshape(-1)), step.init(param, None))
    return new


def test_stochastic_rounding_is_unbiased_between_the_two_values_around_y():
    values = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    n = 200_000
    for start in (0, 1, 2):  # wherever x is, y = 1.5 rounds to 1 or 3
        new = _rounded(scalar(torch.full((n,), start), values), torch.full((n,), 1.5, dtype=torch.float64))
        assert set(new.codes.unique().tolist()) == {1, 2}
        assert abs(float(new.decode().mean()) - 1.5) < 0.01


def test_stochastic_rounding_of_vectors_is_unbiased_along_the_segment_between_two_codes():
    cb = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [-3.0, 5.0]]], dtype=torch.float64)  # M = 1, K = 3, g = 2
    n = 100_000
    param = Codebooks(torch.zeros(n, 1, dtype=torch.long), cb, (n, 2))
    y = torch.tensor([0.3, 0.6], dtype=torch.float64).expand(n, 2)  # 30% of the way from entry 0 to entry 1
    new = _rounded(param, y)
    assert set(new.codes.unique().tolist()) == {0, 1}
    assert torch.allclose(new.decode().mean(0), y[0], atol=0.01)


def test_objectives_accept_numpy_points():
    phi = random_problem("logistic", 5, seed=0)
    x = np.linspace(-1, 1, 5)
    assert torch.allclose(phi.value(x), phi.value(torch.as_tensor(x)))
    assert torch.allclose(phi.grad(x), phi.grad(torch.as_tensor(x)))
