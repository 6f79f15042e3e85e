// CPU kernel of partial_rope: rotate-half RoPE on the compact [x1 | x2] partial-RoPE vectors.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "args/partial_rope.h"
#include "ops.h"

namespace mla_ext {
namespace {

template <typename T, typename AngleT>
void rotate(at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t n = x.size(0), heads = x.size(1), r = cos.size(2), h_kv = cos.size(1);
  const int64_t group = heads / h_kv;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const AngleT* cp = cos.data_ptr<AngleT>();
  const AngleT* sp = sin.data_ptr<AngleT>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  at::parallel_for(0, n * heads, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / heads, h = i % heads;
      const T* xi = xp + t * xs0 + h * xs1;
      T* oi = op + t * os0 + h * os1;
      const int64_t angle = (t * h_kv + h / group) * r;
      for (int64_t j = 0; j < r; ++j) {
        const float c = static_cast<float>(cp[angle + j]);
        const float s = static_cast<float>(sp[angle + j]);
        const float x1 = static_cast<float>(xi[j]), x2 = static_cast<float>(xi[j + r]);
        oi[j] = static_cast<T>(x1 * c - x2 * s);
        oi[j + r] = static_cast<T>(x2 * c + x1 * s);
      }
    }
  });
}

void run(at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "partial_rope", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), "partial_rope",
                                    [&] { rotate<x_t, scalar_t>(out, x, cos, sin); });
  });
}

}  // namespace

at::Tensor partial_rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_partial_rope_args(x, cos, sin);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  run(out, x, cos, sin);
  return out;
}

void partial_rope_inplace_cpu(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_partial_rope_args(x, cos, sin);
  run(x, x, cos, sin);  // each element pair is read before it is written, so aliasing is safe
}

}  // namespace mla_ext
