// Grid, shared-memory attribute and launch of the Hopper decode kernel.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "cuda/mla_decode/hopper/kernel.cuh"
#include "cuda/mla_decode/launch.h"
#include "cuda/mla_decode/smem_attribute.h"

namespace mla_ext::decode {

template <typename T, int kBlocks>
bool hopper_decode_available() {
  auto kernel = &hopper::mla_decode_hopper_kernel<T, kBlocks>;
  cudaFuncAttributes attrs{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attrs, kernel));
  // the binary the driver picked for this device: the sm_90a one, or none of this kernel's code
  return attrs.binaryVersion == 90;
}

template <typename T, int kBlocks>
void launch_hopper_decode(const MlaDecodeParams& params, cudaStream_t stream) {
  auto kernel = &hopper::mla_decode_hopper_kernel<T, kBlocks>;
  allow_max_dynamic_smem(reinterpret_cast<const void*>(kernel));
  const int64_t grid = static_cast<int64_t>(params.max_parts) * params.row_chunks;
  kernel<<<static_cast<unsigned>(grid), hopper::kThreads, params.smem.total, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mla_ext::decode
