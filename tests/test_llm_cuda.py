"""The same code on a CUDA GPU: agrees with the CPU in float32, and trains in bf16 autocast.
Skipped without CUDA (run on the device: `python -m pytest -m cuda tests`)."""
import copy

import pytest
import torch

from llm.aqlm import exact_codebooks
from llm.calibrate import CalibrationConfig, calibrate, quantize_linear
from llm.layer_objective import damped, relative_error
from llm.finetune import finetune
from llm.formats import QuantFormat
from llm_helpers import ft_config, tiny_model
from tests_llm_common import layer_problem

pytestmark = pytest.mark.cuda
SEQS = torch.randint(0, 256, (24, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def exact_float32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def test_conjugate_gradient_codebooks_agree_on_cuda_and_cpu():
    linear, H = layer_problem(2)
    layer, _ = quantize_linear(linear, H, QuantFormat.parse("2x4g4"), CalibrationConfig(fmt="2x4g4", rounds=1))
    W, Hd = linear.weight.detach(), damped(H, 1e-2)
    on_gpu = copy.deepcopy(layer).cuda()
    exact_codebooks(layer, W, Hd)
    exact_codebooks(on_gpu, W.cuda(), Hd.cuda())
    cpu_err = float(relative_error(layer.weight().detach(), W, Hd))
    gpu_err = float(relative_error(on_gpu.weight().detach().cpu(), W, Hd))
    assert gpu_err == pytest.approx(cpu_err, rel=1e-4)


def test_quantized_model_gives_the_same_logits_on_cuda_and_cpu():
    student = tiny_model("llama")
    calibrate(student, SEQS, CalibrationConfig(fmt="1x6g8", rounds=1, forward_batch_size=8, block_tune_steps=0),
              device="cuda", progress=False)
    with torch.no_grad():
        cpu = student.cpu()(SEQS[:2]).logits
        gpu = student.cuda()(SEQS[:2].cuda()).logits.cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("strategy", ["pv", "ste"])
def test_kl_falls_in_bf16_autocast_with_gradient_checkpointing(strategy):
    teacher = tiny_model("mistral")
    student = copy.deepcopy(teacher)
    calibrate(student, SEQS, CalibrationConfig(fmt="1x6g8", rounds=1, forward_batch_size=8, block_tune_steps=0),
              device="cuda", progress=False)
    cfg = ft_config(strategy, {"p_lr": 3e-3, "p_fraction": 0.02}, steps=25, batch_size=8, micro_batch_size=4, lr=3e-3, amp=True, grad_checkpointing=True)
    rep = finetune(student, teacher, SEQS, cfg, device="cuda", progress=False)
    assert sum(rep["losses"][-5:]) / 5 < 0.8 * rep["losses"][0], rep["losses"]
    assert sum(rep["codes_changed"]) > 0


@pytest.mark.parametrize("fmt", ["1x16g8", "2x8g8", "1x8g8"])
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_autotuned_triton_kernel_in_bf16_matches_the_float32_reference(fmt, tokens):
    from llm.triton_kernel import aqlm_matmul
    from test_llm_kernels import random_layer, reference, rel_err

    layer = random_layer(fmt, 1024, 1536, True, 0, "cuda")
    x = torch.randn(tokens, 1024, device="cuda")
    expected = reference(layer, x)
    layer = layer.to(torch.bfloat16)
    y = aqlm_matmul(x.bfloat16(), layer.codes, layer.codebooks, layer.scales, layer.bias)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, expected) < 1e-2


@pytest.mark.parametrize("fmt", ["2x8g8", "1x16g8"])
def test_cuda_graph_decoding_with_kernels_gives_the_full_forward_tokens(fmt):
    from llm.generate import GreedyDecoder, greedy_reference
    from test_llm_kernels import quantized_tiny

    model = quantized_tiny("mistral", fmt).cuda()
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3)).cuda()
    decoder = GreedyDecoder(model, max_len=64)
    assert decoder.cuda_graph
    assert torch.equal(decoder.generate(prompt, 40), greedy_reference(model, prompt, 40))


@pytest.mark.parametrize("fmt", ["2x8g8", "1x8g8", "1x16g8", "2x16g8"])
@pytest.mark.parametrize("n_in,n_out,bias", [(1024, 1536, True), (4096, 100, False), (576, 192, True), (11008, 256, False)])
@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 16])
def test_cuda_kernel_matches_the_float32_reference_at_1_to_16_bf16_tokens(fmt, n_in, n_out, bias, tokens):
    from llm import cuda_kernel, kernels
    from test_llm_kernels import random_layer, reference, rel_err

    layer = random_layer(fmt, n_in, n_out, bias, 0, "cuda")
    x = torch.randn(tokens, n_in, device="cuda")
    expected = reference(layer, x)
    layer, x = layer.to(torch.bfloat16), x.bfloat16()
    assert cuda_kernel.load() is not None, cuda_kernel.build_error()
    one_token_triton = tokens == 1 and (layer.fmt.bits > 8 or n_in * n_out < kernels.CUDA_MIN_WEIGHTS_ONE_TOKEN)
    assert kernels.kernel_for(layer, x) == ("triton" if one_token_triton else "cuda")
    for blocks_per_sm in (0.01, None, 64):  # no split of the input groups, the default, one chunk per super-slab
        y = cuda_kernel.aqlm_matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias, blocks_per_sm)
        assert y.shape == (tokens, n_out) and y.dtype == torch.bfloat16
        assert rel_err(y, expected) < 1e-2, blocks_per_sm
        again = cuda_kernel.aqlm_matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias, blocks_per_sm)
        assert torch.equal(y, again)  # the split-K counters reset themselves; the sum order is fixed
    assert kernels.kernel_for(layer, torch.randn(17, n_in, device="cuda", dtype=torch.bfloat16)) is None


@pytest.mark.parametrize("fmt", ["2x8g8", "1x8g8"])
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_cuda_kernel_launched_as_a_programmatic_dependent_gives_the_same_outputs_in_a_graph(fmt, tokens, monkeypatch):
    from llm import cuda_kernel
    from test_llm_kernels import random_layer

    assert cuda_kernel.load() is not None, cuda_kernel.build_error()
    layers = [random_layer(fmt, 4096, 4096, i % 2 == 0, i, "cuda").to(torch.bfloat16) for i in range(4)]
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)

    def chain() -> list:  # back to back, each kernel reading the one before it: the wait must order them
        outs, h = [], x
        for layer in layers:
            h = cuda_kernel.aqlm_matmul(h, layer.codes, layer.codebooks, layer.scales, layer.bias)
            outs.append(h)
        return outs

    monkeypatch.setattr(cuda_kernel, "PDL", False)
    expected = chain()
    monkeypatch.setattr(cuda_kernel, "PDL", True)
    assert all(torch.equal(a, b) for a, b in zip(chain(), expected))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(captured, expected))


@pytest.mark.parametrize("fmt", ["2x8g8", "1x8g8"])
@pytest.mark.parametrize("rows,bias", [((256, 128, 200), True), ((4096, 1024, 1024), False), ((1536, 1536), False)])
@pytest.mark.parametrize("tokens", [1, 3, 9, 16])
def test_one_launch_for_layers_that_read_one_input_gives_each_layers_product(fmt, rows, bias, tokens):
    """llm.fuse's launch: each row block reads its own layer's codebooks (every layer has its own here)."""
    from llm import cuda_kernel
    from llm.fuse import SharedInputGroup
    from test_llm_kernels import random_layer, reference, rel_err

    assert cuda_kernel.load() is not None, cuda_kernel.build_error()
    layers = [random_layer(fmt, 1024, r, bias, i, "cuda") for i, r in enumerate(rows)]
    x = torch.randn(tokens, 1024, device="cuda")
    expected = [reference(layer, x) for layer in layers]
    layers, x = [layer.to(torch.bfloat16) for layer in layers], x.bfloat16()
    group = SharedInputGroup(layers)
    for blocks_per_sm in (0.01, None, 64):
        y = cuda_kernel.aqlm_matmul(x, group.codes, group.codebooks, group.scales, group.bias, blocks_per_sm,
                                    part_rows=group.rows)
        assert y.shape == (tokens, sum(rows)) and y.dtype == torch.bfloat16
        for part, want in zip(y.split(group.rows, dim=-1), expected):
            assert rel_err(part, want) < 1e-2, blocks_per_sm
        assert torch.equal(y, cuda_kernel.aqlm_matmul(x, group.codes, group.codebooks, group.scales, group.bias,
                                                      blocks_per_sm, part_rows=group.rows))


@pytest.mark.parametrize("compile", [False, True])
def test_fused_layers_decode_in_a_cuda_graph_with_one_launch_per_group(compile, monkeypatch):
    from llm import cuda_kernel
    from llm.fuse import GATE_UP, QKV, fuse_shared_inputs
    from llm.generate import GreedyDecoder
    from test_llm_fuse import FUSABLE, distinct_codebooks
    from test_llm_kernels import quantized_tiny

    model = distinct_codebooks(quantized_tiny("llama", "2x8g8", **FUSABLE)).cuda().to(torch.bfloat16)
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3)).cuda()
    plain = copy.deepcopy(model)
    with torch.no_grad():
        expected_logits = plain(prompt[:, :1]).logits
    assert fuse_shared_inputs(model, (QKV, GATE_UP)) == 4
    launches = []
    launch = cuda_kernel.aqlm_matmul
    monkeypatch.setattr(cuda_kernel, "aqlm_matmul", lambda *a, **k: launches.append(k.get("part_rows")) or launch(*a, **k))
    with torch.no_grad():
        logits = model(prompt[:, :1]).logits
    assert [r for r in launches if r is not None] == [[128, 128, 128], [256, 256]] * 2
    assert torch.allclose(logits.float(), expected_logits.float(), atol=0.05, rtol=0.05)
    decoder = GreedyDecoder(model, max_len=48, batch_size=2, compile=compile)
    assert decoder.cuda_graph
    tokens = decoder.generate(prompt, 32)
    assert torch.equal(decoder.generate(prompt, 32), tokens)  # replays of the captured graph
    eager = GreedyDecoder(model, max_len=48, batch_size=2, cuda_graph=False, compile=compile).generate(prompt, 32)
    assert torch.equal(tokens, eager)  # the same kernels in the same order: the same tokens


@pytest.mark.parametrize("rows,n_in,tokens,kind", [((576, 192, 192), 576, 1, "triton"), ((576, 192, 192), 576, 4, "triton"),
                                                   ((4096, 4096, 4096), 4096, 1, "cuda"), ((256, 256), 256, 1, "triton"),
                                                   ((256, 256), 256, 4, "cuda"), ((256, 256), 256, 16, "cuda")])
def test_the_shared_launch_is_the_cuda_kernels_where_it_can_be_and_tritons_elsewhere(rows, n_in, tokens, kind):
    """As for one layer: Triton for one token of small layers; also where a layer but the last has rows
    that are not a multiple of the CUDA kernel's 128-row blocks (SmolLM2's 576, 192, 192)."""
    from llm import kernels
    from llm.fuse import SharedInputGroup
    from test_llm_kernels import random_layer, reference, rel_err

    layers = [random_layer("2x8g8", n_in, r, True, i, "cuda") for i, r in enumerate(rows)]
    x = torch.randn(tokens, n_in, device="cuda")
    expected = [reference(layer, x) for layer in layers]
    layers, x = [layer.to(torch.bfloat16) for layer in layers], x.bfloat16()
    group = SharedInputGroup(layers)
    assert kernels.kernel_for_tensors(x, group.codes, group.codebooks, group.scales, group.rows) == kind
    y = kernels.matmul(x, group.codes, group.codebooks, group.scales, group.bias, group.rows)
    for part, want in zip(y.split(group.rows, dim=-1), expected):
        assert rel_err(part, want) < 1e-2
