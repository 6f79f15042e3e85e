// PTX wrappers of the warp-specialized decode kernel: wgmma with both operands in shared memory (128-byte
// swizzled layouts), its fences, and stmatrix. sm_90a only: every body compiles to nothing for
// other targets (the host dispatches to this kernel on compute capability 9.0 only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MLA_EXT_WGMMA 1
#endif

namespace mla_ext::decode::warpspec {

// Shared-memory operand layout (both GEMMs): 128-byte swizzle atoms of 8 rows x 128 bytes
// (1024-byte aligned), the 16-byte chunk c of row r stored at chunk c ^ (r % 8).
constexpr int kAtomRowBytes = 128;
constexpr int kAtomBytes = 8 * kAtomRowBytes;
constexpr int kAtomElems = kAtomRowBytes / 2;  // 16-bit elements per atom row

__host__ __device__ constexpr int swizzled_offset(int row, int chunk) {
  return row * kAtomRowBytes + ((chunk ^ (row % 8)) * 16);
}

// The 64-bit matrix descriptor: start address, leading and stride byte offsets (16-byte units),
// 128-byte swizzle (mode 1 in bits 62-63). Atoms are 1024-byte aligned, so the base offset is 0.
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) | (uint64_t{1} << 62);
}

// A descriptor moved by `bytes` (a multiple of 16): its start-address field is the low 14 bits of
// the low word (address >> 4, below 256 KB of shared memory: no carry into the LBO field), so the
// move is one add to the low word; the high word (SBO, swizzle) stays. Descriptors built once
// and moved by constants cost an add per wgmma instead of the masks and shifts of make_desc.
__device__ __forceinline__ uint64_t desc_add(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = static_cast<uint32_t>(desc) + (bytes >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | lo;
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef MLA_EXT_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef MLA_EXT_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef MLA_EXT_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Generic-proxy writes to shared memory (st.shared, stmatrix, cp.async) become visible to the
// async proxy that wgmma reads through.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef MLA_EXT_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Keeps the compiler from moving accumulator reads or writes across an asynchronous MMA.
template <int N>
__device__ __forceinline__ void fence_accumulators(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D[64 x 32] (+)= A[64 x 16] B[16 x 32], fp32 accumulators; kTransA: A is M-major (its M
// dimension contiguous) instead of K-major. scale_d = 0 overwrites D.
template <typename T, int kTransA>
__device__ __forceinline__ void wgmma_m64n32k16(float (&d)[16], uint64_t desc_a, uint64_t desc_b,
                                                int scale_d = 1) {
#ifdef MLA_EXT_WGMMA
#define MLA_EXT_WGMMA_N32(TYPE)                                                               \
  asm volatile(                                                                               \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                             \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " "                          \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, %19, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),   \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), \
        "+f"(d[14]), "+f"(d[15])                                                               \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA))
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MLA_EXT_WGMMA_N32("bf16");
  } else {
    MLA_EXT_WGMMA_N32("f16");
  }
#undef MLA_EXT_WGMMA_N32
#endif
}

// D[64 x 8] (+)= A[64 x 16] B[16 x 8], A K-major; scale_d = 0 overwrites D. Its fragment is that
// of columns 8j .. 8j + 7 of an m64nN accumulator (registers 4j .. 4j + 3), but it needs registers
// of its own: issued into part of a wider accumulator, ptxas serializes every wgmma (C7511).
template <typename T>
__device__ __forceinline__ void wgmma_m64n8k16(float (&d)[4], uint64_t desc_a, uint64_t desc_b,
                                               int scale_d = 1) {
#ifdef MLA_EXT_WGMMA
#define MLA_EXT_WGMMA_N8(TYPE)                                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"                                \
               "wgmma.mma_async.sync.aligned.m64n8k16.f32." TYPE "." TYPE              \
               " {%0,%1,%2,%3}, %4, %5, p, 1, 1, 0, 0;\n}\n"                            \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                         \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d))
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MLA_EXT_WGMMA_N8("bf16");
  } else {
    MLA_EXT_WGMMA_N8("f16");
  }
#undef MLA_EXT_WGMMA_N8
#endif
}

// Four 8 x 8 16-bit matrices from MMA fragments to shared memory, each stored transposed; lane l
// gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1,
                                                  uint32_t r2, uint32_t r3) {
#ifdef MLA_EXT_WGMMA
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
#endif
}

}  // namespace mla_ext::decode::warpspec
