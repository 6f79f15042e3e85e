// CUDA kernel of latent_project: the decode-time fusion of
//   c = x W_down^T,  k_r = rope(x W_kr^T + b_kr),  quantize,  write to the paged cache
// in one launch that reads each weight byte once from HBM.
//
// At decode N (the batch) is small, so this is a skinny GEMM bound by the weight read. Each CTA
// owns a slice of output channels for all N tokens (tokens in chunks of kTokens, so any N works):
// a latent CTA owns whole quantization groups, a RoPE CTA owns whole KV heads, so the group
// amax and the rotation (x1 with x2) never need another CTA. Warps split the slice's channels
// (kChannels per step, reusing each x load) and, when the slice is narrow, also the hidden dim
// (split-K inside the CTA, reduced through shared memory). On Hopper, a slice whose weights are
// too many bytes for one SM is further split along d over the CTAs of a thread-block cluster;
// the cluster's rank-0 CTA sums the others' partials through distributed shared memory and runs
// the epilogue, so a group's amax still never leaves one CTA. Weights and x are read with 16-byte
// loads where alignment allows; accumulation is fp32; c and k_r are rounded to x's dtype before
// the rotation and the quantization, as the unfused torch sequence (reference.py) does.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>

#include <cooperative_groups.h>

#include "args/latent_project.h"
#include "cuda/latent_cache_store.cuh"
#include "ops.h"

namespace mla_ext {
namespace {

using cache_store::CachePtrs;
using cache_store::dispatch_format;
using cache_store::FloatKind;
using cache_store::kWarpSize;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kChannels = 4;       // output channels one warp accumulates together
constexpr int kVecBytes = 16;      // one vector load
constexpr int kTokensBatched = 8;  // token chunk of the N > 1 kernel
constexpr int kCtasPerSm = 2;      // CTAs resident per SM (launch bounds), also the grid target
constexpr int kMinFloatSlice = 8;  // channels per CTA at least, for an unquantized latent
constexpr int kMaxClusterSplit = 8;      // portable thread-block cluster size
constexpr int kMinVectorsPerRank = 64;   // d-split no finer than two loads per lane of a warp
constexpr int kMaxDevices = 64;          // per-device cache of each kernel's binary version
constexpr int kMaxWaves = 2;             // a cluster split keeps the grid within 2 x target CTAs
static_assert((kWarps & (kWarps - 1)) == 0, "split-K halves the warps: a power of two");

struct LatentProjectParams {
  const void* x;            // [N, d], row stride x_stride (elements)
  int64_t x_stride;
  const void* w_down;       // [D_c, d]
  const void* w_kr;         // [H_kv * d_r, d]
  const void* b_kr;         // [H_kv * d_r] or null
  const void* cos;          // [N, H_kv, r]
  const void* sin;          // [N, H_kv, r]
  FloatKind angle_kind;
  const int64_t* slot_mapping;  // [N]
  int n_tokens, d;
  int latent_slice;         // latent channels per latent CTA (whole groups)
  int latent_ctas;          // CTAs [0, latent_ctas) own latent slices, the rest RoPE heads
  int heads_per_cta;
  bool vectorized;          // 16-byte loads of x and the weights are aligned
  int split;                // CTAs (one cluster) per slice, each summing 1/split of d
  CachePtrs cache;
};

// Warps that share one channel chunk along the hidden dim: as many as leave every warp a chunk.
__host__ __device__ constexpr int split_k_warps(int n_channels) {
  const int chunks = (n_channels + kChannels - 1) / kChannels;
  int k = 1;
  while (2 * k <= kWarps && chunks * 2 * k <= kWarps) k *= 2;
  return k;
}

// Shared floats of the split-K partials for a slice of n_channels.
__host__ __device__ constexpr int partial_floats(int n_channels, int tokens) {
  return split_k_warps(n_channels) * tokens * n_channels;
}

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

template <typename T, int kVec>
__device__ __forceinline__ void load_vec(const T* p, int64_t i, float (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = static_cast<float>(p[i]);
  } else {
    static_assert(kVec * sizeof(T) == kVecBytes, "one 16-byte load");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p + i));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = static_cast<float>(e[j]);
  }
}

// acc[c][t] += sum over this lane's share of k of w[c, k] * x[t, k]. The lane's share is the
// vectors v = first, first + step, ... of the row (kVec elements each).
template <typename T, int kVec, int kTokens>
__device__ __forceinline__ void dot_chunk(const T* __restrict__ w, int n_ch, int d,
                                          const T* __restrict__ x, int64_t x_stride, int n_tok,
                                          int split, int rank, int first, int step,
                                          float (&acc)[kChannels][kTokens]) {
  // This CTA's share of the row: vectors [v_begin, v_end) of kVec elements.
  const int n_vec = d / kVec;
  const int per_rank = (n_vec + split - 1) / split;
  const int v_begin = rank * per_rank, v_end = min(n_vec, v_begin + per_rank);
#pragma unroll 2
  for (int v = v_begin + first; v < v_end; v += step) {
    const int64_t k = static_cast<int64_t>(v) * kVec;
    float wv[kChannels][kVec];
#pragma unroll
    for (int c = 0; c < kChannels; ++c) {
      if (c < n_ch) {
        load_vec<T, kVec>(w + static_cast<int64_t>(c) * d, k, wv[c]);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) wv[c][j] = 0.f;
      }
    }
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      if (t < n_tok) {
        float xv[kVec];
        load_vec<T, kVec>(x + t * x_stride, k, xv);
#pragma unroll
        for (int c = 0; c < kChannels; ++c) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[c][t] = fmaf(wv[c][j], xv[j], acc[c][t]);
        }
      }
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, LatentFormat F, int kTokens>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
latent_project_kernel(const LatentProjectParams p) {
  extern __shared__ float smem[];
  const CachePtrs& cache = p.cache;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = tid % kWarpSize;
  const int unit = blockIdx.x / p.split;  // a cluster's CTAs are consecutive along x
  const int rank = blockIdx.x % p.split;
  const bool is_latent = unit < p.latent_ctas;

  // This CTA's slice: channels [ch0, ch0 + n_ch) of w_down (whole groups) or of w_kr (heads
  // [head0, head0 + n_heads)).
  int ch0, n_ch, head0 = 0, n_heads = 0;
  const T* w;
  if (is_latent) {
    ch0 = unit * p.latent_slice;
    n_ch = min(p.latent_slice, cache.d_c - ch0);
    w = static_cast<const T*>(p.w_down);
  } else {
    head0 = (unit - p.latent_ctas) * p.heads_per_cta;
    n_heads = min(p.heads_per_cta, cache.h_kv - head0);
    ch0 = head0 * cache.d_r;
    n_ch = n_heads * cache.d_r;
    w = static_cast<const T*>(p.w_kr);
  }
  w += static_cast<int64_t>(ch0) * p.d;

  const int k_warps = split_k_warps(n_ch);
  const int ch_warps = kWarps / k_warps;
  const int warp_ch = warp % ch_warps, warp_k = warp / ch_warps;
  const int n_chunks = (n_ch + kChannels - 1) / kChannels;
  float* partial = smem;                                      // [k_warps][kTokens][n_ch]
  float* stats = smem + partial_floats(n_ch, kTokens);        // quantization scratch

  const T* x_all = static_cast<const T*>(p.x);
  for (int n0 = 0; n0 < p.n_tokens; n0 += kTokens) {
    const int n_tok = min(kTokens, p.n_tokens - n0);
    const T* x = x_all + static_cast<int64_t>(n0) * p.x_stride;

    for (int chunk = warp_ch; chunk < n_chunks; chunk += ch_warps) {
      const int c_first = chunk * kChannels;
      const int c_valid = min(kChannels, n_ch - c_first);
      float acc[kChannels][kTokens];
#pragma unroll
      for (int c = 0; c < kChannels; ++c) {
#pragma unroll
        for (int t = 0; t < kTokens; ++t) acc[c][t] = 0.f;
      }
      const T* w_chunk = w + static_cast<int64_t>(c_first) * p.d;
      constexpr int kVec = kVecBytes / sizeof(T);
      if (p.vectorized) {
        dot_chunk<T, kVec, kTokens>(w_chunk, c_valid, p.d, x, p.x_stride, n_tok, p.split,
                                    rank, warp_k * kWarpSize + lane, k_warps * kWarpSize, acc);
      } else {
        dot_chunk<T, 1, kTokens>(w_chunk, c_valid, p.d, x, p.x_stride, n_tok, p.split, rank,
                                 warp_k * kWarpSize + lane, k_warps * kWarpSize, acc);
      }
#pragma unroll
      for (int c = 0; c < kChannels; ++c) {
#pragma unroll
        for (int t = 0; t < kTokens; ++t) {
          if (t < n_tok) {  // uniform over the warp, so every lane joins the shuffles
            const float sum = warp_sum(acc[c][t]);
            if (lane == 0 && c < c_valid) {
              partial[(warp_k * kTokens + t) * n_ch + c_first + c] = sum;
            }
          }
        }
      }
    }
    __syncthreads();

    // Sum the split-K partials into partial[0], add the bias, round to x's dtype (with a
    // cluster split, the rank-0 CTA does the last two once it has every rank's sums).
    const T* bias = static_cast<const T*>(p.b_kr);
    for (int i = tid; i < n_tok * n_ch; i += kThreads) {
      const int t = i / n_ch, c = i % n_ch;
      float v = 0.f;
      for (int kw = 0; kw < k_warps; ++kw) v += partial[(kw * kTokens + t) * n_ch + c];
      if (p.split == 1) {
        if (!is_latent && bias != nullptr) v += static_cast<float>(bias[ch0 + c]);
        v = round_to<T>(v);
      }
      partial[t * n_ch + c] = v;
    }
    __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (p.split > 1) {
      namespace cg = cooperative_groups;
      cg::cluster_group cluster = cg::this_cluster();
      cluster.sync();  // every rank's sums are in its shared memory
      if (rank == 0) {
        for (int i = tid; i < n_tok * n_ch; i += kThreads) {
          float v = 0.f;
          for (int r = 0; r < p.split; ++r) v += cluster.map_shared_rank(partial, r)[i];
          if (!is_latent && bias != nullptr) v += static_cast<float>(bias[ch0 + i % n_ch]);
          partial[i] = round_to<T>(v);
        }
      }
      cluster.sync();  // the leader has read them all: the other ranks may reuse theirs
      if (rank != 0) continue;
    }
#endif

    for (int t = 0; t < n_tok; ++t) {
      const int64_t token = n0 + t;
      const int64_t slot = p.slot_mapping[token];
      // Same slot for every thread, so the skip is uniform and the barriers below stay matched.
      if (slot < 0 || slot >= cache.capacity) continue;
      float* vals = partial + t * n_ch;
      if (is_latent) {
        cache_store::store_latent_slice<F>(cache, slot, vals, ch0, n_ch, stats);
      } else {
        // Rotate-half on [x1 | x2] per head with fp32 products rounded one by one (no FMA), as
        // reference.partial_rope computes them; then round to x's dtype.
        const int r = cache.d_r / 2;
        for (int i = tid; i < n_heads * r; i += kThreads) {
          const int h = i / r, j = i % r;
          const int64_t angle = (token * cache.h_kv + head0 + h) * r + j;
          const float co = cache_store::load_float(p.cos, p.angle_kind, angle);
          const float si = cache_store::load_float(p.sin, p.angle_kind, angle);
          float* head = vals + h * cache.d_r;
          const float x1 = head[j], x2 = head[j + r];
          head[j] = round_to<T>(__fsub_rn(__fmul_rn(x1, co), __fmul_rn(x2, si)));
          head[j + r] = round_to<T>(__fadd_rn(__fmul_rn(x2, co), __fmul_rn(x1, si)));
        }
        __syncthreads();
        cache_store::store_rope_heads(cache, slot, vals, head0, n_heads, stats);
      }
      __syncthreads();  // stats and vals are reused by the next token / chunk
    }
  }
}

template <typename T>
struct TypeTag {
  using type = T;
};

// x's dtype (checked to be one of these), without AT_DISPATCH's double instantiation.
template <typename Fn>
void dispatch_x_dtype(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(TypeTag<float>{}); break;
    case at::kHalf: fn(TypeTag<c10::Half>{}); break;
    case at::kBFloat16: fn(TypeTag<c10::BFloat16>{}); break;
    default: TORCH_CHECK(false, "latent_project: unsupported x dtype ", t);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0; }

}  // namespace

void latent_project_cuda(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_kr,
                         const std::optional<at::Tensor>& b_kr, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& slot_mapping,
                         at::Tensor& latent, const std::optional<at::Tensor>& latent_scale,
                         const std::optional<at::Tensor>& latent_zero, at::Tensor& k_rope_cache,
                         const std::optional<at::Tensor>& k_rope_scale) {
  constexpr const char* kOp = "latent_project";
  const LatentCacheShape s =
      check_latent_project_args(x, w_down, w_kr, b_kr, cos, sin, slot_mapping, latent,
                                latent_scale, latent_zero, k_rope_cache, k_rope_scale);
  const int64_t n = x.size(0), d = x.size(1);
  if (n == 0) return;
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max() && d <= std::numeric_limits<int32_t>::max(),
              kOp, ": x of shape ", sizes_str(x), " is beyond what the CUDA kernel indexes");
  const at::cuda::OptionalCUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();

  LatentProjectParams p{};
  p.x = x.data_ptr();
  p.x_stride = x.stride(0);
  p.w_down = w_down.data_ptr();
  p.w_kr = w_kr.data_ptr();
  p.b_kr = b_kr.has_value() ? b_kr->data_ptr() : nullptr;
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.angle_kind = cache_store::float_kind(cos.scalar_type());
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.n_tokens = static_cast<int>(n);
  p.d = static_cast<int>(d);
  p.cache = cache_store::make_cache_ptrs(s, latent, latent_scale, latent_zero, k_rope_cache,
                                         k_rope_scale);

  // Slice widths: as many CTAs of each kind as fill the SMs kCtasPerSm times, in whole units.
  const int64_t target_ctas = static_cast<int64_t>(kCtasPerSm) * props->multiProcessorCount;
  int64_t groups_per_cta = 0;
  if (s.format == LatentFormat::kFloat) {
    p.latent_slice = static_cast<int>(std::max<int64_t>(kMinFloatSlice, ceil_div(s.d_c, target_ctas)));
  } else {
    groups_per_cta = ceil_div(s.num_groups, target_ctas);
    // An int4 byte holds channels 2k and 2k + 1: with an odd group size, only an even number of
    // groups keeps a CTA's bytes its own.
    if (s.format == LatentFormat::kInt4 && s.group_size % 2 == 1 && groups_per_cta % 2 == 1) {
      ++groups_per_cta;
    }
    groups_per_cta = std::min(groups_per_cta, s.num_groups);
    p.latent_slice = static_cast<int>(groups_per_cta * s.group_size);
  }
  p.latent_slice = static_cast<int>(std::min<int64_t>(p.latent_slice, s.d_c));
  p.latent_ctas = static_cast<int>(ceil_div(s.d_c, p.latent_slice));
  p.heads_per_cta = static_cast<int>(ceil_div(s.h_kv, target_ctas));
  const int64_t rope_ctas = ceil_div(s.h_kv, p.heads_per_cta);
  const int64_t slices = p.latent_ctas + rope_ctas;

  const int64_t vec = kVecBytes / x.element_size();
  p.vectorized = d % vec == 0 && p.x_stride % vec == 0 && aligned16(p.x) && aligned16(p.w_down) &&
                 aligned16(p.w_kr);

  // MLA_EXT_LATENT_PROJECT_MAX_SPLIT caps the cluster split (1 turns clusters off, e.g. to test
  // both paths on one GPU).
  int max_split = kMaxClusterSplit;
  if (const char* env = std::getenv("MLA_EXT_LATENT_PROJECT_MAX_SPLIT")) {
    max_split = std::clamp(std::atoi(env), 1, kMaxClusterSplit);
  }
  const int64_t n_vec = p.vectorized ? d / vec : d;

  // Shared memory: the split-K partials of the widest slice (a narrower last slice may split
  // more ways, but never past kWarps * kChannels channels' worth) plus quantization scratch.
  const int rope_slice = p.heads_per_cta * static_cast<int>(s.d_r);
  const int64_t widest = std::max<int64_t>({p.latent_slice, rope_slice, kWarps * kChannels});
  const int64_t stat_floats = std::max<int64_t>(2 * std::max<int64_t>(groups_per_cta, 1),
                                                p.heads_per_cta);
  auto smem_bytes = [&](int tokens) {
    const int64_t partials = std::max<int64_t>({partial_floats(p.latent_slice, tokens),
                                                partial_floats(rope_slice, tokens),
                                                widest * tokens});
    return static_cast<size_t>(partials + stat_floats) * sizeof(float);
  };
  const size_t smem_max = props->sharedMemPerBlockOptin;
  const bool batched = n > 1 && smem_bytes(kTokensBatched) <= smem_max;
  const size_t smem = smem_bytes(batched ? kTokensBatched : 1);
  TORCH_CHECK(smem <= smem_max, kOp, ": a CTA's slice (", p.latent_slice, " latent channels or ",
              rope_slice, " RoPE channels) needs ", smem, " bytes of shared memory, more than the "
              "device's ", smem_max, "; use a smaller quantization group");

  dispatch_x_dtype(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_format(s.format, [&](auto fmt) {
      constexpr LatentFormat F = decltype(fmt)::value;
      auto launch = [&](auto kernel) {
        // Too few slices to keep the SMs streaming weights: split d over a cluster, where the
        // loaded binary has cluster code (sm_90 and later; an sm_80 build running on Hopper
        // does not).
        static std::array<std::atomic<int>, kMaxDevices> binary_version{};  // 0: not read yet
        const int device = x.get_device();
        TORCH_CHECK(device < kMaxDevices, kOp, ": device index ", device, " is too large");
        if (binary_version[device].load() == 0) {
          cudaFuncAttributes attrs{};
          C10_CUDA_CHECK(cudaFuncGetAttributes(&attrs, kernel));
          binary_version[device].store(attrs.binaryVersion);
        }
        // The latent CTAs carry the most weight bytes each (a whole group of g rows), so split
        // until they fill the SMs once, without letting the whole grid exceed kMaxWaves waves.
        p.split = 1;
        while (binary_version[device].load() >= 90 && 2 * p.split <= max_split &&
               p.latent_ctas * 2 * p.split <= props->multiProcessorCount &&
               slices * 2 * p.split <= kMaxWaves * target_ctas &&
               n_vec / (2 * p.split) >= kMinVectorsPerRank) {
          p.split *= 2;
        }
        const int64_t grid = slices * p.split;
        if (smem > 48 * 1024) {
          C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
        }
        if (p.split == 1) {
          kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
        cudaLaunchConfig_t config = {};
        config.gridDim = dim3(static_cast<unsigned>(grid));
        config.blockDim = dim3(kThreads);
        config.dynamicSmemBytes = smem;
        config.stream = stream;
        cudaLaunchAttribute cluster_dims[1];
        cluster_dims[0].id = cudaLaunchAttributeClusterDimension;
        cluster_dims[0].val.clusterDim.x = p.split;
        cluster_dims[0].val.clusterDim.y = 1;
        cluster_dims[0].val.clusterDim.z = 1;
        config.attrs = cluster_dims;
        config.numAttrs = 1;
        C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
      };
      if (batched) {
        launch(latent_project_kernel<T, F, kTokensBatched>);
      } else {
        launch(latent_project_kernel<T, F, 1>);
      }
    });
  });
}

}  // namespace mla_ext
