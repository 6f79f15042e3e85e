"""Benchmark of the fused decode-time latent projection (mla_ext.ops.latent_project) against the
unfused sequence of torch ops it replaces: two matmuls, partial RoPE, quantization with torch ops,
and index_put writes into the paged cache.

    PYTHONPATH=$PWD python3 bench/bench_latent_project.py --out DIR [--quick]
    PYTHONPATH=$PWD python3 bench/bench_latent_project.py --check-only   # no GPU needed

At decode N (the batch) is small, so both sides are bound by reading the weights
(D_c + H_kv d_r) x d; 'effective GB/s' is the bytes the fused op must move (weights, x, cos/sin,
slots, cache rows written) over its time. Shapes: ARCHITECTURE.md section 1 at the default
d_kv = d_h / 4 and g = min(64, D_c). Outputs of both sides are compared before timing.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mla_ext import ops, reference


@dataclass(frozen=True)
class Shape:
    model: str
    d: int
    h_kv: int
    d_r: int
    d_c: int


SHAPES = [
    Shape("SmolLM2-135M", d=576, h_kv=3, d_r=8, d_c=48),
    Shape("Llama-2-7B", d=4096, h_kv=32, d_r=16, d_c=512),
    Shape("Llama-3-8B", d=4096, h_kv=8, d_r=16, d_c=256),
]
N_VALUES = (1, 8, 32, 64)
QUICK_N_VALUES = (1, 32)
# Cache dtype name -> (latent dtype, k_rope dtype). RoPE keys stay bf16 except in the fp8 cache.
CACHE_DTYPES = {
    "bf16": (torch.bfloat16, torch.bfloat16),
    "int8": (torch.int8, torch.bfloat16),
    "int4": (torch.uint8, torch.bfloat16),
    "fp8": (torch.float8_e4m3fn, torch.float8_e4m3fn),
}
X_DTYPE = torch.bfloat16
BLOCK_SIZE = 64


def group_size(shape: Shape) -> int:
    return min(64, shape.d_c)


def make_case(shape: Shape, n: int, cache_dtype: str, device, seed: int = 0):
    """Inputs and an empty cache (room for 4 N tokens, slots shuffled) for one configuration."""
    gen = torch.Generator().manual_seed(seed)
    latent_dtype, rope_dtype = CACHE_DTYPES[cache_dtype]
    d, r = shape.d, shape.d_r // 2
    x = torch.randn(n, d, generator=gen).to(X_DTYPE)
    w_down = (torch.randn(shape.d_c, d, generator=gen) / d**0.5).to(X_DTYPE)
    w_kr = (torch.randn(shape.h_kv * shape.d_r, d, generator=gen) / d**0.5).to(X_DTYPE)
    ang = torch.rand(n, shape.h_kv, r, generator=gen) * 100
    num_blocks = max(1, -(-4 * n // BLOCK_SIZE))
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:n]
    inputs = dict(x=x, w_down=w_down, w_kr=w_kr, b_kr=None, cos=ang.cos(), sin=ang.sin(),
                  slot_mapping=slots)
    inputs = {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}
    cache = make_cache(shape, num_blocks, latent_dtype, rope_dtype, device)
    return inputs, cache


def make_cache(shape: Shape, num_blocks: int, latent_dtype, rope_dtype, device):
    g = group_size(shape)
    quantized = latent_dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn)
    width = shape.d_c // 2 if latent_dtype == torch.uint8 else shape.d_c
    blocks = (num_blocks, BLOCK_SIZE)
    half = dict(dtype=torch.float16, device=device)
    return dict(
        latent=torch.zeros(*blocks, width, dtype=latent_dtype, device=device),
        latent_scale=torch.zeros(*blocks, shape.d_c // g, **half) if quantized else None,
        latent_zero=torch.zeros(*blocks, shape.d_c // g, **half)
        if latent_dtype == torch.uint8 else None,
        k_rope_cache=torch.zeros(*blocks, shape.h_kv, shape.d_r, dtype=rope_dtype,
                                 device=device),
        k_rope_scale=torch.zeros(*blocks, shape.h_kv, **half)
        if rope_dtype == torch.float8_e4m3fn else None)


def fused(inputs, cache):
    # The registered op itself: the wrapper's slot range check syncs with the host, which a
    # decode step (CUDA-graph captured) skips; the unfused side has no such check either.
    torch.ops.mla_ext.latent_project.default(*inputs.values(), *cache.values())


def unfused(inputs, cache):
    """The torch sequence the fused op replaces; no host syncs (every slot is valid)."""
    x, h_kv = inputs["x"], cache["k_rope_cache"].shape[2]
    d_r = cache["k_rope_cache"].shape[3]
    c = x @ inputs["w_down"].t()
    kr = x @ inputs["w_kr"].t()
    if inputs["b_kr"] is not None:
        kr = kr + inputs["b_kr"]
    kr = ops.partial_rope(kr.view(-1, h_kv, d_r), inputs["cos"], inputs["sin"])
    slots = inputs["slot_mapping"]
    blk, off = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    latent = cache["latent"]
    g = c.shape[-1] // cache["latent_scale"].shape[-1] if cache["latent_scale"] is not None \
        else c.shape[-1]
    q, scale, zero = reference.quantize_latent(c, latent.dtype, g)
    latent.index_put_((blk, off), q)
    if scale is not None:
        cache["latent_scale"].index_put_((blk, off), scale)
    if zero is not None:
        cache["latent_zero"].index_put_((blk, off), zero)
    k_q, k_scale = reference.quantize_k_rope(kr, cache["k_rope_cache"].dtype)
    cache["k_rope_cache"].index_put_((blk, off), k_q)
    if k_scale is not None:
        cache["k_rope_scale"].index_put_((blk, off), k_scale)


def bytes_moved(shape: Shape, n: int, cache: dict) -> dict:
    """Weight bytes, and every byte the fused op must read or write."""
    elt = torch.tensor([], dtype=X_DTYPE).element_size()
    weights = (shape.d_c + shape.h_kv * shape.d_r) * shape.d * elt
    per_token_cache = sum(t[0, 0].numel() * t.element_size() for t in cache.values()
                          if t is not None)
    angles = 2 * n * shape.h_kv * (shape.d_r // 2) * 4
    total = weights + n * shape.d * elt + angles + n * 8 + n * per_token_cache
    return {"weight_bytes": weights, "total_bytes": total}


def dequantized(cache: dict, slots: torch.Tensor):
    blk, off = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    rows = {k: (v[blk, off] if v is not None else None) for k, v in cache.items()}
    c = reference.dequantize_latent(rows["latent"], rows["latent_scale"], rows["latent_zero"])
    k = reference.dequantize_k_rope(rows["k_rope_cache"], rows["k_rope_scale"])
    return c, k


def check_case(shape: Shape, n: int, cache_dtype: str, device) -> float:
    """Run fused and unfused on the same inputs; raise if their dequantized caches disagree by
    more than two quantization steps (plus bf16 rounding). Returns the largest difference
    relative to the group amax."""
    inputs, cache_f = make_case(shape, n, cache_dtype, device)
    _, cache_u = make_case(shape, n, cache_dtype, device)
    fused(inputs, cache_f)
    unfused(inputs, cache_u)
    worst = 0.0
    for (a, b), group, steps in zip(
            zip(dequantized(cache_f, inputs["slot_mapping"]),
                dequantized(cache_u, inputs["slot_mapping"])),
            (group_size(shape), shape.d_r),
            (_steps(CACHE_DTYPES[cache_dtype][0]), _steps(CACHE_DTYPES[cache_dtype][1]))):
        ref = b.float().reshape(n, -1, group)
        amax = ref.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        rel = ((a.float().reshape(n, -1, group) - ref).abs() / amax).max().item() if n else 0.0
        limit = 2.0 / steps + 2.0**-6
        if rel > limit:
            raise AssertionError(f"{shape.model} N={n} {cache_dtype}: fused and unfused caches "
                                 f"differ by {rel:.3g} of the group amax (limit {limit:.3g})")
        worst = max(worst, rel)
    return worst


def _steps(dtype) -> float:
    """Quantization steps per group amax of a cache dtype (relative resolution)."""
    return {torch.int8: 127.0, torch.uint8: 7.5, torch.float8_e4m3fn: 16.0}.get(dtype, 256.0)


def configurations(quick: bool):
    n_values = QUICK_N_VALUES if quick else N_VALUES
    for shape in SHAPES:
        for n in n_values:
            for cache_dtype in CACHE_DTYPES:
                yield shape, n, cache_dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="directory of the JSON results (default bench/results)")
    p.add_argument("--quick", action="store_true",
                   help=f"N in {QUICK_N_VALUES} only and fewer timing repeats")
    p.add_argument("--check-only", action="store_true",
                   help="compare fused vs unfused outputs and exit, no timing (runs on CPU too)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def run_checks(args) -> None:
    for shape, n, cache_dtype in configurations(args.quick):
        worst = check_case(shape, n, cache_dtype, args.device)
        print(f"check {shape.model:13s} N={n:3d} {cache_dtype:5s} max diff "
              f"{worst:.3g} of group amax")


def run_bench(args) -> Path:
    from bench.common import Timer, write_results

    timer = Timer(warmup=3, repeat=20) if args.quick else Timer(warmup=10, repeat=100)
    rows = []
    print(f"{'model':13s} {'N':>3s} {'dtype':5s} {'fused us':>9s} {'unfused us':>10s} "
          f"{'speedup':>7s} {'weight MB':>9s} {'GB/s':>7s}")
    for shape, n, cache_dtype in configurations(args.quick):
        check_case(shape, n, cache_dtype, "cuda")
        inputs, cache = make_case(shape, n, cache_dtype, "cuda")
        t_fused = timer(lambda: fused(inputs, cache))["median_us"]
        t_unfused = timer(lambda: unfused(inputs, cache))["median_us"]
        moved = bytes_moved(shape, n, cache)
        row = {**asdict(shape), "N": n, "dtype": cache_dtype, "group_size": group_size(shape),
               "fused_us": t_fused, "unfused_us": t_unfused, "speedup": t_unfused / t_fused,
               **moved, "effective_GBps": moved["total_bytes"] / (t_fused * 1e-6) / 1e9}
        rows.append(row)
        print(f"{shape.model:13s} {n:3d} {cache_dtype:5s} {t_fused:9.2f} {t_unfused:10.2f} "
              f"{row['speedup']:7.2f} {moved['weight_bytes'] / 2**20:9.2f} "
              f"{row['effective_GBps']:7.1f}")
    path = write_results("latent_project", rows,
                         extra={"x_dtype": str(X_DTYPE), "block_size": BLOCK_SIZE},
                         out_dir=args.out)
    print(f"wrote {path}")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_only:
        run_checks(args)
        return 0
    if not torch.cuda.is_available():
        print("bench_latent_project: timing needs a CUDA device (use --check-only here)",
              file=sys.stderr)
        return 2
    if not ops.has_kernel("latent_project", "cuda"):
        print("bench_latent_project: mla_ext was built without the CUDA kernels",
              file=sys.stderr)
        return 2
    run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
