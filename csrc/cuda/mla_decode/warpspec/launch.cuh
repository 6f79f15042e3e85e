// Availability check and launch of the warp-specialized decode kernel.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "cuda/mla_decode/launch.h"
#include "cuda/mla_decode/smem_attribute.h"
#include "cuda/mla_decode/warpspec/kernel.cuh"

namespace mla_ext::decode {

template <typename T, int kBlocks, int kRopeSteps, bool kQuantized>
bool warpspec_decode_available() {
  auto kernel = &warpspec::mla_decode_warpspec_kernel<T, kBlocks, kRopeSteps, kQuantized>;
  cudaFuncAttributes attrs{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attrs, kernel));
  // the binary the driver picked for this device: the sm_90a one, or none of this kernel's code
  return attrs.binaryVersion == 90;
}

template <typename T, int kBlocks, int kRopeSteps, bool kQuantized>
void launch_warpspec_decode(const MlaDecodeParams& params, const CUtensorMap& latent_map,
                            const CUtensorMap& rope_map, cudaStream_t stream) {
  auto kernel = &warpspec::mla_decode_warpspec_kernel<T, kBlocks, kRopeSteps, kQuantized>;
  allow_max_dynamic_smem(reinterpret_cast<const void*>(kernel));
  const int64_t grid = static_cast<int64_t>(params.max_parts) * params.row_chunks;
  kernel<<<static_cast<unsigned>(grid), warpspec::kThreads, params.smem.total, stream>>>(
      params, latent_map, rope_map);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mla_ext::decode
