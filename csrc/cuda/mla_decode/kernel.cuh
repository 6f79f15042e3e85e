// Device body of mla_decode: one CTA = one split (a run of 16-token tiles of one sequence) x one
// chunk of (new token, head) rows. The cache streams through a ring of shared-memory stages
// (cp.async, up to kMaxStages - 1 tiles in flight). Per tile:
//   1. S^T = C Q^T on tensor cores (m16n8k16; tokens on M, rows on N = 8), the latent channels
//      split over the 8 warps; the RoPE scores go into the same accumulators (m16n8k8, one MMA
//      per run of rows sharing a KV head, the other rows' queries masked to zero); each warp
//      writes its partial scores; barrier;
//   2. the next tile's copies are issued; per row: sum the partials, mask, online softmax (base
//      2), P^T to shared memory; wait for the next tile; barrier;
//   3. (quantized caches) dequantize the next tile into the other 16-bit compute tile;
//      O^T += C^T P^T on tensor cores with the same compute tile as A (the latent is K and V),
//      each warp owning its channel tiles; (quantized caches) barrier.
// Two barriers per tile for float caches, three for quantized ones. A sequence with one split
// writes o_lat and lse directly; split ones write fp32 partials that combine.cu merges.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "core/quant.h"
#include "cuda/mla_decode/ptx.cuh"
#include "cuda/mla_decode/split_plan.h"
#include "cuda/mla_decode/traits.h"

namespace mla_ext::decode {

template <typename T, int kChanTiles, int kRowTiles>
struct DecodeKernel {
  static constexpr int kRows = kRowTiles * 8;
  static constexpr int kSpartLd = spart_ld(kRows);
  static constexpr int kThreadsPerRow = kThreads / kRows;  // softmax threads of one row
  static constexpr int kTokensPerThread = kTileTokens / kThreadsPerRow;
  static constexpr int kRopeSplit = kWarps / kRowTiles;  // warps sharing one row tile's RoPE runs
  static constexpr bool kHalf = std::is_same_v<T, __half>;
  static_assert(kThreadsPerRow <= 32 && 32 % kThreadsPerRow == 0);
  static_assert(kTokensPerThread * kThreadsPerRow == kTileTokens);
  static_assert(kWarps % kRowTiles == 0 && kTileTokens == 16);

  // Copies `bytes` (a multiple of 8) with the lanes of one warp, 16 bytes a copy where both
  // addresses and the size allow it.
  static __device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int bytes,
                                                   int lane) {
    if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | bytes) & 15) == 0) {
      for (int j = lane * 16; j < bytes; j += 32 * 16) cp_async16(dst + j, src + j);
    } else {
      for (int j = lane * 8; j < bytes; j += 32 * 8) cp_async8(dst + j, src + j);
    }
  }

  // Issues the copies of one tile into stage `stage` (no commit). The tile's 16 tokens are
  // consecutive slots of one block; tokens past the sequence end are copied as they are (valid
  // memory of that block) and masked later, except float latent rows, which are zero-filled so
  // that P = 0 never multiplies a NaN.
  // The block-table entry of a tile (all threads load the same word).
  static __device__ __forceinline__ int tile_block(const MlaDecodeParams& p, int b, int tile) {
    return p.block_table[static_cast<int64_t>(b) * p.max_blocks + tile * kTileTokens / p.block_size];
  }

  // blk: tile_block(p, b, tile), loaded an iteration ahead so that the copies need not wait for
  // it.
  static __device__ void issue_tile(const MlaDecodeParams& p, uint8_t* smem, int stage, int len,
                                    int tile, int blk, int kv_lo, int kv_cnt) {
    const SmemLayout& L = p.smem;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int tok0 = tile * kTileTokens;
    const int64_t slot0 = static_cast<int64_t>(blk) * p.block_size + tok0 % p.block_size;
    uint8_t* st = smem + L.stages + stage * L.stage_bytes;
    if (p.format == kFmtFloat) {
      const int row_bytes = p.D_c * 2;
      for (int t = warp; t < kTileTokens; t += kWarps) {
        const int valid = tok0 + t < len ? 16 : 0;
        const uint8_t* src = p.latent + (slot0 + t) * row_bytes;
        uint8_t* dst = st + L.st_latent + t * L.ld_tile * 2;
        for (int c = lane * 16; c < row_bytes; c += 32 * 16) cp_async16(dst + c, src + c, valid);
      }
    } else {
      const int bytes = kTileTokens * p.latent_row_bytes;  // a multiple of 16
      const uint8_t* src = p.latent + slot0 * p.latent_row_bytes;
      for (int j = tid * 16; j < bytes; j += kThreads * 16) cp_async16(st + L.st_latent + j, src + j);
      const int sbytes = kTileTokens * p.num_groups * 2;
      const int64_t soff = slot0 * p.num_groups * 2;
      for (int j = tid * 16; j < sbytes; j += kThreads * 16) {
        cp_async16(st + L.st_scale + j, p.latent_scale + soff + j);
        if (p.format == kFmtInt4) cp_async16(st + L.st_zero + j, p.latent_zero + soff + j);
      }
    }
    // RoPE keys of the CTA's KV heads kv_lo .. kv_lo + kv_cnt - 1 (cyclic): one or two pieces.
    const int kvb = p.d_r * p.rope_esize;
    const int first = kv_cnt < p.H_kv - kv_lo ? kv_cnt : p.H_kv - kv_lo;
    for (int t = warp; t < kTileTokens; t += kWarps) {
      const uint8_t* src = p.k_rope + (slot0 + t) * p.H_kv * kvb;
      uint8_t* dst = st + L.st_rope + t * L.rope_ld;
      warp_copy(dst, src + kv_lo * kvb, first * kvb, lane);
      if (first < kv_cnt) warp_copy(dst + first * kvb, src, (kv_cnt - first) * kvb, lane);
    }
    if (p.rope_kind == kRopeFp8) {
      const int sbytes = kTileTokens * p.H_kv * 2;  // a multiple of 32
      const uint8_t* src = p.k_rope_scale + slot0 * p.H_kv * 2;
      for (int j = tid * 16; j < sbytes; j += kThreads * 16) {
        cp_async16(st + L.st_rope_scale + j, src + j);
      }
    }
  }

  // Raw quantized latent of a stage -> 16-bit compute tile, 8 channels per step; zeros past the
  // sequence end and in the channels D_c .. D16.
  static __device__ void dequantize_tile(const MlaDecodeParams& p, uint8_t* smem, int stage,
                                         int ctile, int len, int tile) {
    const SmemLayout& L = p.smem;
    const uint8_t* st = smem + L.stages + stage * L.stage_bytes;
    T* dst = reinterpret_cast<T*>(smem + L.ctile[ctile]);
    const uint8_t* raw = st + L.st_latent;
    const __half* sc = reinterpret_cast<const __half*>(st + L.st_scale);
    const __half* zr = reinterpret_cast<const __half*>(st + L.st_zero);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int tok0 = tile * kTileTokens;
    const bool uniform_group = p.group_size % 8 == 0;
    for (int t = warp; t < kTileTokens; t += kWarps) {
      const bool live = tok0 + t < len;
      const __half* srow = sc + t * p.num_groups;
      const __half* zrow = zr + t * p.num_groups;
      for (int c8 = lane * 8; c8 < p.D16; c8 += 32 * 8) {
        uint4 out = make_uint4(0, 0, 0, 0);
        if (live && c8 < p.D_c) {
          const int g0 = c8 / p.group_size;
          const float s0 = __half2float(srow[g0]);
          const float z0 = p.format == kFmtInt4 ? __half2float(zrow[g0]) : 0.f;
          uint32_t w0, w1;  // the 8 channels' bytes (int4: nibbles in w0)
          if (p.format == kFmtInt4) {
            w0 = *reinterpret_cast<const uint32_t*>(raw + t * p.latent_row_bytes + c8 / 2);
            w1 = 0;
          } else {
            const uint2 w = *reinterpret_cast<const uint2*>(raw + t * p.latent_row_bytes + c8);
            w0 = w.x;
            w1 = w.y;
          }
          float v[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            float sj = s0, zj = z0;
            if (!uniform_group) {
              const int gj = (c8 + j) / p.group_size;
              sj = __half2float(srow[gj]);
              zj = p.format == kFmtInt4 ? __half2float(zrow[gj]) : 0.f;
            }
            if (p.format == kFmtInt4) {
              v[j] = quant::dequantize_int4(static_cast<uint8_t>((w0 >> (4 * j)) & 0xF), sj, zj);
            } else {
              const uint8_t byte = static_cast<uint8_t>(((j < 4 ? w0 : w1) >> (8 * (j % 4))) & 0xFF);
              v[j] = p.format == kFmtInt8 ? quant::dequantize_int8(static_cast<int8_t>(byte), sj)
                                          : fp8_to_float(byte) * sj;
            }
          }
          out = make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                           pack2<T>(v[6], v[7]));
        }
        *reinterpret_cast<uint4*>(dst + t * L.ld_tile + c8) = out;
      }
    }
  }

  static __device__ void run(const MlaDecodeParams& p) {
    extern __shared__ __align__(16) uint8_t smem[];
    const SmemLayout& L = p.smem;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int part = blockIdx.x / p.row_chunks, chunk = blockIdx.x % p.row_chunks;
    const int32_t* work = p.plan + kPlanHeader + 4 * part;
    const int b = work[0];
    if (b < 0) return;
    const int tile_begin = work[1], tile_end = work[2];
    const int num_splits = p.plan[kPlanHeader + 4 * plan_capacity(p.B) + 2 * b + 1];
    const int len = p.seq_lens[b];
    const int row0 = chunk * p.rows_per_cta;
    const int rows_here = min(p.rows_per_cta, p.rows - row0);
    const int group = p.H / p.H_kv;
    const bool quant = p.format != kFmtFloat;
    const int num_stages = L.num_stages;

    // KV heads of rows row0 .. row0 + rows_here - 1: a cyclic range [kv_lo, kv_lo + kv_cnt).
    int kv_lo, kv_cnt;
    if (rows_here >= p.H) {
      kv_lo = 0;
      kv_cnt = p.H_kv;
    } else {
      kv_lo = (row0 % p.H) / group;
      const int kv_last = ((row0 + rows_here - 1) % p.H) / group;
      kv_cnt = (kv_last - kv_lo + p.H_kv) % p.H_kv + 1;
    }

    // Start the first tiles' copies before anything else.
    for (int s = 0; s < num_stages - 1; ++s) {
      const int tile = tile_begin + s;
      if (tile < tile_end) issue_tile(p, smem, s, len, tile, tile_block(p, b, tile), kv_lo, kv_cnt);
      cp_async_commit();
    }
    int next_blk = tile_begin + num_stages - 1 < tile_end
                       ? tile_block(p, b, tile_begin + num_stages - 1) : 0;

    // Queries of this CTA's rows (zero rows and channels past the end); RoPE queries in the
    // dtype of the RoPE MMA (fp16 for fp8 keys, else the queries' dtype).
    T* q_s = reinterpret_cast<T*>(smem + L.q);
    const int64_t q_row_base = static_cast<int64_t>(b) * p.rows + row0;
    {
      const T* q_lat = reinterpret_cast<const T*>(p.q_lat);
      const T* q_rope = reinterpret_cast<const T*>(p.q_rope);
      const int chunks = L.ld_tile / 8;
      for (int idx = tid; idx < p.rows_per_cta * chunks; idx += kThreads) {
        const int r = idx / chunks, c8 = (idx % chunks) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < rows_here && c8 < p.D_c) {
          v = *reinterpret_cast<const uint4*>(q_lat + (q_row_base + r) * p.D_c + c8);
        }
        *reinterpret_cast<uint4*>(q_s + r * L.ld_tile + c8) = v;
      }
      const bool rope_half = p.rope_path == kRopeFp8Keys;
      uint16_t* qr_s = reinterpret_cast<uint16_t*>(smem + L.q_rope);
      for (int idx = tid; idx < kRows * p.d_r; idx += kThreads) {
        const int r = idx / p.d_r, j = idx % p.d_r;
        const float x = r < rows_here ? static_cast<float>(q_rope[(q_row_base + r) * p.d_r + j]) : 0.f;
        if (rope_half) {
          const __half h = __float2half_rn(x);
          qr_s[idx] = *reinterpret_cast<const uint16_t*>(&h);
        } else {
          const T h = from_float<T>(x);
          qr_s[idx] = *reinterpret_cast<const uint16_t*>(&h);
        }
      }
      if (!quant) {
        // Channels D_c .. ld_tile of every stage: cp.async never writes them, the MMAs read
        // D_c .. D16 (and 0 * NaN would poison the scores).
        const int pad = L.ld_tile - p.D_c;
        for (int s = 0; s < num_stages; ++s) {
          T* tile = reinterpret_cast<T*>(smem + L.stages + s * L.stage_bytes + L.st_latent);
          for (int idx = tid; idx < kTileTokens * pad; idx += kThreads) {
            tile[(idx / pad) * L.ld_tile + p.D_c + idx % pad] = from_float<T>(0.f);
          }
        }
      }
    }

    // The RoPE runs of this warp: in row tile rope_nt, rows j = 0..7 form runs of equal KV
    // head; a run starting at j is this warp's when j % kRopeSplit == rope_part. For lane's B
    // column (row g = lane / 4) my_run is the start of its run (-1: a row past the end).
    const int g = lane / 4, tq = lane % 4;
    const int rope_nt = warp % kRowTiles, rope_part = warp / kRowTiles;
    uint32_t run_mask = 0;
    uint32_t run_kvl_lo = 0u, run_kvl_hi = 0u;  // local KV head of rows j < 4 / j >= 4, 8 bits each
    int my_run = -1;
    int kv_of_col[2] = {0, 0};  // global KV head of this lane's two accumulator columns
    {
      int prev = -2, start = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int lr = rope_nt * 8 + j;
        const int kv = (row0 + lr) % p.H / group;
        const int kvl = lr < rows_here ? (kv - kv_lo + p.H_kv) % p.H_kv : -1;
        if (kvl >= 0 && kvl != prev) {
          start = j;
          if (j % kRopeSplit == rope_part) run_mask |= 1u << j;
        }
        (j < 4 ? run_kvl_lo : run_kvl_hi) |= static_cast<uint32_t>(kvl < 0 ? 0 : kvl) << (8 * (j % 4));
        if (j == g && kvl >= 0) my_run = start;
        if (j == 2 * tq) kv_of_col[0] = kv;
        if (j == 2 * tq + 1) kv_of_col[1] = kv;
        prev = kvl;
      }
    }
    const int rope_steps = p.d_r / 8;
    // B fragments of this lane's RoPE query row, read from shared memory at each use.
    const uint32_t* qr_row = reinterpret_cast<const uint32_t*>(smem + L.q_rope) +
                             ((rope_nt * 8 + g) * p.d_r + 2 * tq) / 2;

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
    float* alpha_s = reinterpret_cast<float*>(smem + L.stats);
    const int steps16 = p.D16 / 16;
    const int pending = num_stages - 2;

    cp_async_wait_pending(pending);
    __syncthreads();
    if (quant && tile_begin < tile_end) {
      dequantize_tile(p, smem, 0, 0, len, tile_begin);
      __syncthreads();
    }

    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int it = tile - tile_begin;
      const int stage = it % num_stages;
      const uint8_t* st = smem + L.stages + stage * L.stage_bytes;
      const T* ctile = reinterpret_cast<const T*>(quant ? smem + L.ctile[it & 1] : st + L.st_latent);

      // 1. partial scores: this warp's latent channel tiles, then its RoPE runs.
      float sacc[kRowTiles][4];
#pragma unroll
      for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) sacc[j][k] = 0.f;
#pragma unroll
      for (int j = 0; j < kChanTiles; ++j) {
        const int ks = warp + kWarps * j;
        if (ks >= steps16) break;
        const int c0 = ks * 16;
        uint32_t a[4];
        const int mat = lane / 8;
        ldmatrix_x4(a, ctile + ((mat % 2) * 8 + lane % 8) * L.ld_tile + c0 + (mat / 2) * 8);
#pragma unroll
        for (int nt = 0; nt < kRowTiles; ++nt) {
          uint32_t bq[2];
          const int l = lane % 16;
          ldmatrix_x2(bq, q_s + (nt * 8 + l % 8) * L.ld_tile + c0 + (l / 8) * 8);
          mma16816<T>(sacc[nt], a, bq);
        }
      }
      if (run_mask != 0) {
        const uint8_t* rope = st + L.st_rope;
        const int kvb = p.d_r * p.rope_esize;
        float racc[4] = {0.f, 0.f, 0.f, 0.f};
        for (uint32_t m = run_mask; m != 0; m &= m - 1) {
          const int j = __ffs(m) - 1;
          const bool mine = my_run == j;
          const int kvl = ((j < 4 ? run_kvl_lo : run_kvl_hi) >> (8 * (j % 4))) & 0xFF;
          const uint8_t* key = rope + kvl * kvb;
#pragma unroll
          for (int k = 0; k < kMaxRopeSteps; ++k) {
            if (k >= rope_steps) break;
            const uint32_t bq = mine ? qr_row[k * 4] : 0u;
            uint32_t a[2];
            if (p.rope_path == kRopeLdmatrix) {
              ldmatrix_x2(a, key + (lane % 16) * L.rope_ld + k * 16);
              mma16808<kHalf>(racc, a, bq);
            } else if (p.rope_path == kRopeConvert) {
              const uint8_t* k0 = key + g * L.rope_ld + (k * 8 + 2 * tq) * 2;
              a[0] = convert_pair<kHalf>(*reinterpret_cast<const uint32_t*>(k0));
              a[1] = convert_pair<kHalf>(*reinterpret_cast<const uint32_t*>(k0 + 8 * L.rope_ld));
              mma16808<kHalf>(racc, a, bq);
            } else {
              const uint8_t* k0 = key + g * L.rope_ld + k * 8 + 2 * tq;
              a[0] = fp8x2_to_half2(*reinterpret_cast<const uint16_t*>(k0));
              a[1] = fp8x2_to_half2(*reinterpret_cast<const uint16_t*>(k0 + 8 * L.rope_ld));
              mma16808<true>(racc, a, bq);
            }
          }
        }
        if (p.rope_path == kRopeFp8Keys) {
          // fp8 keys carry a scale per (token, KV head): applied to the score.
          const __half* rs = reinterpret_cast<const __half*>(st + L.st_rope_scale);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            racc[k] *= __half2float(rs[(g + (k / 2) * 8) * p.H_kv + kv_of_col[k % 2]]);
          }
        }
        // sacc[rope_nt] with a run-time index would put sacc in local memory.
#pragma unroll
        for (int nt = 0; nt < kRowTiles; ++nt) {
          if (nt == rope_nt) {
#pragma unroll
            for (int k = 0; k < 4; ++k) sacc[nt][k] += racc[k];
          }
        }
      }
#pragma unroll
      for (int nt = 0; nt < kRowTiles; ++nt) {
        float* dst = spart + (warp * kTileTokens + g) * kSpartLd + nt * 8 + 2 * tq;
        *reinterpret_cast<float2*>(dst) = make_float2(sacc[nt][0], sacc[nt][1]);
        *reinterpret_cast<float2*>(dst + 8 * kSpartLd) = make_float2(sacc[nt][2], sacc[nt][3]);
      }
      __syncthreads();

      // 2. the tile num_stages - 1 ahead goes into the stage tile - 1 used (all its readers are
      // past the barrier above); then scores, mask, online softmax, P^T.
      {
        const int ahead = tile + num_stages - 1;
        if (ahead < tile_end) {
          issue_tile(p, smem, (it + num_stages - 1) % num_stages, len, ahead, next_blk, kv_lo,
                     kv_cnt);
          if (ahead + 1 < tile_end) next_blk = tile_block(p, b, ahead + 1);
        }
        cp_async_commit();
      }
      {
        const int tok0 = tile * kTileTokens;
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
            for (int w = 0; w < kWarps; ++w) dot += spart[(w * kTileTokens + t) * kSpartLd + my_row];
            v = dot * p.softmax_scale_log2;
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
          pt[my_row * kPtLd + t] = from_float<T>(pv);
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
        dequantize_tile(p, smem, (it + 1) % num_stages, (it + 1) & 1, len, tile + 1);
      }
      uint32_t bp[kRowTiles][2];
#pragma unroll
      for (int nt = 0; nt < kRowTiles; ++nt) {
        const int l = lane % 16;
        ldmatrix_x2(bp[nt], pt + (nt * 8 + l % 8) * kPtLd + (l / 8) * 8);
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
#pragma unroll
      for (int mt = 0; mt < kChanTiles; ++mt) {
        const int c0 = (warp + kWarps * mt) * 16;
        if (c0 >= p.D16) break;
        uint32_t a[4];
        const int mat = lane / 8;
        ldmatrix_x4_trans(a, ctile + ((mat / 2) * 8 + lane % 8) * L.ld_tile + c0 + (mat % 2) * 8);
#pragma unroll
        for (int nt = 0; nt < kRowTiles; ++nt) {
          if (rescale) {
            acc[mt][nt][0] *= a_lo[nt];
            acc[mt][nt][1] *= a_hi[nt];
            acc[mt][nt][2] *= a_lo[nt];
            acc[mt][nt][3] *= a_hi[nt];
          }
          mma16816<T>(acc[mt][nt], a, bp[nt]);
        }
      }
      if (quant) {
        if (single_ctile && tile + 1 < tile_end) {
          __syncthreads();  // every warp is done with the tile before it is overwritten
          dequantize_tile(p, smem, (it + 1) % num_stages, 0, len, tile + 1);
        }
        __syncthreads();
      }
    }
    cp_async_wait<0>();

    // Finalize: o = acc / l; lse = ln 2 * (m + log2 l); o = 0, lse = -inf where nothing was
    // visible.
    float* l_s = reinterpret_cast<float*>(smem + L.stats) + kRows;
    if (my_sub == 0) l_s[my_row] = l_run;
    __syncthreads();
    const bool split = num_splits > 1;
    T* o_lat = reinterpret_cast<T*>(p.o_lat);
#pragma unroll
    for (int mt = 0; mt < kChanTiles; ++mt) {
      const int c0 = (warp + kWarps * mt) * 16;
      if (c0 >= p.D16) break;
#pragma unroll
      for (int nt = 0; nt < kRowTiles; ++nt)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int chan = c0 + g + (k / 2) * 8;
          const int r = nt * 8 + 2 * tq + (k % 2);
          if (r >= rows_here || chan >= p.D_c) continue;
          const float l = l_s[r];
          const float v = l > 0.f ? acc[mt][nt][k] / l : 0.f;
          if (split) {
            p.ws_o[(static_cast<int64_t>(part) * p.rows + row0 + r) * p.D_c + chan] = v;
          } else {
            o_lat[(q_row_base + r) * p.D_c + chan] = from_float<T>(v);
          }
        }
    }
    if (my_sub == 0 && my_row_valid) {
      const float lse = l_run > 0.f ? 0.69314718056f * (m_run + log2f(l_run)) : -INFINITY;
      if (split) {
        p.ws_lse[static_cast<int64_t>(part) * p.rows + my_grow] = lse;
      } else {
        p.lse[q_row_base + my_row] = lse;
      }
    }
  }
};

template <typename T, int kChanTiles, int kRowTiles, int kMinCtas>
__global__ void __launch_bounds__(kThreads, kMinCtas)
    mla_decode_kernel(const __grid_constant__ MlaDecodeParams params) {
  DecodeKernel<T, kChanTiles, kRowTiles>::run(params);
}

}  // namespace mla_ext::decode
