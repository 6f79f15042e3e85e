// CPU kernels of the paged latent cache: latent_cache_write (quantize + scatter by slot) and
// latent_gather (gather by block table + dequantize). One token row per task.
#include <ATen/Parallel.h>

#include <vector>

#include "args/latent_cache.h"
#include "cpu/latent_cache_rows.h"
#include "ops.h"

namespace mla_ext {

void latent_cache_write_cpu(const at::Tensor& c, const at::Tensor& k_rope,
                            const at::Tensor& slot_mapping, at::Tensor& latent,
                            const std::optional<at::Tensor>& latent_scale,
                            const std::optional<at::Tensor>& latent_zero,
                            at::Tensor& k_rope_cache,
                            const std::optional<at::Tensor>& k_rope_scale) {
  const LatentCacheShape s = check_latent_cache_write_args(
      c, k_rope, slot_mapping, latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale);
  check_slot_range_cpu("latent_cache_write", slot_mapping, s.capacity());
  const int64_t n = c.size(0);
  if (n == 0) return;
  // Widening to fp32 is exact, so the quantizers see the very values of c and k_rope.
  const at::Tensor c32 = c.to(at::kFloat).contiguous();
  const at::Tensor k32 = k_rope.to(at::kFloat).contiguous();
  const float* cp = c32.data_ptr<float>();
  const float* kp = k32.data_ptr<float>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const cpu::CacheRows rows =
      cpu::make_cache_rows(s, latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale);
  const int64_t rope_width = s.h_kv * s.d_r;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      cpu::write_latent_row(rows, slots[t], cp + t * s.d_c);
      cpu::write_rope_row(rows, slots[t], kp + t * rope_width);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> latent_gather_cpu(
    const at::Tensor& latent, const std::optional<at::Tensor>& latent_scale,
    const std::optional<at::Tensor>& latent_zero, const at::Tensor& k_rope_cache,
    const std::optional<at::Tensor>& k_rope_scale, const at::Tensor& block_table,
    const at::Tensor& seq_lens, int64_t max_len) {
  const LatentCacheShape s = check_latent_gather_args(latent, latent_scale, latent_zero,
                                                      k_rope_cache, k_rope_scale, block_table,
                                                      seq_lens, max_len);
  check_block_table_range_cpu("latent_gather", block_table, seq_lens, max_len, s);
  const int64_t batch = block_table.size(0);
  const auto f32 = latent.options().dtype(at::kFloat);
  at::Tensor c_out = at::zeros({batch, max_len, s.d_c}, f32);
  at::Tensor k_out = at::zeros({batch, max_len, s.h_kv, s.d_r}, f32);
  if (batch == 0 || max_len == 0) return {c_out, k_out};
  const cpu::CacheRows rows =
      cpu::make_cache_rows(s, latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale);
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t table_stride = block_table.stride(0);
  const int64_t rope_width = s.h_kv * s.d_r;
  float* cp = c_out.data_ptr<float>();
  float* kp = k_out.data_ptr<float>();
  at::parallel_for(0, batch * max_len, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / max_len, t = i % max_len;
      if (t >= lens[b]) continue;  // padding stays zero
      const int64_t block = table[b * table_stride + t / s.block_size];
      const int64_t slot = block * s.block_size + t % s.block_size;
      cpu::read_latent_row(rows, slot, cp + i * s.d_c);
      cpu::read_rope_row(rows, slot, kp + i * rope_width);
    }
  });
  return {c_out, k_out};
}

}  // namespace mla_ext
