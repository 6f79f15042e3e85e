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
// Split-KV plan of one decode step (int32, layout in cuda/mla_decode/split_plan.h).
at::Tensor mla_decode_plan_cpu(const at::Tensor& q_lat, const at::Tensor& latent,
                               const std::optional<at::Tensor>& latent_scale,
                               const at::Tensor& k_rope_cache, const at::Tensor& seq_lens);

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
#endif

}  // namespace mla_ext
