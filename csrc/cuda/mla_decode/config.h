// Tile configuration of the CUDA mla_decode kernel, one bucket per latent width. Plain C++ (no
// CUDA), so that host code (api.cpp, the layout checks) can include it.
#pragma once

#include <cstdint>

namespace mla_ext::decode {

// A CTA streams the cache in tiles of one or two pieces. A piece is 16 tokens inside one cache
// block (block_size is a multiple of it): its rows are contiguous in memory and one block-table
// entry addresses it. It is also the M = 16 of the score MMA.
constexpr int kPieceTokens = 16;

// Latent-width buckets. A bucket holds D_c up to max_latent; its CTAs have `warps` warps. In the
// output product warp w owns the 16-channel tiles w, w + warps, ... (chan_tiles of them), so
// warps * chan_tiles * 16 == max_latent; the accumulators cost chan_tiles * row_tiles * 4
// registers per thread. row_tiles * 8 (query token, head) rows share one CTA on the MMA's N = 8
// dimension. A tile of `pieces` pieces has pieces * row_tiles score blocks (16 tokens x 8 rows);
// each block belongs to warps / (pieces * row_tiles) warps that split its latent channels (1: no
// partial scores to add). q_in_regs: each warp keeps its queries' MMA fragments in registers (no
// shared-memory copy of q); the widest buckets have no registers left for that. min_ctas: CTAs
// per SM the launch bound asks registers for. score_chains: independent accumulators a warp's
// score MMAs rotate through (4 registers each), so that consecutive MMAs do not wait for each
// other. More warps per CTA hide more latency (a scheduler switches between warps while one
// waits) but leave fewer registers to each.
struct BucketShape {
  int max_latent, warps, chan_tiles, row_tiles, pieces, min_ctas;
  bool q_in_regs;
  int score_chains;
};
constexpr int kNumBuckets = 5;
constexpr BucketShape kBuckets[kNumBuckets] = {
    {128, 8, 1, 4, 2, 2, true, 4},
    {256, 8, 2, 4, 2, 2, false, 4},
    {512, 16, 2, 4, 2, 1, true, 2},
    {1024, 8, 8, 4, 2, 1, false, 4},
    {2048, 8, 16, 2, 1, 1, false, 4},
};

constexpr int bucket_threads(int bucket) { return kBuckets[bucket].warps * 32; }
constexpr int bucket_tile_tokens(int bucket) { return kBuckets[bucket].pieces * kPieceTokens; }
constexpr int bucket_k_split(int bucket) {
  return kBuckets[bucket].warps / (kBuckets[bucket].pieces * kBuckets[bucket].row_tiles);
}

// Pipeline depth: tiles of the cache in shared memory at once (one being computed, the rest in
// flight), chosen per launch from the shared memory left.
constexpr int kMinStages = 2;
constexpr int kMaxStages = 8;

// RoPE keys: any even d_r up to 8 * kMaxRopeSteps; shared memory pads each KV head's key to a
// multiple of 8 (the k = 8 MMA steps) with zeros.
constexpr int kMaxRopeSteps = 8;

constexpr int bucket_of(int64_t latent_dim) {
  for (int i = 0; i < kNumBuckets; ++i) {
    if (latent_dim <= kBuckets[i].max_latent) return i;
  }
  return -1;
}

constexpr bool buckets_consistent() {
  for (int i = 0; i < kNumBuckets; ++i) {
    const BucketShape& s = kBuckets[i];
    const int blocks = s.pieces * s.row_tiles;
    if (s.warps * s.chan_tiles * 16 != s.max_latent || s.warps % blocks != 0) return false;
  }
  return true;
}
static_assert(buckets_consistent());

}  // namespace mla_ext::decode
