"""Partial RoPE: which frequency pairs of each KV head keep their rotation (ARCHITECTURE 2.1).

Pair ``j`` (``0 <= j < d_h/2``) is dims ``j`` and ``j + d_h/2`` of a head in HF's rotate-half
layout; pair 0 rotates fastest. A selection is one ascending row of ``r`` pair indices per KV
head; the query heads of a group use their KV head's row (query head ``h`` belongs to KV head
``h // (H / H_kv)``, as in HF's ``repeat_kv``).
"""
from __future__ import annotations

import torch

from .calibration import LayerStats

STRATEGIES = ("high", "low", "uniform", "2-norm", "rotation", "greedy", "full")
# the greedy selection scores the sampled queries of a sequence in chunks of this many
GREEDY_QUERY_CHUNK = 16
# strategies whose choice depends on calibration statistics
CALIBRATED_STRATEGIES = ("2-norm", "rotation", "greedy")


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
    coherence = rotation_coherence(stats, num_heads, num_kv_heads)
    return two_norm_scores(stats, num_heads, num_kv_heads) * (1 - coherence)


def rotation_coherence(stats: LayerStats, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """``|E_w[exp(i theta_j Delta)]|`` of every pair and KV head, (H_kv, d_h/2) float64: near 1
    where pair j barely turns over the distances the head's group attends to."""
    if stats.distance_mass is None or stats.inv_freq is None:
        raise ValueError('strategy "rotation" needs stats with distance_mass and inv_freq: '
                         "calibrate(..., collect_distances=True)")
    mass, theta = stats.distance_mass.to(torch.float64), stats.inv_freq.to(torch.float64)
    if mass.shape[0] != num_heads:
        raise ValueError(f"stats.distance_mass has {mass.shape[0]} heads, expected {num_heads}")
    w = mass.reshape(num_kv_heads, num_heads // num_kv_heads, -1).mean(1)   # (H_kv, L)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
    angle = theta[:, None] * torch.arange(w.shape[1], dtype=torch.float64)  # (d_h/2, L)
    return torch.complex(w @ angle.cos().T, w @ angle.sin().T).abs()       # (H_kv, d_h/2)


def _greedy_error_terms(sample, g: int, group: int, s: int, chunk: slice):
    """For KV head ``g`` on the queries ``chunk`` of sample sequence ``s`` (and the keys they
    see): the change of every pair's score term when its rotation is removed, the all-NoPE
    scores, the additive causal mask, the values, the reference (original) outputs and the
    output Gram matrices of the group's query heads."""
    q = sample.q[s][g * group:(g + 1) * group, chunk]                   # (G, Q, d_h)
    pos = sample.query_pos[s][chunk]
    t = int(pos.max()) + 1
    k, v = sample.k[s][g, :t], sample.v[s][g, :t]                       # (T, d_h)
    cos, sin = sample.cos[s][:t], sample.sin[s][:t]
    d_h = q.shape[-1]
    half = d_h // 2

    def rotate(x, c, sn):
        return x * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sn

    q_rot = rotate(q, cos[pos], sin[pos]).reshape(-1, 2, half)          # (G Q, 2, half)
    k_rot = rotate(k, cos, sin).view(-1, 2, half)
    # NoPE dims keep scaled RoPE's factor (squared), as the conversion folds it into q_proj
    factor = float(cos[0, 0] ** 2 + sin[0, 0] ** 2)
    rotated = torch.einsum("qaj,taj->jqt", q_rot, k_rot)                # (half, G Q, T)
    plain = torch.einsum("qaj,taj->jqt", q.reshape(-1, 2, half), k.view(-1, 2, half)) * factor
    visible = torch.arange(t)[None, :] <= pos[:, None]                  # (Q, T)
    mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf")).repeat(group, 1)
    reference = ((rotated.sum(0) * sample.scaling + mask).softmax(-1) @ v)
    gram = sample.out_gram[g * group:(g + 1) * group].float()          # (G, d_h, d_h)
    return rotated - plain, plain.sum(0), mask, v, reference, gram


def greedy_order(sample, num_heads: int, num_kv_heads: int, steps: int) -> torch.Tensor:
    """The first ``steps`` pairs of each KV head in the order the greedy selection adds them,
    int64 (H_kv, steps).

    Starting from no rotated pair, each step adds the pair whose rotation, put back, leaves the
    least error of the attention outputs of the group's query heads on the sample (original
    values; the error of head ``h`` weighted by its block of o_proj, ``e^T W_o,h^T W_o,h e``,
    summed over the sampled queries). As EliteKV's RoPElite, per layer and KV head; the
    selection of ``r`` pairs is the first ``r`` of this order. Orders are memoised on the
    sample (a longer request continues a shorter one)."""
    key = (num_heads, num_kv_heads)
    done = sample.orders.get(key)
    if done is not None and done.shape[1] >= steps:
        return done[:, :steps]
    group = num_heads // num_kv_heads
    rows = []
    for g in range(num_kv_heads):
        # queries in chunks, each with only the keys it can see: a causal sample needs about
        # 60 % of the work of full rows
        terms = [_greedy_error_terms(sample, g, group, s, slice(c, c + GREEDY_QUERY_CHUNK))
                 for s in range(len(sample.q))
                 for c in range(0, sample.query_pos[s].numel(), GREEDY_QUERY_CHUNK)]
        half = terms[0][0].shape[0]
        order = [] if done is None else done[g].tolist()
        current = [base + delta[torch.tensor(order, dtype=torch.int64)].sum(0)
                   for delta, base, *_ in terms]
        while len(order) < steps:
            left = torch.tensor([j for j in range(half) if j not in order])
            errors = torch.zeros(left.numel(), dtype=torch.float64)
            for (delta, _, mask, v, reference, gram), cur in zip(terms, current):
                probs = ((cur + delta[left]) * sample.scaling + mask).softmax(-1)  # (C, G Q, T)
                err = (probs @ v - reference).view(left.numel(), group, -1, v.shape[-1])
                errors += torch.einsum("cgqd,gde,cgqe->c", err, gram, err).double()
            if not torch.isfinite(errors).all():
                raise ValueError("the attention sample gives NaN or inf errors; the calibration "
                                 "run diverged")
            best = int(left[int(errors.argmin())])     # argmin: ties go to the lower pair
            order.append(best)
            current = [cur + delta[best] for cur, (delta, *_) in zip(current, terms)]
        rows.append(order)
    sample.orders[key] = torch.tensor(rows, dtype=torch.int64)
    return sample.orders[key][:, :steps]


def select_rope_pairs(strategy: str, rope_pairs: int | None, *, head_dim: int, num_heads: int,
                      num_kv_heads: int, stats: LayerStats | None = None) -> torch.Tensor:
    """Kept RoPE pairs of one layer, int64 (H_kv, r) on the CPU, ascending per row.

    strategy: one of ``STRATEGIES``; rope_pairs: ``r``, or None for all ``d_h/2`` pairs (then
    every strategy gives the full set and "2-norm" needs no stats; same for ``r = d_h/2``).
    stats: the layer's calibration statistics, needed by "2-norm", "rotation" and "greedy"
    (ties go to the lower pair).
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
        if strategy == "greedy":
            return _greedy_pairs(stats, r, head_dim, num_heads, num_kv_heads)
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


def _greedy_pairs(stats, r: int, head_dim: int, num_heads: int,
                  num_kv_heads: int) -> torch.Tensor:
    sample = getattr(stats, "attention_sample", None)
    if sample is None:
        raise ValueError('strategy "greedy" needs stats with an attention_sample: '
                         "calibrate(..., collect_attention_sample=True)")
    q, k = sample.q[0], sample.k[0]
    if q.shape[0] != num_heads or k.shape[0] != num_kv_heads or q.shape[-1] != head_dim:
        raise ValueError(f"the attention sample has {q.shape[0]} query heads, {k.shape[0]} KV "
                         f"heads and head_dim {q.shape[-1]}; expected {num_heads}, "
                         f"{num_kv_heads} and {head_dim}")
    return greedy_order(sample, num_heads, num_kv_heads, r).sort(dim=1).values.contiguous()


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
