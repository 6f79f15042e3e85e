import pytest
import torch

import mla_ext
from mla_ext.modeling.cache import LatentCacheLayer, default_group_size, latent_bytes_per_token
from tiny import VOCAB, converted, tiny_model


def _layer(dtype, rope=torch.float32, d_c=48, h_kv=3, d_r=8, block=4, group=16, **kw):
    return LatentCacheLayer(d_c, h_kv, d_r, dtype, rope, block_size=block, group_size=group, **kw)


@pytest.mark.parametrize("dtype, rope, bound", [
    (torch.float32, torch.float32, 0.0),
    (torch.bfloat16, torch.bfloat16, 2 ** -8),
    (torch.float16, torch.float16, 2 ** -11),
    (torch.int8, torch.float32, 1 / 127),
    (torch.uint8, torch.float32, 1 / 15),
    (torch.float8_e4m3fn, torch.float8_e4m3fn, 2 ** -3),
])
def test_append_gather_roundtrip_error_is_bounded(dtype, rope, bound):
    layer = _layer(dtype, rope)
    chunks = [(torch.randn(2, t, 48), torch.randn(2, t, 3, 8)) for t in (5, 1, 7, 1)]
    for c, k in chunks:
        layer.append(c, k)
    c_all = torch.cat([c for c, _ in chunks], 1)
    k_all = torch.cat([k for _, k in chunks], 1)
    got_c, got_k = layer.gather()
    assert got_c.shape == c_all.shape and layer.get_seq_length() == 14
    # per-group bound: half a quantization step of the group's range (relative for floats)
    span = c_all.unflatten(-1, (3, 16))
    span = (span.amax(-1) - span.amin(-1)).repeat_interleave(16, -1)
    err = (got_c - c_all).abs()
    if dtype in (torch.int8, torch.uint8):
        assert (err <= bound * span + 1e-6).all()
        assert err.max() > 0
    else:
        assert (err <= bound * c_all.abs() + 1e-6).all()
    assert ((got_k - k_all).abs() <= (2 ** -3 if rope != torch.float32 else 0) * k_all.abs().amax(-1, keepdim=True) + 1e-6).all()


def test_growth_keeps_old_tokens_and_tables_stay_consistent():
    layer = _layer(torch.float32, block=2)
    cs = []
    for _ in range(9):
        c = torch.randn(3, 1, 48)
        cs.append(c)
        layer.append(c, torch.randn(3, 1, 3, 8))
    got, _ = layer.gather()
    torch.testing.assert_close(got, torch.cat(cs, 1))
    assert layer.block_table.shape[1] * 2 >= 9
    assert layer.block_table.unique().numel() == layer.block_table.numel()   # no shared blocks


def test_max_length_is_enforced_and_preallocated():
    layer = _layer(torch.bfloat16, max_length=8)
    layer.append(torch.randn(1, 5, 48), torch.randn(1, 5, 3, 8))
    blocks = layer.storage["latent"].shape[0]
    layer.append(torch.randn(1, 3, 48), torch.randn(1, 3, 3, 8))
    assert layer.storage["latent"].shape[0] == blocks
    with pytest.raises(ValueError, match="max_length=8"):
        layer.append(torch.randn(1, 1, 48), torch.randn(1, 1, 3, 8))


def test_bad_appends_are_rejected():
    layer = _layer(torch.float32)
    layer.append(torch.randn(2, 3, 48), torch.randn(2, 3, 3, 8))
    with pytest.raises(ValueError, match="expected latent"):
        layer.append(torch.randn(2, 3, 40), torch.randn(2, 3, 3, 8))
    with pytest.raises(ValueError, match="batch of 3"):
        layer.append(torch.randn(3, 1, 48), torch.randn(3, 1, 3, 8))
    with pytest.raises(ValueError, match="group_size"):
        _layer(torch.int8, group=20)
    with pytest.raises(TypeError, match="latents"):
        layer.update(torch.zeros(1), torch.zeros(1), 0)


def test_select_and_crop():
    layer = _layer(torch.float32)
    c = torch.randn(3, 6, 48)
    layer.append(c, torch.randn(3, 6, 3, 8))
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    got, _ = layer.gather()
    torch.testing.assert_close(got, c[[2, 0, 0]])
    layer.crop(-2)
    assert layer.get_seq_length() == 4 and layer.gather()[0].shape[1] == 4


def test_bytes_per_token_formula():
    # SmolLM2 shape, d_kv = 16: D_c = 48, H_kv = 3, d_r = 8, group 48
    assert default_group_size(48) == 48 and default_group_size(200) == 50
    assert latent_bytes_per_token(48, 3, 8, torch.bfloat16, torch.bfloat16, 48) == 48 * 2 + 24 * 2
    assert latent_bytes_per_token(48, 3, 8, torch.uint8, torch.bfloat16, 48) == 24 + 4 + 48
    assert latent_bytes_per_token(48, 3, 8, torch.int8, torch.float8_e4m3fn, 48) == 48 + 2 + 24 + 6


def test_model_cache_bytes_match_the_paper_ratio():
    model = tiny_model(heads=4, kv_heads=2, head_dim=16)
    mla = converted(model, rope_strategy="high", rope_pairs=1, d_kv=4)    # d_r = d_h/8, d_kv = d_h/4
    original = mla_ext.kv_cache_bytes_per_token(model, "bf16")
    assert original == 2 * 2 * 2 * 16 * 2
    ratio = mla_ext.kv_cache_bytes_per_token(mla, "bf16") / original
    assert ratio == pytest.approx((2 + 4) / (2 * 16))
    cache = mla_ext.LatentCache(mla, cache_dtype="int4")
    assert cache.bytes_per_token() == mla_ext.kv_cache_bytes_per_token(mla, "int4")
    mla(torch.randint(0, VOCAB, (1, 5)), past_key_values=cache)
    assert cache.nbytes() > 0
    with pytest.raises(ValueError, match="cache_dtype"):
        mla_ext.LatentCache(mla, cache_dtype="int3")
    with pytest.raises(ValueError, match="no MLAAttention"):
        mla_ext.LatentCache(model)


@pytest.mark.parametrize("cache_dtype", ["int8", "int4"])
def test_quantized_cache_logits_close_to_exact(cache_dtype):
    mla = converted(tiny_model(), rope_strategy="high", rope_pairs=2, d_kv=8)
    prompt = torch.randint(0, VOCAB, (2, 20))
    step = torch.randint(0, VOCAB, (2, 1))
    out = {}
    for dt in ("fp32", cache_dtype):
        cache = mla_ext.LatentCache(mla, cache_dtype=dt)
        mla(prompt, past_key_values=cache)
        out[dt] = mla(step, past_key_values=cache).logits.float()
    rel = (out[cache_dtype] - out["fp32"]).norm() / out["fp32"].norm()
    assert 0 < rel < {"int8": 0.01, "int4": 0.1}[cache_dtype]
