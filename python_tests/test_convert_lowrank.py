import pytest
import torch

from mla_ext.convert import SVD_METHODS, LowRankKV, factorize_kv, max_rank
from mla_ext.convert.lowrank import split_ranks

ACTIVATION = ("activation", "activation-split")


def _weights(rows_k, rows_v, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows_k, d, generator=gen, dtype=torch.float64),
            torch.randn(rows_v, d, generator=gen, dtype=torch.float64))


def _activations(n, d, seed=1, decay=0.7):
    """Anisotropic activations (varied per-direction scales), like real hidden states."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    scales = decay ** torch.arange(d, dtype=torch.float64)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * scales @ basis.T


def _gram(n, seed, decay=0.8):
    """An anisotropic positive definite Gram, like the queries' second moment."""
    y = _activations(4 * n, n, seed=seed, decay=decay)
    return y.T @ y


def _row_grams(method, rows_k, rows_v):
    """The row weights "activation-score" needs (test_convert_score_svd.py tests the method)."""
    if method != "activation-score":
        return None
    return tuple(_gram(n, seed=5, decay=0.7) for n in (rows_k, rows_v))


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_max_rank():
    assert max_rank("joint", 24, 32, 64) == 56
    assert max_rank("joint", 24, 32, 40) == 40
    assert max_rank("activation", 0, 32, 64) == 32
    assert max_rank("split", 24, 32, 40) == 56      # each part keeps its own basis
    assert max_rank("split", 24, 48, 40) == 64
    assert max_rank("activation-split", 0, 32, 20) == 20
    with pytest.raises(ValueError, match="method must be one of"):
        max_rank("svd", 1, 1, 1)
    with pytest.raises(ValueError, match="rows_v"):
        max_rank("joint", 1, 0, 1)


def test_split_ranks():
    assert split_ranks(16, 24, 32, 64) == (8, 8)
    assert split_ranks(56, 24, 32, 64) == (24, 32)  # keys capped at 24, values take the rest
    assert split_ranks(60, 40, 32, 64) == (30, 30)
    assert split_ranks(68, 40, 32, 64) == (36, 32)  # values capped at 32
    assert split_ranks(7, 0, 32, 64) == (0, 7)
    assert split_ranks(51, 24, 48, 27) == (24, 27)  # odd maximum (odd d) is allowed
    with pytest.raises(ValueError, match="even"):
        split_ranks(15, 24, 32, 64)


# (rows_k, rows_v, d): rows below d, rows above d (latent capped by d), full RoPE (no NoPE rows).
SHAPES = [(24, 32, 64), (24, 32, 40), (0, 32, 64), (0, 32, 20)]


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("rows_k,rows_v,d", SHAPES)
@pytest.mark.parametrize("sigma", ["up", "sqrt"])
def test_full_rank_is_lossless(method, rows_k, rows_v, d, sigma):
    w_kn, w_v = _weights(rows_k, rows_v, d)
    xtx = None
    if method in ACTIVATION:
        x = _activations(4 * d, d)
        xtx = x.T @ x
    if method == "activation-score":
        x = _activations(4 * d, d)
        xtx = x.T @ x
    rank = max_rank(method, rows_k, rows_v, d)
    out = factorize_kv(w_kn, w_v, rank, method, xtx=xtx, sigma=sigma,
                       row_grams=_row_grams(method, rows_k, rows_v))
    assert isinstance(out, LowRankKV)
    assert out.w_down.shape == (rank, d) and out.w_down.dtype == torch.float32
    assert out.w_uk.shape == (rows_k, rank) and out.w_uk.dtype == torch.float32
    assert out.w_uv.shape == (rows_v, rank) and out.w_uv.dtype == torch.float32
    # float32 outputs: the products are exact up to float32 rounding of the factors.
    torch.testing.assert_close(out.w_uv.double() @ out.w_down.double(), w_v, rtol=0, atol=1e-4)
    if rows_k:
        torch.testing.assert_close(out.w_uk.double() @ out.w_down.double(), w_kn, rtol=0,
                                   atol=1e-4)


@pytest.mark.parametrize("rank", [1, 10, 30])
def test_joint_reaches_eckart_young(rank):
    w_kn, w_v = _weights(24, 32, 64, seed=5)
    stacked = torch.cat([w_kn, w_v])
    s = torch.linalg.svdvals(stacked)
    optimal = float(s[rank:].square().sum().sqrt())
    for sigma in ("up", "sqrt"):
        out = factorize_kv(w_kn, w_v, rank, "joint", sigma=sigma)
        approx = torch.cat([out.w_uk, out.w_uv]).double() @ out.w_down.double()
        assert float((stacked - approx).norm()) == pytest.approx(optimal, rel=1e-5)


def test_sigma_placement_sets_latent_scale():
    w_kn, w_v = _weights(24, 32, 64, seed=2)
    s = torch.linalg.svdvals(torch.cat([w_kn, w_v]))[:12]
    up = factorize_kv(w_kn, w_v, 12, "joint", sigma="up")
    torch.testing.assert_close(up.w_down @ up.w_down.T, torch.eye(12), rtol=0, atol=1e-5)
    sqrt = factorize_kv(w_kn, w_v, 12, "joint", sigma="sqrt")
    torch.testing.assert_close((sqrt.w_down @ sqrt.w_down.T).double(), torch.diag(s),
                               rtol=1e-5, atol=1e-4)


def test_split_is_block_structured_and_optimal_per_part():
    w_kn, w_v = _weights(24, 32, 64, seed=4)
    out = factorize_kv(w_kn, w_v, 16, "split")
    assert out.w_down.shape == (16, 64)
    assert torch.count_nonzero(out.w_uk[:, 8:]) == 0
    assert torch.count_nonzero(out.w_uv[:, :8]) == 0
    for w, up, down in ((w_kn, out.w_uk[:, :8], out.w_down[:8]),
                        (w_v, out.w_uv[:, 8:], out.w_down[8:])):
        optimal = float(torch.linalg.svdvals(w)[8:].square().sum().sqrt())
        err = float((w - up.double() @ down.double()).norm())
        assert err == pytest.approx(optimal, rel=1e-5)


def test_split_without_nope_rows_gives_everything_to_values():
    _, w_v = _weights(0, 32, 64, seed=6)
    w_kn = torch.zeros(0, 64, dtype=torch.float64)
    out = factorize_kv(w_kn, w_v, 5, "split")
    assert out.w_uk.shape == (0, 5)
    optimal = float(torch.linalg.svdvals(w_v)[5:].square().sum().sqrt())
    err = float((w_v - out.w_uv.double() @ out.w_down.double()).norm())
    assert err == pytest.approx(optimal, rel=1e-5)


@pytest.mark.parametrize("method", ACTIVATION + ("activation-score",))
def test_activation_aware_recovers_outputs_in_a_subspace(method):
    # Activations in a known 8-dim subspace: W x has rank 8 over the data, so an output-aware
    # factorization of rank 8 (8 per part for split) reproduces it exactly, also on unseen x of
    # the same span (for activation-score whatever the row weights), while the weight SVD at
    # that rank cannot.
    d, sub = 64, 8
    w_kn, w_v = _weights(24, 32, d, seed=7)
    gen = torch.Generator().manual_seed(8)
    basis = torch.randn(sub, d, generator=gen, dtype=torch.float64)
    x = torch.randn(500, sub, generator=gen, dtype=torch.float64) @ basis
    xtx = x.T @ x
    rank = 2 * sub if method == "activation-split" else sub
    weight_method = "split" if method == "activation-split" else "joint"
    aware = factorize_kv(w_kn, w_v, rank, method, xtx=xtx, ridge=1e-10,
                         row_grams=_row_grams(method, 24, 32))
    plain = factorize_kv(w_kn, w_v, rank, weight_method)
    fresh = torch.randn(50, sub, generator=gen, dtype=torch.float64) @ basis  # unseen, same span
    for w, part in ((w_kn, "w_uk"), (w_v, "w_uv")):
        target = fresh @ w.T
        got = fresh @ (getattr(aware, part).double() @ aware.w_down.double()).T
        base = fresh @ (getattr(plain, part).double() @ plain.w_down.double()).T
        assert _rel(got, target) < 1e-4
        assert _rel(base, target) > 0.1


def _output_problem():
    """Keys and values of a 64-dim input, and calibration activations whose spectrum decays: the
    problem the output-aware factorizations are checked for optimality on."""
    d = 64
    w_kn, w_v = _weights(24, 32, d, seed=9)
    x = _activations(1000, d, seed=10, decay=0.85)
    return d, w_kn, w_v, x, x.T @ x


def _approx(f):
    """The stacked [W_k; W_v] a factorization represents."""
    return torch.cat([f.w_uk, f.w_uv]).double() @ f.w_down.double()


@pytest.mark.parametrize("rank", [5, 20, 40])
def test_activation_aware_is_optimal_for_outputs(rank):
    d, w_kn, w_v, x, xtx = _output_problem()
    stacked = torch.cat([w_kn, w_v])
    aware = factorize_kv(w_kn, w_v, rank, "activation", xtx=xtx, ridge=0.0)
    plain = factorize_kv(w_kn, w_v, rank, "joint")

    def output_error(f):
        return float(((stacked - _approx(f)) @ x.T).norm())

    # Eckart-Young in the whitened space: the error is the tail of W L's singular values.
    chol = torch.linalg.cholesky(xtx)
    optimal = float(torch.linalg.svdvals(stacked @ chol)[rank:].square().sum().sqrt())
    assert output_error(aware) == pytest.approx(optimal, rel=1e-4)
    assert output_error(aware) < 0.9 * output_error(plain)


@pytest.mark.parametrize("ridge", [0.05, 0.5])
def test_ridge_is_scaled_by_mean_eigenvalue(ridge):
    # The factorization is optimal for xtx + ridge * trace(xtx)/d * I, whatever xtx's scale.
    d, rank = 64, 12
    w_kn, w_v = _weights(24, 32, d, seed=16)
    x = _activations(500, d, seed=17, decay=0.8) * 1e3
    xtx = x.T @ x
    stacked = torch.cat([w_kn, w_v])
    reg = xtx + ridge * torch.trace(xtx) / d * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(reg)
    optimal = float(torch.linalg.svdvals(stacked @ chol)[rank:].square().sum().sqrt())
    out = factorize_kv(w_kn, w_v, rank, "activation", xtx=xtx, ridge=ridge)
    approx = torch.cat([out.w_uk, out.w_uv]).double() @ out.w_down.double()
    assert float(((stacked - approx) @ chol).norm()) == pytest.approx(optimal, rel=1e-4)


@pytest.mark.parametrize("method", ACTIVATION)
def test_activation_aware_survives_ill_conditioned_xtx(method):
    # Eigenvalues spread over 9 decades, like the first layers of real models.
    d = 64
    w_kn, w_v = _weights(24, 32, d, seed=11)
    gen = torch.Generator().manual_seed(12)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    xtx = basis @ torch.diag(torch.logspace(3, -6, d, dtype=torch.float64)) @ basis.T
    rank = max_rank(method, 24, 32, d)
    out = factorize_kv(w_kn, w_v, rank, method, xtx=xtx)
    assert torch.isfinite(out.w_down).all()
    assert _rel(out.w_uv @ out.w_down, w_v) < 1e-5
    assert _rel(out.w_uk @ out.w_down, w_kn) < 1e-5
    # Without any ridge this singular-looking matrix still factors (it is positive definite).
    factorize_kv(w_kn, w_v, 10, method, xtx=xtx, ridge=0.0)


def test_low_precision_inputs():
    w_kn, w_v = _weights(24, 32, 64, seed=13)
    out = factorize_kv(w_kn.to(torch.bfloat16), w_v.to(torch.float16), 56)
    assert out.w_down.dtype == torch.float32
    torch.testing.assert_close(out.w_uv @ out.w_down, w_v.to(torch.float16).float(), rtol=0,
                               atol=1e-4)


def test_bad_input():
    w_kn, w_v = _weights(24, 32, 64)
    xtx = torch.eye(64, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        factorize_kv(w_kn, w_v, 0)
    with pytest.raises(ValueError, match="rank must be <= 56"):
        factorize_kv(w_kn, w_v, 57)
    with pytest.raises(ValueError, match="rank must be <= 40"):
        factorize_kv(w_kn[:, :40], w_v[:, :40], 41, "activation", xtx=xtx[:40, :40])
    with pytest.raises(ValueError, match="even"):
        factorize_kv(w_kn, w_v, 9, "split")
    with pytest.raises(ValueError, match="same number of columns"):
        factorize_kv(w_kn, w_v[:, :63], 8)
    with pytest.raises(ValueError, match="w_kn must be a 2-D"):
        factorize_kv(w_kn[0], w_v, 8)
    with pytest.raises(ValueError, match="w_v must be non-empty"):
        factorize_kv(w_kn, w_v[:0], 8)
    for bad in (float("nan"), float("inf")):
        w = w_v.clone()
        w[3, 5] = bad
        with pytest.raises(ValueError, match="w_v contains NaN or inf"):
            factorize_kv(w_kn, w, 8)
    with pytest.raises(ValueError, match="method must be one of"):
        factorize_kv(w_kn, w_v, 8, "pca")
    with pytest.raises(ValueError, match="sigma must be one of"):
        factorize_kv(w_kn, w_v, 8, sigma="down")
    for method in ACTIVATION:
        with pytest.raises(ValueError, match="xtx is required"):
            factorize_kv(w_kn, w_v, 8, method)
    with pytest.raises(ValueError, match=r"xtx must have shape \(64, 64\)"):
        factorize_kv(w_kn, w_v, 8, "activation", xtx=xtx[:32, :32])
    with pytest.raises(ValueError, match="xtx contains NaN"):
        factorize_kv(w_kn, w_v, 8, "activation", xtx=xtx * float("nan"))
    with pytest.raises(ValueError, match="positive trace"):
        factorize_kv(w_kn, w_v, 8, "activation", xtx=torch.zeros(64, 64))
    with pytest.raises(ValueError, match="ridge must be"):
        factorize_kv(w_kn, w_v, 8, "activation", xtx=xtx, ridge=-1.0)
    rank_deficient = torch.zeros(64, 64, dtype=torch.float64)
    rank_deficient[0, 0] = 1.0
    with pytest.raises(ValueError, match="not positive definite"):
        factorize_kv(w_kn, w_v, 8, "activation", xtx=rank_deficient, ridge=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("method", SVD_METHODS)
def test_cuda_matches_cpu(method):
    w_kn, w_v = _weights(24, 32, 64, seed=14)
    x = _activations(256, 64, seed=15)
    xtx = x.T @ x
    grams = _row_grams(method, 24, 32)
    cpu = factorize_kv(w_kn, w_v, 16, method, xtx=xtx, row_grams=grams)
    gpu = factorize_kv(w_kn.cuda(), w_v.cuda(), 16, method, xtx=xtx.cuda(), row_grams=grams)
    assert gpu.w_down.is_cuda
    for part in ("w_uk", "w_uv"):
        # Singular vectors' signs differ between backends; the products do not.
        torch.testing.assert_close((getattr(gpu, part) @ gpu.w_down).cpu(),
                                   getattr(cpu, part) @ cpu.w_down, rtol=1e-4, atol=1e-4)


def test_small_factorizations_run_on_one_thread_and_restore_the_count(monkeypatch):
    from mla_ext.convert import lowrank

    seen = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or real_svd(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = torch.randn(24, 16, dtype=torch.float64)
        factorize_kv(w[:8], w[8:], 4, "activation", xtx=w.T @ w)
        assert seen == [1] and torch.get_num_threads() == 2
        monkeypatch.setattr(lowrank, "SINGLE_THREAD_MAX_DIM", 8)   # now "large": left alone
        factorize_kv(w[:8], w[8:], 4, "joint")
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
