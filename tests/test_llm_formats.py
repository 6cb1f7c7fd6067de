"""Quantized layers: encode/decode round trip, bits accounting, format parsing."""
import pytest
import torch

from llm.formats import AQLMLinear, QuantFormat, ScalarLinear, make_quantized, model_bits


def random_aqlm(fmt: str, out=16, inp=32, seed=0) -> AQLMLinear:
    gen = torch.Generator().manual_seed(seed)
    layer = AQLMLinear(inp, out, QuantFormat.parse(fmt))
    with torch.no_grad():
        layer.codebooks.copy_(torch.randn(layer.codebooks.shape, generator=gen))
        layer.scales.copy_(torch.rand(out, generator=gen) + 0.5)
        K = layer.codebooks.shape[1]
        layer.set_codes(torch.randint(K, layer.codes.shape, generator=gen))
    return layer


@pytest.mark.parametrize("fmt", ["1x8g8", "2x8g8", "vq4g4", "2x4g2", "1x16g8"])
def test_aqlm_encode_of_its_own_weight_recovers_the_weight(fmt):
    layer = random_aqlm(fmt)
    W = layer.weight().detach()
    codes = layer.encode(W, beam_width=8)
    layer.set_codes(codes)
    assert torch.allclose(layer.weight().detach(), W, atol=1e-5)


def test_scalar_encode_rounds_to_the_nearest_grid_point():
    layer = ScalarLinear(8, 4, QuantFormat.parse("int2g4"))
    with torch.no_grad():
        layer.scales.fill_(0.5)
        layer.zeros.fill_(1.0)
    target = torch.tensor([[-0.6, -0.4, 0.1, 0.3, 0.8, 2.0, -9.0, 0.24]] * 4)
    layer.set_codes(layer.encode(target))
    assert layer.weight()[0].tolist() == [-0.5, -0.5, 0.0, 0.5, 1.0, 1.0, -0.5, 0.0]


def test_bits_count_codes_codebooks_and_scales():
    # 384 x 384 with 2x8g8: codes 2 bits/w, codebooks 2*256*8*16 = 65,536 bits, scales 384*16 bits
    fmt = QuantFormat.parse("2x8g8")
    n = 384 * 384
    assert fmt.bits_per_weight(384, 384) == pytest.approx((n * 2 + 65_536 + 384 * 16) / n)
    assert QuantFormat.parse("1x16g8").bits_per_weight(4096, 4096) == pytest.approx(
        (4096 * 4096 * 2 + 65_536 * 8 * 16 + 4096 * 16) / 4096**2)
    assert QuantFormat.parse("int2g64").bits_per_weight(64, 128) == pytest.approx(2 + 32 / 64)


def test_model_bits_add_up_over_layers():
    lin = torch.nn.Sequential(make_quantized(torch.nn.Linear(32, 16), QuantFormat.parse("1x8g8")))
    bits = model_bits(lin)
    assert bits["quantized_weights"] == 512
    assert bits["bits_per_quantized_weight"] == pytest.approx(QuantFormat.parse("1x8g8").bits_per_weight(16, 32))


@pytest.mark.parametrize("spec", ["2x8", "3x17g8", "int9g4", "abc"])
def test_bad_format_strings_are_rejected(spec):
    with pytest.raises(ValueError, match="format"):
        QuantFormat.parse(spec)


def test_a_group_size_that_does_not_divide_the_layer_is_rejected():
    with pytest.raises(ValueError, match="group size 7 does not divide"):
        AQLMLinear(64, 8, QuantFormat.parse("1x8g7"))
