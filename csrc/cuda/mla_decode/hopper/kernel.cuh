// Device body of the Hopper decode kernel (layout.h has the shapes): one CTA = one warpgroup =
// one split x one chunk of up to 32 (query token, head) rows. Latent tiles stream through a ring
// of `slots` shared-memory slots and RoPE keys through a ring of slots - 1 (cp.async; a RoPE slot
// is refilled once the tile's RoPE score has read it). Per tile:
//   1. scores on wgmma (A = the latent tile, K-major; B = the CTA's queries), asynchronous; the
//      latent copies of the tile slots - 1 ahead are issued meanwhile; then each warp adds the
//      RoPE scores of its 16 tokens with mma.sync into the same accumulators (the wgmma
//      accumulator of a warp is the m16n8 fragment of its 16 tokens, repeated per 8 rows), with
//      the block-diagonal queries of the mma.sync kernel;
//   2. online softmax (base 2) in registers: per row the tile maximum over the four warps through
//      shared memory; P^T as two 16-bit terms (hi + lo, as the mma.sync kernel) stored with
//      stmatrix into the swizzled K-major layout the output GEMM reads; the RoPE copies of the
//      tile slots - 1 ahead go into the slot just read;
//   3. O^T = alpha O^T + C^T (P_hi + P_lo)^T on wgmma (A = the same latent tile, M-major).
// Three barriers per tile. Sequences with one split write o_lat and lse directly, split ones the
// fp32 partials that combine.cu merges (as the mma.sync kernel).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "core/split_plan.h"
#include "cuda/mla_decode/hopper/layout.h"
#include "cuda/mla_decode/hopper/softmax.cuh"
#include "cuda/mla_decode/hopper/wgmma.cuh"
#include "cuda/mla_decode/ptx.cuh"
#include "cuda/mla_decode/rope_queries.cuh"

namespace mla_ext::decode::hopper {

// kBlocks: the latent's 64-channel blocks (D_c = 64 kBlocks). Every wgmma sequence is straight-line
// code with compile-time counts: a wgmma under a runtime condition makes ptxas insert a
// warpgroup.arrive before it, which waits for the previous wgmma to finish (one MMA at a time).
template <typename T, int kBlocks>
struct HopperDecodeKernel {
  static constexpr bool kHalf = std::is_same_v<T, __half>;
  static constexpr int kMaxPieces = kGemmTokens / kPieceTokens;

  // Block-table entries and in-block offsets of a tile's pieces (-1: past the sequence end).
  struct TileBlocks {
    int blk[kMaxPieces], offset[kMaxPieces];
  };

  static __device__ __forceinline__ TileBlocks tile_blocks(const MlaDecodeParams& p, int b,
                                                           int len, int tile, int pieces) {
    TileBlocks t;
#pragma unroll
    for (int pc = 0; pc < kMaxPieces; ++pc) {
      const int tok = tile * p.tile_tokens + pc * kPieceTokens;
      const bool live = pc < pieces && tok < len;
      t.blk[pc] = live ? p.block_table[static_cast<int64_t>(b) * p.max_blocks + tok / p.block_size] : -1;
      t.offset[pc] = tok % p.block_size;
    }
    return t;
  }

  // O^T += C^T (P_lo + P_hi)^T over kPieces 16-token steps, per 64-channel block (issued only:
  // the caller commits and waits).
  template <int kPieces>
  static __device__ __forceinline__ void output_gemm(float (&acc)[kBlocks][16], uint32_t lat,
                                                     int block_bytes, uint32_t pt_hi,
                                                     uint32_t pt_lo) {
#pragma unroll
    for (int mb = 0; mb < kBlocks; ++mb) {
#pragma unroll
      for (int kt = 0; kt < kPieces; ++kt) {
        // M-major A: 8-token groups 1024 bytes apart (SBO); one 64-channel atom wide (LBO unused)
        const uint64_t da = make_desc(lat + mb * block_bytes + kt * 2048, block_bytes, 1024);
        wgmma_m64n32k16<T, 1>(acc[mb], da, make_desc(pt_lo + kt * 32, 16, 1024));
        wgmma_m64n32k16<T, 1>(acc[mb], da, make_desc(pt_hi + kt * 32, 16, 1024));
      }
    }
  }

  static __device__ void run(const MlaDecodeParams& p) {
#ifdef MLA_EXT_WGMMA
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const SmemLayout& L = p.smem;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, tq = lane % 4;
    const int part = blockIdx.x / p.row_chunks, chunk = blockIdx.x % p.row_chunks;
    const int32_t* work = p.plan + kPlanHeader + 4 * part;
    const int b = work[0];
    if (b < 0) return;
    const int tile_begin = work[1], tile_end = work[2];
    const int num_splits = p.plan[kPlanHeader + 4 * plan_capacity(p.B) + 2 * b + 1];
    const int len = p.seq_lens[b];
    const int row0 = chunk * p.rows_per_cta;
    const int rows_here = min(p.rows_per_cta, p.rows - row0);
    const int tile_tokens = p.tile_tokens, pieces = tile_tokens / kPieceTokens;
    const int lat_slots = L.num_stages, rope_slots = L.rope_slots;
    int kv_lo, kv_cnt;
    cta_kv_range(p, row0, rows_here, kv_lo, kv_cnt);

    // This thread's latent copies: 16-byte column c8 of a piece's rows t0, t0 + tstep, ... < 16
    // (threads past tstep * (D_c / 8) copy nothing).
    const int c8_count = p.D_c / 8;
    const int lat_c8 = tid % c8_count, lat_tstep = kThreads / c8_count;
    const int lat_t0 = tid < lat_tstep * c8_count ? tid / c8_count : kPieceTokens;
    const int lat_dst_col = (lat_c8 / 8) * L.lat_block_bytes;
    // RoPE copies: 16-byte chunk `col` of the CTA's kv_cnt heads' keys (d_r % 8 == 0, 16-bit
    // keys), stepped through (token, chunk) pairs without a division per copy.
    const int rope_cols = kv_cnt * p.d_r / 8, per_head = p.d_r / 8;
    const int rope_src_pitch = p.H_kv * p.d_r * 2;
    const int rope_step_t = kThreads / rope_cols, rope_step_c = kThreads - rope_step_t * rope_cols;

    const uint32_t lat_base = smem_addr(smem + L.stages);
    auto issue_latent = [&](int tile, const TileBlocks& tb) {
      const int slot = (tile - tile_begin) % lat_slots;
      const uint32_t dst0 = lat_base + slot * L.stage_bytes + lat_dst_col;
      const int tok0 = tile * tile_tokens;
#pragma unroll
      for (int pc = 0; pc < kMaxPieces; ++pc) {
        if (pc >= pieces) break;
        const int blk = tb.blk[pc];
        const int64_t slot_row = static_cast<int64_t>(blk) * p.block_size + tb.offset[pc];
        for (int r = lat_t0; r < kPieceTokens; r += lat_tstep) {
          const int t = pc * kPieceTokens + r;
          const bool live = blk >= 0 && tok0 + t < len;
          const uint8_t* src = live ? p.latent + ((slot_row + r) * p.D_c + lat_c8 * 8) * 2 : p.latent;
          cp_async16(dst0 + swizzled_offset(t, lat_c8 % 8), src, live ? 16 : 0);
        }
      }
    };
    auto issue_rope = [&](int tile, const TileBlocks& tb) {
      const int slot = (tile - tile_begin) % rope_slots;
      uint8_t* dst0 = smem + L.rope_ring + slot * L.rope_slot_bytes;
#pragma unroll
      for (int pc = 0; pc < kMaxPieces; ++pc) {
        if (pc >= pieces) break;
        const int blk = tb.blk[pc];
        if (blk < 0) continue;  // past the end: masked, never read as a score
        const uint8_t* src0 = p.k_rope + (static_cast<int64_t>(blk) * p.block_size + tb.offset[pc]) * rope_src_pitch;
        uint8_t* dst = dst0 + pc * kPieceTokens * L.rope_ld;
        int r = tid / rope_cols, c = tid - r * rope_cols;
        while (r < kPieceTokens) {
          const int h = c / per_head, w = c - h * per_head;
          int kv = kv_lo + h;
          if (kv >= p.H_kv) kv -= p.H_kv;
          cp_async16(smem_addr(dst + r * L.rope_ld + h * L.rope_kvb + w * 16),
                     src0 + r * rope_src_pitch + kv * p.d_r * 2 + w * 16);
          r += rope_step_t;
          c += rope_step_c;
          if (c >= rope_cols) {
            c -= rope_cols;
            ++r;
          }
        }
      }
    };

    // Queries into the swizzled K-major B layout (rows past rows_here zero), in the first copy
    // group; then the prologue's tiles as the steady state issues them: per tile one group of
    // latent copies, then one of RoPE copies.
    const int64_t q_row_base = static_cast<int64_t>(b) * p.rows + row0;
    {
      const T* q_lat = reinterpret_cast<const T*>(p.q_lat);
      const uint32_t q_base = smem_addr(smem + L.q);
      for (int idx = tid; idx < kRows * c8_count; idx += kThreads) {
        const int r = idx / c8_count, c8 = idx % c8_count;
        const bool live = r < rows_here;
        const T* src = live ? q_lat + (q_row_base + r) * p.D_c + c8 * 8 : q_lat;
        cp_async16(q_base + (c8 / 8) * (kRows * 128) + swizzled_offset(r, c8 % 8), src, live ? 16 : 0);
      }
    }
    TileBlocks next = tile_blocks(p, b, len, tile_begin, pieces);
    for (int v = 1 - lat_slots; v < 0; ++v) {
      const int ahead = tile_begin + v + lat_slots - 1;  // latent and RoPE of tile `ahead`
      const bool live = ahead < tile_end;
      if (live) issue_latent(ahead, next);
      cp_async_commit();
      if (live) issue_rope(ahead, next);
      cp_async_commit();
      if (live) next = tile_blocks(p, b, len, ahead + 1, pieces);
    }

    setup_rope_queries<kHalf, kThreads, kRowTiles>(p, smem, L, row0, rows_here, kv_lo, q_row_base);

    // Per thread: its 8 accumulator columns (rows 8 j + 2 tq + c) and its two tokens per tile
    // (16 warp + g, + 8).
    float m_run[kRowTiles][2], l_part[kRowTiles][2];
    int last_visible[kRowTiles][2];
#pragma unroll
    for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int r = 8 * j + 2 * tq + c;
        m_run[j][c] = -INFINITY;
        l_part[j][c] = 0.f;
        // positions <= this are visible to row r; a row past rows_here sees none
        last_visible[j][c] = r < rows_here ? len - p.s_q + (row0 + r) / p.H : -1;
      }
    float acc[kBlocks][16];
#pragma unroll
    for (int i = 0; i < kBlocks; ++i)
#pragma unroll
      for (int k = 0; k < 16; ++k) acc[i][k] = 0.f;

    const uint32_t q_base = smem_addr(smem + L.q);
    const uint32_t pt_hi = smem_addr(smem + L.pt), pt_lo = smem_addr(smem + L.pt_lo);
    float* red_max = reinterpret_cast<float*>(smem + L.stats);  // [4 warps][32 rows]
    const int* rope_tab = reinterpret_cast<const int*>(smem + L.rope_tab);
    const uint16_t* rq_base = reinterpret_cast<const uint16_t*>(smem + L.rope_q) +
                              (lane % 8) * L.rope_q_ld + ((lane % 16) / 8) * 8;
    // groups committed after the ones a tile waits for: the RoPE copies of the tile are the
    // later of its two groups, followed by two groups per tile in between
    const int pending = 2 * (rope_slots - 1);

    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int it = tile - tile_begin;
      const int lslot = it % lat_slots, rslot = it % rope_slots;
      const uint32_t lat = lat_base + lslot * L.stage_bytes;
      cp_async_wait_pending(pending);
      fence_proxy_async();
      __syncthreads();

      // 1. scores: 64 tokens x 32 rows, K = D_c in steps of 16 channels
      float sacc[16];
#pragma unroll
      for (int k = 0; k < 16; ++k) sacc[k] = 0.f;
      fence_accumulators(sacc);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < 4 * kBlocks; ++ks) {
        const uint64_t da = make_desc(lat + (ks / 4) * L.lat_block_bytes + (ks % 4) * 32, 16, 1024);
        const uint64_t db = make_desc(q_base + (ks / 4) * (kRows * 128) + (ks % 4) * 32, 16, 1024);
        wgmma_m64n32k16<T, 0>(sacc, da, db, ks > 0 ? 1 : 0);
      }
      wgmma_commit();
      {
        // the latent slot tile - 1 used is free (every warp is past its output GEMM)
        const int ahead = tile + lat_slots - 1;
        if (ahead < tile_end) issue_latent(ahead, next);
        cp_async_commit();
      }
      wgmma_wait<0>();
      fence_accumulators(sacc);

      // RoPE scores of this warp's 16 tokens, per row tile one chain over its runs
      const int tok_w = warp * kPieceTokens;
      if (tok_w < tile_tokens) {
        const uint8_t* rope = smem + L.rope_ring + rslot * L.rope_slot_bytes + tok_w * L.rope_ld;
#pragma unroll
        for (int j = 0; j < kRowTiles; ++j) {
          const int* tab = rope_tab + j * L.rope_tab_ld;
          const int steps = tab[0];
          const uint16_t* rq_row = rq_base + j * 8 * L.rope_q_ld;
          float cj[4] = {sacc[4 * j], sacc[4 * j + 1], sacc[4 * j + 2], sacc[4 * j + 3]};
          for (int s = 0; s < steps; ++s) {
            const uint32_t offs = static_cast<uint32_t>(tab[kRopeTabHeader + s]);
            uint32_t bq[2], a[4];
            ldmatrix_x2(bq, rq_row + s * 16);
            ldmatrix_x4(a, rope + (lane % 16) * L.rope_ld + (lane < 16 ? offs & 0xFFFFu : offs >> 16));
            mma16816<T>(cj, a, bq);
          }
#pragma unroll
          for (int k = 0; k < 4; ++k) sacc[4 * j + k] = cj[k];
        }
      }

      // 2. softmax: mask, scale, the tile maximum per row over the four warps
      const int tok0 = tile * tile_tokens;
      const int pos_a = tok0 + tok_w + g, pos_b = pos_a + 8;
      const bool in_a = tok_w + g < tile_tokens && pos_a < len;
      const bool in_b = tok_w + g + 8 < tile_tokens && pos_b < len;
      float s[kRowTiles][4];
      masked_row_max(s, sacc, in_a, pos_a, in_b, pos_b, last_visible, p.softmax_scale_log2, red_max,
                     warp, lane);
      __syncthreads();
      {
        // every warp is past its RoPE score: the slot takes the RoPE keys of tile + slots - 1
        const int ahead = tile + lat_slots - 1;
        if (ahead < tile_end) {
          issue_rope(ahead, next);
          if (ahead + 1 < tile_end) next = tile_blocks(p, b, len, ahead + 1, pieces);
        }
        cp_async_commit();
      }
      float alpha[kRowTiles][2];
      uint32_t hi[kRowTiles][2], lo[kRowTiles][2];  // [j][token a / b]: packed (col 2tq, 2tq + 1)
      const bool rescale = online_softmax_step<T>(s, red_max, lane, m_run, l_part, alpha, hi, lo);
      store_pt(pt_hi, pt_lo, hi, lo, warp, lane);
      fence_proxy_async();
      __syncthreads();

      // 3. O^T = alpha O^T + C^T P^T: per 64-channel block and 16-token step, lo terms then hi
      rescale_output(acc, alpha, rescale);
#pragma unroll
      for (int mb = 0; mb < kBlocks; ++mb) fence_accumulators(acc[mb]);
      wgmma_fence();
      if (pieces == kMaxPieces) {
        output_gemm<kMaxPieces>(acc, lat, L.lat_block_bytes, pt_hi, pt_lo);
      } else {
        output_gemm<kMaxPieces - 1>(acc, lat, L.lat_block_bytes, pt_hi, pt_lo);
      }
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int mb = 0; mb < kBlocks; ++mb) fence_accumulators(acc[mb]);
    }
    cp_async_wait<0>();

    // Finalize: l per row over the 8 lanes of a column and the four warps; o = acc / l;
    // lse = ln 2 * (m + log2 l); o = 0, lse = -inf where nothing was visible.
    float* red_sum = red_max + 4 * kRows;
#pragma unroll
    for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float l = l_part[j][c];
#pragma unroll
        for (int off = 4; off < 32; off *= 2) l += __shfl_xor_sync(0xffffffffu, l, off);
        if (g == 0) red_sum[warp * kRows + 8 * j + 2 * tq + c] = l;
      }
    __syncthreads();
    const bool split = num_splits > 1;
    float inv_l[kRowTiles][2];
    int row_off[kRowTiles][2];
#pragma unroll
    for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int r = 8 * j + 2 * tq + c;
        const float l = red_sum[r] + red_sum[kRows + r] + red_sum[2 * kRows + r] + red_sum[3 * kRows + r];
        inv_l[j][c] = l > 0.f ? 1.f / l : 0.f;
        row_off[j][c] = r < rows_here ? r * p.D_c : -1;
        if (warp == 0 && g == 0 && r < rows_here) {
          const float lse = l > 0.f ? 0.69314718056f * (m_run[j][c] + log2f(l)) : -INFINITY;
          if (split) {
            p.ws_lse[static_cast<int64_t>(part) * p.rows + row0 + r] = lse;
          } else {
            p.lse[q_row_base + r] = lse;
          }
        }
      }
    T* o_out = reinterpret_cast<T*>(p.o_lat) + q_row_base * p.D_c;
    float* ws_out = p.ws_o + (static_cast<int64_t>(part) * p.rows + row0) * p.D_c;
#pragma unroll
    for (int mb = 0; mb < kBlocks; ++mb) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int chan = mb * kChanBlock + 16 * warp + g + 8 * h;
#pragma unroll
        for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            if (row_off[j][c] < 0) continue;
            const float v = acc[mb][4 * j + 2 * h + c] * inv_l[j][c];
            if (split) {
              ws_out[row_off[j][c] + chan] = v;
            } else {
              o_out[row_off[j][c] + chan] = from_float<T>(v);
            }
          }
      }
    }
#else
    __trap();  // launched only where the sm_90a code exists (api.cpp checks the binary)
#endif
  }
};

template <typename T, int kBlocks>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_hopper_kernel(const __grid_constant__ MlaDecodeParams params) {
  HopperDecodeKernel<T, kBlocks>::run(params);
}

}  // namespace mla_ext::decode::hopper
