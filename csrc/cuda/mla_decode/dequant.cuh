// Conversion of one 8-channel chunk of a quantized latent row to floats, before its group's scale
// (and zero): shared by the mma.sync kernel's per-tile dequantization and the warp-specialized
// kernel's producer. Formats as ARCHITECTURE 3.3: int8 and fp8 e4m3 take 8 bytes, int4 4 bytes
// (the low nibble is the even channel).
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "cuda/mla_decode/ptx.cuh"
#include "cuda/mla_decode/traits.h"

namespace mla_ext::decode {

// Bytes of one 8-channel chunk in the stored format.
template <int kFormat>
constexpr int chunk_bytes() {
  return kFormat == kFmtInt4 ? 4 : 8;
}

template <int kFormat>
__device__ __forceinline__ void unpack8(const uint8_t* src, float (&v)[8]) {
  if constexpr (kFormat == kFmtInt4) {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(src);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = nibble_to_float(w, j);
  } else {
    const uint2 w = *reinterpret_cast<const uint2*>(src);
    if constexpr (kFormat == kFmtFp8) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t h2 = fp8x2_to_half2(static_cast<uint16_t>(((j < 2 ? w.x : w.y) >> (16 * (j % 2))) & 0xFFFF));
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h2));
        v[2 * j] = f.x;
        v[2 * j + 1] = f.y;
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = int8_byte_to_float(j < 4 ? w.x : w.y, j % 4);
    }
  }
}

}  // namespace mla_ext::decode
