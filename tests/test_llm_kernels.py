"""The inference kernels compute what dequantize-then-matmul computes, and the layer picks them only
for inference. On a CPU the Triton kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET)."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from llm import kernels
from llm.formats import AQLMLinear, QuantFormat
from llm.generate import GreedyDecoder, greedy_reference, prepare_for_inference
from llm_helpers import tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")


def random_layer(fmt: str, n_in: int, n_out: int, bias: bool, seed: int, device="cpu") -> AQLMLinear:
    gen = torch.Generator().manual_seed(seed)
    layer = AQLMLinear(n_in, n_out, QuantFormat.parse(fmt), bias=bias)
    with torch.no_grad():
        layer.codebooks.copy_(torch.randn(layer.codebooks.shape, generator=gen))
        layer.scales.copy_(torch.rand(n_out, generator=gen) + 0.5)
        if bias:
            layer.bias.copy_(torch.randn(n_out, generator=gen))
        layer.set_codes(torch.randint(1 << layer.fmt.bits, layer.codes.shape, generator=gen))
    return layer.to(device).requires_grad_(False)


def reference(layer: AQLMLinear, x: torch.Tensor) -> torch.Tensor:
    W = layer.weight().double()
    return F.linear(x.double(), W, None if layer.bias is None else layer.bias.double())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def err_vs_magnitude(layer: AQLMLinear, x: torch.Tensor, y: torch.Tensor) -> float:
    """max |y - reference| over max (|x| |W|' + |b|): float32 rounding is relative to the size of the
    products summed, not of their sum (one output can cancel to almost nothing)."""
    W = layer.weight().double()
    size = F.linear(x.double().abs(), W.abs(), None if layer.bias is None else layer.bias.double().abs())
    return float((y.double() - reference(layer, x)).abs().max() / size.max())


layer_cases = st.tuples(
    st.sampled_from(["1x16g8", "2x8g8", "1x8g8", "2x4g4", "3x4g2"]),
    st.integers(1, 5),  # input groups
    st.integers(1, 40),  # outputs
    st.sampled_from([1, 2, 3, 16]),  # tokens
    st.booleans(),  # bias
    st.integers(0, 10_000),  # seed
)


@needs_triton
@given(layer_cases)
def test_triton_kernel_matches_dequantize_then_matmul(case):
    from llm.triton_kernel import aqlm_matmul

    fmt, groups, n_out, T, bias, seed = case
    g = QuantFormat.parse(fmt).group_size
    layer = random_layer(fmt, groups * g * 4, n_out, bias, seed, DEVICE)
    x = torch.randn(T, layer.in_features, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    y = aqlm_matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias, block_n=16, block_j=4)
    assert y.shape == (T, n_out) and y.dtype == x.dtype
    assert err_vs_magnitude(layer, x, y) < 1e-6


@needs_numba
@given(layer_cases.filter(lambda c: QuantFormat.parse(c[0]).bits <= 8))
def test_lookup_table_kernel_matches_dequantize_then_matmul(case):
    from llm.lut_kernel import aqlm_matmul_lut

    fmt, groups, n_out, T, bias, seed = case
    g = QuantFormat.parse(fmt).group_size
    layer = random_layer(fmt, groups * g * 4, n_out, bias, seed)
    x = torch.randn(2, T, layer.in_features, generator=torch.Generator().manual_seed(seed))[:1]
    y = aqlm_matmul_lut(x, layer.codes, layer.codebooks, layer.scales, layer.bias)
    assert y.shape == (1, T, n_out)
    assert err_vs_magnitude(layer, x, y) < 1e-6


@given(st.integers(1, 40_000), st.integers(1, 2_000).map(lambda j: 8 * j), st.integers(1, 16),
       st.floats(0.01, 1_000))
def test_the_cuda_kernels_split_is_the_finest_that_one_wave_holds(n_out, n_groups, tokens, slots):
    """llm.cuda_kernel.split_plan: chunks of whole super-slabs whose activations fit in shared memory; row blocks
    x chunks within the slots unless the row blocks alone exceed them or the activations force smaller chunks;
    and no finer chunk would still fit one wave (a coarser split than needed leaves SMs idle)."""
    from llm.cuda_kernel import BLOCK_ROWS, SLAB_GROUPS, X_SHARED_BYTES, split_plan

    splits, chunk = split_plan(n_out, n_groups, tokens, slots)
    slabs = -(-n_groups // SLAB_GROUPS)
    row_blocks = -(-n_out // BLOCK_ROWS)
    fits = X_SHARED_BYTES // (SLAB_GROUPS * 16 * tokens)
    assert chunk <= max(fits, 1)
    assert row_blocks * splits <= int(slots) or splits == 1 or chunk == fits
    if 1 < chunk < fits:  # one super-slab less per chunk would need more blocks than one wave holds
        assert row_blocks * -(-slabs // (chunk - 1)) > int(slots)


def test_sixteen_bit_codes_are_stored_in_int16_and_read_back_unsigned():
    layer = random_layer("1x16g8", 16, 4, False, 0)
    codes = torch.tensor([0, 1, 32767, 32768, 40000, 65535, 7, 9]).reshape(-1, 1)
    layer.set_codes(codes)
    assert layer.codes.dtype == torch.int16
    assert torch.equal(layer.codes_view(), codes)


@needs_numba
def test_layer_uses_a_kernel_only_for_decoding_sized_inference():
    layer = random_layer("2x8g8", 64, 24, True, 1)
    few, many = torch.randn(1, 64), torch.randn(17, 64)
    assert kernels.kernel_for(layer, few) == "lut"
    assert kernels.kernel_for(layer, many) is None
    assert kernels.kernel_for(layer, torch.randn(3, 64)) is None  # a small layer: decoding is cheaper for 3 tokens
    layer.requires_grad_(True)
    assert kernels.kernel_for(layer, few) is None  # training: autograd needs the decoded weight
    with torch.no_grad():
        assert kernels.kernel_for(layer, few) == "lut"
        fast = layer(few)
        kernels.set_enabled(False)
        try:
            assert kernels.kernel_for(layer, few) is None
            slow = layer(few)
        finally:
            kernels.set_enabled(True)
    assert rel_err(fast, slow) < 1e-5


def quantized_tiny(arch: str, fmt: str, **config) -> torch.nn.Module:
    from experiments.bench_scale import quantize_randomly

    model = tiny_model(arch, **config)
    quantize_randomly(model, QuantFormat.parse(fmt))
    with torch.no_grad():  # codebooks large enough that the quantized model's argmax is not constant
        for m in model.modules():
            if isinstance(m, AQLMLinear):
                m.codebooks.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return prepare_for_inference(model)


@pytest.mark.parametrize("arch,fmt", [("llama", None), ("mistral", None), ("llama", "2x8g8"), ("mistral", "1x16g8")])
def test_greedy_decoder_with_static_cache_reproduces_full_forward_greedy(arch, fmt):
    # 7 + 40 tokens: beyond the tiny Mistral's sliding window of 32
    model = prepare_for_inference(tiny_model(arch)) if fmt is None else quantized_tiny(arch, fmt)
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    decoder = GreedyDecoder(model, max_len=64, cuda_graph=False)
    expected = greedy_reference(model, prompt, 40)
    assert torch.equal(decoder.generate(prompt, 40), expected)
    assert torch.equal(decoder.generate(prompt, 40), expected)  # the cache resets between prompts
    assert len(set(expected[0, 7:].tolist())) > 1


@pytest.mark.parametrize("arch,fmt", [("llama", "2x8g8"), ("mistral", None)])
def test_batched_greedy_decoding_gives_each_prompts_own_tokens(arch, fmt):
    model = prepare_for_inference(tiny_model(arch)) if fmt is None else quantized_tiny(arch, fmt)
    prompts = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(4))
    batched = GreedyDecoder(model, max_len=48, cuda_graph=False, batch_size=3).generate(prompts, 36)
    for i in range(3):
        assert torch.equal(batched[i:i + 1], greedy_reference(model, prompts[i:i + 1], 36))
    with pytest.raises(ValueError, match=r"prompts of shape \(3, P\)"):
        GreedyDecoder(model, max_len=48, cuda_graph=False, batch_size=3).generate(prompts[:1], 4)


def test_compiled_greedy_decoding_gives_the_full_forward_tokens():
    """torch.compile around the quantized layers' kernels (one opaque operator each): the same tokens."""
    model = quantized_tiny("llama", "2x8g8")
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    decoder = GreedyDecoder(model, max_len=32, cuda_graph=False, compile=True)
    assert torch.equal(decoder.generate(prompt, 16), greedy_reference(model, prompt, 16))


@pytest.mark.parametrize("fmt,tokens", [("2x8g8", 1), ("1x16g8", 1), ("2x8g8", 5)])
def test_the_compiled_operator_gives_the_layers_product(fmt, tokens):
    """One operator for torch.compile: a kernel where one applies, else the reference product."""
    layer = random_layer(fmt, 64, 48, True, 0)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = kernels.compiled_matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias)
    assert got.shape == (tokens, 48)
    assert rel_err(got, reference(layer, x)) < 1e-5


def test_greedy_decoder_rejects_a_prompt_longer_than_its_cache():
    decoder = GreedyDecoder(prepare_for_inference(tiny_model("llama")), max_len=16)
    with pytest.raises(ValueError, match="exceed the cache"):
        decoder.generate(torch.zeros(1, 10, dtype=torch.long), 10)


@needs_numba
def test_lookup_tables_give_the_reference_result_on_two_threads():
    """The suite pins numba to one thread (aqlm's own CPU kernel races on more); each of our parallel
    iterations writes its own output row, so two threads must agree with the reference too."""
    import os
    import subprocess
    import sys

    code = (
        "import numba, torch\n"
        "from llm.lut_kernel import aqlm_matmul_lut\n"
        "from pvtheory.codes import decode\n"
        "g = torch.Generator().manual_seed(0)\n"
        "codes = torch.randint(0, 256, (300, 32, 2), generator=g).to(torch.uint8)\n"
        "cb, s = torch.randn(2, 256, 8, generator=g), torch.rand(300, generator=g) + 0.5\n"
        "W = decode(codes.reshape(-1, 2).long(), cb, (300, 256), s)\n"
        "for T in (1, 5):\n"
        "    x = torch.randn(T, 256, generator=g)\n"
        "    y, ref = aqlm_matmul_lut(x, codes, cb, s), x @ W.T\n"
        "    print(numba.get_num_threads(), float((y - ref).norm() / ref.norm()))\n")
    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    for line in out.stdout.split("\n")[:2]:
        threads, err = line.split()
        assert threads == "2" and float(err) < 1e-5
