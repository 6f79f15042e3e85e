"""NaN and infinity through every op: the CPU and CUDA kernels propagate them as reference.py
defines (ARCHITECTURE 3.4, "Non-finite values"), and the expected NaN positions follow from how
each input was built, not from any implementation.

- partial_rope: IEEE arithmetic of the rotation; a NaN in a pair's x or angle makes both
  outputs of the pair NaN.
- latent_cache_write / latent_project: a float cache stores the value as it is; a quantized
  group (and an fp8 RoPE head) holding a NaN or an infinity, or whose scale overflows fp16, gets
  a NaN scale and codes 0, so all its values read back NaN (latent_gather).
- mla_decode: a query row whose query or visible context holds a NaN or an infinity gets o = NaN
  and lse = NaN; rows that do not see the value keep their finite results. The CUDA kernels may
  also put NaN into other rows of a sequence whose cache holds such a value (a tensor-core
  product multiplies it by the zeros of another head's query or of a masked token's
  probability), never into a row of another sequence, and never give a wrong finite value.
"""
from __future__ import annotations

import math

import pytest
import torch

from cache_testing import CACHE_NAMES, assert_codes_match
from mla_ext import ops, reference

NAN, INF = math.nan, math.inf
LATENT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8,
                 torch.float8_e4m3fn]
QUANTIZED = (torch.int8, torch.uint8, torch.float8_e4m3fn)
ROPE_DTYPES = [torch.float32, torch.bfloat16, torch.float8_e4m3fn]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def assert_same(got, want, what, tol=0.0):
    """Same NaN and infinity positions (signs included); finite values within tol."""
    got, want = got.float().cpu(), want.float().cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(got.isinf(), want.isinf()), f"{what}: infinity positions differ"
    assert torch.equal(got[got.isinf()], want[want.isinf()]), f"{what}: infinity signs differ"
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin], atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def assert_caches_equal(got, want, what):
    """Written caches of the kernel and the reference: codes up to rounding ties, scales and
    float values equal with NaN where NaN (the CUDA NaN's bits differ from the CPU's)."""
    for name, g, w in zip(CACHE_NAMES, got, want):
        if g is None:
            assert w is None
            continue
        g, w = g.cpu(), w.cpu()
        if g.dtype in QUANTIZED:
            assert_codes_match(g, w, f"{what} {name}")
        else:
            assert_same(g, w, f"{what} {name}")


def empty_cache(n_slots, d_c, group, h_kv, d_r, latent_dtype, rope_dtype, device):
    """Zeroed [latent, scale, zero, k_rope, k_rope_scale] of one block of n_slots."""
    width = d_c // 2 if latent_dtype == torch.uint8 else d_c
    z = lambda *shape, dtype: torch.zeros(1, n_slots, *shape, dtype=dtype, device=device)  # noqa
    quantized = latent_dtype in QUANTIZED
    return [z(width, dtype=latent_dtype),
            z(d_c // group, dtype=torch.float16) if quantized else None,
            z(d_c // group, dtype=torch.float16) if latent_dtype == torch.uint8 else None,
            z(h_kv, d_r, dtype=rope_dtype),
            z(h_kv, dtype=torch.float16) if rope_dtype == torch.float8_e4m3fn else None]


def cpu_copy(cache):
    return [t.cpu().clone() if t is not None else None for t in cache]


def read_back(cache):
    """Dequantized (latent (n, D_c), k_rope (n, H_kv, d_r)) of every slot, by the reference."""
    lat, sc, zr, kr, ks = [t[0].cpu() if t is not None else None for t in cache]
    return reference.dequantize_latent(lat, sc, zr), reference.dequantize_k_rope(kr, ks)


# ---------------------------------------------------------------- partial_rope

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_rope_nonfinite(device, dtype):
    n, heads, h_kv, r = 5, 4, 2, 4
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, heads, 2 * r, generator=gen)
    ang = torch.rand(n, h_kv, r, generator=gen) + 0.3  # cos, sin away from 0
    cos, sin = ang.cos(), ang.sin()
    x[0, 1, 2] = NAN            # x1 of pair 2, head 1
    x[1, 3, r + 1] = INF        # x2 of pair 1, head 3
    x[2, 0, 0] = -INF
    cos[3, 1, 3] = NAN          # pair 3 of KV head 1: heads 2 and 3
    sin[4, 0, 0] = INF          # pair 0 of KV head 0: heads 0 and 1
    x, cos, sin = x.to(dtype), cos, sin
    want = reference.partial_rope(x, cos, sin)
    got = ops.partial_rope(x.to(device), cos.to(device), sin.to(device))
    tol = 0.0 if device == "cpu" and dtype == torch.float32 else 2e-2
    assert_same(got, want, f"partial_rope {dtype} {device}", tol)
    nan = got.float().cpu().isnan()
    assert nan[0, 1, [2, r + 2]].all() and nan[3, 2:, [3, r + 3]].all()
    inf = got.float().cpu().isinf()
    assert inf[4, :2][:, [0, r]].all()   # one infinite term in each output of the pair
    assert inf[1, 3, [1, r + 1]].all() and inf[2, 0, [0, r]].all()
    inplace = x.to(device).clone()
    ops.partial_rope_(inplace, cos.to(device), sin.to(device))
    assert_same(inplace, got, f"partial_rope_ {dtype} {device}")


# ---------------------------------------------------------------- latent_cache_write, gather

D_C, GROUP, H_KV, D_R = 64, 16, 2, 8


def nonfinite_tokens():
    """(c (5, D_C), k_rope (5, H_KV, D_R), latent groups expected NaN per token in a quantized
    cache, RoPE heads expected NaN per token in an fp8 RoPE cache)."""
    gen = torch.Generator().manual_seed(1)
    c = torch.randn(5, D_C, generator=gen)
    k = torch.randn(5, H_KV, D_R, generator=gen)
    c[0, 3], c[0, GROUP + 5], c[0, 2 * GROUP] = NAN, INF, -INF  # groups 0, 1, 2 of token 0
    c[1, :GROUP] = 1e9                 # group 0: every format's fp16 scale overflows
    c[2, GROUP:2 * GROUP] = 1e9        # all equal: int4's range is 0, but the zero overflows
    c[3] = NAN
    k[0, 0, 1], k[0, 1, 7] = NAN, INF
    k[1, 1, :] = -INF
    k[3] = NAN
    groups = {0: [0, 1, 2], 1: [0], 2: [1], 3: [0, 1, 2, 3], 4: []}
    heads = {0: [0, 1], 1: [1], 2: [], 3: [0, 1], 4: []}
    return c, k, groups, heads


def check_read_back(cache, c, k, groups, heads, latent_dtype, rope_dtype, what):
    """What the cache holds after c and k were written to slots 0..4, from the spec alone."""
    lat, kr = read_back(cache)
    lat, kr = lat[:5], kr[:5]
    if latent_dtype in QUANTIZED:
        for t in range(5):
            g = lat[t].view(-1, GROUP)
            nan_groups = [i for i in range(D_C // GROUP) if bool(g[i].isnan().all())]
            assert nan_groups == groups[t], f"{what}: token {t} NaN groups {nan_groups}"
            other = [i for i in range(D_C // GROUP) if i not in groups[t]]
            assert bool(g[other].isfinite().all()), f"{what}: token {t} lost a finite group"
    else:
        assert_same(lat, c.to(latent_dtype), f"{what} latent")
    if rope_dtype == torch.float8_e4m3fn:
        for t in range(5):
            nan_heads = [h for h in range(H_KV) if bool(kr[t, h].isnan().all())]
            assert nan_heads == heads[t], f"{what}: token {t} NaN RoPE heads {nan_heads}"
            other = [h for h in range(H_KV) if h not in heads[t]]
            assert bool(kr[t, other].isfinite().all()), f"{what}: token {t}"
    else:
        assert_same(kr, k.to(rope_dtype), f"{what} k_rope")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rope_dtype", ROPE_DTYPES)
@pytest.mark.parametrize("latent_dtype", LATENT_DTYPES)
def test_latent_cache_write_and_gather_nonfinite(latent_dtype, rope_dtype, device):
    c, k, groups, heads = nonfinite_tokens()
    what = f"latent_cache_write {latent_dtype} / {rope_dtype} on {device}"
    slots = torch.arange(5)
    got = empty_cache(8, D_C, GROUP, H_KV, D_R, latent_dtype, rope_dtype, device)
    want = cpu_copy(got)
    ops.latent_cache_write(c.to(device), k.to(device), slots.to(device), *got)
    reference.latent_cache_write(c, k, slots, *want)
    assert_caches_equal(got, want, what)
    check_read_back(got, c, k, groups, heads, latent_dtype, rope_dtype, what)

    table = torch.zeros(1, 1, dtype=torch.int32)
    lens = torch.tensor([5], dtype=torch.int32)
    got_c, got_k = ops.latent_gather(*got, table.to(device), lens.to(device), 7)
    want_c, want_k = reference.latent_gather(*want, table, lens, 7)
    assert_same(got_c, want_c, what + " gather c")
    assert_same(got_k, want_k, what + " gather k_rope")
    assert not bool(got_c[0, 5:].any()) and not bool(got_k[0, 5:].any()), "padding not zero"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("latent_dtype", LATENT_DTYPES)
def test_latent_project_nonfinite(latent_dtype, device):
    """A non-finite x reaches every latent channel and every RoPE key of its token (no weight
    is zero); the other tokens stay finite."""
    rope_dtype = torch.bfloat16 if latent_dtype in QUANTIZED else torch.float8_e4m3fn
    n, d = 4, 32
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, d, generator=gen)
    x[0, 3], x[1, 5], x[2, 7] = NAN, INF, -INF
    w_down = torch.randn(D_C, d, generator=gen) / d ** 0.5
    w_kr = torch.randn(H_KV * D_R, d, generator=gen) / d ** 0.5
    ang = torch.rand(n, H_KV, D_R // 2, generator=gen) + 0.3
    args = (x, w_down, w_kr, None, ang.cos(), ang.sin(), torch.arange(n))
    got = empty_cache(8, D_C, GROUP, H_KV, D_R, latent_dtype, rope_dtype, device)
    want = cpu_copy(got)
    ops.latent_project(*(a.to(device) if a is not None else None for a in args), *got)
    reference.latent_project(*args, *want)
    what = f"latent_project {latent_dtype} on {device}"
    if device == "cpu":
        assert_caches_equal(got, want, what)
    lat, kr = read_back(got)
    for t in (0, 1, 2):
        if t == 0 or latent_dtype in QUANTIZED:
            assert bool(lat[t].isnan().all()), f"{what}: token {t} latent not all NaN"
        else:  # an infinity times nonzero weights: every channel infinite
            assert bool(lat[t].isinf().all()), f"{what}: token {t} latent not all infinite"
        assert not bool(kr[t].isfinite().any()), f"{what}: token {t} RoPE keys finite"
    assert bool(lat[3].isfinite().all()) and bool(kr[3].isfinite().all()), what
    want_lat, want_kr = read_back(want)
    tol = 0.0 if device == "cpu" else 5e-2
    assert_same(lat[:3], want_lat[:3], what + " non-finite tokens")
    assert_same(lat[3], want_lat[3], what + " finite token", tol * float(want_lat[3].abs().max()))


# ---------------------------------------------------------------- mla_decode

H, LENS, BLOCK = 4, (5, 20, 9, 12), 16


def place_nonfinite(q_lat, q_rope, c, k, s_q, lens):
    """NaNs and infinities at known places of the queries and the context of four sequences;
    returns the query rows (B, s_q, heads) that must come out NaN and the sequences whose cache
    holds a non-finite value (0 to 2; sequence 3 has a NaN query only)."""
    heads, d_r = q_lat.shape[2], q_rope.shape[3]
    assert len(lens) == 4, lens
    start = [sum(lens[:i]) for i in range(len(lens))]
    expect = torch.zeros(len(lens), s_q, heads, dtype=torch.bool)
    q_lat[0, 0, 1, 3] = NAN                # one query row
    expect[0, 0, 1] = True
    q_rope[2, s_q - 1, 0, 0] = INF         # one query row, through its RoPE part
    expect[2, s_q - 1, 0] = True
    c[start[1] + 7, 2] = NAN               # a token every row of sequence 1 sees
    expect[1] = True
    k[start[2] + 1, 1, d_r // 2] = -INF    # KV head 1 of sequence 2: the second half of the heads
    expect[2, :, heads // 2:] = True
    c[start[0] + lens[0] - 1, 9] = INF     # sequence 0's last token: only its last query sees it
    expect[0, s_q - 1] = True
    q_rope[3, 0, heads - 1, 1] = NAN       # one query row of a sequence with a finite cache
    expect[3, 0, heads - 1] = True
    return expect, torch.tensor([True, True, True, False])


def decode_case(latent_dtype, rope_dtype, q_dtype, s_q, device, nonfinite=True, lens=LENS,
                heads=H, d_r=D_R):
    """Sequences (lens) of random queries (heads query heads over H_KV KV heads) and
    context (d_r RoPE dims), with place_nonfinite's values unless nonfinite is False; returns
    (args of mla_decode on device, the same on the CPU, the query rows expected NaN, the
    sequences whose cache holds a non-finite value)."""
    gen = torch.Generator().manual_seed(3)
    b = len(lens)
    c = torch.randn(sum(lens), D_C, generator=gen)
    k = torch.randn(sum(lens), H_KV, d_r, generator=gen)
    q_lat = torch.randn(b, s_q, heads, D_C, generator=gen)
    q_rope = torch.randn(b, s_q, heads, d_r, generator=gen)
    expect, bad_cache = (place_nonfinite(q_lat, q_rope, c, k, s_q, lens) if nonfinite
                         else (torch.zeros(b, s_q, heads, dtype=torch.bool),
                               torch.zeros(b, dtype=torch.bool)))
    n_blocks = [-(-n // BLOCK) for n in lens]
    table = torch.full((b, max(n_blocks)), 0, dtype=torch.int32)
    slots, used = [], 0
    for i, n in enumerate(lens):
        table[i, :n_blocks[i]] = torch.arange(used, used + n_blocks[i], dtype=torch.int32)
        slots.append(used * BLOCK + torch.arange(n))
        used += n_blocks[i]
    cache = empty_cache(used * BLOCK, D_C, GROUP, H_KV, d_r, latent_dtype, rope_dtype, "cpu")
    cache = [t.view(used, BLOCK, *t.shape[2:]) if t is not None else None for t in cache]
    reference.latent_cache_write(c, k, torch.cat(slots), *cache)
    cpu_args = (q_lat.to(q_dtype), q_rope.to(q_dtype), *cache, table,
                torch.tensor(lens, dtype=torch.int32), D_C ** -0.5)
    dev_args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in cpu_args)
    return dev_args, cpu_args, expect, bad_cache


def check_decode(out, cpu_args, expect, what, tol, may_nan=None):
    """Rows in expect are NaN in full (o and lse); the others equal the reference's finite
    results, except in rows of may_nan (B, s_q, heads), which may instead be NaN in full, or
    keep the reference's lse with NaN in some channels of o (never an infinity or a wrong
    finite value)."""
    o, lse = (t.float().cpu() for t in out)
    want_o, want_lse = (t.float() for t in reference.mla_decode(*cpu_args))
    may_nan = torch.zeros_like(expect) if may_nan is None else may_nan & ~expect
    nan = lse.isnan()
    assert bool(nan[expect].all()) and not bool(nan[~expect & ~may_nan].any()), \
        f"{what}: lse NaN rows {nan.nonzero().tolist()}, expected {expect.nonzero().tolist()}"
    assert bool(o[nan].isnan().all()), f"{what}: a NaN row's o is not all NaN"
    fin = ~nan
    assert bool(lse[fin].isfinite().all()), f"{what}: a finite row's lse is not finite"
    assert_same(lse[fin], want_lse[fin], what + " lse", tol)
    exact = fin & ~may_nan
    assert bool(o[exact].isfinite().all()), f"{what}: a finite row's o is not finite"
    assert_same(o[exact], want_o[exact], what + " o", tol)
    loose_o, loose_want = o[fin & may_nan], want_o[fin & may_nan]
    assert not bool(loose_o.isinf().any()), f"{what}: an infinity in o"
    kept = ~loose_o.isnan()
    assert_same(loose_o[kept], loose_want[kept], what + " o (channels kept)", tol)


def rows_of(sequences, s_q, heads):
    """(B, s_q, heads) mask of every row of the given sequences (a (B,) bool)."""
    return sequences[:, None, None].expand(-1, s_q, heads).clone()


@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("rope_dtype", ROPE_DTYPES)
@pytest.mark.parametrize("latent_dtype", LATENT_DTYPES)
def test_mla_decode_nonfinite_cpu(latent_dtype, rope_dtype, s_q):
    args, cpu_args, expect, _ = decode_case(latent_dtype, rope_dtype, torch.float32, s_q, "cpu")
    check_decode(ops.mla_decode(*args), cpu_args, expect,
                 f"mla_decode {latent_dtype} / {rope_dtype} s_q {s_q}", 1e-5)


# The CUDA kernels' formats: 16-bit queries, a latent in their dtype or quantized, RoPE keys in
# their dtype or fp8. Each kernel at shapes it takes: mma at the module's shapes, ws at 8 query
# heads and 16 RoPE dims (it needs multiples of 8 and 16, and RoPE keys in the queries' dtype).
CUDA_FORMATS = [(lat, rope) for lat in (torch.bfloat16, torch.float16, torch.int8, torch.uint8,
                                        torch.float8_e4m3fn)
                for rope in ("q", torch.float8_e4m3fn)]
CUDA_KERNELS = {"mma": dict(heads=H, d_r=D_R), "ws": dict(heads=8, d_r=16)}


def skip_unless_kernel_runs(kernel):
    if kernel == "ws" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the ws decode kernel needs a compute capability 9.0 GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", sorted(CUDA_KERNELS))
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("latent_dtype, rope_dtype", CUDA_FORMATS)
def test_mla_decode_nonfinite_cuda(latent_dtype, rope_dtype, s_q, kernel):
    skip_unless_kernel_runs(kernel)
    q_dtype = latent_dtype if latent_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    rope_dtype = q_dtype if rope_dtype == "q" else rope_dtype
    if kernel == "ws" and rope_dtype != q_dtype:
        pytest.skip("the ws decode kernel takes RoPE keys in the queries' dtype only")
    args, cpu_args, expect, bad_cache = decode_case(latent_dtype, rope_dtype, q_dtype, s_q, "cuda",
                                                    **CUDA_KERNELS[kernel])
    with ops.decode_kernel(kernel):
        out = ops.mla_decode(*args)
    check_decode(out, cpu_args, expect, f"mla_decode {kernel} {latent_dtype} / {rope_dtype} "
                 f"s_q {s_q}", 3e-2, may_nan=rows_of(bad_cache, *expect.shape[1:]))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", sorted(CUDA_KERNELS))
def test_mla_decode_nonfinite_cuda_split(kernel):
    """Sequences of thousands of tokens are split: a NaN in one split reaches its merged rows
    (the merge keeps a NaN split) and the other rows stay finite."""
    skip_unless_kernel_runs(kernel)
    bf16 = torch.bfloat16
    args, cpu_args, expect, bad_cache = decode_case(bf16, bf16, bf16, 1, "cuda",
                                                    lens=(3000, 40, 2500, 1800),
                                                    **CUDA_KERNELS[kernel])
    with ops.decode_kernel(kernel):
        out = ops.mla_decode(*args)
    check_decode(out, cpu_args, expect, f"mla_decode {kernel} split", 3e-2,
                 may_nan=rows_of(bad_cache, *expect.shape[1:]))


@pytest.mark.parametrize("device", DEVICES)
def test_mla_decode_all_scores_minus_inf_is_nan(device):
    """An infinite query whose every score is -inf: NaN, not the "no token" answer (lse -inf)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    args, cpu_args, _, _ = decode_case(dtype, dtype, dtype, 1, device, nonfinite=False)
    q_lat = torch.zeros_like(args[0])
    q_rope = torch.zeros_like(args[1])
    q_rope[0, 0, 0, 0] = -INF
    k = args[5]
    k[..., 0, 0] = 1.0  # every token's key of KV head 0, dim 0: positive
    for fn in (ops.mla_decode, reference.mla_decode):
        o, lse = fn(q_lat, q_rope, *args[2:])
        assert bool(lse[0, 0, 0].isnan()) and bool(o[0, 0, 0].isnan().all()), fn
        assert bool(lse[0, 0, 1:].isfinite().all()), fn
