"""One benchmark shape of mla_decode called many times, the L2 flushed before each call as the
benchmark does, every output compared bitwise with the first (the kernels are deterministic):
the workload for compute-sanitizer at a benchmark shape, or for a failure that shows only after
repeated calls (a kernel variant that reads a tile as one page box failed on the second call at
B = 1, S = 131072).

  python bench/repeat_decode.py --model llama3 --B 1 --S 131072 --calls 20
  compute-sanitizer --tool memcheck python bench/repeat_decode.py --kernel ws ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_mla_decode import LATENT, MODELS, QUICK_D_C, ROPE, profile_call  # noqa: E402
from bench.common import Timer  # noqa: E402
from mla_ext import ops  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="llama3")
    ap.add_argument("--D_c", type=int, default=None,
                    help="latent width (default: the model's target width, as --targets)")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--latent", choices=sorted(LATENT), default="bf16")
    ap.add_argument("--rope", choices=sorted(ROPE), default="bf16")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--flush", choices=Timer.FLUSHES, default="write")
    ap.add_argument("--kernel", choices=ops.DECODE_KERNELS, default="auto",
                    help="which decode kernel (mla_ext.ops.set_decode_kernel)")
    args = ap.parse_args(argv)
    ops.set_decode_kernel(args.kernel)
    if args.calls < 1 or args.B < 1 or args.S < 1:
        ap.error("--calls, --B and --S must be at least 1")
    if not torch.cuda.is_available():
        print("repeat_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    D_c = args.D_c or QUICK_D_C[args.model]
    op, call, nbytes = profile_call(args.model, D_c, args.B, args.S, args.latent, args.rope)
    flush = Timer(flush=args.flush).flush_l2
    first = None
    for i in range(args.calls):
        flush()
        out, lse = op(*call)
        torch.cuda.synchronize()  # a fault surfaces at its call
        if first is None:
            first = (out.clone(), lse.clone())
            if not (torch.isfinite(out).all() and torch.isfinite(lse).all()):
                print("call 0: the output holds a NaN or an infinity")
                return 1
        elif not (torch.equal(out, first[0]) and torch.equal(lse, first[1])):
            diff = (out.float() - first[0].float()).abs().max().item()
            print(f"call {i}: output differs from call 0 (max |diff| {diff:.3g})")
            return 1
    print(f"{args.calls} calls of {args.model} D_c={D_c} B={args.B} S={args.S} "
          f"{args.latent}/{args.rope} ({nbytes / 2**20:.0f} MiB): every output equals the first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
