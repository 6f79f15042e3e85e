"""The data-fitted correction of dropped RoPE pairs (MLAConfig(rope_correction=...))."""
import copy

import pytest
import torch

import mla_ext
from mla_ext.convert.rope_correction import (WEIGHTINGS, fit_pair_maps, pair_fit_sums,
                                             score_error)
from test_convert_rotation import CharTokenizer
from tiny import LOSSLESS, tiny_model

TEXT = "a fitted map stands in for the rotation of every dropped pair of dims " * 6
LENGTH = 64
FITTED = ("fitted-uniform", "fitted-attention")


def _rotary(t, inv_freq):
    angle = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat([angle, angle], dim=-1)
    return emb.cos(), emb.sin()


def _probs(h, t):
    scores = torch.randn(h, t, t, dtype=torch.float64)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def _weights(probs, weighting):
    return probs if weighting == "attention" else (probs > 0).double()


def test_sums_are_the_normal_equations_of_the_brute_force_error():
    # error(M) = c - 2 cross . vec(M) + vec(M)^T gram vec(M): differences between two maps
    # pin down both sums
    h, h_kv, t, d_h = 4, 2, 12, 8
    q = torch.randn(h, t, d_h, dtype=torch.float64)
    k = torch.randn(h_kv, t, d_h, dtype=torch.float64)
    cos, sin = _rotary(t, torch.tensor([1.0, 0.5, 0.1, 0.01], dtype=torch.float64))
    probs = _probs(h, t)
    sums = pair_fit_sums(q, k, 1.5 * cos, 1.5 * sin, probs)   # a scaled RoPE's norm divides out
    eye = torch.eye(2, dtype=torch.float64).expand(h, d_h // 2, 2, 2)
    other = torch.randn(h, d_h // 2, 2, 2, dtype=torch.float64)
    for i, weighting in enumerate(WEIGHTINGS):
        w = _weights(probs, weighting)
        measured = score_error(q, k, cos, sin, w, other) - score_error(q, k, cos, sin, w, eye)
        gram, cross = sums.gram[i], sums.cross[i]

        def quad(m):
            m = m.flatten(-2)
            return torch.einsum("hpi,hpij,hpj->hp", m, gram, m) - 2 * (cross * m).sum(-1)

        torch.testing.assert_close(measured, quad(other) - quad(eye))


def test_position_free_pairs_fit_the_identity_and_reproduce_the_scores():
    h, h_kv, t, d_h = 4, 2, 16, 8
    q = torch.randn(h, t, d_h, dtype=torch.float64)
    k = torch.randn(h_kv, t, d_h, dtype=torch.float64)
    inv_freq = torch.tensor([1.0, 0.0, 0.3, 0.0], dtype=torch.float64)  # pairs 1, 3 never turn
    cos, sin = _rotary(t, inv_freq)
    probs = _probs(h, t)
    sums = pair_fit_sums(q, k, cos, sin, probs)
    for weighting in WEIGHTINGS:
        maps = fit_pair_maps(sums, weighting)
        eye = torch.eye(2, dtype=torch.float64).expand(h, 2, 2, 2)
        torch.testing.assert_close(maps[:, [1, 3]], eye, atol=1e-10, rtol=0)
        err = score_error(q, k, cos, sin, _weights(probs, weighting), maps)
        assert err[:, [1, 3]].abs().max() < 1e-16 * err[:, [0, 2]].min()


def _model_with_still_pairs(kept):
    """A tiny model whose pairs outside ``kept`` have frequency 0: their score terms are
    position-free in the original model itself."""
    model = tiny_model(heads=4, kv_heads=2)
    model.config._attn_implementation = "eager"
    inv_freq = model.model.rotary_emb.inv_freq
    still = torch.ones_like(inv_freq, dtype=torch.bool)
    still[list(kept)] = False
    inv_freq[still] = 0
    return model


def _calibrate(model, **options):
    return mla_ext.calibrate(model, CharTokenizer(), TEXT, max_length=LENGTH, batch_size=2,
                             progress=False, **options)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("correction", FITTED)
def test_position_free_dropped_pairs_convert_losslessly(correction):
    # only pairs 0, 1 turn: partial RoPE high r = 2 loses nothing, and the fit must keep it so
    model = _model_with_still_pairs((0, 1))
    calib = _calibrate(model, collect_xtx=False, collect_rope_fit=True)
    for stats in calib.layers:
        maps = fit_pair_maps(stats.rope_fit, correction.removeprefix("fitted-"))
        eye = torch.eye(2, dtype=torch.float64).expand_as(maps[:, 2:])
        torch.testing.assert_close(maps[:, 2:], eye, atol=1e-9, rtol=0)
    cfg = mla_ext.MLAConfig(rope_strategy="high", rope_pairs=2, d_kv=None, svd="joint",
                            rope_correction=correction)
    mla = mla_ext.convert_to_mla(copy.deepcopy(model), cfg, calibration=calib, progress=False)
    ids = torch.randint(1, 100, (2, 40))
    torch.testing.assert_close(_logits(mla, ids), _logits(model, ids), atol=1e-4, rtol=1e-4)


def _pre_rope_qk(model, layer_idx, ids):
    attn = model.model.layers[layer_idx].self_attn
    seen = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o))]
    try:
        _logits(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    d_h = attn.head_dim
    t = ids.shape[1]
    return (seen["q"][0].view(t, -1, d_h).transpose(0, 1).double(),
            seen["k"][0].view(t, -1, d_h).transpose(0, 1).double())


@torch.no_grad()
def test_fit_reduces_the_score_error_on_the_calibration_pairs():
    model = tiny_model(heads=4, kv_heads=2)
    model.config._attn_implementation = "eager"
    calib = _calibrate(model, collect_xtx=False, collect_rope_fit=True)
    d_h = model.config.head_dim
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    for layer_idx, stats in enumerate(calib.layers):
        for weighting in WEIGHTINGS:
            maps = fit_pair_maps(stats.rope_fit, weighting)
            eye = torch.eye(2, dtype=torch.float64).expand_as(maps)
            fitted = plain = 0
            for seq in calib.sequences:
                ids = torch.tensor([seq])
                q, k = _pre_rope_qk(model, layer_idx, ids)
                t = ids.shape[1]
                cos, sin = _rotary(t, model.model.rotary_emb.inv_freq.double())
                if weighting == "uniform":
                    w = causal[:t, :t].double().expand(q.shape[0], t, t)
                else:
                    qr = q * cos + torch.cat([-q[..., d_h // 2:], q[..., :d_h // 2]], -1) * sin
                    kk = k.repeat_interleave(2, dim=0)
                    kr = kk * cos + torch.cat([-kk[..., d_h // 2:], kk[..., :d_h // 2]], -1) * sin
                    scores = (qr @ kr.transpose(-1, -2)) * d_h ** -0.5
                    w = scores.masked_fill(~causal[:t, :t], float("-inf")).softmax(-1)
                fitted = fitted + score_error(q, k, cos, sin, w, maps)
                plain = plain + score_error(q, k, cos, sin, w, eye)
            # least squares with a ridge toward I never does worse than I on its own data...
            assert (fitted <= plain * (1 + 1e-9)).all()
            # ...and here, with pairs that turn a lot over 64 positions, far better (about half)
            assert fitted.sum() < 0.8 * plain.sum(), (layer_idx, weighting)


@pytest.mark.parametrize("correction", FITTED)
def test_folded_queries_are_the_transposed_maps(correction):
    model = tiny_model(heads=4, kv_heads=2)
    model.config._attn_implementation = "eager"
    calib = _calibrate(model, collect_xtx=False, collect_rope_fit=True)
    cfg = mla_ext.MLAConfig(rope_strategy="high", rope_pairs=2, d_kv=None, svd="joint",
                            rope_correction=correction)
    mla = mla_ext.convert_to_mla(copy.deepcopy(model), cfg, calibration=calib, progress=False)
    x = torch.randn(5, model.config.hidden_size)
    d_h, half = model.config.head_dim, model.config.head_dim // 2
    for layer, orig, stats in zip(mla.model.layers, model.model.layers, calib.layers):
        maps = fit_pair_maps(stats.rope_fit, correction.removeprefix("fitted-"))
        with torch.no_grad():
            q_new = layer.self_attn.q_proj(x).view(5, -1, d_h).double()
            q_old = orig.self_attn.q_proj(x).view(5, -1, d_h).double()
        for j in range(2, half):      # dropped pair j sits in the NoPE part: dims j - 2, j + 4
            nope = 4 + torch.tensor([j - 2, half - 2 + j - 2])
            pair_old = q_old[..., [j, j + half]]
            expected = torch.einsum("hba,thb->tha", maps[:, j], pair_old)  # M^T q
            torch.testing.assert_close(q_new[..., nope], expected, atol=1e-5, rtol=1e-5)


def test_full_rope_leaves_the_model_unchanged():
    model = tiny_model(heads=4, kv_heads=2)
    ids = torch.randint(1, 100, (2, 24))
    reference = _logits(model, ids)
    # nothing dropped, nothing to fit: no calibration needed
    cfg = mla_ext.MLAConfig(**{**LOSSLESS, "rope_correction": "fitted-attention"})
    assert not cfg.needs_rope_fit
    mla = mla_ext.convert_to_mla(copy.deepcopy(model), cfg, progress=False)
    torch.testing.assert_close(_logits(mla, ids), reference, atol=1e-4, rtol=1e-4)
    # every pair kept explicitly: the fit is computed but applies to no pair
    model.config._attn_implementation = "eager"
    calib = _calibrate(model, collect_xtx=False, collect_rope_fit=True)
    cfg = mla_ext.MLAConfig(rope_strategy="high", rope_pairs=model.config.head_dim // 2,
                            d_kv=None, svd="joint", rope_correction="fitted-uniform")
    mla = mla_ext.convert_to_mla(copy.deepcopy(model), cfg, calibration=calib, progress=False)
    torch.testing.assert_close(_logits(mla, ids), reference, atol=1e-4, rtol=1e-4)


def test_budgeted_conversion_with_the_fit_runs_and_records_the_option():
    model = tiny_model(heads=4, kv_heads=2)
    cfg = mla_ext.MLAConfig(rope_correction="fitted-attention")
    calib = _calibrate(model, **cfg.calibration_options())
    mla = mla_ext.convert_to_mla(copy.deepcopy(model), cfg, calibration=calib, progress=False)
    assert mla.config.mla_ext["mla_config"]["rope_correction"] == "fitted-attention"
    assert torch.isfinite(_logits(mla, torch.randint(1, 100, (1, 24)))).all()


def test_bad_values_and_missing_statistics_raise():
    with pytest.raises(ValueError, match="rope_correction"):
        mla_ext.MLAConfig(rope_correction="fitted")
    with pytest.raises(ValueError, match="rope_correction"):
        mla_ext.MLAConfig(rope_correction=1)
    model = tiny_model(heads=4, kv_heads=2)
    calib = _calibrate(model, collect_xtx=False)
    cfg = mla_ext.MLAConfig(rope_strategy="high", rope_pairs=2, d_kv=None, svd="joint",
                            rope_correction="fitted-uniform")
    with pytest.raises(ValueError, match="collect_rope_fit"):
        mla_ext.convert_to_mla(copy.deepcopy(model), cfg, calibration=calib, progress=False)
    with pytest.raises(ValueError, match="calibration"):
        mla_ext.convert_to_mla(copy.deepcopy(model), cfg, progress=False)


def test_default_is_fitted_where_the_conversion_calibrates_anyway():
    assert mla_ext.MLAConfig().rope_correction == "fitted-attention"
    assert mla_ext.MLAConfig().calibration_options()["collect_rope_fit"]
    # weight-only (no calibration) and full RoPE conversions do not start to need one
    weight_only = mla_ext.MLAConfig(rope_strategy="high", rope_pairs=2, d_kv=4, svd="joint")
    assert weight_only.rope_correction == "none" and not weight_only.needs_calibration
    assert mla_ext.MLAConfig(**LOSSLESS).rope_correction == "none"
    # a config saved before the option existed was converted without a correction
    old = mla_ext.MLAConfig().to_dict()
    del old["rope_correction"]
    assert mla_ext.MLAConfig.from_dict(old).rope_correction == "none"
    assert mla_ext.MLAConfig.from_dict(mla_ext.MLAConfig().to_dict()) == mla_ext.MLAConfig()
