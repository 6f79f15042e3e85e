"""latent_cache_write and latent_gather: CPU and CUDA kernels against reference.py, on poisoned
paged caches of random geometry and every cache format."""
import random

import pytest
import torch
from torch.library import opcheck

from cache_testing import (FLOAT_DTYPES, LATENT_DTYPES, ROPE_DTYPES, CacheConfig,
                           assert_cache_matches, clone_cache, dequant_error_bound, isclose_report,
                           make_cache, paged_layout, random_cache_config, random_slots,
                           random_values, replace_arg)
from mla_ext import ops, reference

N_CHOICES = [0, 1, 2, 3, 7, 17, 33, 64]


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_write(c, k, slots, cache):
    """reference.latent_cache_write on CPU copies: on the GPU torch divides by a Python scalar
    as a multiplication by its reciprocal (one rounding more), while the format (and both
    kernels) divide exactly. Returns the CPU cache."""
    cpu = [t.cpu() if t is not None else None for t in cache]
    reference.latent_cache_write(c.cpu(), k.cpu(), slots.cpu(), *cpu)
    return cpu


def run_write_case(seed: int, device: str, latent_dtype=None, rope_dtype=None, n=None):
    """One random write: kernel vs reference on identically poisoned caches; returns the ties."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n = rng.choice(N_CHOICES) if n is None else n
    cfg = random_cache_config(rng, n, latent_dtype=latent_dtype, rope_dtype=rope_dtype)
    c = random_values((n, cfg.d_c), rng.choice(FLOAT_DTYPES), gen, device)
    k = random_values((n, cfg.h_kv, cfg.d_r), rng.choice(FLOAT_DTYPES), gen, device)
    slots = random_slots(n, cfg.capacity, gen).to(device)
    initial = make_cache(cfg, device)
    got, want = clone_cache(initial), clone_cache(initial)
    what = f"seed {seed} {cfg} n={n} c {c.dtype} k {k.dtype} on {device}"
    ops.latent_cache_write(c, k, slots, *got)
    want = reference_write(c, k, slots, want)
    ties = assert_cache_matches(got, want, slots, initial, what)

    # Dequantized values of the written rows stay within the format's error bound.
    keep = slots >= 0
    if int(keep.sum()):
        blk, off = slots[keep] // cfg.block_size, slots[keep] % cfg.block_size
        lat, sc, zr, kr, ks = got
        deq = reference.dequantize_latent(lat[blk, off], None if sc is None else sc[blk, off],
                                          None if zr is None else zr[blk, off])
        exact = c[keep].float()
        isclose_report(deq, exact, dequant_error_bound(exact, cfg.latent_dtype, cfg.group),
                       what + " latent error")
        kdeq = reference.dequantize_k_rope(kr[blk, off], None if ks is None else ks[blk, off])
        kexact = k[keep].float()
        isclose_report(kdeq, kexact, dequant_error_bound(kexact, cfg.rope_dtype, cfg.d_r),
                       what + " k_rope error")
    return ties


CPU_WRITE_SEEDS = list(range(120))


@pytest.mark.parametrize("seed", CPU_WRITE_SEEDS)
def test_latent_cache_write_matches_reference(seed):
    run_write_case(seed, "cpu")


@pytest.mark.parametrize("latent_dtype", LATENT_DTYPES)
@pytest.mark.parametrize("rope_dtype", ROPE_DTYPES)
def test_latent_cache_write_every_format(latent_dtype, rope_dtype):
    for seed in range(3):
        run_write_case(1000 + seed, "cpu", latent_dtype, rope_dtype, n=9)


def run_gather_case(seed: int, device: str, latent_dtype=None, rope_dtype=None):
    """Write a few sequences through the kernel, gather them back; compare with the reference
    gather of the same cache (exact, NaN positions included: unwritten rows read as poison)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    b = rng.choice([1, 2, 3, 5])
    block_size = rng.choice([16, 32, 64])
    lens = [rng.choice([0, 1, block_size - 1, block_size, block_size + 1, rng.randint(0, 150)])
            for _ in range(b)]
    cfg = random_cache_config(rng, 0, max_d_c=512, latent_dtype=latent_dtype,
                              rope_dtype=rope_dtype)
    cfg.block_size = block_size
    cfg.num_blocks = sum(-(-n // block_size) for n in lens) + rng.randint(1, 3)
    cache = make_cache(cfg, device)
    table, seq_slots = paged_layout(lens, block_size, cfg.num_blocks, gen)
    # Write all but the last token of each sequence: the gather must return poison there.
    slots = torch.cat([s[:-1] for s in seq_slots if len(s)] + [torch.empty(0, dtype=torch.long)])
    n = slots.numel()
    c = random_values((n, cfg.d_c), torch.float32, gen, device)
    k = random_values((n, cfg.h_kv, cfg.d_r), torch.float32, gen, device)
    ops.latent_cache_write(c, k, slots.to(device), *cache)
    max_len = max(lens + [0]) + rng.choice([0, 3])
    table, seq_lens = table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
    got = ops.latent_gather(*cache, table, seq_lens, max_len)
    want = reference.latent_gather(*cache, table, seq_lens, max_len)
    what = f"seed {seed} {cfg} lens {lens} max_len {max_len} on {device}"
    for g, w, name in zip(got, want, ("c", "k_rope")):
        assert g.dtype == torch.float32 and g.shape == w.shape, (what, name, g.shape, w.shape)
        # int4 is q * scale + zero: the GPU may fuse it into one FMA (one rounding less than
        # torch's separate ops), so allow that rounding; every other format is exact.
        fused = device == "cuda" and cfg.latent_dtype == torch.uint8 and name == "c"
        finite = w[w.isfinite()]
        tol = 2.0**-22 * float(finite.abs().max()) if fused and finite.numel() else 0.0
        torch.testing.assert_close(g, w, atol=tol, rtol=2.0**-22 if fused else 0,
                                   equal_nan=True, msg=lambda m: f"{what} {name}: {m}")
        for i, n_i in enumerate(lens):
            assert not bool(g[i, n_i:].any()), f"{what} {name}: padding of row {i} not zero"


@pytest.mark.parametrize("seed", range(40))
def test_latent_gather_matches_reference(seed):
    run_gather_case(seed, "cpu")


@pytest.mark.parametrize("latent_dtype", LATENT_DTYPES)
def test_write_then_gather_round_trip(latent_dtype):
    """Sequences written token by token come back in order, within the format's error bound."""
    gen = torch.Generator().manual_seed(7)
    cfg = CacheConfig(num_blocks=12, block_size=16, d_c=200, h_kv=3, d_r=8,
                      latent_dtype=latent_dtype, rope_dtype=torch.float8_e4m3fn, group=8)
    cache = make_cache(cfg, "cpu")
    lens = [37, 0, 16, 50]
    table, seq_slots = paged_layout(lens, cfg.block_size, cfg.num_blocks, gen)
    cs = [torch.randn(n, cfg.d_c, generator=gen) for n in lens]
    ks = [torch.randn(n, cfg.h_kv, cfg.d_r, generator=gen) for n in lens]
    for step in range(max(lens)):  # decode order: one token of every live sequence per step
        live = [i for i, n in enumerate(lens) if step < n]
        ops.latent_cache_write(torch.stack([cs[i][step] for i in live]),
                               torch.stack([ks[i][step] for i in live]),
                               torch.stack([seq_slots[i][step] for i in live]), *cache)
    c_out, k_out = ops.latent_gather(*cache, table, torch.tensor(lens, dtype=torch.int32), 60)
    for i, n in enumerate(lens):
        isclose_report(c_out[i, :n], cs[i], dequant_error_bound(cs[i], latent_dtype, cfg.group),
                       f"round trip latent seq {i}")
        isclose_report(k_out[i, :n], ks[i],
                       dequant_error_bound(ks[i], torch.float8_e4m3fn, cfg.d_r),
                       f"round trip k_rope seq {i}")
        assert not bool(c_out[i, n:].any()) and not bool(k_out[i, n:].any())


def small_case(device, latent_dtype=torch.int8, rope_dtype=torch.bfloat16, n=5):
    cfg = CacheConfig(num_blocks=4, block_size=16, d_c=48, h_kv=3, d_r=8,
                      latent_dtype=latent_dtype, rope_dtype=rope_dtype, group=16)
    cache = make_cache(cfg, device, poison=False)
    c = torch.randn(n, cfg.d_c, device=device)
    k = torch.randn(n, cfg.h_kv, cfg.d_r, device=device)
    slots = torch.tensor([3, -1, 17, 40, 63][:n], device=device)
    return cfg, cache, c, k, slots


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("latent_dtype, rope_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.int8, torch.float16),
    (torch.uint8, torch.float8_e4m3fn), (torch.float8_e4m3fn, torch.float8_e4m3fn)])
def test_latent_cache_opcheck(device, latent_dtype, rope_dtype):
    cfg, cache, c, k, slots = small_case(device, latent_dtype, rope_dtype)
    utils = opcheck_utils(cache)
    opcheck(torch.ops.mla_ext.latent_cache_write.default, (c, k, slots, *cache),
            test_utils=utils)
    table = torch.tensor([[1, 0], [2, 3]], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([20, 7], dtype=torch.int32, device=device)
    opcheck(torch.ops.mla_ext.latent_gather.default, (*cache, table, seq_lens, 24),
            test_utils=utils)


def opcheck_utils(cache):
    """opcheck's schema test compares argument values with arithmetic that torch lacks for fp8
    on the CPU; fp8 caches run the other checks (the schema is the same for every dtype and is
    checked by the non-fp8 cases)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")
    if any(t is not None and t.dtype == torch.float8_e4m3fn for t in cache):
        utils = utils[1:]
    return utils


def _bad_write_cases():
    C, K, SLOTS, LAT, SC, ZR, KR, KS = range(8)
    return [
        (replace_arg(C, lambda t: t.int()), "c must have dtype"),
        (replace_arg(C, lambda t: t[:, :40]), "c's last dim must be the cache's D_c = 48"),
        (replace_arg(C, lambda t: t[0]), "c must have 2 dims"),
        (replace_arg(K, lambda t: t[:, :2]), "k_rope must have shape"),
        (replace_arg(K, lambda t: t.double()), "k_rope must have dtype"),
        (replace_arg(SLOTS, lambda t: t.int()), "slot_mapping must have dtype Long"),
        (replace_arg(SLOTS, lambda t: t[:3]), "slot_mapping must have shape"),
        (replace_arg(SLOTS, lambda t: torch.tensor([3, -1, 17, 64, 5])), r"slot_mapping\[3\] = 64"),
        (replace_arg(SLOTS, lambda t: torch.tensor([3, -2, 17, 6, 5])), r"slot_mapping\[1\] = -2"),
        (replace_arg(SC, None), "latent_scale is required for a int8 latent cache"),
        (replace_arg(SC, lambda t: t.float()), "latent_scale must have dtype Half"),
        (replace_arg(SC, torch.zeros(4, 16, 5, dtype=torch.float16)), "must divide D_c = 48"),
        (replace_arg(SC, lambda t: t[:2]), "latent_scale must have shape"),
        (replace_arg(ZR, lambda t: torch.zeros_like(t) if t is not None else
                 torch.zeros(4, 16, 3, dtype=torch.float16)), "latent_zero must be None"),
        (replace_arg(LAT, lambda t: t.int()), "latent must have dtype"),
        (replace_arg(LAT, lambda t: t.transpose(0, 1)), "latent must be contiguous"),
        (replace_arg(KR, lambda t: t[:3]), "k_rope_cache must have latent's"),
        (replace_arg(KR, lambda t: t[..., :7].contiguous()), "d_r"),
        (replace_arg(KR, lambda t: t.to(torch.float8_e4m3fn)), "k_rope_scale is required"),
        (replace_arg(KS, torch.zeros(4, 16, 3, dtype=torch.float16)), "k_rope_scale must be None"),
    ]


@pytest.mark.parametrize("bad, match", _bad_write_cases())
def test_latent_cache_write_rejects_bad_input(bad, match):
    _, cache, c, k, slots = small_case("cpu")
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mla_ext.latent_cache_write(*bad((c, k, slots, *cache)))


def test_latent_cache_write_format_specific_tensors():
    _, cache, c, k, slots = small_case("cpu", latent_dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="latent_scale must be None for a float latent"):
        torch.ops.mla_ext.latent_cache_write(c, k, slots, cache[0],
                                             torch.zeros(4, 16, 3, dtype=torch.float16), None,
                                             *cache[3:])
    _, cache, c, k, slots = small_case("cpu", latent_dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="latent_zero is required for a int4"):
        torch.ops.mla_ext.latent_cache_write(c, k, slots, cache[0], cache[1], None, *cache[3:])
    with pytest.raises(RuntimeError, match="c's last dim"):  # int4 holds D_c / 2 bytes
        torch.ops.mla_ext.latent_cache_write(c[:, :24], k, slots, *cache)


def test_latent_cache_write_wrapper_checks_slots():
    _, cache, c, k, _ = small_case("cpu")
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.latent_cache_write(c, k, torch.tensor([0, 1, 2, 3, 64]), *cache)


@pytest.mark.parametrize("bad, match", [
    (lambda t, s, m: (t.long(), s, m), "block_table must have dtype"),
    (lambda t, s, m: (t, s.long(), m), "seq_lens must have dtype"),
    (lambda t, s, m: (t, s[:1], m), "seq_lens must have one entry per row of block_table"),
    (lambda t, s, m: (t[0], s, m), "block_table must have 2 dims"),
    (lambda t, s, m: (t, s, 19), r"seq_lens\[0\] = 20 must be in \[0, max_len = 19\]"),
    (lambda t, s, m: (t, torch.tensor([20, -1], dtype=torch.int32), m), r"seq_lens\[1\] = -1"),
    (lambda t, s, m: (t, s, -1), "max_len must be >= 0"),
    (lambda t, s, m: (torch.tensor([[1, 4], [2, 3]], dtype=torch.int32), s, m),
     r"block_table\[0, 1\] = 4 is outside"),
    (lambda t, s, m: (t[:, :1].contiguous(), s, m), "block_table has 1 columns"),
])
def test_latent_gather_rejects_bad_input(bad, match):
    _, cache, *_ = small_case("cpu")
    table = torch.tensor([[1, 0], [2, 3]], dtype=torch.int32)
    seq_lens = torch.tensor([20, 7], dtype=torch.int32)
    t, s, m = bad(table, seq_lens, 24)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mla_ext.latent_gather(*cache, t, s, m)
    if t.dtype == torch.int32 and s.dtype == torch.int32 and t.dim() == 2 and m >= 0 \
            and s.numel() == t.shape[0]:
        with pytest.raises(ValueError, match="block_table|seq_lens"):  # the wrapper's own check
            ops.latent_gather(*cache, t, s, m)


def test_latent_gather_unused_table_entries_are_ignored():
    """Entries past a sequence's blocks may hold anything (sentinels), like a real block table."""
    _, cache, c, k, slots = small_case("cpu")
    ops.latent_cache_write(c, k, slots, *cache)
    table = torch.tensor([[1, -7], [2, 2**31 - 1]], dtype=torch.int32)
    seq_lens = torch.tensor([16, 5], dtype=torch.int32)
    got = ops.latent_gather(*cache, table, seq_lens, 16)
    want = reference.latent_gather(*cache, table, seq_lens, 16)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


# ---------------------------------------------------------------- CUDA

GPU_WRITE_SEEDS = range(10_000, 10_260)
GPU_GATHER_SEEDS = range(20_000, 20_100)


@pytest.mark.gpu
def test_latent_cache_write_cuda_matches_reference():
    ties = sum(run_write_case(seed, "cuda") for seed in GPU_WRITE_SEEDS)
    print(f"latent_cache_write CUDA: {ties} one-step rounding ties over {len(GPU_WRITE_SEEDS)} "
          "configurations")


@pytest.mark.gpu
@pytest.mark.parametrize("latent_dtype", LATENT_DTYPES)
@pytest.mark.parametrize("rope_dtype", ROPE_DTYPES)
def test_latent_cache_write_cuda_every_format(latent_dtype, rope_dtype):
    for seed in range(2):
        run_write_case(30_000 + seed, "cuda", latent_dtype, rope_dtype, n=33)


@pytest.mark.gpu
def test_latent_cache_write_cuda_large_rows():
    """D_c and H_kv * d_r beyond 48 KB of shared memory per token row (opt-in attribute path)."""
    gen = torch.Generator().manual_seed(3)
    for latent_dtype in (torch.float32, torch.int8, torch.uint8):
        cfg = CacheConfig(num_blocks=3, block_size=16, d_c=16384, h_kv=8, d_r=32,
                          latent_dtype=latent_dtype, rope_dtype=torch.float8_e4m3fn, group=64)
        initial = make_cache(cfg, "cuda")
        got, want = clone_cache(initial), clone_cache(initial)
        c = random_values((5, cfg.d_c), torch.bfloat16, gen, "cuda")
        k = random_values((5, cfg.h_kv, cfg.d_r), torch.float32, gen, "cuda")
        slots = torch.tensor([0, 47, -1, 20, 5], device="cuda")
        ops.latent_cache_write(c, k, slots, *got)
        want = reference_write(c, k, slots, want)
        assert_cache_matches(got, want, slots, initial, f"large rows {latent_dtype}")


@pytest.mark.gpu
def test_latent_cache_write_cuda_strided_inputs():
    cfg, cache, c, k, slots = small_case("cuda")
    want = clone_cache(cache)
    wide_c = torch.randn(5, 100, device="cuda")[:, 3:51]
    wide_k = torch.randn(5 * 2, 3, 8, device="cuda")[::2]
    ops.latent_cache_write(wide_c, wide_k, slots, *cache)
    want = reference_write(wide_c, wide_k, slots, want)
    assert_cache_matches(cache, want, slots, make_cache(cfg, "cuda", poison=False), "strided")


@pytest.mark.gpu
def test_latent_gather_cuda_matches_reference():
    for seed in GPU_GATHER_SEEDS:
        run_gather_case(seed, "cuda")


@pytest.mark.gpu
def test_latent_cache_cuda_wrapper_and_kernel_guards():
    cfg, cache, c, k, slots = small_case("cuda")
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.latent_cache_write(c, k, torch.tensor([0, 1, 2, 3, 64], device="cuda"), *cache)
    table = torch.tensor([[1, 9], [2, 3]], dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor([20, 7], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 9"):
        ops.latent_gather(*cache, table, seq_lens, 24)
    # Unchecked (as under graph capture): a bad block gives NaN rows, never a wild read.
    c_out, k_out = torch.ops.mla_ext.latent_gather(*cache, table, seq_lens, 24)
    assert bool(c_out[0, 16:20].isnan().all()) and bool(k_out[0, 16:20].isnan().all())
    assert not bool(c_out[0, :16].isnan().any()) and not bool(c_out[0, 20:].any())
    # Unchecked out-of-range slots are skipped, never written past the cache.
    before = clone_cache(cache)
    torch.ops.mla_ext.latent_cache_write(c, k, torch.tensor([64, 10**9, -5, -1, 64],
                                                              device="cuda"), *cache)
    for a, b in zip(cache, before):
        if a is not None:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    with pytest.raises(RuntimeError, match="must be on"):
        torch.ops.mla_ext.latent_cache_write(c.cpu(), k, slots, *cache)
