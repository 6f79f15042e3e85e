"""Test helpers of the paged latent cache ops: poisoned caches, random configurations, and the
comparisons that define "matches the reference" for each cache format.

A quantized code may differ from the reference's by one step where the value sits on a rounding
tie and the two sides divide differently (the CUDA build uses fast-math division); such ties are
counted and bounded, never ignored. Scales, zeros and float-format values must match bit for bit.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mla_ext import reference

LATENT_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.uint8,
                 torch.float8_e4m3fn]
ROPE_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]
FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
QUANTIZED = (torch.int8, torch.uint8, torch.float8_e4m3fn)

# At most this fraction of a tensor's quantized codes may sit one step off (rounding ties).
MAX_TIE_FRACTION = 1e-3


def replace_arg(i, value):
    """A bad-argument case: the op's positional arguments with argument i replaced by value, or
    by value(old) where value is callable."""
    def f(args):
        args = list(args)
        args[i] = value(args[i]) if callable(value) else value
        return args
    return f


@dataclass
class CacheConfig:
    num_blocks: int
    block_size: int
    d_c: int
    h_kv: int
    d_r: int
    latent_dtype: torch.dtype
    rope_dtype: torch.dtype
    group: int  # quantization group size (ignored by float formats)

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.block_size


def make_cache(cfg: CacheConfig, device, poison: bool = True):
    """[latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale], filled with random bytes
    (NaNs and garbage) when poisoned, so that any write or read of a wrong row shows."""
    nb, bs = cfg.num_blocks, cfg.block_size
    width = cfg.d_c // 2 if cfg.latent_dtype == torch.uint8 else cfg.d_c
    quantized = cfg.latent_dtype in QUANTIZED
    groups = cfg.d_c // cfg.group

    def alloc(shape, dtype):
        t = torch.empty(shape, dtype=dtype, device=device)
        raw = t.view(torch.uint8)
        if poison:
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, device=device))
            if dtype.is_floating_point and dtype.itemsize > 1:
                t.view(-1)[::3] = float("nan")
        else:
            raw.zero_()
        return t

    latent = alloc((nb, bs, width), cfg.latent_dtype)
    scale = alloc((nb, bs, groups), torch.float16) if quantized else None
    zero = alloc((nb, bs, groups), torch.float16) if cfg.latent_dtype == torch.uint8 else None
    k_rope = alloc((nb, bs, cfg.h_kv, cfg.d_r), cfg.rope_dtype)
    k_scale = (alloc((nb, bs, cfg.h_kv), torch.float16)
               if cfg.rope_dtype == torch.float8_e4m3fn else None)
    return [latent, scale, zero, k_rope, k_scale]


def clone_cache(cache):
    return [t.clone() if t is not None else None for t in cache]


def raw(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of t as an integer tensor (NaN-safe exact comparison)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def random_groups(d_c: int, rng: random.Random) -> int:
    """A group size that divides D_c: usually 8/16/32/64, sometimes D_c itself or an odd one."""
    choices = [g for g in (8, 16, 32, 64) if d_c % g == 0]
    odd = [g for g in (3, 5, 25) if d_c % g == 0]
    roll = rng.random()
    if roll < 0.1:
        return d_c
    if roll < 0.2 and odd:
        return rng.choice(odd)
    return rng.choice(choices)


def random_cache_config(rng: random.Random, n_tokens: int, *, max_d_c: int = 2048,
                        latent_dtype=None, rope_dtype=None) -> CacheConfig:
    d_c = rng.choice([24, 40, 48, 200, 256, 512, 8 * rng.randint(3, max_d_c // 8)])
    d_c = min(d_c, max_d_c)
    block_size = rng.choice([16, 32, 64])
    num_blocks = max(1, -(-n_tokens // block_size)) + rng.randint(1, 3)
    return CacheConfig(
        num_blocks=num_blocks, block_size=block_size, d_c=d_c,
        h_kv=rng.choice([1, 2, 3, 5, 8, 16, 32]), d_r=rng.choice([8, 16, 32]),
        latent_dtype=latent_dtype or rng.choice(LATENT_DTYPES),
        rope_dtype=rope_dtype or rng.choice(ROPE_DTYPES), group=random_groups(d_c, rng))


def random_slots(n: int, capacity: int, gen: torch.Generator, skip_fraction: float = 0.2):
    """n distinct shuffled slots, about skip_fraction of them -1."""
    slots = torch.randperm(capacity, generator=gen)[:n]
    skip = torch.rand(n, generator=gen) < skip_fraction
    return torch.where(skip, torch.full_like(slots, -1), slots)


def random_values(shape, dtype, gen, device):
    """Gaussian values with some rows scaled far up/down and a few exact-zero rows (all-zero
    groups exercise the scale = 0 path)."""
    x = torch.randn(shape, generator=gen)
    if shape[0] > 0:
        row_scale = torch.exp2(torch.randint(-4, 7, (shape[0],), generator=gen).float())
        x = x * row_scale.view(-1, *([1] * (len(shape) - 1)))
        x[torch.rand(shape[0], generator=gen) < 0.1] = 0
    return x.to(dtype).to(device)


# ---------------------------------------------------------------- comparisons

def _code_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in quantization steps between two code tensors of one format."""
    if a.dtype == torch.int8:
        return (a.int() - b.int()).abs()
    if a.dtype == torch.uint8:  # int4 pairs
        return (reference.unpack_int4(a).int() - reference.unpack_int4(b).int()).abs()
    if a.dtype == torch.float8_e4m3fn:
        def ordinal(t):  # e4m3fn bits are sign-magnitude and monotonic in the magnitude
            u = t.view(torch.uint8).int()
            return torch.where(u >= 128, -(u - 128), u)
        return (ordinal(a) - ordinal(b)).abs()
    raise TypeError(a.dtype)


def assert_codes_match(got: torch.Tensor, want: torch.Tensor, what: str) -> int:
    """Exact match of quantized codes up to counted one-step ties; returns the tie count."""
    dist = _code_distance(got, want)
    ties = int((dist > 0).sum())
    assert int(dist.max()) <= 1 if dist.numel() else True, \
        f"{what}: a code differs by {int(dist.max())} steps from the reference"
    assert ties <= max(2, MAX_TIE_FRACTION * dist.numel()), \
        f"{what}: {ties} of {dist.numel()} codes differ by one step (rounding ties)"
    return ties


CACHE_NAMES = ["latent", "latent_scale", "latent_zero", "k_rope_cache", "k_rope_scale"]


def written_mask(slots: torch.Tensor, cache_tensor: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(cache_tensor.shape[0] * cache_tensor.shape[1], dtype=torch.bool)
    mask[slots[slots >= 0].long().cpu()] = True
    return mask


def assert_untouched(got, initial, slots: torch.Tensor, what: str) -> None:
    """Every cache row that no slot names is bit-for-bit what it was (poison included)."""
    for name, g, init in zip(CACHE_NAMES, got, initial):
        if g is None:
            continue
        mask = written_mask(slots, g)
        g2, i2 = g.flatten(0, 1).cpu(), init.flatten(0, 1).cpu()
        assert torch.equal(raw(g2[~mask]), raw(i2[~mask])), \
            f"{what}: {name} changed in rows that were not written"


def assert_cache_matches(got, want, slots: torch.Tensor, initial, what: str) -> int:
    """got/want: caches after the kernel / the reference wrote `slots`; initial: the poisoned
    cache before. Written rows must match (codes up to ties, scales and floats exactly); every
    other row must be bit-for-bit untouched. Returns the number of ties."""
    assert_untouched(got, initial, slots, what)
    ties = 0
    for name, g, w in zip(CACHE_NAMES, got, want):
        if g is None:
            assert w is None
            continue
        mask = written_mask(slots, g)
        gw, ww = g.flatten(0, 1).cpu()[mask], w.flatten(0, 1).cpu()[mask]
        if g.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn):
            ties += assert_codes_match(gw, ww, f"{what}: {name}")
        else:
            bad = raw(gw) != raw(ww)
            assert not bool(bad.any()), (
                f"{what}: {name} differs from the reference in {int(bad.sum())} of "
                f"{bad.numel()} values, e.g. {gw[bad][:4].tolist()} vs {ww[bad][:4].tolist()}")
    return ties


def dequant_error_bound(x: torch.Tensor, latent_dtype, group: int) -> torch.Tensor:
    """Per-element bound of |dequantize(quantize(x)) - x| for the format, x: (n, D) fp32.

    Rounding costs at most half a step; the fp16 rounding of the scale (and of the int4 zero)
    can push the group's extreme past the last code by a relative 2^-11 (plus half an fp16
    subnormal step, 2^-25, for tiny scales), hence the small extra terms. fp8 e4m3 keeps 3
    mantissa bits: relative 2^-4, plus half its smallest subnormal step."""
    xg = x.float().unflatten(-1, (-1, group))
    amax = xg.abs().amax(-1, keepdim=True)
    tiny = 1e-6 * xg.abs() + 1e-30
    if latent_dtype in FLOAT_DTYPES:
        eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 0.0}[latent_dtype]
        subnormal = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-25,
                     torch.float32: 0.0}[latent_dtype]
        return (xg.abs() * eps + subnormal + tiny).flatten(-2)
    if latent_dtype == torch.int8:
        step = amax / reference.INT8_MAX
        return (0.5 * step + amax * 2.0**-10 + reference.INT8_MAX * 2.0**-24 + tiny).flatten(-2)
    if latent_dtype == torch.uint8:
        lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        step = (hi - lo) / reference.INT4_MAX
        return (0.5 * step + (lo.abs() + hi.abs()) * 2.0**-10 + reference.INT4_MAX * 2.0**-24
                + tiny).flatten(-2)
    step = amax / reference.FP8_MAX
    return (xg.abs() * 2.0**-4 + step * 2.0**-9 + amax * 2.0**-10 + reference.FP8_MAX * 2.0**-24
            + tiny).flatten(-2)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def paged_layout(seq_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator,
                 extra_cols: int = 1):
    """A shuffled block table for the given sequence lengths plus the slot of every token.

    Returns block_table (B, max_blocks) int32 with sentinel ids in unused entries, and per
    sequence the (len,) int64 slots of its tokens in order."""
    need = [ceil_div(n, block_size) for n in seq_lens]
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(need + [0]) + extra_cols
    table = torch.full((len(seq_lens), max_blocks), 2**31 - 1000, dtype=torch.int32)
    slots, used = [], 0
    for b, (n, k) in enumerate(zip(seq_lens, need)):
        blocks = perm[used:used + k]
        used += k
        table[b, :k] = blocks.int()
        pos = torch.arange(n)
        slots.append(blocks[pos // block_size].long() * block_size + pos % block_size)
    return table, slots


def isclose_report(got, want, bound, what):
    err = (got - want).abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} values exceed the bound; e.g. got "
            f"{got.flatten()[i].item()}, want {want.flatten()[i].item()}, bound "
            f"{bound.flatten()[i].item()}")

