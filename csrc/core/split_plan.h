// The split-KV schedule of mla_decode, as data: which CTA takes which tiles of which sequence.
// Computed once per decode step (by mla_decode_plan, or inside mla_decode when no plan is given)
// and reusable by every layer of that step. Plain C++ with host/device functions, shared by the
// CPU and CUDA builds (the CPU build makes the same plan).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace mla_ext::decode {

// The fewest tiles a split takes, so that the query load and the merge stay small next to it.
constexpr int kMinTilesPerSplit = 2;
// The tile size of the CPU plan (the CUDA plan uses its bucket's: cuda/mla_decode/config.h).
constexpr int kCpuPlanTileTokens = 32;

// Layout of the int32 plan tensor, [kPlanHeader + 4 * capacity + 2 * B] with
// capacity = kPlanSlots + B (a size known from the shapes alone, so the fake op knows it too):
//   header  {capacity, tile_tokens, num_parts_used, B}
//   work    [capacity][4] {batch (-1 = idle), first tile, end tile, that sequence's length}
//   batch   [B][2] {first part, number of splits}
// A work entry holds all a decode CTA needs to start: read in one round trip to memory, not a
// second dependent one for seq_lens[batch]. Whether the sequence is split follows from it: a
// split covers tiles [0, tiles_of(length)) exactly when the sequence has one split.
// The decode grid covers only target_parts + B parts (target_parts <= kPlanSlots).
constexpr int kPlanHeader = 4;
constexpr int kPlanSlots = 2048;

C10_HOST_DEVICE inline int64_t plan_capacity(int64_t batch) { return kPlanSlots + batch; }

// Exported to Python (mla_ext._C.mla_decode_plan_numel) for the fake of mla_decode_plan.
inline int64_t plan_numel(int64_t batch) {
  return kPlanHeader + 4 * plan_capacity(batch) + 2 * batch;
}

// Every split of a sequence takes tiles_per_split tiles (the last one fewer); sequences of zero
// tokens get one empty split so that their output (o = 0, lse = -inf) is still written.
// sum_b ceil(tiles_b / chunk) <= total / chunk + B <= target_parts + B <= capacity.
// Rounding each sequence's split count up can overshoot target_parts by up to B parts (a second,
// mostly idle wave), so the chunk grows until the parts fit in one wave or cannot shrink further.
// The pieces below are shared by the serial host plan (make_plan) and the device plan, which
// runs them over the threads of one CTA (split_plan.cu).

C10_HOST_DEVICE inline int64_t tiles_of(int32_t len, int tile_tokens) {
  return len > 0 ? (len + tile_tokens - 1) / tile_tokens : 0;
}

C10_HOST_DEVICE inline int64_t parts_of(int64_t tiles, int64_t chunk) {
  return tiles > chunk ? (tiles + chunk - 1) / chunk : 1;
}

C10_HOST_DEVICE inline int64_t first_chunk(int64_t total_tiles, int target_parts) {
  const int64_t chunk = (total_tiles + target_parts - 1) / target_parts;
  return chunk < kMinTilesPerSplit ? kMinTilesPerSplit : chunk;
}

C10_HOST_DEVICE inline int64_t grow_chunk(int64_t chunk) { return chunk + (chunk / 8 > 1 ? chunk / 8 : 1); }

// Splits of a sequence of `tiles` tiles and the tiles of each: an even share, recounted because
// an even share can leave the last split empty.
C10_HOST_DEVICE inline void split_shape(int64_t tiles, int64_t chunk, int64_t* splits,
                                        int64_t* per_split) {
  int64_t n = (tiles + chunk - 1) / chunk;
  if (n < 1) n = 1;
  const int64_t per = (tiles + n - 1) / n;
  *per_split = per;
  *splits = per > 0 ? (tiles + per - 1) / per : 1;
}

C10_HOST_DEVICE inline void write_split(int32_t* work, int b, int part, int64_t s,
                                        int64_t per_split, int64_t tiles, int32_t len) {
  const int64_t first = s * per_split;
  const int64_t last = first + per_split < tiles ? first + per_split : tiles;
  work[4 * part] = b;
  work[4 * part + 1] = static_cast<int32_t>(first);
  work[4 * part + 2] = static_cast<int32_t>(last);
  work[4 * part + 3] = len;
}

C10_HOST_DEVICE inline void write_idle(int32_t* work, int part) {
  work[4 * part] = -1;
  work[4 * part + 1] = work[4 * part + 2] = work[4 * part + 3] = 0;
}

C10_HOST_DEVICE inline void write_header(int32_t* plan, int capacity, int tile_tokens, int used,
                                         int batch) {
  plan[0] = capacity;
  plan[1] = tile_tokens;
  plan[2] = used;
  plan[3] = batch;
}

inline void make_plan(const int32_t* seq_lens, int batch, int tile_tokens, int target_parts,
                      int capacity, int32_t* plan) {
  int64_t total_tiles = 0, max_tiles = 0;
  for (int b = 0; b < batch; ++b) {
    const int64_t tiles = tiles_of(seq_lens[b], tile_tokens);
    total_tiles += tiles;
    max_tiles = tiles > max_tiles ? tiles : max_tiles;
  }
  int64_t chunk = first_chunk(total_tiles, target_parts);
  for (int iter = 0; iter < 64 && chunk < max_tiles; ++iter) {
    int64_t parts = 0;
    for (int b = 0; b < batch; ++b) parts += parts_of(tiles_of(seq_lens[b], tile_tokens), chunk);
    if (parts <= target_parts) break;
    chunk = grow_chunk(chunk);
  }
  int32_t* work = plan + kPlanHeader;
  int32_t* info = work + 4 * capacity;
  int part = 0;
  for (int b = 0; b < batch; ++b) {
    const int64_t tiles = tiles_of(seq_lens[b], tile_tokens);
    int64_t splits, per_split;
    split_shape(tiles, chunk, &splits, &per_split);
    info[2 * b] = part;
    info[2 * b + 1] = static_cast<int32_t>(splits);
    for (int64_t s = 0; s < splits && part < capacity; ++s, ++part) {
      write_split(work, b, part, s, per_split, tiles, seq_lens[b]);
    }
  }
  const int used = part;
  for (; part < capacity; ++part) write_idle(work, part);
  write_header(plan, capacity, tile_tokens, used, batch);
}

}  // namespace mla_ext::decode
