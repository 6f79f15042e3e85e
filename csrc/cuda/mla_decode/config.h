// Tile configuration of the mla_decode kernel, one bucket per latent width. Plain C++ (no CUDA):
// the CPU build includes it for mla_decode_plan.
#pragma once

#include <cstdint>

namespace mla_ext::decode {

// Latent-width buckets. A bucket holds D_c up to kMaxLatentDim[i]; a warp owns
// kChanTilesPerWarp * 16 latent channels for the output product, so
// kWarps * kChanTilesPerWarp * 16 == kMaxLatentDim. kRowTiles * 8 (query token, head) rows share
// one CTA: the heads sit on the MMA's N = 8 dimension. Output accumulators cost
// kChanTilesPerWarp * kRowTiles * 4 registers per thread; 64 is the budget at 512 threads.
// Tokens per tile shrink as D_c grows so that two tiles plus the queries fit in shared memory.
constexpr int kNumBuckets = 5;
constexpr int kMaxLatentDim[kNumBuckets] = {128, 256, 512, 1024, 2048};
constexpr int kBucketWarps[kNumBuckets] = {4, 8, 8, 16, 16};
constexpr int kBucketChanTiles[kNumBuckets] = {2, 2, 4, 4, 8};
constexpr int kBucketRowTiles[kNumBuckets] = {4, 4, 4, 4, 2};
constexpr int kBucketTileTokens[kNumBuckets] = {64, 32, 32, 16, 16};

// Tokens per cp.async piece: a piece never crosses a cache block (block_size is a multiple).
constexpr int kPieceTokens = 16;
// The fewest tiles a split takes, so that the query load and the merge stay small next to it.
constexpr int kMinTilesPerSplit = 4;

constexpr int bucket_of(int64_t latent_dim) {
  for (int i = 0; i < kNumBuckets; ++i) {
    if (latent_dim <= kMaxLatentDim[i]) return i;
  }
  return -1;
}

static_assert(kBucketWarps[0] * kBucketChanTiles[0] * 16 == kMaxLatentDim[0]);
static_assert(kBucketWarps[1] * kBucketChanTiles[1] * 16 == kMaxLatentDim[1]);
static_assert(kBucketWarps[2] * kBucketChanTiles[2] * 16 == kMaxLatentDim[2]);
static_assert(kBucketWarps[3] * kBucketChanTiles[3] * 16 == kMaxLatentDim[3]);
static_assert(kBucketWarps[4] * kBucketChanTiles[4] * 16 == kMaxLatentDim[4]);

}  // namespace mla_ext::decode
