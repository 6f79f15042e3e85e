// Argument checks of the paged latent cache ops (latent_cache_write, latent_gather and the cache
// half of latent_project), shared by the CPU and CUDA entry points. The cache format is the one
// of mla_ext/reference.py; the latent dtype selects it.
#pragma once

#include <optional>

#include "core/checks.h"

namespace mla_ext {

enum class LatentFormat : int { kFloat = 0, kInt8 = 1, kInt4 = 2, kFp8 = 3 };

inline const char* latent_format_name(LatentFormat f) {
  switch (f) {
    case LatentFormat::kFloat: return "float";
    case LatentFormat::kInt8: return "int8";
    case LatentFormat::kInt4: return "int4 (uint8)";
    case LatentFormat::kFp8: return "fp8 e4m3";
  }
  return "?";
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Geometry of one layer's cache, validated by check_latent_cache.
struct LatentCacheShape {
  LatentFormat format;
  bool rope_fp8;
  int64_t num_blocks, block_size;
  int64_t d_c, num_groups, group_size;
  int64_t h_kv, d_r;
  int64_t capacity() const { return num_blocks * block_size; }
};

namespace detail {

// A scale/zero tensor of the cache: present exactly when the format needs it, fp16, [nb, bs, n].
inline void check_cache_side_tensor(const char* op, const char* name,
                                    const std::optional<at::Tensor>& t, bool needed,
                                    const char* format_desc, const at::Tensor& owner,
                                    at::IntArrayRef expected_prefix) {
  if (!needed) {
    TORCH_CHECK(!t.has_value(), op, ": ", name, " must be None for a ", format_desc,
                " cache, got a tensor of shape ", sizes_str(*t));
    return;
  }
  TORCH_CHECK(t.has_value(), op, ": ", name, " is required for a ", format_desc,
              " cache, got None");
  const at::Tensor& x = *t;
  TORCH_CHECK(x.scalar_type() == at::kHalf, op, ": ", name, " must have dtype Half, got ",
              x.scalar_type());
  // Every side tensor is 3-D: [num_blocks, block_size, n] with n = D_c / g or H_kv.
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must have 3 dims, got shape ", sizes_str(x));
  for (size_t i = 0; i < expected_prefix.size(); ++i) {
    TORCH_CHECK(x.size(i) == expected_prefix[i], op, ": ", name, " must have shape ",
                expected_prefix, (expected_prefix.size() < 3 ? " + (D_c / g,)" : ""),
                " to match the cache, got ", sizes_str(x));
  }
  TORCH_CHECK(x.device() == owner.device(), op, ": ", name, " must be on ", owner.device(),
              " like the cache, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace detail

// latent: [num_blocks, block_size, D_c] (uint8 int4: D_c / 2 bytes);
// latent_scale, latent_zero: [num_blocks, block_size, D_c / g] fp16 or None;
// k_rope_cache: [num_blocks, block_size, H_kv, d_r]; k_rope_scale: [num_blocks, block_size, H_kv].
inline LatentCacheShape check_latent_cache(const char* op, const at::Tensor& latent,
                                           const std::optional<at::Tensor>& latent_scale,
                                           const std::optional<at::Tensor>& latent_zero,
                                           const at::Tensor& k_rope_cache,
                                           const std::optional<at::Tensor>& k_rope_scale) {
  TORCH_CHECK(latent.dim() == 3, op, ": latent must have 3 dims [num_blocks, block_size, D_c], got ",
              sizes_str(latent));
  LatentCacheShape s{};
  const auto ldt = latent.scalar_type();
  if (is_float_dtype(ldt)) {
    s.format = LatentFormat::kFloat;
  } else if (ldt == at::kChar) {
    s.format = LatentFormat::kInt8;
  } else if (ldt == at::kByte) {
    s.format = LatentFormat::kInt4;
  } else if (ldt == at::kFloat8_e4m3fn) {
    s.format = LatentFormat::kFp8;
  } else {
    TORCH_CHECK(false, op, ": latent must have dtype in [Float, Half, BFloat16, Char (int8), ",
                "Byte (int4), Float8_e4m3fn], got ", ldt);
  }
  TORCH_CHECK(latent.is_contiguous(), op, ": latent must be contiguous");
  s.num_blocks = latent.size(0);
  s.block_size = latent.size(1);
  TORCH_CHECK(s.block_size > 0, op, ": latent's block_size (dim 1) must be > 0, got ",
              sizes_str(latent));
  s.d_c = latent.size(2) * (s.format == LatentFormat::kInt4 ? 2 : 1);
  TORCH_CHECK(s.d_c > 0, op, ": latent's last dim must be > 0, got ", sizes_str(latent));

  const bool quantized = s.format != LatentFormat::kFloat;
  const char* fmt = latent_format_name(s.format);
  const std::string fmt_desc = std::string(fmt) + " latent";
  const at::IntArrayRef block_prefix = latent.sizes().slice(0, 2);
  detail::check_cache_side_tensor(op, "latent_scale", latent_scale, quantized, fmt_desc.c_str(),
                                  latent, block_prefix);
  detail::check_cache_side_tensor(op, "latent_zero", latent_zero,
                                  s.format == LatentFormat::kInt4, fmt_desc.c_str(), latent,
                                  block_prefix);
  if (quantized) {
    s.num_groups = latent_scale->size(2);
    TORCH_CHECK(s.num_groups > 0 && s.d_c % s.num_groups == 0, op,
                ": latent_scale's last dim (D_c / g = ", s.num_groups,
                ") must divide D_c = ", s.d_c, " (the group size g is D_c / that dim)");
    s.group_size = s.d_c / s.num_groups;
    if (s.format == LatentFormat::kInt4) {
      TORCH_CHECK(latent_zero->sizes() == latent_scale->sizes(), op,
                  ": latent_zero must have latent_scale's shape ", sizes_str(*latent_scale),
                  ", got ", sizes_str(*latent_zero));
    }
  } else {
    s.num_groups = 1;
    s.group_size = s.d_c;
  }

  TORCH_CHECK(k_rope_cache.dim() == 4, op,
              ": k_rope_cache must have 4 dims [num_blocks, block_size, H_kv, d_r], got ",
              sizes_str(k_rope_cache));
  const auto rdt = k_rope_cache.scalar_type();
  TORCH_CHECK(is_float_dtype(rdt) || rdt == at::kFloat8_e4m3fn, op,
              ": k_rope_cache must have dtype in [Float, Half, BFloat16, Float8_e4m3fn], got ",
              rdt);
  s.rope_fp8 = rdt == at::kFloat8_e4m3fn;
  TORCH_CHECK(k_rope_cache.size(0) == s.num_blocks && k_rope_cache.size(1) == s.block_size, op,
              ": k_rope_cache must have latent's [num_blocks, block_size] = ", block_prefix,
              " in front, got ", sizes_str(k_rope_cache));
  s.h_kv = k_rope_cache.size(2);
  s.d_r = k_rope_cache.size(3);
  TORCH_CHECK(s.h_kv > 0, op, ": k_rope_cache's H_kv (dim 2) must be > 0, got ",
              sizes_str(k_rope_cache));
  TORCH_CHECK(s.d_r > 0 && s.d_r % 2 == 0, op,
              ": k_rope_cache's d_r (dim 3) must be even and > 0 (d_r = 2 r), got ",
              sizes_str(k_rope_cache));
  TORCH_CHECK(k_rope_cache.is_contiguous(), op, ": k_rope_cache must be contiguous");
  TORCH_CHECK(k_rope_cache.device() == latent.device(), op, ": k_rope_cache must be on ",
              latent.device(), " like latent, got ", k_rope_cache.device());
  const std::string rope_desc =
      std::string(s.rope_fp8 ? "fp8 e4m3" : "float") + " k_rope_cache";
  detail::check_cache_side_tensor(op, "k_rope_scale", k_rope_scale, s.rope_fp8,
                                  rope_desc.c_str(), latent,
                                  k_rope_cache.sizes().slice(0, 3));
  return s;
}

// slot_mapping: [N] int64 on latent's device.
inline void check_slot_mapping(const char* op, const at::Tensor& slot_mapping, int64_t n,
                               const at::Tensor& latent) {
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == n, op,
              ": slot_mapping must have shape (N,) = (", n, "), got ", sizes_str(slot_mapping));
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, op,
              ": slot_mapping must have dtype Long (int64), got ", slot_mapping.scalar_type());
  TORCH_CHECK(slot_mapping.device() == latent.device(), op, ": slot_mapping must be on ",
              latent.device(), " like latent, got ", slot_mapping.device());
  TORCH_CHECK(slot_mapping.is_contiguous(), op, ": slot_mapping must be contiguous");
}

// Host-side range check of a CPU slot_mapping (a CUDA one is checked by the Python wrapper,
// which can do it without breaking CUDA-graph capture).
inline void check_slot_range_cpu(const char* op, const at::Tensor& slot_mapping,
                                 int64_t capacity) {
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < slot_mapping.numel(); ++i) {
    TORCH_CHECK(slots[i] >= -1 && slots[i] < capacity, op, ": slot_mapping[", i, "] = ",
                slots[i], " is outside the cache: expected -1 (skip) or a slot in [0, ",
                capacity, ")");
  }
}

// c: [N, D_c] float; k_rope: [N, H_kv, d_r] float; slot_mapping: [N] int64; cache as above.
inline LatentCacheShape check_latent_cache_write_args(
    const at::Tensor& c, const at::Tensor& k_rope, const at::Tensor& slot_mapping,
    const at::Tensor& latent, const std::optional<at::Tensor>& latent_scale,
    const std::optional<at::Tensor>& latent_zero, const at::Tensor& k_rope_cache,
    const std::optional<at::Tensor>& k_rope_scale) {
  constexpr const char* kOp = "latent_cache_write";
  const LatentCacheShape s =
      check_latent_cache(kOp, latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale);
  MLA_CHECK_DIM("latent_cache_write", c, 2);
  MLA_CHECK_DTYPE("latent_cache_write", c, at::kFloat, at::kHalf, at::kBFloat16);
  MLA_CHECK_DIM("latent_cache_write", k_rope, 3);
  MLA_CHECK_DTYPE("latent_cache_write", k_rope, at::kFloat, at::kHalf, at::kBFloat16);
  const int64_t n = c.size(0);
  TORCH_CHECK(c.size(1) == s.d_c, kOp, ": c's last dim must be the cache's D_c = ", s.d_c,
              " (from latent ", sizes_str(latent), "), got ", sizes_str(c));
  MLA_CHECK_SHAPE("latent_cache_write", k_rope, n, s.h_kv, s.d_r);
  check_slot_mapping(kOp, slot_mapping, n, latent);
  MLA_CHECK_SAME_DEVICE("latent_cache_write", c, latent);
  MLA_CHECK_SAME_DEVICE("latent_cache_write", k_rope, latent);
  MLA_CHECK_LAST_DIM_CONTIGUOUS("latent_cache_write", c);
  MLA_CHECK_LAST_DIM_CONTIGUOUS("latent_cache_write", k_rope);
  TORCH_CHECK(k_rope.stride(1) == s.d_r || k_rope.size(1) == 1, kOp,
              ": k_rope's heads must be densely packed (stride(1) == d_r), got strides ",
              k_rope.strides());
  return s;
}

// block_table: [B, max_blocks] int32; seq_lens: [B] int32; max_len >= max(seq_lens).
inline LatentCacheShape check_latent_gather_args(
    const at::Tensor& latent, const std::optional<at::Tensor>& latent_scale,
    const std::optional<at::Tensor>& latent_zero, const at::Tensor& k_rope_cache,
    const std::optional<at::Tensor>& k_rope_scale, const at::Tensor& block_table,
    const at::Tensor& seq_lens, int64_t max_len) {
  constexpr const char* kOp = "latent_gather";
  const LatentCacheShape s =
      check_latent_cache(kOp, latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale);
  MLA_CHECK_DIM("latent_gather", block_table, 2);
  MLA_CHECK_DTYPE("latent_gather", block_table, at::kInt);
  MLA_CHECK_DIM("latent_gather", seq_lens, 1);
  MLA_CHECK_DTYPE("latent_gather", seq_lens, at::kInt);
  TORCH_CHECK(seq_lens.size(0) == block_table.size(0), kOp,
              ": seq_lens must have one entry per row of block_table (B = ", block_table.size(0),
              "), got ", sizes_str(seq_lens));
  MLA_CHECK_SAME_DEVICE("latent_gather", block_table, latent);
  MLA_CHECK_SAME_DEVICE("latent_gather", seq_lens, latent);
  MLA_CHECK_LAST_DIM_CONTIGUOUS("latent_gather", block_table);
  MLA_CHECK_CONTIGUOUS("latent_gather", seq_lens);
  TORCH_CHECK(max_len >= 0, kOp, ": max_len must be >= 0, got ", max_len);
  return s;
}

// Host-side check of a CPU block table: every sequence fits max_len and its table row, and
// every block it uses exists.
inline void check_block_table_range_cpu(const char* op, const at::Tensor& block_table,
                                        const at::Tensor& seq_lens, int64_t max_len,
                                        const LatentCacheShape& s) {
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int64_t rows = block_table.size(0), max_blocks = block_table.size(1);
  const int64_t row_stride = block_table.stride(0);
  for (int64_t b = 0; b < rows; ++b) {
    const int64_t len = lens[b];
    TORCH_CHECK(len >= 0 && len <= max_len, op, ": seq_lens[", b, "] = ", len,
                " must be in [0, max_len = ", max_len, "]");
    const int64_t used = (len + s.block_size - 1) / s.block_size;
    TORCH_CHECK(used <= max_blocks, op, ": seq_lens[", b, "] = ", len, " needs ", used,
                " blocks of ", s.block_size, ", but block_table has ", max_blocks,
                " columns");
    for (int64_t j = 0; j < used; ++j) {
      const int64_t blk = table[b * row_stride + j];
      TORCH_CHECK(blk >= 0 && blk < s.num_blocks, op, ": block_table[", b, ", ", j, "] = ", blk,
                  " is outside the cache's [0, ", s.num_blocks, ") blocks (used by seq_lens[",
                  b, "] = ", len, ")");
    }
  }
}

}  // namespace mla_ext
