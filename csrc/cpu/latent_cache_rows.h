// CPU access to one token's row of the paged latent cache: quantize-and-store, load-and-dequantize.
// The per-value math is core/quant.h; this file only walks the groups of a row.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "args/latent_cache.h"
#include "core/quant.h"

namespace mla_ext::cpu {

// Raw pointers into the cache tensors; rows are addressed by slot = block * block_size + offset
// (every cache tensor is contiguous, checked by check_latent_cache).
struct CacheRows {
  LatentCacheShape shape;
  at::ScalarType latent_dtype, rope_dtype;
  void* latent;              // [nb * bs, D_c] (int4: [nb * bs, D_c / 2] bytes)
  at::Half* latent_scale;    // [nb * bs, num_groups] or null
  at::Half* latent_zero;     // [nb * bs, num_groups] or null
  void* k_rope;              // [nb * bs, H_kv * d_r]
  at::Half* k_rope_scale;    // [nb * bs, H_kv] or null
};

inline CacheRows make_cache_rows(const LatentCacheShape& s, const at::Tensor& latent,
                                 const std::optional<at::Tensor>& latent_scale,
                                 const std::optional<at::Tensor>& latent_zero,
                                 const at::Tensor& k_rope_cache,
                                 const std::optional<at::Tensor>& k_rope_scale) {
  auto half_ptr = [](const std::optional<at::Tensor>& t) -> at::Half* {
    return t.has_value() ? t->data_ptr<at::Half>() : nullptr;
  };
  return CacheRows{s,
                   latent.scalar_type(),
                   k_rope_cache.scalar_type(),
                   latent.data_ptr(),
                   half_ptr(latent_scale),
                   half_ptr(latent_zero),
                   k_rope_cache.data_ptr(),
                   half_ptr(k_rope_scale)};
}

inline void store_float(void* base, at::ScalarType dtype, int64_t i, float v) {
  switch (dtype) {
    case at::kFloat: static_cast<float*>(base)[i] = v; break;
    case at::kHalf: static_cast<at::Half*>(base)[i] = static_cast<at::Half>(v); break;
    case at::kBFloat16: static_cast<at::BFloat16*>(base)[i] = static_cast<at::BFloat16>(v); break;
    default: TORCH_INTERNAL_ASSERT(false, "store_float: not a float dtype");
  }
}

inline float load_float(const void* base, at::ScalarType dtype, int64_t i) {
  switch (dtype) {
    case at::kFloat: return static_cast<const float*>(base)[i];
    case at::kHalf: return static_cast<float>(static_cast<const at::Half*>(base)[i]);
    case at::kBFloat16: return static_cast<float>(static_cast<const at::BFloat16*>(base)[i]);
    default: TORCH_INTERNAL_ASSERT(false, "load_float: not a float dtype");
  }
  return 0.f;
}

// Quantize one token's D_c latent values (fp32, exactly the values of c) into row `slot`.
inline void write_latent_row(const CacheRows& r, int64_t slot, const float* c) {
  const LatentCacheShape& s = r.shape;
  const int64_t d_c = s.d_c, g = s.group_size;
  if (s.format == LatentFormat::kFloat) {
    for (int64_t i = 0; i < d_c; ++i) store_float(r.latent, r.latent_dtype, slot * d_c + i, c[i]);
    return;
  }
  for (int64_t grp = 0; grp < s.num_groups; ++grp) {
    const float* x = c + grp * g;
    const int64_t scale_at = slot * s.num_groups + grp;
    if (s.format == LatentFormat::kInt4) {
      float lo = std::numeric_limits<float>::infinity(), hi = -lo;
      for (int64_t j = 0; j < g; ++j) {
        lo = quant::min_nan(lo, x[j]);
        hi = quant::max_nan(hi, x[j]);
      }
      const float zero = quant::to_scale(lo);
      const float scale = quant::group_scale((hi - zero) / quant::kInt4Max);
      r.latent_scale[scale_at] = static_cast<at::Half>(scale);
      r.latent_zero[scale_at] = static_cast<at::Half>(zero);
      continue;  // values are packed below, once every group's scale is known
    }
    float amax = 0.f;
    for (int64_t j = 0; j < g; ++j) amax = quant::max_nan(amax, std::fabs(x[j]));
    const int64_t row = slot * d_c + grp * g;
    if (s.format == LatentFormat::kInt8) {
      const float scale = quant::group_scale(amax / quant::kInt8Max);
      r.latent_scale[scale_at] = static_cast<at::Half>(scale);
      int8_t* out = static_cast<int8_t*>(r.latent) + row;
      for (int64_t j = 0; j < g; ++j) out[j] = quant::quantize_int8(x[j], scale);
    } else {
      const float scale = quant::group_scale(amax / quant::kFp8Max);
      r.latent_scale[scale_at] = static_cast<at::Half>(scale);
      auto* out = static_cast<c10::Float8_e4m3fn*>(r.latent) + row;
      for (int64_t j = 0; j < g; ++j) out[j] = quant::quantize_fp8(x[j], scale);
    }
  }
  if (s.format == LatentFormat::kInt4) {
    // A byte may straddle two groups when g is odd, so each channel looks up its own group.
    uint8_t* out = static_cast<uint8_t*>(r.latent) + slot * (d_c / 2);
    const at::Half* scales = r.latent_scale + slot * s.num_groups;
    const at::Half* zeros = r.latent_zero + slot * s.num_groups;
    auto q = [&](int64_t ch) {
      return quant::quantize_int4(c[ch], static_cast<float>(scales[ch / g]),
                                  static_cast<float>(zeros[ch / g]));
    };
    for (int64_t k = 0; k < d_c / 2; ++k) out[k] = quant::pack_int4(q(2 * k), q(2 * k + 1));
  }
}

// Store one token's H_kv * d_r rotated key values (fp32) into row `slot`.
inline void write_rope_row(const CacheRows& r, int64_t slot, const float* k) {
  const LatentCacheShape& s = r.shape;
  const int64_t width = s.h_kv * s.d_r;
  if (!s.rope_fp8) {
    for (int64_t i = 0; i < width; ++i) store_float(r.k_rope, r.rope_dtype, slot * width + i, k[i]);
    return;
  }
  auto* out = static_cast<c10::Float8_e4m3fn*>(r.k_rope) + slot * width;
  for (int64_t h = 0; h < s.h_kv; ++h) {
    const float* x = k + h * s.d_r;
    float amax = 0.f;
    for (int64_t j = 0; j < s.d_r; ++j) amax = quant::max_nan(amax, std::fabs(x[j]));
    const float scale = quant::group_scale(amax / quant::kFp8Max);
    r.k_rope_scale[slot * s.h_kv + h] = static_cast<at::Half>(scale);
    for (int64_t j = 0; j < s.d_r; ++j) out[h * s.d_r + j] = quant::quantize_fp8(x[j], scale);
  }
}

// Dequantize row `slot` of the latent into c (D_c floats).
inline void read_latent_row(const CacheRows& r, int64_t slot, float* c) {
  const LatentCacheShape& s = r.shape;
  const int64_t d_c = s.d_c, g = s.group_size;
  switch (s.format) {
    case LatentFormat::kFloat:
      for (int64_t i = 0; i < d_c; ++i) c[i] = load_float(r.latent, r.latent_dtype, slot * d_c + i);
      return;
    case LatentFormat::kInt8: {
      const int8_t* q = static_cast<const int8_t*>(r.latent) + slot * d_c;
      const at::Half* sc = r.latent_scale + slot * s.num_groups;
      for (int64_t i = 0; i < d_c; ++i)
        c[i] = quant::dequantize_int8(q[i], static_cast<float>(sc[i / g]));
      return;
    }
    case LatentFormat::kFp8: {
      const auto* q = static_cast<const c10::Float8_e4m3fn*>(r.latent) + slot * d_c;
      const at::Half* sc = r.latent_scale + slot * s.num_groups;
      for (int64_t i = 0; i < d_c; ++i)
        c[i] = quant::dequantize_fp8(q[i], static_cast<float>(sc[i / g]));
      return;
    }
    case LatentFormat::kInt4: {
      const uint8_t* q = static_cast<const uint8_t*>(r.latent) + slot * (d_c / 2);
      const at::Half* sc = r.latent_scale + slot * s.num_groups;
      const at::Half* zr = r.latent_zero + slot * s.num_groups;
      for (int64_t i = 0; i < d_c; ++i) {
        const uint8_t nibble = (i % 2 == 0) ? (q[i / 2] & 0xF) : (q[i / 2] >> 4);
        c[i] = quant::dequantize_int4(nibble, static_cast<float>(sc[i / g]),
                                      static_cast<float>(zr[i / g]));
      }
      return;
    }
  }
}

// Dequantize row `slot` of the RoPE keys into k (H_kv * d_r floats).
inline void read_rope_row(const CacheRows& r, int64_t slot, float* k) {
  const LatentCacheShape& s = r.shape;
  const int64_t width = s.h_kv * s.d_r;
  if (!s.rope_fp8) {
    for (int64_t i = 0; i < width; ++i) k[i] = load_float(r.k_rope, r.rope_dtype, slot * width + i);
    return;
  }
  const auto* q = static_cast<const c10::Float8_e4m3fn*>(r.k_rope) + slot * width;
  for (int64_t i = 0; i < width; ++i) {
    const float scale = static_cast<float>(r.k_rope_scale[slot * s.h_kv + i / s.d_r]);
    k[i] = quant::dequantize_fp8(q[i], scale);
  }
}

}  // namespace mla_ext::cpu
