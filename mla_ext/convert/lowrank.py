"""Low-rank keys and values: factor the NoPE key rows and the value rows through one latent.

``[W_kn; W_v] ~ [W_uk; W_uv] @ W_down`` with ``W_down`` (D_c, d), so the cache holds the
``D_c``-wide latent ``c = W_down x`` (ARCHITECTURE 2.2). Methods:

- ``joint``: truncated SVD of the stacked matrix (Eckart-Young optimal in the weights).
- ``split``: separate SVDs of ``W_kn`` and ``W_v``; the latent is ``[c_k | c_v]`` and the up
  projections are block structured, so the module and the decode kernel are those of ``joint``.
- ``activation`` / ``activation-split``: the same, but optimal for the outputs ``W x`` over the
  calibration activations: with ``X^T X = L L^T``, ``||(W - W') X^T||_F = ||(W - W') L||_F``, so
  the truncated SVD of ``W L`` mapped back by ``L^{-1}`` is the best rank-``D_c`` factorization.

Everything is computed in float64 on the weights' device and returned as float32.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

SVD_METHODS = ("joint", "split", "activation", "activation-split")
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


def _truncated_svd(w: torch.Tensor, rank: int, chol: torch.Tensor | None,
                   sigma: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` ``up @ down`` for ``w`` (weighted by ``chol`` if given)."""
    a = w if chol is None else w @ chol
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
    return up, down


def factorize_kv(w_kn: torch.Tensor, w_v: torch.Tensor, rank: int, method: str = "joint", *,
                 xtx: torch.Tensor | None = None, ridge: float = 1e-6,
                 sigma: str = "up") -> LowRankKV:
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
    chol = _whitening(xtx, d, ridge, device) if method.startswith("activation") else None

    if not _is_split(method):
        up, down = _truncated_svd(torch.cat([wk, wv]), rank, chol, sigma)
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


def joint_spectrum(w_kn: torch.Tensor, w_v: torch.Tensor, method: str = "joint", *,
                   xtx: torch.Tensor | None = None, ridge: float = 1e-6) -> torch.Tensor:
    """Singular values (descending, float64) of the matrix the joint methods truncate:
    ``[w_kn; w_v]``, whitened by the activations for "activation". The squared tail beyond a
    rank is that rank's error (in output energy for "activation"), which is what a cache budget
    trades between layers."""
    if method not in ("joint", "activation"):
        raise ValueError(f"joint_spectrum needs method 'joint' or 'activation', got {method!r}")
    _check_weight(w_kn, "w_kn")
    _check_weight(w_v, "w_v")
    d = w_v.shape[1]
    w = torch.cat([w_kn.to(torch.float64), w_v.to(device=w_kn.device, dtype=torch.float64)])
    if method == "activation":
        w = w @ _whitening(xtx, d, ridge, w.device)
    with _lapack_threads(w):
        return torch.linalg.svdvals(w)


def nested_joint_factors(w_kn: torch.Tensor, w_v: torch.Tensor, method: str = "activation", *,
                         xtx: torch.Tensor | None = None,
                         ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint factorization at its full rank, float64, ordered so that its first ``k``
    latent channels are exactly ``factorize_kv(..., rank=k, method)``: ``up[:, :k] @ down[:k]``
    for every ``k`` from one SVD (what a search over latent widths needs).

    Returns ``up`` ((rows_k + rows_v), R) and ``down`` (R, d), ``R = max_rank(method, ...)``.
    """
    if method not in ("joint", "activation"):
        raise ValueError(f"nested_joint_factors needs method 'joint' or 'activation', "
                         f"got {method!r}")
    _check_weight(w_kn, "w_kn")
    _check_weight(w_v, "w_v")
    d = w_v.shape[1]
    if w_kn.shape[1] != d:
        raise ValueError(f"w_kn and w_v must have the same number of columns d, got "
                         f"{w_kn.shape[1]} and {d}")
    w = torch.cat([w_kn.to(torch.float64), w_v.to(device=w_kn.device, dtype=torch.float64)])
    chol = _whitening(xtx, d, ridge, w.device) if method == "activation" else None
    return _truncated_svd(w, max_rank(method, w_kn.shape[0], w_v.shape[0], d), chol, "up")
