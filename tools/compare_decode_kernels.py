"""The CUDA decode kernels against reference.py on a few small shapes, each with and without its
RoPE part (q_rope = 0) and its latent part (q_lat = 0): where a kernel change went wrong.

Prints, per shape and variant, the largest |o - o_ref| and |lse - lse_ref| of the mma.sync kernel
and of the warp-specialized one (ops.decode_kernel("ws"); an error line where it does not
apply), and whether any output is NaN. The inputs are those of the GPU tests (paged, poisoned pages).
Also the workload of the warp-specialized kernel's compute-sanitizer run:
  compute-sanitizer --tool memcheck python3 tools/compare_decode_kernels.py
"""
import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "python_tests"))
from mla_ext import ops, reference  # noqa: E402
from test_ops_mla_decode import DecodeParam, make_inputs  # noqa: E402

SHAPES = [  # B, s_q, H, H_kv, d_r, D_c, block_size, lens
    (1, 1, 32, 32, 16, 512, 64, (64,)),
    (1, 1, 32, 8, 16, 256, 64, (64,)),
    (1, 1, 32, 8, 16, 256, 64, (1,)),
    (1, 1, 32, 8, 16, 256, 64, (200,)),
    (1, 1, 32, 32, 16, 512, 64, (100,)),
    (2, 1, 8, 8, 8, 64, 16, (70, 5)),
    (1, 1, 32, 8, 16, 256, 64, (5000,)),
]


def run_kernel(kind, args):
    with ops.decode_kernel(kind):
        o, lse = torch.ops.mla_ext.mla_decode(*args, None)
    torch.cuda.synchronize()
    return o.float().cpu(), lse.cpu()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16",
                    help="latent, RoPE key and query dtype")
    args_ns = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("compare_decode_kernels.py needs a CUDA GPU")
    dt = torch.bfloat16 if args_ns.dtype == "bf16" else torch.float16
    for B, s_q, H, H_kv, d_r, D_c, bs, lens in SHAPES:
        p = DecodeParam(B, s_q, H, H_kv, d_r, D_c, bs, lens, dt, dt, dt, D_c, seed=1)
        args, _ = make_inputs(p, "cuda")
        for variant in ("full", "no_rope", "no_lat"):
            a = list(args)
            if variant == "no_rope":
                a[1] = torch.zeros_like(a[1])
            if variant == "no_lat":
                a[0] = torch.zeros_like(a[0])
            cpu = [x.cpu() if isinstance(x, torch.Tensor) else x for x in a]
            o_ref, l_ref = reference.mla_decode(cpu[0].float(), cpu[1].float(), *cpu[2:])
            live = ~torch.isinf(l_ref)
            res = []
            for kind in ("mma", "ws"):
                try:
                    o, lse = run_kernel(kind, tuple(a))
                except RuntimeError as e:
                    res.append(f"{kind}: {str(e).splitlines()[0][:160]}")
                    continue
                lerr = (lse[live] - l_ref[live]).abs().max().item() if live.any() else 0.0
                res.append(f"{kind}: o {(o - o_ref).abs().max().item():.3g} lse {lerr:.3g} "
                           f"nan {torch.isnan(o).any().item()}")
            print(p.B, p.H, p.H_kv, p.D_c, p.lens, variant, " | ".join(res), flush=True)


if __name__ == "__main__":
    main()
