"""latent_project (fused projection + partial RoPE + quantize + cache write) against
reference.latent_project, on poisoned paged caches of every format.

The CPU kernel takes the reference's own steps, so it must match bit for bit (up to counted
rounding ties). The CUDA kernel sums in another order, so c and k_r may land one rounding of x's
dtype apart before quantization; its cache is compared dequantized, with a bound made of that
accumulation difference plus the quantization error of both sides, and most codes must still be
identical."""
import random

import pytest
import torch
from torch.library import opcheck

from cache_testing import (FLOAT_DTYPES, LATENT_DTYPES, ROPE_DTYPES, CacheConfig,
                           assert_cache_matches, assert_untouched, clone_cache,
                           dequant_error_bound, isclose_report, make_cache, random_cache_config,
                           random_slots, replace_arg, written_mask)
from mla_ext import ops, reference

D_CHOICES = [8, 37, 64, 100, 256, 576, 1024, 4096]
N_CHOICES = [0, 1, 1, 2, 3, 7, 8, 9, 16, 33, 64, 100]
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-23}


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_inputs(rng, gen, n, d, cfg, dtype, device, *, bias, angle_dtype, misaligned):
    """x, w_down, w_kr, b_kr, cos, sin with unit-scale outputs; some rows of x are zero (all-zero
    groups) and some scaled up/down. misaligned: x is an offset, strided view (no 16-byte loads)."""
    x = torch.randn(n, d, generator=gen)
    if n:
        x *= torch.exp2(torch.randint(-3, 4, (n, 1), generator=gen).float())
        x[torch.rand(n, generator=gen) < 0.1] = 0
    w_down = torch.randn(cfg.d_c, d, generator=gen) / d**0.5
    w_kr = torch.randn(cfg.h_kv * cfg.d_r, d, generator=gen) / d**0.5
    b_kr = torch.randn(cfg.h_kv * cfg.d_r, generator=gen) if bias else None
    ang = torch.rand(n, cfg.h_kv, cfg.d_r // 2, generator=gen) * 100
    to = lambda t: t.to(dtype).to(device) if t is not None else None  # noqa: E731
    x, w_down, w_kr, b_kr = to(x), to(w_down), to(w_kr), to(b_kr)
    if misaligned:
        wide = torch.zeros(n, d + 3, dtype=dtype, device=device)
        wide[:, 1:d + 1] = x
        x = wide[:, 1:d + 1]
    cos = ang.cos().to(angle_dtype).to(device)
    sin = ang.sin().to(angle_dtype).to(device)
    return x, w_down, w_kr, b_kr, cos, sin


def random_project_case(seed, device, *, max_d=4096, max_d_c=2048, latent_dtype=None,
                        rope_dtype=None, n=None, d=None):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n = rng.choice(N_CHOICES) if n is None else n
    d = rng.choice([v for v in D_CHOICES if v <= max_d]) if d is None else d
    cfg = random_cache_config(rng, n, max_d_c=max_d_c, latent_dtype=latent_dtype,
                              rope_dtype=rope_dtype)
    dtype = rng.choice(FLOAT_DTYPES)
    inputs = make_inputs(rng, gen, n, d, cfg, dtype, device, bias=rng.random() < 0.5,
                         angle_dtype=rng.choice([torch.float32, dtype]),
                         misaligned=rng.random() < 0.15)
    slots = random_slots(n, cfg.capacity, gen).to(device)
    return cfg, inputs, slots, f"seed {seed} {cfg} n={n} d={d} x {dtype}"


def run_exact(seed, device, **kw):
    cfg, inputs, slots, what = random_project_case(seed, device, **kw)
    initial = make_cache(cfg, device)
    got, want = clone_cache(initial), clone_cache(initial)
    ops.latent_project(*inputs, slots, *got)
    reference.latent_project(*inputs, slots, *want)
    return assert_cache_matches(got, want, slots, initial, what)


def run_tolerant(seed, device, **kw):
    """Kernel vs reference when their fp32 sums may differ in order (CUDA)."""
    cfg, inputs, slots, what = random_project_case(seed, device, **kw)
    compare_tolerant(cfg, inputs, slots, what)


def compare_tolerant(cfg, inputs, slots, what):
    x, w_down, w_kr, b_kr, cos, sin = inputs
    device = x.device
    initial = make_cache(cfg, device)
    got, want = clone_cache(initial), clone_cache(initial)
    ops.latent_project(*inputs, slots, *got)
    reference.latent_project(*inputs, slots, *want)
    assert_untouched(got, initial, slots, what)
    keep = slots >= 0
    if not int(keep.sum()):
        return
    blk, off = slots[keep] // cfg.block_size, slots[keep] % cfg.block_size
    rows = lambda t: None if t is None else t[blk, off]  # noqa: E731
    eps = EPS[x.dtype]
    d = x.shape[1]
    # Two fp32 sums of the same d products differ by at most ~2 d 2^-24 sum |products|.
    mag_c = x[keep].float().abs() @ w_down.float().abs().t()
    mag_k = x[keep].float().abs() @ w_kr.float().abs().t()
    acc_c = 2 * d * 2.0**-24 * mag_c
    c_ref = (x[keep].float() @ w_down.float().t()).to(x.dtype).float()
    deq_got = reference.dequantize_latent(rows(got[0]), rows(got[1]), rows(got[2]))
    deq_want = reference.dequantize_latent(rows(want[0]), rows(want[1]), rows(want[2]))
    quant = dequant_error_bound(c_ref, cfg.latent_dtype, cfg.group)
    bound = acc_c + 2 * eps * c_ref.abs() + 2 * quant + 2.0**-24
    isclose_report(deq_got, deq_want, bound, what + " latent")

    # k_r: the sums and the rounding before RoPE may differ; the rotation mixes x1 and x2 of a
    # head, so bound per head by its largest input.
    kr_ref = reference.partial_rope(
        ((x[keep].float() @ w_kr.float().t())
         + (b_kr.float() if b_kr is not None else 0)).to(x.dtype).view(-1, cfg.h_kv, cfg.d_r),
        cos[keep], sin[keep]).float()
    head_in = (mag_k + (b_kr.float().abs() if b_kr is not None else 0)).view(-1, cfg.h_kv, cfg.d_r)
    head_in = head_in.amax(-1, keepdim=True)
    acc_k = 2 * d * 2.0**-24 * head_in
    kq = dequant_error_bound(kr_ref.flatten(0, 1), cfg.rope_dtype, cfg.d_r).view_as(kr_ref)
    kbound = 2 * acc_k + 4 * eps * head_in + 2 * eps * kr_ref.abs() + 2 * kq + 2.0**-24
    k_got = reference.dequantize_k_rope(rows(got[3]), rows(got[4]))
    k_want = reference.dequantize_k_rope(rows(want[3]), rows(want[4]))
    isclose_report(k_got, k_want, kbound, what + " k_rope")

    # Most codes must be the very same (a tie or a one-ulp sum difference moves a few).
    for name, g, w in (("latent", got[0], want[0]), ("k_rope_cache", got[3], want[3])):
        if x.dtype == torch.float32 and g.dtype == torch.float32:
            continue  # unrounded fp32 sums of another order differ in their last bits
        mask = written_mask(slots, g)
        gr, wr = g.flatten(0, 1).cpu()[mask], w.flatten(0, 1).cpu()[mask]
        same = (gr.view(torch.uint8) == wr.view(torch.uint8)).float().mean().item() \
            if gr.element_size() == 1 else (gr == wr).float().mean().item()
        assert same >= 0.9, f"{what}: only {same:.1%} of {name} values equal the reference's"


# ---------------------------------------------------------------- CPU

@pytest.mark.parametrize("seed", range(60))
def test_latent_project_matches_reference(seed):
    run_exact(seed, "cpu", max_d=576, max_d_c=512)


@pytest.mark.parametrize("latent_dtype", LATENT_DTYPES)
@pytest.mark.parametrize("rope_dtype", ROPE_DTYPES)
def test_latent_project_every_format(latent_dtype, rope_dtype):
    run_exact(500, "cpu", latent_dtype=latent_dtype, rope_dtype=rope_dtype, n=9, d=64,
              max_d_c=256)


def small_project_case(device, latent_dtype=torch.uint8, rope_dtype=torch.float8_e4m3fn,
                       dtype=torch.bfloat16, n=5, d=40):
    cfg = CacheConfig(num_blocks=4, block_size=16, d_c=48, h_kv=3, d_r=8,
                      latent_dtype=latent_dtype, rope_dtype=rope_dtype, group=16)
    gen = torch.Generator().manual_seed(0)
    inputs = make_inputs(random.Random(0), gen, n, d, cfg, dtype, device, bias=True,
                         angle_dtype=torch.float32, misaligned=False)
    slots = torch.tensor([3, -1, 17, 40, 63][:n], device=device)
    return cfg, inputs, slots, make_cache(cfg, device, poison=False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("latent_dtype, rope_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.int8, torch.float32),
    (torch.uint8, torch.float8_e4m3fn)])
def test_latent_project_opcheck(device, latent_dtype, rope_dtype):
    _, inputs, slots, cache = small_project_case(device, latent_dtype, rope_dtype)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    if rope_dtype == torch.float8_e4m3fn:
        utils = utils[1:]  # the schema test's value comparison lacks fp8 arithmetic on the CPU
    opcheck(torch.ops.mla_ext.latent_project.default, (*inputs, slots, *cache), test_utils=utils)


def test_latent_project_without_tokens_and_all_skipped():
    cfg, inputs, slots, cache = small_project_case("cpu")
    before = clone_cache(cache)
    ops.latent_project(*inputs, torch.full_like(slots, -1), *cache)
    assert_untouched(cache, before, torch.full_like(slots, -1), "all skipped")
    empty = [t[:0] if t is not None and t.dim() and t.shape[0] == 5 else t for t in inputs]
    ops.latent_project(*empty, slots[:0], *cache)
    assert_untouched(cache, before, slots[:0], "no tokens")


def _bad_project_cases():
    X, WD, WK, B, COS, SIN, SLOTS, LAT, SC, ZR, KR, KS = range(12)
    return [
        (replace_arg(X, lambda t: t.int()), "x must have dtype"),
        (replace_arg(X, lambda t: t[0]), "x must have 2 dims"),
        (replace_arg(WD, lambda t: t[:40]), r"w_down must have shape \(D_c, d\) = \(48, 40\)"),
        (replace_arg(WD, lambda t: t[:, :39].contiguous()), "w_down must have shape"),
        (replace_arg(WD, lambda t: t.float()), "w_down must have x's dtype"),
        (replace_arg(WK, lambda t: t[:16]), r"w_kr must have shape \(H_kv \* d_r, d\) = \(24, 40\)"),
        (replace_arg(WK, lambda t: t.half()), "w_kr must have x's dtype"),
        (replace_arg(WD, lambda t: t.t().contiguous().t()), "w_down must be contiguous"),
        (replace_arg(B, lambda t: t[:20]), "b_kr must have shape"),
        (replace_arg(B, lambda t: t.float()), "b_kr must have x's dtype"),
        (replace_arg(COS, lambda t: t[:, :, :3].contiguous()), "cos must have shape"),
        (replace_arg(SIN, lambda t: t[:4].contiguous()), "sin must have shape"),
        (replace_arg(SIN, lambda t: t.half()), "cos and sin must have the same dtype"),
        (replace_arg(SLOTS, lambda t: t.int()), "slot_mapping must have dtype Long"),
        (replace_arg(SLOTS, lambda t: torch.tensor([3, -1, 17, 40, 64])), r"slot_mapping\[4\] = 64"),
        (replace_arg(SC, None), "latent_scale is required"),
        (replace_arg(ZR, None), "latent_zero is required for a int4"),
        (replace_arg(KS, None), "k_rope_scale is required"),
        (replace_arg(KR, lambda t: t[..., :6].contiguous()), "w_kr must have shape"),
        (replace_arg(KR, lambda t: t[:, :, :2].contiguous()), "k_rope_scale must have shape"),
        (replace_arg(LAT, lambda t: t[..., :12].contiguous()), "w_down must have shape"),
    ]


@pytest.mark.parametrize("bad, match", _bad_project_cases())
def test_latent_project_rejects_bad_input(bad, match):
    _, inputs, slots, cache = small_project_case("cpu")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mla_ext.latent_project(*bad((*inputs, slots, *cache)))


def test_latent_project_wrapper_checks_slots():
    _, inputs, _, cache = small_project_case("cpu")
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.latent_project(*inputs, torch.tensor([0, 1, 2, 3, 64]), *cache)


# ---------------------------------------------------------------- CUDA

GPU_PROJECT_SEEDS = range(40_000, 40_200)
# On Hopper the kernel splits d over a thread-block cluster when there are few slices; a cap of
# 1 forces the single-CTA path, so one GPU run tests both.
SPLIT_CAPS = ["1", "8"]


@pytest.mark.gpu
@pytest.mark.parametrize("max_split", SPLIT_CAPS)
def test_latent_project_cuda_matches_reference(max_split, monkeypatch):
    monkeypatch.setenv("MLA_EXT_LATENT_PROJECT_MAX_SPLIT", max_split)
    for seed in GPU_PROJECT_SEEDS:
        run_tolerant(seed, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("latent_dtype", LATENT_DTYPES)
@pytest.mark.parametrize("rope_dtype", ROPE_DTYPES)
@pytest.mark.parametrize("n", [1, 8, 13])
def test_latent_project_cuda_every_format(latent_dtype, rope_dtype, n):
    run_tolerant(50_000 + n, "cuda", latent_dtype=latent_dtype, rope_dtype=rope_dtype, n=n,
                 d=576)


# Geometries that take the kernel's less common paths: one wide group (opt-in shared memory,
# 8-token chunks falling back to 1 when even that does not fit), several groups per CTA (more
# groups than 2 x SMs), odd int4 groups (a CTA must own whole bytes), more KV heads than 2 x SMs,
# d not a multiple of the vector width, the model shapes of the benchmark.
SPECIAL = [
    # (d_c, group, h_kv, d_r, d, n, latent_dtype)
    (2048, 2048, 1, 8, 256, 9, torch.int8),
    (8192, 8192, 1, 8, 128, 3, torch.float8_e4m3fn),
    (4096, 8, 2, 16, 64, 17, torch.uint8),
    (4096, 8, 2, 16, 64, 17, torch.int8),
    (1800, 3, 2, 8, 64, 9, torch.uint8),
    (1800, 3, 2, 8, 64, 9, torch.int8),
    (600, 25, 3, 8, 40, 5, torch.uint8),
    (96, 8, 300, 8, 64, 3, torch.float8_e4m3fn),
    (40, 8, 600, 16, 24, 2, torch.bfloat16),
    (48, 16, 3, 8, 576, 64, torch.uint8),
    (512, 64, 32, 16, 4096, 1, torch.int8),
    (256, 64, 8, 16, 4096, 32, torch.float8_e4m3fn),
    (512, 64, 32, 16, 4095, 8, torch.bfloat16),
    (4096, 64, 1, 8, 3, 1, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", SPECIAL)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("max_split", SPLIT_CAPS)
def test_latent_project_cuda_special_geometries(case, dtype, max_split, monkeypatch):
    monkeypatch.setenv("MLA_EXT_LATENT_PROJECT_MAX_SPLIT", max_split)
    d_c, group, h_kv, d_r, d, n, latent_dtype = case
    gen = torch.Generator().manual_seed(d_c + d)
    cfg = CacheConfig(num_blocks=-(-n // 16) + 2, block_size=16, d_c=d_c, h_kv=h_kv, d_r=d_r,
                      latent_dtype=latent_dtype, rope_dtype=torch.float8_e4m3fn, group=group)
    inputs = make_inputs(random.Random(0), gen, n, d, cfg, dtype, "cuda", bias=True,
                         angle_dtype=torch.float32, misaligned=False)
    slots = torch.randperm(cfg.capacity, generator=gen)[:n].cuda()
    compare_tolerant(cfg, inputs, slots, f"special {case} {dtype}")


@pytest.mark.gpu
def test_latent_project_cuda_matches_cpu_kernel():
    """Same inputs on both devices: the dequantized caches agree within the tolerant bound."""
    for seed in range(60_000, 60_020):
        cfg, inputs, slots, what = random_project_case(seed, "cpu", max_d=1024)
        cpu_cache = make_cache(cfg, "cpu")
        gpu_cache = [t.cuda() if t is not None else None for t in cpu_cache]
        ops.latent_project(*inputs, slots, *cpu_cache)
        ops.latent_project(*[t.cuda() if t is not None else None for t in inputs], slots.cuda(),
                           *gpu_cache)
        keep = slots >= 0
        if not int(keep.sum()):
            continue
        blk, off = slots[keep] // cfg.block_size, slots[keep] % cfg.block_size
        rows = lambda cache: [None if t is None else t.cpu()[blk, off] for t in cache]  # noqa
        c_cpu = reference.dequantize_latent(*rows(cpu_cache)[:3])
        c_gpu = reference.dequantize_latent(*rows(gpu_cache)[:3])
        x = inputs[0]
        scale = (x.float().abs() @ inputs[1].float().abs().t())[keep]
        bound = 2 * dequant_error_bound(c_cpu, cfg.latent_dtype, cfg.group) \
            + 2 * EPS[x.dtype] * c_cpu.abs() + 2 * x.shape[1] * 2.0**-24 * scale + 2.0**-24
        isclose_report(c_gpu, c_cpu, bound, what + " cpu vs cuda latent")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [576, 4096])  # 4096: a cluster launch (cudaLaunchKernelEx) on Hopper
def test_latent_project_cuda_graph_replay(d):
    """Captured once, replayed with new inputs: the same cache as eager calls."""
    cfg, inputs, slots, _ = small_project_case("cuda", torch.int8, torch.bfloat16, n=5, d=d)
    static = [t.clone() if t is not None else None for t in inputs]
    static_slots = slots.clone()
    graph_cache = make_cache(cfg, "cuda", poison=False)
    eager_cache = make_cache(cfg, "cuda", poison=False)
    ops.latent_project(*static, static_slots, *graph_cache)  # warm-up outside the capture
    ops.latent_project(*static, static_slots, *eager_cache)  # the same write on the other side
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.latent_project(*static, static_slots, *graph_cache)
    for step in range(3):
        static[0].normal_()
        static_slots.copy_(torch.tensor([step, -1, 17 + step, 40, 63 - step]))
        graph.replay()
        ops.latent_project(*static, static_slots, *eager_cache)
    torch.cuda.synchronize()
    for a, b in zip(graph_cache, eager_cache):
        if a is not None:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.gpu
def test_latent_project_cuda_rejects_bad_input():
    _, inputs, slots, cache = small_project_case("cuda")
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.latent_project(*inputs, torch.tensor([0, 1, 2, 3, 64], device="cuda"), *cache)
    with pytest.raises(RuntimeError, match="must be on"):
        torch.ops.mla_ext.latent_project(inputs[0].cpu(), *inputs[1:], slots, *cache)
    # Unchecked (as under graph capture) out-of-range slots are never written.
    before = clone_cache(cache)
    torch.ops.mla_ext.latent_project(*inputs, torch.tensor([64, 10**12, -3, -1, 999],
                                                           device="cuda"), *cache)
    for a, b in zip(cache, before):
        if a is not None:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_bench_latent_project_baseline_and_args():
    """The benchmark's non-GPU half: argument parsing, byte counts, and its unfused torch
    baseline agreeing with the fused op (on the CPU kernel here)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import bench_latent_project as bench

    args = bench.parse_args(["--out", "/tmp/x", "--quick", "--device", "cpu"])
    assert args.quick and str(args.out) == "/tmp/x" and not args.check_only
    configs = list(bench.configurations(quick=False))
    assert len(configs) == len(bench.SHAPES) * len(bench.N_VALUES) * len(bench.CACHE_DTYPES)
    shape = bench.SHAPES[0]
    for cache_dtype in bench.CACHE_DTYPES:
        bench.check_case(shape, 8, cache_dtype, "cpu")
    _, cache = bench.make_case(shape, 1, "int4", "cpu")
    moved = bench.bytes_moved(shape, 1, cache)
    assert moved["weight_bytes"] == (48 + 3 * 8) * 576 * 2
    # One int4 token row: D_c / 2 bytes + fp16 scale and zero per group + bf16 RoPE keys.
    row = 48 // 2 + 2 * 2 * (48 // 48) + 3 * 8 * 2
    assert moved["total_bytes"] == moved["weight_bytes"] + 576 * 2 + 2 * 3 * 4 * 4 + 8 + row
