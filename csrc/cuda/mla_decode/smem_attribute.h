// The dynamic shared-memory limit of a kernel, raised once per (kernel, device) to the device's
// opt-in maximum. The attribute then never changes again, so no launch can find it below what
// that launch needs (a per-size value, set by one call and relied on by another, went stale and
// made launches fail with "invalid argument"), and after the first call no driver configuration
// call happens at all, also not while a CUDA graph is being captured.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <utility>

namespace mla_ext::decode {

inline void allow_max_dynamic_smem(const void* kernel) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> done;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  if (done.count({kernel, device})) return;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  int static_bytes = 0;
  cudaFuncAttributes attrs{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attrs, kernel));
  static_bytes = static_cast<int>(attrs.sharedSizeBytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      optin - static_bytes));
  done.insert({kernel, device});
}

}  // namespace mla_ext::decode
