"""Partial RoPE: which frequency pairs of each KV head keep their rotation (ARCHITECTURE 2.1).

Pair ``j`` (``0 <= j < d_h/2``) is dims ``j`` and ``j + d_h/2`` of a head in HF's rotate-half
layout; pair 0 rotates fastest. A selection is one ascending row of ``r`` pair indices per KV
head; the query heads of a group use their KV head's row (query head ``h`` belongs to KV head
``h // (H / H_kv)``, as in HF's ``repeat_kv``).
"""
from __future__ import annotations

import torch

from .calibration import LayerStats

STRATEGIES = ("high", "low", "uniform", "2-norm", "rotation", "full")


def _check_heads(head_dim: int, num_heads: int, num_kv_heads: int) -> None:
    for name, value in (("head_dim", head_dim), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (RoPE rotates pairs of dims), got {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")


def two_norm_scores(stats: LayerStats, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """2-norm score of every pair of every KV head.

    Returns (H_kv, d_h/2) float64: for KV head ``g`` and pair ``j``,
    ``sum over query heads q of g's group of q_pair_norm[q, j] * k_pair_norm[g, j]``.
    """
    q, k = stats.q_pair_norm, stats.k_pair_norm
    if q.dim() != 2 or k.dim() != 2:
        raise ValueError(f"stats.q_pair_norm and stats.k_pair_norm must be 2-D, got shapes "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    pairs = q.shape[1]
    if pairs < 1:
        raise ValueError("stats have no RoPE pairs (q_pair_norm has 0 columns)")
    _check_heads(2 * pairs, num_heads, num_kv_heads)
    if q.shape != (num_heads, pairs) or k.shape != (num_kv_heads, pairs):
        raise ValueError(f"stats shapes q_pair_norm {tuple(q.shape)}, k_pair_norm {tuple(k.shape)} "
                         f"do not match num_heads={num_heads}, num_kv_heads={num_kv_heads} with "
                         "the same number of pairs")
    q = q.to(torch.float64)
    k = k.to(device=q.device, dtype=torch.float64)
    group = num_heads // num_kv_heads
    return q.reshape(num_kv_heads, group, pairs).sum(dim=1) * k


def rotation_scores(stats: LayerStats, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Rotation-aware score of every pair of every KV head, (H_kv, d_h/2) float64.

    The 2-norm score times ``1 - |E_w[exp(i theta_j Delta)]|``, with ``w`` the attention mass at
    each query-key distance ``Delta`` (averaged over the group's query heads). A pair whose
    rotation barely moves over the distances the head attends to (``|E| ~ 1``) loses little when
    its rotation is removed, so it scores low; a pair that turns a lot is worth keeping.
    """
    if stats.distance_mass is None or stats.inv_freq is None:
        raise ValueError('strategy "rotation" needs stats with distance_mass and inv_freq: '
                         "calibrate(..., collect_distances=True)")
    mass, theta = stats.distance_mass.to(torch.float64), stats.inv_freq.to(torch.float64)
    if mass.shape[0] != num_heads:
        raise ValueError(f"stats.distance_mass has {mass.shape[0]} heads, expected {num_heads}")
    w = mass.reshape(num_kv_heads, num_heads // num_kv_heads, -1).mean(1)   # (H_kv, L)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
    angle = theta[:, None] * torch.arange(w.shape[1], dtype=torch.float64)  # (d_h/2, L)
    coherence = torch.complex(w @ angle.cos().T, w @ angle.sin().T).abs()   # (H_kv, d_h/2)
    return two_norm_scores(stats, num_heads, num_kv_heads) * (1 - coherence)


def select_rope_pairs(strategy: str, rope_pairs: int | None, *, head_dim: int, num_heads: int,
                      num_kv_heads: int, stats: LayerStats | None = None) -> torch.Tensor:
    """Kept RoPE pairs of one layer, int64 (H_kv, r) on the CPU, ascending per row.

    strategy: one of ``STRATEGIES``; rope_pairs: ``r``, or None for all ``d_h/2`` pairs (then
    every strategy gives the full set and "2-norm" needs no stats; same for ``r = d_h/2``).
    stats: the layer's calibration statistics, needed by "2-norm" and "rotation" (ties go to
    the lower pair).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    _check_heads(head_dim, num_heads, num_kv_heads)
    half = head_dim // 2
    r = half if rope_pairs is None else rope_pairs
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"rope_pairs must be an int or None, got {rope_pairs!r}")
    if not 1 <= r <= half:
        raise ValueError(f"rope_pairs must be in [1, head_dim/2 = {half}], got {r}")

    if strategy == "full" or r == half:
        row = torch.arange(half)
    elif strategy == "high":
        row = torch.arange(r)
    elif strategy == "low":
        row = torch.arange(half - r, half)
    elif strategy == "uniform":
        # k * half // r in exact integer arithmetic: floor(k * d_h / (2 r)), distinct as r <= half.
        row = torch.arange(r) * half // r
    else:
        if stats is None:
            raise ValueError(f'strategy "{strategy}" needs stats (calibration of this layer)')
        score_fn = rotation_scores if strategy == "rotation" else two_norm_scores
        scores = score_fn(stats, num_heads, num_kv_heads).cpu()
        if scores.shape[1] != half:
            raise ValueError(f"stats have {scores.shape[1]} pairs per head, head_dim {head_dim} "
                             f"needs {half}")
        if not torch.isfinite(scores).all():
            raise ValueError("stats contain NaN or inf; the calibration run diverged")
        # A stable descending sort keeps equal scores in index order: ties go to the lower pair,
        # the same on every machine (topk gives no such guarantee).
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        return order[:, :r].sort(dim=1).values.to(torch.int64).contiguous()
    return row.to(torch.int64).unsqueeze(0).repeat(num_kv_heads, 1)


def _head_order(pairs_row: torch.Tensor, d_h: int):
    """Dims of one head in the converted order [x1 | x2 | nope], and the rope / nope parts."""
    half = d_h // 2
    rope = torch.cat([pairs_row, pairs_row + half])
    keep = torch.ones(d_h, dtype=torch.bool)
    keep[rope] = False
    nope = torch.arange(d_h)[keep]
    return rope, nope


def converted_layout(pairs: torch.Tensor, d_h: int, num_heads: int):
    """Row indices of the converted projections in the original ones: q rows per head in
    [x1 | x2 | nope] order, the kept key rows, the NoPE key rows, and the NoPE rows of the new
    q_proj."""
    h_kv = pairs.shape[0]
    group = num_heads // h_kv
    q_rows, kr_rows, kn_rows, q_nope_rows = [], [], [], []
    for g in range(h_kv):
        rope, nope = _head_order(pairs[g].cpu(), d_h)
        kr_rows.append(g * d_h + rope)
        kn_rows.append(g * d_h + nope)
        for q in range(g * group, (g + 1) * group):
            q_rows.append(q * d_h + torch.cat([rope, nope]))
            q_nope_rows.append(q * d_h + len(rope) + torch.arange(len(nope)))
    return torch.cat(q_rows), torch.cat(kr_rows), torch.cat(kn_rows), torch.cat(q_nope_rows)
