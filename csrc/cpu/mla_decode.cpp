// CPU kernel of mla_decode: per sequence, dequantize its context once into fp32 rows, then run
// exact (two-pass) softmax attention of every new token and head over it. The CUDA kernel is the
// fast path; this one is the readable second implementation the tests compare both against.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "args/mla_decode.h"
#include "core/quant.h"
#include "core/split_plan.h"
#include "ops.h"

namespace mla_ext {
namespace {

// Dequantized latent row of token `slot` (block * block_size + offset) into out[D_c].
void load_latent_row(const MlaDecodeDims& d, const at::Tensor& latent, const c10::Half* scale,
                     const c10::Half* zero, int64_t slot, float* out) {
  const int64_t D = d.D_c, g = d.group_size, ng = d.num_groups;
  switch (d.format) {
    case LatentFormat::kFloat:
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, latent.scalar_type(),
                                      "mla_decode_cpu", [&] {
        const scalar_t* row = latent.data_ptr<scalar_t>() + slot * D;
        for (int64_t c = 0; c < D; ++c) out[c] = static_cast<float>(row[c]);
      });
      return;
    case LatentFormat::kInt8: {
      const int8_t* row = latent.data_ptr<int8_t>() + slot * D;
      for (int64_t c = 0; c < D; ++c)
        out[c] = quant::dequantize_int8(row[c], static_cast<float>(scale[slot * ng + c / g]));
      return;
    }
    case LatentFormat::kFp8: {
      const auto* row = latent.data_ptr<c10::Float8_e4m3fn>() + slot * D;
      for (int64_t c = 0; c < D; ++c)
        out[c] = quant::dequantize_fp8(row[c], static_cast<float>(scale[slot * ng + c / g]));
      return;
    }
    case LatentFormat::kInt4: {
      const uint8_t* row = latent.data_ptr<uint8_t>() + slot * (D / 2);
      for (int64_t c = 0; c < D; ++c) {
        const uint8_t q = (c % 2 == 0) ? (row[c / 2] & 0xF) : (row[c / 2] >> 4);
        out[c] = quant::dequantize_int4(q, static_cast<float>(scale[slot * ng + c / g]),
                                        static_cast<float>(zero[slot * ng + c / g]));
      }
      return;
    }
  }
}

// Rotated key of token `slot`, all KV heads, into out[H_kv * d_r].
void load_rope_row(const MlaDecodeDims& d, const at::Tensor& k_rope, const c10::Half* k_scale,
                   int64_t slot, float* out) {
  const int64_t n = d.H_kv * d.d_r;
  if (d.rope_fp8) {
    const auto* row = k_rope.data_ptr<c10::Float8_e4m3fn>() + slot * n;
    for (int64_t i = 0; i < n; ++i)
      out[i] = quant::dequantize_fp8(row[i], static_cast<float>(k_scale[slot * d.H_kv + i / d.d_r]));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_rope.scalar_type(),
                                  "mla_decode_cpu", [&] {
    const scalar_t* row = k_rope.data_ptr<scalar_t>() + slot * n;
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(row[i]);
  });
}

template <typename T>
void attend(const MlaDecodeDims& d, const at::Tensor& q_lat, const at::Tensor& q_rope,
            const at::Tensor& latent, const c10::Half* scale, const c10::Half* zero,
            const at::Tensor& k_rope, const c10::Half* k_scale, const at::Tensor& block_table,
            const at::Tensor& seq_lens, double softmax_scale, at::Tensor& o_lat, at::Tensor& lse) {
  const T* q = q_lat.data_ptr<T>();
  const T* qr = q_rope.data_ptr<T>();
  T* o = o_lat.data_ptr<T>();
  float* lse_p = lse.data_ptr<float>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int64_t D = d.D_c, G = d.H / d.H_kv, R = d.H_kv * d.d_r;
  const float scale_f = static_cast<float>(softmax_scale);
  at::parallel_for(0, d.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> c, kr, scores, acc(D);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lens[b];
      c.assign(len * D, 0.f);
      kr.assign(len * R, 0.f);
      scores.resize(len);
      for (int64_t t = 0; t < len; ++t) {
        const int64_t slot = table[b * d.max_blocks + t / d.block_size] * d.block_size +
                             t % d.block_size;
        load_latent_row(d, latent, scale, zero, slot, c.data() + t * D);
        load_rope_row(d, k_rope, k_scale, slot, kr.data() + t * R);
      }
      for (int64_t i = 0; i < d.s_q; ++i) {
        const int64_t visible = std::min(len, std::max<int64_t>(0, len - d.s_q + i + 1));
        for (int64_t h = 0; h < d.H; ++h) {
          const int64_t row = (b * d.s_q + i) * d.H + h;
          const T* qh = q + row * D;
          const T* qrh = qr + row * d.d_r;
          const int64_t kv = h / G;
          float m = -std::numeric_limits<float>::infinity();
          bool finite = true;  // a score that is not finite makes the row NaN (reference.py)
          for (int64_t t = 0; t < visible; ++t) {
            float s = 0.f;
            const float* ct = c.data() + t * D;
            for (int64_t j = 0; j < D; ++j) s += static_cast<float>(qh[j]) * ct[j];
            const float* kt = kr.data() + t * R + kv * d.d_r;
            for (int64_t j = 0; j < d.d_r; ++j) s += static_cast<float>(qrh[j]) * kt[j];
            scores[t] = s * scale_f;
            finite = finite && std::isfinite(scores[t]);
            m = std::max(m, scores[t]);
          }
          if (!finite) {
            const float nan = std::numeric_limits<float>::quiet_NaN();
            std::fill(o + row * D, o + (row + 1) * D, static_cast<T>(nan));
            lse_p[row] = nan;
            continue;
          }
          std::fill(acc.begin(), acc.end(), 0.f);
          float l = 0.f;
          for (int64_t t = 0; t < visible; ++t) {
            const float p = std::exp(scores[t] - m);
            l += p;
            const float* ct = c.data() + t * D;
            for (int64_t j = 0; j < D; ++j) acc[j] += p * ct[j];
          }
          const float inv = l > 0.f ? 1.f / l : 0.f;
          for (int64_t j = 0; j < D; ++j) o[row * D + j] = static_cast<T>(acc[j] * inv);
          lse_p[row] = l > 0.f ? m + std::log(l) : -std::numeric_limits<float>::infinity();
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mla_decode_cpu(
    const at::Tensor& q_lat, const at::Tensor& q_rope, const at::Tensor& latent,
    const std::optional<at::Tensor>& latent_scale, const std::optional<at::Tensor>& latent_zero,
    const at::Tensor& k_rope_cache, const std::optional<at::Tensor>& k_rope_scale,
    const at::Tensor& block_table, const at::Tensor& seq_lens, double softmax_scale,
    const std::optional<at::Tensor>& sched_meta_opt) {
  const MlaDecodeDims d = check_mla_decode_args(q_lat, q_rope, latent, latent_scale, latent_zero,
                                                k_rope_cache, k_rope_scale, block_table, seq_lens);
  // The CPU kernel needs no split plan; a plan made for these inputs is accepted and unused.
  if (sched_meta_opt.has_value()) {
    const at::Tensor& sched_meta = *sched_meta_opt;
    MLA_CHECK_DTYPE("mla_decode", sched_meta, at::kInt);
  }
  check_mla_decode_ranges(d, block_table, seq_lens);
  at::Tensor o_lat = at::empty_like(q_lat, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({d.B, d.s_q, d.H}, q_lat.options().dtype(at::kFloat));
  const c10::Half* scale = latent_scale ? latent_scale->data_ptr<c10::Half>() : nullptr;
  const c10::Half* zero = latent_zero ? latent_zero->data_ptr<c10::Half>() : nullptr;
  const c10::Half* k_scale = k_rope_scale ? k_rope_scale->data_ptr<c10::Half>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_lat.scalar_type(), "mla_decode_cpu",
                                  [&] {
    attend<scalar_t>(d, q_lat, q_rope, latent, scale, zero, k_rope_cache, k_scale, block_table,
                     seq_lens, softmax_scale, o_lat, lse);
  });
  return {o_lat, lse};
}

// The CPU kernel needs no plan; this one splits as the CUDA plan does, for one "slot" per CPU
// thread, so the planning logic is testable without a GPU.
at::Tensor mla_decode_plan_cpu(const at::Tensor& q_lat, const at::Tensor& latent,
                               const std::optional<at::Tensor>& latent_scale,
                               const at::Tensor& k_rope_cache, const at::Tensor& seq_lens) {
  MLA_CHECK_DIM("mla_decode_plan", q_lat, 4);
  MLA_CHECK_DTYPE("mla_decode_plan", seq_lens, at::kInt);
  MLA_CHECK_SHAPE("mla_decode_plan", seq_lens, q_lat.size(0));
  MLA_CHECK_CONTIGUOUS("mla_decode_plan", seq_lens);
  const int64_t B = q_lat.size(0);
  const int tile_tokens = decode::kCpuPlanTileTokens;
  at::Tensor plan = at::empty({decode::plan_numel(B)}, seq_lens.options());
  const int target = std::min<int>(decode::kPlanSlots, std::max(1, at::get_num_threads()));
  decode::make_plan(seq_lens.data_ptr<int32_t>(), static_cast<int>(B), tile_tokens, target,
                    static_cast<int>(decode::plan_capacity(B)), plan.data_ptr<int32_t>());
  return plan;
}

}  // namespace mla_ext
