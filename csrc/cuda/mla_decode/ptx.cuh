// PTX wrappers of the decode kernel: async copies, ldmatrix, the two MMA shapes, conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

namespace mla_ext::decode {


__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Async copies to a shared-memory address (smem_addr); src_bytes = 0 writes zeros (tokens past
// the sequence end).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}

// An async copy of kBytes = 16, 8 or 4.
template <int kBytes>
__device__ __forceinline__ void cp_async_bytes(uint32_t dst, const void* src) {
  static_assert(kBytes == 16 || kBytes == 8 || kBytes == 4);
  if constexpr (kBytes == 16) {
    cp_async16(dst, src);
  } else if constexpr (kBytes == 8) {
    cp_async8(dst, src);
  } else {
    cp_async4(dst, src);
  }
}

// An async copy of `bytes` = 16, 8 or 4 (uniform across the CTA).
__device__ __forceinline__ void cp_async_n(uint32_t dst, const void* src, int bytes) {
  if (bytes == 16) {
    cp_async_bytes<16>(dst, src);
  } else if (bytes == 8) {
    cp_async_bytes<8>(dst, src);
  } else {
    cp_async_bytes<4>(dst, src);
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// A visible token's score. Finite inputs give a finite score; -inf comes only from an infinite
// query or key, and becomes NaN so that the row's output is NaN, as reference.mla_decode defines
// (the softmax gives a -inf score weight 0, as it does a masked token's).
__device__ __forceinline__ float visible_score(float s) { return s == -INFINITY ? NAN : s; }

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

// Waits until at most `pending` of this thread's copy groups are still in flight (pending is the
// pipeline depth minus two, fixed per launch; wait_group takes an immediate).
__device__ __forceinline__ void cp_async_wait_pending(int pending) {
  switch (pending) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    default: cp_async_wait<6>(); break;
  }
}

// Exact small-integer -> float conversions on the FP32 pipe (the integer converter runs at a
// quarter of its rate): the integer goes into the mantissa of 2^23 and 2^23 is subtracted.
// Nibble j (0..7) of w as a float in [0, 15].
__device__ __forceinline__ float nibble_to_float(uint32_t w, int j) {
  return __uint_as_float(((w >> (4 * j)) & 0xFu) | 0x4B000000u) - 8388608.f;
}
// Byte j (0..3) of w as a signed int8, as a float: the byte is biased by 128 (xor 0x80) first.
__device__ __forceinline__ float int8_byte_to_float(uint32_t w, int j) {
  const uint32_t biased = __byte_perm(w ^ 0x80808080u, 0x4B000000u, 0x7650u | static_cast<uint32_t>(j));
  return __uint_as_float(biased) - 8388736.f;  // 2^23 + 128
}

// Two fp8 e4m3 values (low byte first) -> two fp16 values in one register.
__device__ __forceinline__ uint32_t fp8x2_to_half2(uint16_t v) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(v), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

// Two floats rounded to T, packed low first.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// Two 16-bit floats of one type -> the other type (bf16 <-> fp16), via fp32.
template <bool kToHalf>
__device__ __forceinline__ uint32_t convert_pair(uint32_t v) {
  if constexpr (kToHalf) {
    const __nv_bfloat162 x = *reinterpret_cast<const __nv_bfloat162*>(&v);
    const __half2 h = __floats2half2_rn(__low2float(x), __high2float(x));
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 x = *reinterpret_cast<const __half2*>(&v);
    const __nv_bfloat162 h = __floats2bfloat162_rn(__low2float(x), __high2float(x));
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

}  // namespace mla_ext::decode
