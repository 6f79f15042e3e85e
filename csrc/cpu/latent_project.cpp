// CPU kernel of latent_project. The fusion is a GPU concern (one launch, weights read once);
// on the CPU the op is the same three steps the reference takes, each with this project's own
// kernels: fp32 GEMMs (ATen), partial_rope_cpu, and the latent_cache_write row quantizer.
#include <ATen/ATen.h>

#include "args/latent_project.h"
#include "ops.h"

namespace mla_ext {

void latent_project_cpu(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_kr,
                        const std::optional<at::Tensor>& b_kr, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& slot_mapping,
                        at::Tensor& latent, const std::optional<at::Tensor>& latent_scale,
                        const std::optional<at::Tensor>& latent_zero, at::Tensor& k_rope_cache,
                        const std::optional<at::Tensor>& k_rope_scale) {
  const LatentCacheShape s =
      check_latent_project_args(x, w_down, w_kr, b_kr, cos, sin, slot_mapping, latent,
                                latent_scale, latent_zero, k_rope_cache, k_rope_scale);
  check_slot_range_cpu("latent_project", slot_mapping, s.capacity());
  const int64_t n = x.size(0);
  if (n == 0) return;
  // fp32 accumulation, then c and k_r rounded to x's dtype, as the unfused torch sequence does.
  const at::Tensor x32 = x.to(at::kFloat);
  const at::Tensor c = at::matmul(x32, w_down.to(at::kFloat).t()).to(x.scalar_type());
  at::Tensor kr = at::matmul(x32, w_kr.to(at::kFloat).t());
  if (b_kr.has_value()) kr.add_(b_kr->to(at::kFloat));
  at::Tensor k_rot = partial_rope_cpu(kr.to(x.scalar_type()).view({n, s.h_kv, s.d_r}), cos, sin);
  latent_cache_write_cpu(c, k_rot, slot_mapping, latent, latent_scale, latent_zero,
                         k_rope_cache, k_rope_scale);
}

}  // namespace mla_ext
