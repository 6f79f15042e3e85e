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

#include <vector>

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

// k16 steps of the widest RoPE window an 8-row group needs: the keys of the KV heads its rows
// use (rows are (query token, head) pairs, 8 consecutive heads of one token when 8 divides H).
inline int rope_steps_of(int H, int H_kv, int d_r) {
  const int group = H / H_kv;
  int widest = 0;
  for (int h0 = 0; h0 < H; h0 += 8) {
    const int span = ((h0 + 7) / group - h0 / group + 1) * d_r;
    widest = span > widest ? span : widest;
  }
  int steps = 1;
  while (steps * 16 < widest) steps *= 2;
  return steps;
}

// The block-diagonal RoPE queries of one 8-row group: 8 rows x 16 rope_steps elements, in
// 128-byte swizzle atoms of 64 elements per row.
inline int rope_group_bytes(int rope_steps) { return align_up(16 * rope_steps, 64) / 64 * 1024; }

// A region of a layout: [begin, end) bytes from the aligned base, begin a multiple of align;
// read_past: bytes past end its readers may read (the allocation must hold them).
struct SmemRegion {
  const char* name;
  int begin, end, align, read_past;
};

// The layout for `slots` ring slots (and, for a quantized latent, raw_slots slots of its stored
// bytes); offsets from a 1024-byte aligned base, total including the 1 KB the kernel may skip to
// align the dynamic shared memory. `regions`, if given, receives each region as it is placed.
inline SmemLayout make_warpspec_layout(const MlaDecodeParams& p, int rope_steps, int slots,
                                       int raw_slots, std::vector<SmemRegion>* regions = nullptr) {
  SmemLayout s{};
  const int blocks = p.D_c / kChanBlock;
  s.rope_blocks = (p.H_kv * p.d_r + kChanBlock - 1) / kChanBlock;
  s.lat_block_bytes = kBlockBytes;
  s.st_rope = blocks * kBlockBytes;
  s.stage_bytes = (blocks + s.rope_blocks) * kBlockBytes;
  s.num_stages = slots;
  s.rope_steps_max = rope_steps;
  int off = 0;
  auto take = [&](const char* name, int bytes, int align) {
    off = align_up(off, align);
    const int at = off;
    off += bytes;
    if (regions) regions->push_back({name, at, off, align, 0});
    return at;
  };
  s.stages = take("ring", slots * s.stage_bytes, 1024);
  s.q = take("q", blocks * kRows * 128, 1024);
  s.rope_q = take("rope_q", kRows / 8 * rope_group_bytes(rope_steps), 1024);
  s.pt = take("pt", kConsumers * 2 * kRows * 128, 1024);  // per consumer: P_hi^T, P_lo^T
  // per consumer and warp, per row: the tile maximum; after the loop the row sums, and the
  // second consumer's maxima
  s.stats = take("stats", (kConsumers * 4 + 1) * kRows * 4, 16);
  if (p.format != kFmtFloat) {
    const int groups_bytes = align_up(kTileTokens * p.num_groups * 2, 16);
    s.r_scale = align_up(kTileTokens * p.latent_row_bytes, 16);
    s.r_zero = s.r_scale + groups_bytes;
    s.raw_bytes = s.r_zero + (p.format == kFmtInt4 ? groups_bytes : 0);
    s.raw_slots = raw_slots;
    s.raw = take("raw", raw_slots * s.raw_bytes, 128);
  }
  // full and empty barriers of the slots, then the raw slots' full barriers
  s.mbar = take("mbar", (2 * kMaxSlots + kMaxRawSlots) * 8, 8);
  s.total = align_up(off, 16) + 1024;
  return s;
}

// The layout configure_warpspec takes, or false if none fits in smem_limit bytes. A float latent:
// as many slots as fit. A quantized one: three 16-bit slots (two computed, one being dequantized
// into) and as many slots of stored bytes in flight as fit, at least two.
inline bool choose_warpspec_layout(const MlaDecodeParams& p, int rope_steps, int smem_limit,
                                   SmemLayout* out) {
  const bool quant = p.format != kFmtFloat;
  for (int slots = quant ? kMinSlots : kMaxSlots; slots >= kMinSlots; --slots) {
    for (int raw = quant ? kMaxRawSlots : 0; raw >= (quant ? 2 : 0); --raw) {
      const SmemLayout layout = make_warpspec_layout(p, rope_steps, slots, raw);
      if (layout.total <= smem_limit) {
        *out = layout;
        return true;
      }
    }
  }
  return false;
}

// The regions layout s places, as make_warpspec_layout placed them
// (python_tests/test_warpspec_layout.py checks that they are aligned and, with what their
// readers read past their ends, inside the allocation for every shape the kernel takes).
inline std::vector<SmemRegion> warpspec_regions(const MlaDecodeParams& p, const SmemLayout& s) {
  std::vector<SmemRegion> regions;
  make_warpspec_layout(p, s.rope_steps_max, s.num_stages, s.raw_slots, &regions);
  return regions;
}

}  // namespace mla_ext::decode::warpspec
