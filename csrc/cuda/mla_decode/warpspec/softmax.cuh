// The per-tile online softmax of the warp-specialized kernel, on the fragment of a wgmma score
// accumulator S^T[64 tokens x 8 kRowTiles rows]: in a warpgroup, warp w's thread
// (g = lane / 4, tq = lane % 4) holds tokens a = 16 w + g and b = a + 8 of rows 8 j + 2 tq + c
// (registers 4 j + c and 4 j + 2 + c). Base 2 throughout; P leaves as two 16-bit terms, hi = T(P)
// and lo = T(P - hi), so that the output GEMM is exact to fp32 up to summation order.
#pragma once

#include <cstdint>

#include "cuda/mla_decode/ptx.cuh"
#include "cuda/mla_decode/warpspec/wgmma.cuh"

namespace mla_ext::decode::warpspec {

// Writes the warp's maximum of each row of s into red_max[warp][row] (the caller's barrier
// publishes it).
template <int kRowTiles>
__device__ __forceinline__ void write_row_max(const float (&s)[kRowTiles][4], float* red_max,
                                              int warp, int lane) {
  constexpr int kRows = 8 * kRowTiles;
  const int g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float mx = fmaxf(s[j][c], s[j][2 + c]);
#pragma unroll
      for (int off = 4; off < 32; off *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      if (g == 0) red_max[warp * kRows + 8 * j + 2 * tq + c] = mx;
    }
}

// Masks and scales this thread's scores (-inf where the token is past the tile or the sequence,
// or not visible to the row), then write_row_max.
template <int kRowTiles>
__device__ __forceinline__ void masked_row_max(float (&s)[kRowTiles][4], const float (&sacc)[16],
                                               bool in_a, int pos_a, bool in_b, int pos_b,
                                               const int (&last_visible)[kRowTiles][2],
                                               float scale_log2, float* red_max, int warp, int lane) {
#pragma unroll
  for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int lv = last_visible[j][c];
      s[j][c] = in_a && pos_a <= lv ? visible_score(sacc[4 * j + c] * scale_log2) : -INFINITY;
      s[j][2 + c] = in_b && pos_b <= lv ? visible_score(sacc[4 * j + 2 + c] * scale_log2)
                                        : -INFINITY;
    }
  write_row_max(s, red_max, warp, lane);
}

// After the barrier that published red_max: the tile maximum of each row over the four warps,
// the running maximum and sum, the factor alpha the output accumulators take, and P (hi, lo)
// packed per row tile for tokens a and b. Returns whether any alpha of this thread is not 1.
template <typename T, int kRowTiles>
__device__ __forceinline__ bool online_softmax_step(const float (&s)[kRowTiles][4],
                                                    const float* red_max, int lane,
                                                    float (&m_run)[kRowTiles][2],
                                                    float (&l_part)[kRowTiles][2],
                                                    float (&alpha)[kRowTiles][2],
                                                    uint32_t (&hi)[kRowTiles][2],
                                                    uint32_t (&lo)[kRowTiles][2]) {
  constexpr int kRows = 8 * kRowTiles;
  const int tq = lane % 4;
  bool rescale = false;
#pragma unroll
  for (int j = 0; j < kRowTiles; ++j) {
    float pa[2], pb[2], m_tile[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int w = 0; w < 4; ++w) {  // this thread's two columns are adjacent: one 8-byte load
      const float2 m2 = *reinterpret_cast<const float2*>(red_max + w * kRows + 8 * j + 2 * tq);
      m_tile[0] = fmaxf(m_tile[0], m2.x);
      m_tile[1] = fmaxf(m_tile[1], m2.y);
    }
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const float m_new = fmaxf(m_run[j][c], m_tile[c]);
      alpha[j][c] = m_new == -INFINITY ? 1.f : exp2f(m_run[j][c] - m_new);
      rescale |= alpha[j][c] != 1.f;
      m_run[j][c] = m_new;
      pa[c] = s[j][c] == -INFINITY ? 0.f : exp2f(s[j][c] - m_new);
      pb[c] = s[j][2 + c] == -INFINITY ? 0.f : exp2f(s[j][2 + c] - m_new);
      l_part[j][c] = l_part[j][c] * alpha[j][c] + pa[c] + pb[c];
    }
    const T ha0 = from_float<T>(pa[0]), ha1 = from_float<T>(pa[1]);
    const T hb0 = from_float<T>(pb[0]), hb1 = from_float<T>(pb[1]);
    hi[j][0] = pack2<T>(to_float<T>(ha0), to_float<T>(ha1));
    hi[j][1] = pack2<T>(to_float<T>(hb0), to_float<T>(hb1));
    lo[j][0] = pack2<T>(pa[0] - to_float<T>(ha0), pa[1] - to_float<T>(ha1));
    lo[j][1] = pack2<T>(pb[0] - to_float<T>(hb0), pb[1] - to_float<T>(hb1));
  }
  return rescale;
}

// P^T[row][token] into the swizzled K-major layouts the output GEMM reads (hi and lo): matrix m
// of a stmatrix.x4 is row tile jj + m / 2, tokens a (m even) or b of this warp; lane l gives row
// l % 8 of matrix l / 8.
template <int kRowTiles>
__device__ __forceinline__ void store_pt(uint32_t pt_hi, uint32_t pt_lo,
                                         const uint32_t (&hi)[kRowTiles][2],
                                         const uint32_t (&lo)[kRowTiles][2], int warp, int lane) {
  const int m = lane / 8, i = lane % 8;
#pragma unroll
  for (int jj = 0; jj < kRowTiles; jj += 2) {
    const int row = 8 * (jj + m / 2) + i, chunk = 2 * warp + m % 2;
    const uint32_t off = swizzled_offset(row, chunk);
    stmatrix_x4_trans(pt_hi + off, hi[jj][0], hi[jj][1], hi[jj + 1][0], hi[jj + 1][1]);
    stmatrix_x4_trans(pt_lo + off, lo[jj][0], lo[jj][1], lo[jj + 1][0], lo[jj + 1][1]);
  }
}

// O^T *= alpha per row, skipped when no thread of the warp has an alpha other than 1.
template <int kBlocks, int kRowTiles>
__device__ __forceinline__ void rescale_output(float (&acc)[kBlocks][16],
                                               const float (&alpha)[kRowTiles][2], bool rescale) {
  if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
    for (int mb = 0; mb < kBlocks; ++mb)
#pragma unroll
      for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          acc[mb][4 * j + c] *= alpha[j][c];
          acc[mb][4 * j + 2 + c] *= alpha[j][c];
        }
  }
}

}  // namespace mla_ext::decode::warpspec
