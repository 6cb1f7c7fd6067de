"""Hypothesis strategies for random discrete-continuous problems."""
from __future__ import annotations

from hypothesis import strategies as st

from pvtheory import continuous_optimum, init_scalar, random_problem

# (label, relative optimality gap) pairs that tests record; conftest prints them after the run
OPTIMALITY_GAPS: list = []

QUADRATIC_KINDS = ("least_squares", "quadratic", "quadratic_psd", "separable")


@st.composite
def problems(draw, kinds=QUADRATIC_KINDS + ("logistic",), d=(2, 24), c=(1, 6)):
    """(phi, x0): a random objective and a k-means initial point in R^d_c near its minimizer."""
    kind = draw(st.sampled_from(kinds))
    dd = draw(st.integers(*d))
    cc = draw(st.integers(*c))
    cond = draw(st.sampled_from([1.0, 10.0, 1e3]))
    seed = draw(st.integers(0, 10_000))
    phi = random_problem(kind, dd, cond=cond, seed=seed)
    x0 = init_scalar(continuous_optimum(phi), cc)
    return phi, x0, cc
