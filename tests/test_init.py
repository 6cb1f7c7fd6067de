"""Initialization: exact 1-D k-means is optimal; Lloyd and grids are feasible points of R^d_c; vector
k-means (k-means++ seeding) finds separated clusters."""

import torch
from hypothesis import given, strategies as st

from pvtheory import kmeans_1d, uniform_grid
from pvtheory.init import kmeans
from pvtheory.optimum import restricted_growth_strings


def sse(x, w, codes, values):
    return float((w * (x - values[codes]) ** 2).sum())


@given(st.integers(0, 9999), st.integers(1, 9), st.integers(1, 4), st.booleans())
def test_exact_1d_kmeans_is_the_best_c_clustering(seed, d, c, weighted):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    w = torch.rand(d, generator=gen, dtype=torch.float64) + 0.1 if weighted else torch.ones(d, dtype=torch.float64)
    codes, values = kmeans_1d(x, c, weights=w, exact=True)
    best = float("inf")
    for lab in restricted_growth_strings(d, c):
        lab = torch.tensor(lab)
        k = int(lab.max()) + 1
        num = torch.zeros(k, dtype=x.dtype).index_add_(0, lab, w * x)
        den = torch.zeros(k, dtype=x.dtype).index_add_(0, lab, w)
        best = min(best, sse(x, w, lab, num / den))
    assert sse(x, w, codes, values) <= best + 1e-9
    assert len(values) == c


@given(st.integers(0, 9999), st.integers(1, 6))
def test_lloyd_1d_kmeans_is_never_better_than_exact(seed, c):
    x = torch.randn(300, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = torch.ones_like(x)
    ce, ve = kmeans_1d(x, c, exact=True)
    cl, vl = kmeans_1d(x, c, exact=False)
    assert sse(x, w, ce, ve) <= sse(x, w, cl, vl) + 1e-9


def test_uniform_grid_spans_the_range():
    x = torch.tensor([-1.0, 0.2, 3.0], dtype=torch.float64)
    codes, values = uniform_grid(x, 5)
    assert values[0] == -1.0 and values[-1] == 3.0 and codes.tolist() == [0, 1, 4]


@given(st.integers(0, 9999), st.integers(2, 12))
def test_kmeans_plus_plus_finds_every_well_separated_cluster(seed, K):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(K, 4, generator=gen) * 100
    X = centers.repeat_interleave(20, 0) + 0.01 * torch.randn(20 * K, 4, generator=gen)
    codes, found = kmeans(X, K, iters=5, seed=seed)
    assert len(set(codes.tolist())) == K  # one center per cluster
    assert float(((X - found[codes]) ** 2).sum(1).max()) < 1.0


def test_kmeans_is_reproducible_assigns_nearest_centers_and_survives_identical_points():
    X = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    (c1, C1), (c2, C2) = kmeans(X, 16, seed=3), kmeans(X, 16, seed=3)
    assert torch.equal(C1, C2) and torch.equal(c1, c2)
    d = torch.cdist(X, C1)
    assert (d.gather(1, c1.unsqueeze(1)).squeeze(1) <= d.min(1).values + 1e-5).all()
    codes, C = kmeans(torch.ones(10, 4), 3)  # every point already on the first center
    assert torch.isfinite(C).all() and torch.equal(C[codes], torch.ones(10, 4))
