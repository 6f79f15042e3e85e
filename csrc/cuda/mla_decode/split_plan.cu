// Device side of the split plan (split_plan.h), one CTA: the sums over the batch are block
// reductions, each sequence's splits are written by its own thread, so that planning a step costs
// a few microseconds at any batch, and the whole step stays on the stream (no host sync,
// capturable in a CUDA graph).
#include <c10/cuda/CUDAException.h>

#include "core/split_plan.h"
#include "cuda/mla_decode/launch.h"

namespace mla_ext::decode {
namespace {

constexpr int kPlanThreads = 256;

__global__ void __launch_bounds__(kPlanThreads)
    mla_decode_plan_kernel(const int32_t* seq_lens, int batch, int tile_tokens, int target_parts,
                           int capacity, int32_t* plan) {
  __shared__ unsigned long long total_s, parts_s;
  __shared__ long long max_s;
  __shared__ int used_s;
  const int tid = threadIdx.x;
  if (tid == 0) {
    total_s = 0;
    max_s = 0;
  }
  __syncthreads();
  {
    int64_t total = 0, mx = 0;
    for (int b = tid; b < batch; b += kPlanThreads) {
      const int64_t tiles = tiles_of(seq_lens[b], tile_tokens);
      total += tiles;
      mx = tiles > mx ? tiles : mx;
    }
    atomicAdd(&total_s, static_cast<unsigned long long>(total));
    atomicMax(&max_s, static_cast<long long>(mx));
  }
  __syncthreads();
  int64_t chunk = first_chunk(static_cast<int64_t>(total_s), target_parts);
  const int64_t max_tiles = max_s;
  for (int iter = 0; iter < 64 && chunk < max_tiles; ++iter) {
    __syncthreads();  // everyone has read parts_s of the previous round
    if (tid == 0) parts_s = 0;
    __syncthreads();
    int64_t parts = 0;
    for (int b = tid; b < batch; b += kPlanThreads) parts += parts_of(tiles_of(seq_lens[b], tile_tokens), chunk);
    atomicAdd(&parts_s, static_cast<unsigned long long>(parts));
    __syncthreads();
    if (static_cast<int64_t>(parts_s) <= target_parts) break;
    chunk = grow_chunk(chunk);
  }
  int32_t* work = plan + kPlanHeader;
  int32_t* info = work + 4 * capacity;
  // First part of each sequence: a prefix sum over the batch (serial: B is small next to the
  // decode it plans).
  if (tid == 0) {
    int part = 0;
    for (int b = 0; b < batch; ++b) {
      int64_t splits, per_split;
      split_shape(tiles_of(seq_lens[b], tile_tokens), chunk, &splits, &per_split);
      info[2 * b] = part;
      info[2 * b + 1] = static_cast<int32_t>(splits);
      part = part + splits < capacity ? static_cast<int>(part + splits) : capacity;
    }
    used_s = part;
    write_header(plan, capacity, tile_tokens, part, batch);
  }
  __syncthreads();
  for (int b = tid; b < batch; b += kPlanThreads) {
    const int32_t len = seq_lens[b];
    const int64_t tiles = tiles_of(len, tile_tokens);
    int64_t splits, per_split;
    split_shape(tiles, chunk, &splits, &per_split);
    const int first = info[2 * b];
    for (int64_t s = 0; s < splits && first + s < capacity; ++s) {
      write_split(work, b, static_cast<int>(first + s), s, per_split, tiles, len);
    }
  }
  for (int part = used_s + tid; part < capacity; part += kPlanThreads) write_idle(work, part);
}

}  // namespace

void launch_plan(const int32_t* seq_lens, int batch, int tile_tokens, int target_parts,
                 int capacity, int32_t* plan, cudaStream_t stream) {
  mla_decode_plan_kernel<<<1, kPlanThreads, 0, stream>>>(seq_lens, batch, tile_tokens,
                                                         target_parts, capacity, plan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mla_ext::decode
