"""pvtheory: the PV method for discrete-continuous objectives min phi(x), x = decode(P, V).

    from pvtheory import random_problem, init_scalar, pv, exact_p_step, exact_v_step
    phi = random_problem("least_squares", d=32, seed=0)
    x0 = init_scalar(continuous_optimum(phi), c=4)
    result = pv(phi, x0, exact_p_step(), exact_v_step())
"""
from pvtheory.baselines import (continuous_optimum, relax_then_round, ste_p_step,
                                stochastic_rounding_p_step)
from pvtheory.codes import Codebooks, ScalarGrid, decode, scalar
from pvtheory.init import init_scalar, kmeans, kmeans_1d, residual_kmeans, uniform_grid
from pvtheory.objectives import (Autograd, LeastSquares, LocalQuadraticModel, Logistic, Objective, ObservedGradient,
                                 Quadratic, SeparableQuadratic)
from pvtheory.optimum import global_optimum, global_optimum_miqp
from pvtheory.p_steps import accumulated, exact_p_step, linearized_p_step, subspace_p_step, trust_region
from pvtheory.preconditioners import adam_preconditioned
from pvtheory.problems import random_problem
from pvtheory.pv import PVResult, is_pv_stationary, pv, pv_iteration
from pvtheory.steps import Step
from pvtheory.v_steps import adam_v_step, cvxpy_v_step, exact_v_step, gradient_v_step, no_v_step

__all__ = [
    "Codebooks", "decode", "scalar", "Objective", "LeastSquares", "Quadratic", "SeparableQuadratic",
    "Logistic", "Autograd", "random_problem", "init_scalar", "kmeans", "kmeans_1d", "residual_kmeans",
    "uniform_grid", "exact_p_step", "linearized_p_step", "subspace_p_step", "exact_v_step",
    "cvxpy_v_step", "gradient_v_step", "adam_v_step", "no_v_step", "ste_p_step",
    "stochastic_rounding_p_step", "relax_then_round", "continuous_optimum", "pv", "PVResult",
    "is_pv_stationary", "global_optimum", "global_optimum_miqp", "Step", "ScalarGrid", "ObservedGradient",
    "LocalQuadraticModel", "trust_region", "accumulated", "adam_preconditioned", "pv_iteration",
]
