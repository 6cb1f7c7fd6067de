"""GGUF models: transformers' own GGUF loader behind every command that takes a model."""
import pytest
import torch

from llm.model import ModelError, load_model, load_tokenizer, model_source, read_config
from llm_helpers import byte_level_vocab, write_gguf

pytest.importorskip("gguf", reason="GGUF models need the gguf package (pip install 'pvtuning[gguf]')")


def _tied_gqa_llama():
    """A tiny Llama with grouped-query attention (4 heads, 2 KV heads) and a head tied to its embeddings."""
    from transformers import AutoModelForCausalLM

    from llm.model import tiny_config

    cfg = tiny_config("llama", kv_heads=2, vocab=256)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Each test's own cache: the float32 copies of its GGUF files go there."""
    monkeypatch.setattr("llm.data.CACHE", tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture
def gguf_model(tmp_path):
    model = _tied_gqa_llama()
    path = write_gguf(model, tmp_path / "tiny.gguf", byte_level_vocab())
    return model, path


def test_gguf_model_gives_the_logits_of_the_model_it_was_written_from(gguf_model):
    model, path = gguf_model
    loaded = load_model(path)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert loaded.config.num_key_value_heads == 2
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    assert getattr(loaded.config, "quantization_config", None) is None  # a plain float model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_a_gguf_file_is_parsed_once_and_then_loaded_from_its_float32_copy(gguf_model, cache, monkeypatch):
    import llm.model as M

    _, path = gguf_model
    first = load_model(path)
    assert len(list(cache.glob("gguf-tiny-*/model.safetensors"))) == 1
    direct = M._tokenizer_from(path)
    monkeypatch.setattr(M, "_gguf_config", lambda model: pytest.fail("the GGUF file was parsed again"))
    monkeypatch.setattr(M, "_tokenizer_from", lambda model: pytest.fail("the GGUF file was parsed again"))
    again = load_model(path)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(again, ids), _logits(first, ids))
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    assert read_config(path)["num_key_value_heads"] == 2
    text = "PV-Tuning: the P step, then the V step.\n"
    assert load_tokenizer(path)(text)["input_ids"] == direct(text)["input_ids"]


def test_a_gguf_file_without_a_writable_cache_loads_as_before(gguf_model, tmp_path, monkeypatch):
    model, path = gguf_model
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setattr("llm.data.CACHE", blocked / "cache")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_logits(load_model(path), ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def test_with_no_room_for_the_copy_each_load_reads_the_gguf_once(gguf_model, cache, monkeypatch):
    import shutil
    from collections import namedtuple

    import llm.model as M

    model, path = gguf_model
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(10**6, 10**6, 100))
    reads = []
    real = M._from_pretrained
    monkeypatch.setattr(M, "_from_pretrained", lambda m, dtype: reads.append(m) or real(m, dtype))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        assert torch.allclose(_logits(load_model(path), ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    assert reads == [path, path] and not [p for p in cache.glob("gguf-*") if p.is_dir()]  # no copy written


@pytest.mark.parametrize("damaged", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_damaged_float32_copy_is_rebuilt_not_trusted(gguf_model, cache, damaged):
    model, path = gguf_model
    load_model(path)
    (file,) = cache.glob(f"gguf-tiny-*/{damaged}")
    file.write_bytes(b"damaged")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_logits(load_model(path), ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    tok = load_tokenizer(path)
    assert tok.decode(tok("PV-Tuning", add_special_tokens=False)["input_ids"]) == "PV-Tuning"
    load_model(path)  # written again
    assert file.read_bytes() != b"damaged"


def test_a_folder_holding_one_gguf_file_is_that_model(gguf_model):
    _, path = gguf_model
    assert model_source(path.parent) == (path.parent, path.name)
    assert read_config(path.parent)["num_hidden_layers"] == 2
    tok = load_tokenizer(path.parent)
    assert tok.decode(tok("PV-Tuning", add_special_tokens=False)["input_ids"]) == "PV-Tuning"


def test_a_folder_with_two_gguf_files_asks_for_the_file(gguf_model):
    _, path = gguf_model
    (path.parent / "other.gguf").write_bytes(path.read_bytes())
    with pytest.raises(ModelError, match="2 GGUF files"):
        model_source(path.parent)


def test_a_damaged_gguf_file_is_one_clear_error(tmp_path, gguf_model):
    _, path = gguf_model
    bad = tmp_path / "bad" / "cut.gguf"
    bad.parent.mkdir()
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelError, match="could not read the GGUF model"):
        read_config(bad)


def test_pipeline_on_a_gguf_model_keeps_the_head_tied_and_writes_continuations(tmp_path, gguf_model):
    from llm.checkpoint import load_checkpoint
    from llm.cli import main

    _, path = gguf_model
    text = "The P step changes codes; the V step changes codebooks. " * 400
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "val.txt").write_text(text[:4000])
    (tmp_path / "prompts.txt").write_text("The P step\n\nthe V step\n")
    out = tmp_path / "run"
    assert main([
        "pipeline", str(path), "--train", str(tmp_path / "train.txt"), "--validation", str(tmp_path / "val.txt"),
        "--out", str(out), "--format", "1x8g8", "--strategies", "pv,continuous", "--seq-len", "32",
        "--nsamples", "8", "--rounds", "1", "--block-tune-steps", "2", "--calib-batch-size", "4", "--steps", "3",
        "--ft-batch-size", "4", "--logit-chunk", "40", "--prompts", str(tmp_path / "prompts.txt"),
        "--new-tokens", "5", "--device", "cpu"]) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    texts = summary["continuations"]
    assert texts["prompts"] == ["The P step", "the V step"]
    assert all(len(texts[m]) == 2 for m in ("original", "calibrated", "pv", "continuous"))
    assert summary["runs"]["pv"]["seconds_per_step"] > 0
    model, meta, _ = load_checkpoint(out / "pv")
    assert meta["base_model"] == str(path.resolve())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_gguf_without_its_packages_is_one_clear_error(gguf_model, monkeypatch):
    import importlib.util

    import llm.model

    _, path = gguf_model
    real = importlib.util.find_spec
    monkeypatch.setattr(llm.model.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match=r"needs the package\(s\) gguf: pip install 'pvtuning\[gguf\]'"):
        read_config(path)


def test_linear_shapes_of_a_gguf_model_read_before_its_float32_copy_exists(gguf_model, cache):
    from llm.model import linear_shapes

    model, path = gguf_model
    assert not cache.exists() or not list(cache.glob("gguf-*"))  # the first read parses the GGUF file itself
    shapes = linear_shapes(path)
    layer = model.model.layers[0]
    assert shapes["model.layers.0.self_attn.k_proj"] == (layer.self_attn.k_proj.out_features, layer.self_attn.k_proj.in_features)
    assert len(shapes) == 7 * len(model.model.layers)
