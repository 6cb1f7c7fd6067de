"""Which matmul an AQLM layer's forward uses.

Inference on at most MAX_TOKENS tokens (decoding) skips the dense weight. On CUDA: a tensor-core CUDA
kernel for 1 to 16 bf16 tokens of groups of 8 with 8- or 16-bit codes (1x8g8, 2x8g8, 1x16g8, ...;
`llm.cuda_kernel`, where it builds), the Triton kernel otherwise (`llm.triton_kernel`). On the CPU:
lookup tables for codebooks of <= 256 entries (`llm.lut_kernel`; for small layers only at one token,
where they beat decoding: experiments/results/kernels/cpu_matvec.json). Layers that read the same input
(llm.fuse) may share one launch of a GPU kernel (`part_rows`).
Everything else (training, where autograd needs the decoded weight; prefill and evaluation, where
many tokens make the dense product cheap per token) decodes W and calls F.linear.
`set_enabled(False)` or PVTUNING_KERNELS=0 forces the reference path everywhere.
"""
from __future__ import annotations

import importlib.util
import os
from typing import List, Optional

import torch
from torch import Tensor

from pvtheory.codes import decode

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
    if not _wants_kernel(layer, x):
        return None
    return kernel_for_tensors(x, layer.codes, layer.codebooks, layer.scales)


def _wants_kernel(layer, x: Tensor) -> bool:
    """Inference (no gradient to the layer) on at most MAX_TOKENS tokens, kernels on: known from shapes alone."""
    if not _enabled or layer.capture_weight_grad:
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in layer.continuous_parameters()):
        return False
    return x.numel() // max(x.shape[-1], 1) <= MAX_TOKENS


def kernel_for_tensors(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor,
                       part_rows: Optional[List[int]] = None) -> Optional[str]:
    """The kernel for x times the weight that codes (out, in/g, M), codebooks (M, K, g) and scales give.
    part_rows: several layers in one launch (llm.fuse; codebooks (layers, M, K, g)): the CUDA kernel also
    needs every layer but the last to fill whole 128-row blocks, and no CPU kernel takes them."""
    tokens = x.numel() // max(x.shape[-1], 1)
    bits = codebooks.shape[-2].bit_length() - 1
    weights = x.shape[-1] * codes.shape[0]
    if x.is_cuda:
        from llm import cuda_kernel

        one_token_triton = tokens == 1 and (bits > 8 or weights < CUDA_MIN_WEIGHTS_ONE_TOKEN)
        whole_blocks = part_rows is None or cuda_kernel.whole_row_blocks(part_rows)
        if (not (one_token_triton and _HAS_TRITON) and whole_blocks and cuda_kernel.supports(x, codes, codebooks, scales)
                and cuda_kernel.load() is not None):
            return "cuda"
        return "triton" if _HAS_TRITON else None
    if (part_rows is None and x.device.type == "cpu" and _HAS_NUMBA and bits <= 8
            and (tokens == 1 or weights >= LUT_MIN_WEIGHTS)):
        return "lut"
    return None


def _run(kind: str, x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor],
         part_rows: Optional[List[int]] = None) -> Tensor:
    if kind == "cuda":
        from llm import cuda_kernel
        return cuda_kernel.aqlm_matmul(x, codes, codebooks, scales, bias, part_rows=part_rows)
    if kind == "triton":
        from llm.triton_kernel import aqlm_matmul
        return aqlm_matmul(x, codes, codebooks, scales, bias, part_rows=part_rows)
    from llm.lut_kernel import aqlm_matmul_lut
    return aqlm_matmul_lut(x, codes, codebooks, scales, bias)


def reference_matmul(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor],
                     part_rows: Optional[List[int]] = None) -> Tensor:
    """Decode W, then F.linear; with part_rows, codebooks (layers, M, K, g) and each layer's rows
    decoded with its own."""
    rows = part_rows if part_rows is not None else [codes.shape[0]]
    books = codebooks if codebooks.dim() == 4 else codebooks.unsqueeze(0)
    M, K, _ = books.shape[1:]
    Ws = []
    for c, b, s in zip(codes.split(rows), books, scales.reshape(-1).split(rows)):
        idx = (c.long() & (K - 1)).reshape(-1, M)  # 16-bit codes are stored wrapped in int16
        Ws.append(decode(idx, b, (c.shape[0], x.shape[-1]), s))
    W = torch.cat(Ws)
    return torch.nn.functional.linear(x, W.to(x.dtype), None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("pvtuning::aqlm_matmul", mutates_args=())
def compiled_matmul(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor],
                    part_rows: Optional[List[int]] = None) -> Tensor:
    """The kernel path as one operator that torch.compile leaves opaque (the kernel is chosen when it
    runs); where no kernel applies, the reference product. part_rows: several layers in one launch."""
    kind = kernel_for_tensors(x, codes, codebooks, scales, part_rows)
    if kind is not None:
        return _run(kind, x, codes, codebooks, scales, bias, part_rows)
    return reference_matmul(x, codes, codebooks, scales, bias, part_rows)


@compiled_matmul.register_fake
def _(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor],
      part_rows: Optional[List[int]] = None) -> Tensor:
    return x.new_empty(*x.shape[:-1], codes.shape[0])


def matmul(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor],
           part_rows: Optional[List[int]] = None) -> Optional[Tensor]:
    """x times the weight through the kernel that applies (part_rows: several layers' outputs side by side
    from one launch), or None where none does. Under torch.compile, one opaque operator that picks the
    kernel when it runs (`compiled_matmul`)."""
    if torch.compiler.is_compiling():
        return compiled_matmul(x, codes, codebooks, scales, bias, part_rows)
    kind = kernel_for_tensors(x, codes, codebooks, scales, part_rows)
    return None if kind is None else _run(kind, x, codes, codebooks, scales, bias, part_rows)


def aqlm_forward(layer, x: Tensor) -> Optional[Tensor]:
    """The layer's output through a kernel, or None where the reference path applies. Under
    torch.compile, one opaque operator (`compiled_matmul`) that the rest of the graph fuses around."""
    if not _wants_kernel(layer, x):
        return None
    if getattr(layer, "shared_input", None) is not None:  # one launch for the layers that read x (llm.fuse)
        y = layer.shared_input.output(layer, x)
        if y is not None:
            return y
    return matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias)
