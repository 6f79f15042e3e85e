// Device body of the warp-specialized Hopper decode kernel (layout.h has the shapes): one CTA =
// one split x one chunk of up to 32 (query token, head) rows.
//
// Producer (lane 0 of the last warp): per tile, waits until its ring slot is free, reads the
// block-table entries of the tile's 16-token pieces, and issues one TMA box per piece and
// 64-column block of the latent and of the RoPE keys, all completing on the slot's full barrier.
// Consumers (two warpgroups, tile i on warpgroup i % 2): wait for the slot, zero the latent rows
// past the sequence end (a page's unused rows may hold anything), then
//   1. scores on wgmma, the latent part and per 8-row group the RoPE part into its 8 accumulator
//      columns, one commit group;
//   2. online softmax (base 2) in registers, the tile maximum per row over the four warps through
//      shared memory; P^T as two 16-bit terms (hi + lo, as the other kernels) stored with
//      stmatrix in the layout the output GEMM reads;
//   3. O^T = alpha O^T + C^T (P_hi + P_lo)^T on wgmma; then the slot goes back to the producer.
// Two warpgroup barriers per tile, no CTA-wide one. At the end the second consumer's (m, l, O^T)
// is merged into the first's through shared memory, which writes o_lat / lse (one split) or the
// fp32 partials combine.cu merges.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "core/split_plan.h"
#include "cuda/mla_decode/cta_work.cuh"
#include "cuda/mla_decode/dequant.cuh"
#include "cuda/mla_decode/ptx.cuh"
#include "cuda/mla_decode/warpspec/layout.h"
#include "cuda/mla_decode/warpspec/softmax.cuh"
#include "cuda/mla_decode/warpspec/tma.cuh"
#include "cuda/mla_decode/warpspec/wgmma.cuh"

namespace mla_ext::decode::warpspec {

constexpr int kRowTiles = kRows / 8;
constexpr int kPieces = kTileTokens / kPieceTokens;

// kBlocks: the latent's 64-channel blocks (D_c = 64 kBlocks); kRopeSteps: k16 steps of each
// 8-row group's RoPE window. Every wgmma sequence is straight-line code with compile-time counts
// (a wgmma under a runtime condition makes ptxas serialize them).
template <typename T, int kBlocks, int kRopeSteps, bool kQuantized>
struct WarpSpecializedDecode {
  static constexpr int kGroupBytes = (16 * kRopeSteps + 63) / 64 * 1024;

  // The cache rows of a tile's 16-token pieces (-1 past the sequence end) and how many are live.
  // The block-table entries load together, a piece past the end reading the last token's: under
  // per-piece conditions the compiler waited for each load in turn.
  static __device__ __forceinline__ int piece_rows(const MlaDecodeParams& p, const int32_t* table,
                                                   int tok0, int len, int (&row)[kPieces]) {
    int entry[kPieces], live = 0;
#pragma unroll
    for (int pc = 0; pc < kPieces; ++pc) {
      entry[pc] = __ldg(table + min(tok0 + pc * kPieceTokens, len - 1) / p.block_size);
    }
#pragma unroll
    for (int pc = 0; pc < kPieces; ++pc) {
      const int tok = tok0 + pc * kPieceTokens;
      row[pc] = tok < len ? entry[pc] * p.block_size + tok % p.block_size : -1;
      live += tok < len;
    }
    return live;
  }

  // Lane 0 of the producer warp: every tile of the split into the ring, in order.
  static __device__ __forceinline__ void produce(const MlaDecodeParams& p, const CUtensorMap* lat_map,
                                                 const CUtensorMap* rope_map, uint32_t ring,
                                                 uint32_t full, uint32_t empty, int b, int len,
                                                 int tile_begin, int n_tiles) {
    const SmemLayout& L = p.smem;
    const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_blocks;
    const uint32_t piece_bytes = (kBlocks + L.rope_blocks) * kBoxRows * 128;
    for (int it = 0; it < n_tiles; ++it) {
      const int slot = it % L.num_stages, use = it / L.num_stages;
      const int tok0 = (tile_begin + it) * kTileTokens;
      int row[kPieces];
      const int live = piece_rows(p, table, tok0, len, row);
      if (use > 0) mbar_wait(empty + 8 * slot, (use - 1) & 1);
      mbar_arrive_expect_tx(full + 8 * slot, live * piece_bytes);
      const uint32_t dst = ring + slot * L.stage_bytes;
#pragma unroll
      for (int pc = 0; pc < kPieces; ++pc) {
        if (row[pc] < 0) continue;
        const uint32_t piece = dst + pc * kBoxRows * 128;
#pragma unroll
        for (int cb = 0; cb < kBlocks; ++cb) {
          tma_load_2d(piece + cb * kBlockBytes, lat_map, cb * kChanBlock, row[pc], full + 8 * slot);
        }
        for (int rb = 0; rb < L.rope_blocks; ++rb) {
          tma_load_2d(piece + L.st_rope + rb * kBlockBytes, rope_map, rb * kChanBlock, row[pc],
                      full + 8 * slot);
        }
      }
    }
  }

  // The RoPE keys of a tile into its slot, one TMA box per live 16-token piece and 64-column
  // block, completing on the slot's full barrier (which this call arrives on, expecting them).
  static __device__ __forceinline__ void copy_rope_keys(const MlaDecodeParams& p,
                                                        const CUtensorMap* rope_map,
                                                        const int32_t* table, uint32_t dst,
                                                        uint32_t bar, int tok0, int len) {
    const SmemLayout& L = p.smem;
    int row[kPieces];
    const int live = piece_rows(p, table, tok0, len, row);
    mbar_arrive_expect_tx(bar, live * L.rope_blocks * kBoxRows * 128);
#pragma unroll
    for (int pc = 0; pc < kPieces; ++pc) {
      if (row[pc] < 0) continue;
      for (int rb = 0; rb < L.rope_blocks; ++rb) {
        tma_load_2d(dst + L.st_rope + pc * kBoxRows * 128 + rb * kBlockBytes, rope_map,
                    rb * kChanBlock, row[pc], bar);
      }
    }
  }

  // Thread 0 of the producer warpgroup: the stored bytes of tile t (latent rows, scales, int4
  // zeros) into raw slot `raw`, as one bulk copy per tensor where a page holds whole tiles, else
  // one per live 16-token piece (a piece's rows are contiguous in its page).
  template <int kFormat>
  static __device__ __forceinline__ void copy_stored_tile(const MlaDecodeParams& p,
                                                          const int32_t* table, uint32_t raw,
                                                          uint32_t bar, int tok0, int len) {
    const SmemLayout& L = p.smem;
    const int row_bytes = p.latent_row_bytes, group_bytes = p.num_groups * 2;
    const int tensors = kFormat == kFmtInt4 ? 3 : 2;
    const int piece_tokens = p.block_size % kTileTokens == 0 ? kTileTokens : kPieceTokens;
    int live = 0;
    for (int tok = tok0; tok < tok0 + kTileTokens; tok += piece_tokens) live += tok < len;
    mbar_arrive_expect_tx(bar, live * piece_tokens * (row_bytes + (tensors - 1) * group_bytes));
    for (int at = 0; at < kTileTokens; at += piece_tokens) {
      const int tok = tok0 + at;
      if (tok >= len) break;
      const int64_t row = static_cast<int64_t>(table[tok / p.block_size]) * p.block_size +
                          tok % p.block_size;
      bulk_load(raw + at * row_bytes, p.latent + row * row_bytes, piece_tokens * row_bytes, bar);
      bulk_load(raw + L.r_scale + at * group_bytes, p.latent_scale + row * group_bytes,
                piece_tokens * group_bytes, bar);
      if constexpr (kFormat == kFmtInt4) {
        bulk_load(raw + L.r_zero + at * group_bytes, p.latent_zero + row * group_bytes,
                  piece_tokens * group_bytes, bar);
      }
    }
  }

  // The producer warpgroup for a quantized latent (all 128 threads): per tile, waits for its
  // stored bytes and for the slot, has thread 0 copy the RoPE keys into the slot with TMA, and
  // dequantizes the latent into the slot in the 16-bit swizzled layout a float cache's TMA copy
  // gives (the consumers cannot tell them apart); then arrives on the slot's full barrier (128
  // arrivals + thread 0's for the keys) and refills the raw slot with a later tile. Rows past the
  // sequence end dequantize to whatever (zeroed by the consumer, as for a float cache).
  template <int kFormat>
  static __device__ __forceinline__ void produce_quantized(const MlaDecodeParams& p, uint8_t* smem,
                                                           const CUtensorMap* rope_map,
                                                           uint32_t ring, uint32_t full,
                                                           uint32_t empty, uint32_t raw_full,
                                                           int b, int len, int tile_begin,
                                                           int n_tiles) {
    constexpr int kChunks = 8 * kBlocks;  // 8-channel chunks per token
    const SmemLayout& L = p.smem;
    const int pt = threadIdx.x - kProducerWarp * 32;
    const int32_t* table = p.block_table + static_cast<int64_t>(b) * p.max_blocks;
    const uint32_t raw_base = smem_addr(smem + L.raw);
    if (pt == 0) {
      for (int t = 0; t < min(L.raw_slots, n_tiles); ++t) {
        copy_stored_tile<kFormat>(p, table, raw_base + t * L.raw_bytes, raw_full + 8 * t,
                                  (tile_begin + t) * kTileTokens, len);
      }
    }
    int slot = 0, use = 0, r = 0, r_phase = 0;
    for (int it = 0; it < n_tiles; ++it) {
      const int tok0 = (tile_begin + it) * kTileTokens;
      const uint32_t bar = full + 8 * slot;
      if (use > 0) mbar_wait(empty + 8 * slot, (use - 1) & 1);
      if (pt == 0) copy_rope_keys(p, rope_map, table, ring + slot * L.stage_bytes, bar, tok0, len);
      mbar_wait(raw_full + 8 * r, r_phase);
      const uint8_t* raw = smem + L.raw + r * L.raw_bytes;
      const __half* scale = reinterpret_cast<const __half*>(raw + L.r_scale);
      const __half* zero = reinterpret_cast<const __half*>(raw + L.r_zero);
      uint8_t* lat = smem + L.stages + slot * L.stage_bytes;
      for (int i = pt; i < kTileTokens * kChunks; i += 128) {
        const int row = i / kChunks, c8 = i % kChunks;
        const int g = p.group_shift >= 0 ? (8 * c8) >> p.group_shift : 8 * c8 / p.group_size;
        const float s = __half2float(scale[row * p.num_groups + g]);
        const float z = kFormat == kFmtInt4 ? __half2float(zero[row * p.num_groups + g]) : 0.f;
        float v[8];
        unpack8<kFormat>(raw + row * p.latent_row_bytes + c8 * chunk_bytes<kFormat>(), v);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = fmaf(v[j], s, z);
        *reinterpret_cast<uint4*>(lat + (c8 / 8) * kBlockBytes + swizzled_offset(row, c8 % 8)) =
            make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                       pack2<T>(v[6], v[7]));
      }
      fence_proxy_async();
      mbar_arrive(bar);
      named_barrier(kDequantBarrier, 128);  // raw slot r is read
      if (pt == 0 && it + L.raw_slots < n_tiles) {
        copy_stored_tile<kFormat>(p, table, raw_base + r * L.raw_bytes, raw_full + 8 * r,
                                  (tile_begin + it + L.raw_slots) * kTileTokens, len);
      }
      if (++slot == L.num_stages) {
        slot = 0;
        ++use;
      }
      if (++r == L.raw_slots) {
        r = 0;
        r_phase ^= 1;
      }
    }
  }

  // O^T += C^T (P_lo + P_hi)^T over the tile's four 16-token steps (issued only). lat_m: the
  // tile's M-major descriptor (8-token groups 1024 bytes apart, one 64-channel atom wide).
  static __device__ __forceinline__ void output_gemm(float (&acc)[kBlocks][16], uint64_t lat_m,
                                                     uint64_t pt_hi, uint64_t pt_lo) {
#pragma unroll
    for (int mb = 0; mb < kBlocks; ++mb) {
#pragma unroll
      for (int kt = 0; kt < kPieces; ++kt) {
        const uint64_t da = desc_add(lat_m, mb * kBlockBytes + kt * 2048);
        wgmma_m64n32k16<T, 1>(acc[mb], da, desc_add(pt_lo, kt * 32));
        wgmma_m64n32k16<T, 1>(acc[mb], da, desc_add(pt_hi, kt * 32));
      }
    }
  }

  // The start of 8-row group j's RoPE key window (a multiple of 16 columns): its first KV head's
  // keys, moved back where the window would pass the slot's RoPE columns. A function, not an
  // array indexed at run time: such an array lives in local memory, and the tile loop would
  // read it from there.
  static __device__ __forceinline__ int rope_window(const MlaDecodeParams& p, int row0,
                                                    int rows_here, int j) {
    const int first = 8 * j < rows_here ? ((row0 + 8 * j) % p.H) / (p.H / p.H_kv) * p.d_r : 0;
    return min(first, p.smem.rope_blocks * kChanBlock - 16 * kRopeSteps);
  }

  // Queries into the swizzled K-major B layouts: the latent part by cp.async (rows past
  // rows_here zero), the RoPE part block-diagonal per 8-row group: row n of group j holds its
  // query at its KV head's offset inside the group's key window, zeros elsewhere.
  static __device__ __forceinline__ void load_queries(const MlaDecodeParams& p, uint8_t* smem,
                                                      int ct, int row0, int rows_here,
                                                      int64_t q_row_base) {
    constexpr int kConsumerThreads = 128 * kConsumers;
    const SmemLayout& L = p.smem;
    const int c8_count = p.D_c / 8, group = p.H / p.H_kv;
    const T* q_lat = reinterpret_cast<const T*>(p.q_lat);
    const uint32_t q_base = smem_addr(smem + L.q);
    for (int idx = ct; idx < kRows * c8_count; idx += kConsumerThreads) {
      const int r = idx / c8_count, c8 = idx - r * c8_count;
      const bool live = r < rows_here;
      const T* src = live ? q_lat + (q_row_base + r) * p.D_c + c8 * 8 : q_lat;
      cp_async16(q_base + (c8 / 8) * (kRows * 128) + swizzled_offset(r, c8 % 8), src, live ? 16 : 0);
    }
    cp_async_commit();
    const uint16_t* q_rope = reinterpret_cast<const uint16_t*>(p.q_rope);
    constexpr int kChunks = kRows * 2 * kRopeSteps;  // 16-byte chunks: 8 elements each
    for (int idx = ct; idx < kChunks; idx += kConsumerThreads) {
      const int r = idx / (2 * kRopeSteps), kc = idx - r * (2 * kRopeSteps);
      const int j = r / 8, n = r % 8;
      uint16_t v[8];
      const int rel = r < rows_here ? ((row0 + r) % p.H) / group * p.d_r - rope_window(p, row0, rows_here, j) : 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int d = kc * 8 + e - rel;
        v[e] = r < rows_here && d >= 0 && d < p.d_r ? q_rope[(q_row_base + r) * p.d_r + d] : 0;
      }
      uint4 w;
      w.x = v[0] | (static_cast<uint32_t>(v[1]) << 16);
      w.y = v[2] | (static_cast<uint32_t>(v[3]) << 16);
      w.z = v[4] | (static_cast<uint32_t>(v[5]) << 16);
      w.w = v[6] | (static_cast<uint32_t>(v[7]) << 16);
      *reinterpret_cast<uint4*>(smem + L.rope_q + j * kGroupBytes + (kc / 8) * 1024 +
                                swizzled_offset(n, kc % 8)) = w;
    }
    cp_async_wait<0>();
  }

  static __device__ void run(const MlaDecodeParams& p, const CUtensorMap* lat_map,
                             const CUtensorMap* rope_map) {
#ifdef MLA_EXT_WGMMA
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const SmemLayout& L = p.smem;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    CtaWork w;
    if (!read_cta_work(p, w)) return;
    const int b = w.b, len = w.len, tile_begin = w.tile_begin, n_tiles = w.tile_end - w.tile_begin;
    const uint32_t ring = smem_addr(smem + L.stages);
    const uint32_t full = smem_addr(smem + L.mbar), empty = full + 8 * kMaxSlots;

    const uint32_t raw_full = empty + 8 * kMaxSlots;
    if (tid == 0) {
      for (int s = 0; s < L.num_stages; ++s) {
        // float: the producer lane's arrival with the copies' bytes; quantized: also each
        // producer thread's once its share of the dequantized tile is written
        mbar_init(full + 8 * s, kQuantized ? 1 + 128 : 1);
        mbar_init(empty + 8 * s, 4);  // one arrival per warp of the consumer that used the slot
      }
      for (int s = 0; kQuantized && s < L.raw_slots; ++s) mbar_init(raw_full + 8 * s, 1);
      mbar_init_fence();
    }
    __syncthreads();  // the barriers are initialized: the producer starts copying

    if (warp >= kProducerWarp) {
      setmaxnreg_dec<kProducerRegisters>();
      // a compile-time choice: the float kernel's code stays what it was without this path
      if constexpr (kQuantized) {
        switch (p.format) {
          case kFmtInt8:
            produce_quantized<kFmtInt8>(p, smem, rope_map, ring, full, empty, raw_full, b, len,
                                        tile_begin, n_tiles);
            break;
          case kFmtInt4:
            produce_quantized<kFmtInt4>(p, smem, rope_map, ring, full, empty, raw_full, b, len,
                                        tile_begin, n_tiles);
            break;
          default:
            produce_quantized<kFmtFp8>(p, smem, rope_map, ring, full, empty, raw_full, b, len,
                                       tile_begin, n_tiles);
        }
      } else if (warp == kProducerWarp && lane == 0) {
        produce(p, lat_map, rope_map, ring, full, empty, b, len, tile_begin, n_tiles);
      }
    } else {
      // the queries load while the first tiles do (their latency was the producer's to wait)
      load_queries(p, smem, tid, w.row0, w.rows_here, w.q_row_base);
      fence_proxy_async();
      named_barrier(3, 128 * kConsumers);
      setmaxnreg_inc<kConsumerRegisters>();
      consume(p, smem, ring, full, empty, w);
    }
#else
    __trap();  // launched only where the sm_90a code exists (api.cpp checks the binary)
#endif
  }

  // The two consumer warpgroups: alternate tiles, then the merge and the output.
  static __device__ __forceinline__ void consume(const MlaDecodeParams& p, uint8_t* smem,
                                                 uint32_t ring, uint32_t full, uint32_t empty,
                                                 const CtaWork& w) {
    const SmemLayout& L = p.smem;
    const int len = w.len, tile_begin = w.tile_begin, n_tiles = w.tile_end - w.tile_begin;
    const int row0 = w.row0, rows_here = w.rows_here;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    int win[kRowTiles];  // indexed by unrolled loops only: registers
#pragma unroll
    for (int j = 0; j < kRowTiles; ++j) win[j] = rope_window(p, row0, rows_here, j);

    // Consumer warpgroup cg; per thread its 8 accumulator columns (rows 8 j + 2 tq + c) and its
    // two tokens per tile (16 wwarp + g, + 8).
    // cg through a shuffle from lane 0: the compiler then knows it is warp-uniform, and what
    // derives from it (the tile loop, the slot addresses, the wgmma descriptors) stays in uniform
    // registers instead of being moved there (R2UR) before every wgmma.
    const int cg = __shfl_sync(0xffffffffu, warp / 4, 0), wwarp = warp % 4, wt = tid % 128;
    const int g = lane / 4, tq = lane % 4;
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

    // Descriptors of the operands at fixed addresses, built once; the per-k-step ones are these
    // moved by constants.
    const uint64_t q_desc = make_desc(smem_addr(smem + L.q), 16, 1024);
    const uint64_t rq_desc = make_desc(smem_addr(smem + L.rope_q), 16, 1024);
    const uint32_t pt_hi = smem_addr(smem + L.pt) + cg * 2 * (kRows * 128);
    const uint32_t pt_lo = pt_hi + kRows * 128;
    const uint64_t pt_hi_desc = make_desc(pt_hi, 16, 1024), pt_lo_desc = make_desc(pt_lo, 16, 1024);
    float* red_max = reinterpret_cast<float*>(smem + L.stats) + cg * 4 * kRows;
    const int tok_w = wwarp * kPieceTokens;
    // tiles ending at or before this are visible to every row: positions <= len - s_q + the
    // query token of the CTA's first row
    const int visible_end = len - p.s_q + row0 / p.H + 1;

    for (int it = cg; it < n_tiles; it += kConsumers) {
      const int slot = it % L.num_stages, use = it / L.num_stages;
      const uint32_t lat = ring + slot * L.stage_bytes;  // the RoPE keys follow at L.st_rope
      const int tok0 = (tile_begin + it) * kTileTokens;
      const int valid = min(kTileTokens, len - tok0);
      // A parity names a barrier's phase only modulo 2: waiting for phase `use` passes at once
      // while phase use - 1 is still pending. With an odd number of slots the slot's previous
      // tile (it - num_stages) is the other consumer's and its copy may still be landing (TMA
      // copies complete out of order), so first wait until that tile was consumed, which implies
      // it landed. With an even number it is this consumer's own and the wait passes at once.
      if (use > 0) mbar_wait(empty + 8 * slot, (use - 1) & 1);
      mbar_wait(full + 8 * slot, use & 1);
      if (valid < kTileTokens) {
        // rows past the end: whatever the page holds (or an earlier tile) times P = 0 could be
        // NaN; their scores are masked below
        uint4* lat_rows = reinterpret_cast<uint4*>(smem + L.stages + slot * L.stage_bytes);
        const int per_block = (kTileTokens - valid) * 8;
        for (int i = wt; i < kBlocks * per_block; i += 128) {
          const int blk = i / per_block, k = i - blk * per_block;
          lat_rows[blk * (kBlockBytes / 16) + valid * 8 + k] = make_uint4(0, 0, 0, 0);
        }
        fence_proxy_async();
        named_barrier(1 + cg, 128);
      }

      // 1. scores: 64 tokens x 32 rows; the latent part over D_c, then each group's RoPE window
      // into accumulators of its own, added after the wait
      float sacc[16], racc[kRowTiles][4];
      wgmma_fence();
      const uint64_t lat_k = make_desc(lat, 16, 1024);  // K-major: the score GEMM's A
#pragma unroll
      for (int ks = 0; ks < 4 * kBlocks; ++ks) {
        const uint32_t step = (ks / 4) * kBlockBytes + (ks % 4) * 32;
        wgmma_m64n32k16<T, 0>(sacc, desc_add(lat_k, step),
                              desc_add(q_desc, (ks / 4) * (kRows * 128) + (ks % 4) * 32), ks > 0 ? 1 : 0);
      }
#pragma unroll
      for (int j = 0; j < kRowTiles; ++j) {
#pragma unroll
        for (int s = 0; s < kRopeSteps; ++s) {
          const int unit = win[j] / 16 + s;  // 16-column units: 4 per 64-column block
          wgmma_m64n8k16<T>(racc[j], desc_add(lat_k, L.st_rope + (unit / 4) * kBlockBytes + (unit % 4) * 32),
                            desc_add(rq_desc, j * kGroupBytes + (s / 4) * 1024 + (s % 4) * 32),
                            s > 0 ? 1 : 0);
        }
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_accumulators(sacc);
#pragma unroll
      for (int j = 0; j < kRowTiles; ++j) {
        fence_accumulators(racc[j]);
#pragma unroll
        for (int k = 0; k < 4; ++k) sacc[4 * j + k] += racc[j][k];
      }

      // 2. softmax: mask, scale, the tile maximum per row over the four warps
      const int pos_a = tok0 + tok_w + g, pos_b = pos_a + 8;
      const bool in_a = pos_a < len, in_b = pos_b < len;
      float s[kRowTiles][4];
      if (tok0 + kTileTokens <= visible_end) {
        // every row sees the whole tile: no mask (rows past rows_here then get finite scores,
        // but nothing of theirs is written)
#pragma unroll
        for (int i = 0; i < 16; ++i) s[i / 4][i % 4] = visible_score(sacc[i] * p.softmax_scale_log2);
        write_row_max(s, red_max, wwarp, lane);
      } else {
        masked_row_max(s, sacc, in_a, pos_a, in_b, pos_b, last_visible, p.softmax_scale_log2,
                       red_max, wwarp, lane);
      }
      named_barrier(1 + cg, 128);
      float alpha[kRowTiles][2];
      uint32_t hi[kRowTiles][2], lo[kRowTiles][2];  // [j][token a / b]: packed (col 2tq, 2tq + 1)
      const bool rescale = online_softmax_step<T>(s, red_max, lane, m_run, l_part, alpha, hi, lo);
      store_pt(pt_hi, pt_lo, hi, lo, wwarp, lane);
      fence_proxy_async();
      named_barrier(1 + cg, 128);

      // 3. O^T = alpha O^T + C^T P^T
      rescale_output(acc, alpha, rescale);
#pragma unroll
      for (int mb = 0; mb < kBlocks; ++mb) fence_accumulators(acc[mb]);
      wgmma_fence();
      output_gemm(acc, make_desc(lat, kBlockBytes, 1024), pt_hi_desc, pt_lo_desc);
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int mb = 0; mb < kBlocks; ++mb) fence_accumulators(acc[mb]);
      if (lane == 0) mbar_arrive(empty + 8 * slot);
    }

    // Row sums over the 8 lanes of a column, per warp into shared memory.
    float* red_sum = reinterpret_cast<float*>(smem + L.stats) + cg * 4 * kRows;
    float* m_second = reinterpret_cast<float*>(smem + L.stats) + kConsumers * 4 * kRows;
#pragma unroll
    for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float l = l_part[j][c];
#pragma unroll
        for (int off = 4; off < 32; off *= 2) l += __shfl_xor_sync(0xffffffffu, l, off);
        l_part[j][c] = l;
      }
    // Both consumers are past their last tile (and past every read of red_max): the ring and
    // the statistics are free.
    named_barrier(3, 128 * kConsumers);
#pragma unroll
    for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int r = 8 * j + 2 * tq + c;
        if (g == 0) red_sum[wwarp * kRows + r] = l_part[j][c];
        if (cg == 1 && wwarp == 0 && g == 0) m_second[r] = m_run[j][c];
      }
    float* xfer = reinterpret_cast<float*>(smem + L.stages);  // [kBlocks * 16][128]
    if (cg == 1) {
#pragma unroll
      for (int mb = 0; mb < kBlocks; ++mb)
#pragma unroll
        for (int k = 0; k < 16; ++k) xfer[(mb * 16 + k) * 128 + wt] = acc[mb][k];
    }
    named_barrier(3, 128 * kConsumers);
    if (cg == 1) return;

    // The first consumer merges: m = max(m0, m1), each side scaled by 2^(m_i - m).
    const float* sum0 = red_sum;
    const float* sum1 = red_sum + 4 * kRows;
    float sc0[kRowTiles][2], sc1[kRowTiles][2], inv_l[kRowTiles][2];
    int row_off[kRowTiles][2];
#pragma unroll
    for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int r = 8 * j + 2 * tq + c;
        const float m0 = m_run[j][c], m1 = m_second[r], m = fmaxf(m0, m1);
        sc0[j][c] = m0 == -INFINITY ? 0.f : exp2f(m0 - m);
        sc1[j][c] = m1 == -INFINITY ? 0.f : exp2f(m1 - m);
        float l0 = 0.f, l1 = 0.f;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          l0 += sum0[w * kRows + r];
          l1 += sum1[w * kRows + r];
        }
        const float l = l0 * sc0[j][c] + l1 * sc1[j][c];
        inv_l[j][c] = row_inv_sum(l);
        row_off[j][c] = r < rows_here ? r * p.D_c : -1;
        if (wwarp == 0 && g == 0 && r < rows_here) store_row_lse(p, w, r, row_lse(m, l));
      }
    const CtaOutput<T> out(p, w);
#pragma unroll
    for (int mb = 0; mb < kBlocks; ++mb) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int chan = mb * kChanBlock + 16 * wwarp + g + 8 * h;
#pragma unroll
        for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            if (row_off[j][c] < 0) continue;
            const int k = 4 * j + 2 * h + c;
            out.store(row_off[j][c] + chan,
                      (acc[mb][k] * sc0[j][c] + xfer[(mb * 16 + k) * 128 + wt] * sc1[j][c]) *
                          inv_l[j][c]);
          }
      }
    }
  }
};

template <typename T, int kBlocks, int kRopeSteps, bool kQuantized>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_warpspec_kernel(const __grid_constant__ MlaDecodeParams params,
                               const __grid_constant__ CUtensorMap lat_map,
                               const __grid_constant__ CUtensorMap rope_map) {
  WarpSpecializedDecode<T, kBlocks, kRopeSteps, kQuantized>::run(params, &lat_map, &rope_map);
}

}  // namespace mla_ext::decode::warpspec
