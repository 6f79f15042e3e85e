// Argument checks of partial_rope, shared by the CPU and CUDA entry points.
#pragma once

#include "core/checks.h"

namespace mla_ext {

// x: [N, heads, d_r]; cos, sin: [N, H_kv, r] with d_r = 2 r and heads a multiple of H_kv.
inline void check_partial_rope_args(const at::Tensor& x, const at::Tensor& cos,
                                    const at::Tensor& sin) {
  constexpr const char* kOp = "partial_rope";
  MLA_CHECK_DIM("partial_rope", x, 3);
  MLA_CHECK_DIM("partial_rope", cos, 3);
  MLA_CHECK_DTYPE("partial_rope", x, at::kFloat, at::kHalf, at::kBFloat16);
  MLA_CHECK_DTYPE("partial_rope", cos, at::kFloat, at::kHalf, at::kBFloat16);
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(), kOp,
              ": cos and sin must have the same dtype, got ", cos.scalar_type(), " and ",
              sin.scalar_type());
  MLA_CHECK_SHAPE("partial_rope", sin, cos.size(0), cos.size(1), cos.size(2));
  MLA_CHECK_SAME_DEVICE("partial_rope", cos, x);
  MLA_CHECK_SAME_DEVICE("partial_rope", sin, x);
  const int64_t n = x.size(0), heads = x.size(1), d_r = x.size(2);
  const int64_t h_kv = cos.size(1), r = cos.size(2);
  TORCH_CHECK(cos.size(0) == n, kOp, ": cos must have one row per token of x (", n,
              "), got ", cos.size(0));
  TORCH_CHECK(d_r == 2 * r, kOp, ": x's last dim (d_r = ", d_r,
              ") must be twice cos's last dim (r = ", r, ")");
  TORCH_CHECK(h_kv > 0 && heads % h_kv == 0, kOp, ": x's head count (", heads,
              ") must be a multiple of cos's KV-head count (", h_kv, ")");
  MLA_CHECK_LAST_DIM_CONTIGUOUS("partial_rope", x);
  MLA_CHECK_CONTIGUOUS("partial_rope", cos);
  MLA_CHECK_CONTIGUOUS("partial_rope", sin);
}

}  // namespace mla_ext
