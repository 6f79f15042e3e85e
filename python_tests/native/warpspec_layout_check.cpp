// Host-side check of the warp-specialized decode kernel's shared-memory layouts
// (csrc/cuda/mla_decode/warpspec/layout.h), built and run by test_warpspec_layout.py: for every
// shape the kernel's host side could configure, the layout configure_warpspec would take must
// place its regions disjoint, aligned, and (with what a region's readers read past its end)
// inside the allocation. Prints one BAD line per violation, a PICK line per named shape, then
// "checked N fit M bad K".
#include <cstdio>

#include "cuda/mla_decode/warpspec/layout.h"

using namespace mla_ext::decode;
namespace ws = mla_ext::decode::warpspec;

namespace {

constexpr int kSmemLimit = 232448;  // an H100 / H200: 227 KB per CTA

MlaDecodeParams shape(int D_c, int H, int H_kv, int d_r, int format, int group,
                      int rope_path = kRopeLdmatrix) {
  MlaDecodeParams p{};
  p.rope_path = rope_path;
  p.D_c = D_c;
  p.H = H;
  p.H_kv = H_kv;
  p.d_r = d_r;
  p.format = format;
  p.num_groups = D_c / group;
  p.latent_row_bytes = format == kFmtInt4 ? D_c / 2 : format == kFmtFloat ? 2 * D_c : D_c;
  return p;
}

// The violations of one layout, printed; returns how many.
int check(const MlaDecodeParams& p, const SmemLayout& s) {
  const int end = s.total - 1024;  // the kernel may skip up to 1 KB to align its base
  const std::vector<ws::SmemRegion> regions = ws::warpspec_regions(p, s);
  int bad = 0;
  for (size_t i = 0; i < regions.size(); ++i) {
    const ws::SmemRegion& r = regions[i];
    if (r.begin % r.align != 0 || r.begin > r.end || r.end + r.read_past > end) {
      std::printf("BAD region %s [%d, %d) + %d align %d, end %d\n", r.name, r.begin, r.end,
                  r.read_past, r.align, end);
      ++bad;
    }
    for (size_t j = i + 1; j < regions.size(); ++j) {
      const ws::SmemRegion& o = regions[j];
      if (r.begin < o.end && o.begin < r.end) {
        std::printf("BAD overlap %s [%d, %d) %s [%d, %d)\n", r.name, r.begin, r.end, o.name,
                    o.begin, o.end);
        ++bad;
      }
    }
  }
  if (bad) {
    std::printf("BAD shape D_c %d H %d H_kv %d d_r %d format %d groups %d\n", p.D_c, p.H, p.H_kv,
                p.d_r, p.format, p.num_groups);
  }
  return bad;
}

void pick(const char* name, const MlaDecodeParams& p) {
  SmemLayout s{};
  if (ws::choose_warpspec_layout(p, ws::rope_steps_of(p.H, p.H_kv, p.d_r), kSmemLimit, &s)) {
    std::printf("PICK %s slots %d rope_slots %d raw_slots %d total %d\n", name, s.num_stages,
                s.rope_slots, s.raw_slots, s.total);
  } else {
    std::printf("PICK %s none\n", name);
  }
}

}  // namespace

int main() {
  int checked = 0, fit = 0, bad = 0;
  const auto consider = [&](const MlaDecodeParams& p, int steps) {
    SmemLayout s{};
    ++checked;
    if (!ws::choose_warpspec_layout(p, steps, kSmemLimit, &s)) return;
    ++fit;
    if (s.total > kSmemLimit) {
      std::printf("BAD total %d over the limit\n", s.total);
      ++bad;
    }
    bad += check(p, s);
  };
  for (int blocks = 1; blocks <= ws::kMaxBlocks; ++blocks) {
    const int D_c = 64 * blocks;
    for (int H : {8, 16, 32, 64, 128}) {
      for (int H_kv = 1; H_kv <= H; ++H_kv) {
        if (H % H_kv != 0) continue;
        for (int d_r : {16, 32, 48, 64}) {
          const int steps = ws::rope_steps_of(H, H_kv, d_r);
          if (steps > ws::kMaxRopeSteps) continue;
          consider(shape(D_c, H, H_kv, d_r, kFmtFloat, D_c), steps);
          // quantized latents: groups of 8 channels (the most scale bytes) or one group, with
          // 16-bit or fp8 keys (whose stored bytes a layout may hold too)
          for (int format : {kFmtInt8, kFmtInt4, kFmtFp8}) {
            for (int group : {8, D_c}) {
              for (int rope_path : {kRopeLdmatrix, kRopeFp8Keys}) {
                consider(shape(D_c, H, H_kv, d_r, format, group, rope_path), steps);
              }
            }
          }
        }
      }
    }
  }
  pick("llama3_bf16", shape(256, 32, 8, 16, kFmtFloat, 256));
  pick("llama3_int8", shape(256, 32, 8, 16, kFmtInt8, 32));
  pick("llama3_int4", shape(256, 32, 8, 16, kFmtInt4, 32));
  pick("llama2_bf16", shape(512, 32, 32, 16, kFmtFloat, 512));
  std::printf("checked %d fit %d bad %d\n", checked, fit, bad);
  return bad == 0 ? 0 : 1;
}
