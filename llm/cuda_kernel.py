"""CUDA kernel for decoding (1 to 16 bf16 tokens) with groups of 8: y = x W' + b, W never formed.

W[o, j*8:(j+1)*8] = scales[o] * sum_m codebooks[m, codes[o, j, m]]. The cost of such a kernel is the
gathers of codebook vectors, not the bytes of codes it reads, so the kernel is built around them:

- Codebooks of 256 entries (1x8g8, 2x8g8) live in shared memory, each entry stored 8 times side by
  side; lane l reads copy l % 8, so the 8 lanes of a quarter-warp that serve one 16-byte load hit 8
  different bank groups whatever codes they read: no bank conflicts. Codebooks of 65536 entries
  (1x16g8: 1 MB) are read from global memory through the caches (they stay in L2).
- The multiply-adds run on tensor cores (mma m16n8k16, bf16 in, float32 accumulators). A warp owns
  16 output rows; in a super-slab of 32 input groups, lane (g, t) = (lane / 4, lane % 4) reads the
  codes of rows g and g + 8 for groups 8t..8t+7 in one vector load, decodes one group of each row
  per step (the sum of M codebook vectors) straight into the A fragment, and the activations of the
  same group for token g into the B fragment. The order of the 16 products inside an mma is free,
  so each group's 8 weights fill the slots lane (g, t) owns in two consecutive mmas; the same
  permutation is applied to the activations, staged once per block in shared memory in that order.
  Up to 8 tokens cost one mma pair per group pair, up to 16 two: the decoded weights serve every token.
- Row blocks of 128 rows (8 warps) rarely fill the GPU alone, so the input groups are split into
  chunks (split-K); each block writes float32 partial sums, and the last block of a row block to
  finish (an atomic counter) adds the partials in chunk order (deterministic), applies scale and
  bias and writes bf16. The counters reset themselves; the workspace is reused by every call on
  the device (one stream at a time).
- On compute capability 9.0+ the kernel is launched as a programmatic dependent: it fills its
  shared-memory codebooks and loads its first codes (weights, which no earlier kernel writes) while
  the kernel before it finishes, and waits for that kernel before it touches activations or outputs.

Built with torch's JIT extension loader on first use (nvcc and ninja needed); where it cannot be
built, `llm.kernels` falls back to the Triton kernel.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <tuple>

#ifndef MIN_BLOCKS
#define MIN_BLOCKS 0                // blocks per SM the register budget must allow; 0: min_blocks() per kernel
#endif
constexpr int WARPS = 8;            // warps per block, 16 output rows each
constexpr int BLOCK_ROWS = WARPS * 16;
// Layers that read the same input (q, k, v; gate, up) may be multiplied in one launch: their codes and
// scales concatenated by rows, their codebooks stacked. end[p] is the last row + 1 of layer p; every
// layer but the last has a multiple of BLOCK_ROWS rows, so a row block reads one layer's codebooks.
// 256-entry codebooks only (the 65536-entry ones are read through L2, one layer per launch).
constexpr int MAX_PARTS = 4;
struct Parts { int count; int end[MAX_PARTS]; };

__device__ __forceinline__ uint32_t add_bf16x2(uint32_t a, uint32_t b) {
  __nv_bfloat162 r = __hadd2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}

// c += A (16x16, rows g and g+8 of this lane) * B (16x8, tokens), bf16 inputs, float32 accumulators
__device__ __forceinline__ void mma_bf16(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The codes of one row for 8 consecutive groups (M codes of KBITS bits each), as 32-bit words.
template <int M, int KBITS>
struct RowCodes {
  static constexpr int WORDS = M * KBITS / 4;
  uint32_t w[WORDS];
  __device__ __forceinline__ void load(const uint8_t* p, bool ok) {
    if (!ok) {
#pragma unroll
      for (int i = 0; i < WORDS; ++i) w[i] = 0;
    } else if constexpr (WORDS == 2) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = v.x; w[1] = v.y;
    } else {
#pragma unroll
      for (int i = 0; i < WORDS / 4; ++i) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + i);
        w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
      }
    }
  }
  __device__ __forceinline__ uint32_t code(int s, int m) const {  // s, m known at compile time
    const int e = s * M + m;
    if constexpr (KBITS == 8) return (w[e >> 2] >> (8 * (e & 3))) & 0xFFu;
    else return (w[e >> 1] >> (16 * (e & 1))) & 0xFFFFu;
  }
};

// The unscaled weights of one group: the sum of its M codebook vectors, 8 bf16 in a uint4.
template <int M, int KBITS>
__device__ __forceinline__ uint4 decode(const RowCodes<M, KBITS>& c, int s, const uint4* cb_shared,
                                        const uint4* cb_global, int copy) {
  uint4 r;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const uint32_t k = c.code(s, m);
    const uint4 v = KBITS == 8 ? cb_shared[((m * 256 + k) << 3) + copy] : __ldg(cb_global + ((size_t)m << KBITS) + k);
    if (m == 0) {
      r = v;
    } else {
      r.x = add_bf16x2(r.x, v.x); r.y = add_bf16x2(r.y, v.y); r.z = add_bf16x2(r.z, v.z); r.w = add_bf16x2(r.w, v.w);
    }
  }
  return r;
}

// Programmatic dependent launch (Hopper): launched with the attribute, a kernel may start while the kernel
// before it on the stream finishes; it must wait before reading what that kernel wrote or writing what it
// reads. Only the weights (codes, codebooks) are read before the wait. Without the attribute both are no-ops.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void let_next_kernel_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// At 3 blocks per SM (80 registers) the two-codebook kernel spills in its main loop; at 2 it spills nothing.
constexpr int min_blocks(int M, int KBITS) { return MIN_BLOCKS > 0 ? MIN_BLOCKS : (M == 2 && KBITS == 8 ? 2 : 3); }

template <int M, int KBITS, int NT>
__global__ void __launch_bounds__(WARPS * 32, min_blocks(M, KBITS)) aqlm_mma_kernel(
    const uint4* __restrict__ x, const uint8_t* __restrict__ codes, const uint4* __restrict__ codebooks,
    const __nv_bfloat16* __restrict__ scales, const __nv_bfloat16* __restrict__ bias, __nv_bfloat16* __restrict__ y,
    float* __restrict__ partial, int* __restrict__ counters, int N, int J, int T, int chunk_slabs, Parts parts) {
  constexpr int CB_SLOTS = KBITS == 8 ? M * 256 * 8 : 0;  // replicated codebooks, 16-byte slots
  constexpr int ROW_BYTES_PER_GROUP = M * KBITS / 8;
  extern __shared__ uint4 smem[];
  uint4* cb = smem;
  uint4* xs = smem + CB_SLOTS;
  __shared__ int is_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int splits = gridDim.y, chunk = blockIdx.y;
  const int slab0 = chunk * chunk_slabs;
  const int nslabs = min(chunk_slabs, (J + 31) / 32 - slab0);

  const int row_a = blockIdx.x * BLOCK_ROWS + warp * 16 + g, row_b = row_a + 8;
  if constexpr (KBITS == 8) {  // the codebooks of this row block's layer (one launch for several layers)
    int part = 0;
#pragma unroll
    for (int p = 0; p + 1 < MAX_PARTS; ++p) part += p + 1 < parts.count && (int)(blockIdx.x * BLOCK_ROWS) >= parts.end[p];
    codebooks += (size_t)part * M * 256;
  }
  const size_t row_bytes = (size_t)J * ROW_BYTES_PER_GROUP;
  const uint8_t* codes_a = codes + (size_t)row_a * row_bytes;
  const uint8_t* codes_b = codes + (size_t)row_b * row_bytes;
  RowCodes<M, KBITS> ca, cb_, na, nb;
  auto load = [&](RowCodes<M, KBITS>& a, RowCodes<M, KBITS>& b, int slab) {
    const int j = slab * 32 + 8 * t;  // J is a multiple of 8: the 8 groups are all in range or all out
    const size_t off = (size_t)j * ROW_BYTES_PER_GROUP;
    a.load(codes_a + off, j < J && row_a < N);
    b.load(codes_b + off, j < J && row_b < N);
  };
  load(ca, cb_, slab0);  // in flight while shared memory fills

  // Every load of a thread is issued before its first store: one memory latency per fill, not one per entry.
  if constexpr (KBITS == 8) {
    constexpr int PER_THREAD = (M * 256 + WARPS * 32 - 1) / (WARPS * 32);
    uint4 v[PER_THREAD];
#pragma unroll
    for (int p = 0; p < PER_THREAD; ++p) {
      const int e = tid + p * WARPS * 32;
      if (e < M * 256) v[p] = codebooks[e];
    }
#pragma unroll
    for (int p = 0; p < PER_THREAD; ++p) {
      const int e = tid + p * WARPS * 32;
      if (e < M * 256)
#pragma unroll
        for (int c = 0; c < 8; ++c) cb[(e << 3) + ((c + tid) & 7)] = v[p];  // rotated: conflict-free stores
    }
  }
  wait_for_previous_kernel();  // x, y, partial and counters may belong to the kernel before
  // activations of this chunk in the order the B fragments read them: slot ((slab*8 + s)*T + n)*4 + t
  // holds group slab*32 + 8t + s of token n (lanes of one load read consecutive slots)
  constexpr int X_BATCH = 4;
  for (int i0 = tid; i0 < T * nslabs * 32; i0 += X_BATCH * WARPS * 32) {
    uint4 v[X_BATCH];
#pragma unroll
    for (int b = 0; b < X_BATCH; ++b) {
      const int i = i0 + b * WARPS * 32;
      const int s = (i >> 2) & 7, rest = i >> 5, slab = rest % nslabs, n = rest / nslabs;
      const int j = (slab0 + slab) * 32 + (i & 3) * 8 + s;
      v[b] = i < T * nslabs * 32 && j < J ? x[(size_t)n * J + j] : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int b = 0; b < X_BATCH; ++b) {
      const int i = i0 + b * WARPS * 32;
      const int s = (i >> 2) & 7, rest = i >> 5, slab = rest % nslabs, n = rest / nslabs;
      if (i < T * nslabs * 32) xs[((slab * 8 + s) * T + n) * 4 + (i & 3)] = v[b];
    }
  }
  __syncthreads();

  // two accumulator sets (even and odd steps) halve the chain of dependent mmas
  float acc[2][NT][4];
#pragma unroll
  for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[u][nt][0] = acc[u][nt][1] = acc[u][nt][2] = acc[u][nt][3] = 0.f;
  for (int sl = 0; sl < nslabs; ++sl) {
    if (sl + 1 < nslabs) load(na, nb, slab0 + sl + 1);  // the next codes are in flight while these are used
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const uint4 wa = decode<M, KBITS>(ca, s, cb, codebooks, lane & 7);
      const uint4 wb = decode<M, KBITS>(cb_, s, cb, codebooks, lane & 7);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int n = g + 8 * nt;
        const uint4 xv = n < T ? xs[((sl * 8 + s) * T + n) * 4 + t] : make_uint4(0, 0, 0, 0);
        mma_bf16(acc[s & 1][nt], wa.x, wb.x, wa.y, wb.y, xv.x, xv.y);  // weights 0-3 of the group
        mma_bf16(acc[s & 1][nt], wa.z, wb.z, wa.w, wb.w, xv.z, xv.w);  // weights 4-7
      }
    }
    ca = na;
    cb_ = nb;
  }
  let_next_kernel_start();  // the next kernel's blocks may now fill their codebooks while these finish

  // acc[.][nt][2h + q]: row (h ? row_b : row_a), token 8nt + 2t + q
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int token = 8 * nt + 2 * t + q, row = h ? row_b : row_a;
        if (token >= T || row >= N) continue;
        const float v = acc[0][nt][2 * h + q] + acc[1][nt][2 * h + q];
        if (splits == 1) {
          float out = v * __bfloat162float(scales[row]);
          if (bias != nullptr) out += __bfloat162float(bias[row]);
          y[(size_t)token * N + row] = __float2bfloat16(out);
        } else {
          partial[((size_t)chunk * T + token) * N + row] = v;
        }
      }
  if (splits == 1) return;

  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(counters + blockIdx.x, 1) == splits - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = tid; i < T * BLOCK_ROWS; i += blockDim.x) {
    const int token = i / BLOCK_ROWS, row = blockIdx.x * BLOCK_ROWS + i % BLOCK_ROWS;
    if (row >= N) continue;
    float v = 0.f;
    for (int c = 0; c < splits; ++c) v += __ldcg(partial + ((size_t)c * T + token) * N + row);
    float out = v * __bfloat162float(scales[row]);
    if (bias != nullptr) out += __bfloat162float(bias[row]);
    y[(size_t)token * N + row] = __float2bfloat16(out);
  }
  if (tid == 0) counters[blockIdx.x] = 0;
}

template <int M, int KBITS, int NT>
void launch(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& codebooks,
            const torch::Tensor& scales, const __nv_bfloat16* bias, torch::Tensor& y, torch::Tensor& partial,
            torch::Tensor& counters, int splits, int chunk_slabs, const Parts& parts, bool pdl) {
  const int T = x.size(0), N = codes.size(0), J = codes.size(1);
  const int cb_slots = KBITS == 8 ? M * 256 * 8 : 0;
  const size_t smem = (size_t)(cb_slots + chunk_slabs * 32 * T) * 16;
  auto kernel = aqlm_mma_kernel<M, KBITS, NT>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);  // may exceed the default 48 KB
  const dim3 grid((N + BLOCK_ROWS - 1) / BLOCK_ROWS, splits), block(WARPS * 32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto args = std::make_tuple(
      reinterpret_cast<const uint4*>(x.data_ptr()), reinterpret_cast<const uint8_t*>(codes.data_ptr()),
      reinterpret_cast<const uint4*>(codebooks.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(scales.data_ptr()),
      bias, reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), partial.data_ptr<float>(), counters.data_ptr<int>(),
      N, J, T, chunk_slabs, parts);
#if CUDART_VERSION >= 12000
  if (pdl) {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    std::apply([&](auto... a) { cudaLaunchKernelEx(&config, kernel, a...); }, args);
    return;
  }
#endif
  std::apply([&](auto... a) { kernel<<<grid, block, smem, stream>>>(a...); }, args);
}

torch::Tensor aqlm_mma(torch::Tensor x, torch::Tensor codes, torch::Tensor codebooks, torch::Tensor scales,
                       c10::optional<torch::Tensor> bias, torch::Tensor partial, torch::Tensor counters,
                       int64_t splits, int64_t chunk_slabs, std::vector<int64_t> part_rows, bool pdl) {
  const int T = x.size(0), N = codes.size(0), M = codes.size(2), K = codebooks.size(codebooks.dim() - 2);
  TORCH_CHECK(!part_rows.empty() && part_rows.size() <= MAX_PARTS, "1 to ", MAX_PARTS, " layers per launch");
  Parts parts{(int)part_rows.size(), {0, 0, 0, 0}};
  for (size_t p = 0, end = 0; p < part_rows.size(); ++p) parts.end[p] = (int)(end += part_rows[p]);
  TORCH_CHECK(parts.end[parts.count - 1] == N, "the layers' rows must add up to the codes' rows");
  auto y = torch::empty({T, N}, x.options());
  const __nv_bfloat16* b = bias.has_value() ? reinterpret_cast<const __nv_bfloat16*>(bias->data_ptr()) : nullptr;
  const bool two = T > 8;
#define AQLM_LAUNCH(M_, KB_) \
  (two ? launch<M_, KB_, 2>(x, codes, codebooks, scales, b, y, partial, counters, splits, chunk_slabs, parts, pdl) \
       : launch<M_, KB_, 1>(x, codes, codebooks, scales, b, y, partial, counters, splits, chunk_slabs, parts, pdl))
  if (K == 256) {
    if (M == 1) AQLM_LAUNCH(1, 8); else AQLM_LAUNCH(2, 8);
  } else {
    if (M == 1) AQLM_LAUNCH(1, 16); else AQLM_LAUNCH(2, 16);
  }
#undef AQLM_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}
"""
_CPP = ("torch::Tensor aqlm_mma(torch::Tensor x, torch::Tensor codes, torch::Tensor codebooks, torch::Tensor scales, "
        "c10::optional<torch::Tensor> bias, torch::Tensor partial, torch::Tensor counters, int64_t splits, "
        "int64_t chunk_slabs, std::vector<int64_t> part_rows, bool pdl);")

MAX_TOKENS = 16
BLOCK_ROWS = 128
MAX_PARTS = 4  # layers multiplied in one launch at most
SLAB_GROUPS = 32
# Blocks resident per SM: each kernel's register budget is set for it at build time and the split aims for one
# wave of it. At 3 (80 registers) the 2x8g8 main loop spills 72 bytes a thread; at 2 (116-125 registers) it
# spills none and runs 1.12-1.29x faster on an H200; the one-codebook kernels are as fast at either (their
# measured budget, 3, stays). PVTUNING_CUDA_BLOCKS_PER_SM sets one value for every kernel.
_BLOCKS_PER_SM_ENV = os.environ.get("PVTUNING_CUDA_BLOCKS_PER_SM")
BLOCKS_PER_SM_OVERRIDE: Optional[int] = int(_BLOCKS_PER_SM_ENV) if _BLOCKS_PER_SM_ENV else None
# Programmatic dependent launch (compute capability 9.0+, e.g. Hopper): a layer's kernel fills its codebooks
# and loads its first codes while the kernel before it finishes; 5-18% less time per call back to back on an
# H200 (docs/kernels.md). PVTUNING_CUDA_PDL=0 turns it off.
PDL = os.environ.get("PVTUNING_CUDA_PDL", "1") == "1"


def blocks_per_sm_for(num_codebooks: int, codebook_size: int) -> int:
    """The blocks per SM the kernel for M codebooks of K entries is built for (min_blocks in the source)."""
    if BLOCKS_PER_SM_OVERRIDE is not None:
        return BLOCKS_PER_SM_OVERRIDE
    return 2 if (num_codebooks, codebook_size) == (2, 256) else 3


def split_target(num_codebooks: int, codebook_size: int, blocks_per_sm: Optional[float] = None) -> float:
    """The blocks per SM the split aims for: `blocks_per_sm` if given, else what the kernel is built for."""
    return blocks_per_sm if blocks_per_sm is not None else blocks_per_sm_for(num_codebooks, codebook_size)


X_SHARED_BYTES = 48 * 1024  # activations staged per block at most

_module = None
_failed: Optional[str] = None
_workspace: dict = {}
_outgrown: list = []  # workspaces replaced by larger ones, kept: a captured CUDA graph may still point at them
_properties: dict = {}  # device index -> torch.cuda.get_device_properties, read once


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

        n = BLOCKS_PER_SM_OVERRIDE or 0
        _module = load_inline(f"pvtuning_aqlm_mma_b{n}", cpp_sources=_CPP, cuda_sources=_SOURCE,
                              functions=["aqlm_mma"], extra_cuda_cflags=["-O3", f"-DMIN_BLOCKS={n}"],
                              verbose=False)
    except Exception as e:  # no compiler, wrong toolkit: fall back to Triton
        _failed = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return _module


def build_error() -> Optional[str]:
    return _failed


def supports(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor) -> bool:
    """1 to 16 bf16 tokens; 1 or 2 codebooks of 256 (uint8 codes) or 65536 (int16 codes) vectors of 8;
    inputs a multiple of 64; contiguous, 16-byte aligned tensors. Codebooks (M, K, 8) for one layer, or
    (layers, M, K, 8) with 256 entries for several (`aqlm_matmul`'s part_rows)."""
    if codebooks.dim() == 4 and (codebooks.shape[0] > MAX_PARTS or codebooks.shape[2] != 256):
        return False
    M, K, G = codebooks.shape[-3:]
    n_in = x.shape[-1]
    tokens = x.numel() // max(n_in, 1)
    code_dtype = {256: torch.uint8, 65536: torch.int16}.get(K)
    return (x.is_cuda and 1 <= tokens <= MAX_TOKENS and G == 8 and M in (1, 2) and codes.dtype == code_dtype
            and n_in % 64 == 0 and codes.shape[1] * G == n_in and x.is_contiguous() and codes.is_contiguous()
            and codebooks.is_contiguous() and x.data_ptr() % 16 == 0 and codes.data_ptr() % 16 == 0
            and codebooks.data_ptr() % 16 == 0 and x.dtype == codebooks.dtype == scales.dtype == torch.bfloat16)


def programmatic_dependent_launch(device: torch.device) -> bool:
    """Whether the kernel launches on `device` as a programmatic dependent: asked for (PDL) and supported."""
    return PDL and _device_properties(device).major >= 9


def _device_properties(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _properties:
        _properties[index] = torch.cuda.get_device_properties(index)
    return _properties[index]


def wave_slots(device: torch.device, blocks_per_sm: float) -> float:
    """The blocks one wave holds on `device`: blocks per SM x its SMs (split_plan's `slots`)."""
    return blocks_per_sm * _device_properties(device).multi_processor_count


def plan(n_out: int, n_groups: int, tokens: int, device: torch.device, blocks_per_sm: float) -> tuple:
    """(splits, chunk_slabs) for a launch on `device` (split_plan with its SMs)."""
    return split_plan(n_out, n_groups, tokens, wave_slots(device, blocks_per_sm))


def split_plan(n_out: int, n_groups: int, tokens: int, slots: float) -> tuple:
    """(splits, chunk_slabs): the input groups are cut into `splits` chunks of `chunk_slabs` super-slabs
    of 32 groups, so that row blocks x splits fills at most `slots` blocks (blocks per SM x SMs: one wave;
    a second, partly filled wave would cost as much as the first) and a chunk's activations fit in
    X_SHARED_BYTES."""
    row_blocks = math.ceil(n_out / BLOCK_ROWS)
    slabs = math.ceil(n_groups / SLAB_GROUPS)
    splits = min(slabs, max(1, int(slots) // row_blocks))
    chunk = min(math.ceil(slabs / splits), max(1, X_SHARED_BYTES // (SLAB_GROUPS * 16 * tokens)))
    return math.ceil(slabs / chunk), chunk


def _workspace_for(device: torch.device, partial_floats: int, row_blocks: int) -> tuple:
    """The float32 partial sums and the (self-resetting) counters, grown as needed, one pair per device."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    partial, counters = _workspace.get(key, (None, None))
    if partial is None or partial.numel() < partial_floats or counters.numel() < row_blocks:
        if partial is not None:
            _outgrown.append((partial, counters))
        partial = torch.empty(max(partial_floats, 1), device=device, dtype=torch.float32)
        counters = torch.zeros(max(row_blocks, 1), device=device, dtype=torch.int32)
        _workspace[key] = (partial, counters)
    return partial, counters


def layer_rows(n_out: int, codebooks: Tensor, part_rows: Optional[Sequence[int]]) -> list:
    """The output rows of each layer in a launch: [n_out] for one layer (codebooks (M, K, g)), else part_rows,
    which must add up to n_out, with one codebook set per layer (codebooks (layers, M, K, g)), MAX_PARTS at most."""
    rows = [n_out] if part_rows is None else list(part_rows)
    if ((codebooks.dim() == 4) != (part_rows is not None) or (codebooks.dim() == 4 and codebooks.shape[0] != len(rows))
            or sum(rows) != n_out or len(rows) > MAX_PARTS):
        raise ValueError(f"part_rows {part_rows} do not fit codes of {n_out} rows and codebooks {tuple(codebooks.shape)} "
                         f"(up to {MAX_PARTS} layers, one set per layer)")
    return rows


def whole_row_blocks(part_rows: Sequence[int]) -> bool:
    """Whether every layer of a launch but the last fills whole BLOCK_ROWS-row blocks, so that a row block
    reads one layer's codebooks (the CUDA kernel's condition for several layers)."""
    return not any(r % BLOCK_ROWS for r in part_rows[:-1])


def aqlm_matmul(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
                blocks_per_sm: Optional[float] = None, part_rows: Optional[Sequence[int]] = None) -> Tensor:
    """x (..., in) with 1 to 16 tokens times the AQLM weight given by codes (out, in/8, M), codebooks
    (M, K, 8) and scales (out,), plus bias; bf16. The caller checks `supports` and `load`.
    blocks_per_sm: the split's target (default: what the kernel is built for, blocks_per_sm_for).
    part_rows: several layers that read x in one launch (q, k, v): codes, scales and bias concatenated by
    rows, codebooks (layers, M, 256, 8) stacked, part_rows their rows (each but the last a multiple of
    BLOCK_ROWS); the output is the layers' outputs side by side."""
    N, J, M = codes.shape
    part_rows = layer_rows(N, codebooks, part_rows)
    if not whole_row_blocks(part_rows):
        raise ValueError(f"rows {part_rows}: each but the last must be a multiple of {BLOCK_ROWS}")
    x2 = x.reshape(-1, x.shape[-1])
    T = x2.shape[0]
    splits, chunk = plan(N, J, T, x.device, split_target(M, codebooks.shape[-2], blocks_per_sm))
    partial, counters = _workspace_for(x.device, splits * T * N if splits > 1 else 0, math.ceil(N / BLOCK_ROWS))
    y = load().aqlm_mma(x2, codes, codebooks, scales.reshape(-1),
                        None if bias is None else bias.to(torch.bfloat16).contiguous(), partial, counters, splits, chunk,
                        part_rows, programmatic_dependent_launch(x.device))
    return y.reshape(*x.shape[:-1], N)
