"""Pure-PyTorch math of every op: the ground truth of the tests and the format spec of the cache.

Every kernel in csrc/ must compute what the functions here compute. Shapes use the names of
ARCHITECTURE.md section 1: ``B, s_q, H, H_kv, D_c, d_r (= 2 r), block_size, num_blocks``.

Cache formats (one per latent dtype, ARCHITECTURE section 3.3):

============  ==========================  =====================  ===========================
latent dtype  latent shape                scale / zero           value of channel ``i``
============  ==========================  =====================  ===========================
bf16/fp16/32  ``[nb, bs, D_c]``           none                   ``latent[..., i]``
int8          ``[nb, bs, D_c]``           scale fp16 ``[.., D_c/g]``   ``q * scale``, ``|q| <= 127``
fp8 e4m3      ``[nb, bs, D_c]``           scale fp16 ``[.., D_c/g]``   ``float(q) * scale``
int4 (uint8)  ``[nb, bs, D_c/2]``         scale, zero fp16             ``q * scale + zero``, ``0 <= q <= 15``
============  ==========================  =====================  ===========================

For int4, byte ``k`` holds channel ``2k`` in its low nibble and ``2k+1`` in its high nibble; the
zero is the group minimum (an offset, not an integer zero point). Groups are ``g`` consecutive
channels of one token; ``g`` is ``D_c / latent_scale.shape[-1]``. The RoPE keys are stored as
``k_rope [nb, bs, H_kv, d_r]`` in a float dtype, or fp8 e4m3 with ``k_rope_scale [nb, bs, H_kv]``
fp16 (one scale per token and KV head). Scales are rounded to fp16 *before* the values are
quantized with them, so that quantize -> dequantize uses one scale on both sides. A group that
holds a NaN or an infinity, or whose fp16 scale overflows, gets a NaN scale and codes 0: all its
values read back NaN (ARCHITECTURE section 3.4, non-finite values).
"""
from __future__ import annotations

import math

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
INT4_MAX = 15.0
SCALE_DTYPE = torch.float16

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- partial RoPE

def partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on compact partial-RoPE vectors.

    x:   (N, heads, d_r) float; head ``h`` belongs to KV head ``h // (heads // H_kv)``.
    cos: (N, H_kv, r) angles' cosines for each kept pair of each KV head; sin likewise.
    Returns (N, heads, d_r) in x's dtype: ``[x1*cos - x2*sin | x2*cos + x1*sin]``.
    """
    n, heads, d_r = x.shape
    h_kv, r = cos.shape[1], cos.shape[2]
    group = heads // h_kv
    c = cos.float().repeat_interleave(group, dim=1)
    s = sin.float().repeat_interleave(group, dim=1)
    x1, x2 = x.float()[..., :r], x.float()[..., r:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


# ---------------------------------------------------------------- quantization

def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    return x.float().unflatten(-1, (x.shape[-1] // group_size, group_size))


def _group_scale(s: torch.Tensor) -> torch.Tensor:
    """fp16 scale of each group; NaN where the group holds a NaN or an infinity or its scale
    overflows fp16. The quantizers give such a group codes 0, so all its values read back NaN."""
    s = s.to(SCALE_DTYPE)
    return torch.where(s.isfinite(), s, torch.nan)


def quantize_int8(x: torch.Tensor, group_size: int):
    """x (..., D) -> (q int8 (..., D), scale fp16 (..., D/g)); symmetric, per group."""
    xg = _grouped(x, group_size)
    scale = _group_scale(xg.abs().amax(-1) / INT8_MAX)
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(xg / torch.where(s > 0, s, 1.0)), 0.0)
    return q.clamp(-INT8_MAX, INT8_MAX).to(torch.int8).flatten(-2), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    g = q.shape[-1] // scale.shape[-1]
    return (_grouped(q, g) * scale.float().unsqueeze(-1)).flatten(-2)


def quantize_int4(x: torch.Tensor, group_size: int):
    """x (..., D) -> (packed uint8 (..., D/2), scale fp16, zero fp16 (..., D/g)); asymmetric."""
    xg = _grouped(x, group_size)
    lo, hi = xg.amin(-1), xg.amax(-1)
    zero = lo.to(SCALE_DTYPE)
    scale = _group_scale((hi - zero.float()) / INT4_MAX)
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round((xg - z) / torch.where(s > 0, s, 1.0)), 0.0)
    q = q.clamp(0, INT4_MAX).to(torch.uint8).flatten(-2)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, scale, zero


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed)
    g = q.shape[-1] // scale.shape[-1]
    return (_grouped(q, g) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).flatten(-2)


def quantize_fp8(x: torch.Tensor, group_size: int):
    """x (..., D) -> (q float8_e4m3fn (..., D), scale fp16 (..., D/g))."""
    xg = _grouped(x, group_size)
    scale = _group_scale(xg.abs().amax(-1) / FP8_MAX)
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, xg / torch.where(s > 0, s, 1.0), 0.0).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn).flatten(-2), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    g = q.shape[-1] // scale.shape[-1]
    return (_grouped(q, g) * scale.float().unsqueeze(-1)).flatten(-2)


def latent_format(latent: torch.Tensor) -> str:
    """Name of the cache format stored in a latent tensor, from its dtype."""
    if latent.dtype in FLOAT_DTYPES:
        return "float"
    return {torch.int8: "int8", torch.uint8: "int4", torch.float8_e4m3fn: "fp8"}[latent.dtype]


def quantize_latent(c: torch.Tensor, latent_dtype: torch.dtype, group_size: int):
    """c (..., D_c) float -> (latent, scale | None, zero | None) in the format of latent_dtype."""
    if latent_dtype in FLOAT_DTYPES:
        return c.to(latent_dtype), None, None
    if latent_dtype == torch.int8:
        return (*quantize_int8(c, group_size), None)
    if latent_dtype == torch.uint8:
        return quantize_int4(c, group_size)
    if latent_dtype == torch.float8_e4m3fn:
        return (*quantize_fp8(c, group_size), None)
    raise ValueError(f"unsupported latent dtype {latent_dtype}")


def dequantize_latent(latent, scale=None, zero=None) -> torch.Tensor:
    """Inverse of quantize_latent, as float32 (..., D_c)."""
    fmt = latent_format(latent)
    if fmt == "float":
        return latent.float()
    if fmt == "int8":
        return dequantize_int8(latent, scale)
    if fmt == "int4":
        return dequantize_int4(latent, scale, zero)
    return dequantize_fp8(latent, scale)


def quantize_k_rope(k_rope: torch.Tensor, rope_dtype: torch.dtype):
    """k_rope (..., H_kv, d_r) -> (stored, scale (..., H_kv) | None); fp8 scales per token-head."""
    if rope_dtype in FLOAT_DTYPES:
        return k_rope.to(rope_dtype), None
    if rope_dtype == torch.float8_e4m3fn:
        q, scale = quantize_fp8(k_rope, k_rope.shape[-1])
        return q, scale.squeeze(-1)
    raise ValueError(f"unsupported k_rope dtype {rope_dtype}")


def dequantize_k_rope(k_rope: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    if k_rope.dtype in FLOAT_DTYPES:
        return k_rope.float()
    return dequantize_fp8(k_rope, scale.unsqueeze(-1))


# ---------------------------------------------------------------- cache ops

def latent_cache_write(c, k_rope, slot_mapping, latent, latent_scale, latent_zero,
                       k_rope_cache, k_rope_scale) -> None:
    """Quantize and write N tokens into the paged cache (in place).

    c: (N, D_c) float; k_rope: (N, H_kv, d_r) float, already rotated;
    slot_mapping: (N,) int64, ``block * block_size + offset``, -1 skips the token.
    Cache tensors as in the module docstring; scale/zero tensors are None where the format has none.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    if slots.numel() == 0:
        return
    block_size = latent.shape[1]
    blk, off = slots // block_size, slots % block_size
    g = c.shape[-1] // latent_scale.shape[-1] if latent_scale is not None else c.shape[-1]
    lat, sc, zr = quantize_latent(c[keep], latent.dtype, g)
    latent[blk, off] = lat
    if sc is not None:
        latent_scale[blk, off] = sc
    if zr is not None:
        latent_zero[blk, off] = zr
    kr, kr_scale = quantize_k_rope(k_rope[keep], k_rope_cache.dtype)
    k_rope_cache[blk, off] = kr
    if kr_scale is not None:
        k_rope_scale[blk, off] = kr_scale


def latent_project(x, w_down, w_kr, b_kr, cos, sin, slot_mapping, latent, latent_scale,
                   latent_zero, k_rope_cache, k_rope_scale) -> None:
    """Fused decode-time projection: ``c = x W_down^T``, ``k_r = rope(x W_kr^T + b_kr)``, write both.

    x: (N, d); w_down: (D_c, d); w_kr: (H_kv d_r, d); b_kr: (H_kv d_r,) or None;
    cos, sin: (N, H_kv, r). Accumulates in fp32; c and k_r are rounded to x's dtype before the
    cache write, as the unfused sequence of torch ops would.
    """
    h_kv, d_r = k_rope_cache.shape[2], k_rope_cache.shape[3]
    c = (x.float() @ w_down.float().t()).to(x.dtype)
    kr = x.float() @ w_kr.float().t()
    if b_kr is not None:
        kr = kr + b_kr.float()
    kr = partial_rope(kr.to(x.dtype).view(-1, h_kv, d_r), cos, sin)
    latent_cache_write(c, kr, slot_mapping, latent, latent_scale, latent_zero, k_rope_cache,
                       k_rope_scale)


def _context(cache_tensor, block_table_row, length):
    """Rows 0..length-1 of one sequence's paged tensor, in token order."""
    block_size = cache_tensor.shape[1]
    n_blocks = (length + block_size - 1) // block_size
    blocks = block_table_row[:n_blocks].long()
    return cache_tensor[blocks].flatten(0, 1)[:length]


def latent_gather(latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale, block_table,
                  seq_lens, max_len: int):
    """Dequantized context of each sequence, padded with zeros.

    Returns c: (B, max_len, D_c) fp32 and k_rope: (B, max_len, H_kv, d_r) fp32; positions at or
    past ``seq_lens[b]`` are zero. ``max_len`` must be >= max(seq_lens).
    """
    b = block_table.shape[0]
    d_c = latent.shape[-1] * (2 if latent.dtype == torch.uint8 else 1)
    h_kv, d_r = k_rope_cache.shape[2], k_rope_cache.shape[3]
    c_out = torch.zeros(b, max_len, d_c, dtype=torch.float32, device=latent.device)
    k_out = torch.zeros(b, max_len, h_kv, d_r, dtype=torch.float32, device=latent.device)
    for i in range(b):
        n = int(seq_lens[i])
        if n == 0:
            continue
        row = block_table[i]
        sc = _context(latent_scale, row, n) if latent_scale is not None else None
        zr = _context(latent_zero, row, n) if latent_zero is not None else None
        c_out[i, :n] = dequantize_latent(_context(latent, row, n), sc, zr)
        ks = _context(k_rope_scale, row, n) if k_rope_scale is not None else None
        k_out[i, :n] = dequantize_k_rope(_context(k_rope_cache, row, n), ks)
    return c_out, k_out


def mla_decode(q_lat, q_rope, latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale,
               block_table, seq_lens, softmax_scale: float):
    """Absorbed MLA attention over the paged latent cache (ARCHITECTURE section 3.2).

    q_lat: (B, s_q, H, D_c); q_rope: (B, s_q, H, d_r), already rotated.
    block_table: (B, max_blocks) int32; seq_lens: (B,) int32, context length *including* the s_q
    new tokens (already written). New token ``i`` sits at position ``seq_lens[b] - s_q + i`` and
    sees positions ``<=`` its own. Query head ``h`` uses KV head ``h // (H // H_kv)``.
    Returns o_lat: (B, s_q, H, D_c) in q_lat's dtype and lse: (B, s_q, H) fp32 (natural log of
    the sum of ``exp(score)``, with the scale applied); a query that sees no token gets o = 0 and
    lse = -inf. A query row with a score that is not finite (a NaN or an infinity in the row's
    query or in a token it sees, or a score beyond fp32) gets o = NaN and lse = NaN; tokens a row
    does not see never change it.
    """
    bsz, s_q, h, d_c = q_lat.shape
    h_kv = k_rope_cache.shape[2]
    group = h // h_kv
    max_len = int(seq_lens.max()) if bsz else 0
    c, kr = latent_gather(latent, latent_scale, latent_zero, k_rope_cache, k_rope_scale,
                          block_table, seq_lens, max_len)
    kr = kr.repeat_interleave(group, dim=2)                        # (B, T, H, d_r)
    scores = torch.einsum("bqhc,btc->bhqt", q_lat.float(), c)
    scores = scores + torch.einsum("bqhr,bthr->bhqt", q_rope.float(), kr)
    scores = scores * softmax_scale
    pos_t = torch.arange(max_len, device=q_lat.device)
    pos_q = seq_lens.long().view(bsz, 1) - s_q + torch.arange(s_q, device=q_lat.device)
    visible = pos_t.view(1, 1, max_len) <= pos_q.view(bsz, s_q, 1)           # (B, s_q, T)
    visible = (visible & (pos_t.view(1, 1, max_len) < seq_lens.long().view(bsz, 1, 1))).unsqueeze(1)
    not_finite = (visible & ~scores.isfinite()).any(-1)                        # (B, H, s_q)
    scores = scores.masked_fill(~visible | not_finite.unsqueeze(-1), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)                                    # (B, H, s_q)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(-1e30))
    # A row's visible tokens are finite (else the row is not_finite); a token it does not see
    # has weight 0 and must not turn the row NaN through 0 * inf or 0 * NaN.
    o_lat = torch.einsum("bhqt,btc->bqhc", probs, torch.where(c.isfinite(), c, 0.0))
    o_lat = o_lat.masked_fill(not_finite.transpose(1, 2).unsqueeze(-1), math.nan)
    lse = lse.masked_fill(not_finite, math.nan)
    return o_lat.to(q_lat.dtype), lse.transpose(1, 2).contiguous()
