// Every op of mla_ext, declared once: schema here, prototype in ops.h, kernels in cpu/ and cuda/.
// Mutating ops mark their outputs (a!) and return (); see ARCHITECTURE.md section 3.4.
#include <torch/extension.h>

#include "core/decode_kernel.h"
#include "core/split_plan.h"
#include "ops.h"

TORCH_LIBRARY(mla_ext, m) {
  // Rotate-half RoPE on [x1 | x2] partial-RoPE vectors; heads share their KV head's angles.
  m.def("partial_rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("partial_rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  // Quantize N tokens' latents and rotated keys and write them into the paged cache.
  m.def(
      "latent_cache_write(Tensor c, Tensor k_rope, Tensor slot_mapping, Tensor(a!) latent, "
      "Tensor(b!)? latent_scale, Tensor(c!)? latent_zero, Tensor(d!) k_rope_cache, "
      "Tensor(e!)? k_rope_scale) -> ()");
  // Decode-time fusion: latent + RoPE-key projection, partial RoPE, quantize, cache write.
  m.def(
      "latent_project(Tensor x, Tensor w_down, Tensor w_kr, Tensor? b_kr, Tensor cos, "
      "Tensor sin, Tensor slot_mapping, Tensor(a!) latent, Tensor(b!)? latent_scale, "
      "Tensor(c!)? latent_zero, Tensor(d!) k_rope_cache, Tensor(e!)? k_rope_scale) -> ()");
  // Absorbed MLA attention over the paged latent cache; returns (o_lat, lse).
  m.def(
      "mla_decode(Tensor q_lat, Tensor q_rope, Tensor latent, Tensor? latent_scale, "
      "Tensor? latent_zero, Tensor k_rope_cache, Tensor? k_rope_scale, Tensor block_table, "
      "Tensor seq_lens, float softmax_scale, Tensor? sched_meta=None) -> (Tensor, Tensor)");
  // Split-KV schedule of mla_decode for one step (int32), reusable by every layer of that step.
  m.def(
      "mla_decode_plan(Tensor q_lat, Tensor latent, Tensor? latent_scale, Tensor k_rope_cache, "
      "Tensor seq_lens) -> Tensor");
  // Dequantized context of each sequence, zero-padded to max_len; returns (c, k_rope).
  m.def(
      "latent_gather(Tensor latent, Tensor? latent_scale, Tensor? latent_zero, "
      "Tensor k_rope_cache, Tensor? k_rope_scale, Tensor block_table, Tensor seq_lens, "
      "int max_len) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mla_ext, CPU, m) {
  m.impl("partial_rope", &mla_ext::partial_rope_cpu);
  m.impl("partial_rope_", &mla_ext::partial_rope_inplace_cpu);
  m.impl("mla_decode", &mla_ext::mla_decode_cpu);
  m.impl("mla_decode_plan", &mla_ext::mla_decode_plan_cpu);
  m.impl("latent_cache_write", &mla_ext::latent_cache_write_cpu);
  m.impl("latent_gather", &mla_ext::latent_gather_cpu);
  m.impl("latent_project", &mla_ext::latent_project_cpu);
}

#ifdef MLA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(mla_ext, CUDA, m) {
  m.impl("partial_rope", &mla_ext::partial_rope_cuda);
  m.impl("partial_rope_", &mla_ext::partial_rope_inplace_cuda);
  m.impl("mla_decode", &mla_ext::mla_decode_cuda);
  m.impl("mla_decode_plan", &mla_ext::mla_decode_plan_cuda);
  m.impl("latent_cache_write", &mla_ext::latent_cache_write_cuda);
  m.impl("latent_gather", &mla_ext::latent_gather_cuda);
  m.impl("latent_project", &mla_ext::latent_project_cuda);
}
#endif

// `import mla_ext._C` loads this library, which runs the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mla_ext kernels; the ops are under torch.ops.mla_ext";
  // The size of mla_decode_plan's tensor for a batch, for its fake (meta) implementation.
  m.def("mla_decode_plan_numel", &mla_ext::decode::plan_numel, "int32 values of a split plan");
  // The process-wide CUDA decode kernel request (core/decode_kernel.h); mla_ext.ops.decode_kernel
  // is the Python interface.
  m.def(
      "set_decode_kernel",
      [](const std::string& name) {
        TORCH_CHECK(mla_ext::decode::set_kernel_request(name),
                    "decode_kernel: name must be auto, mma or ws, got '", name, "'");
      },
      "which CUDA decode kernel mla_decode and mla_decode_plan use: auto, mma or ws");
  m.def(
      "decode_kernel",
      [] { return std::string(mla_ext::decode::kernel_request_name(mla_ext::decode::kernel_request())); },
      "the CUDA decode kernel request: auto, mma or ws");
#ifdef MLA_EXT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
