// Device side of the split plan (split_plan.h): one thread builds it, so the whole decode step
// stays on the stream (no host sync, capturable in a CUDA graph).
#include <c10/cuda/CUDAException.h>

#include "cuda/mla_decode/launch.h"
#include "cuda/mla_decode/split_plan.h"

namespace mla_ext::decode {

__global__ void mla_decode_plan_kernel(const int32_t* seq_lens, int batch, int tile_tokens,
                                       int target_parts, int capacity, int32_t* plan) {
  make_plan(seq_lens, batch, tile_tokens, target_parts, capacity, plan);
}

void launch_plan(const int32_t* seq_lens, int batch, int tile_tokens, int target_parts,
                 int capacity, int32_t* plan, cudaStream_t stream) {
  mla_decode_plan_kernel<<<1, 1, 0, stream>>>(seq_lens, batch, tile_tokens, target_parts,
                                              capacity, plan);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mla_ext::decode
