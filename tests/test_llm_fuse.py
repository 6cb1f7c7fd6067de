"""One decoding launch for the layers that read the same input (llm.fuse): the same outputs as each layer
alone, no memory added, and every other path untouched. In the model tests on the CPU the launch is the
reference product (each layer's weight decoded with its own codebooks); the Triton kernel's shared launch runs
here in Triton's interpreter, the CUDA kernel's in tests/test_llm_cuda.py."""
import copy

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from llm import cuda_kernel, kernels
from llm.formats import AQLMLinear
from llm.fuse import GATE_UP, QKV, fusable, fuse_shared_inputs, loses_its_split
from llm.generate import GreedyDecoder, greedy_reference
from test_llm_kernels import err_vs_magnitude, needs_triton, quantized_tiny, random_layer, reference, rel_err

FUSABLE = dict(hidden=128, intermediate=256)  # q, k, v of 128 rows and gate, up of 256: multiples of 128


def distinct_codebooks(model: torch.nn.Module) -> torch.nn.Module:
    """Every layer its own codebooks, so a launch that read another layer's would show."""
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, AQLMLinear)):
            m.codebooks.normal_(0, 0.1, generator=torch.Generator().manual_seed(100 + i))
    return model


def storage_bytes(model: torch.nn.Module) -> int:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@pytest.fixture
def launches(monkeypatch) -> list:
    """Grouped launches on the CPU: the reference product in place of the CUDA kernel; each call's rows recorded."""
    calls = []

    def launch(x, codes, codebooks, scales, bias=None, blocks_per_sm=None, part_rows=None):
        calls.append(list(part_rows))
        return kernels.reference_matmul(x, codes, codebooks, scales, bias, part_rows)

    one_layer = kernels.kernel_for_tensors
    monkeypatch.setattr(kernels, "kernel_for_tensors",
                        lambda x, c, b, s, part_rows=None: "cuda" if part_rows is not None else one_layer(x, c, b, s))
    monkeypatch.setattr(cuda_kernel, "aqlm_matmul", launch)
    return calls


def test_fusing_adds_no_memory_and_each_layer_reads_its_own_rows():
    model = distinct_codebooks(quantized_tiny("llama", "2x8g8", **FUSABLE))
    before = storage_bytes(model)
    weights = {n: m.weight().clone() for n, m in model.named_modules() if isinstance(m, AQLMLinear)}
    assert fuse_shared_inputs(model, (QKV, GATE_UP)) == 4  # q/k/v and gate/up in each of 2 blocks
    assert fuse_shared_inputs(model, (QKV, GATE_UP)) == 0  # already fused
    assert storage_bytes(model) == before
    for n, m in model.named_modules():
        if isinstance(m, AQLMLinear):
            assert torch.equal(m.weight(), weights[n]), n
            assert m.shared_input is not None or n.endswith(("o_proj", "down_proj"))


def test_one_launch_per_group_gives_the_tokens_of_the_unfused_model(launches):
    model = distinct_codebooks(quantized_tiny("llama", "2x8g8", **FUSABLE))
    plain = copy.deepcopy(model)
    fuse_shared_inputs(model, (QKV, GATE_UP))
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    tokens = GreedyDecoder(model, max_len=32, cuda_graph=False).generate(prompt, 12)
    assert torch.equal(tokens, greedy_reference(plain, prompt, 12))
    assert launches == [[128, 128, 128], [256, 256]] * 2 * 12  # 2 blocks, the prompt's step and 11 more
    with torch.no_grad():  # beyond 16 tokens each layer decodes its own weight, grouped or not
        assert torch.allclose(model(tokens).logits, plain(tokens).logits, atol=1e-5)
    assert len(launches) == 2 * 2 * 12  # none for those 19 tokens


def test_compiled_decoding_of_fused_layers_gives_the_same_tokens(launches):
    model = distinct_codebooks(quantized_tiny("llama", "2x8g8", **FUSABLE))
    plain = copy.deepcopy(model)
    fuse_shared_inputs(model, (QKV, GATE_UP))
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    tokens = GreedyDecoder(model, max_len=32, cuda_graph=False, compile=True).generate(prompt, 8)
    assert torch.equal(tokens, greedy_reference(plain, prompt, 8))
    assert launches == [[128, 128, 128], [256, 256]] * 2 * 8, len(launches)


def test_a_layer_asked_alone_or_with_another_input_still_gives_its_product(launches):
    model = quantized_tiny("llama", "2x8g8", **FUSABLE)
    assert fuse_shared_inputs(model, (QKV,)) == 2
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(0)).unbind(0)
    with torch.no_grad():
        for layer, inp in ((attn.v_proj, x), (attn.q_proj, x), (attn.k_proj, other), (attn.v_proj, other)):
            assert torch.allclose(layer(inp), reference(layer, inp).float(), atol=1e-5)
    assert launches == [[128, 128, 128]] * 3  # v alone, q, then k on another input; v reuses k's launch


def test_layers_that_cannot_share_a_launch_say_why_and_are_left_alone():
    gqa = quantized_tiny("mistral", "2x8g8", hidden=128, intermediate=256, kv_heads=2)  # k, v: 64 rows
    attn = gqa.model.layers[0].self_attn
    assert fusable([attn.q_proj, attn.k_proj, attn.v_proj]) is None  # the launch is Triton's where CUDA's cannot
    assert fuse_shared_inputs(gqa) == 4  # q/k/v and gate/up of each block (the default)
    assert attn.o_proj.shared_input is None and attn.q_proj.shared_input is attn.v_proj.shared_input
    assert "more than 4" in fusable([random_layer("2x8g8", 64, 128, False, i) for i in range(5)])
    assert "bias" in fusable([random_layer("2x8g8", 64, 128, b, 0) for b in (True, False)])
    assert "input sizes" in fusable([random_layer("2x8g8", n, 128, False, 0) for n in (64, 128)])
    with pytest.raises(ValueError, match="multiple of 128"):  # the kernel's own check, before any launch
        layer = random_layer("2x8g8", 64, 200, False, 0)
        cuda_kernel.aqlm_matmul(torch.randn(1, 64), torch.cat([layer.codes] * 2),
                                torch.stack([layer.codebooks] * 2), torch.cat([layer.scales] * 2), part_rows=[200, 200])
    with pytest.raises(ValueError, match="one set per layer"):  # two layers' rows, one layer's codebooks
        cuda_kernel.aqlm_matmul(torch.randn(1, 64), torch.cat([layer.codes] * 2), layer.codebooks,
                                torch.cat([layer.scales] * 2), part_rows=[256, 144])


def test_the_grouped_reference_product_is_each_layers_product_side_by_side():
    layers = [random_layer("2x8g8", 64, r, True, i) for i, r in enumerate((128, 128, 40))]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    got = kernels.reference_matmul(x, torch.cat([m.codes for m in layers]), torch.stack([m.codebooks for m in layers]),
                                   torch.cat([m.scales for m in layers]), torch.cat([m.bias for m in layers]),
                                   [128, 128, 40])
    assert rel_err(got, torch.cat([reference(m, x) for m in layers], dim=-1)) < 1e-6


def test_a_model_cast_after_fusing_runs_each_layer_alone(launches):
    model = quantized_tiny("llama", "2x8g8", **FUSABLE)
    fuse_shared_inputs(model)
    model.double()  # the layers' tensors are new ones now; the group's are float32
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(prompt).logits
    assert logits.dtype == torch.float64 and launches == []


@needs_triton
@given(st.sampled_from(["1x16g8", "2x8g8", "3x4g2"]), st.lists(st.integers(1, 40), min_size=1, max_size=4),
       st.sampled_from([1, 3, 16]), st.booleans(), st.integers(0, 10_000))
@example("2x8g8", [5, 6], 1, False, 0)  # the tile's rows past the last layer read its codebooks, not past them
def test_one_triton_launch_gives_each_layers_product(fmt, rows, tokens, bias, seed):
    """Any row counts (the Triton kernel picks each row's codebooks, not each block's); Triton's interpreter."""
    from llm.triton_kernel import aqlm_matmul

    layers = [random_layer(fmt, 32, r, bias, seed + i) for i, r in enumerate(rows)]
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(seed))
    y = aqlm_matmul(x, torch.cat([m.codes for m in layers]), torch.stack([m.codebooks for m in layers]),
                    torch.cat([m.scales for m in layers]), torch.cat([m.bias for m in layers]) if bias else None,
                    block_n=16, block_j=4, part_rows=rows)
    assert y.shape == (tokens, sum(rows))
    for layer, part in zip(layers, y.split(rows, dim=-1)):
        assert err_vs_magnitude(layer, x, part) < 1e-6
    with pytest.raises(ValueError, match="part_rows"):
        aqlm_matmul(x, layers[0].codes, layers[0].codebooks, layers[0].scales, part_rows=[rows[0], 1])


def test_one_launch_is_skipped_only_where_it_would_lose_the_cuda_kernels_split():
    """The measured cases (H200, 132 SMs; docs/kernels.md): one launch is slower only for gate and up of the
    7B shape with two codebooks (2 blocks per SM), whose 172 row blocks leave no split in one wave."""
    assert loses_its_split([11008, 11008], 4096 // 8, 2 * 132)  # 2x8g8: 0.94x measured
    assert not loses_its_split([11008, 11008], 4096 // 8, 3 * 132)  # 1x8g8: 1.24x
    assert not loses_its_split([4096] * 3, 4096 // 8, 2 * 132)  # q, k, v 2x8g8: 1.22x
    assert not loses_its_split([1536, 1536], 576 // 8, 2 * 132)  # SmolLM2's gate, up: 1.79x (4 tokens)
    assert not loses_its_split([40_000, 40_000], 4096 // 8, 2 * 132)  # unsplit alone too: nothing lost
