"""The discrete-continuous parameter: decode/encode, beam search, the value Jacobian."""
import itertools

import pytest
import torch
from hypothesis import given, strategies as st

from pvtheory import Codebooks, residual_kmeans, scalar
from pvtheory.codes import beam_search, nearest_entry


def random_codebooks(seed, M, K, g, rows, cols, scales=False):
    gen = torch.Generator().manual_seed(seed)
    cb = torch.randn(M, K, g, generator=gen, dtype=torch.float64)
    codes = torch.randint(K, (rows * cols // g, M), generator=gen)
    sc = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5 if scales else None
    return Codebooks(codes, cb, (rows, cols), sc)


@given(st.integers(0, 999), st.integers(1, 3), st.sampled_from([2, 4, 8]), st.sampled_from([1, 2, 4]), st.booleans())
def test_encode_of_a_decoded_parameter_recovers_its_point(seed, M, K, g, scales):
    p = random_codebooks(seed, M, K, g, 3, 8, scales)
    codes = p.encode(p.decode(), beam_width=8)
    assert torch.allclose(p.with_codes(codes).decode(), p.decode(), atol=1e-10)


@given(st.integers(0, 999), st.sampled_from([2, 3, 5]), st.sampled_from([1, 3]))
def test_nearest_entry_is_the_brute_force_nearest(seed, K, g):
    gen = torch.Generator().manual_seed(seed)
    t, entries = torch.randn(50, g, generator=gen, dtype=torch.float64), torch.randn(K, g, generator=gen, dtype=torch.float64)
    w = torch.rand(50, g, generator=gen, dtype=torch.float64) + 0.1
    brute = ((t.unsqueeze(1) - entries) ** 2 * w.unsqueeze(1)).sum(-1).argmin(1)
    assert torch.equal(nearest_entry(t, entries, w), brute)
    assert torch.equal(nearest_entry(t, entries), ((t.unsqueeze(1) - entries) ** 2).sum(-1).argmin(1))


@given(st.integers(0, 999), st.integers(1, 4))
def test_beam_search_never_worsens_a_group_and_wide_beams_find_the_optimum(seed, beam):
    gen = torch.Generator().manual_seed(seed)
    M, K, g = 2, 4, 3
    cb = torch.randn(M, K, g, generator=gen, dtype=torch.float64)
    t = torch.randn(30, g, generator=gen, dtype=torch.float64)
    start = torch.randint(K, (30, M), generator=gen)
    err = lambda c: ((cb[0][c[:, 0]] + cb[1][c[:, 1]] - t) ** 2).sum(1)  # noqa: E731
    out = beam_search(t, cb, start, None, beam)
    assert bool((err(out) <= err(start) + 1e-12).all())
    full = beam_search(t, cb, start, None, K * K)  # beam = all K^M tuples: exhaustive
    brute = torch.stack([err(torch.tensor([pair] * 30)) for pair in itertools.product(range(K), repeat=2)]).min(0).values
    assert torch.allclose(err(full), brute)


@given(st.integers(0, 999), st.integers(1, 2), st.booleans())
def test_decode_is_linear_in_the_codebooks_through_the_value_jacobian(seed, M, scales):
    p = random_codebooks(seed, M, 4, 2, 3, 6, scales)
    D = p.value_jacobian()
    assert torch.allclose(D @ p.codebooks.reshape(-1), p.decode().reshape(-1))


def test_scalar_parameter_has_at_most_c_distinct_values():
    p = scalar(torch.tensor([0, 2, 2, 1, 0]), torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64))
    assert p.decode().tolist() == [0.5, 3.0, 3.0, -1.0, 0.5] and p.distinct_values() == 3


def test_residual_kmeans_error_falls_with_each_codebook():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=gen, dtype=torch.float64)
    errs = [float(((residual_kmeans(W, W.shape, M, 16, 4).decode() - W) ** 2).sum()) for M in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2]


@given(st.integers(0, 999), st.integers(1, 2))
def test_search_under_a_metric_matches_brute_force(seed, M):
    gen = torch.Generator().manual_seed(seed)
    K, g = 4, 3
    cb = torch.randn(M, K, g, generator=gen, dtype=torch.float64)
    R = torch.randn(g, g, generator=gen, dtype=torch.float64)
    A = R @ R.T + 0.1 * torch.eye(g, dtype=torch.float64)
    t = torch.randn(20, g, generator=gen, dtype=torch.float64)
    tuples = list(itertools.product(range(K), repeat=M))
    recs = torch.stack([sum(cb[m][k[m]] for m in range(M)) for k in tuples])  # (C, g)
    diff = recs.unsqueeze(0) - t.unsqueeze(1)
    errs = ((diff @ A) * diff).sum(-1)  # (20, C)
    start = torch.zeros(20, M, dtype=torch.long)
    got = beam_search(t, cb, start, None, K ** M, metric=A)
    got_err = torch.stack([errs[i, tuples.index(tuple(got[i].tolist()))] for i in range(20)])
    assert torch.allclose(got_err, errs.min(1).values)
    if M == 1:
        assert torch.equal(nearest_entry(t, cb[0], metric=A), errs.argmin(1))


@given(st.integers(0, 1000), st.sampled_from([1, 2]), st.sampled_from([16, 64]))
def test_encode_holds_at_most_the_candidate_budget_and_chunking_never_changes_codes(seed, M, K):
    import pvtheory.codes as codes_mod

    gen = torch.Generator().manual_seed(seed)
    p = Codebooks(torch.randint(0, K, (60, M), generator=gen), torch.randn(M, K, 4, generator=gen), (12, 20))
    target = torch.randn(12, 20, generator=gen)
    w = torch.rand(12, 20, generator=gen) + 0.1
    whole = p.encode(target, weights=w, beam_width=2)
    seen = []
    real = codes_mod.weighted_sq_distances

    def recording(t, entries, *a, **k):
        seen.append(t.shape[0] * entries.shape[0])
        return real(t, entries, *a, **k)

    codes_mod.weighted_sq_distances = recording
    try:
        budget = 2 * K * (2 if M > 1 else 1)  # two groups' candidates at a time
        chunked = p.encode(target, weights=w, beam_width=2, candidate_budget=budget)
    finally:
        codes_mod.weighted_sq_distances = real
    assert torch.equal(whole, chunked)
    if M == 1:  # one (chunk, K) distance matrix at a time
        assert seen and max(seen) <= budget


def test_nearest_beyond_in_chunks_equals_all_at_once():
    from llm.formats import QuantFormat, make_quantized

    torch.manual_seed(0)
    layer = make_quantized(torch.nn.Linear(64, 24, bias=False), QuantFormat.parse("2x6g8"))
    with torch.no_grad():
        layer.codebooks.normal_()
        layer.set_codes(torch.randint(0, 64, layer.codes_view().shape))
    target = torch.randn(24, 64)
    p, codes = layer.as_param(), layer.codes_view()
    assert torch.equal(p.nearest_beyond(target, codes), p.nearest_beyond(target, codes, candidate_budget=64 * 5))


@given(st.integers(0, 1000), st.booleans())
def test_nearest_entry_in_chunks_equals_all_at_once(seed, weighted):
    from pvtheory.codes import nearest_entry_chunked

    gen = torch.Generator().manual_seed(seed)
    t, entries = torch.randn(50, 4, generator=gen), torch.randn(16, 4, generator=gen)
    w = torch.rand(50, 4, generator=gen) + 0.1 if weighted else None
    assert torch.equal(nearest_entry_chunked(t, entries, w, budget=16 * 3), nearest_entry(t, entries, w))


@pytest.mark.parametrize("M", [1, 2, 3])
def test_nearest_beyond_is_the_nearest_single_codebook_change_on_the_targets_side(M):
    gen = torch.Generator().manual_seed(M)
    n, K, g = 40, 6, 3
    cb = torch.randn(M, K, g, generator=gen, dtype=torch.float64)
    p = Codebooks(torch.randint(0, K, (n, M), generator=gen), cb, (n, g))
    target = torch.randn(n, g, generator=gen, dtype=torch.float64)
    got = p.nearest_beyond(target, p.codes)
    q = p.decode()
    for i in range(n):
        best, best_d = p.codes[i], float("inf")
        for m in range(M):
            for k in range(K):
                c = p.codes[i].clone()
                c[m] = k
                v = sum(cb[j][c[j]] for j in range(M))
                if float((v - q[i]) @ (target[i] - q[i])) > 0 and float(((v - target[i]) ** 2).sum()) < best_d:
                    best, best_d = c, float(((v - target[i]) ** 2).sum())
        assert torch.equal(got[i], best)
