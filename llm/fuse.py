"""One kernel launch for the quantized layers that read the same input, in decoding.

A decoder block multiplies one hidden state by q, k and v, and another by gate and up. Each product is a
launch whose fixed costs (filling the codebooks in shared memory, the latency chain of a split-K kernel)
are as large as its work at one token, and a larger launch spreads them over more weights
(docs/kernels.md). `fuse_shared_inputs(model)` stores each such set of AQLM layers side by side (codes
and scales concatenated by rows, codebooks stacked; each layer's tensors become views into them, so no
memory is added) and lets the first layer's forward multiply all of them in one launch (the `part_rows`
of `llm.cuda_kernel.aqlm_matmul`, or of the Triton kernel's where the CUDA kernel does not apply:
`llm.kernels.kernel_for_tensors`); the others return their slice of that output. Only decoding-sized
inference on the GPU takes this path; everything else (training, prefill, the CPU) runs each layer as
before on the same tensors. For inference only: the layers' tensors share
storage afterwards, so move, cast and save a model before fusing it (a model moved or cast afterwards runs
each layer alone again).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

QKV = ("q_proj", "k_proj", "v_proj")  # Llama / Mistral attention
GATE_UP = ("gate_proj", "up_proj")  # Llama / Mistral MLP
# Measured on an H200 (experiments/results/kernels/gpu_matvec_one_launch_*.json): one launch for q, k and v is
# 1.14-1.25x (2x8g8) and 2x (1x8g8) faster than three at the 7B shapes, 2.2-3.1x at SmolLM2's; for gate and up
# 1.2x (1x8g8, 7B), 1.6-1.9x (SmolLM2) and 0.94-0.96x at 1-4 tokens with 2x8g8 at the 7B shape, the one case where
# the launch loses the CUDA kernel's split of the input groups (loses_its_split), which fuse_shared_inputs skips.
SHARED_INPUTS = (QKV, GATE_UP)


class SharedInputGroup:
    """AQLM layers that multiply the same x, stored side by side: codes (sum of out, in/8, M), codebooks
    (layers, M, K, 8), scales (sum of out,), bias or None; `rows` the layers' output sizes."""

    def __init__(self, layers: list) -> None:
        self.layers = list(layers)
        self.rows = [layer.out_features for layer in layers]
        with torch.no_grad():
            self.codes = torch.cat([layer.codes for layer in layers])
            self.codebooks = torch.stack([layer.codebooks.detach() for layer in layers])
            self.scales = torch.cat([layer.scales.detach().reshape(-1) for layer in layers])
            biases = [layer.bias for layer in layers]
            self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        start = 0
        for i, layer in enumerate(layers):  # the layers' own tensors become views of the group's
            end = start + layer.out_features
            layer.codes = self.codes[start:end]
            layer.codebooks = nn.Parameter(self.codebooks[i], requires_grad=False)
            layer.scales = nn.Parameter(self.scales[start:end], requires_grad=False)
            if self.bias is not None:
                layer.bias = nn.Parameter(self.bias[start:end], requires_grad=False)
            layer.shared_input = self
            start = end
        self._x: Optional[Tensor] = None
        self._outputs: Optional[tuple] = None

    def output(self, layer, x: Tensor) -> Optional[Tensor]:
        """layer's output on x through one launch for the whole group (made when the first layer, or a
        layer given another input, asks), or None where the group's kernel does not apply to x."""
        from llm import kernels

        i = self.layers.index(layer)
        if i == 0 or self._x is not x:
            if x.device != self.codes.device or x.dtype != self.codebooks.dtype:
                return None  # the model was moved or cast after fusing: its layers no longer view these tensors
            y = kernels.matmul(x, self.codes, self.codebooks, self.scales, self.bias, self.rows)
            if y is None:
                return None
            self._x, self._outputs = x, y.split(self.rows, dim=-1)
        out = self._outputs[i]
        if i == len(self.layers) - 1:  # the last reader: let go of the input and outputs
            self._x = self._outputs = None
        return out


def fusable(layers: list) -> Optional[str]:
    """Why these layers cannot share a launch, or None: AQLM layers of one format and input size, at most
    MAX_PARTS of them, all with or all without a bias, on one device and dtype. (The CUDA kernel also needs
    256-entry codebooks and every layer but the last with a multiple of 128 rows; where it cannot, the
    shared launch is the Triton kernel's: llm.kernels.kernel_for_tensors.)"""
    from llm.formats import AQLMLinear
    from llm.cuda_kernel import MAX_PARTS

    if not all(isinstance(layer, AQLMLinear) for layer in layers):
        return "not all AQLM layers"
    first = layers[0]
    if len(layers) > MAX_PARTS:
        return f"more than {MAX_PARTS} layers"
    if any(layer.fmt != first.fmt or layer.in_features != first.in_features for layer in layers):
        return "different formats or input sizes"
    if len({layer.bias is None for layer in layers}) > 1:
        return "some with a bias, some without"
    if len({(layer.codebooks.device, layer.codebooks.dtype) for layer in layers}) > 1:
        return "on different devices or dtypes"
    return None


def loses_its_split(rows: list, n_groups: int, slots: float) -> bool:
    """Whether the CUDA kernel would split the input groups of each of these layers (rows: their output
    sizes) at one token but not of all of them in one launch: its split fills one wave of `slots` blocks,
    and a launch whose row blocks alone nearly fill it runs one block per row block, each walking every
    input group (gate and up of the 7B shape in 2x8g8: 172 row blocks on 264 slots, 0.94x of two launches)."""
    from llm.cuda_kernel import split_plan

    def splits(n_out: int) -> int:
        return split_plan(n_out, n_groups, 1, slots)[0]

    return splits(sum(rows)) == 1 < min(splits(r) for r in rows)


def _one_launch_pays(layers: list) -> bool:
    """False where the layers' shared launch would be the CUDA kernel's and lose its split (loses_its_split)."""
    from llm import cuda_kernel

    books = layers[0].codebooks
    if books.device.type != "cuda" or books.shape[-2] != 256:  # CPU: each layer runs alone; else Triton's launch
        return True
    slots = cuda_kernel.wave_slots(books.device, cuda_kernel.split_target(books.shape[0], 256))
    return not loses_its_split([layer.out_features for layer in layers], layers[0].codes.shape[1], slots)


def fuse_shared_inputs(model: nn.Module, names=SHARED_INPUTS) -> int:
    """Give each set of a module's AQLM children that read the same input (`names`: q/k/v and gate/up by
    default) one launch in decoding, except where one launch would be slower than one per layer on this
    GPU (loses_its_split); returns how many sets were fused. Inference only (see the module's docstring)."""
    fused = 0
    for module in model.modules():
        for group in names:
            layers = [getattr(module, n, None) for n in group]
            if any(layer is None for layer in layers) or getattr(layers[0], "shared_input", None) is not None:
                continue
            if fusable(layers) is None and _one_launch_pays(layers):
                SharedInputGroup(layers)
                fused += 1
    return fused
