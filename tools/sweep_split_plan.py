"""How mla_decode's time depends on its split plan: the same call timed with hand-made plans
whose splits take `tiles_per_split` tiles each (the kernel's own plan is one of them).

Plans here use at most as many splits as the kernel's own plan (the grid's size is not
recorded in the plan). A split pays a fixed cost next to the tiles it streams: its CTA loads the queries of all its rows
(rows x D_c values), writes a partial output of the same size in fp32, and the merge reads it
back. With wide latents (D_c = 1024, 32 query rows: 320 KB a split, the cache bytes of about 100
tokens) short splits spend more on that than on the cache; long splits leave SMs idle. This
tool measures where the balance lies, per shape and format.

  python tools/sweep_split_plan.py [--shapes llama2:1024:1:4096,...] [--out DIR]

A shape is model:D_c:B:S[:latent[:rope]] (models and formats as in bench/bench_mla_decode.py).
Writes DIR/split_plan_sweep.json (default: the working directory).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.bench_mla_decode import profile_call  # noqa: E402
from bench.common import Timer, graphed, measure_peak_read_bandwidth, metadata  # noqa: E402

PLAN_HEADER = 4
DEFAULT_SHAPES = ("llama2:1024:1:4096,llama2:1024:1:32768,llama2:1024:8:8192,"
                  "llama2:1024:32:16384,llama3:256:1:4096,llama3:256:8:8192,"
                  "llama2:1024:1:4096:int4:fp8,llama2:1024:32:16384:int4:fp8")


def plan_with_chunk(default_plan: torch.Tensor, seq_lens: list[int], tiles_per_split: int,
                    grid_parts: int) -> torch.Tensor | None:
    """The plan layout of csrc/core/split_plan.h with every sequence cut into splits of
    `tiles_per_split` tiles (None when that needs more parts than the decode grid has)."""
    plan = default_plan.clone().cpu()
    capacity, tile_tokens, _, batch = (int(v) for v in plan[:PLAN_HEADER])
    work = plan[PLAN_HEADER:PLAN_HEADER + 4 * capacity].view(capacity, 4)
    info = plan[PLAN_HEADER + 4 * capacity:].view(batch, 2)
    work[:, 0] = -1
    work[:, 1:] = 0
    part = 0
    for b, length in enumerate(seq_lens):
        tiles = math.ceil(length / tile_tokens)
        splits = max(1, math.ceil(tiles / tiles_per_split))
        if part + splits > grid_parts:
            return None
        info[b] = torch.tensor([part, splits])
        for s in range(splits):
            first = s * tiles_per_split
            work[part] = torch.tensor([b, first, min(first + tiles_per_split, tiles), length])
            part += 1
    plan[2] = part
    return plan.to(default_plan.device)


def sweep_shape(timer: Timer, spec: str, peak: float) -> list[dict]:
    parts = spec.split(":")
    name, D_c, B, S = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
    lname = parts[4] if len(parts) > 4 else "bf16"
    rname = parts[5] if len(parts) > 5 else "bf16"
    op, call, nbytes = profile_call(name, D_c, B, S, lname, rname)
    args, default_plan = call[:-1], call[-1]
    header = default_plan[:PLAN_HEADER].tolist()
    tile_tokens, used = header[1], header[2]
    # The decode grid and the merge's workspace cover target_parts + B parts, a bound the plan
    # does not record; the default plan's part count is within it, so no plan here uses more
    # (a plan with more parts would send the merge past its workspace).
    grid_parts = used
    reference, _ = op(*args, default_plan)
    tiles = math.ceil(S / tile_tokens)
    default_per_split = int(default_plan[PLAN_HEADER + 2] - default_plan[PLAN_HEADER + 1])
    rows = []
    candidates = sorted({default_per_split, *(2 ** k for k in range(1, 20) if 2 ** k <= tiles)})
    for per_split in candidates:
        plan = plan_with_chunk(default_plan, [S] * B, per_split, grid_parts)
        if plan is None:
            continue
        out, _ = op(*args, plan)
        diff = (out.float() - reference.float()).abs().max().item()
        us = timer(graphed(lambda: op(*args, plan)))["median_us"]
        row = dict(shape=spec, tiles_per_split=per_split, tile_tokens=tile_tokens,
                   parts=int(plan[2]), us=round(us, 2),
                   GBps=round(nbytes / us / 1e3, 1), peak_frac=round(nbytes / us / 1e3 /
                                                                      (peak / 1e9), 3),
                   default=per_split == default_per_split, max_abs_diff=diff)
        rows.append(row)
        print(f"{spec:32s} tiles/split {per_split:5d} parts {row['parts']:5d} "
              f"{us:8.1f} us {row['GBps']:7.0f} GB/s{'  (default plan)' if row['default'] else ''}",
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES,
                    help="comma-separated model:D_c:B:S[:latent[:rope]] (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for the JSON")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_split_plan.py times CUDA kernels: it needs a GPU")
    timer = Timer(warmup=3, repeat=30)
    peak = measure_peak_read_bandwidth(timer=timer)
    rows = []
    for spec in args.shapes.split(","):
        rows += sweep_shape(timer, spec, peak)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "split_plan_sweep.json"
    out.write_text(json.dumps({"metadata": {**metadata(), "hbm_read_GBps": peak / 1e9},
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
