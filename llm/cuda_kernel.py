"""CUDA kernel for one-token decoding with 8-bit codebooks and groups of 8 (1x8g8, 2x8g8), bf16.

The Triton kernel gathers codebook vectors through the L1 cache, about one per cycle per SM when a
warp's 32 lanes read 32 different lines. Here each thread block first copies the codebooks (M x 256
vectors of 8 bf16 = M x 4 KB) and the activations into shared memory; then every warp takes one
output row at a time, its lanes walk the row's input groups, read the codes (one 2-byte load gives
both codes of a 2x8 group), read the codebook vectors and activations as 16-byte shared-memory words,
and sum the products in float32; a warp shuffle reduces the row. Built with torch's JIT extension
loader on first use (nvcc and ninja needed); where it cannot be built, the Triton kernel is used.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>

template <int M>
__global__ void aqlm_gemv_k256_g8(const uint4* __restrict__ x, const uint8_t* __restrict__ codes,
                                  const uint4* __restrict__ codebooks, const __nv_bfloat16* __restrict__ scales,
                                  const __nv_bfloat16* __restrict__ bias, __nv_bfloat16* __restrict__ y,
                                  int N, int J, int rows_per_block) {
  extern __shared__ uint4 smem[];
  uint4* cb = smem;            // M * 256 codebook vectors
  uint4* xs = smem + M * 256;  // J activation groups
  for (int i = threadIdx.x; i < M * 256; i += blockDim.x) cb[i] = codebooks[i];
  for (int i = threadIdx.x; i < J; i += blockDim.x) xs[i] = x[i];
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int row_end = min((blockIdx.x + 1) * rows_per_block, N);
  for (int r = blockIdx.x * rows_per_block + warp; r < row_end; r += warps) {
    const uint8_t* rc = codes + (size_t)r * J * M;
    float acc = 0.f;
#pragma unroll 4
    for (int j = lane; j < J; j += 32) {
      uint4 w0, w1;
      if (M == 2) {
        const unsigned c = reinterpret_cast<const unsigned short*>(rc)[j];
        w0 = cb[c & 0xFF];
        w1 = cb[256 + (c >> 8)];
      } else {
        w0 = cb[rc[j]];
      }
      const uint4 xv = xs[j];
      const __nv_bfloat162* a = reinterpret_cast<const __nv_bfloat162*>(&w0);
      const __nv_bfloat162* b = reinterpret_cast<const __nv_bfloat162*>(&w1);
      const __nv_bfloat162* xx = reinterpret_cast<const __nv_bfloat162*>(&xv);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float2 w = __bfloat1622float2(a[k]);
        if (M == 2) {
          const float2 w2 = __bfloat1622float2(b[k]);
          w.x += w2.x;
          w.y += w2.y;
        }
        const float2 f = __bfloat1622float2(xx[k]);
        acc = fmaf(w.x, f.x, fmaf(w.y, f.y, acc));
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffff, acc, o);
    if (lane == 0) {
      float out = acc * __bfloat162float(scales[r]);
      if (bias != nullptr) out += __bfloat162float(bias[r]);
      y[r] = __float2bfloat16(out);
    }
  }
}

torch::Tensor aqlm_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor codebooks, torch::Tensor scales,
                        c10::optional<torch::Tensor> bias, int64_t rows_per_block, int64_t threads) {
  const int N = codes.size(0), J = codes.size(1), M = codes.size(2);
  auto y = torch::empty({N}, x.options());
  const int blocks = (N + rows_per_block - 1) / rows_per_block;
  const size_t smem = (size_t)(M * 256 + J) * sizeof(uint4);
  auto stream = at::cuda::getCurrentCUDAStream();
  const __nv_bfloat16* b = bias.has_value() ? reinterpret_cast<const __nv_bfloat16*>(bias->data_ptr()) : nullptr;
  auto launch = [&](auto kernel) {
    if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    kernel<<<blocks, threads, smem, stream>>>(
        reinterpret_cast<const uint4*>(x.data_ptr()), codes.data_ptr<uint8_t>(),
        reinterpret_cast<const uint4*>(codebooks.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(scales.data_ptr()),
        b, reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), N, J, (int)rows_per_block);
  };
  if (M == 2) launch(aqlm_gemv_k256_g8<2>); else launch(aqlm_gemv_k256_g8<1>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}
"""
_CPP = ("torch::Tensor aqlm_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor codebooks, torch::Tensor scales, "
        "c10::optional<torch::Tensor> bias, int64_t rows_per_block, int64_t threads);")

_module = None
_failed: Optional[str] = None
MAX_INPUTS = 16384  # activations + codebooks must fit in shared memory


def load() -> Optional[object]:
    """The compiled extension, building it on first call; None where it cannot be built
    (no nvcc, PVTUNING_CUDA_KERNEL=0); the reason is in `build_error()`."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    if os.environ.get("PVTUNING_CUDA_KERNEL", "1") == "0":
        _failed = "disabled by PVTUNING_CUDA_KERNEL=0"
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        _module = load_inline("pvtuning_aqlm_gemv", cpp_sources=_CPP, cuda_sources=_SOURCE, functions=["aqlm_gemv"],
                              extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as e:  # no compiler, wrong toolkit: fall back to Triton
        _failed = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return _module


def build_error() -> Optional[str]:
    return _failed


def supports(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor) -> bool:
    """One bf16 token, 1 or 2 codebooks of 256 vectors of 8, uint8 codes, at most MAX_INPUTS inputs."""
    M, K, G = codebooks.shape
    return (x.is_cuda and x.numel() == x.shape[-1] and x.shape[-1] <= MAX_INPUTS and K == 256 and G == 8
            and M in (1, 2) and codes.dtype == torch.uint8 and x.is_contiguous() and x.data_ptr() % 16 == 0
            and x.dtype == codebooks.dtype == scales.dtype == torch.bfloat16)


def aqlm_gemv(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
              rows_per_block: int = 16, threads: int = 256) -> Tensor:
    """x (..., in) with one token times the AQLM weight; the caller checks `supports` and `load`."""
    y = load().aqlm_gemv(x.reshape(-1).contiguous(), codes.contiguous(), codebooks.contiguous(), scales.contiguous(),
                         None if bias is None else bias.to(torch.bfloat16).contiguous(), rows_per_block, threads)
    return y.reshape(*x.shape[:-1], -1)
