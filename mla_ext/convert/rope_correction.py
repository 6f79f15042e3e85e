"""A data-fitted, position-free stand-in for the rotation of each dropped RoPE pair.

Partial RoPE removes the rotation of pair ``j`` of a KV head: the score term
``q_m[j]^T R(theta_j (n - m)) k_n[j]`` (2-dim vectors, ``m`` the query position, ``n <= m`` the
key's) becomes ``q_m[j]^T k_n[j]``. With a correction it becomes ``q_m[j]^T M k_n[j]``, one 2x2
``M`` per query head and dropped pair, fitted by least squares of the original score terms on
calibration text:

    min_M  sum_{n <= m} w_mn (q_m^T R_mn k_n - q_m^T M k_n)^2   (+ ridge ||M - I||^2)

It is linear in ``vec(M)`` with features ``phi_mn = vec(q_m k_n^T)``. The weights ``w_mn`` are
1 for every causal pair ("uniform") or the original model's attention probability
("attention"). The normal equations need only ``sum w phi phi^T`` (4x4) and
``sum w phi t_mn`` (4), and both separate into (query features) x W x (key features), because
``t_mn`` is the dot product of the rotated query and the rotated key. So every causal pair of
every calibration sequence enters exactly, with one ``(T, T) @ (T, features)`` product per
head (a prefix sum for the uniform weights): no pair is subsampled and nothing is stored.

``M`` is folded into ``q_proj``: the query's pair becomes ``M^T q[j]`` (so that
``(M^T q)^T k = q^T M k``), a 2x2 map on two rows of the head's block; the converted model's
forward and the kernels do not change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ROPE_CORRECTIONS = ("none", "fitted-attention", "fitted-uniform")
# the best measured on the default model (docs/results.md, "Fitted RoPE correction")
DEFAULT_ROPE_CORRECTION = "fitted-attention"
WEIGHTINGS = ("uniform", "attention")  # the leading axis of PairFitSums' tensors
# ridge toward the identity, relative to the mean diagonal of each 4x4 Gram matrix
RIDGE = 1e-4
_EYE = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # vec(I), index 2 a + b


@dataclass
class PairFitSums:
    """The normal equations of every (query head, pair) fit of one layer, for each weighting.

    gram: (2, H, d_h/2, 4, 4) float64, ``sum w_mn phi phi^T`` with ``phi[2a + b] = q_a k_b``
        (``a, b`` the two dims of the pair: dims ``j`` and ``j + d_h/2``).
    cross: (2, H, d_h/2, 4) float64, ``sum w_mn phi t_mn``, ``t_mn`` the original (rotated)
        score term of the pair, without scaled RoPE's ``attention_scaling``.
    The leading axis is ``WEIGHTINGS``: uniform, attention.
    """

    gram: torch.Tensor
    cross: torch.Tensor

    def add(self, other: "PairFitSums") -> "PairFitSums":
        self.gram += other.gram
        self.cross += other.cross
        return self


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _unit_rotary(cos: torch.Tensor, sin: torch.Tensor):
    """float64 cos/sin with scaled RoPE's ``attention_scaling`` divided out."""
    cos, sin = cos.double(), sin.double()
    norm = (cos.square() + sin.square()).sqrt().clamp_min(1e-300)
    return cos / norm, sin / norm


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., d_h) -> (..., d_h/2, 2): pair j is dims j and j + d_h/2."""
    half = x.shape[-1] // 2
    return torch.stack([x[..., :half], x[..., half:]], dim=-1)


def _pair_features(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x: (n, T, d_h) pre-RoPE; cos/sin: (T, d_h), their norm removed (a pure rotation).
    Returns two (n, T, d_h/2, 4) tensors: ``[2a + c] = x_a x_c`` and ``x_a xr_c`` (``xr`` the
    rotated vector), per pair."""
    p, pr = _pairs(x), _pairs(x * cos + _rotate_half(x) * sin)    # (n, T, P, 2)
    return ((p[..., :, None] * p[..., None, :]).flatten(-2),
            (p[..., :, None] * pr[..., None, :]).flatten(-2))


def pair_fit_sums(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  probs: torch.Tensor) -> PairFitSums:
    """The fit's sums over every causal (query, key) pair of one sequence.

    q: (H, T, d_h) pre-RoPE queries; k: (H_kv, T, d_h) pre-RoPE keys (query head ``h`` uses KV
    head ``h // (H / H_kv)``); cos, sin: (T, d_h) the model's rotary embedding (any
    ``attention_scaling`` in them is divided out); probs: (H, T, T) the original model's
    attention probabilities (zero above the diagonal), the "attention" weights.
    """
    h, t, d_h = q.shape
    h_kv, pairs = k.shape[0], d_h // 2
    q, k, probs = q.double(), k.double(), probs.double()
    cos, sin = _unit_rotary(cos, sin)
    q_prod, q_cross = _pair_features(q, cos, sin)                    # (H, T, P, 4)
    k_prod, k_cross = _pair_features(k, cos, sin)                    # (H_kv, T, P, 4)
    keys = torch.cat([k_prod, k_cross], dim=-1)                      # (H_kv, T, P, 8)
    group = h // h_kv
    # sum over the keys n <= m of w_mn * key features, for every query m: (H, T, P, 8)
    uniform = keys.cumsum(dim=1).repeat_interleave(group, dim=0)
    attention = (probs @ keys.repeat_interleave(group, dim=0).flatten(2)).view(h, t, pairs, 8)
    grams, crosses = [], []
    for weighted in (uniform, attention):
        y = torch.einsum("htpi,htpj->hpij", q_prod, weighted[..., :4])   # [(a,c), (b,d)]
        z = torch.einsum("htpi,htpj->hpij", q_cross, weighted[..., 4:])  # [(a,c), (b,c')]
        y, z = y.view(h, pairs, 2, 2, 2, 2), z.view(h, pairs, 2, 2, 2, 2)
        grams.append(y.permute(0, 1, 2, 4, 3, 5).reshape(h, pairs, 4, 4))  # [(a,b), (c,d)]
        crosses.append(torch.einsum("hpacbc->hpab", z).reshape(h, pairs, 4))
    return PairFitSums(gram=torch.stack(grams), cross=torch.stack(crosses))


def check_correction(value) -> None:
    if value not in ROPE_CORRECTIONS:
        raise ValueError(f"rope_correction must be one of {ROPE_CORRECTIONS}, got {value!r}")


def fit_pair_maps(sums: PairFitSums, weighting: str, ridge: float = RIDGE) -> torch.Tensor:
    """(H, d_h/2, 2, 2) float64: the fitted ``M`` of every query head and pair, for the
    weighting "uniform" or "attention". A pair whose queries or keys are all zero gets ``I``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    i = WEIGHTINGS.index(weighting)
    gram, cross = sums.gram[i].double(), sums.cross[i].double()
    lam = (ridge * gram.diagonal(dim1=-2, dim2=-1).mean(-1)).clamp_min(1e-300)  # (H, P)
    eye4 = torch.eye(4, dtype=torch.float64)
    rhs = cross + lam[..., None] * _EYE
    m = torch.linalg.solve(gram + lam[..., None, None] * eye4, rhs[..., None])[..., 0]
    return m.view(*m.shape[:-1], 2, 2)


def query_transform(maps: torch.Tensor, pairs: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(H, d_h, d_h) float64 ``T`` with ``q_new = T q`` per head, in the original layout: the
    identity, except on every pair that ``pairs`` (``(H_kv, r)``, the kept pairs of each KV
    head) drops, where it maps the pair to ``M^T q[j]``."""
    h, half = maps.shape[0], maps.shape[1]
    if h != num_heads:
        raise ValueError(f"the fitted maps have {h} heads, the layer {num_heads}")
    h_kv = pairs.shape[0]
    dropped = torch.ones(h_kv, half, dtype=torch.bool)
    for g in range(h_kv):
        dropped[g, pairs[g].cpu()] = False
    dropped = dropped.repeat_interleave(num_heads // h_kv, dim=0)   # (H, P)
    eye2 = torch.eye(2, dtype=torch.float64).expand_as(maps)
    mt = torch.where(dropped[..., None, None], maps.double(), eye2).transpose(-1, -2)
    out = torch.zeros(h, 2 * half, 2 * half, dtype=torch.float64)
    j = torch.arange(half)
    for a in range(2):
        for b in range(2):
            out[:, j + a * half, j + b * half] = mt[:, :, a, b]
    return out


def layer_query_transform(stats, correction: str, pairs: torch.Tensor, num_heads: int,
                          head_dim: int) -> torch.Tensor | None:
    """The ``query_transform`` of ``correction`` for one layer; None for "none" or when
    ``pairs`` keeps every pair (nothing to correct)."""
    check_correction(correction)
    if correction == "none" or 2 * pairs.shape[1] == head_dim:
        return None
    fit = getattr(stats, "rope_fit", None)
    if fit is None:
        raise ValueError(f"rope_correction={correction!r} needs the fit's statistics: "
                         "calibrate(..., collect_rope_fit=True)")
    maps = fit_pair_maps(fit, correction.removeprefix("fitted-"))
    return query_transform(maps, pairs, num_heads)


def score_error(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                weights: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Brute force over every pair, for tests and diagnostics: (H, d_h/2) float64, the weighted
    squared error ``sum w_mn (t_mn - q_m^T M k_n)^2`` of every head and pair, for ``maps``
    (H, d_h/2, 2, 2). ``weights``: (H, T, T), zero above the diagonal."""
    h = q.shape[0]
    group = h // k.shape[0]
    q, k, weights = q.double(), k.repeat_interleave(group, dim=0).double(), weights.double()
    cos, sin = _unit_rotary(cos, sin)
    qr, kr = _pairs(q * cos + _rotate_half(q) * sin), _pairs(k * cos + _rotate_half(k) * sin)
    true = torch.einsum("hmpa,hnpa->hpmn", qr, kr)
    fitted = torch.einsum("hmpa,hpab,hnpb->hpmn", _pairs(q), maps.double(), _pairs(k))
    return ((true - fitted).square() * weights[:, None]).sum((-1, -2))
