"""Benchmark of mla_decode (ARCHITECTURE 5.1) on the three models' shapes, against torch SDPA
decode over the original bf16 K/V cache and the PyTorch absorbed decode (dense einsum).
Every time is the median replay of a CUDA graph holding one call (a decode step is captured in
a graph in serving; eager launches add host time), L2 flushed before each; eager_us is the op
launched eagerly. timer_floor_us in the JSON is what the same timing gives a graph of one
one-element add: the part of a small time (B = 1) that is not the op's.

  python bench/bench_mla_decode.py [--quick] [--models llama3,llama2,smollm2] [--out DIR]

Writes DIR/decode_h200.json (default bench/results) and, when matplotlib is present, a PNG.
The kernel is timed with a split plan made once per step (as every layer of a step reuses it),
through torch.ops directly: the Python wrapper's range check syncs and is not part of the op.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (RESULTS, Timer, graphed, measure_peak_read_bandwidth,  # noqa: E402
                          measure_timer_floor, write_results)
from mla_ext import ops  # noqa: E402

# ARCHITECTURE.md section 1: H, H_kv, d_h, d_r (default r) and D_c for each d_kv.
MODELS = {
    "smollm2": dict(H=9, H_kv=3, d_h=64, d_r=8, D_c=(24, 48, 96)),
    "llama2": dict(H=32, H_kv=32, d_h=128, d_r=16, D_c=(512, 1024, 2048)),
    "llama3": dict(H=32, H_kv=8, d_h=128, d_r=16, D_c=(128, 256, 512)),
}
# --quick: the latent widths of the target shapes (Llama-2 d_kv = 16, Llama-3 d_kv = 32).
QUICK_D_C = {"smollm2": 48, "llama2": 512, "llama3": 256}
# --targets: the target shapes (every (B, S) of the Llama-2 and Llama-3 shapes) in their formats.
TARGET_DTYPES = {("bf16", "bf16"), ("int8", "bf16"), ("int4", "bf16"), ("int4", "fp8")}
BATCH_SEQ = [(1, 4096), (1, 32768), (1, 131072), (8, 8192), (32, 16384), (64, 4096)]
LATENT = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8,
          "int4": torch.uint8}
ROPE = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
BLOCK_SIZE = 64


def group_size(d_c: int) -> int:
    return min(64, d_c) if d_c % min(64, d_c) == 0 else d_c


def make_cache(B, S, H_kv, d_r, D_c, latent_dtype, rope_dtype):
    """Random cache in the stored formats (values need not come from a quantizer to be timed)."""
    nb_seq = (S + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = B * nb_seq
    dev = "cuda"
    width = D_c // 2 if latent_dtype == torch.uint8 else D_c
    shape = (num_blocks, BLOCK_SIZE, width)
    if latent_dtype in (torch.bfloat16, torch.float16):
        latent = torch.randn(shape, device=dev, dtype=latent_dtype)
    elif latent_dtype == torch.float8_e4m3fn:
        latent = torch.randn(shape, device=dev).mul_(50).to(latent_dtype)
    else:
        latent = torch.randint(-127 if latent_dtype == torch.int8 else 0, 127, shape, device=dev,
                               dtype=torch.int32).to(latent_dtype)
    scale = zero = None
    if latent_dtype not in (torch.bfloat16, torch.float16):
        g = group_size(D_c)
        scale = torch.rand(num_blocks, BLOCK_SIZE, D_c // g, device=dev, dtype=torch.float16) * 0.02
        if latent_dtype == torch.uint8:
            zero = -torch.rand_like(scale)
    kr = torch.randn(num_blocks, BLOCK_SIZE, H_kv, d_r, device=dev)
    k_scale = None
    if rope_dtype == torch.float8_e4m3fn:
        kr = kr.mul_(100).to(rope_dtype)
        k_scale = torch.full((num_blocks, BLOCK_SIZE, H_kv), 0.01, device=dev, dtype=torch.float16)
    else:
        kr = kr.to(rope_dtype)
    table = torch.randperm(num_blocks, device=dev, dtype=torch.int32).view(B, nb_seq)
    lens = torch.full((B,), S, device=dev, dtype=torch.int32)
    return latent, scale, zero, kr, k_scale, table, lens


def cache_bytes(B, S, tensors) -> int:
    """Bytes of the cache a decode step reads: every tensor's per-token bytes times B*S."""
    per_token = 0
    for t in tensors:
        if t is not None:
            per_token += t[0, 0].numel() * t.element_size()
    return B * S * per_token


def torch_absorbed(q_lat, q_rope, c, kr, scale):
    """The PyTorch path: dense absorbed decode. q_lat [B,H,D_c], q_rope [B,H,d_r],
    c [B,S,D_c] bf16, kr [B,S,H_kv,d_r] bf16."""
    B, H, _ = q_lat.shape
    H_kv = kr.shape[2]
    s = torch.einsum("bhc,bsc->bhs", q_lat, c).float()
    qr = q_rope.view(B, H_kv, H // H_kv, -1)
    s = s + torch.einsum("bkgr,bskr->bkgs", qr, kr).reshape(B, H, -1).float()
    p = torch.softmax(s * scale, dim=-1).to(c.dtype)
    return torch.einsum("bhs,bsc->bhc", p, c)


def parse_formats(text: str) -> set[tuple[str, str]]:
    """'bf16/bf16,int8/bf16' -> {("bf16", "bf16"), ("int8", "bf16")}"""
    formats = set()
    for item in text.split(","):
        lname, _, rname = item.partition("/")
        if lname not in LATENT or rname not in ROPE:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not LATENT/ROPE with LATENT in {sorted(LATENT)} and "
                f"ROPE in {sorted(ROPE)}")
        formats.add((lname, rname))
    return formats


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'32x16384,1x4096' -> [(32, 16384), (1, 4096)]"""
    shapes = []
    for item in text.split(","):
        try:
            B, S = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not BxS, e.g. 32x16384")
        if B < 1 or S < 1:
            raise argparse.ArgumentTypeError(f"{item!r} needs B and S of at least 1")
        shapes.append((B, S))
    return shapes


def parse_heads(text: str) -> tuple[int, ...]:
    """'16,64,128' -> (16, 64, 128)"""
    try:
        heads = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of head counts")
    if any(h < 1 for h in heads):
        raise argparse.ArgumentTypeError(f"{text!r}: head counts must be at least 1")
    return heads


def sdpa_decode_us(timer, B, S, H, H_kv, d_h) -> float | None:
    """torch SDPA decode on the original model's bf16 K/V cache (None: it does not fit)."""
    try:
        q = torch.randn(B, H, 1, d_h, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, H_kv, S, d_h, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        return timer(graphed(lambda: F.scaled_dot_product_attention(
            q, k, v, enable_gqa=H != H_kv)))["median_us"]
    except torch.OutOfMemoryError:
        return None


def kernel_does_not_apply(err: RuntimeError) -> bool:
    """The error of shapes the chosen kernel does not take (--kernel ws with fp8
    RoPE keys, ...): skipped with a note rather than ending the run."""
    return "does not apply" in str(err)


def report_timer_floor(timer) -> float:
    floor_us = measure_timer_floor(timer)
    print(f"timer floor (a graph of one one-element add, L2 flushed): {floor_us:.1f} us",
          flush=True)
    return floor_us


def save_results(args, rows, notes, peak, floor_us, *, partial: bool):
    return write_results("decode_h200", rows, extra={
        "peak_read_GBps": round(peak / 1e9, 1), "timer_floor_us": round(floor_us, 2),
        "notes": notes, "quick": args.quick,
        "targets": args.targets, "partial": partial, "l2_flush": args.flush,
        "kernel": args.kernel},
        out_dir=args.out)


def run(args):
    timer = Timer(warmup=3, repeat=args.repeat, flush=args.flush)
    peak = measure_peak_read_bandwidth(timer=timer)
    print(f"measured peak read bandwidth: {peak / 1e9:.0f} GB/s", flush=True)
    floor_us = report_timer_floor(timer)
    rows, notes = [], []
    models = args.models.split(",")
    for name in models:
        m = MODELS[name]
        H, H_kv, d_h, d_r = m["H"], m["H_kv"], m["d_h"], m["d_r"]
        d_cs = (QUICK_D_C[name],) if args.quick or args.targets else m["D_c"]
        batch_seq = args.shapes or ([(1, 4096), (32, 16384)] if args.quick else BATCH_SEQ)
        for B, S in batch_seq:
            sdpa_us = None
            if args.baselines:
                sdpa_start = time.perf_counter()
                sdpa_us = sdpa_decode_us(timer, B, S, H, H_kv, d_h)
                if sdpa_us is None:
                    notes.append(f"{name} B={B} S={S}: SDPA K/V cache does not fit, skipped")
                else:
                    print(f"{name:8s} B={B:3d} S={S:6d} torch SDPA on the original cache: "
                          f"{sdpa_us:.1f} us ({time.perf_counter() - sdpa_start:.1f} s)",
                          flush=True)
            torch.cuda.empty_cache()
            for D_c in d_cs:
                scale = 1.0 / math.sqrt(d_h)
                q_lat = torch.randn(B, 1, H, D_c, device="cuda", dtype=torch.bfloat16)
                q_rope = torch.randn(B, 1, H, d_r, device="cuda", dtype=torch.bfloat16)
                torch_us, checked = None, False
                for lname, ldt in LATENT.items():
                    if args.quick and lname not in ("bf16", "int4"):
                        continue
                    for rname, rdt in ROPE.items():
                        if args.targets and (lname, rname) not in TARGET_DTYPES:
                            continue
                        if args.formats and (lname, rname) not in args.formats:
                            continue
                        row_start = time.perf_counter()
                        try:
                            cache = make_cache(B, S, H_kv, d_r, D_c, ldt, rdt)
                        except torch.OutOfMemoryError:
                            notes.append(f"{name} D_c={D_c} B={B} S={S} {lname}/{rname}: "
                                         "cache does not fit, skipped")
                            torch.cuda.empty_cache()
                            continue
                        latent, ls, lz, kr, ks, table, lens = cache
                        call = (q_lat, q_rope, latent, ls, lz, kr, ks, table, lens, scale)
                        try:
                            plan = ops.mla_decode_plan(q_lat, latent, ls, kr, lens)
                        except RuntimeError as e:
                            if not kernel_does_not_apply(e):
                                raise
                            notes.append(f"{name} D_c={D_c} {lname}/{rname}: {e}".splitlines()[0])
                            del cache, latent, ls, lz, kr, ks, call
                            continue
                        op = torch.ops.mla_ext.mla_decode.default
                        if lname == "bf16" and rname == "bf16":
                            # Dense copies for the PyTorch path; outputs compared before timing.
                            c_dense = latent[table.long()].reshape(B, -1, D_c)[:, :S]
                            kr_dense = kr[table.long()].reshape(B, -1, H_kv, d_r)[:, :S]
                            try:
                                ref = torch_absorbed(q_lat[:, 0], q_rope[:, 0], c_dense, kr_dense,
                                                     scale)
                                out = op(*call, plan)[0][:, 0]
                                cos = F.cosine_similarity(out.float().flatten(),
                                                          ref.float().flatten(), dim=0).item()
                                assert cos > 0.999, f"kernel disagrees with PyTorch path: cos {cos}"
                                checked = True
                                if args.baselines:
                                    torch_us = timer(graphed(lambda: torch_absorbed(
                                        q_lat[:, 0], q_rope[:, 0], c_dense, kr_dense,
                                        scale)))["median_us"]
                            except torch.OutOfMemoryError:
                                notes.append(f"{name} D_c={D_c} B={B} S={S}: PyTorch path "
                                             "does not fit, skipped")
                            del c_dense, kr_dense
                            torch.cuda.empty_cache()
                        eager_us = timer(lambda: op(*call, plan))["median_us"]
                        t = timer(graphed(lambda: op(*call, plan)))["median_us"]
                        nbytes = cache_bytes(B, S, (latent, ls, lz, kr, ks))
                        gbps = nbytes / (t * 1e-6) / 1e9
                        row = dict(model=name, H=H, H_kv=H_kv, d_r=d_r, D_c=D_c, B=B, S=S,
                                   latent=lname, rope=rname, median_us=round(t, 2),
                                   eager_us=round(eager_us, 2),
                                   cache_bytes=nbytes, GBps=round(gbps, 1),
                                   frac_peak=round(gbps * 1e9 / peak, 3),
                                   sdpa_us=sdpa_us and round(sdpa_us, 2),
                                   speedup_vs_sdpa=sdpa_us and round(sdpa_us / t, 2),
                                   torch_us=torch_us and round(torch_us, 2),
                                   speedup_vs_torch=torch_us and round(torch_us / t, 2),
                                   checked_vs_torch=checked, kernel=args.kernel,
                                   tile_tokens=int(plan[1]))
                        rows.append(row)
                        if args.out_partial:  # a run cut by a time limit keeps its rows
                            save_results(args, rows, notes, peak, floor_us, partial=True)
                        print(f"{name:8s} D_c={D_c:5d} B={B:3d} S={S:6d} {lname:4s}/{rname:4s} "
                              f"{t:9.1f} us {nbytes / 2**20:9.1f} MiB {gbps:7.0f} GB/s "
                              f"{row['frac_peak']:5.2f} peak  x{row['speedup_vs_sdpa']} sdpa  "
                              f"x{row['speedup_vs_torch']} torch  "
                              f"({time.perf_counter() - row_start:.1f} s)", flush=True)
                        del cache, latent, ls, lz, kr, ks, call, plan
                        torch.cuda.empty_cache()
    return rows, notes, peak, floor_us


PROFILE_SHAPES = [  # (model, D_c, B, S, latent, rope)
    ("llama2", 512, 1, 4096, "bf16", "bf16"),
    ("llama2", 512, 32, 16384, "bf16", "bf16"),
    ("llama2", 512, 32, 16384, "int4", "fp8"),
    ("llama3", 256, 32, 16384, "bf16", "bf16"),
    ("llama3", 256, 32, 16384, "int8", "bf16"),
    ("llama3", 256, 1, 4096, "bf16", "bf16"),
]


def profile_call(name, D_c, B, S, lname, rname):
    """One PROFILE_SHAPES row ready to run: the op, its arguments with a plan, and the bytes."""
    m = MODELS[name]
    H, H_kv, d_r = m["H"], m["H_kv"], m["d_r"]
    latent, ls, lz, kr, ks, table, lens = make_cache(B, S, H_kv, d_r, D_c, LATENT[lname],
                                                     ROPE[rname])
    q_lat = torch.randn(B, 1, H, D_c, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(B, 1, H, d_r, device="cuda", dtype=torch.bfloat16)
    call = (q_lat, q_rope, latent, ls, lz, kr, ks, table, lens, 1.0 / math.sqrt(128))
    plan = ops.mla_decode_plan(q_lat, latent, ls, kr, lens)
    return torch.ops.mla_ext.mla_decode.default, (*call, plan), cache_bytes(
        B, S, (latent, ls, lz, kr, ks))


def profile(args):
    """Where the time goes: device time of each kernel (torch.profiler), the op timed eagerly
    and as a replayed CUDA graph (their difference is host overhead), and the launch grid.
    With --ncu, each shape runs exactly once (for Nsight Compute's kernel filter)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    timer = Timer(warmup=3, repeat=args.repeat, flush=args.flush)
    if not args.ncu:
        report_timer_floor(timer)
    for shape in PROFILE_SHAPES:
        try:
            op, call, nbytes = profile_call(*shape)
        except RuntimeError as e:
            if not kernel_does_not_apply(e):
                raise
            print(f"SKIP {shape}: {str(e).splitlines()[0]}", flush=True)
            continue
        if args.ncu:
            op(*call)
            torch.cuda.synchronize()
            print(f"NCU {shape}: {nbytes / 2**20:.0f} MiB, floor {nbytes / 4.3e12 * 1e6:.1f} us",
                  flush=True)
            continue
        eager = timer(lambda: op(*call))["median_us"]
        replay = timer(graphed(lambda: op(*call)))["median_us"]
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                op(*call)
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
            if t and e.count:
                kernels[e.key[:60]] = (round(t, 1), e.count)
        plan = call[-1]
        print(f"PROFILE {shape}: {nbytes / 2**20:.0f} MiB, floor {nbytes / 4.3e12 * 1e6:.1f} us; "
              f"eager {eager:.1f} us, graph {replay:.1f} us, parts used {int(plan[2])}, "
              f"tile {int(plan[1])}", flush=True)
        for k, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0]):
            print(f"    {t:9.1f} us avg x{n:3d}  {k}", flush=True)
        del op, call
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="one D_c per model, two (B, S), two dtypes")
    ap.add_argument("--targets", action="store_true",
                    help="the target latent width of each model, every (B, S), the target formats")
    ap.add_argument("--models", default="smollm2,llama2,llama3")
    ap.add_argument("--formats", type=parse_formats, default=None,
                    help="only these LATENT/ROPE formats, comma-separated (e.g. bf16/bf16,int8/bf16)")
    ap.add_argument("--shapes", type=parse_shapes, default=None,
                    help="only these BxS, comma-separated (e.g. 32x16384,1x4096)")
    ap.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                    help="time torch SDPA and the PyTorch absorbed decode for the speedup "
                         "columns (--no-baselines: kernel times only, for quick sweeps; the "
                         "output is still checked against the PyTorch path)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--flush", choices=Timer.FLUSHES, default="write",
                    help="how L2 is emptied before each timed call: zeroing a 256 MiB buffer "
                         "(write: its dirty lines are written back during the call) or summing "
                         "it (read: clean lines only)")
    ap.add_argument("--out-partial", action="store_true",
                    help="rewrite the JSON after every row (for runs under a time limit)")
    ap.add_argument("--kernel", choices=ops.DECODE_KERNELS, default="auto",
                    help="which decode kernel (mla_ext.ops.set_decode_kernel): the default "
                         "choice (the warp-specialized one where it applies, else mma.sync), "
                         "the mma.sync one or the warp-specialized one (shapes a forced kernel "
                         "does not take are skipped, with a note); each row records the plan's "
                         "tile (64 tokens: ws, 16 or 32: mma)")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of a few shapes")
    ap.add_argument("--ncu", action="store_true",
                    help="with --profile: run each shape once, for ncu -k regex:mla_decode_kernel")
    ap.add_argument("--vs-flashmla", action="store_true",
                    help="time FlashMLA's dense decode and this one on DeepSeek's shape (H_kv = "
                         "1, D_c = 512, d_r = 64, bf16) on identical cache contents "
                         "(bench/vs_flashmla.py; --shapes replaces its (B, S))")
    ap.add_argument("--vs-heads", type=parse_heads, default=(16, 64, 128),
                    help="with --vs-flashmla: the query head counts, comma-separated")
    ap.add_argument("--flashmla-path", default="/tmp/flashmla",
                    help="with --vs-flashmla: the folder FlashMLA was built in "
                         "(bash bench/run_h200.sh flashmla)")
    args = ap.parse_args()
    ops.set_decode_kernel(args.kernel)
    if args.vs_flashmla:
        from bench.vs_flashmla import run_vs_flashmla
        print(f"wrote {run_vs_flashmla(args)}")
        return
    if args.profile:
        profile(args)
        return
    rows, notes, peak, floor_us = run(args)
    path = save_results(args, rows, notes, peak, floor_us, partial=False)
    print(f"wrote {path}")
    try:
        from bench.plot import plot
        print(f"wrote {plot(path)}")
    except ImportError as e:
        print(f"no plot ({e})")


if __name__ == "__main__":
    main()
