// Argument checks of mla_decode, shared by the CPU and CUDA entry points. Index-range checks that
// need the tensors' values (block_table entries, seq_lens) are done here on CPU; on CUDA the Python
// wrapper does them when no CUDA graph is being captured (a device kernel cannot raise a message).
#pragma once

#include "core/checks.h"

namespace mla_ext {

enum class LatentFormat { kFloat, kInt8, kFp8, kInt4 };

// Sizes of one mla_decode call, in the names of ARCHITECTURE.md section 1.
struct MlaDecodeDims {
  int64_t B, s_q, H, D_c, d_r, H_kv, num_blocks, block_size, max_blocks, num_groups, group_size;
  LatentFormat format;
  bool rope_fp8;
};

inline LatentFormat latent_format_of(const at::Tensor& latent) {
  switch (latent.scalar_type()) {
    case at::kChar: return LatentFormat::kInt8;
    case at::kFloat8_e4m3fn: return LatentFormat::kFp8;
    case at::kByte: return LatentFormat::kInt4;
    default: return LatentFormat::kFloat;
  }
}

// q_lat [B, s_q, H, D_c]; q_rope [B, s_q, H, d_r]; latent [num_blocks, block_size, D_c] (or D_c/2
// bytes for int4); latent_scale/latent_zero [num_blocks, block_size, D_c/g] fp16;
// k_rope_cache [num_blocks, block_size, H_kv, d_r]; k_rope_scale [num_blocks, block_size, H_kv];
// block_table [B, max_blocks] int32; seq_lens [B] int32.
inline MlaDecodeDims check_mla_decode_args(
    const at::Tensor& q_lat, const at::Tensor& q_rope, const at::Tensor& latent,
    const std::optional<at::Tensor>& latent_scale_opt,
    const std::optional<at::Tensor>& latent_zero_opt, const at::Tensor& k_rope_cache,
    const std::optional<at::Tensor>& k_rope_scale_opt, const at::Tensor& block_table,
    const at::Tensor& seq_lens) {
  constexpr const char* kOp = "mla_decode";
  MLA_CHECK_DIM("mla_decode", q_lat, 4);
  MLA_CHECK_DIM("mla_decode", q_rope, 4);
  MLA_CHECK_DIM("mla_decode", latent, 3);
  MLA_CHECK_DIM("mla_decode", k_rope_cache, 4);
  MLA_CHECK_DIM("mla_decode", block_table, 2);
  MLA_CHECK_DIM("mla_decode", seq_lens, 1);
  MLA_CHECK_DTYPE("mla_decode", q_lat, at::kFloat, at::kHalf, at::kBFloat16);
  TORCH_CHECK(q_rope.scalar_type() == q_lat.scalar_type(), kOp,
              ": q_rope must have q_lat's dtype ", q_lat.scalar_type(), ", got ",
              q_rope.scalar_type());
  MLA_CHECK_DTYPE("mla_decode", latent, at::kFloat, at::kHalf, at::kBFloat16, at::kChar,
                  at::kFloat8_e4m3fn, at::kByte);
  MLA_CHECK_DTYPE("mla_decode", k_rope_cache, at::kFloat, at::kHalf, at::kBFloat16,
                  at::kFloat8_e4m3fn);
  MLA_CHECK_DTYPE("mla_decode", block_table, at::kInt);
  MLA_CHECK_DTYPE("mla_decode", seq_lens, at::kInt);
  for (const at::Tensor* t : {&q_rope, &latent, &k_rope_cache, &block_table, &seq_lens}) {
    TORCH_CHECK(t->device() == q_lat.device(), kOp, ": every tensor must be on q_lat's device ",
                q_lat.device(), ", got one on ", t->device());
  }
  MLA_CHECK_CONTIGUOUS("mla_decode", q_lat);
  MLA_CHECK_CONTIGUOUS("mla_decode", q_rope);
  MLA_CHECK_CONTIGUOUS("mla_decode", latent);
  MLA_CHECK_CONTIGUOUS("mla_decode", k_rope_cache);
  MLA_CHECK_CONTIGUOUS("mla_decode", block_table);
  MLA_CHECK_CONTIGUOUS("mla_decode", seq_lens);

  MlaDecodeDims d{};
  d.B = q_lat.size(0);
  d.s_q = q_lat.size(1);
  d.H = q_lat.size(2);
  d.D_c = q_lat.size(3);
  d.d_r = q_rope.size(3);
  d.num_blocks = latent.size(0);
  d.block_size = latent.size(1);
  d.H_kv = k_rope_cache.size(2);
  d.max_blocks = block_table.size(1);
  d.format = latent_format_of(latent);
  d.rope_fp8 = k_rope_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(d.s_q >= 1, kOp, ": q_lat must hold s_q >= 1 new tokens, got shape ",
              sizes_str(q_lat));
  TORCH_CHECK(d.H >= 1 && d.D_c >= 1 && d.d_r >= 1, kOp,
              ": q_lat and q_rope need H, D_c, d_r >= 1, got q_lat ", sizes_str(q_lat),
              " and q_rope ", sizes_str(q_rope));
  MLA_CHECK_SHAPE("mla_decode", q_rope, d.B, d.s_q, d.H, d.d_r);
  const int64_t latent_width = d.format == LatentFormat::kInt4 ? d.D_c / 2 : d.D_c;
  if (d.format == LatentFormat::kInt4) {
    TORCH_CHECK(d.D_c % 2 == 0, kOp, ": int4 latents need an even D_c, got ", d.D_c);
  }
  MLA_CHECK_SHAPE("mla_decode", latent, d.num_blocks, d.block_size, latent_width);
  TORCH_CHECK(d.block_size >= 1, kOp, ": latent's block_size must be >= 1, got ", d.block_size);
  TORCH_CHECK(d.H_kv >= 1 && d.H % d.H_kv == 0, kOp, ": H (", d.H,
              ", from q_lat) must be a multiple of H_kv (", d.H_kv, ", from k_rope_cache)");
  MLA_CHECK_SHAPE("mla_decode", k_rope_cache, d.num_blocks, d.block_size, d.H_kv, d.d_r);
  MLA_CHECK_SHAPE("mla_decode", block_table, d.B, d.max_blocks);
  MLA_CHECK_SHAPE("mla_decode", seq_lens, d.B);
  if (d.format == LatentFormat::kFloat) {
    TORCH_CHECK(!latent_scale_opt.has_value() && !latent_zero_opt.has_value(), kOp,
                ": latent_scale and latent_zero must be None for a ", latent.scalar_type(),
                " latent cache");
    d.num_groups = 1;
  } else {
    TORCH_CHECK(latent_scale_opt.has_value(), kOp, ": latent_scale is required for a ",
                latent.scalar_type(), " latent cache");
    const at::Tensor& latent_scale = *latent_scale_opt;
    MLA_CHECK_DTYPE("mla_decode", latent_scale, at::kHalf);
    MLA_CHECK_DIM("mla_decode", latent_scale, 3);
    MLA_CHECK_SAME_DEVICE("mla_decode", latent_scale, q_lat);
    MLA_CHECK_CONTIGUOUS("mla_decode", latent_scale);
    d.num_groups = latent_scale.size(2);
    TORCH_CHECK(d.num_groups >= 1 && d.D_c % d.num_groups == 0, kOp,
                ": latent_scale's last dim (D_c/g = ", d.num_groups, ") must divide D_c (",
                d.D_c, ")");
    MLA_CHECK_SHAPE("mla_decode", latent_scale, d.num_blocks, d.block_size, d.num_groups);
    if (d.format == LatentFormat::kInt4) {
      TORCH_CHECK(latent_zero_opt.has_value(), kOp,
                  ": latent_zero is required for int4 (uint8)");
      const at::Tensor& latent_zero = *latent_zero_opt;
      MLA_CHECK_DTYPE("mla_decode", latent_zero, at::kHalf);
      MLA_CHECK_SAME_DEVICE("mla_decode", latent_zero, q_lat);
      MLA_CHECK_CONTIGUOUS("mla_decode", latent_zero);
      MLA_CHECK_SHAPE("mla_decode", latent_zero, d.num_blocks, d.block_size, d.num_groups);
    } else {
      TORCH_CHECK(!latent_zero_opt.has_value(), kOp, ": latent_zero must be None for a ",
                  latent.scalar_type(), " latent cache (only int4 has zeros)");
    }
  }
  d.group_size = d.D_c / d.num_groups;
  if (d.format == LatentFormat::kInt4) {
    TORCH_CHECK(d.group_size % 2 == 0, kOp, ": int4 groups must hold an even number of "
                "channels, got g = ", d.group_size);
  }
  if (d.rope_fp8) {
    TORCH_CHECK(k_rope_scale_opt.has_value(), kOp,
                ": k_rope_scale is required for an fp8 k_rope_cache");
    const at::Tensor& k_rope_scale = *k_rope_scale_opt;
    MLA_CHECK_DTYPE("mla_decode", k_rope_scale, at::kHalf);
    MLA_CHECK_SAME_DEVICE("mla_decode", k_rope_scale, q_lat);
    MLA_CHECK_CONTIGUOUS("mla_decode", k_rope_scale);
    MLA_CHECK_SHAPE("mla_decode", k_rope_scale, d.num_blocks, d.block_size, d.H_kv);
  } else {
    TORCH_CHECK(!k_rope_scale_opt.has_value(), kOp, ": k_rope_scale must be None for a ",
                k_rope_cache.scalar_type(), " k_rope_cache");
  }
  return d;
}

// Host-side value checks (CPU tensors only): every block-table slot a sequence uses must name an
// existing block, and no sequence may be longer than its block-table row.
inline void check_mla_decode_ranges(const MlaDecodeDims& d, const at::Tensor& block_table,
                                    const at::Tensor& seq_lens) {
  constexpr const char* kOp = "mla_decode";
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  for (int64_t b = 0; b < d.B; ++b) {
    const int64_t len = lens[b];
    TORCH_CHECK(len >= 0 && len <= d.max_blocks * d.block_size, kOp, ": seq_lens[", b, "] = ",
                len, " must be in [0, max_blocks * block_size = ", d.max_blocks * d.block_size,
                "]");
    const int64_t used = (len + d.block_size - 1) / d.block_size;
    for (int64_t j = 0; j < used; ++j) {
      const int64_t blk = table[b * d.max_blocks + j];
      TORCH_CHECK(blk >= 0 && blk < d.num_blocks, kOp, ": block_table[", b, ", ", j, "] = ", blk,
                  " is not a block of the cache (num_blocks = ", d.num_blocks, ")");
    }
  }
}

}  // namespace mla_ext
