"""mla_decode against FlashMLA's dense decode on DeepSeek's MLA shape, in one run
(`python bench/bench_mla_decode.py --vs-flashmla`).

DeepSeek's shape is mla_ext's with one KV head: D_c = 512, d_r = 64 (one RoPE key shared by all
query heads), pages of 64 tokens, bf16. Both kernels read the same cache contents: FlashMLA's
k_cache [blocks, 64, 1, 576] holds each token's latent then its RoPE key, mla_ext's holds the two
apart (latent [blocks, 64, 512], k_rope_cache [blocks, 64, 1, 64]); the same block table and
lengths address both. Queries likewise: [B, 1, H, 576] against q_lat and q_rope. Each row times
both as CUDA-graph replays with the L2 flushed (bench/common.py's Timer), compares the outputs
and writes bench/results/vs_flashmla_<gpu>.json.

FlashMLA is a benchmark dependency only (never imported by mla_ext): build it from the anchor
sources with `bash bench/run_h200.sh flashmla` (bench/run_h200.sh says where the sources go);
--flashmla-path names the folder holding the built flash_mla package.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

HEADS = (16, 64, 128)
BATCH_SEQ = ((1, 4096), (8, 8192), (32, 16384), (64, 4096))
D_C, D_R, PAGE = 512, 64, 64
DEFAULT_FLASHMLA_PATH = "/tmp/flashmla"


def flashmla_cache(latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """mla_ext's cache (latent [N, P, D_c], k_rope [N, P, 1, d_r]) as FlashMLA's k_cache
    [N, P, 1, D_c + d_r]: each token's latent, then its RoPE key."""
    if k_rope.dim() != 4 or k_rope.shape[2] != 1:
        raise ValueError(f"k_rope must be [blocks, page, 1, d_r] (one KV head), got "
                         f"{tuple(k_rope.shape)}")
    if latent.shape[:2] != k_rope.shape[:2] or latent.dtype != k_rope.dtype:
        raise ValueError(f"latent {tuple(latent.shape)} {latent.dtype} and k_rope "
                         f"{tuple(k_rope.shape)} {k_rope.dtype} must share blocks, page and dtype")
    return torch.cat([latent, k_rope[:, :, 0]], dim=-1).unsqueeze(2)


def flashmla_query(q_lat: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
    """q_lat [B, s_q, H, D_c] and q_rope [B, s_q, H, d_r] as FlashMLA's q [B, s_q, H, D_c + d_r]."""
    return torch.cat([q_lat, q_rope], dim=-1)


def rel_max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| over max |theirs|."""
    diff = (ours.float() - theirs.float()).abs().max().item()
    return diff / max(theirs.float().abs().max().item(), 1e-30)


def import_flash_mla(path: str):
    """FlashMLA's Python interface from the folder it was built in, or an error saying how to
    build it."""
    sys.path.insert(0, str(path))
    try:
        import flash_mla
    except ImportError as e:
        raise SystemExit(
            f"--vs-flashmla needs FlashMLA built in {path} (--flashmla-path): copy the anchor "
            f"sources into .anchors/ and run `bash bench/run_h200.sh flashmla` ({e})") from None
    return flash_mla


def make_row_inputs(B: int, S: int, H: int, seed: int = 0):
    """Random queries and a paged cache of B sequences of S tokens in mla_ext's layout."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = -(-S // PAGE)
    num_blocks = B * blocks_per_seq
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    latent = torch.randn(num_blocks, PAGE, D_C, **kw)
    k_rope = torch.randn(num_blocks, PAGE, 1, D_R, **kw)
    q_lat = torch.randn(B, 1, H, D_C, **kw)
    q_rope = torch.randn(B, 1, H, D_R, **kw)
    table = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    table = table.view(B, blocks_per_seq)
    lens = torch.full((B,), S, device="cuda", dtype=torch.int32)
    return q_lat, q_rope, latent, k_rope, table, lens


def run_vs_flashmla(args) -> Path:
    from bench.common import RESULTS, Timer, graphed, measure_peak_read_bandwidth, metadata
    from mla_ext import ops

    flash_mla = import_flash_mla(args.flashmla_path)
    timer = Timer(warmup=3, repeat=args.repeat, flush=args.flush)
    peak = measure_peak_read_bandwidth(timer=timer)
    print(f"measured peak read bandwidth: {peak / 1e9:.0f} GB/s", flush=True)
    scale = 1.0 / math.sqrt(128 + D_R)  # DeepSeek-V2/V3's q-k head width
    rows = []
    for H in args.vs_heads:
        for B, S in args.shapes or BATCH_SEQ:
            start = time.perf_counter()
            q_lat, q_rope, latent, k_rope, table, lens = make_row_inputs(B, S, H)
            call = (q_lat, q_rope, latent, None, None, k_rope, None, table, lens, scale)
            plan = ops.mla_decode_plan(q_lat, latent, None, k_rope, lens)
            op = torch.ops.mla_ext.mla_decode.default
            k_cache = flashmla_cache(latent, k_rope)
            q = flashmla_query(q_lat, q_rope)
            meta, splits = flash_mla.get_mla_metadata(lens, q.shape[1] * H, 1)

            def theirs():
                return flash_mla.flash_mla_with_kvcache(q, k_cache, table, lens, D_C, meta,
                                                        splits, softmax_scale=scale, causal=False)

            o_ours = op(*call, plan)[0]
            o_theirs = theirs()[0]
            diff = rel_max_diff(o_ours, o_theirs)
            ours_us = timer(graphed(lambda: op(*call, plan)))["median_us"]
            theirs_us = timer(graphed(theirs))["median_us"]
            nbytes = B * S * (D_C + D_R) * 2  # the cache read once, by either kernel
            row = dict(H=H, B=B, S=S, ours_us=round(ours_us, 2), flashmla_us=round(theirs_us, 2),
                       ours_GBps=round(nbytes / ours_us / 1e3, 1),
                       flashmla_GBps=round(nbytes / theirs_us / 1e3, 1),
                       rel_max_diff=float(f"{diff:.3g}"))
            rows.append(row)
            print(f"H={H:3d} B={B:3d} S={S:6d} ours {ours_us:8.1f} us ({row['ours_GBps']:6.0f} "
                  f"GB/s)  FlashMLA {theirs_us:8.1f} us ({row['flashmla_GBps']:6.0f} GB/s)  "
                  f"x{ours_us / theirs_us:.2f}  rel diff {diff:.2g}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            del q_lat, q_rope, latent, k_rope, table, lens, call, plan, k_cache, q, o_ours, o_theirs
            torch.cuda.empty_cache()
    info = dict(metadata(), command="python " + " ".join(sys.argv),
                peak_read_GBps=round(peak / 1e9, 1), l2_flush=args.flush,
                kernel=ops.get_decode_kernel(),
                shape=dict(H_kv=1, D_c=D_C, d_r=D_R, page=PAGE, dtype="bf16"))
    path = Path(args.out or RESULTS) / f"vs_flashmla_{gpu_tag(info['gpu'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metadata": info, "rows": rows}, indent=1))
    return path


def gpu_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the file name's part for the GPU."""
    for word in name.split():
        if any(c.isdigit() for c in word) and word[0].isalpha():
            return word.lower()
    return name.split()[-1].lower()
