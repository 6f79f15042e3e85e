// Tile configuration of the mla_decode kernel, one bucket per latent width. Plain C++ (no CUDA):
// the CPU build includes it for mla_decode_plan.
#pragma once

#include <cstdint>

namespace mla_ext::decode {

// Every CTA has kWarps warps and streams the cache in tiles of kTileTokens tokens. A tile never
// crosses a cache block (block_size is a multiple of it), so its rows are contiguous in memory
// and one block-table entry addresses the whole tile.
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileTokens = 16;
constexpr int kPieceTokens = kTileTokens;  // block_size must be a multiple of this

// Latent-width buckets. A bucket holds D_c up to kMaxLatentDim[i]; in the output product warp w
// owns the 16-channel tiles w, w + kWarps, ... (kBucketChanTiles of them), so
// kWarps * kBucketChanTiles * 16 == kMaxLatentDim. kBucketRowTiles * 8 (query token, head) rows
// share one CTA: they sit on the MMA's N = 8 dimension. The output accumulators cost
// kBucketChanTiles * kBucketRowTiles * 4 registers per thread.
constexpr int kNumBuckets = 5;
constexpr int kMaxLatentDim[kNumBuckets] = {128, 256, 512, 1024, 2048};
constexpr int kBucketChanTiles[kNumBuckets] = {1, 2, 4, 8, 16};
constexpr int kBucketRowTiles[kNumBuckets] = {4, 4, 4, 4, 2};
// Buckets whose registers leave room for two CTAs per SM (the launch bound asks for it).
constexpr int kBucketMinCtas[kNumBuckets] = {2, 2, 1, 1, 1};

// Pipeline depth: tiles of the cache in shared memory at once (one being computed, the rest in
// flight), chosen per launch from the shared memory left.
constexpr int kMinStages = 2;
constexpr int kMaxStages = 8;

// The fewest tiles a split takes, so that the query load and the merge stay small next to it.
constexpr int kMinTilesPerSplit = 4;

// RoPE keys: d_r a multiple of 8 (the k = 8 MMA steps), at most this many steps.
constexpr int kMaxRopeSteps = 8;

constexpr int bucket_of(int64_t latent_dim) {
  for (int i = 0; i < kNumBuckets; ++i) {
    if (latent_dim <= kMaxLatentDim[i]) return i;
  }
  return -1;
}

static_assert(kWarps * kBucketChanTiles[0] * 16 == kMaxLatentDim[0]);
static_assert(kWarps * kBucketChanTiles[1] * 16 == kMaxLatentDim[1]);
static_assert(kWarps * kBucketChanTiles[2] * 16 == kMaxLatentDim[2]);
static_assert(kWarps * kBucketChanTiles[3] * 16 == kMaxLatentDim[3]);
static_assert(kWarps * kBucketChanTiles[4] * 16 == kMaxLatentDim[4]);

}  // namespace mla_ext::decode
