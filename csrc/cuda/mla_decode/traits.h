// Params and shared-memory layout of the mla_decode kernel: POD data the host fills and the device
// reads. Strides are implied: every tensor is contiguous (checked by args/mla_decode.h).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "cuda/mla_decode/config.h"

namespace mla_ext::decode {

enum RopeKind : int { kRopeBf16 = 0, kRopeFp16 = 1, kRopeFp32 = 2, kRopeFp8 = 3 };
enum FormatKind : int { kFmtFloat = 0, kFmtInt8 = 1, kFmtFp8 = 2, kFmtInt4 = 3 };

// Byte offsets into dynamic shared memory; each region 16-byte aligned. Two stages of every
// streamed region (raw bytes of the cache as they arrive); the compute tile is the 16-bit tile the
// tensor cores read: for float caches cp.async fills it directly (two stages), for quantized ones
// it is filled by dequantizing the raw stage (one stage).
struct SmemLayout {
  int q, q_rope, tile[2], raw[2], scale[2], zero[2], rope[2], rope_scale[2], spart, pt, stats;
  int total;
  int ld_tile;    // elements per row of the compute tile and of q: D16 + 8 (odd multiple of 16 B)
  int ld_pt;      // elements per row of P^T: tile tokens + 8
  int rope_bytes_per_kv;
};

struct MlaDecodeParams {
  const void* q_lat;             // [B, s_q, H, D_c]
  const void* q_rope;            // [B, s_q, H, d_r]
  const uint8_t* latent;         // [num_blocks, block_size, D_c] (D_c/2 bytes for int4)
  const uint8_t* latent_scale;   // [num_blocks, block_size, num_groups] fp16 or null
  const uint8_t* latent_zero;    // [num_blocks, block_size, num_groups] fp16 or null
  const uint8_t* k_rope;         // [num_blocks, block_size, H_kv, d_r]
  const uint8_t* k_rope_scale;   // [num_blocks, block_size, H_kv] fp16 or null
  const int32_t* block_table;    // [B, max_blocks]
  const int32_t* seq_lens;       // [B]
  const int32_t* plan;           // split_plan.h layout
  void* o_lat;                   // [B, s_q, H, D_c]
  float* lse;                    // [B, s_q, H]
  float* ws_o;                   // [max_parts, s_q * H, D_c] partial outputs of split sequences
  float* ws_lse;                 // [max_parts, s_q * H]
  int B, s_q, H, H_kv, D_c, D16, d_r, block_size, max_blocks, num_groups, group_size;
  int rows;          // s_q * H: (new token, head) pairs of one sequence
  int rows_per_cta;  // <= kRowTiles * 8, a multiple of 8, chosen so shared memory fits
  int row_chunks;    // ceil(rows / rows_per_cta)
  int max_parts;
  int format, rope_kind, rope_esize, latent_row_bytes;
  float softmax_scale;
  SmemLayout smem;
};

C10_HOST_DEVICE inline int align16(int x) { return (x + 15) / 16 * 16; }

// Threads sharing one row's softmax: a power of two within a warp, at most one per token.
C10_HOST_DEVICE constexpr int softmax_threads_per_row(int threads, int rows, int tile_tokens) {
  return threads / rows < tile_tokens ? threads / rows : tile_tokens;
}

// Floats per token of the partial-score buffer: rows plus the rows one warp's softmax reads, so
// that a warp reading (its rows) x (its tokens) hits 32 distinct banks.
C10_HOST_DEVICE constexpr int spart_row_floats(int threads, int rows, int tile_tokens) {
  return rows + 32 / softmax_threads_per_row(threads, rows, tile_tokens);
}

// KV heads a CTA's rows use form a cyclic range of at most rows_per_cta + 1 heads.
C10_HOST_DEVICE inline int max_kv_per_cta(int rows_per_cta, int H, int H_kv) {
  const int group = H / H_kv;
  int n = rows_per_cta / group + 2;
  return n < H_kv ? n : H_kv;
}

inline SmemLayout make_smem_layout(const MlaDecodeParams& p, int warps, int row_tiles,
                                   int tile_tokens) {
  SmemLayout s{};
  const int rows = row_tiles * 8;
  const bool quant = p.format != kFmtFloat;
  s.ld_tile = p.D16 + 8;
  s.ld_pt = tile_tokens + 8;
  s.rope_bytes_per_kv = p.d_r * p.rope_esize;
  int off = 0;
  auto take = [&](int bytes) { int at = off; off += align16(bytes); return at; };
  // Only rows_per_cta query rows are stored; ldmatrix of the rows past them (up to rows) reads
  // the regions that follow, inside the allocation, and those rows' scores are masked.
  s.q = take(p.rows_per_cta * s.ld_tile * 2);
  s.q_rope = take(rows * p.d_r * 4);
  const int tile_bytes = tile_tokens * s.ld_tile * 2;
  s.tile[0] = take(tile_bytes);
  s.tile[1] = quant ? s.tile[0] : take(tile_bytes);
  const int kv = max_kv_per_cta(p.rows_per_cta, p.H, p.H_kv);
  for (int st = 0; st < 2; ++st) {
    s.raw[st] = quant ? take(tile_tokens * p.latent_row_bytes) : 0;
    s.scale[st] = quant ? take(tile_tokens * p.num_groups * 2) : 0;
    s.zero[st] = p.format == kFmtInt4 ? take(tile_tokens * p.num_groups * 2) : 0;
    s.rope[st] = take(tile_tokens * kv * s.rope_bytes_per_kv);
    s.rope_scale[st] = p.rope_kind == kRopeFp8 ? take(tile_tokens * p.H_kv * 2) : 0;
  }
  // One slice per warp (its channels' partial scores) plus one for the RoPE scores.
  s.spart = take((warps + 1) * tile_tokens * spart_row_floats(warps * 32, rows, tile_tokens) * 4);
  s.pt = take(rows * s.ld_pt * 2);
  s.stats = take(3 * rows * 4);
  s.total = off;
  return s;
}

}  // namespace mla_ext::decode
