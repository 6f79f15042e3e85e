"""Where a decode step's GPU time goes: torch.profiler over eager steps of bench_e2e's models.

    python tools/profile_decode_step.py --model llama2-7b --side mla-bf16 --batch 1 --length 4096

Prints the kernels by total CUDA time over --steps steps (the step as bench_e2e.py times it,
without the graph, so that each kernel shows up by name).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_e2e import SHAPES, SIDES, fill_random, random_model, to_mla_shapes  # noqa: E402
from mla_ext.generation import DecodeStep, make_cache  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(SHAPES), default="llama2-7b")
    p.add_argument("--side", choices=[s for s in SIDES if s != "original-eager"],
                   default="mla-bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=4096, help="cached tokens per sequence")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=20, help="kernels to list")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_decode_step needs a CUDA device")
    converted, cache_dtype, rope_dtype, _ = SIDES[args.side]
    model = random_model(args.model, args.layers)
    if converted:
        to_mla_shapes(model)
    cache = make_cache(model, args.batch, args.length + 2 * args.steps + 8, cache_dtype,
                       rope_dtype)
    fill_random(cache, args.length)
    tokens = torch.zeros(args.batch, dtype=torch.long, device="cuda")
    output = torch.zeros(args.batch, 2 * args.steps + 4, dtype=torch.long, device="cuda")
    step = DecodeStep(model, cache, tokens, output, None, 0, 0.0, 1.0)
    with torch.no_grad():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
    print(f"{args.model} {args.side} B={args.batch} S={args.length}, {args.steps} steps "
          f"({torch.cuda.get_device_name()})")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.top,
                                    max_name_column_width=70))


if __name__ == "__main__":
    main()
