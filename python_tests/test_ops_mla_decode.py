"""mla_decode: CPU and CUDA kernels against reference.py, the split plan, opcheck, bad input.

Paged inputs are always poisoned (FlashMLA's tests): the block table is shuffled, unused cache
pages hold NaN (NaN scales for integer formats) and unused block-table slots hold a sentinel id far
outside the cache, so a kernel that reads past a sequence's end fails loudly.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import pytest
import torch
from torch.library import opcheck

from mla_ext import ops, reference

SENTINEL_BLOCK = 2147480000
QUANT_DTYPES = (torch.int8, torch.uint8, torch.float8_e4m3fn)


@dataclass(frozen=True)
class DecodeParam:
    B: int
    s_q: int
    H: int
    H_kv: int
    d_r: int
    D_c: int
    block_size: int
    lens: tuple
    latent_dtype: torch.dtype
    rope_dtype: torch.dtype
    q_dtype: torch.dtype
    group_size: int
    seed: int


def make_inputs(p: DecodeParam, device):
    """Returns (args of mla_decode, the unquantized c and k_rope of every sequence)."""
    gen = torch.Generator().manual_seed(p.seed)
    lens = torch.tensor(p.lens, dtype=torch.int32)
    blocks_per_seq = [(n + p.block_size - 1) // p.block_size for n in p.lens]
    max_blocks = max(max(blocks_per_seq) + 1, 1)
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((p.B, max_blocks), SENTINEL_BLOCK, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(blocks_per_seq):
        table[b, :nb] = perm[used:used + nb].int()
        used += nb
    width = p.D_c // 2 if p.latent_dtype == torch.uint8 else p.D_c
    groups = p.D_c // p.group_size
    # Poison: NaN in float pages, garbage bytes + NaN scales in quantized ones.
    if p.latent_dtype in QUANT_DTYPES and p.latent_dtype != torch.float8_e4m3fn:
        latent = torch.randint(0, 127, (num_blocks, p.block_size, width), generator=gen).to(p.latent_dtype)
    else:
        latent = torch.full((num_blocks, p.block_size, width), float("nan")).to(p.latent_dtype)
    scale = zero = None
    if p.latent_dtype in QUANT_DTYPES:
        scale = torch.full((num_blocks, p.block_size, groups), float("nan"), dtype=torch.float16)
        if p.latent_dtype == torch.uint8:
            zero = torch.full_like(scale, float("nan"))
    k_rope = torch.full((num_blocks, p.block_size, p.H_kv, p.d_r), float("nan")).to(p.rope_dtype)
    k_scale = (torch.full((num_blocks, p.block_size, p.H_kv), float("nan"), dtype=torch.float16)
               if p.rope_dtype == torch.float8_e4m3fn else None)
    total = int(lens.sum())
    c = torch.randn(total, p.D_c, generator=gen)
    kr = torch.randn(total, p.H_kv, p.d_r, generator=gen)
    slots = []
    for b, n in enumerate(p.lens):
        t = torch.arange(n)
        slots.append(table[b, t // p.block_size].long() * p.block_size + t % p.block_size)
    slot_mapping = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)
    reference.latent_cache_write(c, kr, slot_mapping, latent, scale, zero, k_rope, k_scale)
    q_lat = torch.randn(p.B, p.s_q, p.H, p.D_c, generator=gen).to(p.q_dtype)
    q_rope = torch.randn(p.B, p.s_q, p.H, p.d_r, generator=gen).to(p.q_dtype)
    softmax_scale = 1.0 / math.sqrt(p.D_c + p.d_r)
    to = (lambda t: None if t is None else t.to(device))
    args = tuple(to(t) for t in (q_lat, q_rope, latent, scale, zero, k_rope, k_scale, table, lens))
    return args + (softmax_scale,), (c, kr, slot_mapping)


def exact_attention(p: DecodeParam, args, raw):
    """Attention over the unquantized c and k_rope (a bf16/fp32 cache holding them exactly)."""
    c, kr, slots = raw
    q_lat, q_rope, latent, _, _, _, _, table, lens, scale = args
    nb, bs = latent.shape[0], latent.shape[1]
    lat32 = torch.zeros(nb, bs, p.D_c)
    kr32 = torch.zeros(nb, bs, p.H_kv, p.d_r)
    reference.latent_cache_write(c, kr, slots, lat32, None, None, kr32, None)
    return reference.mla_decode(q_lat.float().cpu(), q_rope.float().cpu(), lat32, None, None, kr32,
                                None, table.cpu(), lens.cpu(), scale)


def rounded_reference(p: DecodeParam, args):
    """reference.py run with the inputs rounded to the kernel's dtype: the dequantized cache in
    q's dtype, output rounded to q's dtype (flash-attn's same-dtype baseline)."""
    q_lat, q_rope, latent, ls, lz, kr, ks, table, lens, scale = (
        a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    lat_lp = reference.dequantize_latent(latent, ls, lz).to(p.q_dtype)
    kr_lp = reference.dequantize_k_rope(kr, ks).to(p.q_dtype)
    return reference.mla_decode(q_lat, q_rope, lat_lp, None, None, kr_lp, None, table, lens, scale)


def check_against_reference(p: DecodeParam, out, args):
    o, lse = (t.cpu() for t in out)
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    q32 = (cpu_args[0].float(), cpu_args[1].float())
    o_ref, lse_ref = reference.mla_decode(*q32, *cpu_args[2:])
    assert o.dtype == p.q_dtype and o.shape == o_ref.shape and lse.shape == lse_ref.shape
    dead = torch.isinf(lse_ref)
    assert torch.equal(torch.isinf(lse), dead), f"{p}: -inf lse positions differ"
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), f"{p}: NaN in output"
    assert (o[dead.unsqueeze(-1).expand_as(o)] == 0).all(), f"{p}: rows seeing nothing must be 0"
    if p.q_dtype == torch.float32:
        o_base, lse_base = o_ref, lse_ref
    else:
        o_base, lse_base = rounded_reference(p, args)
    live = ~dead
    err = (o.float() - o_ref).abs().max().item()
    base = (o_base.float() - o_ref).abs().max().item()
    floor = 1e-5 + 1e-3 * o_ref.abs().max().item()
    assert err <= 2 * base + floor, f"{p}: o error {err:.3g} > 2 x {base:.3g} + {floor:.3g}"
    if live.any():
        lerr = (lse[live] - lse_ref[live]).abs().max().item()
        lbase = (lse_base[live] - lse_ref[live]).abs().max().item()
        assert lerr <= 2 * lbase + 2e-3, f"{p}: lse error {lerr:.3g} > 2 x {lbase:.3g} + 2e-3"


# Error of each cache format against exact attention, as a fraction of max |o_exact|: loose
# bounds that the format's rounding stays well within (measured ~3-5x lower on random data).
FORMAT_BOUND = {torch.bfloat16: 0.03, torch.float16: 0.01, torch.float32: 1e-4,
                torch.int8: 0.05, torch.float8_e4m3fn: 0.15, torch.uint8: 0.4}


def check_format_error(p: DecodeParam, out, args, raw):
    o_exact, _ = exact_attention(p, args, raw)
    bound = max(FORMAT_BOUND[p.latent_dtype], FORMAT_BOUND.get(p.rope_dtype, 0.15))
    if p.q_dtype != torch.float32:
        bound = max(bound, 0.03)
    err = (out[0].cpu().float() - o_exact).abs().max().item()
    assert err <= bound * o_exact.abs().max().item() + 1e-4, \
        f"{p}: error vs unquantized attention {err:.3g} > {bound} x {o_exact.abs().max():.3g}"


def random_params(n: int, seed: int, *, cpu: bool) -> list[DecodeParam]:
    """Seeded draws over the shapes and formats the kernel takes (smaller sizes for the CPU suite)."""
    rng = random.Random(seed)
    out = []
    heads = [1, 2, 3, 8, 9, 16, 32, 40, 64, 128] if not cpu else [1, 2, 3, 8, 9, 16, 32]
    for i in range(n):
        H = rng.choice(heads)
        H_kv = rng.choice([d for d in range(1, H + 1) if H % d == 0])
        D_c = 8 * rng.randint(3, 48 if cpu else 256)
        block_size = rng.choice([16, 32, 64])
        B = rng.randint(1, 3 if cpu else 4)
        s_q = rng.choice([1, 1, 2, 3, 4, 8])
        max_len = 90 if cpu else rng.choice([64, 300, 1200, 3000])
        lens = tuple(rng.choice([0, 1, block_size - 1, block_size + 1, rng.randint(0, max_len),
                                 rng.randint(0, max_len)]) for _ in range(B))
        latent_dtype = rng.choice([torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                                   torch.int8, torch.uint8] + ([torch.float32] if cpu else []))
        q_dtype = rng.choice([torch.bfloat16, torch.float16])
        if latent_dtype in (torch.bfloat16, torch.float16):
            q_dtype = latent_dtype
        if cpu and latent_dtype == torch.float32:
            q_dtype = torch.float32
        rope_dtype = rng.choice([torch.bfloat16, torch.float16, torch.float8_e4m3fn])
        groups = [g for g in (8, 16, 24, 32, 64, 128, D_c) if D_c % g == 0 and g <= D_c]
        group_size = rng.choice(groups) if latent_dtype in QUANT_DTYPES else D_c
        # every even d_r up to 64 (d_r = 2r); the CUDA kernel pads those that are not multiples of 8
        d_r = rng.choice([8, 16, 32] if cpu else [2, 4, 6, 8, 12, 16, 16, 20, 24, 32, 32, 40, 64])
        if rope_dtype == torch.float8_e4m3fn and d_r % 4:
            d_r += 2  # fp8 keys: the kernel copies 4 bytes at least
        out.append(DecodeParam(B, s_q, H, H_kv, d_r, D_c, block_size, lens,
                               latent_dtype, rope_dtype, q_dtype, group_size, seed * 100003 + i))
    return out


def simple(**kw) -> DecodeParam:
    base = dict(B=3, s_q=2, H=6, H_kv=3, d_r=8, D_c=40, block_size=16, lens=(0, 17, 40),
                latent_dtype=torch.float32, rope_dtype=torch.float32, q_dtype=torch.float32,
                group_size=40, seed=1)
    base.update(kw)
    return DecodeParam(**base)


# ---------------------------------------------------------------- CPU


@pytest.mark.parametrize("p", random_params(60, seed=7, cpu=True), ids=lambda p: f"s{p.seed}")
def test_mla_decode_cpu_matches_reference(p):
    args, raw = make_inputs(p, "cpu")
    out = ops.mla_decode(*args)
    check_against_reference(p, out, args)
    check_format_error(p, out, args, raw)


def test_mla_decode_cpu_mha_and_mqa_exact():
    for H, H_kv in ((4, 4), (4, 1), (128, 2)):
        p = simple(H=H, H_kv=H_kv, s_q=3, lens=(5, 64, 33))
        args, _ = make_inputs(p, "cpu")
        o, lse = ops.mla_decode(*args)
        o_ref, lse_ref = reference.mla_decode(*args)
        torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


def test_mla_decode_plan_cpu_covers_every_tile_once():
    lens = [0, 1, 15, 16, 17, 4096, 300, 8191, 2]
    q = torch.zeros(len(lens), 1, 4, 512, dtype=torch.bfloat16)
    latent = torch.zeros(1, 16, 512, dtype=torch.bfloat16)
    k_rope = torch.zeros(1, 16, 2, 8, dtype=torch.bfloat16)
    plan = ops.mla_decode_plan(q, latent, None, k_rope, torch.tensor(lens, dtype=torch.int32))
    capacity, tile, used, batch = plan[:4].tolist()
    assert batch == len(lens) and capacity == 2048 + batch and plan.numel() == 4 + 4 * capacity + 2 * batch
    work = plan[4:4 + 4 * capacity].view(capacity, 4)
    info = plan[4 + 4 * capacity:].view(batch, 2)
    assert (work[used:, 0] == -1).all() and (work[:used, 0] >= 0).all()
    for b, n in enumerate(lens):
        first, splits = info[b].tolist()
        rows = work[first:first + splits]
        # each entry carries the length, so a decode CTA needs no second load to start
        assert (rows[:, 0] == b).all() and (rows[:, 3] == n).all()
        tiles = (n + tile - 1) // tile
        assert rows[0, 1] == 0 and rows[-1, 2] == tiles
        assert (rows[1:, 1] == rows[:-1, 2]).all()
        # what the kernels read as "not split": the entry covers the whole sequence
        whole = (rows[:, 1] == 0) & (rows[:, 2] == tiles)
        assert whole.tolist() == [splits == 1] * splits
    assert used <= torch.get_num_threads() + batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_opcheck_cpu(dtype):
    p = simple(q_dtype=dtype, latent_dtype=dtype, rope_dtype=dtype)
    args, _ = make_inputs(p, "cpu")
    opcheck(torch.ops.mla_ext.mla_decode.default, args)
    # fp8 tensors are left out: opcheck's schema check multiplies inputs, which fp8 lacks on CPU.
    p8 = simple(latent_dtype=torch.int8, rope_dtype=torch.float16, group_size=8)
    args8, _ = make_inputs(p8, "cpu")
    opcheck(torch.ops.mla_ext.mla_decode.default, args8)
    opcheck(torch.ops.mla_ext.mla_decode_plan.default,
            (args[0], args[2], args[3], args[5], args[8]))


def _bad_cases():
    def with_table(a, table):
        return a[:7] + (table,) + a[8:]

    def oob(a):
        t = a[7].clone()
        t[1, 0] = a[2].shape[0] + 5
        return with_table(a, t)
    return [
        (lambda a: with_table(a, a[7].long()), "block_table"),
        (oob, "block_table"),
        (lambda a: a[:8] + (torch.tensor([0, 17, 10**6], dtype=torch.int32),) + a[9:], "seq_lens"),
        (lambda a: a[:8] + (a[8].long(),) + a[9:], "seq_lens"),
        (lambda a: (a[0][:, :, :5].contiguous(),) + a[1:], "q_rope must have shape"),
        (lambda a: (a[0][:, :0].contiguous(), a[1][:, :0].contiguous()) + a[2:], "s_q"),
        (lambda a: (a[0].transpose(0, 1),) + a[1:], "q_lat must be contiguous"),
        (lambda a: a[:5] + (a[5][:, :, :1].expand(-1, -1, 4, -1).contiguous(),) + a[6:],
         "multiple of H_kv"),
        (lambda a: a[:3] + (torch.ones(a[2].shape[0], 16, 3, dtype=torch.float16),) + a[4:],
         "latent_scale and latent_zero must be None"),
    ]


@pytest.mark.parametrize("bad, match", _bad_cases())
def test_mla_decode_rejects_bad_input(bad, match):
    args, _ = make_inputs(simple(H=6, H_kv=3), "cpu")
    with pytest.raises(RuntimeError, match=match):
        ops.mla_decode(*bad(args))


def test_mla_decode_rejects_bad_quant_args():
    args, _ = make_inputs(simple(latent_dtype=torch.int8, group_size=8), "cpu")
    with pytest.raises(RuntimeError, match="latent_scale is required"):
        ops.mla_decode(*args[:3], None, *args[4:])
    bad_scale = torch.ones(args[2].shape[0], 16, 3, dtype=torch.float16)  # 3 does not divide 40
    with pytest.raises(RuntimeError, match="latent_scale"):
        ops.mla_decode(*args[:3], bad_scale, *args[4:])
    with pytest.raises(RuntimeError, match="latent_scale must have dtype"):
        ops.mla_decode(*args[:3], args[3].float(), *args[4:])
    args4, _ = make_inputs(simple(latent_dtype=torch.uint8, group_size=8), "cpu")
    with pytest.raises(RuntimeError, match="latent_zero is required"):
        ops.mla_decode(*args4[:4], None, *args4[5:])
    argsr, _ = make_inputs(simple(rope_dtype=torch.float8_e4m3fn), "cpu")
    with pytest.raises(RuntimeError, match="k_rope_scale is required"):
        ops.mla_decode(*argsr[:6], None, *argsr[7:])


def test_decode_kernel_setting_is_scoped_and_checked():
    """ops.decode_kernel sets the process-wide CUDA kernel request for a block and restores it;
    an unknown name is an error naming the argument, in Python and in C++."""
    assert ops.get_decode_kernel() == "auto"
    with ops.decode_kernel("mma"):
        assert ops.get_decode_kernel() == "mma"
        with ops.decode_kernel("ws"):
            assert ops.get_decode_kernel() == "ws"
        assert ops.get_decode_kernel() == "mma"
    assert ops.get_decode_kernel() == "auto"
    with pytest.raises(ValueError, match="decode_kernel: name must be one of"):
        ops.set_decode_kernel("wgmma")
    with pytest.raises(RuntimeError, match="decode_kernel: name must be auto, mma or ws"):
        ops._EXTENSION.set_decode_kernel("fast")
    assert ops.get_decode_kernel() == "auto"
    # the CPU kernel ignores it
    args, _ = make_inputs(simple(), "cpu")
    o, lse = ops.mla_decode(*args)
    with ops.decode_kernel("ws"):
        o_ws, lse_ws = ops.mla_decode(*args)
    assert torch.equal(o, o_ws) and torch.equal(lse, lse_ws)


# ---------------------------------------------------------------- CUDA


GPU_PARAMS = random_params(520, seed=11, cpu=False)


def decode_and_check(p: DecodeParam) -> tuple:
    """p's inputs through the op itself (the kernel ops.decode_kernel picks, never the
    fallback), checked against the reference and, for quantized caches, against the exact
    attention; returns the op's arguments."""
    args, raw = make_inputs(p, "cuda")
    out = torch.ops.mla_ext.mla_decode(*args, None)
    check_against_reference(p, out, args)
    check_format_error(p, out, args, raw)
    return args


@pytest.fixture
def kernel_setting():
    """Each test that sets the decode kernel leaves the default behind."""
    previous = ops.get_decode_kernel()
    yield
    ops.set_decode_kernel(previous)


def force_hopper_kernel(choice: str) -> None:
    """ops.set_decode_kernel(choice) (ws) for the test, skipped off a Hopper GPU."""
    if not hopper_gpu():
        pytest.skip(f"the {choice} decode kernel needs a compute capability 9.0 GPU")
    ops.set_decode_kernel(choice)


@pytest.mark.gpu
@pytest.mark.parametrize("p", GPU_PARAMS, ids=lambda p: f"s{p.seed}")
def test_mla_decode_cuda_matches_reference(p):
    # the mma.sync kernel on every draw (by default, shapes the warp-specialized kernel takes go
    # to it: tested below)
    with ops.decode_kernel("mma"):
        decode_and_check(p)


def assert_graph_replay_matches(args, o, lse):
    """mla_decode captured in a CUDA graph (plan included) replays to exactly (o, lse)."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        og, lg = ops.mla_decode(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(og, o) and torch.equal(lg, lse)


def check_long_splits_and_graph(shapes, block_size) -> None:
    """Each (D_c, H, H_kv, d_r, s_q) of shapes in bf16 and fp16 (latent, keys and queries) over
    long sequences next to empty and tiny ones (many splits), block_size(s_q) tokens per page,
    against the reference; then the last one replayed from a CUDA graph."""
    for D_c, H, H_kv, d_r, s_q in shapes:
        for dt in (torch.bfloat16, torch.float16):
            p = DecodeParam(4, s_q, H, H_kv, d_r, D_c, block_size(s_q), (20000, 0, 1, 7777), dt,
                            dt, dt, D_c, seed=D_c + H + s_q)
            args = decode_and_check(p)
    assert_graph_replay_matches(args, *ops.mla_decode(*args))


def hopper_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def warpspec_span_steps(H: int, H_kv: int, d_r: int) -> int:
    """k16 steps of the widest RoPE window of 8 consecutive query heads (api.cpp's rule)."""
    group = H // H_kv
    widest = max(((h0 + 7) // group - h0 // group + 1) * d_r for h0 in range(0, H, 8))
    steps = 1
    while steps * 16 < widest:
        steps *= 2
    return steps


def warpspec_params(n: int, seed: int) -> list[DecodeParam]:
    """Draws of random_params moved into what the warp-specialized kernel takes: H a multiple of
    8, D_c a multiple of 64 up to 256, d_r a multiple of 16 whose windows stay within 8 k16 steps,
    16-bit latent and RoPE keys in q's dtype, three 64-token slots in shared memory."""
    rng = random.Random(seed)
    out = []
    for p in random_params(n, seed, cpu=False):
        dt = rng.choice([torch.bfloat16, torch.float16])
        H = rng.choice([8, 16, 32, 32, 40, 64, 128])
        H_kv = rng.choice([d for d in range(1, H + 1) if H % d == 0])
        D_c = 64 * rng.randint(1, 4)
        d_r = rng.choice([16, 16, 32, 48, 64])

        def fits():
            # windows within 8 k16 steps; 3 slots of (D_c + H_kv d_r) 16-bit columns per token
            # next to the queries
            return (warpspec_span_steps(H, H_kv, d_r) <= 8
                    and D_c // 64 + -(-H_kv * d_r // 64) <= 7)

        while d_r > 16 and not fits():
            d_r -= 16
        while not fits():
            H_kv = rng.choice([d for d in range(1, H_kv) if H % d == 0])
        out.append(dataclasses.replace(p, H=H, H_kv=H_kv, D_c=D_c, d_r=d_r, latent_dtype=dt,
                                       rope_dtype=dt, q_dtype=dt, group_size=D_c))
    return out


def warpspec_quantized_params(n: int, seed: int) -> list[DecodeParam]:
    """warpspec_params with a quantized latent (int8, int4, fp8; groups of a multiple of 8
    channels), the KV heads' keys narrowed so that three 16-bit slots leave room for two slots of
    stored tiles: at most 5 64-column blocks of latent and keys per token."""
    rng = random.Random(seed)
    out = []
    for p in warpspec_params(n, seed):
        latent = rng.choice([torch.int8, torch.uint8, torch.float8_e4m3fn])
        group = rng.choice([g for g in (8, 16, 32, 64, p.D_c) if p.D_c % g == 0])
        H_kv, d_r = p.H_kv, p.d_r
        while p.D_c // 64 + -(-H_kv * d_r // 64) > 5:
            if d_r > 16:
                d_r -= 16
            else:
                H_kv = rng.choice([d for d in range(1, H_kv) if p.H % d == 0])
        out.append(dataclasses.replace(p, latent_dtype=latent, H_kv=H_kv, d_r=d_r,
                                       group_size=group))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("p", warpspec_quantized_params(96, seed=29), ids=lambda p: f"s{p.seed}")
def test_mla_decode_warpspec_quantized_matches_reference(p, kernel_setting):
    """The producer warpgroup dequantizes the stored tiles into the slots the consumers read."""
    force_hopper_kernel("ws")
    decode_and_check(p)


@pytest.mark.gpu
@pytest.mark.parametrize("p", warpspec_params(160, seed=17), ids=lambda p: f"s{p.seed}")
def test_mla_decode_warpspec_kernel_matches_reference(p, kernel_setting):
    force_hopper_kernel("ws")
    decode_and_check(p)


@pytest.mark.gpu
def test_mla_decode_warpspec_kernel_long_split_and_graph(kernel_setting):
    force_hopper_kernel("ws")
    # the Llama-3 shape, MQA, MHA with small latents, several query tokens, odd lengths
    check_long_splits_and_graph(((256, 32, 8, 16, 1), (256, 32, 8, 16, 4), (128, 64, 1, 64, 2),
                                 (64, 16, 16, 16, 1), (192, 16, 4, 32, 8)),
                                block_size=lambda s_q: 16 if s_q > 1 else 64)


@pytest.mark.gpu
def test_mla_decode_kernel_choice_errors(kernel_setting):
    # fp8 keys: the warp-specialized kernel does not take them
    p = DecodeParam(2, 1, 8, 2, 16, 64, 16, (40, 3), torch.int8, torch.float8_e4m3fn,
                    torch.bfloat16, 16, seed=9)
    args, _ = make_inputs(p, "cuda")
    ops.set_decode_kernel("ws")
    with pytest.raises(RuntimeError, match="warp-specialized kernel does not apply"):
        torch.ops.mla_ext.mla_decode(*args, None)
    ops.set_decode_kernel("mma")
    check_against_reference(p, torch.ops.mla_ext.mla_decode(*args, None), args)


@pytest.mark.gpu
def test_mla_decode_default_kernel_choice(kernel_setting):
    """Unset (auto): the warp-specialized kernel where it applies, else the mma.sync kernel; the
    kernels differ in summation order, so bitwise equality names the one that ran."""
    if not hopper_gpu():
        pytest.skip("the choice differs from mma only on a compute capability 9.0 GPU")
    gqa = DecodeParam(2, 1, 32, 8, 16, 256, 64, (3000, 77), torch.bfloat16, torch.bfloat16,
                      torch.bfloat16, 256, seed=21)
    quant = dataclasses.replace(gqa, latent_dtype=torch.int8, group_size=64)
    fp8_keys = dataclasses.replace(gqa, latent_dtype=torch.uint8, rope_dtype=torch.float8_e4m3fn,
                                   group_size=64)
    for p, expected in ((gqa, "ws"), (quant, "ws"), (fp8_keys, "mma")):
        args, _ = make_inputs(p, "cuda")
        outs = {}
        for choice in ("auto", "ws", "mma"):
            try:
                with ops.decode_kernel(choice):
                    outs[choice] = torch.ops.mla_ext.mla_decode(*args, None)
            except RuntimeError:
                assert choice == "ws" and expected == "mma"
        default = torch.ops.mla_ext.mla_decode(*args, None)
        for o in (outs["auto"], default):
            assert torch.equal(o[0], outs[expected][0]) and torch.equal(o[1], outs[expected][1])
        check_against_reference(p, default, args)


@pytest.mark.gpu
def test_mla_decode_cuda_long_and_split():
    # Long sequences next to empty and tiny ones: many splits per sequence and the LSE merge.
    # d_r = 12: the default conversion's r = 6 (keys padded to 16 in shared memory).
    for D_c, H, H_kv, d_r in ((512, 32, 8, 16), (2048, 32, 32, 16), (96, 9, 3, 12),
                              (1024, 128, 128, 16), (512, 32, 32, 12)):
        for dt in (torch.bfloat16, torch.uint8, torch.int8, torch.float8_e4m3fn):
            p = DecodeParam(4, 1, H, H_kv, d_r, D_c, 64, (20000, 0, 1, 7777), dt,
                            torch.float8_e4m3fn, torch.bfloat16, 64 if D_c % 64 == 0 else D_c,
                            seed=D_c + H)
            decode_and_check(p)


@pytest.mark.gpu
def test_mla_decode_cuda_plan_reuse_and_graph():
    p = DecodeParam(5, 2, 32, 8, 16, 512, 64, (3000, 5, 0, 64, 1500), torch.int8,
                    torch.bfloat16, torch.bfloat16, 64, seed=3)
    args, _ = make_inputs(p, "cuda")
    q, _, latent, scale, _, k_rope, _, _, lens, _ = args
    plan = ops.mla_decode_plan(q, latent, scale, k_rope, lens)
    o1, l1 = ops.mla_decode(*args)
    o2, l2 = ops.mla_decode(*args, sched_meta=plan)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    with pytest.raises(RuntimeError, match="sched_meta"):
        ops.mla_decode(*args, sched_meta=plan[:-1])
    assert_graph_replay_matches(args, o1, l1)


@pytest.mark.gpu
def test_mla_decode_cuda_falls_back_to_reference_with_a_warning():
    # fp8 keys with d_r = 6 (r = 3 pairs) are 6 bytes per head, below the kernel's 4-byte copies
    # at a 4-byte alignment: reference, warned once
    p = DecodeParam(2, 1, 8, 4, 6, 64, 16, (40, 7), torch.bfloat16, torch.float8_e4m3fn,
                    torch.bfloat16, 64, seed=4)
    args, _ = make_inputs(p, "cuda")
    ops._warned_fallbacks.clear()
    with pytest.warns(RuntimeWarning, match="d_r = 6"):
        out = ops.mla_decode(*args)
    check_against_reference(p, out, args)


@pytest.mark.gpu
def test_mla_decode_cpu_vs_cuda():
    p = DecodeParam(3, 3, 9, 3, 8, 96, 16, (100, 0, 33), torch.uint8, torch.float8_e4m3fn,
                    torch.bfloat16, 32, seed=5)
    args, _ = make_inputs(p, "cpu")
    o_cpu, l_cpu = ops.mla_decode(*args)
    o_gpu, l_gpu = ops.mla_decode(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
    torch.testing.assert_close(o_gpu.cpu().float(), o_cpu.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(l_gpu.cpu(), l_cpu, atol=2e-3, rtol=1e-3)


@pytest.mark.gpu
def test_mla_decode_opcheck_cuda():
    p = DecodeParam(2, 2, 8, 2, 16, 64, 16, (40, 3), torch.int8, torch.bfloat16,
                    torch.bfloat16, 16, seed=9)
    args, _ = make_inputs(p, "cuda")
    opcheck(torch.ops.mla_ext.mla_decode.default, args)
    opcheck(torch.ops.mla_ext.mla_decode_plan.default,
            (args[0], args[2], args[3], args[5], args[8]))


@pytest.mark.gpu
def test_mla_decode_cuda_rejects_bad_input():
    args, _ = make_inputs(simple(q_dtype=torch.bfloat16, latent_dtype=torch.bfloat16,
                                 rope_dtype=torch.bfloat16), "cuda")
    t = args[7].clone()
    t[2, 0] = 10**6
    with pytest.raises(RuntimeError, match="block_table"):
        ops.mla_decode(*args[:7], t, *args[8:])
    with pytest.raises(RuntimeError, match="seq_lens"):
        ops.mla_decode(*args[:8], torch.tensor([0, 17, 10**6], dtype=torch.int32, device="cuda"),
                       *args[9:])
    # the kernel itself refuses fp32; the wrapper routes that combination to the reference
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.mla_ext.mla_decode(args[0].float(), args[1].float(), args[2].float(),
                                     *args[3:])
    out, lse = ops.mla_decode(args[0].float(), args[1].float(), args[2].float(), *args[3:])
    ref, ref_lse = reference.mla_decode(args[0].float(), args[1].float(), args[2].float(),
                                        *args[3:])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
