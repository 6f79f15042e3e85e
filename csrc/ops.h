// Host entry points of every op, one line of why each exists. The schemas live in
// torch_bindings.cpp; shapes use the names of ARCHITECTURE.md section 1.
#pragma once

#include <torch/all.h>

namespace mla_ext {

// Rotate-half RoPE on compact partial-RoPE vectors. x: [N, heads, d_r]; cos, sin: [N, H_kv, r].
at::Tensor partial_rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void partial_rope_inplace_cpu(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

#ifdef MLA_EXT_WITH_CUDA
at::Tensor partial_rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void partial_rope_inplace_cuda(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
#endif

}  // namespace mla_ext
