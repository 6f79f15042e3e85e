// One definition of each cache format's scalar math, for the CPU and CUDA kernels alike.
// The executable spec is mla_ext/reference.py; these helpers must round the same way
// (round-half-to-even, scales rounded to fp16 before use).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

namespace mla_ext::quant {

constexpr float kInt8Max = 127.f;
constexpr float kInt4Max = 15.f;
constexpr float kFp8Max = 448.f;  // largest finite float8_e4m3fn

// Round half to even, like torch.round and CUDA's rintf.
C10_HOST_DEVICE inline float round_even(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}

// Scales are stored in fp16; quantization divides by the rounded value that dequantization uses.
C10_HOST_DEVICE inline float to_scale(float s) {
  return static_cast<float>(static_cast<c10::Half>(s));
}

C10_HOST_DEVICE inline float safe_divisor(float s) { return s > 0.f ? s : 1.f; }

C10_HOST_DEVICE inline bool is_nan(float x) {
#ifdef __CUDA_ARCH__
  return isnan(x);
#else
  return std::isnan(x);
#endif
}

C10_HOST_DEVICE inline bool is_finite(float x) {
#ifdef __CUDA_ARCH__
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// Max and min that propagate NaN, as torch.amax / torch.amin do (std::max and fmaxf drop it), so
// that a NaN in a group reaches the group's scale.
C10_HOST_DEVICE inline float max_nan(float a, float b) { return (a > b || is_nan(a)) ? a : b; }
C10_HOST_DEVICE inline float min_nan(float a, float b) { return (a < b || is_nan(a)) ? a : b; }

// A group's fp16 scale from the scale its range gives (amax / qmax; int4: (max - zero) / 15).
// A group that holds a NaN or an infinity, or whose scale overflows fp16, cannot be represented:
// its scale is NaN and its codes 0 (the quantizers below give 0 for a scale that is not > 0), so
// every value of the group reads back as NaN.
C10_HOST_DEVICE inline float group_scale(float s) {
  const float h = to_scale(s);
  return is_finite(h) ? h : NAN;
}

// int8, symmetric: scale = amax / 127, q = round(x / scale) in [-127, 127].
C10_HOST_DEVICE inline int8_t quantize_int8(float x, float scale) {
  if (!(scale > 0.f)) return 0;
  float q = round_even(x / scale);
  q = q < -kInt8Max ? -kInt8Max : (q > kInt8Max ? kInt8Max : q);
  return static_cast<int8_t>(q);
}

C10_HOST_DEVICE inline float dequantize_int8(int8_t q, float scale) {
  return static_cast<float>(q) * scale;
}

// int4, asymmetric: zero = group min (fp16), scale = (max - zero) / 15, q in [0, 15].
C10_HOST_DEVICE inline uint8_t quantize_int4(float x, float scale, float zero) {
  if (!(scale > 0.f)) return 0;
  float q = round_even((x - zero) / scale);
  q = q < 0.f ? 0.f : (q > kInt4Max ? kInt4Max : q);
  return static_cast<uint8_t>(q);
}

C10_HOST_DEVICE inline float dequantize_int4(uint8_t q, float scale, float zero) {
  return static_cast<float>(q) * scale + zero;
}

// Byte k of an int4 row: channel 2k in the low nibble, 2k+1 in the high nibble.
C10_HOST_DEVICE inline uint8_t pack_int4(uint8_t even, uint8_t odd) {
  return static_cast<uint8_t>(even | (odd << 4));
}

// fp8 e4m3 with a scale: scale = amax / 448.
C10_HOST_DEVICE inline c10::Float8_e4m3fn quantize_fp8(float x, float scale) {
  float v = scale > 0.f ? x / scale : 0.f;
  v = v < -kFp8Max ? -kFp8Max : (v > kFp8Max ? kFp8Max : v);
  return static_cast<c10::Float8_e4m3fn>(v);
}

C10_HOST_DEVICE inline float dequantize_fp8(c10::Float8_e4m3fn q, float scale) {
  return static_cast<float>(q) * scale;
}

}  // namespace mla_ext::quant
