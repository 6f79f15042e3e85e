"""Low-rank keys and values: factor the NoPE key rows and the value rows through one latent.

``[W_kn; W_v] ~ [W_uk; W_uv] @ W_down`` with ``W_down`` (D_c, d), so the cache holds the
``D_c``-wide latent ``c = W_down x`` (ARCHITECTURE 2.2). Methods:

- ``joint``: truncated SVD of the stacked matrix (Eckart-Young optimal in the weights).
- ``split``: separate SVDs of ``W_kn`` and ``W_v``; the latent is ``[c_k | c_v]`` and the up
  projections are block structured, so the module and the decode kernel are those of ``joint``.
- ``activation`` / ``activation-split``: the same, but optimal for the outputs ``W x`` over the
  calibration activations: with ``X^T X = L L^T``, ``||(W - W') X^T||_F = ||(W - W') L||_F``, so
  the truncated SVD of ``W L`` mapped back by ``L^{-1}`` is the best rank-``D_c`` factorization.
- ``activation-score``: the joint factorization weighted on both sides, for what the keys and
  values feed rather than for themselves: a NoPE key error ``e`` changes the scores of a query
  ``q`` by ``q^T e``, a value error changes the layer output by ``W_o,h e``. With the row Gram
  ``G = blockdiag(G_k, G_v)`` (``G_k``: per KV head the second moment of its query heads'
  queries on the NoPE dims, ``G_v``: per KV head ``sum_h W_o,h^T W_o,h`` over its query heads;
  ``score_row_grams``) and ``G = F^T F``, ``E||F (W - W') x||^2 = ||F (W - W') L||_F^2``, so
  the truncated SVD of ``F W L`` mapped back by ``F^{-1}`` on the left and ``L^{-1}`` on the
  right is the best rank-``D_c`` factorization in that error (queries and keys taken as
  independent). Each block of ``F`` is scaled so that its energy ``||F_b W_b L||^2`` equals
  the activation method's ``||W_b L||^2``: the keys/values balance stays that of
  ``activation``, times ``key_weight`` on the key block.

Everything is computed in float64 on the weights' device and returned as float32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

SVD_METHODS = ("joint", "split", "activation", "activation-split", "activation-score")
# the methods with one SVD of the stacked matrix: what a cache budget can search over
JOINT_METHODS = ("joint", "activation", "activation-score")
# ridge of the row Grams of "activation-score", relative to their mean eigenvalue: a direction
# the calibration queries never took keeps a small weight (held-out queries may take it)
ROW_RIDGE = 1e-4
SIGMA_PLACEMENTS = ("up", "sqrt")
# CPU factorizations of matrices at most this wide on their shorter side run on one thread.
SINGLE_THREAD_MAX_DIM = 2048


@dataclass
class LowRankKV:
    """A factorization ``w_kn ~ w_uk @ w_down``, ``w_v ~ w_uv @ w_down``.

    w_down: (D_c, d) float32; w_uk: (rows_k, D_c) float32, rows_k = H_kv (d_h - d_r);
    w_uv: (rows_v, D_c) float32, rows_v = H_kv d_h.
    """

    w_down: torch.Tensor
    w_uk: torch.Tensor
    w_uv: torch.Tensor


def _check_method(method: str) -> None:
    if method not in SVD_METHODS:
        raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}")


def _is_split(method: str) -> bool:
    return method in ("split", "activation-split")


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def max_rank(method: str, rows_k: int, rows_v: int, d: int) -> int:
    """Largest latent width of ``method``; at this rank the factorization is lossless.

    joint / activation: ``min(d, rows_k + rows_v)``, the rank of the stacked matrix.
    split / activation-split: ``min(d, rows_k) + min(d, rows_v)``, the two parts' ranks summed
    (may exceed ``d``: each part keeps its own basis).
    """
    _check_method(method)
    _check_int(rows_k, "rows_k", 0)
    _check_int(rows_v, "rows_v", 1)
    _check_int(d, "d", 1)
    if _is_split(method):
        return min(d, rows_k) + min(d, rows_v)
    return min(d, rows_k + rows_v)


def split_ranks(rank: int, rows_k: int, rows_v: int, d: int) -> tuple[int, int]:
    """Latent widths ``(r_k, r_v)`` of the key and value parts of a split factorization.

    ``rank/2`` each; a part whose own rank ``min(d, rows)`` is smaller takes only that and the
    other part gets the rest (so ``max_rank`` is reachable and lossless). ``rows_k == 0`` gives
    everything to the values. ``rank`` must be even unless ``rows_k == 0`` or ``rank`` is the
    maximum (an odd maximum only arises with an odd ``d``).
    """
    top = max_rank("split", rows_k, rows_v, d)
    _check_int(rank, "rank", 1)
    if rank > top:
        raise ValueError(f"rank must be <= {top} (max_rank for split with rows_k={rows_k}, "
                         f"rows_v={rows_v}, d={d}), got {rank}")
    if rows_k == 0:
        return 0, rank
    if rank % 2 and rank != top:
        raise ValueError(f"rank must be even for a split factorization (half keys, half values), "
                         f"got {rank}")
    cap_k, cap_v = min(d, rows_k), min(d, rows_v)
    r_k = min(rank // 2, cap_k)
    r_v = rank - r_k
    if r_v > cap_v:
        r_v = cap_v
        r_k = rank - cap_v
    return r_k, r_v


def _check_weight(w, name: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{name} must be a 2-D tensor [rows, d], got {shape}")
    if not w.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains NaN or inf")


def _whitening(xtx: torch.Tensor | None, d: int, ridge: float, device) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of ``xtx + ridge * trace(xtx)/d * I`` in float64."""
    if xtx is None:
        raise ValueError("xtx is required by the activation-aware methods (collect it with "
                         "calibrate(..., collect_xtx=True))")
    if not isinstance(xtx, torch.Tensor) or tuple(xtx.shape) != (d, d):
        shape = tuple(xtx.shape) if isinstance(xtx, torch.Tensor) else type(xtx).__name__
        raise ValueError(f"xtx must have shape ({d}, {d}), got {shape}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 \
            or ridge == float("inf"):
        raise ValueError(f"ridge must be a finite float >= 0, got {ridge!r}")
    m = xtx.to(device=device, dtype=torch.float64)
    if not torch.isfinite(m).all():
        raise ValueError("xtx contains NaN or inf")
    # Sums accumulated in a different order are symmetric only up to rounding; Cholesky reads
    # one triangle, so symmetrize rather than trust whichever triangle it picks.
    m = 0.5 * (m + m.T)
    trace = float(m.diagonal().sum())
    if not trace > 0:
        raise ValueError(f"xtx must have a positive trace (a sum of x x^T), got {trace}")
    # Scaled to the mean eigenvalue, so one ridge value suits every layer whatever its
    # activation scale; it bounds cond(L) by sqrt(d / ridge).
    m = m + (ridge * trace / d) * torch.eye(d, dtype=torch.float64, device=device)
    with _lapack_threads(m):
        chol, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        raise ValueError(f"xtx + ridge*trace/d*I is not positive definite (ridge={ridge}); "
                         "pass a larger ridge")
    return chol


def _check_key_weight(key_weight) -> None:
    if isinstance(key_weight, bool) or not isinstance(key_weight, (int, float)) \
            or not 0 < key_weight < float("inf"):
        raise ValueError(f"key_weight must be a finite float > 0, got {key_weight!r}")


def _row_factor(row_grams, w: torch.Tensor, rows_k: int, chol: torch.Tensor,
                key_weight: float) -> torch.Tensor:
    """Upper-triangular ``F`` (rows, rows), block diagonal over keys / values, with
    ``F_b^T F_b = c_b (G_b + ROW_RIDGE * trace(G_b)/n_b I)``; ``c_b`` makes
    ``||F_b W_b L||^2 = ||W_b L||^2`` (times ``key_weight`` for the keys)."""
    if row_grams is None:
        raise ValueError("row_grams are required by svd='activation-score' (score_row_grams: "
                         "calibrate(..., collect_query_gram=True))")
    if not isinstance(row_grams, (tuple, list)) or len(row_grams) != 2:
        raise ValueError(f"row_grams must be a (key_gram, value_gram) pair, got "
                         f"{type(row_grams).__name__}")
    _check_key_weight(key_weight)
    rows = w.shape[0]
    sizes = (rows_k, rows - rows_k)
    out = torch.zeros(rows, rows, dtype=torch.float64, device=w.device)
    start = 0
    for name, gram, n, weight in zip(("key_gram", "value_gram"), row_grams, sizes,
                                     (key_weight, 1.0)):
        if n == 0:
            continue
        if not isinstance(gram, torch.Tensor) or tuple(gram.shape) != (n, n):
            shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
            raise ValueError(f"row_grams' {name} must have shape ({n}, {n}), got {shape}")
        g = gram.to(device=w.device, dtype=torch.float64)
        if not torch.isfinite(g).all():
            raise ValueError(f"row_grams' {name} contains NaN or inf")
        g = 0.5 * (g + g.T)
        trace = float(g.diagonal().sum())
        if not trace > 0:
            raise ValueError(f"row_grams' {name} must have a positive trace, got {trace}")
        g = g + (ROW_RIDGE * trace / n) * torch.eye(n, dtype=torch.float64, device=w.device)
        with _lapack_threads(g):
            low, info = torch.linalg.cholesky_ex(g)
        if int(info) != 0:
            raise ValueError(f"row_grams' {name} + ridge is not positive definite")
        block = w[start:start + n] @ chol
        factor = low.T
        energy = float((factor @ block).pow(2).sum())
        plain = float(block.pow(2).sum())
        if energy > 0 and plain > 0:
            factor = factor * (weight * plain / energy) ** 0.5
        out[start:start + n, start:start + n] = factor
        start += n
    return out


def score_row_grams(query_gram: torch.Tensor, w_o: torch.Tensor, kn_rows: torch.Tensor,
                    num_kv_heads: int, head_dim: int, *, transform: torch.Tensor | None = None,
                    rope_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The row Grams of ``activation-score`` for one layer, float64.

    query_gram: (H, d_h, d_h) ``sum_t q_t q_t^T`` of every query head (pre-RoPE q_proj output,
        ``LayerStats.query_gram``); w_o: (d, H d_h) the o_proj weight; kn_rows: the NoPE key rows
        of ``W_k`` (``converted_layout``), the rows the latent carries.
    transform: (H, d_h, d_h) the fitted RoPE correction folded into q_proj (queries become
        ``T q``), so the keys are weighted by the queries the converted model computes;
        rope_scaling: scaled RoPE's factor, folded squared into the NoPE queries.
    Returns ``(G_k, G_v)``: G_k (len(kn_rows),)^2, the group's query second moment on the NoPE
    key dims of each KV head; G_v (H_kv d_h,)^2, block diagonal ``sum_h W_o,h^T W_o,h``.
    """
    if not isinstance(query_gram, torch.Tensor) or query_gram.dim() != 3 \
            or tuple(query_gram.shape[1:]) != (head_dim, head_dim) \
            or query_gram.shape[0] % num_kv_heads:
        shape = (tuple(query_gram.shape) if isinstance(query_gram, torch.Tensor)
                 else type(query_gram).__name__)
        raise ValueError(f"query_gram must have shape (H, {head_dim}, {head_dim}) with H a "
                         f"multiple of {num_kv_heads} KV heads, got {shape}")
    h = query_gram.shape[0]
    if tuple(w_o.shape[1:]) != (h * head_dim,):
        raise ValueError(f"w_o must have {h * head_dim} columns, got shape {tuple(w_o.shape)}")
    gram = query_gram.to(torch.float64)
    if transform is not None:
        t = transform.to(torch.float64)
        gram = t @ gram @ t.transpose(-1, -2)
    group = h // num_kv_heads
    key = gram.view(num_kv_heads, group, head_dim, head_dim).sum(1) * rope_scaling ** 4
    blocks = w_o.detach().to("cpu", torch.float64).view(-1, h, head_dim).transpose(0, 1)
    value = (blocks.transpose(1, 2) @ blocks).view(num_kv_heads, group, head_dim,
                                                    head_dim).sum(1)
    rows = kn_rows.cpu()
    return torch.block_diag(*key.cpu())[rows][:, rows], torch.block_diag(*value)


@contextlib.contextmanager
def _lapack_threads(a: torch.Tensor):
    """One CPU thread for the factorization of a small ``a``: LAPACK's many small BLAS calls
    synchronise the threads at every step, and on a loaded CPU a descheduled second thread made
    one SVD of a SmolLM2 layer (384 x 576, float64) take 2-9 s instead of 0.04 s."""
    before = torch.get_num_threads()
    if a.device.type != "cpu" or min(a.shape[-2:]) > SINGLE_THREAD_MAX_DIM or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _weights(w: torch.Tensor, rows_k: int, method: str, xtx, ridge: float, row_grams,
             key_weight: float):
    """``(L, F)`` of ``method`` for the stacked ``w``: the input whitening (None for the weight
    SVD) and the row factor (None unless "activation-score")."""
    if not method.startswith("activation"):
        return None, None
    chol = _whitening(xtx, w.shape[1], ridge, w.device)
    if method != "activation-score":
        return chol, None
    return chol, _row_factor(row_grams, w, rows_k, chol, key_weight)


def _truncated_svd(w: torch.Tensor, rank: int, chol: torch.Tensor | None,
                   sigma: str, rowf: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` ``up @ down`` for ``w`` (weighted by ``chol`` on the right and the
    upper-triangular ``rowf`` on the left if given)."""
    a = w if chol is None else w @ chol
    if rowf is not None:
        a = rowf @ a
    with _lapack_threads(a):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if sigma == "up":
        up, down = u * s, vh
    else:
        root = s.sqrt()
        up, down = u * root, root[:, None] * vh
    if chol is not None:
        down = torch.linalg.solve_triangular(chol, down, upper=False, left=False)
    if rowf is not None:
        up = torch.linalg.solve_triangular(rowf, up, upper=True)
    return up, down


def factorize_kv(w_kn: torch.Tensor, w_v: torch.Tensor, rank: int, method: str = "joint", *,
                 xtx: torch.Tensor | None = None, ridge: float = 1e-6,
                 sigma: str = "up", row_grams: tuple[torch.Tensor, torch.Tensor] | None = None,
                 key_weight: float = 1.0) -> LowRankKV:
    """Factor the NoPE key rows and the value rows of one layer through a ``rank``-wide latent.

    w_kn: (rows_k, d) NoPE rows of ``W_k``, all KV heads stacked (rows_k may be 0: full RoPE).
    w_v: (rows_v, d) ``W_v``.
    rank: latent width ``D_c``, in ``[1, max_rank(method, rows_k, rows_v, d)]``; for the split
        methods see :func:`split_ranks`.
    method: one of ``SVD_METHODS``.
    xtx: (d, d) ``sum_t x_t x_t^T`` of the attention input; required by the activation methods,
        ignored by the others.
    ridge: the activation methods add ``ridge * trace(xtx)/d`` to the diagonal of ``xtx``, so
        directions the calibration never visited still get a (small) weight.
    sigma: where the singular values go: "up" (``w_down`` rows orthonormal, or ``L``-orthonormal
        for the activation methods) or "sqrt" (``S^1/2`` on both sides, as the paper writes).
    row_grams: ``(G_k, G_v)`` of :func:`score_row_grams`, required by "activation-score" (the
        error weights of the key rows and the value rows), ignored by the others.
    key_weight: "activation-score" multiplies the key block's weight by it (1: the keys/values
        balance of "activation").
    Returns float32 :class:`LowRankKV` on ``w_kn``'s device.
    """
    _check_method(method)
    _check_weight(w_kn, "w_kn")
    _check_weight(w_v, "w_v")
    if sigma not in SIGMA_PLACEMENTS:
        raise ValueError(f"sigma must be one of {SIGMA_PLACEMENTS}, got {sigma!r}")
    rows_k, d = w_kn.shape
    rows_v = w_v.shape[0]
    if w_v.shape[1] != d:
        raise ValueError(f"w_kn and w_v must have the same number of columns d, got "
                         f"{d} and {w_v.shape[1]}")
    if rows_v < 1 or d < 1:
        raise ValueError(f"w_v must be non-empty, got shape {tuple(w_v.shape)}")
    top = max_rank(method, rows_k, rows_v, d)
    _check_int(rank, "rank", 1)
    if rank > top:
        raise ValueError(f"rank must be <= {top} (max_rank for {method} with rows_k={rows_k}, "
                         f"rows_v={rows_v}, d={d}), got {rank}")

    device = w_kn.device
    wk = w_kn.to(torch.float64)
    wv = w_v.to(device=device, dtype=torch.float64)
    stacked = torch.cat([wk, wv])
    chol, rowf = _weights(stacked, rows_k, method, xtx, ridge, row_grams, key_weight)

    if not _is_split(method):
        up, down = _truncated_svd(stacked, rank, chol, sigma, rowf)
        w_uk, w_uv = up[:rows_k], up[rows_k:]
    else:
        r_k, r_v = split_ranks(rank, rows_k, rows_v, d)
        up_v, down_v = _truncated_svd(wv, r_v, chol, sigma)
        w_uk = torch.zeros(rows_k, rank, dtype=torch.float64, device=device)
        w_uv = torch.zeros(rows_v, rank, dtype=torch.float64, device=device)
        w_uv[:, r_k:] = up_v
        if r_k:
            up_k, down_k = _truncated_svd(wk, r_k, chol, sigma)
            w_uk[:, :r_k] = up_k
            down = torch.cat([down_k, down_v])
        else:
            down = down_v
    return LowRankKV(
        w_down=down.to(torch.float32).contiguous(),
        w_uk=w_uk.to(torch.float32).contiguous(),
        w_uv=w_uv.to(torch.float32).contiguous(),
    )


def _check_joint(method: str, caller: str) -> None:
    if method not in JOINT_METHODS:
        raise ValueError(f"{caller} needs method in {JOINT_METHODS}, got {method!r}")


def joint_spectrum(w_kn: torch.Tensor, w_v: torch.Tensor, method: str = "joint", *,
                   xtx: torch.Tensor | None = None, ridge: float = 1e-6,
                   row_grams: tuple[torch.Tensor, torch.Tensor] | None = None,
                   key_weight: float = 1.0) -> torch.Tensor:
    """Singular values (descending, float64) of the matrix the joint methods truncate:
    ``[w_kn; w_v]``, whitened by the activations for "activation" (and weighted by the row
    Grams for "activation-score"). The squared tail beyond a rank is that rank's error (in the
    method's error), which is what a cache budget trades between layers."""
    _check_joint(method, "joint_spectrum")
    _check_weight(w_kn, "w_kn")
    _check_weight(w_v, "w_v")
    w = torch.cat([w_kn.to(torch.float64), w_v.to(device=w_kn.device, dtype=torch.float64)])
    chol, rowf = _weights(w, w_kn.shape[0], method, xtx, ridge, row_grams, key_weight)
    if chol is not None:
        w = w @ chol
    if rowf is not None:
        w = rowf @ w
    with _lapack_threads(w):
        return torch.linalg.svdvals(w)


def nested_joint_factors(w_kn: torch.Tensor, w_v: torch.Tensor, method: str = "activation", *,
                         xtx: torch.Tensor | None = None, ridge: float = 1e-6,
                         row_grams: tuple[torch.Tensor, torch.Tensor] | None = None,
                         key_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint factorization at its full rank, float64, ordered so that its first ``k``
    latent channels are exactly ``factorize_kv(..., rank=k, method)``: ``up[:, :k] @ down[:k]``
    for every ``k`` from one SVD (what a search over latent widths needs).

    Returns ``up`` ((rows_k + rows_v), R) and ``down`` (R, d), ``R = max_rank(method, ...)``.
    """
    _check_joint(method, "nested_joint_factors")
    _check_weight(w_kn, "w_kn")
    _check_weight(w_v, "w_v")
    d = w_v.shape[1]
    if w_kn.shape[1] != d:
        raise ValueError(f"w_kn and w_v must have the same number of columns d, got "
                         f"{w_kn.shape[1]} and {d}")
    w = torch.cat([w_kn.to(torch.float64), w_v.to(device=w_kn.device, dtype=torch.float64)])
    chol, rowf = _weights(w, w_kn.shape[0], method, xtx, ridge, row_grams, key_weight)
    return _truncated_svd(w, max_rank(method, w_kn.shape[0], w_v.shape[0], d), chol, "up", rowf)
