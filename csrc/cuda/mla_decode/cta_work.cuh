// What one decode CTA computes, as the split plan (core/split_plan.h) says, and where its
// results go: shared by the mma.sync and the warp-specialized kernels. The grid is
// parts x row_chunks: part blockIdx.x / row_chunks of the plan, over rows_per_cta of the
// (query token, head) rows.
#pragma once

#include <cstdint>

#include "core/split_plan.h"
#include "cuda/mla_decode/ptx.cuh"
#include "cuda/mla_decode/traits.h"

namespace mla_ext::decode {

struct CtaWork {
  int part;                   // the plan's work entry
  int b;                      // the sequence
  int tile_begin, tile_end;   // its tiles this CTA takes
  int num_splits;             // the sequence's splits: 1 writes o and lse, more the partials
  int len;                    // the sequence's length
  int row0, rows_here;        // the CTA's rows: row0 .. row0 + rows_here - 1 of the sequence's
  int64_t q_row_base;         // row0's index among all B x rows rows

  __device__ __forceinline__ bool split() const { return num_splits > 1; }
};

// The CTA's work; false for an idle part of the grid (the plan covers fewer parts).
__device__ __forceinline__ bool read_cta_work(const MlaDecodeParams& p, CtaWork& w) {
  w.part = blockIdx.x / p.row_chunks;
  const int chunk = blockIdx.x % p.row_chunks;
  const int32_t* work = p.plan + kPlanHeader + 4 * w.part;
  w.b = work[0];
  if (w.b < 0) return false;
  w.tile_begin = work[1];
  w.tile_end = work[2];
  w.num_splits = p.plan[kPlanHeader + 4 * plan_capacity(p.B) + 2 * w.b + 1];
  w.len = p.seq_lens[w.b];
  w.row0 = chunk * p.rows_per_cta;
  w.rows_here = min(p.rows_per_cta, p.rows - w.row0);
  w.q_row_base = static_cast<int64_t>(w.b) * p.rows + w.row0;
  return true;
}

// 1 / l of a row's softmax sum: 0 where the row saw no token (o = 0), NaN where l is NaN.
__device__ __forceinline__ float row_inv_sum(float l) { return l == 0.f ? 0.f : 1.f / l; }

// The outputs of the CTA's rows: o and lse of an unsplit sequence, else the split's fp32
// partials (ws_o, ws_lse) that combine.cu merges.
template <typename T>
struct CtaOutput {
  T* o;
  float* ws_o;
  bool split;

  __device__ __forceinline__ CtaOutput(const MlaDecodeParams& p, const CtaWork& w)
      : o(reinterpret_cast<T*>(p.o_lat) + w.q_row_base * p.D_c),
        ws_o(p.ws_o + (static_cast<int64_t>(w.part) * p.rows + w.row0) * p.D_c),
        split(w.split()) {}

  // Element `off` (row * D_c + channel) of the CTA's rows.
  __device__ __forceinline__ void store(int off, float v) const {
    if (split) {
      ws_o[off] = v;
    } else {
      o[off] = from_float<T>(v);
    }
  }
};

// The lse of the CTA's row r.
__device__ __forceinline__ void store_row_lse(const MlaDecodeParams& p, const CtaWork& w, int r,
                                              float lse) {
  if (w.split()) {
    p.ws_lse[static_cast<int64_t>(w.part) * p.rows + w.row0 + r] = lse;
  } else {
    p.lse[w.q_row_base + r] = lse;
  }
}

}  // namespace mla_ext::decode
