// Host-side runner of choose_kernel (csrc/cuda/mla_decode/choose_kernel.h), built and driven by
// test_choose_kernel.py. Reads one call per line:
//   D_c H H_kv d_r s_q B format group rope_path half request major sm_count smem_optin smem_sm sm90a
// (format, rope_path: traits.h's numbers; request: 0 auto, 1 mma, 2 ws) and prints per call
//   family variant tile rows_per_cta row_chunks target_parts max_parts smem_total
// or "error <message>". The mma.sync occupancy comes from the model below: the CTAs whose shared
// memory (and the driver's 1 KB each) fit on the SM, at most the bucket's launch bound.
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

#include "cuda/mla_decode/choose_kernel.h"

using namespace mla_ext::decode;

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    int D_c, H, H_kv, d_r, s_q, B, format, group, rope_path, half, request, major, sms, optin, per_sm,
        sm90a;
    if (!(in >> D_c >> H >> H_kv >> d_r >> s_q >> B >> format >> group >> rope_path >> half >>
          request >> major >> sms >> optin >> per_sm >> sm90a)) {
      std::printf("error unreadable line\n");
      continue;
    }
    MlaDecodeParams p{};
    p.B = B;
    p.s_q = s_q;
    p.H = H;
    p.H_kv = H_kv;
    p.D_c = D_c;
    p.D16 = (D_c + 15) / 16 * 16;
    p.d_r = d_r;
    p.block_size = 64;
    p.num_groups = D_c / group;
    p.group_size = group;
    p.rows = s_q * H;
    p.format = format;
    p.rope_path = rope_path;
    p.rope_esize = rope_path == kRopeFp8Keys ? 1 : 2;
    p.d_r_pad = (d_r + 7) / 8 * 8;
    p.rope_chunk = 16;
    p.latent_row_bytes = format == kFmtFloat ? 2 * D_c : format == kFmtInt4 ? D_c / 2 : D_c;
    DeviceProperties dev;
    dev.major = major;
    dev.sm_count = sms;
    dev.smem_per_block_optin = optin;
    dev.smem_per_sm = per_sm;
    dev.sm90a_code = sm90a != 0;
    dev.ctas_per_sm = [per_sm](int variant, int smem) {
      const int by_smem = per_sm / (smem + 1024);
      const int bound = kBuckets[kKernelVariants[variant].shape].min_ctas;
      return by_smem < bound ? by_smem : bound;
    };
    const KernelSpec s = choose_kernel(p, half != 0, static_cast<KernelRequest>(request), dev);
    if (s.variant < 0) {
      std::printf("error %s\n", s.error.c_str());
      continue;
    }
    const KernelVariant& v = kKernelVariants[s.variant];
    std::printf("%s %d %d %d %d %d %d %d shape %d steps %d quant %d half %d\n",
                v.family == KernelFamily::kMma ? "mma" : "ws", s.variant, s.tile_tokens,
                s.rows_per_cta, s.row_chunks, s.target_parts, s.max_parts, s.smem.total, v.shape,
                v.rope_steps, v.quant ? 1 : 0, v.half ? 1 : 0);
  }
  return 0;
}
