// Argument checks of latent_project (the decode-time fused projection + RoPE + cache write),
// shared by the CPU and CUDA entry points. The cache half is checked by args/latent_cache.h.
#pragma once

#include "args/latent_cache.h"

namespace mla_ext {

// x: [N, d] float; w_down: [D_c, d]; w_kr: [H_kv * d_r, d]; b_kr: [H_kv * d_r] or None, all in
// x's dtype; cos, sin: [N, H_kv, r] float (one dtype); slot_mapping: [N] int64.
inline LatentCacheShape check_latent_project_args(
    const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_kr,
    const std::optional<at::Tensor>& b_kr, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& slot_mapping, const at::Tensor& latent,
    const std::optional<at::Tensor>& latent_scale, const std::optional<at::Tensor>& latent_zero,
    const at::Tensor& k_rope_cache, const std::optional<at::Tensor>& k_rope_scale) {
  constexpr const char* kOp = "latent_project";
  const LatentCacheShape s =
      check_latent_cache(kOp, latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale);
  MLA_CHECK_DIM("latent_project", x, 2);
  MLA_CHECK_DTYPE("latent_project", x, at::kFloat, at::kHalf, at::kBFloat16);
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(d > 0, kOp, ": x's hidden size (dim 1) must be > 0, got ", sizes_str(x));
  MLA_CHECK_DIM("latent_project", w_down, 2);
  MLA_CHECK_DIM("latent_project", w_kr, 2);
  TORCH_CHECK(w_down.scalar_type() == x.scalar_type(), kOp, ": w_down must have x's dtype ",
              x.scalar_type(), ", got ", w_down.scalar_type());
  TORCH_CHECK(w_kr.scalar_type() == x.scalar_type(), kOp, ": w_kr must have x's dtype ",
              x.scalar_type(), ", got ", w_kr.scalar_type());
  TORCH_CHECK(w_down.size(0) == s.d_c && w_down.size(1) == d, kOp,
              ": w_down must have shape (D_c, d) = (", s.d_c, ", ", d,
              ") (D_c from the cache, d from x), got ", sizes_str(w_down));
  TORCH_CHECK(w_kr.size(0) == s.h_kv * s.d_r && w_kr.size(1) == d, kOp,
              ": w_kr must have shape (H_kv * d_r, d) = (", s.h_kv * s.d_r, ", ", d,
              ") (H_kv, d_r from k_rope_cache, d from x), got ", sizes_str(w_kr));
  if (b_kr.has_value()) {
    const at::Tensor& b = *b_kr;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == s.h_kv * s.d_r, kOp,
                ": b_kr must have shape (H_kv * d_r,) = (", s.h_kv * s.d_r, "), got ",
                sizes_str(b));
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), kOp, ": b_kr must have x's dtype ",
                x.scalar_type(), ", got ", b.scalar_type());
    MLA_CHECK_SAME_DEVICE("latent_project", b, x);
    TORCH_CHECK(b.is_contiguous(), kOp, ": b_kr must be contiguous");
  }
  MLA_CHECK_DIM("latent_project", cos, 3);
  MLA_CHECK_DTYPE("latent_project", cos, at::kFloat, at::kHalf, at::kBFloat16);
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(), kOp,
              ": cos and sin must have the same dtype, got ", cos.scalar_type(), " and ",
              sin.scalar_type());
  MLA_CHECK_SHAPE("latent_project", cos, n, s.h_kv, s.d_r / 2);
  MLA_CHECK_SHAPE("latent_project", sin, n, s.h_kv, s.d_r / 2);
  check_slot_mapping(kOp, slot_mapping, n, latent);
  MLA_CHECK_SAME_DEVICE("latent_project", x, latent);
  MLA_CHECK_SAME_DEVICE("latent_project", w_down, latent);
  MLA_CHECK_SAME_DEVICE("latent_project", w_kr, latent);
  MLA_CHECK_SAME_DEVICE("latent_project", cos, latent);
  MLA_CHECK_SAME_DEVICE("latent_project", sin, latent);
  MLA_CHECK_LAST_DIM_CONTIGUOUS("latent_project", x);
  MLA_CHECK_CONTIGUOUS("latent_project", w_down);
  MLA_CHECK_CONTIGUOUS("latent_project", w_kr);
  MLA_CHECK_CONTIGUOUS("latent_project", cos);
  MLA_CHECK_CONTIGUOUS("latent_project", sin);
  return s;
}

}  // namespace mla_ext
