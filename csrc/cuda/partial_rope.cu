// CUDA kernel of partial_rope: one thread per (token, head, pair); the op is memory-bound and
// tiny (d_r <= 32 per head), so a flat grid with fp32 math is all it needs.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "args/partial_rope.h"
#include "ops.h"

namespace mla_ext {
namespace {

constexpr int kThreads = 256;

template <typename T, typename AngleT>
__global__ void partial_rope_kernel(T* __restrict__ out,          // [N, heads, d_r]
                                    const T* __restrict__ x,      // [N, heads, d_r]
                                    const AngleT* __restrict__ cos,  // [N, H_kv, r]
                                    const AngleT* __restrict__ sin,  // [N, H_kv, r]
                                    int64_t n, int heads, int h_kv, int r, int64_t xs0,
                                    int64_t xs1, int64_t os0, int64_t os1) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * heads * r) return;
  const int j = i % r;
  const int h = (i / r) % heads;
  const int64_t t = i / (static_cast<int64_t>(r) * heads);
  const int64_t angle = (t * h_kv + h / (heads / h_kv)) * r + j;
  const float c = static_cast<float>(cos[angle]);
  const float s = static_cast<float>(sin[angle]);
  const T* xi = x + t * xs0 + h * xs1;
  const float x1 = static_cast<float>(xi[j]), x2 = static_cast<float>(xi[j + r]);
  T* oi = out + t * os0 + h * os1;
  oi[j] = static_cast<T>(x1 * c - x2 * s);
  oi[j + r] = static_cast<T>(x2 * c + x1 * s);
}

void run(at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t n = x.size(0);
  const int heads = x.size(1), h_kv = cos.size(1), r = cos.size(2);
  const int64_t total = n * heads * r;
  if (total == 0) return;
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "partial_rope", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, cos.scalar_type(), "partial_rope", [&] {
          partial_rope_kernel<x_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
              out.data_ptr<x_t>(), x.data_ptr<x_t>(), cos.data_ptr<scalar_t>(),
              sin.data_ptr<scalar_t>(), n, heads, h_kv, r, x.stride(0), x.stride(1),
              out.stride(0), out.stride(1));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  });
}

}  // namespace

at::Tensor partial_rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_partial_rope_args(x, cos, sin);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  run(out, x, cos, sin);
  return out;
}

void partial_rope_inplace_cuda(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_partial_rope_args(x, cos, sin);
  run(x, x, cos, sin);  // a thread reads its pair before writing it; pairs are disjoint
}

}  // namespace mla_ext
