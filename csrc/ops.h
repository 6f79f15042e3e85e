// Host entry points of every op, one line of why each exists. The schemas live in
// torch_bindings.cpp; shapes use the names of ARCHITECTURE.md section 1.
#pragma once

#include <torch/all.h>

namespace mla_ext {

// Rotate-half RoPE on compact partial-RoPE vectors. x: [N, heads, d_r]; cos, sin: [N, H_kv, r].
at::Tensor partial_rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void partial_rope_inplace_cpu(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// Absorbed MLA attention over the paged latent cache -> (o_lat [B, s_q, H, D_c], lse [B, s_q, H]).
std::tuple<at::Tensor, at::Tensor> mla_decode_cpu(
    const at::Tensor& q_lat, const at::Tensor& q_rope, const at::Tensor& latent,
    const std::optional<at::Tensor>& latent_scale, const std::optional<at::Tensor>& latent_zero,
    const at::Tensor& k_rope_cache, const std::optional<at::Tensor>& k_rope_scale,
    const at::Tensor& block_table, const at::Tensor& seq_lens, double softmax_scale,
    const std::optional<at::Tensor>& sched_meta);
// Split-KV plan of one decode step (int32, layout in core/split_plan.h).
at::Tensor mla_decode_plan_cpu(const at::Tensor& q_lat, const at::Tensor& latent,
                               const std::optional<at::Tensor>& latent_scale,
                               const at::Tensor& k_rope_cache, const at::Tensor& seq_lens);
// Quantize N tokens' latents c [N, D_c] and rotated keys k_rope [N, H_kv, d_r] into the paged
// cache at slot_mapping [N] (-1 skips); format by latent's dtype (reference.py).
void latent_cache_write_cpu(const at::Tensor& c, const at::Tensor& k_rope,
                            const at::Tensor& slot_mapping, at::Tensor& latent,
                            const std::optional<at::Tensor>& latent_scale,
                            const std::optional<at::Tensor>& latent_zero, at::Tensor& k_rope_cache,
                            const std::optional<at::Tensor>& k_rope_scale);
// Dequantized context of each sequence: (c [B, max_len, D_c], k_rope [B, max_len, H_kv, d_r]) fp32.
std::tuple<at::Tensor, at::Tensor> latent_gather_cpu(
    const at::Tensor& latent, const std::optional<at::Tensor>& latent_scale,
    const std::optional<at::Tensor>& latent_zero, const at::Tensor& k_rope_cache,
    const std::optional<at::Tensor>& k_rope_scale, const at::Tensor& block_table,
    const at::Tensor& seq_lens, int64_t max_len);
// Decode-time fusion: c = x W_down^T, k_r = rope(x W_kr^T + b_kr), quantize, cache write.
void latent_project_cpu(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_kr,
                        const std::optional<at::Tensor>& b_kr, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& slot_mapping,
                        at::Tensor& latent, const std::optional<at::Tensor>& latent_scale,
                        const std::optional<at::Tensor>& latent_zero, at::Tensor& k_rope_cache,
                        const std::optional<at::Tensor>& k_rope_scale);

#ifdef MLA_EXT_WITH_CUDA
at::Tensor partial_rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void partial_rope_inplace_cuda(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
std::tuple<at::Tensor, at::Tensor> mla_decode_cuda(
    const at::Tensor& q_lat, const at::Tensor& q_rope, const at::Tensor& latent,
    const std::optional<at::Tensor>& latent_scale, const std::optional<at::Tensor>& latent_zero,
    const at::Tensor& k_rope_cache, const std::optional<at::Tensor>& k_rope_scale,
    const at::Tensor& block_table, const at::Tensor& seq_lens, double softmax_scale,
    const std::optional<at::Tensor>& sched_meta);
at::Tensor mla_decode_plan_cuda(const at::Tensor& q_lat, const at::Tensor& latent,
                                const std::optional<at::Tensor>& latent_scale,
                                const at::Tensor& k_rope_cache, const at::Tensor& seq_lens);
void latent_cache_write_cuda(const at::Tensor& c, const at::Tensor& k_rope,
                             const at::Tensor& slot_mapping, at::Tensor& latent,
                             const std::optional<at::Tensor>& latent_scale,
                             const std::optional<at::Tensor>& latent_zero, at::Tensor& k_rope_cache,
                             const std::optional<at::Tensor>& k_rope_scale);
std::tuple<at::Tensor, at::Tensor> latent_gather_cuda(
    const at::Tensor& latent, const std::optional<at::Tensor>& latent_scale,
    const std::optional<at::Tensor>& latent_zero, const at::Tensor& k_rope_cache,
    const std::optional<at::Tensor>& k_rope_scale, const at::Tensor& block_table,
    const at::Tensor& seq_lens, int64_t max_len);
void latent_project_cuda(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_kr,
                         const std::optional<at::Tensor>& b_kr, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& slot_mapping,
                         at::Tensor& latent, const std::optional<at::Tensor>& latent_scale,
                         const std::optional<at::Tensor>& latent_zero, at::Tensor& k_rope_cache,
                         const std::optional<at::Tensor>& k_rope_scale);
#endif

}  // namespace mla_ext
