// Which compiled decode kernel takes a call, and its configuration: rows per CTA, tile, shared
// memory, split count. A pure function of the call's shapes and the device's properties, in plain
// C++ (no CUDA, no torch), so that python_tests/test_choose_kernel.py checks it on the host
// (native/choose_kernel_check.cpp); api.cpp gathers the properties and launches what it returns.
#pragma once

#include <algorithm>
#include <functional>
#include <string>

#include "core/decode_kernel.h"
#include "core/split_plan.h"
#include "cuda/mla_decode/config.h"
#include "cuda/mla_decode/instantiations/kernel_table.h"
#include "cuda/mla_decode/traits.h"
#include "cuda/mla_decode/warpspec/layout.h"

namespace mla_ext::decode {

struct DeviceProperties {
  int major = 0, minor = 0;       // compute capability
  int sm_count = 0;
  int smem_per_block_optin = 0;   // bytes of shared memory a CTA may opt in to
  int smem_per_sm = 0;
  bool sm90a_code = false;        // this build's warp-specialized kernels run here
  // CTAs of mma.sync variant `variant` (kKernelVariants) that fit on one SM with `smem_bytes`
  // of dynamic shared memory: the driver's occupancy answer.
  std::function<int(int variant, int smem_bytes)> ctas_per_sm;
};

struct KernelSpec {
  int variant = -1;     // index into kKernelVariants; -1: no kernel takes the call (see error)
  int rows_per_cta = 0, row_chunks = 0;
  int tile_tokens = 0;  // the plan's unit
  int target_parts = 0; // splits the plan aims for: one wave of CTAs
  int max_parts = 0;    // the grid's parts: target_parts + B (the plan's rounding)
  SmemLayout smem{};
  std::string error;    // why no kernel takes the call ("" when variant >= 0)

  KernelFamily family() const { return kKernelVariants[variant].family; }
};

namespace choice_detail {

inline KernelSpec failed(std::string why) {
  KernelSpec s;
  s.error = "mla_decode: " + std::move(why);
  return s;
}

// The plan's split target for `slots` CTAs at once, and the merge's limit on the parts.
inline KernelSpec with_parts(KernelSpec s, const MlaDecodeParams& p, const DeviceProperties& dev,
                             int slots) {
  s.row_chunks = (p.rows + s.rows_per_cta - 1) / s.rows_per_cta;
  s.target_parts = std::min(kPlanSlots, std::max(1, slots / s.row_chunks));
  s.max_parts = s.target_parts + p.B;
  // The merge keeps one weight per split of a sequence in shared memory.
  if (static_cast<int64_t>(s.max_parts) * 4 > dev.smem_per_block_optin - 1024) {
    return failed("batch " + std::to_string(p.B) +
                  " is too large for the split-KV merge on this GPU");
  }
  return s;
}

// The warp-specialized kernel's configuration, or why it does not take these shapes here.
inline KernelSpec warpspec_spec(const MlaDecodeParams& p, bool half, const DeviceProperties& dev) {
  namespace ws = warpspec;
  KernelSpec s;
  auto no = [](const char* why) {
    KernelSpec f;
    f.error = why;
    return f;
  };
  if (dev.major != 9) return no("it needs a compute capability 9.0 GPU");
  const bool quant = p.format != kFmtFloat;
  if (quant && p.group_size % 8 != 0) {
    return no("it needs quantization groups of a multiple of 8 channels");
  }
  if (p.rope_path != kRopeLdmatrix) return no("it needs RoPE keys in q_lat's dtype");
  if (p.d_r % 16 != 0) return no("it needs d_r to be a multiple of 16");
  if (p.H % 8 != 0) return no("it needs H to be a multiple of 8");
  if (p.D_c % ws::kChanBlock != 0 || p.D_c > ws::kMaxBlocks * ws::kChanBlock) {
    return no("it needs D_c to be a multiple of 64 up to 256");
  }
  const int steps = ws::rope_steps_of(p.H, p.H_kv, p.d_r);
  if (steps > ws::kMaxRopeSteps) return no("the KV heads of 8 query heads span more than 128 RoPE dims");
  if (!dev.sm90a_code) return no("this build has no sm_90a code (TORCH_CUDA_ARCH_LIST without 9.0a)");
  s.variant = find_kernel_variant(
      {KernelFamily::kWarpSpecialized, half, p.D_c / ws::kChanBlock, steps, quant});
  if (s.variant < 0) return no("this build has no such variant (generate_kernels.py's list)");
  s.rows_per_cta = std::min(ws::kRows, p.rows);
  s.tile_tokens = ws::kTileTokens;
  if (!ws::choose_warpspec_layout(p, steps, dev.smem_per_block_optin, &s.smem)) {
    return no(quant ? "three 64-token slots of the latent and the RoPE keys and two of the stored "
                      "tiles do not fit in shared memory"
                    : "three 64-token slots of the latent and the RoPE keys do not fit in shared "
                      "memory");
  }
  return s;
}

// The mma.sync kernel's configuration: the deepest pipeline that fits. Two CTAs per SM where the
// bucket's registers allow it (their barriers then overlap) and each still keeps two tiles in
// flight, else one CTA; all rows of the kernel's tile per CTA if possible, fewer (each fewer KV
// heads' keys) if not.
inline KernelSpec mma_spec(const MlaDecodeParams& p, bool half, const DeviceProperties& dev) {
  const int bucket = bucket_of(p.D_c);
  if (bucket < 0) {
    return failed("the CUDA kernel supports D_c <= " +
                  std::to_string(kBuckets[kNumBuckets - 1].max_latent) + ", got D_c = " +
                  std::to_string(p.D_c));
  }
  KernelSpec s;
  s.variant = find_kernel_variant({KernelFamily::kMma, half, bucket, 0, p.format != kFmtFloat});
  if (s.variant < 0) return failed("this build has no mma.sync kernel for D_c = " + std::to_string(p.D_c));
  const KernelShape shape = kernel_shape_of(bucket);
  MlaDecodeParams q = p;  // make_smem_layout reads rows_per_cta
  int stages = 0;
  for (int rows = shape.rows; rows >= 8 && stages == 0; rows -= 8) {
    q.rows_per_cta = rows;
    for (int ctas = kBuckets[bucket].min_ctas; ctas >= 1 && stages == 0; --ctas) {
      // the driver's 1 KB a CTA
      const int budget = std::min(dev.smem_per_block_optin, dev.smem_per_sm / ctas - 1024);
      const int fewest = ctas > 1 ? 3 : kMinStages;
      for (int ctiles = 2; ctiles >= 1 && stages == 0; --ctiles) {
        for (int ns = kMaxStages; ns >= fewest; --ns) {
          const SmemLayout layout = make_smem_layout(q, ns, shape, ctiles);
          if (layout.total <= budget) {
            s.smem = layout;
            stages = ns;
            break;
          }
        }
      }
    }
  }
  if (stages == 0) {
    const SmemLayout least = make_smem_layout(q, kMinStages, shape, 1);
    return failed("D_c = " + std::to_string(p.D_c) + ", H_kv = " + std::to_string(p.H_kv) +
                  ", d_r = " + std::to_string(p.d_r) + " need " + std::to_string(least.total) +
                  " bytes of shared memory per CTA; this GPU allows " +
                  std::to_string(dev.smem_per_block_optin));
  }
  s.rows_per_cta = q.rows_per_cta;
  s.tile_tokens = shape.tile_tokens;
  return s;
}

}  // namespace choice_detail

// The kernel that takes a call of shapes p (shape_params: the shape part filled, rows_per_cta and
// the layout not yet) with fp16 (half) or bf16 queries, under `request`, on a device `dev`.
inline KernelSpec choose_kernel(const MlaDecodeParams& p, bool half, KernelRequest request,
                                const DeviceProperties& dev) {
  using namespace choice_detail;
  if (request != KernelRequest::kMma) {
    KernelSpec s = warpspec_spec(p, half, dev);
    if (s.variant >= 0) return with_parts(s, p, dev, dev.sm_count);  // one CTA per SM
    if (request == KernelRequest::kWarpSpecialized) {
      return failed("the decode kernel is set to ws (mla_ext.ops.decode_kernel), but the "
                    "warp-specialized kernel does not apply: " + s.error);
    }
  }
  KernelSpec s = mma_spec(p, half, dev);
  if (s.variant < 0) return s;
  const int ctas_per_sm = dev.ctas_per_sm(s.variant, s.smem.total);
  if (ctas_per_sm < 1) return failed("the kernel does not fit on an SM of this GPU");
  return with_parts(s, p, dev, dev.sm_count * ctas_per_sm);
}

// p's configuration part as spec chose it.
inline void apply_kernel_spec(const KernelSpec& spec, MlaDecodeParams& p) {
  p.rows_per_cta = spec.rows_per_cta;
  p.row_chunks = spec.row_chunks;
  p.tile_tokens = spec.tile_tokens;
  p.max_parts = spec.max_parts;
  p.smem = spec.smem;
}

}  // namespace mla_ext::decode
