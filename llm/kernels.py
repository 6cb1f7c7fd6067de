"""Which matmul an AQLM layer's forward uses.

Inference on at most MAX_TOKENS tokens (decoding) skips the dense weight. On CUDA: a tensor-core CUDA
kernel for 1 to 16 bf16 tokens of groups of 8 with 8- or 16-bit codes (1x8g8, 2x8g8, 1x16g8, ...;
`llm.cuda_kernel`, where it builds), the Triton kernel otherwise (`llm.triton_kernel`). On the CPU:
lookup tables for codebooks of <= 256 entries (`llm.lut_kernel`; for small layers only at one token,
where they beat decoding: experiments/results/kernels/cpu_matvec.json).
Everything else (training, where autograd needs the decoded weight; prefill and evaluation, where
many tokens make the dense product cheap per token) decodes W and calls F.linear.
`set_enabled(False)` or PVTUNING_KERNELS=0 forces the reference path everywhere.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

MAX_TOKENS = 16
LUT_MIN_WEIGHTS = 1 << 22  # CPU: below this many weights, lookup tables beat decoding only for one token
# GPU, one token: the Triton kernel wins on layers of < 1M weights (SmolLM2's, 2.6-5.1 us against 4.2-6 us)
# and with 65536-entry codebooks (1x16g8, both gather from L2); the CUDA kernel wins from 16.7M weights
# (Llama-2-7B's) and at 2-16 tokens everywhere (experiments/results/kernels/gpu_matvec*.json). The
# threshold sits between the measured sizes.
CUDA_MIN_WEIGHTS_ONE_TOKEN = 1 << 22
_enabled = os.environ.get("PVTUNING_KERNELS", "1") != "0"
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_HAS_NUMBA = importlib.util.find_spec("numba") is not None


def set_enabled(on: bool) -> None:
    """Turn the fast paths on or off (off: every forward decodes the dense weight)."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


def kernel_for(layer, x: Tensor) -> Optional[str]:
    """'cuda', 'triton', 'lut' or None (reference) for this layer's forward on x."""
    if not _enabled or layer.capture_weight_grad:
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in layer.continuous_parameters()):
        return None
    tokens = x.numel() // max(x.shape[-1], 1)
    if tokens > MAX_TOKENS:
        return None
    if x.is_cuda:
        from llm import cuda_kernel

        one_token_triton = tokens == 1 and (layer.fmt.bits > 8 or layer.in_features * layer.out_features
                                            < CUDA_MIN_WEIGHTS_ONE_TOKEN)
        if (not (one_token_triton and _HAS_TRITON) and cuda_kernel.supports(x, layer.codes, layer.codebooks, layer.scales)
                and cuda_kernel.load() is not None):
            return "cuda"
        return "triton" if _HAS_TRITON else None
    big = layer.in_features * layer.out_features >= LUT_MIN_WEIGHTS
    if x.device.type == "cpu" and _HAS_NUMBA and layer.fmt.bits <= 8 and (tokens == 1 or big):
        return "lut"
    return None


def aqlm_forward(layer, x: Tensor) -> Optional[Tensor]:
    """The layer's output through a kernel, or None where the reference path applies."""
    kind = kernel_for(layer, x)
    if kind == "cuda":
        from llm import cuda_kernel
        return cuda_kernel.aqlm_matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias)
    if kind == "triton":
        from llm.triton_kernel import aqlm_matmul
        return aqlm_matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias)
    if kind == "lut":
        from llm.lut_kernel import aqlm_matmul_lut
        return aqlm_matmul_lut(x, layer.codes, layer.codebooks, layer.scales, layer.bias)
    return None
