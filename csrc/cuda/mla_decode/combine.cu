// LSE merge of split sequences: o = sum_s exp(lse_s - lse) o_s, lse = log sum_s exp(lse_s).
// One CTA per (sequence, row, slice of channels); split weights go to shared memory first.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/mla_decode/launch.h"
#include "cuda/mla_decode/ptx.cuh"
#include "cuda/mla_decode/smem_attribute.h"
#include "cuda/mla_decode/split_plan.h"

namespace mla_ext::decode {
namespace {

constexpr int kCombineThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    mla_decode_combine_kernel(const __grid_constant__ MlaDecodeParams p) {
  extern __shared__ float weights[];  // [num_splits]
  __shared__ float lse_total;
  const int b = blockIdx.x / p.rows, row = blockIdx.x % p.rows;
  const int32_t* info = p.plan + kPlanHeader + 4 * plan_capacity(p.B) + 2 * b;
  const int first = info[0], n = info[1];
  if (n <= 1) return;  // written directly by the decode kernel
  if (threadIdx.x < 32) {
    float mx = -INFINITY;
    for (int s = threadIdx.x; s < n; s += 32)
      mx = fmaxf(mx, p.ws_lse[static_cast<int64_t>(first + s) * p.rows + row]);
    for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.f;
    for (int s = threadIdx.x; s < n; s += 32) {
      const float l = p.ws_lse[static_cast<int64_t>(first + s) * p.rows + row];
      sum += l == -INFINITY ? 0.f : __expf(l - mx);
    }
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const float total = mx == -INFINITY ? -INFINITY : mx + logf(sum);
    for (int s = threadIdx.x; s < n; s += 32) {
      const float l = p.ws_lse[static_cast<int64_t>(first + s) * p.rows + row];
      weights[s] = total == -INFINITY || l == -INFINITY ? 0.f : __expf(l - total);
    }
    if (threadIdx.x == 0) lse_total = total;
  }
  __syncthreads();
  const int64_t out_row = static_cast<int64_t>(b) * p.rows + row;
  T* o = reinterpret_cast<T*>(p.o_lat) + out_row * p.D_c;
  // Channels of this CTA's slice; the split loop is unrolled so several loads are in flight.
  const int c = blockIdx.y * kCombineThreads + threadIdx.x;
  if (c < p.D_c) {
    const float* src = p.ws_o + (static_cast<int64_t>(first) * p.rows + row) * p.D_c + c;
    const int64_t stride = static_cast<int64_t>(p.rows) * p.D_c;
    float acc = 0.f;
    int s = 0;
    for (; s + 4 <= n; s += 4) {
      float v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = weights[s + j] != 0.f ? src[(s + j) * stride] : 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) acc += weights[s + j] * v[j];
    }
    for (; s < n; ++s) acc += weights[s] != 0.f ? weights[s] * src[s * stride] : 0.f;
    o[c] = from_float<T>(acc);
  }
  if (threadIdx.x == 0 && blockIdx.y == 0) p.lse[out_row] = lse_total;
}

}  // namespace

template <typename T>
void launch_combine(const MlaDecodeParams& params, cudaStream_t stream) {
  const int64_t grid = static_cast<int64_t>(params.B) * params.rows;
  if (grid == 0) return;
  const int smem = params.max_parts * static_cast<int>(sizeof(float));
  auto kernel = mla_decode_combine_kernel<T>;
  allow_max_dynamic_smem(reinterpret_cast<const void*>(kernel));
  const dim3 blocks(static_cast<unsigned>(grid), (params.D_c + kCombineThreads - 1) / kCombineThreads);
  kernel<<<blocks, kCombineThreads, smem, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_combine<__nv_bfloat16>(const MlaDecodeParams&, cudaStream_t);
template void launch_combine<__half>(const MlaDecodeParams&, cudaStream_t);

}  // namespace mla_ext::decode
