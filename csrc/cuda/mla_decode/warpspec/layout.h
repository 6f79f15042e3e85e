// Shape and shared-memory layout of the warp-specialized Hopper decode kernel. Plain C++: the host
// sizes the pipeline with it before the launch.
//
// A CTA is a producer warpgroup and two consumer warpgroups over up to kRows = 32 (query token,
// head) rows of one split. The producer streams 64-token tiles into a ring of slots with TMA
// (the latent and every KV head's RoPE keys, 128-byte swizzled, 16-token boxes); the consumer
// warpgroups take alternate tiles, each with its own online softmax and output accumulators,
// merged at the end. Per tile and consumer, all on wgmma from shared memory:
//   scores  S^T[64 tokens x 32 rows]  = C Q^T             (m64n32k16, K = D_c)
//                                      + K_r Qbd_j^T      (m64n8k16 per 8-row group j: the keys'
//                                        window of the group's KV heads, block-diagonal queries)
//   output  O^T[channels x 32 rows]  += C^T (P_hi + P_lo)^T (m64n32k16, the latent tile M-major)
#pragma once

#include "cuda/mla_decode/config.h"
#include "cuda/mla_decode/traits.h"

namespace mla_ext::decode::warpspec {

// A whole warpgroup produces (one lane issues the copies): register counts are set per
// warpgroup (setmaxnreg), and ptxas sizes a kernel's registers for whole warpgroups anyway.
constexpr int kConsumers = 2;                        // consumer warpgroups
constexpr int kProducerWarp = 4 * kConsumers;        // first warp of the producer warpgroup
constexpr int kThreads = (kProducerWarp + 4) * 32;   // 384
constexpr int kProducerRegisters = 40;               // setmaxnreg: 128 x 40 + 256 x 232 <= 64 K
constexpr int kConsumerRegisters = 232;
constexpr int kRows = 32;                            // N of the GEMMs
constexpr int kTileTokens = 64;                      // M of the score GEMM
constexpr int kChanBlock = 64;                       // columns of a 128-byte swizzle atom row
constexpr int kBoxRows = 16;                         // TMA box: 16 tokens (one piece) x 64 columns
constexpr int kBlockBytes = kTileTokens * 128;       // one 64-column block of a tile
constexpr int kMaxBlocks = 4;                        // D_c <= 256: O^T is 16 kBlocks registers
constexpr int kMinSlots = 3;                         // two tiles computed while one loads
constexpr int kMaxSlots = 6;
constexpr int kMaxRopeSteps = 8;                     // k16 steps of a group's RoPE window
constexpr int kMaxRawSlots = 4;                      // quantized latents: tiles of stored bytes
constexpr int kDequantBarrier = 4;                   // named barrier of the producer warpgroup

inline int align_up(int x, int a) { return (x + a - 1) / a * a; }

// The block-diagonal RoPE queries of one 8-row group: 8 rows x 16 rope_steps elements, in
// 128-byte swizzle atoms of 64 elements per row.
inline int rope_group_bytes(int rope_steps) { return align_up(16 * rope_steps, 64) / 64 * 1024; }

// The layout for `slots` ring slots (and, for a quantized latent, raw_slots slots of its stored
// bytes); offsets from a 1024-byte aligned base, total including the 1 KB the kernel may skip to
// align the dynamic shared memory.
inline SmemLayout make_warpspec_layout(const MlaDecodeParams& p, int rope_steps, int slots,
                                       int raw_slots) {
  SmemLayout s{};
  const int blocks = p.D_c / kChanBlock;
  s.rope_blocks = (p.H_kv * p.d_r + kChanBlock - 1) / kChanBlock;
  s.lat_block_bytes = kBlockBytes;
  s.st_rope = blocks * kBlockBytes;
  s.stage_bytes = (blocks + s.rope_blocks) * kBlockBytes;
  s.num_stages = slots;
  s.rope_steps_max = rope_steps;
  int off = 0;
  auto take = [&](int bytes, int align) {
    off = align_up(off, align);
    const int at = off;
    off += bytes;
    return at;
  };
  s.stages = take(slots * s.stage_bytes, 1024);
  s.q = take(blocks * kRows * 128, 1024);
  s.rope_q = take(kRows / 8 * rope_group_bytes(rope_steps), 1024);
  s.pt = take(kConsumers * 2 * kRows * 128, 1024);  // per consumer: P_hi^T, P_lo^T
  // per consumer and warp, per row: the tile maximum; after the loop the row sums, and the
  // second consumer's maxima
  s.stats = take((kConsumers * 4 + 1) * kRows * 4, 16);
  if (p.format != kFmtFloat) {
    const int groups_bytes = align_up(kTileTokens * p.num_groups * 2, 16);
    s.r_scale = align_up(kTileTokens * p.latent_row_bytes, 16);
    s.r_zero = s.r_scale + groups_bytes;
    s.raw_bytes = s.r_zero + (p.format == kFmtInt4 ? groups_bytes : 0);
    s.raw_slots = raw_slots;
    s.raw = take(raw_slots * s.raw_bytes, 128);
  }
  // full and empty barriers of the slots, then the raw slots' full barriers
  s.mbar = take((2 * kMaxSlots + kMaxRawSlots) * 8, 8);
  s.total = align_up(off, 16) + 1024;
  return s;
}

}  // namespace mla_ext::decode::warpspec
