// TMA tensor maps of the warp-specialized decode kernel, built on the host: a paged cache tensor
// [num_blocks, block_size, width] of 16-bit values seen as a 2D tensor of num_blocks * block_size
// rows, copied in boxes of 16 rows x 64 columns with the 128-byte swizzle the wgmma descriptors
// read. Host code (api.cpp): the encoder is the driver's, reached through the runtime's entry
// point query, so the extension needs no link against libcuda.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>

#include "cuda/mla_decode/warpspec/layout.h"

namespace mla_ext::decode::warpspec {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                    cudaEnableDefault, &found));
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && fn != nullptr,
                "mla_decode: the CUDA driver has no cuTensorMapEncodeTiled (TMA needs a driver "
                "for CUDA 12 or newer)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// `what` names the tensor in the error. base: 16-byte aligned; width * 2 bytes a multiple of 16.
inline CUtensorMap cache_tensor_map(const void* base, int64_t rows, int64_t width, bool half,
                                    const char* what) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(width), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(width) * 2};
  const cuuint32_t box[2] = {kChanBlock, kBoxRows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(
      &map, half ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
      const_cast<void*>(base), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "mla_decode: could not describe ", what,
              " for the tensor memory accelerator (cuTensorMapEncodeTiled error ",
              static_cast<int>(r), ")");
  return map;
}

}  // namespace mla_ext::decode::warpspec
