"""A RoPE key shared by all heads, mixed from the KV heads' pairs (ARCHITECTURE 2.5).

RoPE turns frequency pair ``j`` of every KV head by the same angle, so any orthogonal mix
``U_j`` (``H_kv x H_kv``) of the heads' pairs at one frequency commutes with the rotation:
``k'_a[j] = sum_g U_j[a, g] k_g[j]`` is rotated as the pairs are, and query head ``h`` of KV
head ``g`` scores ``q_h[j]^T R k_g[j] = sum_a U_j[a, g] q_h[j]^T R k'_a[j]``. The mixed
components of all frequencies form one RoPE key shared by every head (``H_r = 1``); head ``h``'s
RoPE query holds ``U_j[a, g] q_h[j]`` for each kept component ``(a, j)``. A dropped component
loses its rotation: its term moves to the position-free (NoPE) part, whose key for KV head ``g``
at frequency ``j`` is what the kept components leave of it, ``k_g[j] - sum_{a kept}
U_j[a, g] k'_a[j]``; the query there is ``q_h[j]`` unchanged. Keeping every component keeps every
score exactly (the test of the mix).

``U_j`` holds the eigenvectors of the query-weighted key Gram of frequency ``j`` across heads
(``D^1/2 C_j D^1/2``, ``C_j[g, g'] = E k_g[j] . k_g'[j]``, ``D`` the KV heads' query energy at
``j``), so that few components carry most of the score energy; each component scores its
eigenvalue, times ``1 - |E_w[exp(i theta_j Delta)]|`` under the "rotation" strategy (how much
the frequency turns over the distances attended to, rope_selection.rotation_scores). The
components of highest score are kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rope_selection import rotation_coherence

# RoPE selections that rank the mixed components: by energy ("2-norm"), or by energy times how
# much the frequency turns ("rotation"); "full" keeps them all.
SHARED_STRATEGIES = ("rotation", "2-norm", "full")


@dataclass
class SharedRope:
    """One layer's mix and the order of its components.

    mix: (d_h/2, H_kv, H_kv) float64, ``mix[j]`` the orthogonal ``U_j`` (rows: components).
    order: (H_kv * d_h/2, 2) int64, the components ``(a, j)`` by decreasing score.
    """

    mix: torch.Tensor
    order: torch.Tensor


@dataclass
class RopeLayout:
    """How a converted layer with a shared RoPE key computes its queries and keys from the
    original ones (pre-RoPE, float64 maps over a head's ``d_h`` dims).

    pairs: (1, K) the frequency pair of each stored pair of the shared key (ascending).
    q_rope: (H, 2K, d_h) head h's RoPE query, ``[x1 (K) | x2 (K)]``, is ``q_rope[h] @ q_h``.
    k_rope: (2K, H_kv d_h) the shared RoPE key is ``k_rope @ k`` (all KV heads stacked).
    nope_dims: (n,) the position-free dims of every head, ascending (both dims of each
        frequency that keeps fewer than H_kv components).
    k_nope: (H_kv n, H_kv d_h) the NoPE keys of all KV heads, ``k_nope @ k``.
    """

    pairs: torch.Tensor
    q_rope: torch.Tensor
    k_rope: torch.Tensor
    nope_dims: torch.Tensor
    k_nope: torch.Tensor

    @property
    def rope_pairs(self) -> int:
        return self.pairs.shape[1]

    @property
    def nope_dim(self) -> int:
        return self.nope_dims.numel()

    def kept_pairs(self, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """(H_kv, m) the frequency pairs that keep at least one component, for every KV head:
        the fitted RoPE correction (rope_correction.py) maps the others, which keep none."""
        return self.pairs[0].unique().repeat(num_kv_heads, 1)

    def kn_rows(self, num_kv_heads: int, head_dim: int) -> torch.Tensor:
        """The original key rows whose queries the NoPE keys meet (for the row Grams)."""
        return torch.cat([g * head_dim + self.nope_dims for g in range(num_kv_heads)])


def _pair_gram(gram: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(heads d_h)^2 -> (d_h/2, heads, heads): the Gram of each frequency pair across heads
    (both dims of a pair summed)."""
    half = head_dim // 2
    g = gram.view(heads, head_dim, heads, head_dim)
    idx = torch.arange(half)
    return (g[:, idx, :, idx] + g[:, idx + half, :, idx + half])


def shared_rope(stats, w_q: torch.Tensor, w_k: torch.Tensor, num_heads: int, num_kv_heads: int,
                head_dim: int, strategy: str = "rotation") -> SharedRope:
    """The mix and component order of one layer. Energies come from the calibration
    statistics (``xtx`` for the keys, ``query_gram`` or ``q_pair_norm`` for the queries) where
    they are given, else from the weights alone (``W_k W_k^T``, the q rows' norms)."""
    if strategy not in SHARED_STRATEGIES:
        raise ValueError(f"a shared RoPE key ranks its components with rope_strategy in "
                         f"{SHARED_STRATEGIES}, got {strategy!r}")
    half, group = head_dim // 2, num_heads // num_kv_heads
    w_k = w_k.detach().to("cpu", torch.float64)
    xtx = getattr(stats, "xtx", None)
    key_gram = w_k @ (xtx.to(torch.float64) @ w_k.T if xtx is not None else w_k.T)
    c = _pair_gram(key_gram, num_kv_heads, head_dim)                    # (half, H_kv, H_kv)
    query_gram = getattr(stats, "query_gram", None)
    if query_gram is not None:
        diag = query_gram.to(torch.float64).diagonal(dim1=-2, dim2=-1)  # (H, d_h)
        q_energy = diag[:, :half] + diag[:, half:]
    elif getattr(stats, "q_pair_norm", None) is not None:
        q_energy = stats.q_pair_norm.to(torch.float64).pow(2)
    else:
        rows = w_q.detach().to("cpu", torch.float64).pow(2).sum(-1).view(num_heads, head_dim)
        q_energy = rows[:, :half] + rows[:, half:]
    d = q_energy.view(num_kv_heads, group, half).sum(1).T.clamp_min(0).sqrt()  # (half, H_kv)
    weighted = d[:, :, None] * c * d[:, None, :]
    values, vectors = torch.linalg.eigh(weighted)                       # ascending
    values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
    mix = vectors.transpose(1, 2).contiguous()                          # rows: components
    score = values.T                                                    # (H_kv, half)
    if strategy == "rotation":
        if getattr(stats, "distance_mass", None) is None:
            raise ValueError('a shared RoPE key with rope_strategy="rotation" needs '
                             "calibrate(..., collect_distances=True)")
        turn = 1 - rotation_coherence(stats, num_heads, num_kv_heads)   # (H_kv, half)
        weight = d.T.pow(2)
        score = score * ((turn * weight).sum(0) / weight.sum(0).clamp_min(1e-300))
    if not torch.isfinite(score).all():
        raise ValueError("stats contain NaN or inf; the calibration run diverged")
    flat = score.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    return SharedRope(mix, torch.stack([order // half, order % half], dim=1))


def shared_layout(shared: SharedRope, kept: int, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> RopeLayout:
    """The layout that keeps the first ``kept`` components of ``shared.order``."""
    half, group = head_dim // 2, num_heads // num_kv_heads
    total = num_kv_heads * half
    if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= total:
        raise ValueError(f"a shared RoPE key keeps 1 to {total} components (H_kv * d_h/2), "
                         f"got {kept!r}")
    chosen = shared.order[:kept]
    # stored by frequency, then component: the pairs buffer ascends
    chosen = chosen[torch.argsort(chosen[:, 1] * num_kv_heads + chosen[:, 0])]
    comp, freq = chosen[:, 0], chosen[:, 1]
    u = shared.mix.to(torch.float64)                                    # (half, H_kv, H_kv)
    # key: x1 row i = sum_g U_j[a, g] k_g[j], x2 row i = same at j + half
    k_rope = torch.zeros(2 * kept, num_kv_heads, head_dim, dtype=torch.float64)
    rows = torch.arange(kept)
    k_rope[rows, :, freq] = u[freq, comp]
    k_rope[kept + rows, :, freq + half] = u[freq, comp]
    # query of head h (KV head g): U_j[a, g] q_h[j]
    q_rope = torch.zeros(num_heads, 2 * kept, head_dim, dtype=torch.float64)
    for h in range(num_heads):
        weight = u[freq, comp, h // group]
        q_rope[h, rows, freq] = weight
        q_rope[h, kept + rows, freq + half] = weight
    # NoPE: per frequency, what the kept components leave of each head's pair
    count = torch.bincount(freq, minlength=half)
    nope_freqs = torch.nonzero(count < num_kv_heads).flatten()
    nope_dims = torch.cat([nope_freqs, nope_freqs + half]).sort().values
    residual = torch.eye(num_kv_heads, dtype=torch.float64).repeat(half, 1, 1)
    for a, j in zip(comp.tolist(), freq.tolist()):
        residual[j] -= torch.outer(u[j, a], u[j, a])
    n = nope_dims.numel()
    k_nope = torch.zeros(num_kv_heads, n, num_kv_heads, head_dim, dtype=torch.float64)
    for i, e in enumerate(nope_dims.tolist()):
        k_nope[:, i, :, e] = residual[e % half]
    return RopeLayout(freq.view(1, -1).contiguous(), q_rope,
                      k_rope.view(2 * kept, num_kv_heads * head_dim),
                      nope_dims, k_nope.view(num_kv_heads * n, num_kv_heads * head_dim))
