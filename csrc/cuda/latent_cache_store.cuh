// Device side of the paged latent cache, shared by latent_cache_write, latent_gather and
// latent_project: raw cache pointers, float loads/stores by runtime dtype, and block-cooperative
// quantize-and-store of one token's latent channels / RoPE heads. The per-value math is
// core/quant.h (the format of reference.py); this file only organizes it across threads.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include "args/latent_cache.h"
#include "core/quant.h"

namespace mla_ext::cache_store {

constexpr int kWarpSize = 32;

// The float dtypes a cache or input tensor may have, as a runtime tag: loads and stores of a few
// values per token do not justify a template instantiation per dtype.
enum class FloatKind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline FloatKind float_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FloatKind::kF32;
    case at::kHalf: return FloatKind::kF16;
    case at::kBFloat16: return FloatKind::kBF16;
    default: TORCH_INTERNAL_ASSERT(false, "float_kind: ", t, " is not a float dtype");
  }
  return FloatKind::kF32;
}

// Pointers and geometry of one layer's cache; every tensor is contiguous (checked), so a token's
// row is addressed by its slot = block * block_size + offset.
struct CachePtrs {
  void* latent;               // [nb, bs, D_c] (int4: [nb, bs, D_c / 2] bytes)
  c10::Half* latent_scale;    // [nb, bs, num_groups] or null
  c10::Half* latent_zero;     // [nb, bs, num_groups] or null
  void* k_rope;               // [nb, bs, H_kv, d_r]
  c10::Half* k_rope_scale;    // [nb, bs, H_kv] or null
  int64_t num_blocks, block_size, capacity;  // capacity = nb * bs slots
  int d_c, group_size, num_groups, h_kv, d_r;
  FloatKind latent_kind;      // dtype of a float-format latent
  FloatKind rope_kind;        // dtype of a float k_rope_cache
  bool rope_fp8;
};

inline CachePtrs make_cache_ptrs(const LatentCacheShape& s, const at::Tensor& latent,
                                 const std::optional<at::Tensor>& latent_scale,
                                 const std::optional<at::Tensor>& latent_zero,
                                 const at::Tensor& k_rope_cache,
                                 const std::optional<at::Tensor>& k_rope_scale) {
  auto half_ptr = [](const std::optional<at::Tensor>& t) -> c10::Half* {
    return t.has_value() ? t->data_ptr<c10::Half>() : nullptr;
  };
  TORCH_CHECK(s.d_c <= (1 << 24) && s.h_kv * s.d_r <= (1 << 24), "latent cache: D_c = ", s.d_c,
              " or H_kv * d_r = ", s.h_kv * s.d_r, " is beyond what the CUDA kernels index");
  CachePtrs p{};
  p.latent = latent.data_ptr();
  p.latent_scale = half_ptr(latent_scale);
  p.latent_zero = half_ptr(latent_zero);
  p.k_rope = k_rope_cache.data_ptr();
  p.k_rope_scale = half_ptr(k_rope_scale);
  p.num_blocks = s.num_blocks;
  p.block_size = s.block_size;
  p.capacity = s.capacity();
  p.d_c = static_cast<int>(s.d_c);
  p.group_size = static_cast<int>(s.group_size);
  p.num_groups = static_cast<int>(s.num_groups);
  p.h_kv = static_cast<int>(s.h_kv);
  p.d_r = static_cast<int>(s.d_r);
  p.latent_kind = s.format == LatentFormat::kFloat ? float_kind(latent.scalar_type())
                                                   : FloatKind::kF32;
  p.rope_fp8 = s.rope_fp8;
  p.rope_kind = s.rope_fp8 ? FloatKind::kF32 : float_kind(k_rope_cache.scalar_type());
  return p;
}

__device__ __forceinline__ float load_float(const void* base, FloatKind kind, int64_t i) {
  switch (kind) {
    case FloatKind::kF16: return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    case FloatKind::kBF16: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_float(void* base, FloatKind kind, int64_t i, float v) {
  switch (kind) {
    case FloatKind::kF16: static_cast<c10::Half*>(base)[i] = static_cast<c10::Half>(v); break;
    case FloatKind::kBF16:
      static_cast<c10::BFloat16*>(base)[i] = static_cast<c10::BFloat16>(v);
      break;
    default: static_cast<float*>(base)[i] = v; break;
  }
}

// Warp max and min that propagate NaN (fmaxf and fminf drop it), so that a NaN reaches its
// group's scale.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) {
    v = quant::max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  }
  return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) {
    v = quant::min_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  }
  return v;
}

// The scale of a group from its amax (NaN for a group that cannot be represented: quant.h).
// IEEE division (not the fast-math approximation) so that the fp16 scale is the very value
// reference.py and the CPU kernel compute.
__device__ __forceinline__ float scale_from(float range, float qmax) {
  return quant::group_scale(__fdiv_rn(range, qmax));
}

// Quantize and store latent channels [ch0, ch0 + count) of the token at `slot`.
// vals: those channels' fp32 values (shared memory); ch0 and count are multiples of the group
// size, and even for int4 (a byte holds two channels). stats: shared scratch of 2 * count / g
// floats. Block-cooperative: every thread of the block calls it with the same arguments; the
// caller synchronizes before it reuses vals or stats.
template <LatentFormat F>
__device__ void store_latent_slice(const CachePtrs& p, int64_t slot, const float* vals, int ch0,
                                   int count, float* stats) {
  const int tid = threadIdx.x, n_threads = blockDim.x;
  if constexpr (F == LatentFormat::kFloat) {
    for (int i = tid; i < count; i += n_threads) {
      store_float(p.latent, p.latent_kind, slot * p.d_c + ch0 + i, vals[i]);
    }
  } else {
    const int g = p.group_size, n_groups = count / g;
    const int warp = tid / kWarpSize, lane = tid % kWarpSize, n_warps = n_threads / kWarpSize;
    // Phase 1: one warp per group computes its scale (and zero), publishes it to the cache and
    // to stats, so phase 2 can quantize element-parallel (int4 bytes may straddle groups).
    for (int grp = warp; grp < n_groups; grp += n_warps) {
      const float* x = vals + grp * g;
      float lo = INFINITY, hi = -INFINITY, amax = 0.f;
      for (int j = lane; j < g; j += kWarpSize) {
        lo = quant::min_nan(lo, x[j]);
        hi = quant::max_nan(hi, x[j]);
        amax = quant::max_nan(amax, fabsf(x[j]));
      }
      float scale, zero = 0.f;
      if constexpr (F == LatentFormat::kInt4) {
        zero = quant::to_scale(warp_min(lo));
        scale = scale_from(warp_max(hi) - zero, quant::kInt4Max);
      } else if constexpr (F == LatentFormat::kInt8) {
        scale = scale_from(warp_max(amax), quant::kInt8Max);
      } else {
        scale = scale_from(warp_max(amax), quant::kFp8Max);
      }
      if (lane == 0) {
        const int64_t at = slot * p.num_groups + ch0 / g + grp;
        p.latent_scale[at] = static_cast<c10::Half>(scale);
        if constexpr (F == LatentFormat::kInt4) p.latent_zero[at] = static_cast<c10::Half>(zero);
        stats[2 * grp] = scale;
        stats[2 * grp + 1] = zero;
      }
    }
    __syncthreads();
    if constexpr (F == LatentFormat::kInt4) {
      uint8_t* out = static_cast<uint8_t*>(p.latent) + slot * (p.d_c / 2) + ch0 / 2;
      for (int k = tid; k < count / 2; k += n_threads) {
        const int e = 2 * k, o = 2 * k + 1;
        const uint8_t qe = quant::quantize_int4(vals[e], stats[2 * (e / g)], stats[2 * (e / g) + 1]);
        const uint8_t qo = quant::quantize_int4(vals[o], stats[2 * (o / g)], stats[2 * (o / g) + 1]);
        out[k] = quant::pack_int4(qe, qo);
      }
    } else if constexpr (F == LatentFormat::kInt8) {
      int8_t* out = static_cast<int8_t*>(p.latent) + slot * p.d_c + ch0;
      for (int i = tid; i < count; i += n_threads) {
        out[i] = quant::quantize_int8(vals[i], stats[2 * (i / g)]);
      }
    } else {
      auto* out = static_cast<c10::Float8_e4m3fn*>(p.latent) + slot * p.d_c + ch0;
      for (int i = tid; i < count; i += n_threads) {
        out[i] = quant::quantize_fp8(vals[i], stats[2 * (i / g)]);
      }
    }
  }
}

// Store RoPE heads [head0, head0 + heads) of the token at `slot`; vals: their heads * d_r fp32
// values (shared memory); stats: shared scratch of `heads` floats. Block-cooperative, like
// store_latent_slice.
__device__ inline void store_rope_heads(const CachePtrs& p, int64_t slot, const float* vals,
                                        int head0, int heads, float* stats) {
  const int tid = threadIdx.x, n_threads = blockDim.x;
  const int width = heads * p.d_r;
  const int64_t base = (slot * p.h_kv + head0) * p.d_r;
  if (!p.rope_fp8) {
    for (int i = tid; i < width; i += n_threads) store_float(p.k_rope, p.rope_kind, base + i, vals[i]);
    return;
  }
  const int warp = tid / kWarpSize, lane = tid % kWarpSize, n_warps = n_threads / kWarpSize;
  for (int h = warp; h < heads; h += n_warps) {
    float amax = 0.f;
    for (int j = lane; j < p.d_r; j += kWarpSize) {
      amax = quant::max_nan(amax, fabsf(vals[h * p.d_r + j]));
    }
    const float scale = scale_from(warp_max(amax), quant::kFp8Max);
    if (lane == 0) {
      p.k_rope_scale[slot * p.h_kv + head0 + h] = static_cast<c10::Half>(scale);
      stats[h] = scale;
    }
  }
  __syncthreads();
  auto* out = static_cast<c10::Float8_e4m3fn*>(p.k_rope) + base;
  for (int i = tid; i < width; i += n_threads) out[i] = quant::quantize_fp8(vals[i], stats[i / p.d_r]);
}

// Runtime cache format -> a compile-time one, for kernels templated on it.
template <typename Fn>
void dispatch_format(LatentFormat f, Fn&& fn) {
  switch (f) {
    case LatentFormat::kFloat: fn(std::integral_constant<LatentFormat, LatentFormat::kFloat>{}); break;
    case LatentFormat::kInt8: fn(std::integral_constant<LatentFormat, LatentFormat::kInt8>{}); break;
    case LatentFormat::kInt4: fn(std::integral_constant<LatentFormat, LatentFormat::kInt4>{}); break;
    case LatentFormat::kFp8: fn(std::integral_constant<LatentFormat, LatentFormat::kFp8>{}); break;
  }
}

}  // namespace mla_ext::cache_store
