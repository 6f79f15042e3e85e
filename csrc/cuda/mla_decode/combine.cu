// LSE merge of split sequences: o = sum_s exp(lse_s - lse) o_s, lse = log sum_s exp(lse_s).
// One CTA per (sequence, row, slice of kCombineChans channels); split weights go to shared memory
// first. Each lane owns 4 channels and each warp a share of the splits, so that at B = 1 (tens of
// splits per row) all the partials' loads are in flight at once; the warps' sums meet in shared
// memory.
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/split_plan.h"
#include "cuda/mla_decode/launch.h"
#include "cuda/mla_decode/ptx.cuh"
#include "cuda/mla_decode/smem_attribute.h"

namespace mla_ext::decode {
namespace {

constexpr int kCombineWarps = 8;
constexpr int kCombineThreads = kCombineWarps * 32;
constexpr int kCombineChans = 32 * 4;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    mla_decode_combine_kernel(const __grid_constant__ MlaDecodeParams p) {
  extern __shared__ float weights[];  // [num_splits]
  __shared__ float lse_total;
  __shared__ float4 warp_sums[kCombineWarps][32];
  const int b = blockIdx.x / p.rows, row = blockIdx.x % p.rows;
  const int32_t* info = p.plan + kPlanHeader + 4 * plan_capacity(p.B) + 2 * b;
  const int first = info[0], n = info[1];
  if (n <= 1) return;  // written directly by the decode kernel
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 0) {
    float mx = -INFINITY;
    for (int s = lane; s < n; s += 32)
      mx = fmaxf(mx, p.ws_lse[static_cast<int64_t>(first + s) * p.rows + row]);
    for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.f;
    for (int s = lane; s < n; s += 32) {
      const float l = p.ws_lse[static_cast<int64_t>(first + s) * p.rows + row];
      sum += l == -INFINITY ? 0.f : __expf(l - mx);
    }
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    // sum = 0: no split saw a token; a NaN split (fmaxf drops it from mx) makes sum NaN.
    const float total = sum == 0.f ? -INFINITY : mx + logf(sum);
    for (int s = lane; s < n; s += 32) {
      const float l = p.ws_lse[static_cast<int64_t>(first + s) * p.rows + row];
      weights[s] = total == -INFINITY || l == -INFINITY ? 0.f : __expf(l - total);
    }
    if (lane == 0) lse_total = total;
  }
  __syncthreads();
  const int64_t out_row = static_cast<int64_t>(b) * p.rows + row;
  const int c = blockIdx.y * kCombineChans + lane * 4;  // D_c is a multiple of 8
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (c < p.D_c) {
    const float* src = p.ws_o + (static_cast<int64_t>(first) * p.rows + row) * p.D_c + c;
    const int64_t stride = static_cast<int64_t>(p.rows) * p.D_c;
#pragma unroll 4
    for (int s = warp; s < n; s += kCombineWarps) {
      const float w = weights[s];
      if (w != 0.f) {
        const float4 v = *reinterpret_cast<const float4*>(src + s * stride);
        acc.x += w * v.x;
        acc.y += w * v.y;
        acc.z += w * v.z;
        acc.w += w * v.w;
      }
    }
  }
  warp_sums[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && c < p.D_c) {
    float4 o = warp_sums[0][lane];
#pragma unroll
    for (int w = 1; w < kCombineWarps; ++w) {
      const float4 v = warp_sums[w][lane];
      o.x += v.x;
      o.y += v.y;
      o.z += v.z;
      o.w += v.w;
    }
    T* dst = reinterpret_cast<T*>(p.o_lat) + out_row * p.D_c + c;
    *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<T>(o.x, o.y), pack2<T>(o.z, o.w));
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
  const dim3 blocks(static_cast<unsigned>(grid), (params.D_c + kCombineChans - 1) / kCombineChans);
  kernel<<<blocks, kCombineThreads, smem, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_combine<__nv_bfloat16>(const MlaDecodeParams&, cudaStream_t);
template void launch_combine<__half>(const MlaDecodeParams&, cudaStream_t);

}  // namespace mla_ext::decode
