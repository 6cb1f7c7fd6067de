"""Export to the Hugging Face AQLM format: transformers + aqlm load it and give our logits."""
import copy

import pytest
import torch

from llm.calibrate import CalibrationConfig, calibrate
from llm.export import ExportError, export_aqlm
from llm.model import load_model
from llm_helpers import byte_level_vocab, tiny_model, write_gguf


@pytest.mark.parametrize("fmt,source", [("2x8g8", "hf"), ("1x8g8", "hf"), ("2x8g8", "gguf")])
def test_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, fmt, source):
    pytest.importorskip("aqlm", reason="loading the AQLM format needs the aqlm package (pip install 'aqlm[cpu]')")
    from transformers import AutoModelForCausalLM

    if source == "gguf":  # a tied, grouped-query-attention model read from a GGUF file
        pytest.importorskip("gguf", reason="GGUF models need the gguf package")
        from test_llm_gguf import _tied_gqa_llama

        path = write_gguf(_tied_gqa_llama(), tmp_path / "base.gguf", byte_level_vocab())
        base = load_model(path)
    else:
        path = tmp_path / "base"
        base = tiny_model("llama", peaky=False)
        base.save_pretrained(path)
    seqs = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    q = copy.deepcopy(base)
    calibrate(q, seqs, CalibrationConfig(fmt=fmt, rounds=1, forward_batch_size=2, block_tune_steps=0), progress=False)
    out = export_aqlm(q, path, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(hf.model.layers[0].mlp.down_proj).__module__.startswith("aqlm")
    # aqlm 1.1.7's CPU kernel accumulates into shared outputs from parallel loop iterations (a race that
    # gives wrong sums with several threads); one numba thread gives its exact result
    numba = pytest.importorskip("numba")
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with torch.no_grad():
            ours, theirs = q(seqs).logits, hf(seqs).logits
            one_ours, one_theirs = q(seqs[:1, :3]).logits, hf(seqs[:1, :3]).logits  # the gemv path too
    finally:
        numba.set_num_threads(threads)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert torch.allclose(one_ours, one_theirs, atol=1e-4, rtol=1e-4)
    assert hf.config.tie_word_embeddings == base.config.tie_word_embeddings
    if base.config.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_scalar_models_cannot_be_exported_to_aqlm(tmp_path):
    base = tiny_model("llama", peaky=False)
    base.save_pretrained(tmp_path / "base")
    q = copy.deepcopy(base)
    calibrate(q, torch.randint(0, 256, (2, 16)), CalibrationConfig(fmt="int2g16", forward_batch_size=2, adam_v_iters=0, block_tune_steps=0), progress=False)
    with pytest.raises(ExportError, match="scalar layers cannot"):
        export_aqlm(q, tmp_path / "base", tmp_path / "hf")


@pytest.mark.parametrize("fmt", ["1x8g8", "2x8g8"])
def test_the_kernel_benchmark_hands_aqlms_kernels_our_layers_in_their_layout(fmt):
    """experiments.bench_kernels times AQLM's own kernels beside ours: on the CPU (its numba kernel) the
    converted layer gives our layer's output."""
    import numba
    import torch.nn.functional as F

    from experiments.bench_kernels import aqlm_kernel, random_layer
    from llm.formats import QuantFormat

    gen = torch.Generator().manual_seed(0)
    layer = random_layer(QuantFormat.parse(fmt), 64, 32, torch.float32, "cpu", gen)
    x = torch.randn(3, 64, generator=gen)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # aqlm 1.1.7's numba kernel races with several threads
    try:
        got = aqlm_kernel(layer)(x)
    finally:
        numba.set_num_threads(threads)
    assert torch.allclose(got, F.linear(x, layer.weight()), atol=1e-5)
