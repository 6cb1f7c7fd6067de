"""Tiny random Llama/Mistral models and corpora for the LLM tests (CPU, float32)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_TOKENIZER = SHARED / "models" / "ref-llama"


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = 256, peaky: bool = True, layers: int = 2, **config):
    """A random model of `layers` blocks; `peaky` scales the head so the teacher's distributions are not uniform;
    `config`: more of llm.model.tiny_config's arguments (hidden, heads, kv_heads, intermediate)."""
    from transformers import AutoModelForCausalLM

    from llm.model import tiny_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab=vocab, layers=layers, **config)).eval()
    if peaky:
        with torch.no_grad():
            model.lm_head.weight.mul_(25.0)
    return model


def tiny_model_dir(tmp_path: Path, arch: str = "llama") -> Path:
    """A tiny model saved as a Hugging Face directory with the reference tokenizer (8192 tokens)."""
    if not (REF_TOKENIZER / "tokenizer.json").exists():
        import pytest

        pytest.skip(f"needs the reference tokenizer at {REF_TOKENIZER} (../shared is absent)")
    d = tmp_path / f"tiny-{arch}"
    tiny_model(arch, vocab=8192).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REF_TOKENIZER / f, d / f)
    return d


def tiny_corpus(tmp_path: Path) -> tuple[Path, Path]:
    """Small train/validation text files (from the shared corpus when present)."""
    import lzma

    src = SHARED / "corpus"
    text = lzma.open(src / "validation.txt.xz", "rt").read(60_000) if (src / "validation.txt.xz").exists() else (
        "PV-Tuning alternates a P step and a V step. " * 2000)
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text(text[:40_000])
    val.write_text(text[40_000:])
    return train, val


def write_gguf(model, path: Path, vocab_tokens: Optional[list] = None, merges: Optional[list] = None) -> Path:
    """Write a Llama model to a GGUF file with float32 tensors (the `gguf` package's writer), named and
    laid out as llama.cpp writes them: q/k rows permuted for its rotary layout, no output.weight when the
    head is tied to the embeddings; a byte-level BPE vocabulary (`vocab_tokens`, `merges`)."""
    import gguf
    import numpy as np

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab_tokens)
    w.add_token_types([1] * len(vocab_tokens))
    w.add_token_scores([0.0] * len(vocab_tokens))
    w.add_token_merges(merges or [])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def permute(t, heads):  # llama.cpp's rotary layout of q and k rows
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = permute(t, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def byte_level_vocab() -> list:
    """The 256 byte-level BPE tokens (GPT-2's printable stand-ins for the bytes 0..255)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, map(chr, cs)))
    return [table[b] for b in range(256)]


# The settings every strategy had before strategies owned their settings (the official PV-Tuning code's: no momentum,
# the Euclidean metric, no warm-up, 1% of the groups per step): the tests below were written against them.
OFFICIAL_P_SETTINGS = dict(p_lr=1e-2, p_beta1=0.0, p_beta2=0.95, p_metric="euclidean", p_fraction=0.01, p_warmup=0,
                           p_select="update", p_memory=0.0)


def ft_config(strategy: str = "pv", settings: Optional[dict] = None, **loop):
    """A FinetuneConfig of `strategy` whose settings are OFFICIAL_P_SETTINGS (those the strategy has), then
    `settings`; `loop`: the loop's own fields (steps, batch_size, lr, ...)."""
    from llm.finetune import FinetuneConfig
    from llm.strategies import settings_for

    return FinetuneConfig(strategy=strategy, settings=settings_for(strategy, None, OFFICIAL_P_SETTINGS, settings),
                          **loop)
