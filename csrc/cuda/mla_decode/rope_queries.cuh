// What the mma.sync decode kernel sets up per CTA for the RoPE score: the KV heads a CTA's rows
// use, each row tile's step table and the block-diagonal RoPE queries (traits.h SmemLayout:
// rope_tab, rope_q).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/mla_decode/traits.h"

namespace mla_ext::decode {

// KV heads of rows row0 .. row0 + rows_here - 1: a cyclic range [kv_lo, kv_lo + kv_cnt). Rows
// that wrap past head H - 1 (the next query token) go on from KV head 0, and may come back to
// kv_lo's own head: then the CTA needs every KV head.
__device__ __forceinline__ void cta_kv_range(const MlaDecodeParams& p, int row0, int rows_here,
                                             int& kv_lo, int& kv_cnt) {
  const int group = p.H / p.H_kv;
  if (rows_here >= p.H) {
    kv_lo = 0;
    kv_cnt = p.H_kv;
    return;
  }
  kv_lo = (row0 % p.H) / group;
  const int kv_last = ((row0 + rows_here - 1) % p.H) / group;
  const bool wraps = row0 % p.H + rows_here > p.H;
  kv_cnt = wraps ? p.H_kv - kv_lo + kv_last + 1 : kv_last - kv_lo + 1;
  if (kv_cnt >= p.H_kv) {
    kv_lo = 0;
    kv_cnt = p.H_kv;
  }
}

// The RoPE runs of each row tile and its step table, then the block-diagonal queries: row r's
// query in the k-units of its run, zeros elsewhere (k = run * d_r_pad + d). This thread's query
// elements tid + j * kThreads (row, dimension stepped: no division per element) are loaded
// first, so that their latency overlaps the table's setup. Ends with every query in place
// (a barrier inside, none after the last stores: the caller's next barrier publishes them).
template <bool kHalf, int kThreads, int kRowTiles>
__device__ __forceinline__ void setup_rope_queries(const MlaDecodeParams& p, uint8_t* smem,
                                                   const SmemLayout& L, int row0, int rows_here,
                                                   int kv_lo, int64_t q_row_base) {
  constexpr int kPerThread = kRowTiles * 8 * 64 / kThreads;  // rows x d_r <= this many each
  static_assert(kPerThread * kThreads == kRowTiles * 8 * 64);
  const int tid = threadIdx.x, group = p.H / p.H_kv;
  int rq_r[kPerThread], rq_d[kPerThread];
  uint32_t q_bits[kPerThread];
  {
    const uint16_t* q_rope = reinterpret_cast<const uint16_t*>(p.q_rope) + q_row_base * p.d_r;
    const int step_r = kThreads / p.d_r, step_d = kThreads - step_r * p.d_r;
    int r = tid / p.d_r, d = tid - r * p.d_r;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      rq_r[j] = r;
      rq_d[j] = d;
      q_bits[j] = r < rows_here ? q_rope[tid + j * kThreads] : 0u;
      r += step_r;
      d += step_d;
      if (d >= p.d_r) {
        d -= p.d_r;
        ++r;
      }
    }
  }
  int* tab = reinterpret_cast<int*>(smem + L.rope_tab);
  const int upr = p.d_r_pad / 8;  // k-units of a run
  if (tid < kRowTiles) {
    int* t = tab + tid * L.rope_tab_ld;
    int runs = 0, prev = -1, run_kvl[8];
    for (int j = 0; j < 8; ++j) {
      const int lr = tid * 8 + j;
      int run = -1;
      if (lr < rows_here) {
        const int kvl = ((row0 + lr) % p.H / group - kv_lo + p.H_kv) % p.H_kv;
        if (kvl != prev) run_kvl[runs++] = kvl;
        prev = kvl;
        run = runs - 1;
      }
      t[1 + j] = run;
    }
    const int units = runs * upr, steps = (units + 1) / 2;
    t[0] = steps;
    for (int s = 0; s < steps; ++s) {
      int off[2];
      for (int h = 0; h < 2; ++h) {
        // past the last unit (an odd count): run 0's keys, finite, times a zero query
        const int u = 2 * s + h < units ? 2 * s + h : 0;
        off[h] = run_kvl[u / upr] * L.rope_kvb + (u % upr) * 8 * p.rope_esize;
      }
      t[kRopeTabHeader + s] = off[0] | (off[1] << 16);
    }
  }
  uint16_t* rq = reinterpret_cast<uint16_t*>(smem + L.rope_q);
  {
    const int words = p.rows_per_cta * L.rope_q_ld / 8;  // rope_q_ld: a multiple of 8
    for (int i = tid; i < words; i += kThreads) reinterpret_cast<uint4*>(rq)[i] = make_uint4(0, 0, 0, 0);
  }
  __syncthreads();
  // fp8 keys take fp16 queries: bf16 ones are converted, 16-bit ones of the MMA's type kept.
  const bool to_half = p.rope_path == kRopeFp8Keys && !kHalf;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int r = rq_r[j];
    if (r >= rows_here) break;  // r grows with j
    const int run = tab[(r / 8) * L.rope_tab_ld + 1 + r % 8];
    uint16_t bits = static_cast<uint16_t>(q_bits[j]);
    if (to_half) {
      const __half h = __float2half_rn(__uint_as_float(q_bits[j] << 16));
      bits = *reinterpret_cast<const uint16_t*>(&h);
    }
    rq[r * L.rope_q_ld + run * p.d_r_pad + rq_d[j]] = bits;
  }
}

}  // namespace mla_ext::decode
