// Shape and shared-memory layout of the Hopper (wgmma) decode kernel. Plain C++: the host sizes
// the pipeline with it before the launch.
//
// One CTA is one warpgroup (128 threads) and handles up to kRows = 32 (query token, head) rows
// of one split. Both GEMMs run on wgmma with their operands in shared memory:
//   scores  S^T[tokens x rows]   = C[tokens x D_c] Q^T          (M = 64 tokens, N = 32 rows)
//   output  O^T[channels x rows] += C^T[channels x tokens] P^T  (M = 64 channels, N = 32 rows)
// so one shared-memory latent tile is read as a K-major A (scores) and as an M-major A (output),
// without a copy. A tile is tile_tokens = 64 tokens, or 48 where the RoPE keys are too large for
// two 64-token latent slots plus one RoPE slot (the MHA shapes with bf16 keys): the score GEMM
// still has M = 64, its rows past the tile read the next shared-memory bytes and are masked.
#pragma once

#include "cuda/mla_decode/config.h"
#include "cuda/mla_decode/traits.h"

namespace mla_ext::decode::hopper {

constexpr int kThreads = 128;
constexpr int kRows = 32;             // the GEMMs' N
constexpr int kRowTiles = kRows / 8;  // 8-row tiles of the RoPE score (mma.sync m16n8k16)
constexpr int kGemmTokens = 64;       // the score GEMM's M
constexpr int kChanBlock = 64;        // channels of one 128-byte swizzle atom row
constexpr int kMaxLatent = 512;       // the output accumulators: D_c * 32 / 128 <= 128 per thread
constexpr int kMinLatentSlots = 2;
constexpr int kMaxLatentSlots = 4;

inline int align_to(int x, int a) { return (x + a - 1) / a * a; }

// The layout for tiles of `tile` tokens and `slots` latent slots (slots - 1 RoPE slots).
// Offsets are from a 1024-byte aligned base; total includes the 1 KB the kernel may skip to
// align the dynamic shared memory.
inline SmemLayout make_hopper_layout(const MlaDecodeParams& p, int tile, int slots) {
  SmemLayout s{};
  s.kv_max = max_kv_per_cta(p.rows_per_cta, p.H, p.H_kv);
  s.rope_kvb = p.d_r_pad * p.rope_esize;
  s.rope_ld = conflict_free_pitch(s.kv_max * s.rope_kvb);
  s.lat_block_bytes = tile * 128;
  s.stage_bytes = (p.D_c / kChanBlock) * s.lat_block_bytes;
  s.num_stages = slots;
  int off = 0;
  auto take = [&](int bytes, int align) {
    off = align_to(off, align);
    const int at = off;
    off += bytes;
    return at;
  };
  s.stages = take(slots * s.stage_bytes, 1024);
  // the score GEMM's rows past a 48-token tile read this far past the last slot
  take((kGemmTokens - tile) * 128, 16);
  s.q = take(kRows * p.D_c * 2, 1024);
  s.pt = take(kRows * 128, 1024);
  s.pt_lo = take(kRows * 128, 1024);
  s.rope_slots = slots - 1;
  s.rope_slot_bytes = tile * s.rope_ld;
  s.rope_ring = take(s.rope_slots * s.rope_slot_bytes, 16);
  s.rope_steps_max = (max_rope_runs(p.H, p.H_kv) * (p.d_r_pad / 8) + 1) / 2;
  s.rope_q_ld = conflict_free_pitch(s.rope_steps_max * 32) / 2;
  s.rope_tab_ld = kRopeTabHeader + s.rope_steps_max;
  s.rope_q = take(p.rows_per_cta * s.rope_q_ld * 2, 16);
  s.rope_tab = take(kRowTiles * s.rope_tab_ld * 4, 16);
  s.stats = take(2 * 4 * kRows * 4, 16);  // per warp and row: the tile's maximum; the final sums
  s.total = align_to(off, 16) + 1024;
  return s;
}

}  // namespace mla_ext::decode::hopper
