// CUDA kernels of the paged latent cache: latent_cache_write (one CTA per token: stage the row in
// shared memory, then quantize and store it group by group) and latent_gather (one CTA per
// output row: look the block up, dequantize). Both are memory-bound and small next to attention;
// the decode-time write path is the fused latent_project.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "args/latent_cache.h"
#include "cuda/latent_cache_store.cuh"
#include "ops.h"

namespace mla_ext {
namespace {

using cache_store::CachePtrs;
using cache_store::dispatch_format;
using cache_store::FloatKind;

constexpr int kWriteThreads = 128;
constexpr int kGatherThreads = 128;
constexpr int kMaxGatherCtas = 65536;  // rows beyond this are looped over (grid-stride)
static_assert(kWriteThreads % cache_store::kWarpSize == 0, "whole warps: the stores use warp reductions");

template <LatentFormat F>
__global__ void __launch_bounds__(kWriteThreads)
latent_cache_write_kernel(CachePtrs cache,
                          const void* __restrict__ c,       // [N, D_c], row stride c_stride
                          FloatKind c_kind, int64_t c_stride,
                          const void* __restrict__ k_rope,  // [N, H_kv, d_r], row stride k_stride
                          FloatKind k_kind, int64_t k_stride,
                          const int64_t* __restrict__ slot_mapping) {  // [N]
  extern __shared__ float smem[];
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  // -1 skips the token; a slot past the cache (only possible where the wrapper could not check,
  // i.e. under CUDA-graph capture) is never written.
  if (slot < 0 || slot >= cache.capacity) return;
  const int rope_width = cache.h_kv * cache.d_r;
  float* vals = smem;                     // [D_c]
  float* rope = vals + cache.d_c;         // [H_kv * d_r]
  float* stats = rope + rope_width;       // [2 * num_groups] then [H_kv]
  for (int i = threadIdx.x; i < cache.d_c; i += blockDim.x) {
    vals[i] = cache_store::load_float(c, c_kind, token * c_stride + i);
  }
  for (int i = threadIdx.x; i < rope_width; i += blockDim.x) {
    rope[i] = cache_store::load_float(k_rope, k_kind, token * k_stride + i);
  }
  __syncthreads();
  cache_store::store_latent_slice<F>(cache, slot, vals, 0, cache.d_c, stats);
  cache_store::store_rope_heads(cache, slot, rope, 0, cache.h_kv, stats + 2 * cache.num_groups);
}

template <LatentFormat F>
__device__ __forceinline__ float load_latent(const CachePtrs& p, int64_t slot, int i) {
  if constexpr (F == LatentFormat::kFloat) {
    return cache_store::load_float(p.latent, p.latent_kind, slot * p.d_c + i);
  } else if constexpr (F == LatentFormat::kInt8) {
    const float scale = static_cast<float>(p.latent_scale[slot * p.num_groups + i / p.group_size]);
    return quant::dequantize_int8(static_cast<const int8_t*>(p.latent)[slot * p.d_c + i], scale);
  } else if constexpr (F == LatentFormat::kFp8) {
    const float scale = static_cast<float>(p.latent_scale[slot * p.num_groups + i / p.group_size]);
    return quant::dequantize_fp8(
        static_cast<const c10::Float8_e4m3fn*>(p.latent)[slot * p.d_c + i], scale);
  } else {
    const int64_t at = slot * p.num_groups + i / p.group_size;
    const uint8_t byte = static_cast<const uint8_t*>(p.latent)[slot * (p.d_c / 2) + i / 2];
    const uint8_t q = (i % 2 == 0) ? (byte & 0xF) : (byte >> 4);
    return quant::dequantize_int4(q, static_cast<float>(p.latent_scale[at]),
                                  static_cast<float>(p.latent_zero[at]));
  }
}

__device__ __forceinline__ float load_rope(const CachePtrs& p, int64_t slot, int i) {
  const int64_t at = slot * p.h_kv * p.d_r + i;
  if (!p.rope_fp8) return cache_store::load_float(p.k_rope, p.rope_kind, at);
  const float scale = static_cast<float>(p.k_rope_scale[slot * p.h_kv + i / p.d_r]);
  return quant::dequantize_fp8(static_cast<const c10::Float8_e4m3fn*>(p.k_rope)[at], scale);
}

template <LatentFormat F>
__global__ void __launch_bounds__(kGatherThreads)
latent_gather_kernel(CachePtrs cache,
                     const int32_t* __restrict__ block_table,  // [B, max_blocks], row stride
                     int64_t table_stride, int64_t max_blocks,
                     const int32_t* __restrict__ seq_lens,      // [B]
                     int64_t max_len, int64_t rows,             // rows = B * max_len
                     float* __restrict__ c_out,                 // [B, max_len, D_c]
                     float* __restrict__ k_out) {               // [B, max_len, H_kv, d_r]
  const int rope_width = cache.h_kv * cache.d_r;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / max_len, t = row % max_len;
    float* c_row = c_out + row * cache.d_c;
    float* k_row = k_out + row * rope_width;
    if (t >= seq_lens[b]) {
      for (int i = threadIdx.x; i < cache.d_c; i += blockDim.x) c_row[i] = 0.f;
      for (int i = threadIdx.x; i < rope_width; i += blockDim.x) k_row[i] = 0.f;
      continue;
    }
    const int64_t j = t / cache.block_size;
    const int64_t block = j < max_blocks ? block_table[b * table_stride + j] : -1;
    if (block < 0 || block >= cache.num_blocks) {
      // A table entry the wrapper could not check (CUDA-graph capture): NaN, never a wild read.
      for (int i = threadIdx.x; i < cache.d_c; i += blockDim.x) c_row[i] = NAN;
      for (int i = threadIdx.x; i < rope_width; i += blockDim.x) k_row[i] = NAN;
      continue;
    }
    const int64_t slot = block * cache.block_size + t % cache.block_size;
    for (int i = threadIdx.x; i < cache.d_c; i += blockDim.x) c_row[i] = load_latent<F>(cache, slot, i);
    for (int i = threadIdx.x; i < rope_width; i += blockDim.x) k_row[i] = load_rope(cache, slot, i);
  }
}

}  // namespace

void latent_cache_write_cuda(const at::Tensor& c, const at::Tensor& k_rope,
                             const at::Tensor& slot_mapping, at::Tensor& latent,
                             const std::optional<at::Tensor>& latent_scale,
                             const std::optional<at::Tensor>& latent_zero, at::Tensor& k_rope_cache,
                             const std::optional<at::Tensor>& k_rope_scale) {
  const LatentCacheShape s = check_latent_cache_write_args(
      c, k_rope, slot_mapping, latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale);
  const int64_t n = c.size(0);
  if (n == 0) return;
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "latent_cache_write: N = ", n,
              " tokens exceeds the CUDA grid");
  const at::cuda::OptionalCUDAGuard guard(c.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const CachePtrs cache =
      cache_store::make_cache_ptrs(s, latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale);
  const int64_t smem_floats = s.d_c + s.h_kv * s.d_r + 2 * s.num_groups + s.h_kv;
  const size_t smem = static_cast<size_t>(smem_floats) * sizeof(float);
  const size_t smem_max = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(smem <= smem_max, "latent_cache_write: one token's row (D_c = ", s.d_c,
              ", H_kv * d_r = ", s.h_kv * s.d_r, ") needs ", smem,
              " bytes of shared memory, more than the device's ", smem_max);
  dispatch_format(s.format, [&](auto fmt) {
    auto kernel = latent_cache_write_kernel<decltype(fmt)::value>;
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    kernel<<<static_cast<unsigned>(n), kWriteThreads, smem, stream>>>(
        cache, c.data_ptr(), cache_store::float_kind(c.scalar_type()), c.stride(0),
        k_rope.data_ptr(), cache_store::float_kind(k_rope.scalar_type()), k_rope.stride(0),
        slot_mapping.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> latent_gather_cuda(
    const at::Tensor& latent, const std::optional<at::Tensor>& latent_scale,
    const std::optional<at::Tensor>& latent_zero, const at::Tensor& k_rope_cache,
    const std::optional<at::Tensor>& k_rope_scale, const at::Tensor& block_table,
    const at::Tensor& seq_lens, int64_t max_len) {
  const LatentCacheShape s = check_latent_gather_args(latent, latent_scale, latent_zero,
                                                      k_rope_cache, k_rope_scale, block_table,
                                                      seq_lens, max_len);
  const int64_t batch = block_table.size(0);
  const auto f32 = latent.options().dtype(at::kFloat);
  // Every element is written by the kernel (value, zero padding or NaN for a bad block).
  at::Tensor c_out = at::empty({batch, max_len, s.d_c}, f32);
  at::Tensor k_out = at::empty({batch, max_len, s.h_kv, s.d_r}, f32);
  const int64_t rows = batch * max_len;
  if (rows == 0) return {c_out, k_out};
  const at::cuda::OptionalCUDAGuard guard(latent.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const CachePtrs cache =
      cache_store::make_cache_ptrs(s, latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, kMaxGatherCtas));
  dispatch_format(s.format, [&](auto fmt) {
    latent_gather_kernel<decltype(fmt)::value><<<grid, kGatherThreads, 0, stream>>>(
        cache, block_table.data_ptr<int32_t>(), block_table.stride(0), block_table.size(1),
        seq_lens.data_ptr<int32_t>(), max_len, rows, c_out.data_ptr<float>(),
        k_out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {c_out, k_out};
}

}  // namespace mla_ext
