// Grid, shared-memory attribute and launch of one bucket's decode kernel.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "cuda/mla_decode/kernel.cuh"
#include "cuda/mla_decode/launch.h"
#include "cuda/mla_decode/smem_attribute.h"

namespace mla_ext::decode {

template <typename T, int kBucket, bool kQuant>
constexpr auto bucket_kernel() {
  return &mla_decode_kernel<T, kBucket, kQuant>;
}

template <typename T, int kBucket, bool kQuant>
int decode_ctas_per_sm(int smem_bytes) {
  auto kernel = bucket_kernel<T, kBucket, kQuant>();
  allow_max_dynamic_smem(reinterpret_cast<const void*>(kernel));
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, bucket_threads(kBucket),
                                                               smem_bytes));
  return n;
}

template <typename T, int kBucket, bool kQuant>
void launch_decode(const MlaDecodeParams& params, cudaStream_t stream) {
  auto kernel = bucket_kernel<T, kBucket, kQuant>();
  allow_max_dynamic_smem(reinterpret_cast<const void*>(kernel));
  const int64_t grid = static_cast<int64_t>(params.max_parts) * params.row_chunks;
  kernel<<<static_cast<unsigned>(grid), bucket_threads(kBucket), params.smem.total, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mla_ext::decode
