"""A cache budget (MLAConfig.cache_ratio) instead of a fixed d_kv."""
import pytest
import torch

import mla_ext
from mla_ext.convert.budget import allocate_latent_widths, latent_budget
from tiny import VOCAB, converted, tiny_model


def test_allocation_follows_the_spectra():
    flat = torch.ones(64, dtype=torch.float64)
    steep = 0.5 ** torch.arange(64, dtype=torch.float64)
    widths = allocate_latent_widths([flat, steep], budget=48)
    assert sum(widths) == 48 and all(w % 8 == 0 and w >= 8 for w in widths)
    assert widths[0] == 40 and widths[1] == 8       # the steep layer is nearly exact at rank 8
    assert allocate_latent_widths([flat, flat], budget=1000, maximum=[16, 24]) == [16, 24]
    with pytest.raises(ValueError, match="cannot give"):
        allocate_latent_widths([flat, flat], budget=8)


def test_latent_budget_arithmetic_and_errors():
    # SmolLM2: 30 layers, H_kv 3, d_h 64, r = 4: -81.25 % leaves 48 latent channels per layer
    assert latent_budget(0.1875, 30, 3, 64, [8] * 30) == 30 * 48
    with pytest.raises(ValueError, match="cache_ratio"):
        latent_budget(0.0, 30, 3, 64, [8] * 30)
    with pytest.raises(ValueError, match="RoPE keys"):
        latent_budget(0.07, 30, 3, 64, [8] * 30)
    with pytest.raises(ValueError, match="cache_ratio"):
        mla_ext.MLAConfig(cache_ratio=1.5)
    with pytest.raises(ValueError, match="svd"):
        mla_ext.MLAConfig(cache_ratio=0.2, svd="split")


@pytest.mark.parametrize("ratio", [0.25, 0.4])
def test_budgeted_conversion_meets_the_budget(ratio, tmp_path):
    model = tiny_model(layers=3, heads=4, kv_heads=2, head_dim=32, hidden=64)
    # make the layers differ so the budget is spread unevenly
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[:, 16:] = 0
        model.model.layers[0].self_attn.k_proj.weight[:, 16:] = 0
    mla = converted(model, rope_strategy="high", rope_pairs=2, cache_ratio=ratio)
    widths = [layer.self_attn.latent_dim for layer in mla.model.layers]
    assert all(w % 8 == 0 for w in widths) and len(set(widths)) > 1
    assert widths[0] < max(widths)                 # the rank-deficient layer needs less
    original = mla_ext.kv_cache_bytes_per_token(model, "bf16")
    got = mla_ext.kv_cache_bytes_per_token(mla, "bf16")
    group_bytes = 8 * 2
    assert ratio * original - len(widths) * group_bytes <= got <= ratio * original
    ids = torch.randint(0, VOCAB, (1, 7))
    cache = mla_ext.LatentCache(mla, cache_dtype="int8")
    out = mla.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
    loaded = mla_ext.load_pretrained(mla_ext.save_pretrained(mla, tmp_path / "ckpt"))
    assert [layer.self_attn.latent_dim for layer in loaded.model.layers] == widths
    assert torch.equal(loaded.generate(ids, past_key_values=mla_ext.LatentCache(
        loaded, cache_dtype="int8"), max_new_tokens=4, do_sample=False), out)
