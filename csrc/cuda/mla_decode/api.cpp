// Host entry of mla_decode on CUDA: checks, the kernel configuration (bucket, rows per CTA, shared
// memory, split count), the split plan, then decode + combine on the current stream. Nothing here
// reads device memory, so a call can be captured in a CUDA graph.
// A .cpp, compiled by the host compiler: on the H200 image, a failing TORCH_CHECK whose message
// formats integers segfaulted when the check sat in an nvcc-compiled translation unit (inside
// std::ostream number formatting); .cu files therefore hold no TORCH_CHECK.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "args/mla_decode.h"
#include "core/split_plan.h"
#include "cuda/mla_decode/launch.h"
#include "cuda/mla_decode/warpspec/layout.h"
#include "cuda/mla_decode/warpspec/tensor_map.h"
#include "ops.h"

namespace mla_ext {
namespace {

using decode::MlaDecodeParams;

#define MLA_DECODE_BUCKET_SWITCH(BUCKET, ...)                    \
  switch (BUCKET) {                                              \
    case 0: { constexpr int kBucket = 0; __VA_ARGS__(); break; } \
    case 1: { constexpr int kBucket = 1; __VA_ARGS__(); break; } \
    case 2: { constexpr int kBucket = 2; __VA_ARGS__(); break; } \
    case 3: { constexpr int kBucket = 3; __VA_ARGS__(); break; } \
    default: { constexpr int kBucket = 4; __VA_ARGS__(); break; } \
  }

#define MLA_DECODE_CACHE_SWITCH(QUANT, ...) \
  if (QUANT) {                              \
    constexpr bool kQuant = true;           \
    __VA_ARGS__();                          \
  } else {                                  \
    constexpr bool kQuant = false;          \
    __VA_ARGS__();                          \
  }

#define MLA_DECODE_DTYPE_SWITCH(DTYPE, ...)                                    \
  if ((DTYPE) == at::kBFloat16) {                                              \
    using T = __nv_bfloat16;                                                   \
    __VA_ARGS__();                                                             \
  } else {                                                                     \
    using T = __half;                                                          \
    __VA_ARGS__();                                                             \
  }

int rope_path_of(at::ScalarType rope, at::ScalarType q) {
  if (rope == at::kFloat8_e4m3fn) return decode::kRopeFp8Keys;
  return rope == q ? decode::kRopeLdmatrix : decode::kRopeConvert;
}

int format_of(LatentFormat f) {
  switch (f) {
    case LatentFormat::kInt8: return decode::kFmtInt8;
    case LatentFormat::kFp8: return decode::kFmtFp8;
    case LatentFormat::kInt4: return decode::kFmtInt4;
    default: return decode::kFmtFloat;
  }
}

struct Config {
  int bucket, tile_tokens, target_parts;
  int warpspec_blocks;  // > 0: the warp-specialized kernel for D_c = 64 * warpspec_blocks,
  int rope_steps;       // with RoPE windows of rope_steps k16 steps
};

#define MLA_DECODE_WARPSPEC_SWITCH(BLOCKS, STEPS, ...)                              \
  switch (BLOCKS * 16 + STEPS) {                                                    \
    case 17: { constexpr int kBlocks = 1, kSteps = 1; __VA_ARGS__(); break; }       \
    case 18: { constexpr int kBlocks = 1, kSteps = 2; __VA_ARGS__(); break; }       \
    case 20: { constexpr int kBlocks = 1, kSteps = 4; __VA_ARGS__(); break; }       \
    case 24: { constexpr int kBlocks = 1, kSteps = 8; __VA_ARGS__(); break; }       \
    case 33: { constexpr int kBlocks = 2, kSteps = 1; __VA_ARGS__(); break; }       \
    case 34: { constexpr int kBlocks = 2, kSteps = 2; __VA_ARGS__(); break; }       \
    case 36: { constexpr int kBlocks = 2, kSteps = 4; __VA_ARGS__(); break; }       \
    case 40: { constexpr int kBlocks = 2, kSteps = 8; __VA_ARGS__(); break; }       \
    case 49: { constexpr int kBlocks = 3, kSteps = 1; __VA_ARGS__(); break; }       \
    case 50: { constexpr int kBlocks = 3, kSteps = 2; __VA_ARGS__(); break; }       \
    case 52: { constexpr int kBlocks = 3, kSteps = 4; __VA_ARGS__(); break; }       \
    case 56: { constexpr int kBlocks = 3, kSteps = 8; __VA_ARGS__(); break; }       \
    case 65: { constexpr int kBlocks = 4, kSteps = 1; __VA_ARGS__(); break; }       \
    case 66: { constexpr int kBlocks = 4, kSteps = 2; __VA_ARGS__(); break; }       \
    case 68: { constexpr int kBlocks = 4, kSteps = 4; __VA_ARGS__(); break; }       \
    default: { constexpr int kBlocks = 4, kSteps = 8; __VA_ARGS__(); break; }       \
  }

// Which kernel MLA_EXT_DECODE_KERNEL asks for: "auto" (unset: the warp-specialized Hopper kernel
// where it applies, 1.1-1.4x faster than the mma.sync kernel on Llama-3's shape, else the mma.sync
// kernel), "mma" or "ws"; a forced kernel that
// does not apply is an error. Read per call, so that tests and benchmarks can run all in one
// process (a plan must come from the same choice as its decode calls: the tile sizes differ).
enum class KernelChoice { kAuto, kMma, kWarpSpecialized };

KernelChoice kernel_choice() {
  const char* v = std::getenv("MLA_EXT_DECODE_KERNEL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return KernelChoice::kAuto;
  if (std::strcmp(v, "mma") == 0) return KernelChoice::kMma;
  TORCH_CHECK(std::strcmp(v, "ws") == 0,
              "mla_decode: MLA_EXT_DECODE_KERNEL must be auto, mma or ws, got '", v, "'");
  return KernelChoice::kWarpSpecialized;
}

// Whether this device runs the sm_90a code of a Hopper kernel (the answer never changes: asked
// once per kernel and device); `probe` asks the driver.
template <typename Probe>
bool sm90a_code_available(const at::Device& device, int kind, int variant, Probe probe) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int>, bool> available;
  const auto key = std::make_tuple(static_cast<int>(device.index()), kind, variant);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = available.find(key);
  if (it != available.end()) return it->second;
  const bool ok = probe();
  available[key] = ok;
  return ok;
}

// Why the warp-specialized kernel does not take these shapes on this device, or "" where it does
// (and then p's shape part is filled for it).
std::string configure_warpspec(MlaDecodeParams& p, at::ScalarType dtype, const at::Device& device,
                               int* blocks_out, int* steps_out) {
  namespace ws = decode::warpspec;
  const auto* props = at::cuda::getDeviceProperties(device.index());
  if (props->major != 9) return "it needs a compute capability 9.0 GPU";
  const bool quant = p.format != decode::kFmtFloat;
  if (quant && p.group_size % 8 != 0) {
    return "it needs quantization groups of a multiple of 8 channels";
  }
  if (p.rope_path != decode::kRopeLdmatrix) return "it needs RoPE keys in q_lat's dtype";
  if (p.d_r % 16 != 0) return "it needs d_r to be a multiple of 16";
  if (p.H % 8 != 0) return "it needs H to be a multiple of 8";
  if (p.D_c % ws::kChanBlock != 0 || p.D_c > ws::kMaxBlocks * ws::kChanBlock) {
    return "it needs D_c to be a multiple of 64 up to 256";
  }
  const int steps = ws::rope_steps_of(p.H, p.H_kv, p.d_r);
  if (steps > ws::kMaxRopeSteps) return "the KV heads of 8 query heads span more than 128 RoPE dims";
  const int blocks = p.D_c / ws::kChanBlock;
  const int variant = 2 * (blocks * 16 + steps) + quant;
  const bool ok = sm90a_code_available(device, 1 + static_cast<int>(dtype), variant, [&] {
    bool found = false;
    MLA_DECODE_DTYPE_SWITCH(dtype, [&] {
      MLA_DECODE_WARPSPEC_SWITCH(blocks, steps, [&] {
        found = quant ? decode::warpspec_decode_available<T, kBlocks, kSteps, true>()
                      : decode::warpspec_decode_available<T, kBlocks, kSteps, false>();
      });
    });
    return found;
  });
  if (!ok) return "this build has no sm_90a code (TORCH_CUDA_ARCH_LIST without 9.0a)";
  p.rows_per_cta = std::min(ws::kRows, p.rows);
  p.tile_tokens = ws::kTileTokens;
  if (ws::choose_warpspec_layout(p, steps, static_cast<int>(props->sharedMemPerBlockOptin),
                                 &p.smem)) {
    *blocks_out = blocks;
    *steps_out = steps;
    return "";
  }
  return quant ? "three 64-token slots of the latent and the RoPE keys and two of the stored "
                 "tiles do not fit in shared memory"
               : "three 64-token slots of the latent and the RoPE keys do not fit in shared memory";
}

// Fills the shape part of params (rows per CTA, shared memory, split bound) for this device.
Config configure(MlaDecodeParams& p, at::ScalarType dtype, const at::Device& device) {
  constexpr const char* kOp = "mla_decode";
  const KernelChoice choice = kernel_choice();
  int blocks = 0, steps = 0;
  const bool warpspec = choice == KernelChoice::kWarpSpecialized ||
                        (choice == KernelChoice::kAuto &&
                         configure_warpspec(p, dtype, device, &blocks, &steps).empty());
  if (warpspec) {
    const std::string why = choice == KernelChoice::kAuto
                                ? ""
                                : configure_warpspec(p, dtype, device, &blocks, &steps);
    TORCH_CHECK(why.empty(), kOp,
                ": MLA_EXT_DECODE_KERNEL=ws, but the warp-specialized kernel does not apply: ", why);
    const auto* props = at::cuda::getDeviceProperties(device.index());
    p.row_chunks = (p.rows + p.rows_per_cta - 1) / p.rows_per_cta;
    // one CTA per SM (its shared memory)
    const int target = std::min(decode::kPlanSlots,
                                std::max(1, props->multiProcessorCount / p.row_chunks));
    p.max_parts = target + p.B;
    TORCH_CHECK(static_cast<int64_t>(p.max_parts) * 4 <= props->sharedMemPerBlockOptin - 1024,
                kOp, ": batch ", p.B, " is too large for the split-KV merge on this GPU");
    return Config{-1, p.tile_tokens, target, blocks, steps};
  }
  const int bucket = decode::bucket_of(p.D_c);
  TORCH_CHECK(bucket >= 0, kOp, ": the CUDA kernel supports D_c <= ",
              decode::kBuckets[decode::kNumBuckets - 1].max_latent, ", got D_c = ", p.D_c);
  const decode::KernelShape shape = decode::kernel_shape_of(bucket);
  const auto* props = at::cuda::getDeviceProperties(device.index());
  const int smem_limit = static_cast<int>(props->sharedMemPerBlockOptin);
  const int sm_smem = static_cast<int>(props->sharedMemPerMultiprocessor);
  // The deepest pipeline that fits: two CTAs per SM where the bucket's registers allow it (their
  // barriers then overlap) and each still keeps two tiles in flight, else one CTA; all rows of
  // the kernel's tile per CTA if possible, fewer (each fewer KV heads' keys) if not.
  int stages = 0;
  for (int rows = shape.rows; rows >= 8 && stages == 0; rows -= 8) {
    p.rows_per_cta = rows;
    for (int ctas = decode::kBuckets[bucket].min_ctas; ctas >= 1 && stages == 0; --ctas) {
      const int budget = std::min(smem_limit, sm_smem / ctas - 1024);  // the driver's 1 KB a CTA
      const int fewest = ctas > 1 ? 3 : decode::kMinStages;
      for (int ctiles = 2; ctiles >= 1 && stages == 0; --ctiles) {
        for (int ns = decode::kMaxStages; ns >= fewest; --ns) {
          const decode::SmemLayout layout = decode::make_smem_layout(p, ns, shape, ctiles);
          if (layout.total <= budget) {
            p.smem = layout;
            stages = ns;
            break;
          }
        }
      }
    }
  }
  if (stages == 0) p.smem = decode::make_smem_layout(p, decode::kMinStages, shape, 1);
  TORCH_CHECK(stages > 0, kOp, ": D_c = ", p.D_c, ", H_kv = ", p.H_kv, ", d_r = ", p.d_r,
              " need ", p.smem.total, " bytes of shared memory per CTA; this GPU allows ",
              smem_limit);
  const int tile_tokens = shape.tile_tokens;
  p.tile_tokens = tile_tokens;
  p.row_chunks = (p.rows + p.rows_per_cta - 1) / p.rows_per_cta;
  // The occupancy query costs microseconds of host time per call: remember its answers.
  static std::mutex cache_mutex;
  static std::map<std::tuple<int, int, int, bool, int>, int> occupancy_cache;
  const auto key = std::make_tuple(static_cast<int>(device.index()), static_cast<int>(dtype),
                                   bucket, p.format != decode::kFmtFloat, p.smem.total);
  int ctas_per_sm = 0;
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = occupancy_cache.find(key);
    if (it != occupancy_cache.end()) ctas_per_sm = it->second;
  }
  if (ctas_per_sm == 0) {
    MLA_DECODE_DTYPE_SWITCH(dtype, [&] {
      MLA_DECODE_BUCKET_SWITCH(bucket, [&] {
        MLA_DECODE_CACHE_SWITCH(p.format != decode::kFmtFloat, [&] {
          ctas_per_sm = decode::decode_ctas_per_sm<T, kBucket, kQuant>(p.smem.total);
        });
      });
    });
    std::lock_guard<std::mutex> lock(cache_mutex);
    occupancy_cache[key] = ctas_per_sm;
  }
  TORCH_CHECK(ctas_per_sm >= 1, kOp, ": the kernel does not fit on an SM of this GPU");
  const int slots = props->multiProcessorCount * ctas_per_sm;
  const int target = std::min(decode::kPlanSlots, std::max(1, slots / p.row_chunks));
  p.max_parts = target + p.B;
  // The merge keeps one weight per split of a sequence in shared memory.
  TORCH_CHECK(static_cast<int64_t>(p.max_parts) * 4 <= smem_limit - 1024, kOp, ": batch ", p.B,
              " is too large for the split-KV merge on this GPU");
  return {bucket, tile_tokens, target, 0, 0};
}

MlaDecodeParams shape_params(const MlaDecodeDims& d, at::ScalarType rope_dtype,
                             at::ScalarType q_dtype) {
  MlaDecodeParams p{};
  p.B = d.B;
  p.s_q = d.s_q;
  p.H = d.H;
  p.H_kv = d.H_kv;
  p.D_c = d.D_c;
  p.D16 = (d.D_c + 15) / 16 * 16;
  p.d_r = d.d_r;
  p.block_size = d.block_size;
  p.max_blocks = d.max_blocks;
  p.num_groups = d.num_groups;
  p.group_size = d.group_size;
  p.group_shift = -1;
  for (int shift = 0; shift < 31 && p.group_shift < 0; ++shift) {
    if ((int64_t{1} << shift) == d.group_size) p.group_shift = shift;
  }
  p.rows = d.s_q * d.H;
  p.format = format_of(d.format);
  p.rope_path = rope_path_of(rope_dtype, q_dtype);
  p.rope_esize = p.rope_path == decode::kRopeFp8Keys ? 1 : 2;
  p.d_r_pad = (d.d_r + 7) / 8 * 8;
  const int key_bytes = d.d_r * p.rope_esize;
  p.rope_chunk = key_bytes % 16 == 0 ? 16 : key_bytes % 8 == 0 ? 8 : 4;
  p.latent_row_bytes = d.format == LatentFormat::kFloat ? d.D_c * 2
                       : d.format == LatentFormat::kInt4 ? d.D_c / 2
                                                          : d.D_c;
  return p;
}

void check_cuda_support(const MlaDecodeDims& d, const at::Tensor& q_lat, const at::Tensor& latent,
                        at::ScalarType k_rope_dtype) {
  constexpr const char* kOp = "mla_decode";
  TORCH_CHECK(q_lat.scalar_type() == at::kBFloat16 || q_lat.scalar_type() == at::kHalf, kOp,
              ": the CUDA kernel computes in bf16 or fp16; q_lat must be one of them, got ",
              q_lat.scalar_type(), " (fp32 runs on CPU only)");
  if (d.format == LatentFormat::kFloat) {
    TORCH_CHECK(latent.scalar_type() == q_lat.scalar_type(), kOp,
                ": on CUDA a float latent cache must have q_lat's dtype ", q_lat.scalar_type(),
                " (fp32 latent caches are CPU-only), got ", latent.scalar_type());
  }
  TORCH_CHECK(d.D_c % 8 == 0, kOp, ": the CUDA kernel needs D_c to be a multiple of 8, got ",
              d.D_c);
  TORCH_CHECK(d.block_size % decode::kPieceTokens == 0, kOp,
              ": the CUDA kernel needs block_size to be a multiple of ", decode::kPieceTokens,
              ", got ", d.block_size);
  TORCH_CHECK(k_rope_dtype == at::kBFloat16 || k_rope_dtype == at::kHalf ||
                  k_rope_dtype == at::kFloat8_e4m3fn,
              kOp, ": the CUDA kernel takes bf16, fp16 or fp8 RoPE keys (fp32 runs on CPU only), "
              "got ", k_rope_dtype);
  TORCH_CHECK(d.d_r >= 2 && d.d_r % 2 == 0 && d.d_r <= 8 * decode::kMaxRopeSteps, kOp,
              ": the CUDA kernel needs an even d_r up to ", 8 * decode::kMaxRopeSteps,
              ", got d_r = ", d.d_r);
  // Keys are copied in pieces of 4, 8 or 16 bytes per KV head.
  TORCH_CHECK(k_rope_dtype != at::kFloat8_e4m3fn || d.d_r % 4 == 0, kOp,
              ": the CUDA kernel needs d_r to be a multiple of 4 for fp8 RoPE keys, got d_r = ",
              d.d_r);
  TORCH_CHECK(d.B * d.s_q * d.H < (int64_t{1} << 31) && d.max_blocks < (int64_t{1} << 31) &&
                  d.num_blocks * d.block_size < (int64_t{1} << 31),
              kOp, ": sizes exceed the kernel's 32-bit index range");
}

void check_alignment(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "mla_decode: ", name,
              " must start at a 16-byte aligned address (cp.async / vector loads)");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mla_decode_cuda(
    const at::Tensor& q_lat, const at::Tensor& q_rope, const at::Tensor& latent,
    const std::optional<at::Tensor>& latent_scale, const std::optional<at::Tensor>& latent_zero,
    const at::Tensor& k_rope_cache, const std::optional<at::Tensor>& k_rope_scale,
    const at::Tensor& block_table, const at::Tensor& seq_lens, double softmax_scale,
    const std::optional<at::Tensor>& sched_meta_opt) {
  const MlaDecodeDims d = check_mla_decode_args(q_lat, q_rope, latent, latent_scale, latent_zero,
                                                k_rope_cache, k_rope_scale, block_table, seq_lens);
  check_cuda_support(d, q_lat, latent, k_rope_cache.scalar_type());
  const at::cuda::OptionalCUDAGuard guard(q_lat.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor o_lat = at::empty_like(q_lat, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({d.B, d.s_q, d.H}, q_lat.options().dtype(at::kFloat));
  if (d.B == 0) return {o_lat, lse};
  check_alignment(q_lat, "q_lat");
  check_alignment(latent, "latent");
  check_alignment(k_rope_cache, "k_rope_cache");
  if (latent_scale) check_alignment(*latent_scale, "latent_scale");
  if (latent_zero) check_alignment(*latent_zero, "latent_zero");
  if (k_rope_scale) check_alignment(*k_rope_scale, "k_rope_scale");

  MlaDecodeParams p = shape_params(d, k_rope_cache.scalar_type(), q_lat.scalar_type());
  const Config cfg = configure(p, q_lat.scalar_type(), q_lat.device());
  const int64_t plan_numel = decode::plan_numel(d.B);
  at::Tensor plan;
  if (sched_meta_opt.has_value()) {
    const at::Tensor& sched_meta = *sched_meta_opt;
    MLA_CHECK_DTYPE("mla_decode", sched_meta, at::kInt);
    MLA_CHECK_SAME_DEVICE("mla_decode", sched_meta, q_lat);
    MLA_CHECK_CONTIGUOUS("mla_decode", sched_meta);
    plan = sched_meta;
    TORCH_CHECK(plan.dim() == 1 && plan.numel() == plan_numel,
                "mla_decode: sched_meta must be the plan mla_decode_plan made for inputs of these "
                "shapes ([", plan_numel, "] int32), got shape ", sizes_str(plan));
  } else {
    plan = at::empty({plan_numel}, seq_lens.options());
    decode::launch_plan(seq_lens.data_ptr<int32_t>(), d.B, cfg.tile_tokens, cfg.target_parts,
                        decode::plan_capacity(d.B), plan.data_ptr<int32_t>(), stream);
  }
  at::Tensor ws_o = at::empty({p.max_parts, p.rows, d.D_c}, q_lat.options().dtype(at::kFloat));
  at::Tensor ws_lse = at::empty({p.max_parts, p.rows}, q_lat.options().dtype(at::kFloat));

  p.q_lat = q_lat.data_ptr();
  p.q_rope = q_rope.data_ptr();
  p.latent = static_cast<const uint8_t*>(latent.data_ptr());
  p.latent_scale = latent_scale ? static_cast<const uint8_t*>(latent_scale->data_ptr()) : nullptr;
  p.latent_zero = latent_zero ? static_cast<const uint8_t*>(latent_zero->data_ptr()) : nullptr;
  p.k_rope = static_cast<const uint8_t*>(k_rope_cache.data_ptr());
  p.k_rope_scale = k_rope_scale ? static_cast<const uint8_t*>(k_rope_scale->data_ptr()) : nullptr;
  p.block_table = block_table.data_ptr<int32_t>();
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.plan = plan.data_ptr<int32_t>();
  p.o_lat = o_lat.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.ws_o = ws_o.data_ptr<float>();
  p.ws_lse = ws_lse.data_ptr<float>();
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);

  MLA_DECODE_DTYPE_SWITCH(q_lat.scalar_type(), [&] {
    if (cfg.warpspec_blocks > 0) {
      const bool half = q_lat.scalar_type() == at::kHalf;
      const int64_t cache_rows = d.num_blocks * d.block_size;
      const CUtensorMap rope_map = decode::warpspec::cache_tensor_map(
          k_rope_cache.data_ptr(), cache_rows, int64_t{d.H_kv} * d.d_r, half, "k_rope_cache");
      MLA_DECODE_WARPSPEC_SWITCH(cfg.warpspec_blocks, cfg.rope_steps, [&] {
        if (p.format == decode::kFmtFloat) {
          const CUtensorMap latent_map = decode::warpspec::cache_tensor_map(
              latent.data_ptr(), cache_rows, d.D_c, half, "latent");
          decode::launch_warpspec_decode<T, kBlocks, kSteps, false>(p, latent_map, rope_map, stream);
        } else {
          // a quantized latent is copied as stored bytes (bulk copies), not through a tensor map
          decode::launch_warpspec_decode<T, kBlocks, kSteps, true>(p, CUtensorMap{}, rope_map,
                                                                  stream);
        }
      });
    } else {
      MLA_DECODE_BUCKET_SWITCH(cfg.bucket, [&] {
        MLA_DECODE_CACHE_SWITCH(p.format != decode::kFmtFloat,
                                [&] { decode::launch_decode<T, kBucket, kQuant>(p, stream); });
      });
    }
    decode::launch_combine<T>(p, stream);
  });
  return {o_lat, lse};
}

at::Tensor mla_decode_plan_cuda(const at::Tensor& q_lat, const at::Tensor& latent,
                                const std::optional<at::Tensor>& latent_scale,
                                const at::Tensor& k_rope_cache, const at::Tensor& seq_lens) {
  constexpr const char* kOp = "mla_decode_plan";
  MLA_CHECK_DIM("mla_decode_plan", q_lat, 4);
  MLA_CHECK_DIM("mla_decode_plan", k_rope_cache, 4);
  MLA_CHECK_DIM("mla_decode_plan", latent, 3);
  MLA_CHECK_DTYPE("mla_decode_plan", seq_lens, at::kInt);
  MLA_CHECK_SHAPE("mla_decode_plan", seq_lens, q_lat.size(0));
  MLA_CHECK_SAME_DEVICE("mla_decode_plan", seq_lens, q_lat);
  MLA_CHECK_CONTIGUOUS("mla_decode_plan", seq_lens);
  MlaDecodeDims d{};
  d.B = q_lat.size(0);
  d.s_q = q_lat.size(1);
  d.H = q_lat.size(2);
  d.D_c = q_lat.size(3);
  d.H_kv = k_rope_cache.size(2);
  d.d_r = k_rope_cache.size(3);
  d.block_size = latent.size(1);
  d.format = latent_format_of(latent);
  d.num_groups = latent_scale ? latent_scale->size(-1) : 1;
  TORCH_CHECK(d.H_kv >= 1 && d.H % d.H_kv == 0 && d.num_groups >= 1, kOp,
              ": H must be a multiple of H_kv and latent_scale must have >= 1 group");
  d.group_size = d.D_c / d.num_groups;
  check_cuda_support(d, q_lat, latent, k_rope_cache.scalar_type());
  const at::cuda::OptionalCUDAGuard guard(q_lat.device());
  MlaDecodeParams p = shape_params(d, k_rope_cache.scalar_type(), q_lat.scalar_type());
  const Config cfg = configure(p, q_lat.scalar_type(), q_lat.device());
  at::Tensor plan = at::empty({decode::plan_numel(d.B)}, seq_lens.options());
  if (d.B > 0) {
    decode::launch_plan(seq_lens.data_ptr<int32_t>(), d.B, cfg.tile_tokens, cfg.target_parts,
                        decode::plan_capacity(d.B), plan.data_ptr<int32_t>(),
                        at::cuda::getCurrentCUDAStream());
  }
  return plan;
}

}  // namespace mla_ext
