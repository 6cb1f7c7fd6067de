"""Greedy decoding with a static KV cache; on CUDA each one-token step replays a CUDA graph.

Decoding a quantized model is many small matrix-vector products (one per layer per token); at
batch 1 the launch overhead of ~10 kernels per layer is as large as the work, so the whole step is
captured once and replayed. The attention mask of a step is built inside the graph from the position
tensor, so replays need only two small copies (token, position).
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import Tensor, nn


def prepare_for_inference(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """eval mode, no gradients, and (optionally) every floating tensor in `dtype` (codebooks too)."""
    model.eval().requires_grad_(False)
    return model if dtype is None else model.to(dtype)


class GreedyDecoder:
    """Greedy generation from `batch_size` prompts of equal length with a cache of `max_len` positions.

    `cuda_graph` (default: on CUDA) captures the one-token step after a warm-up; `generate` then
    returns the prompts followed by the new tokens, and `last_seconds_per_token` the time of one
    decoding step (one new token for every prompt). `compile` runs the one-token steps through torch.compile
    (the quantized layers' kernels stay one opaque operator each; the norms, rotary embedding and
    element-wise work around them are fused)."""

    def __init__(self, model: nn.Module, max_len: int, cuda_graph: Optional[bool] = None, batch_size: int = 1,
                 compile: bool = False) -> None:
        from transformers.cache_utils import Cache, StaticLayer

        self.model, self.max_len, self.batch_size = model, max_len, batch_size
        self.device = next(model.parameters()).device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        # Full-length static layers for every block (also Mistral's sliding-window ones): the window,
        # if any, is applied by the mask, so no layer needs Python-side bookkeeping a graph would freeze.
        self.cache = Cache(layers=[StaticLayer(max_cache_len=max_len) for _ in range(model.config.num_hidden_layers)])
        self.window = getattr(model.config, "sliding_window", None)
        self.positions = torch.arange(max_len, device=self.device)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.next_token: Optional[Tensor] = None
        self.last_seconds_per_token = float("nan")
        # Only the one-token step is compiled: the prompt runs eagerly, so each decoder adds one entry to
        # torch.compile's cache of `_step` (shared by all decoders, and limited in size).
        self.forward = torch.compile(self._step, dynamic=False) if compile else self._step

    def _mask(self, query_positions: Tensor) -> Tensor:
        """Additive (1, 1, q, max_len) mask: a query sees the cache up to its position (and, with a
        sliding window w, only the last w positions)."""
        dtype = self.model.get_input_embeddings().weight.dtype
        q, k = query_positions.view(-1, 1), self.positions.view(1, -1)
        visible = k <= q
        if self.window:
            visible &= k > q - self.window
        mask = torch.zeros(visible.shape, dtype=dtype, device=self.device).masked_fill(~visible, torch.finfo(dtype).min)
        return mask.view(1, 1, *visible.shape)

    @torch.no_grad()
    def _step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """The argmax next token (B, 1) after tokens (B, q) at positions (q,), extending the cache."""
        logits = self.model(input_ids=tokens, position_ids=positions.view(1, -1).expand(tokens.shape[0], -1),
                            cache_position=positions,
                            attention_mask=self._mask(positions), past_key_values=self.cache,
                            use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def _capture(self, warmup_steps: int = 2) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup_steps):  # outside the graph: autotuning, lazy allocations
                self.forward(self.token, self.position)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.next_token = self.forward(self.token, self.position)
        for layer in self.cache.layers:  # undo the warm-up's appends to the cache
            layer.cumulative_length.sub_(warmup_steps)

    def _decode_one(self, token: Tensor, position: int) -> Tensor:
        self.token.copy_(token)
        self.position.fill_(position)
        if not self.cuda_graph:
            return self.forward(self.token, self.position)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.next_token.clone()

    @torch.no_grad()
    def generate(self, prompt: Tensor, new_tokens: int) -> Tensor:
        """prompts (B, P) -> (B, P + new_tokens), greedy."""
        if prompt.dim() != 2 or prompt.shape[0] != self.batch_size:
            raise ValueError(f"this GreedyDecoder takes prompts of shape ({self.batch_size}, P), got {tuple(prompt.shape)}")
        n = prompt.shape[1]
        if n + new_tokens > self.max_len:
            raise ValueError(f"prompt {n} + {new_tokens} new tokens exceed the cache of {self.max_len}")
        prompt = prompt.to(self.device)
        self.cache.reset()  # in place: a captured graph keeps pointing at the same buffers
        out = [self._step(prompt, self.positions[:n])]
        self._sync()
        t0 = time.perf_counter()
        for i in range(1, new_tokens):
            out.append(self._decode_one(out[-1], n + i - 1))
        self._sync()
        self.last_seconds_per_token = (time.perf_counter() - t0) / max(new_tokens - 1, 1)
        return torch.cat([prompt] + out, dim=1)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@torch.no_grad()
def greedy_reference(model: nn.Module, prompt: Tensor, new_tokens: int) -> Tensor:
    """Greedy generation by a full forward over the whole sequence at every step (no cache): the
    slow definition that GreedyDecoder must reproduce."""
    seq = prompt
    for _ in range(new_tokens):
        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq
