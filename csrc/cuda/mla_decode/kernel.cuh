// Device body of mla_decode: one CTA = one split (a run of tiles of one sequence) x one chunk of
// (new token, head) rows. A tile is one or two 16-token pieces (config.h); the cache streams
// through a ring of shared-memory stages (cp.async, up to kMaxStages - 1 tiles in flight).
// Per tile:
//   1. S^T = C Q^T on tensor cores (m16n8k16; tokens on M, rows on N = 8). Each warp owns one
//      16 x 8 score block (or a share of its latent channels in the widest bucket) and adds the
//      block's RoPE scores to the same accumulators: one MMA chain whose K runs over the keys of
//      the block's runs of rows sharing a KV head, against block-diagonal queries (each row's
//      query in its own head's K range, zeros elsewhere); the scores go to shared memory; barrier;
//   2. the next tile's copies are issued; per row: mask, online softmax (base 2), P^T to shared
//      memory as two 16-bit terms (hi + lo: P to ~16 bits, not the 8 of one bf16, so that the
//      output matches fp32 attention up to summation order); wait for the next tile; barrier;
//   3. (quantized caches) dequantize the next tile into the other 16-bit compute tile;
//      O^T += C^T (P_hi + P_lo)^T on tensor cores with the same compute tile as A (the latent is K and V),
//      each warp owning its channel tiles; (quantized caches) barrier.
// Two barriers per tile for float caches, three for quantized ones. A sequence with one split
// writes o_lat and lse directly; split ones write fp32 partials that combine.cu merges.
// Every address a thread copies from or to is fixed per CTA up to the tile's block: it is
// computed once (CopyGeometry), so that a tile's copies cost little more than their cp.async.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "core/split_plan.h"
#include "cuda/mla_decode/cta_work.cuh"
#include "cuda/mla_decode/dequant.cuh"
#include "cuda/mla_decode/ptx.cuh"
#include "cuda/mla_decode/rope_queries.cuh"
#include "cuda/mla_decode/traits.h"

namespace mla_ext::decode {

// One thread's share of a piece's copies: it copies column `col` (bytes) of rows row0,
// row0 + row_step, ... < 16 (row0 >= 16: nothing). RoPE keys keep the column in the global row
// (src_col) and in the padded shared-memory row (dst_col) apart; `general` (more columns than
// threads) computes them per copy instead.
// The loops step pointers by the *_step_bytes strides (no per-copy address multiply).
struct CopyGeometry {
  int lat_col, lat_row0, lat_row_step;
  int lat_src_step_bytes, lat_dst_step_bytes;
  int rope_src_col, rope_dst_col, rope_row0, rope_row_step;
  int rope_src_step_bytes, rope_dst_step_bytes;
  bool rope_general;
};

// kQuant: the cache's latent is quantized (int8, fp8, int4: dequantized per tile) or not (a 16-bit
// latent the MMAs read in place). Each kernel holds one of the two paths only: a third less code
// for float caches, whose instruction cache a call at small batch fills cold.
template <typename T, int kBucket, bool kQuant>
struct DecodeKernel {
  static constexpr BucketShape kShape = kBuckets[kBucket];
  static constexpr int kWarps = kShape.warps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kChanTiles = kShape.chan_tiles;
  static constexpr int kRowTiles = kShape.row_tiles;
  static constexpr int kPieces = kShape.pieces;
  static constexpr bool kQRegs = kShape.q_in_regs;
  static constexpr int kRows = kRowTiles * 8;
  static constexpr int kTile = bucket_tile_tokens(kBucket);
  static constexpr int kBlocks = kPieces * kRowTiles;  // 16 x 8 score blocks per tile
  static constexpr int kKSplit = bucket_k_split(kBucket);  // warps sharing one block's channels
  static constexpr int kKSteps = kWarps * kChanTiles / kKSplit;  // a warp's 16-channel steps, at most
  static constexpr int kScoreChains = kShape.score_chains;  // independent score accumulators
  static constexpr int kLoadBatch = 4;  // prologue loads a thread keeps in flight
  static constexpr int kSpartLd = spart_ld(kRows);
  static constexpr int kPtLd = pt_ld(kTile);
  static constexpr int kThreadsPerRow = kThreads / kRows;  // softmax threads of one row
  static constexpr int kTokensPerThread = kTile / kThreadsPerRow;
  static constexpr int kPieceThreads = kThreads / kPieces;  // threads copying one piece
  static constexpr bool kHalf = std::is_same_v<T, __half>;
  static_assert(kThreadsPerRow <= 32 && 32 % kThreadsPerRow == 0);
  static_assert(kTokensPerThread * kThreadsPerRow == kTile);
  static_assert(kKSplit * kBlocks == kWarps);
  // A float latent row (D_c * 2 bytes, 16 per copy) never has more columns than a piece threads.
  static_assert(kShape.max_latent * 2 / 16 <= kPieceThreads);

  // Where this thread's piece of the next tile to copy starts: its first token, the block-table
  // index and the offset inside that block. Tiles are copied in order, so the cursor advances by
  // one tile at a time (no division by block_size per tile).
  struct PieceCursor {
    int tok, index, offset;
    __device__ void advance(int block_size) {
      tok += kTile;
      offset += kTile;
      while (offset >= block_size) {
        offset -= block_size;
        ++index;
      }
    }
  };

  static __device__ PieceCursor piece_cursor(const MlaDecodeParams& p, int tile, int piece) {
    const int tok = tile * kTile + piece * kPieceTokens;
    return {tok, tok / p.block_size, tok % p.block_size};
  }

  // The block-table entry of the cursor's piece, or -1 for a piece past the end.
  static __device__ __forceinline__ int piece_block(const MlaDecodeParams& p, int b, int len,
                                                    const PieceCursor& c) {
    return c.tok < len ? p.block_table[static_cast<int64_t>(b) * p.max_blocks + c.index] : -1;
  }

  static __device__ CopyGeometry copy_geometry(const MlaDecodeParams& p, int kv_lo, int kv_cnt) {
    CopyGeometry g{};
    const int ltid = threadIdx.x % kPieceThreads;
    {
      const int cols = p.D_c / 8;  // 16-byte columns of a float latent row
      g.lat_row_step = kPieceThreads / cols;
      g.lat_col = (ltid % cols) * 16;
      g.lat_row0 = ltid < g.lat_row_step * cols ? ltid / cols : kPieceTokens;
      g.lat_src_step_bytes = g.lat_row_step * p.D_c * 2;
      g.lat_dst_step_bytes = g.lat_row_step * p.smem.ld_tile * 2;
    }
    const int u = p.rope_chunk;
    const int src_kvb = p.d_r * p.rope_esize;
    const int per_head = src_kvb / u;
    const int cols = kv_cnt * per_head;
    g.rope_general = cols > kPieceThreads;
    if (!g.rope_general) {
      g.rope_row_step = kPieceThreads / cols;
      g.rope_row0 = ltid < g.rope_row_step * cols ? ltid / cols : kPieceTokens;
      const int col = ltid % cols, h = col / per_head, w = col % per_head;
      int kv = kv_lo + h;
      if (kv >= p.H_kv) kv -= p.H_kv;
      g.rope_src_col = kv * src_kvb + w * u;
      g.rope_dst_col = h * p.smem.rope_kvb + w * u;
      g.rope_src_step_bytes = g.rope_row_step * p.H_kv * src_kvb;
      g.rope_dst_step_bytes = g.rope_row_step * p.smem.rope_ld;
    }
    return g;
  }

  // A contiguous piece of `bytes` (a multiple of 16) by the piece's threads.
  static __device__ __forceinline__ void copy_contiguous(uint8_t* dst, const uint8_t* src,
                                                         int bytes) {
    const uint32_t to = smem_addr(dst);
    for (int j = (threadIdx.x % kPieceThreads) * 16; j < bytes; j += kPieceThreads * 16) {
      cp_async16(to + j, src + j);
    }
  }

  // This thread's copies of one column of a piece: rows row0, row0 + row_step, ... <
  // kPieceTokens, four per batch with all four addresses computed before the first copy issues
  // (a pointer bumped right after a cp.async waits until the copy has read it: the largest
  // long-scoreboard stall of the Llama-2 bf16 profile). copy(dst, src, row) issues one.
  template <typename Copy>
  static __device__ __forceinline__ void copy_column(int row0, int row_step, const uint8_t* src,
                                                     int src_step, uint32_t dst, int dst_step,
                                                     Copy&& copy) {
    for (int r = row0; r < kPieceTokens; r += 4 * row_step) {
      const uint8_t* next_src = src + 4 * src_step;
      const uint32_t next_dst = dst + 4 * dst_step;
      const uint8_t* from[4];
      uint32_t to[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        from[i] = src + i * src_step;
        to[i] = dst + i * dst_step;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (r + i * row_step < kPieceTokens) copy(to[i], from[i], r + i * row_step);
      }
      src = next_src;
      dst = next_dst;
    }
  }

  // Issues this thread's copies of the cursor's piece into stage `stage` (no commit). blk:
  // piece_block(), loaded an iteration ahead so that the copies need not wait for it. Tokens past
  // the sequence end inside a live piece are copied as they are (valid memory of that block) and
  // masked later, except float latent rows, which are zero-filled so that P = 0 never multiplies
  // a NaN; a piece past the end copies nothing but those zeros.
  static __device__ void issue_tile(const MlaDecodeParams& p, uint8_t* smem, int stage, int len,
                                    const PieceCursor& cur, int blk, int kv_lo, int kv_cnt,
                                    const CopyGeometry& geo) {
    const SmemLayout& L = p.smem;
    const int piece = threadIdx.x / kPieceThreads;
    const int ptok0 = cur.tok;
    const int64_t slot0 = blk >= 0 ? static_cast<int64_t>(blk) * p.block_size + cur.offset : 0;
    uint8_t* st = smem + L.stages + stage * L.stage_bytes;
    if constexpr (!kQuant) {
      const int row_bytes = p.D_c * 2, pitch = L.ld_tile * 2;
      const int live = blk >= 0 ? len - ptok0 : 0;
      const uint8_t* src = p.latent + (slot0 + geo.lat_row0) * row_bytes + geo.lat_col;
      uint32_t dst = smem_addr(st + L.st_latent + (piece * kPieceTokens + geo.lat_row0) * pitch +
                               geo.lat_col);
      copy_column(geo.lat_row0, geo.lat_row_step, src, geo.lat_src_step_bytes, dst,
                  geo.lat_dst_step_bytes, [live](uint32_t to, const uint8_t* from, int r) {
                    cp_async16(to, from, r < live ? 16 : 0);
                  });
    } else if (blk >= 0) {
      const int rb = p.latent_row_bytes;
      copy_contiguous(st + L.st_latent + piece * kPieceTokens * rb, p.latent + slot0 * rb,
                      kPieceTokens * rb);
      const int sb = p.num_groups * 2;  // 16 rows of it: a multiple of 32 bytes
      copy_contiguous(st + L.st_scale + piece * kPieceTokens * sb, p.latent_scale + slot0 * sb,
                      kPieceTokens * sb);
      if (p.format == kFmtInt4) {
        copy_contiguous(st + L.st_zero + piece * kPieceTokens * sb, p.latent_zero + slot0 * sb,
                        kPieceTokens * sb);
      }
    }
    if (blk < 0) return;
    // RoPE keys of the CTA's KV heads kv_lo .. kv_lo + kv_cnt - 1 (cyclic), each head's key at
    // its padded place in the shared-memory row.
    const int u = p.rope_chunk;
    const int src_kvb = p.d_r * p.rope_esize;
    const int src_pitch = p.H_kv * src_kvb;
    const uint8_t* src = p.k_rope + slot0 * src_pitch;
    uint8_t* dst = st + L.st_rope + piece * kPieceTokens * L.rope_ld;
    if (!geo.rope_general) {
      const uint8_t* from = src + geo.rope_row0 * src_pitch + geo.rope_src_col;
      uint32_t to = smem_addr(dst + geo.rope_row0 * L.rope_ld + geo.rope_dst_col);
      // the chunk size a template argument: no branch on it per copy
      auto rows = [&](auto bytes) {
        copy_column(geo.rope_row0, geo.rope_row_step, from, geo.rope_src_step_bytes, to,
                    geo.rope_dst_step_bytes, [](uint32_t d, const uint8_t* s, int) {
                      cp_async_bytes<decltype(bytes)::value>(d, s);
                    });
      };
      if (u == 16) {
        rows(std::integral_constant<int, 16>{});
      } else if (u == 8) {
        rows(std::integral_constant<int, 8>{});
      } else {
        rows(std::integral_constant<int, 4>{});
      }
    } else {
      const int per_head = src_kvb / u, cols = kv_cnt * per_head;
      for (int c = threadIdx.x % kPieceThreads; c < kPieceTokens * cols; c += kPieceThreads) {
        const int r = c / cols, col = c - r * cols, h = col / per_head, w = col - h * per_head;
        int kv = kv_lo + h;
        if (kv >= p.H_kv) kv -= p.H_kv;
        cp_async_n(smem_addr(dst + r * L.rope_ld + h * L.rope_kvb + w * u),
                   src + r * src_pitch + kv * src_kvb + w * u, u);
      }
    }
    if (p.rope_path == kRopeFp8Keys) {
      const int sb = p.H_kv * 2;
      copy_contiguous(st + L.st_rope_scale + piece * kPieceTokens * sb, p.k_rope_scale + slot0 * sb,
                      kPieceTokens * sb);
    }
  }

  // Raw quantized latent of a stage -> 16-bit compute tile, 8 channels per step; zeros past the
  // sequence end and in the channels D_c .. D16. The format is a template argument and a lane's
  // channel chunk the outer loop: per chunk one group lookup serves all of its tokens (the group
  // index was an integer division per 8 channels, a third of the quantized kernels' instructions).
  template <int kFormat>
  static __device__ void dequantize_tile_as(const MlaDecodeParams& p, uint8_t* smem, int stage,
                                            int ctile, int len, int tile) {
    const SmemLayout& L = p.smem;
    const uint8_t* st = smem + L.stages + stage * L.stage_bytes;
    T* dst = reinterpret_cast<T*>(smem + L.ctile[ctile]);
    const uint8_t* raw = st + L.st_latent;
    const __half* sc = reinterpret_cast<const __half*>(st + L.st_scale);
    const __half* zr = reinterpret_cast<const __half*>(st + L.st_zero);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int live_tokens = min(kTile, len - tile * kTile);  // > 0: the tile is in the split
    const bool uniform_group = p.group_size % 8 == 0;
    constexpr int chan_bytes = chunk_bytes<kFormat>();
    for (int c8 = lane * 8; c8 < p.D16; c8 += 32 * 8) {
      const bool real = c8 < p.D_c;
      const int g0 = real ? (p.group_shift >= 0 ? c8 >> p.group_shift : c8 / p.group_size) : 0;
      const uint8_t* src = raw + c8 / 8 * chan_bytes;
      for (int t = warp; t < kTile; t += kWarps) {
        uint4 out = make_uint4(0, 0, 0, 0);
        if (real && t < live_tokens) {
          const __half* srow = sc + t * p.num_groups;
          const __half* zrow = zr + t * p.num_groups;
          const float s0 = __half2float(srow[g0]);
          const float z0 = kFormat == kFmtInt4 ? __half2float(zrow[g0]) : 0.f;
          float v[8];
          unpack8<kFormat>(src + t * p.latent_row_bytes, v);
          if (uniform_group) {
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = fmaf(v[j], s0, z0);
          } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              const int gj = (c8 + j) / p.group_size;
              const float zj = kFormat == kFmtInt4 ? __half2float(zrow[gj]) : 0.f;
              v[j] = fmaf(v[j], __half2float(srow[gj]), zj);
            }
          }
          out = make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                           pack2<T>(v[6], v[7]));
        }
        *reinterpret_cast<uint4*>(dst + t * L.ld_tile + c8) = out;
      }
    }
  }

  // One branch on the format per tile, none inside the dequantization loops.
  static __device__ void dequantize_tile(const MlaDecodeParams& p, uint8_t* smem, int stage,
                                         int ctile, int len, int tile) {
    switch (p.format) {
      case kFmtInt8: dequantize_tile_as<kFmtInt8>(p, smem, stage, ctile, len, tile); break;
      case kFmtFp8: dequantize_tile_as<kFmtFp8>(p, smem, stage, ctile, len, tile); break;
      default: dequantize_tile_as<kFmtInt4>(p, smem, stage, ctile, len, tile); break;
    }
  }

  static __device__ void run(const MlaDecodeParams& p) {
    extern __shared__ __align__(16) uint8_t smem[];
    const SmemLayout& L = p.smem;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    CtaWork w;
    if (!read_cta_work(p, w)) return;
    const int b = w.b, tile_begin = w.tile_begin, tile_end = w.tile_end, len = w.len;
    const int row0 = w.row0, rows_here = w.rows_here;
    const int group = p.H / p.H_kv;
    constexpr bool quant = kQuant;
    const int num_stages = L.num_stages;
    const int my_piece = tid / kPieceThreads;

    int kv_lo, kv_cnt;
    cta_kv_range(p, row0, rows_here, kv_lo, kv_cnt);

    // Zero the padding of each KV head's key (d_r .. d_r_pad) in every stage: cp.async never
    // writes it, and the RoPE MMA reads it (times a zero query, but 0 * NaN is NaN). The bytes
    // are disjoint from every copy's, so no barrier is needed before the copies.
    if (p.d_r_pad != p.d_r) {
      const int src_kvb = p.d_r * p.rope_esize, pad = L.rope_kvb - src_kvb;  // a multiple of 4
      const int words = pad / 4, per_stage = kTile * L.kv_max * words;
      for (int idx = tid; idx < num_stages * per_stage; idx += kThreads) {
        const int s = idx / per_stage, rest = idx % per_stage;
        const int t = rest / (L.kv_max * words), hw = rest % (L.kv_max * words);
        uint8_t* at = smem + L.stages + s * L.stage_bytes + L.st_rope + t * L.rope_ld +
                      (hw / words) * L.rope_kvb + src_kvb + (hw % words) * 4;
        *reinterpret_cast<uint32_t*>(at) = 0u;
      }
    }

    // Start the first tiles' copies before anything else.
    const CopyGeometry geo = copy_geometry(p, kv_lo, kv_cnt);
    PieceCursor cursor = piece_cursor(p, tile_begin, my_piece);
    for (int s = 0; s < num_stages - 1; ++s) {
      if (tile_begin + s < tile_end) {
        issue_tile(p, smem, s, len, cursor, piece_block(p, b, len, cursor), kv_lo, kv_cnt, geo);
        cursor.advance(p.block_size);
      }
      cp_async_commit();
    }
    int next_blk = tile_begin + num_stages - 1 < tile_end ? piece_block(p, b, len, cursor) : -1;

    // Warp roles: the score block (piece, row tile) this warp computes and its channel slice.
    const int kslice = warp / kBlocks, wblock = warp % kBlocks;
    const int wpiece = wblock / kRowTiles, wnt = wblock % kRowTiles;
    const int g = lane / 4, tq = lane % 4;

    // Queries of this CTA's rows (zero rows and channels past the end): MMA fragments in
    // registers, or a shared-memory tile; RoPE queries in the dtype of the RoPE MMA (fp16 for fp8
    // keys, else the queries' dtype), padded with zeros to d_r_pad.
    const int64_t q_row_base = w.q_row_base;
    const T* q_lat = reinterpret_cast<const T*>(p.q_lat);
    T* q_s = reinterpret_cast<T*>(smem + L.q);
    uint32_t qf[kQRegs ? kKSteps : 1][2];
    if constexpr (kQRegs) {
      const int r = wnt * 8 + g;
      const T* qrow = q_lat + (q_row_base + r) * p.D_c;
#pragma unroll
      for (int i = 0; i < kKSteps; ++i) {
        const int c0 = (kslice + kKSplit * i) * 16 + 2 * tq;
        const bool live = r < rows_here;
        qf[i][0] = live && c0 < p.D_c ? *reinterpret_cast<const uint32_t*>(qrow + c0) : 0u;
        qf[i][1] = live && c0 + 8 < p.D_c ? *reinterpret_cast<const uint32_t*>(qrow + c0 + 8) : 0u;
      }
    } else {
      // kLoadBatch loads in flight before their stores (a store to a generic pointer keeps the
      // compiler from moving the next load above it).
      const int chunks = L.ld_tile / 8, total = p.rows_per_cta * chunks;
      for (int base = tid; base < total; base += kLoadBatch * kThreads) {
        uint4 v[kLoadBatch];
#pragma unroll
        for (int j = 0; j < kLoadBatch; ++j) {
          const int idx = base + j * kThreads, r = idx / chunks, c8 = (idx % chunks) * 8;
          v[j] = idx < total && r < rows_here && c8 < p.D_c
                     ? *reinterpret_cast<const uint4*>(q_lat + (q_row_base + r) * p.D_c + c8)
                     : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < kLoadBatch; ++j) {
          const int idx = base + j * kThreads, r = idx / chunks, c8 = (idx % chunks) * 8;
          if (idx < total) *reinterpret_cast<uint4*>(q_s + r * L.ld_tile + c8) = v[j];
        }
      }
    }
    setup_rope_queries<kHalf, kThreads, kRowTiles>(p, smem, L, row0, rows_here, kv_lo, q_row_base);
    if (!quant) {
      // Channels D_c .. ld_tile of every stage: cp.async never writes them, the MMAs read
      // D_c .. D16 (and 0 * NaN would poison the scores).
      const int pad = L.ld_tile - p.D_c;
      for (int s = 0; s < num_stages; ++s) {
        T* tile = reinterpret_cast<T*>(smem + L.stages + s * L.stage_bytes + L.st_latent);
        for (int idx = tid; idx < kTile * pad; idx += kThreads) {
          tile[(idx / pad) * L.ld_tile + p.D_c + idx % pad] = from_float<T>(0.f);
        }
      }
    }

    // This warp's row tile's RoPE steps, and the B fragments' rows of its block-diagonal queries.
    const int* rope_tab = reinterpret_cast<const int*>(smem + L.rope_tab) + wnt * L.rope_tab_ld;
    const uint16_t* rq_row = reinterpret_cast<const uint16_t*>(smem + L.rope_q) +
                             (wnt * 8 + lane % 8) * L.rope_q_ld + ((lane % 16) / 8) * 8;
    int kv_of_col[2];  // global KV head of this lane's two accumulator columns (fp8 key scales)
#pragma unroll
    for (int c = 0; c < 2; ++c) kv_of_col[c] = (row0 + wnt * 8 + 2 * tq + c) % p.H / group;

    float acc[kChanTiles][kRowTiles][4];
#pragma unroll
    for (int i = 0; i < kChanTiles; ++i)
#pragma unroll
      for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

    // Softmax state of this thread's row, replicated over the row's kThreadsPerRow threads.
    const int my_row = tid / kThreadsPerRow, my_sub = tid % kThreadsPerRow;
    const int my_grow = row0 + my_row;
    const bool my_row_valid = my_row < rows_here;
    const int my_last_visible = len - p.s_q + my_grow / p.H;  // positions <= this are visible
    float m_run = -INFINITY, l_run = 0.f;

    float* spart = reinterpret_cast<float*>(smem + L.spart);
    T* pt = reinterpret_cast<T*>(smem + L.pt);
    T* pt_lo = reinterpret_cast<T*>(smem + L.pt_lo);
    float* alpha_s = reinterpret_cast<float*>(smem + L.stats);
    const int steps16 = p.D16 / 16;
    const bool full_width = steps16 == kKSteps * kKSplit;
    const int pending = num_stages - 2;

    cp_async_wait_pending(pending);
    __syncthreads();
    if (quant && tile_begin < tile_end) {
      dequantize_tile(p, smem, 0, 0, len, tile_begin);
      __syncthreads();
    }

    // stage: the ring slot of `tile` (it % num_stages); ahead_stage that of tile + num_stages - 1
    int stage = 0, ahead_stage = num_stages - 1;
    auto next_slot = [num_stages](int s) { return s + 1 == num_stages ? 0 : s + 1; };
    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int it = tile - tile_begin;
      const uint8_t* st = smem + L.stages + stage * L.stage_bytes;
      const T* ctile = reinterpret_cast<const T*>(quant ? smem + L.ctile[it & 1] : st + L.st_latent);

      // 1. this warp's score block: its latent channels, then its RoPE runs. A latent as wide as
      // the bucket runs the chain without a bound check per step (whose branches would also
      // cost a warp re-convergence before every MMA).
      // Independent accumulators (chain i % kScoreChains): one chain of dependent MMAs would
      // wait out the MMA latency at every step, with only two warps per scheduler to hide it.
      float sacc[kScoreChains][4];
#pragma unroll
      for (int c = 0; c < kScoreChains; ++c)
#pragma unroll
        for (int k = 0; k < 4; ++k) sacc[c][k] = 0.f;
      {
        const int mat = lane / 8;
        const T* a_row = ctile + (wpiece * kPieceTokens + (mat % 2) * 8 + lane % 8) * L.ld_tile +
                         (mat / 2) * 8;
        const T* q_row = q_s + (wnt * 8 + lane % 8) * L.ld_tile + ((lane % 16) / 8) * 8;
        auto latent_chain = [&](auto full_width) {
#pragma unroll
          for (int i = 0; i < kKSteps; ++i) {
            const int ks = kslice + kKSplit * i;
            if constexpr (!decltype(full_width)::value) {
              if (ks >= steps16) break;
            }
            uint32_t a[4];
            ldmatrix_x4(a, a_row + ks * 16);
            if constexpr (kQRegs) {
              mma16816<T>(sacc[i % kScoreChains], a, qf[i]);
            } else {
              uint32_t bq[2];
              ldmatrix_x2(bq, q_row + ks * 16);
              mma16816<T>(sacc[i % kScoreChains], a, bq);
            }
          }
        };
        if (full_width) {
          latent_chain(std::true_type{});
        } else {
          latent_chain(std::false_type{});
        }
      }
      {
        // RoPE: one k16 step covers two 8-dim units (of one run or two); each lane's A address
        // comes from the step table, its B fragment from the block-diagonal queries. Steps
        // alternate between two accumulators (fp8 keys: two of their own, scaled afterwards).
        const uint8_t* rope = st + L.st_rope + wpiece * kPieceTokens * L.rope_ld;
        const int steps = rope_tab[0];
        float racc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        // The key path is a template argument: no branch on it inside the loop.
        auto rope_step = [&](auto path, int s, float (&c)[4], float (&c8)[4]) {
          constexpr int kPath = decltype(path)::value;
          const uint32_t offs = static_cast<uint32_t>(rope_tab[kRopeTabHeader + s]);
          uint32_t bq[2];
          ldmatrix_x2(bq, rq_row + s * 16);
          uint32_t a[4];
          if constexpr (kPath == kRopeLdmatrix) {
            ldmatrix_x4(a, rope + (lane % 16) * L.rope_ld + (lane < 16 ? offs & 0xFFFFu : offs >> 16));
            mma16816<T>(c, a, bq);
          } else {
            const uint8_t* k0 = rope + g * L.rope_ld + (offs & 0xFFFFu);
            const uint8_t* k1 = rope + g * L.rope_ld + (offs >> 16);
            const int hi = 8 * L.rope_ld;
            if constexpr (kPath == kRopeConvert) {
              auto pair = [&](const uint8_t* at) {
                return convert_pair<kHalf>(*reinterpret_cast<const uint32_t*>(at + 4 * tq));
              };
              a[0] = pair(k0);
              a[1] = pair(k0 + hi);
              a[2] = pair(k1);
              a[3] = pair(k1 + hi);
              mma16816<T>(c, a, bq);
            } else {
              auto pair = [&](const uint8_t* at) {
                return fp8x2_to_half2(*reinterpret_cast<const uint16_t*>(at + 2 * tq));
              };
              a[0] = pair(k0);
              a[1] = pair(k0 + hi);
              a[2] = pair(k1);
              a[3] = pair(k1 + hi);
              mma16816<__half>(c8, a, bq);
            }
          }
        };
        auto rope_steps = [&](auto path) {
          for (int s = kslice; s < steps; s += 2 * kKSplit) {
            rope_step(path, s, sacc[0], racc[0]);
            if (s + kKSplit < steps) {
              rope_step(path, s + kKSplit, sacc[kScoreChains > 1 ? 1 : 0], racc[1]);
            }
          }
        };
        if (p.rope_path == kRopeLdmatrix) {
          rope_steps(std::integral_constant<int, kRopeLdmatrix>{});
        } else if (p.rope_path == kRopeConvert) {
          rope_steps(std::integral_constant<int, kRopeConvert>{});
        } else {
          rope_steps(std::integral_constant<int, kRopeFp8Keys>{});
        }
        if (p.rope_path == kRopeFp8Keys) {
          // fp8 keys carry a scale per (token, KV head), applied to the score: column r of the
          // block-diagonal product only holds row r's own head.
          const __half* rs = reinterpret_cast<const __half*>(st + L.st_rope_scale) +
                             wpiece * kPieceTokens * p.H_kv;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            sacc[0][k] += (racc[0][k] + racc[1][k]) *
                          __half2float(rs[(g + (k / 2) * 8) * p.H_kv + kv_of_col[k % 2]]);
          }
        }
#pragma unroll
        for (int c = 1; c < kScoreChains; ++c)
#pragma unroll
          for (int k = 0; k < 4; ++k) sacc[0][k] += sacc[c][k];
      }
      {
        float* dst = spart + (kslice * kTile + wpiece * kPieceTokens + g) * kSpartLd + wnt * 8 + 2 * tq;
        *reinterpret_cast<float2*>(dst) = make_float2(sacc[0][0], sacc[0][1]);
        *reinterpret_cast<float2*>(dst + 8 * kSpartLd) = make_float2(sacc[0][2], sacc[0][3]);
      }
      __syncthreads();

      // 2. the tile num_stages - 1 ahead goes into the stage tile - 1 used (all its readers are
      // past the barrier above); then scores, mask, online softmax, P^T.
      {
        const int ahead = tile + num_stages - 1;
        if (ahead < tile_end) {
          issue_tile(p, smem, ahead_stage, len, cursor, next_blk, kv_lo, kv_cnt, geo);
          cursor.advance(p.block_size);
          if (ahead + 1 < tile_end) next_blk = piece_block(p, b, len, cursor);
        }
        cp_async_commit();
      }
      {
        const int tok0 = tile * kTile;
        float s[kTokensPerThread];
        float tile_max = -INFINITY;
#pragma unroll
        for (int k = 0; k < kTokensPerThread; ++k) {
          const int t = my_sub + k * kThreadsPerRow;
          const int pos = tok0 + t;
          float v = -INFINITY;
          if (my_row_valid && pos < len && pos <= my_last_visible) {
            float dot = 0.f;
#pragma unroll
            for (int w = 0; w < kKSplit; ++w) dot += spart[(w * kTile + t) * kSpartLd + my_row];
            v = visible_score(dot * p.softmax_scale_log2);
          }
          s[k] = v;
          tile_max = fmaxf(tile_max, v);
        }
#pragma unroll
        for (int off = kThreadsPerRow / 2; off > 0; off /= 2) {
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, off));
        }
        const float m_new = fmaxf(m_run, tile_max);
        const float alpha = m_new == -INFINITY ? 1.f : exp2f(m_run - m_new);
        float psum = 0.f;
#pragma unroll
        for (int k = 0; k < kTokensPerThread; ++k) {
          const int t = my_sub + k * kThreadsPerRow;
          const float pv = s[k] == -INFINITY ? 0.f : exp2f(s[k] - m_new);
          psum += pv;
          const T hi = from_float<T>(pv);
          pt[my_row * kPtLd + t] = hi;
          pt_lo[my_row * kPtLd + t] = from_float<T>(pv - to_float<T>(hi));
        }
#pragma unroll
        for (int off = kThreadsPerRow / 2; off > 0; off /= 2) {
          psum += __shfl_xor_sync(0xffffffffu, psum, off);
        }
        l_run = l_run * alpha + psum;
        m_run = m_new;
        if (my_sub == 0) alpha_s[my_row] = alpha;
      }
      cp_async_wait_pending(pending);  // the next tile has landed (this thread's copies)
      __syncthreads();

      // 3. dequantize the next tile; O^T[channel][row] = alpha * O^T + C^T P^T.
      const bool single_ctile = L.ctile[0] == L.ctile[1];
      if (quant && !single_ctile && tile + 1 < tile_end) {
        dequantize_tile(p, smem, next_slot(stage), (it + 1) & 1, len, tile + 1);
      }
      float a_lo[kRowTiles], a_hi[kRowTiles];
      bool rescale = false;
#pragma unroll
      for (int nt = 0; nt < kRowTiles; ++nt) {
        a_lo[nt] = alpha_s[nt * 8 + 2 * tq];
        a_hi[nt] = alpha_s[nt * 8 + 2 * tq + 1];
        rescale |= a_lo[nt] != 1.f || a_hi[nt] != 1.f;
      }
      // Once the running maxima settle, most tiles leave every alpha at 1: skip the multiplies.
      rescale = __any_sync(0xffffffffu, rescale);
      if (rescale) {
#pragma unroll
        for (int mt = 0; mt < kChanTiles; ++mt)
#pragma unroll
          for (int nt = 0; nt < kRowTiles; ++nt) {
            acc[mt][nt][0] *= a_lo[nt];
            acc[mt][nt][1] *= a_hi[nt];
            acc[mt][nt][2] *= a_lo[nt];
            acc[mt][nt][3] *= a_hi[nt];
          }
      }
      // One piece's P fragments at a time (registers), used by every channel tile of the warp.
#pragma unroll
      for (int kt = 0; kt < kPieces; ++kt) {
        uint32_t bp[kRowTiles][2], bp_lo[kRowTiles][2];
#pragma unroll
        for (int nt = 0; nt < kRowTiles; ++nt) {
          const int l = lane % 16;
          const int at = (nt * 8 + l % 8) * kPtLd + kt * kPieceTokens + (l / 8) * 8;
          ldmatrix_x2(bp[nt], pt + at);
          ldmatrix_x2(bp_lo[nt], pt_lo + at);
        }
        const int mat = lane / 8;
#pragma unroll
        for (int mt = 0; mt < kChanTiles; ++mt) {
          const int c0 = (warp + kWarps * mt) * 16;
          if (c0 >= p.D16) break;
          uint32_t a[4];
          ldmatrix_x4_trans(a, ctile + (kt * kPieceTokens + (mat / 2) * 8 + lane % 8) * L.ld_tile +
                                   c0 + (mat % 2) * 8);
          // all row tiles' lo terms, then their hi terms: no two dependent MMAs back to back
#pragma unroll
          for (int nt = 0; nt < kRowTiles; ++nt) mma16816<T>(acc[mt][nt], a, bp_lo[nt]);
#pragma unroll
          for (int nt = 0; nt < kRowTiles; ++nt) mma16816<T>(acc[mt][nt], a, bp[nt]);
        }
      }
      if (quant) {
        if (single_ctile && tile + 1 < tile_end) {
          __syncthreads();  // every warp is done with the tile before it is overwritten
          dequantize_tile(p, smem, next_slot(stage), 0, len, tile + 1);
        }
        __syncthreads();
      }
      stage = next_slot(stage);
      ahead_stage = next_slot(ahead_stage);
    }
    cp_async_wait<0>();

    // Finalize: o = acc / l, lse = row_lse(m, l); o = 0, lse = -inf where nothing was visible
    // (l = 0); a NaN l (a NaN score) makes both NaN.
    float* l_s = reinterpret_cast<float*>(smem + L.stats) + kRows;
    if (my_sub == 0) l_s[my_row] = l_run;
    __syncthreads();
    // Per accumulator row (two per row tile): 1 / l, and its offset in the output rows.
    float inv_l[kRowTiles][2];
    int row_off[kRowTiles][2];
#pragma unroll
    for (int nt = 0; nt < kRowTiles; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int r = nt * 8 + 2 * tq + c;
        const float l = l_s[r];
        inv_l[nt][c] = row_inv_sum(l);
        row_off[nt][c] = r < rows_here ? r * p.D_c : -1;
      }
    const CtaOutput<T> out(p, w);
#pragma unroll
    for (int mt = 0; mt < kChanTiles; ++mt) {
      const int c0 = (warp + kWarps * mt) * 16;
      if (c0 >= p.D16) break;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int chan = c0 + g + 8 * h;
        if (chan >= p.D_c) continue;
#pragma unroll
        for (int nt = 0; nt < kRowTiles; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            if (row_off[nt][c] < 0) continue;
            out.store(row_off[nt][c] + chan, acc[mt][nt][2 * h + c] * inv_l[nt][c]);
          }
      }
    }
    if (my_sub == 0 && my_row_valid) store_row_lse(p, w, my_row, row_lse(m_run, l_run));
  }
};

template <typename T, int kBucket, bool kQuant>
__global__ void __launch_bounds__(bucket_threads(kBucket), kBuckets[kBucket].min_ctas)
    mla_decode_kernel(const __grid_constant__ MlaDecodeParams params) {
  DecodeKernel<T, kBucket, kQuant>::run(params);
}

}  // namespace mla_ext::decode
