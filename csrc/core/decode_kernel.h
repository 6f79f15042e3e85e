// Which CUDA decode kernel mla_decode and mla_decode_plan use: a process-wide setting, set from
// Python through mla_ext.ops.decode_kernel / set_decode_kernel (torch_bindings.cpp) and read once
// per call on the host. A plan must be made under the setting of the decode calls that use it
// (the kernels' tile sizes differ). Both builds hold it (the CPU kernel ignores it).
#pragma once

#include <atomic>
#include <string>

namespace mla_ext::decode {

enum class KernelRequest : int {
  kAuto = 0,             // the warp-specialized kernel where it applies, else the mma.sync one
  kMma = 1,              // the mma.sync kernel
  kWarpSpecialized = 2,  // the warp-specialized kernel; an error naming why where it does not apply
};

inline constexpr const char* kKernelRequestNames[] = {"auto", "mma", "ws"};

inline const char* kernel_request_name(KernelRequest r) {
  return kKernelRequestNames[static_cast<int>(r)];
}

inline std::atomic<int>& kernel_request_setting() {
  static std::atomic<int> setting{static_cast<int>(KernelRequest::kAuto)};
  return setting;
}

inline KernelRequest kernel_request() {
  return static_cast<KernelRequest>(kernel_request_setting().load(std::memory_order_relaxed));
}

// Sets the request by name (kKernelRequestNames); false, leaving it unchanged, for another name.
inline bool set_kernel_request(const std::string& name) {
  for (int i = 0; i < 3; ++i) {
    if (name == kKernelRequestNames[i]) {
      kernel_request_setting().store(i, std::memory_order_relaxed);
      return true;
    }
  }
  return false;
}

}  // namespace mla_ext::decode
