// Device bodies of mla_decode: one CTA = one split (a run of tiles of one sequence) x one chunk of
// (new token, head) rows. Per tile of tokens:
//   1. cp.async the next tile's raw cache bytes (double buffered) while this one is computed;
//   2. quantized formats: dequantize the raw tile in registers into the 16-bit compute tile;
//   3. S^T = C Q^T on tensor cores (m16n8k16; tokens on M, rows on N = 8); warps split D_c;
//   4. per row: sum the warps' partial scores, add the RoPE score of the row's KV head, mask,
//      online softmax; P^T to shared memory;
//   5. O^T += C^T P^T on tensor cores, with the same compute tile as A (the latent is K and V).
// A sequence with one split writes o_lat and lse directly; split ones write fp32 partials that
// combine.cu merges by log-sum-exp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "core/quant.h"
#include "cuda/mla_decode/split_plan.h"
#include "cuda/mla_decode/traits.h"

namespace mla_ext::decode {

// ---------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 writes zeros (tokens past the sequence end).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(smem_addr(dst)), "l"(src));
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

__device__ __forceinline__ float fp8_to_float(uint8_t v) {
  const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(v), __NV_E4M3);
  return __half2float(__half(h));
}

__device__ __forceinline__ float half_bits_to_float(const uint8_t* p) {
  return __half2float(*reinterpret_cast<const __half*>(p));
}

// ---------------------------------------------------------------- the kernel

template <typename T, int kWarps, int kChanTiles, int kRowTiles, int kTileTokens>
struct DecodeKernel {
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = kRowTiles * 8;
  static constexpr int kTokTiles = kTileTokens / 16;
  static constexpr int kPieces = kTileTokens / kPieceTokens;
  // Threads sharing one row's softmax: a power of two within a warp, at most one per token; with
  // more threads than rows * tokens the surplus threads sit the softmax out.
  static constexpr int kThreadsPerRow = softmax_threads_per_row(kThreads, kRows, kTileTokens);
  static constexpr int kSpartLd = spart_row_floats(kThreads, kRows, kTileTokens);
  static constexpr int kSoftmaxThreads = kRows * kThreadsPerRow;
  static constexpr int kTokensPerThread = kTileTokens / kThreadsPerRow;
  static_assert(kTileTokens % 16 == 0 && kTileTokens % kPieceTokens == 0);
  static_assert(kThreadsPerRow >= 1 && kThreadsPerRow <= 32 && 32 % kThreadsPerRow == 0);
  static_assert(kSoftmaxThreads % 32 == 0 && kSoftmaxThreads <= kThreads);
  static_assert(kTileTokens % kThreadsPerRow == 0);
  static_assert(kThreads % kRows == 0);  // the RoPE pass gives each thread one fixed row

  // Slot (block * block_size + offset) of the first token of piece `piece` of tile `tile`, or -1
  // when the piece starts at or past the sequence end (its block-table entry may be garbage).
  static __device__ __forceinline__ int64_t piece_slot(const MlaDecodeParams& p, int b, int len,
                                                       int tile, int piece) {
    const int tok = tile * kTileTokens + piece * kPieceTokens;
    if (tok >= len) return -1;
    const int blk = p.block_table[static_cast<int64_t>(b) * p.max_blocks + tok / p.block_size];
    return static_cast<int64_t>(blk) * p.block_size + tok % p.block_size;
  }

  // Issue the cp.asyncs of one tile into stage `st` (no commit).
  static __device__ void load_tile(const MlaDecodeParams& p, uint8_t* smem, int st, int b,
                                   int len, int tile, int kv_lo, int kv_cnt) {
    const SmemLayout& L = p.smem;
    const int tid = threadIdx.x;
    int64_t slots[kPieces];
#pragma unroll
    for (int i = 0; i < kPieces; ++i) slots[i] = piece_slot(p, b, len, tile, i);
    const int tok0 = tile * kTileTokens;
    if (p.format == kFmtFloat) {
      // Rows straight into the padded compute tile; rows past the end become zeros.
      const int chunks = p.D_c / 8;
      T* dst = reinterpret_cast<T*>(smem + L.tile[st]);
      const T* src = reinterpret_cast<const T*>(p.latent);
      for (int idx = tid; idx < kTileTokens * chunks; idx += kThreads) {
        const int t = idx / chunks, c = idx % chunks;
        const int64_t slot = slots[t / kPieceTokens];
        const bool valid = slot >= 0 && tok0 + t < len;
        const T* s = valid ? src + (slot + t % kPieceTokens) * p.D_c + c * 8 : src;
        cp_async16(dst + t * L.ld_tile + c * 8, s, valid ? 16 : 0);
      }
    } else {
      // Quantized: each piece's bytes are contiguous in global and in shared memory.
      const int rb = p.latent_row_bytes;  // 16 tokens * rb is a multiple of 16
      for (int idx = tid; idx < kPieces * rb; idx += kThreads) {
        const int piece = idx / rb, j = idx % rb;
        if (slots[piece] < 0) continue;
        cp_async16(smem + L.raw[st] + piece * kPieceTokens * rb + j * 16,
                   p.latent + slots[piece] * rb + j * 16);
      }
      const int sb = p.num_groups * 2;  // per token; 16 tokens * sb is a multiple of 32
      for (int idx = tid; idx < kPieces * sb; idx += kThreads) {
        const int piece = idx / sb, j = idx % sb;
        if (slots[piece] < 0) continue;
        cp_async16(smem + L.scale[st] + piece * kPieceTokens * sb + j * 16,
                   p.latent_scale + slots[piece] * sb + j * 16);
        if (p.format == kFmtInt4) {
          cp_async16(smem + L.zero[st] + piece * kPieceTokens * sb + j * 16,
                     p.latent_zero + slots[piece] * sb + j * 16);
        }
      }
    }
    // RoPE keys of the KV heads this CTA's rows use: [token][kv_local][d_r].
    const int kvb = L.rope_bytes_per_kv;
    const int csize = kvb % 16 == 0 ? 16 : 8;  // api.cu checks kvb % 8 == 0
    const int per_kv = kvb / csize;
    const int row_bytes = p.H_kv * kvb;
    for (int idx = tid; idx < kTileTokens * kv_cnt * per_kv; idx += kThreads) {
      const int t = idx / (kv_cnt * per_kv), rem = idx % (kv_cnt * per_kv);
      const int kl = rem / per_kv, j = rem % per_kv;
      const int64_t slot = slots[t / kPieceTokens];
      if (slot < 0) continue;
      int kv = kv_lo + kl;
      if (kv >= p.H_kv) kv -= p.H_kv;
      uint8_t* dst = smem + L.rope[st] + (t * kv_cnt + kl) * kvb + j * csize;
      const uint8_t* src = p.k_rope + (slot + t % kPieceTokens) * row_bytes + kv * kvb + j * csize;
      if (csize == 16) cp_async16(dst, src); else cp_async8(dst, src);
    }
    if (p.rope_kind == kRopeFp8) {
      const int sb = p.H_kv * 2;
      for (int idx = tid; idx < kPieces * sb; idx += kThreads) {
        const int piece = idx / sb, j = idx % sb;
        if (slots[piece] < 0) continue;
        cp_async16(smem + L.rope_scale[st] + piece * kPieceTokens * sb + j * 16,
                   p.k_rope_scale + slots[piece] * sb + j * 16);
      }
    }
  }

  // Raw quantized stage -> 16-bit compute tile, 8 channels per step, zeros past the end.
  static __device__ void dequantize_tile(const MlaDecodeParams& p, uint8_t* smem, int st,
                                         int len, int tile) {
    const SmemLayout& L = p.smem;
    T* dst = reinterpret_cast<T*>(smem + L.tile[0]);
    const uint8_t* raw = smem + L.raw[st];
    const __half* sc = reinterpret_cast<const __half*>(smem + L.scale[st]);
    const __half* zr = reinterpret_cast<const __half*>(smem + L.zero[st]);
    const int chunks = p.D16 / 8;
    const int tok0 = tile * kTileTokens;
    const bool uniform_group = p.group_size % 8 == 0;
    for (int idx = threadIdx.x; idx < kTileTokens * chunks; idx += kThreads) {
      const int t = idx / chunks, c8 = (idx % chunks) * 8;
      float v[8];
      if (tok0 + t < len && c8 < p.D_c) {
        const __half* srow = sc + t * p.num_groups;
        const __half* zrow = zr + t * p.num_groups;
        float s[8], z[8];
        if (uniform_group) {
          const int g = c8 / p.group_size;
          const float s0 = __half2float(srow[g]);
          const float z0 = p.format == kFmtInt4 ? __half2float(zrow[g]) : 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) { s[j] = s0; z[j] = z0; }
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int g = (c8 + j) / p.group_size;
            s[j] = __half2float(srow[g]);
            z[j] = p.format == kFmtInt4 ? __half2float(zrow[g]) : 0.f;
          }
        }
        if (p.format == kFmtInt4) {
          const uint32_t w = *reinterpret_cast<const uint32_t*>(raw + t * (p.D_c / 2) + c8 / 2);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            v[j] = quant::dequantize_int4(static_cast<uint8_t>((w >> (4 * j)) & 0xF), s[j], z[j]);
          }
        } else {
          const uint2 w = *reinterpret_cast<const uint2*>(raw + t * p.D_c + c8);
          const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&w);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            v[j] = p.format == kFmtInt8
                       ? quant::dequantize_int8(static_cast<int8_t>(bytes[j]), s[j])
                       : fp8_to_float(bytes[j]) * s[j];
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = 0.f;
      }
      alignas(16) T out[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) out[j] = from_float<T>(v[j]);
      *reinterpret_cast<uint4*>(dst + t * L.ld_tile + c8) = *reinterpret_cast<const uint4*>(out);
    }
  }

  // q_rope . k_rope of one (token, row): the key is read in 8-byte pieces (rows of a warp read
  // neighbouring keys: few bank conflicts), the query from the transposed qr_s [d_r][kRows].
  static __device__ __forceinline__ float rope_dot(const MlaDecodeParams& p, const uint8_t* key,
                                                   const float* qr_col) {
    float dot = 0.f;
    const int kvb = p.smem.rope_bytes_per_kv;
    for (int c = 0; c < kvb; c += 8) {
      const uint2 w = *reinterpret_cast<const uint2*>(key + c);
      switch (p.rope_kind) {
        case kRopeBf16:
        case kRopeFp16: {
          const int j = c / 2;
          const uint32_t words[2] = {w.x, w.y};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const uint16_t bits = static_cast<uint16_t>(words[e / 2] >> (16 * (e % 2)));
            float k;
            if (p.rope_kind == kRopeBf16) {
              k = __uint_as_float(static_cast<uint32_t>(bits) << 16);
            } else {
              __half_raw raw;
              raw.x = bits;
              k = __half2float(__half(raw));
            }
            dot += qr_col[(j + e) * kRows] * k;
          }
          break;
        }
        case kRopeFp32: {
          const int j = c / 4;
          dot += qr_col[j * kRows] * __uint_as_float(w.x) +
                 qr_col[(j + 1) * kRows] * __uint_as_float(w.y);
          break;
        }
        default: {
          const uint32_t words[2] = {w.x, w.y};
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const uint8_t b = static_cast<uint8_t>(words[e / 4] >> (8 * (e % 4)));
            dot += qr_col[(c + e) * kRows] * fp8_to_float(b);
          }
        }
      }
    }
    return dot;
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

    // Queries of this CTA's rows (zero rows and channels past the end), and the tile padding.
    T* q_s = reinterpret_cast<T*>(smem + L.q);
    float* qr_s = reinterpret_cast<float*>(smem + L.q_rope);
    const T* q_lat = reinterpret_cast<const T*>(p.q_lat);
    const T* q_rope = reinterpret_cast<const T*>(p.q_rope);
    const int64_t q_row_base = static_cast<int64_t>(b) * p.rows + row0;
    {
      const int chunks = L.ld_tile / 8;
      for (int idx = tid; idx < p.rows_per_cta * chunks; idx += kThreads) {
        const int r = idx / chunks, c8 = (idx % chunks) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < rows_here && c8 < p.D_c) {
          v = *reinterpret_cast<const uint4*>(q_lat + (q_row_base + r) * p.D_c + c8);
        }
        *reinterpret_cast<uint4*>(q_s + r * L.ld_tile + c8) = v;
      }
      for (int idx = tid; idx < kRows * p.d_r; idx += kThreads) {
        const int r = idx / p.d_r, j = idx % p.d_r;
        qr_s[j * kRows + r] =
            r < rows_here ? static_cast<float>(q_rope[(q_row_base + r) * p.d_r + j]) : 0.f;
      }
      if (p.format == kFmtFloat) {
        const int pad = L.ld_tile - p.D_c;  // channels cp.async never writes
        for (int st = 0; st < 2; ++st) {
          T* tile = reinterpret_cast<T*>(smem + L.tile[st]);
          for (int idx = tid; idx < kTileTokens * pad; idx += kThreads) {
            tile[(idx / pad) * L.ld_tile + p.D_c + idx % pad] = from_float<T>(0.f);
          }
        }
      }
    }

    float acc[kChanTiles][kRowTiles][4];
#pragma unroll
    for (int i = 0; i < kChanTiles; ++i)
#pragma unroll
      for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[i][j][k] = 0.f;

    // Softmax state of this thread's row, replicated over the row's threads.
    const bool softmax_thread = tid < kSoftmaxThreads;
    const int my_row = softmax_thread ? tid / kThreadsPerRow : 0, my_sub = tid % kThreadsPerRow;
    const int my_grow = row0 + my_row;
    const bool my_row_valid = softmax_thread && my_row < rows_here;
    const int my_i = my_grow / p.H;
    const int my_last_visible = len - p.s_q + my_i;  // positions <= this are visible
    float m_run = -INFINITY, l_run = 0.f;

    float* spart = reinterpret_cast<float*>(smem + L.spart);
    T* pt = reinterpret_cast<T*>(smem + L.pt);
    float* alpha_s = reinterpret_cast<float*>(smem + L.stats);
    const int chan_base = warp * kChanTiles * 16;

    // The RoPE pass: this thread's fixed row (kThreads is a multiple of kRows) and its KV head.
    const int rope_row = tid % kRows;
    int rope_kl = (((row0 + rope_row) % p.H) / group - kv_lo + p.H_kv) % p.H_kv;
    if (rope_kl >= kv_cnt) rope_kl = 0;  // rows past the end: masked anyway
    const int rope_kv_global = (kv_lo + rope_kl) % p.H_kv;

    if (tile_begin < tile_end) load_tile(p, smem, 0, b, len, tile_begin, kv_lo, kv_cnt);
    cp_async_commit();

    for (int tile = tile_begin; tile < tile_end; ++tile) {
      const int st = (tile - tile_begin) & 1;
      if (tile + 1 < tile_end) load_tile(p, smem, st ^ 1, b, len, tile + 1, kv_lo, kv_cnt);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      if (p.format != kFmtFloat) {
        dequantize_tile(p, smem, st, len, tile);
        __syncthreads();
      }
      const T* ctile = reinterpret_cast<const T*>(smem + L.tile[p.format == kFmtFloat ? st : 0]);

      // 3. partial scores of this warp's channels: S^T[token][row].
      float sacc[kTokTiles][kRowTiles][4];
#pragma unroll
      for (int i = 0; i < kTokTiles; ++i)
#pragma unroll
        for (int j = 0; j < kRowTiles; ++j)
#pragma unroll
          for (int k = 0; k < 4; ++k) sacc[i][j][k] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kChanTiles; ++ks) {
        const int c0 = chan_base + ks * 16;
        if (c0 >= p.D16) break;
        uint32_t bq[kRowTiles][2];
#pragma unroll
        for (int nt = 0; nt < kRowTiles; ++nt) {
          const int l = lane % 16;
          ldmatrix_x2(bq[nt], q_s + (nt * 8 + l % 8) * L.ld_tile + c0 + (l / 8) * 8);
        }
#pragma unroll
        for (int mt = 0; mt < kTokTiles; ++mt) {
          uint32_t a[4];
          const int mat = lane / 8;
          ldmatrix_x4(a, ctile + (mt * 16 + (mat % 2) * 8 + lane % 8) * L.ld_tile + c0 +
                             (mat / 2) * 8);
#pragma unroll
          for (int nt = 0; nt < kRowTiles; ++nt) mma16816<T>(sacc[mt][nt], a, bq[nt]);
        }
      }
#pragma unroll
      for (int mt = 0; mt < kTokTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kRowTiles; ++nt)
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int t = mt * 16 + lane / 4 + (k / 2) * 8;
            const int r = nt * 8 + 2 * (lane % 4) + (k % 2);
            spart[(warp * kTileTokens + t) * kSpartLd + r] = sacc[mt][nt][k];
          }
      // RoPE scores into the extra slice: one (token, row) per thread and step, rows fastest.
      {
        const uint8_t* rope = smem + L.rope[st];
        const __half* rscale = reinterpret_cast<const __half*>(smem + L.rope_scale[st]);
        float* srope = spart + kWarps * kTileTokens * kSpartLd;
        const float* qr_col = qr_s + rope_row;
        for (int t = tid / kRows; t < kTileTokens; t += kThreads / kRows) {
          float dot = rope_dot(p, rope + (t * kv_cnt + rope_kl) * L.rope_bytes_per_kv, qr_col);
          if (p.rope_kind == kRopeFp8) dot *= __half2float(rscale[t * p.H_kv + rope_kv_global]);
          srope[t * kSpartLd + rope_row] = dot;
        }
      }
      __syncthreads();

      // 4. scores, mask, online softmax; P^T[row][token] in T. Whole warps take part or not.
      if (softmax_thread) {
        const int tok0 = tile * kTileTokens;
        float s[kTokensPerThread];
        float tile_max = -INFINITY;
#pragma unroll
        for (int k = 0; k < kTokensPerThread; ++k) {
          const int t = my_sub + k * kThreadsPerRow;
          const int pos = tok0 + t;
          const bool visible = my_row_valid && pos < len && pos <= my_last_visible;
          float v = -INFINITY;
          if (visible) {
            float dot = 0.f;  // kWarps channel slices + the RoPE slice
#pragma unroll
            for (int w = 0; w <= kWarps; ++w) {
              dot += spart[(w * kTileTokens + t) * kSpartLd + my_row];
            }
            v = dot * p.softmax_scale;
          }
          s[k] = v;
          tile_max = fmaxf(tile_max, v);
        }
#pragma unroll
        for (int off = kThreadsPerRow / 2; off > 0; off /= 2) {
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, off));
        }
        const float m_new = fmaxf(m_run, tile_max);
        const float alpha = m_new == -INFINITY ? 1.f : __expf(m_run - m_new);
        float psum = 0.f;
#pragma unroll
        for (int k = 0; k < kTokensPerThread; ++k) {
          const int t = my_sub + k * kThreadsPerRow;
          const float pv = s[k] == -INFINITY ? 0.f : __expf(s[k] - m_new);
          psum += pv;
          pt[my_row * L.ld_pt + t] = from_float<T>(pv);
        }
#pragma unroll
        for (int off = kThreadsPerRow / 2; off > 0; off /= 2) {
          psum += __shfl_xor_sync(0xffffffffu, psum, off);
        }
        l_run = l_run * alpha + psum;
        m_run = m_new;
        if (my_sub == 0) alpha_s[my_row] = alpha;
      }
      __syncthreads();

      // 5. O^T[channel][row] = alpha * O^T + C^T P^T.
#pragma unroll
      for (int mt = 0; mt < kChanTiles; ++mt) {
        const int c0 = chan_base + mt * 16;
        if (c0 >= p.D16) break;
#pragma unroll
        for (int nt = 0; nt < kRowTiles; ++nt) {
          const float a0 = alpha_s[nt * 8 + 2 * (lane % 4)];
          const float a1 = alpha_s[nt * 8 + 2 * (lane % 4) + 1];
          acc[mt][nt][0] *= a0;
          acc[mt][nt][1] *= a1;
          acc[mt][nt][2] *= a0;
          acc[mt][nt][3] *= a1;
        }
#pragma unroll
        for (int kt = 0; kt < kTokTiles; ++kt) {
          uint32_t a[4];
          const int mat = lane / 8;
          ldmatrix_x4_trans(a, ctile + (kt * 16 + (mat / 2) * 8 + lane % 8) * L.ld_tile + c0 +
                                   (mat % 2) * 8);
#pragma unroll
          for (int nt = 0; nt < kRowTiles; ++nt) {
            uint32_t bp[2];
            const int l = lane % 16;
            ldmatrix_x2(bp, pt + (nt * 8 + l % 8) * L.ld_pt + kt * 16 + (l / 8) * 8);
            mma16816<T>(acc[mt][nt], a, bp);
          }
        }
      }
      __syncthreads();
    }
    cp_async_wait<0>();

    // Finalize: o = acc / l; lse = m + log l; o = 0, lse = -inf where nothing was visible.
    float* l_s = reinterpret_cast<float*>(smem + L.stats) + kRows;
    float* m_s = l_s + kRows;
    if (softmax_thread && my_sub == 0) {
      l_s[my_row] = l_run;
      m_s[my_row] = m_run;
    }
    __syncthreads();
    const bool split = num_splits > 1;
    T* o_lat = reinterpret_cast<T*>(p.o_lat);
#pragma unroll
    for (int mt = 0; mt < kChanTiles; ++mt) {
      const int c0 = chan_base + mt * 16;
      if (c0 >= p.D16) break;
#pragma unroll
      for (int nt = 0; nt < kRowTiles; ++nt)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int chan = c0 + lane / 4 + (k / 2) * 8;
          const int r = nt * 8 + 2 * (lane % 4) + (k % 2);
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
      const float lse = l_run > 0.f ? m_run + logf(l_run) : -INFINITY;
      if (split) {
        p.ws_lse[static_cast<int64_t>(part) * p.rows + my_grow] = lse;
      } else {
        p.lse[q_row_base + my_row] = lse;
      }
    }
  }
};

template <typename T, int kWarps, int kChanTiles, int kRowTiles, int kTileTokens>
// At most 128 registers per thread: 512 threads fill the register file, and smaller CTAs should
// leave room for a second or fourth CTA per SM to hide memory latency.
__global__ void __launch_bounds__(kWarps * 32, 512 / (kWarps * 32))
    mla_decode_kernel(const __grid_constant__ MlaDecodeParams params) {
  DecodeKernel<T, kWarps, kChanTiles, kRowTiles, kTileTokens>::run(params);
}

}  // namespace mla_ext::decode
