// The split-KV schedule of mla_decode, as data: which CTA takes which tiles of which sequence.
// Computed once per decode step (by mla_decode_plan, or inside mla_decode when no plan is given)
// and reusable by every layer of that step. Plain C++ with host/device functions, so the CPU
// build makes the same plan.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "cuda/mla_decode/config.h"

namespace mla_ext::decode {

// Layout of the int32 plan tensor, [kPlanHeader + 4 * capacity + 2 * B] with
// capacity = kPlanSlots + B (a size known from the shapes alone, so the fake op knows it too):
//   header  {capacity, tile_tokens, num_parts_used, B}
//   work    [capacity][4] {batch (-1 = idle), first tile, end tile, split index}
//   batch   [B][2] {first part, number of splits}
// The decode grid covers only target_parts + B parts (target_parts <= kPlanSlots).
constexpr int kPlanHeader = 4;
constexpr int kPlanSlots = 2048;  // mla_ext/ops.py repeats it for the fake of mla_decode_plan

C10_HOST_DEVICE inline int64_t plan_capacity(int64_t batch) { return kPlanSlots + batch; }

inline int64_t plan_numel(int64_t batch) {
  return kPlanHeader + 4 * plan_capacity(batch) + 2 * batch;
}

// Every split of a sequence takes tiles_per_split tiles (the last one fewer); sequences of zero
// tokens get one empty split so that their output (o = 0, lse = -inf) is still written.
// sum_b ceil(tiles_b / chunk) <= total / chunk + B <= target_parts + B <= capacity.
// Rounding each sequence's split count up can overshoot target_parts by up to B parts (a second,
// mostly idle wave), so the chunk grows until the parts fit in one wave or cannot shrink further.
C10_HOST_DEVICE inline void make_plan(const int32_t* seq_lens, int batch, int tile_tokens,
                                      int target_parts, int capacity, int32_t* plan) {
  int64_t total_tiles = 0, max_tiles = 0;
  for (int b = 0; b < batch; ++b) {
    const int64_t tiles = seq_lens[b] > 0 ? (seq_lens[b] + tile_tokens - 1) / tile_tokens : 0;
    total_tiles += tiles;
    max_tiles = tiles > max_tiles ? tiles : max_tiles;
  }
  int64_t chunk = (total_tiles + target_parts - 1) / target_parts;
  if (chunk < kMinTilesPerSplit) chunk = kMinTilesPerSplit;
  for (int iter = 0; iter < 64 && chunk < max_tiles; ++iter) {
    int64_t parts = 0;
    for (int b = 0; b < batch; ++b) {
      const int64_t tiles = seq_lens[b] > 0 ? (seq_lens[b] + tile_tokens - 1) / tile_tokens : 0;
      parts += tiles > chunk ? (tiles + chunk - 1) / chunk : 1;
    }
    if (parts <= target_parts) break;
    chunk += chunk / 8 > 1 ? chunk / 8 : 1;
  }
  int32_t* work = plan + kPlanHeader;
  int32_t* info = work + 4 * capacity;
  int part = 0;
  for (int b = 0; b < batch; ++b) {
    const int64_t len = seq_lens[b] > 0 ? seq_lens[b] : 0;
    const int64_t tiles = (len + tile_tokens - 1) / tile_tokens;
    int64_t splits = (tiles + chunk - 1) / chunk;
    if (splits < 1) splits = 1;
    const int64_t per_split = (tiles + splits - 1) / splits;
    // Recount: an even share can leave the last split empty; drop such splits.
    splits = per_split > 0 ? (tiles + per_split - 1) / per_split : 1;
    info[2 * b] = part;
    info[2 * b + 1] = static_cast<int32_t>(splits);
    for (int64_t s = 0; s < splits && part < capacity; ++s, ++part) {
      const int64_t first = s * per_split;
      const int64_t last = first + per_split < tiles ? first + per_split : tiles;
      work[4 * part] = b;
      work[4 * part + 1] = static_cast<int32_t>(first);
      work[4 * part + 2] = static_cast<int32_t>(last);
      work[4 * part + 3] = static_cast<int32_t>(s);
    }
  }
  const int used = part;
  for (; part < capacity; ++part) {
    work[4 * part] = -1;
    work[4 * part + 1] = work[4 * part + 2] = work[4 * part + 3] = 0;
  }
  plan[0] = capacity;
  plan[1] = tile_tokens;
  plan[2] = used;
  plan[3] = batch;
}

}  // namespace mla_ext::decode
