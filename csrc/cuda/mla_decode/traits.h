// Params and shared-memory layout of the mla_decode kernel: POD data the host fills and the device
// reads. Strides are implied: every tensor is contiguous (checked by args/mla_decode.h).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "cuda/mla_decode/config.h"

namespace mla_ext::decode {

// The kernels' softmax runs in base 2: the host scales the scores by log2(e), and the lse a kernel
// writes is made natural again with ln 2.
constexpr double kLog2e = 1.4426950408889634;
constexpr float kLn2 = 0.69314718056f;

// The natural log-sum-exp of a row from its base-2 running maximum m and sum l; -inf where the
// row saw no token (l = 0), NaN where a score was NaN (l NaN).
C10_HOST_DEVICE inline float row_lse(float m, float l) {
  return l == 0.f ? -INFINITY : kLn2 * (m + log2f(l));
}

enum FormatKind : int { kFmtFloat = 0, kFmtInt8 = 1, kFmtFp8 = 2, kFmtInt4 = 3 };

// How the RoPE score's MMA reads its key operand.
enum RopePath : int {
  kRopeLdmatrix = 0,  // keys in the queries' 16-bit dtype: ldmatrix from the tile
  kRopeConvert = 1,   // keys in the other 16-bit dtype: loaded and converted in registers
  kRopeFp8Keys = 2,   // fp8 keys: converted to fp16 in registers, scale applied to the score
};

// Byte offsets into dynamic shared memory; each region 16-byte aligned. The cache streams through
// a ring of num_stages stages, each one tile of raw cache bytes as they arrive. The 16-bit compute
// tile the tensor cores read is the stage itself for float caches and one of two dequantized
// tiles (ctile) for quantized ones.
struct SmemLayout {
  int q, rope_q, rope_tab, stages, ctile[2], spart, pt, pt_lo, stats, total;
  int stage_bytes, num_stages;
  // offsets inside a stage
  int st_latent, st_scale, st_zero, st_rope, st_rope_scale;
  int ld_tile;   // elements per row of q and of 16-bit latent tiles: D16 + 8 (odd multiple of 16 B)
  int rope_kvb;  // bytes of one KV head's key in the RoPE tile: d_r padded to a multiple of 8
  int rope_ld;   // bytes per token of the RoPE tile: the CTA's KV heads, padded likewise
  int kv_max;    // KV heads of a CTA's rope tile (at most)
  // The RoPE score of a row tile is one MMA chain over its runs (rows sharing a KV head): the
  // keys of run i fill k-units (8 key dims each) i * d_r_pad / 8 ..; the queries form a
  // block-diagonal B (rope_q: each row's query in its run's units, zeros elsewhere).
  int rope_steps_max;      // k16 steps of the longest row tile: ceil(runs * d_r_pad / 8 / 2)
  int rope_q_ld;           // 16-bit elements per row of rope_q (an odd multiple of 16 bytes)
  int rope_tab_ld;         // ints per row tile in rope_tab: steps, run of each row, step offsets
  // The Hopper kernel (hopper/layout.h) keeps the RoPE keys in a ring of their own, one slot
  // fewer than the latent's (a slot is refilled as soon as the RoPE score has read it), and its
  // latent slots as 64-channel blocks of tile_tokens x 128 bytes.
  int rope_ring, rope_slot_bytes, rope_slots, lat_block_bytes;
  // The warp-specialized kernel (warpspec/layout.h): its slots' full and empty mbarriers, and the
  // 64-column blocks of a token's RoPE keys (all KV heads) in a slot, after the latent's.
  int mbar, rope_blocks;
  // Its quantized latents: a ring of raw_slots slots of raw_bytes each at `raw` holding a tile's
  // stored bytes (latent rows at 0, scales at r_scale, int4 zeros at r_zero), which the producer
  // warpgroup dequantizes into the 16-bit slots above.
  int raw, raw_slots, raw_bytes, r_scale, r_zero;
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
  int group_shift;   // log2(group_size) when it is a power of two, else -1 (then a division)
  int d_r_pad;       // d_r rounded up to a multiple of 8
  int rows;          // s_q * H: (new token, head) pairs of one sequence
  int rows_per_cta;  // at most row_tiles * 8, a multiple of 8, so that shared memory fits
  int row_chunks;    // ceil(rows / rows_per_cta)
  int max_parts;
  int format, rope_path, rope_esize, latent_row_bytes;
  int rope_chunk;    // bytes per cp.async of RoPE keys: 16, 8 or 4 (what d_r * esize allows)
  int tile_tokens;   // tokens per tile (the plan's unit)
  float softmax_scale_log2;  // softmax_scale * log2(e): the kernel works in base 2
  SmemLayout smem;
};

C10_HOST_DEVICE inline int align16(int x) { return (x + 15) / 16 * 16; }

// A row pitch that is an odd multiple of 16 bytes: ldmatrix of 8 rows then hits 8 distinct
// 16-byte bank groups.
C10_HOST_DEVICE inline int conflict_free_pitch(int bytes) {
  const int p = align16(bytes);
  return (p / 16) % 2 == 1 ? p : p + 16;
}

// KV heads a CTA's rows use form a cyclic range of at most rows_per_cta / group + 2 heads.
C10_HOST_DEVICE inline int max_kv_per_cta(int rows_per_cta, int H, int H_kv) {
  const int group = H / H_kv;
  int n = rows_per_cta / group + 2;
  return n < H_kv ? n : H_kv;
}

// Runs (consecutive rows of one KV head) in 8 consecutive rows: a new run starts at each row
// that is a multiple of the group (a new head, or head 0 of the next query token).
C10_HOST_DEVICE inline int max_rope_runs(int H, int H_kv) {
  if (H_kv == 1) return 1;
  const int group = H / H_kv;
  const int n = 1 + (7 + group - 1) / group;
  return n < 8 ? n : 8;
}
constexpr int kRopeTabHeader = 9;  // steps, then the run of each of the 8 rows (-1: no row)

// Floats per token of the score buffer (one slice per warp sharing a block's channels): rows
// plus 4, so that a warp's softmax reads (4 rows x 8 tokens) hit 32 distinct banks.
C10_HOST_DEVICE constexpr int spart_ld(int rows) { return rows + 4; }
// 16-bit elements per row of P^T: tokens plus 8 (an odd multiple of 16 bytes for 16 or 32
// tokens: conflict-free ldmatrix).
C10_HOST_DEVICE constexpr int pt_ld(int tile_tokens) { return tile_tokens + 8; }

// The kernel's compile-time shape a layout is made for (config.h BucketShape, resolved).
struct KernelShape {
  int rows;         // row_tiles * 8: the rows of the kernel's MMA tiles; p.rows_per_cta <= it
  int tile_tokens;  // pieces * 16
  int k_split;      // warps sharing one score block's channels
  bool q_in_regs;
};

inline KernelShape kernel_shape_of(int bucket) {
  const BucketShape& b = kBuckets[bucket];
  return {b.row_tiles * 8, bucket_tile_tokens(bucket), bucket_k_split(bucket), b.q_in_regs};
}

// q and rope_q hold rows_per_cta rows: ldmatrix of q rows past rows_per_cta reads the regions
// that follow, inside the allocation, and those rows' scores are masked; row tiles past
// rows_per_cta take no RoPE steps. A smaller CTA needs fewer KV heads' keys. ctiles: 2 dequantized compute tiles (the next tile is dequantized
// while this one is used), or 1 (a barrier more per tile, for quantized caches of the widest
// latents).
inline SmemLayout make_smem_layout(const MlaDecodeParams& p, int num_stages, const KernelShape& k,
                                   int ctiles = 2) {
  SmemLayout s{};
  const int rows = k.rows, tile = k.tile_tokens;
  const bool quant = p.format != kFmtFloat;
  s.ld_tile = p.D16 + 8;
  s.kv_max = max_kv_per_cta(p.rows_per_cta, p.H, p.H_kv);
  s.rope_kvb = p.d_r_pad * p.rope_esize;
  s.rope_ld = conflict_free_pitch(s.kv_max * s.rope_kvb);
  s.num_stages = num_stages;
  int off = 0;
  auto take = [&](int bytes) { int at = off; off += align16(bytes); return at; };
  s.q = k.q_in_regs ? 0 : take(p.rows_per_cta * s.ld_tile * 2);
  s.rope_steps_max = (max_rope_runs(p.H, p.H_kv) * (p.d_r_pad / 8) + 1) / 2;
  s.rope_q_ld = conflict_free_pitch(s.rope_steps_max * 32) / 2;
  s.rope_tab_ld = kRopeTabHeader + s.rope_steps_max;
  s.rope_q = take(p.rows_per_cta * s.rope_q_ld * 2);
  s.rope_tab = take(rows / 8 * s.rope_tab_ld * 4);
  s.spart = take(k.k_split * tile * spart_ld(rows) * 4);
  s.pt = take(rows * pt_ld(tile) * 2);
  s.pt_lo = take(rows * pt_ld(tile) * 2);
  s.stats = take(3 * rows * 4);
  const int ctile_bytes = tile * s.ld_tile * 2;
  s.ctile[0] = quant ? take(ctile_bytes) : 0;
  s.ctile[1] = quant ? (ctiles > 1 ? take(ctile_bytes) : s.ctile[0]) : 0;
  int st = 0;
  auto take_st = [&](int bytes) { int at = st; st += align16(bytes); return at; };
  s.st_latent = take_st(quant ? tile * p.latent_row_bytes : ctile_bytes);
  s.st_scale = quant ? take_st(tile * p.num_groups * 2) : 0;
  s.st_zero = p.format == kFmtInt4 ? take_st(tile * p.num_groups * 2) : 0;
  s.st_rope = take_st(tile * s.rope_ld);
  s.st_rope_scale = p.rope_path == kRopeFp8Keys ? take_st(tile * p.H_kv * 2) : 0;
  s.stage_bytes = st;
  s.stages = take(num_stages * st);
  s.total = off;
  return s;
}

}  // namespace mla_ext::decode
