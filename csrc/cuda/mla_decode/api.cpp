// Host entry of mla_decode on CUDA, in four steps: checks; the call's parameters (shapes);
// choose_kernel (choose_kernel.h: a pure function of the parameters, the process-wide kernel
// request and the device's properties) picks a compiled kernel and its configuration; the split
// plan, then decode + combine on the current stream. Nothing here reads device memory, so a call
// can be captured in a CUDA graph.
// A .cpp, compiled by the host compiler: on the H200 image, a failing TORCH_CHECK whose message
// formats integers segfaulted when the check sat in an nvcc-compiled translation unit (inside
// std::ostream number formatting); .cu files therefore hold no TORCH_CHECK.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <map>
#include <mutex>
#include <tuple>

#include "args/mla_decode.h"
#include "core/decode_kernel.h"
#include "core/split_plan.h"
#include "cuda/mla_decode/choose_kernel.h"
#include "cuda/mla_decode/instantiations/kernel_dispatch.h"
#include "cuda/mla_decode/launch.h"
#include "cuda/mla_decode/warpspec/tensor_map.h"
#include "ops.h"

namespace mla_ext {
namespace {

using decode::KernelSpec;
using decode::MlaDecodeParams;

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

// Whether this device runs the build's sm_90a code (asked once per device: every
// warp-specialized variant is compiled for the same architectures).
bool sm90a_code_runs(int device, int major) {
  static std::mutex mutex;
  static std::map<int, bool> known;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(device);
  if (it != known.end()) return it->second;
  bool ok = false;
  if (major == 9) {
    for (int v = 0; v < decode::kNumKernelVariants && !ok; ++v) {
      if (decode::kKernelVariants[v].family == decode::KernelFamily::kWarpSpecialized) {
        ok = decode::kKernelFunctions[v].sm90a_code();
        break;
      }
    }
  }
  known[device] = ok;
  return ok;
}

// The driver's occupancy answer for an mma.sync variant; remembered, since the query costs
// microseconds of host time per call.
int mma_ctas_per_sm(int device, int variant, int smem_bytes) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int>, int> known;
  const auto key = std::make_tuple(device, variant, smem_bytes);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = known.find(key);
    if (it != known.end()) return it->second;
  }
  const int n = decode::kKernelFunctions[variant].ctas_per_sm(smem_bytes);
  std::lock_guard<std::mutex> lock(mutex);
  known[key] = n;
  return n;
}

decode::DeviceProperties device_properties(const at::Device& device) {
  const int index = device.index();
  const auto* props = at::cuda::getDeviceProperties(index);
  decode::DeviceProperties dev;
  dev.major = props->major;
  dev.minor = props->minor;
  dev.sm_count = props->multiProcessorCount;
  dev.smem_per_block_optin = static_cast<int>(props->sharedMemPerBlockOptin);
  dev.smem_per_sm = static_cast<int>(props->sharedMemPerMultiprocessor);
  dev.sm90a_code = sm90a_code_runs(index, props->major);
  dev.ctas_per_sm = [index](int variant, int smem) { return mma_ctas_per_sm(index, variant, smem); };
  return dev;
}

// The kernel of this call (the same for its plan and its decode), its configuration in p.
KernelSpec configure(MlaDecodeParams& p, at::ScalarType dtype, const at::Device& device) {
  const KernelSpec spec = decode::choose_kernel(p, dtype == at::kHalf, decode::kernel_request(),
                                                device_properties(device));
  TORCH_CHECK(spec.variant >= 0, spec.error);
  decode::apply_kernel_spec(spec, p);
  return spec;
}

// The chosen kernel, then the merge of split sequences.
void launch(const KernelSpec& spec, const MlaDecodeParams& p, const MlaDecodeDims& d,
            const at::Tensor& latent, const at::Tensor& k_rope_cache, at::ScalarType dtype,
            cudaStream_t stream) {
  const decode::KernelFunctions& fns = decode::kKernelFunctions[spec.variant];
  const bool half = dtype == at::kHalf;
  if (spec.family() == decode::KernelFamily::kWarpSpecialized) {
    const int64_t cache_rows = d.num_blocks * d.block_size;
    const CUtensorMap rope_map = decode::warpspec::cache_tensor_map(
        k_rope_cache.data_ptr(), cache_rows, int64_t{d.H_kv} * d.d_r, half, "k_rope_cache");
    // a quantized latent is copied as stored bytes (bulk copies), not through a tensor map
    const CUtensorMap latent_map =
        p.format == decode::kFmtFloat
            ? decode::warpspec::cache_tensor_map(latent.data_ptr(), cache_rows, d.D_c, half,
                                                 "latent")
            : CUtensorMap{};
    fns.launch_tma(p, latent_map, rope_map, stream);
  } else {
    fns.launch(p, stream);
  }
  if (half) {
    decode::launch_combine<__half>(p, stream);
  } else {
    decode::launch_combine<__nv_bfloat16>(p, stream);
  }
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
  const KernelSpec spec = configure(p, q_lat.scalar_type(), q_lat.device());
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
    decode::launch_plan(seq_lens.data_ptr<int32_t>(), d.B, spec.tile_tokens, spec.target_parts,
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
  p.softmax_scale_log2 = static_cast<float>(softmax_scale * decode::kLog2e);

  launch(spec, p, d, latent, k_rope_cache, q_lat.scalar_type(), stream);
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
  const KernelSpec spec = configure(p, q_lat.scalar_type(), q_lat.device());
  at::Tensor plan = at::empty({decode::plan_numel(d.B)}, seq_lens.options());
  if (d.B > 0) {
    decode::launch_plan(seq_lens.data_ptr<int32_t>(), d.B, spec.tile_tokens, spec.target_parts,
                        decode::plan_capacity(d.B), plan.data_ptr<int32_t>(),
                        at::cuda::getCurrentCUDAStream());
  }
  return plan;
}

}  // namespace mla_ext
