import copy

import pytest
import torch

import mla_ext
from mla_ext.modeling import MLAAttention
from tiny import LOSSLESS, VOCAB, converted, tiny_model

CONFIGS = [
    dict(heads=4, kv_heads=4),                          # MHA
    dict(heads=4, kv_heads=2),                          # GQA
    dict(heads=6, kv_heads=2, bias=True, hidden=96),    # GQA with attention bias
    dict(heads=4, kv_heads=1, rope_scaling="llama3"),   # MQA, llama3 rope scaling
    dict(heads=4, kv_heads=2, bias=True, rope_scaling="llama3"),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("svd", ["joint", "split"])
def test_full_rope_full_rank_reproduces_logits(kwargs, svd):
    model = tiny_model(**kwargs)
    ids = torch.randint(0, VOCAB, (2, 40))
    ref = model(ids).logits
    mla = converted(model, **{**LOSSLESS, "svd": svd})
    assert all(isinstance(layer.self_attn, MLAAttention) for layer in mla.model.layers)
    out = mla(ids).logits
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("kwargs", CONFIGS[:3])
@pytest.mark.parametrize("cache_dtype", ["fp32", "bf16", "int8"])
def test_lossless_generate_through_latent_cache(kwargs, cache_dtype):
    model = tiny_model(**kwargs)
    mla = converted(model, **LOSSLESS)
    prompt = torch.randint(0, VOCAB, (2, 9))
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    cache = mla_ext.LatentCache(mla, cache_dtype=cache_dtype, block_size=4)
    got = mla.generate(prompt, past_key_values=cache, max_new_tokens=12, do_sample=False)
    if cache_dtype == "fp32":
        assert torch.equal(got, expected)
    else:  # rounding of the cache may flip a near-tie late; the first tokens must agree
        assert torch.equal(got[:, :prompt.shape[1] + 4], expected[:, :prompt.shape[1] + 4])
    assert cache.get_seq_length() == got.shape[1] - 1


def _decode_both_ways(mla, prompt, steps, cache_dtype="fp32"):
    outs = {}
    for mode in ("absorbed", "reconstruct"):
        for layer in mla.model.layers:
            layer.self_attn.decode_mode = mode if mode == "reconstruct" else "auto"
        cache = mla_ext.LatentCache(mla, cache_dtype=cache_dtype, block_size=8)
        logits = [mla(prompt, past_key_values=cache).logits[:, -1]]
        for tok in steps:
            logits.append(mla(tok, past_key_values=cache).logits[:, -1])
        outs[mode] = torch.stack(logits)
    for layer in mla.model.layers:
        layer.self_attn.decode_mode = "auto"
    return outs["absorbed"], outs["reconstruct"]


@pytest.mark.parametrize("cfg", [
    dict(rope_strategy="high", rope_pairs=2, d_kv=4, svd="joint"),
    dict(rope_strategy="uniform", rope_pairs=1, d_kv=6, svd="split"),
    dict(rope_strategy="low", rope_pairs=3, d_kv=8, svd="joint"),
])
@pytest.mark.parametrize("kwargs", CONFIGS[1:3])
def test_absorbed_decode_equals_reconstruction(cfg, kwargs):
    mla = converted(tiny_model(**kwargs), **cfg)
    prompt = torch.randint(0, VOCAB, (2, 11))
    steps = [torch.randint(0, VOCAB, (2, n)) for n in (1, 1, 3, 1)]   # s_q = 3 is causal inside
    absorbed, rebuilt = _decode_both_ways(mla, prompt, steps)
    torch.testing.assert_close(absorbed, rebuilt, atol=2e-5, rtol=2e-5)


def test_absorbed_path_is_used_for_decode(monkeypatch):
    mla = converted(tiny_model(), rope_strategy="high", rope_pairs=2, d_kv=4)
    calls = []
    real = mla_ext.ops.mla_decode
    monkeypatch.setattr(mla_ext.ops, "mla_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = mla_ext.LatentCache(mla, cache_dtype="bf16")
    mla.generate(torch.randint(0, VOCAB, (1, 5)), past_key_values=cache, max_new_tokens=3,
                 do_sample=False)
    assert len(calls) == 2 * len(mla.model.layers)   # two decode steps after the prefill


def test_padded_batch_generate_matches_unpadded():
    mla = converted(tiny_model(), rope_strategy="high", rope_pairs=2, d_kv=4)
    a = torch.randint(1, VOCAB, (1, 7))
    b = torch.randint(1, VOCAB, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    cache = mla_ext.LatentCache(mla, cache_dtype="fp32")
    out = mla.generate(batch, attention_mask=mask, past_key_values=cache, max_new_tokens=5,
                       do_sample=False, pad_token_id=0)
    alone = mla.generate(b, past_key_values=mla_ext.LatentCache(mla, cache_dtype="fp32"),
                         max_new_tokens=5, do_sample=False)
    assert torch.equal(out[1, -5:], alone[0, -5:])


def test_training_step_runs_and_has_gradients():
    mla = converted(tiny_model(), rope_strategy="high", rope_pairs=2, d_kv=4)
    mla.train()
    ids = torch.randint(0, VOCAB, (2, 16))
    loss = mla(ids, labels=ids).loss
    loss.backward()
    attn = mla.model.layers[0].self_attn
    for lin in (attn.q_proj, attn.kr_proj, attn.kv_down, attn.k_up, attn.v_up, attn.o_proj):
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_default_generate_without_latent_cache_works():
    model = tiny_model()
    mla = converted(model, **LOSSLESS)
    prompt = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(mla.generate(prompt, max_new_tokens=6, do_sample=False),
                       model.generate(prompt, max_new_tokens=6, do_sample=False))


def test_rope_pairs_buffer_and_layout():
    model = tiny_model(heads=4, kv_heads=2, head_dim=16)
    mla = converted(model, rope_strategy="uniform", rope_pairs=2, d_kv=8)
    attn = mla.model.layers[0].self_attn
    assert attn.rope_pairs.tolist() == [[0, 4], [0, 4]]
    # kr_proj holds k_proj rows (j, j + d_h/2) of the kept pairs, x1 then x2
    k = model.model.layers[0].self_attn.k_proj.weight
    torch.testing.assert_close(attn.kr_proj.weight[:4], k[[0, 4, 8, 12]])
    assert attn.k_up.weight.shape == (2 * 12, 16) and attn.v_up.weight.shape == (2 * 16, 16)


@pytest.mark.parametrize("cfg, match", [
    (dict(rope_pairs=9), "rope_pairs=9 exceeds"),
    (dict(rope_pairs=2, d_kv=1000, rope_strategy="high"), "above the full rank"),
    (dict(rope_pairs=2, rope_strategy="2-norm"), "calibration"),
    (dict(rope_pairs=2, rope_strategy="high", svd="activation"), "calibration"),
])
def test_bad_configs_fail_before_modifying(cfg, match):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        mla_ext.convert_to_mla(model, mla_ext.MLAConfig(**cfg), progress=False)
    assert not any(isinstance(m, MLAAttention) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_mla_config_validation():
    with pytest.raises(ValueError, match="rope_strategy"):
        mla_ext.MLAConfig(rope_strategy="middle")
    with pytest.raises(ValueError, match="svd"):
        mla_ext.MLAConfig(svd="qr")
    with pytest.raises(ValueError, match="d_kv"):
        mla_ext.MLAConfig(d_kv=0)
    not_numbers = [("cache_ratio", dict(rope_pairs=4, svd="joint", cache_ratio="0.5")),
                   ("cache_ratio", dict(cache_ratio=True)), ("rope_pairs", dict(rope_pairs="4")),
                   ("d_kv", dict(rope_pairs=4, d_kv=16.0)),
                   ("rope_pair_step", dict(rope_pair_step="2")),
                   ("svd_key_weight", dict(svd_key_weight="1.5"))]
    for name, cfg in not_numbers:
        with pytest.raises(ValueError, match=name):
            mla_ext.MLAConfig(**cfg)


def test_converting_twice_or_non_llama_is_rejected():
    mla = converted(tiny_model(), **LOSSLESS)
    with pytest.raises(ValueError, match="already converted"):
        mla_ext.convert_to_mla(mla, mla_ext.MLAConfig(**LOSSLESS), progress=False)
    with pytest.raises(ValueError, match="decoder layers"):
        mla_ext.convert_to_mla(torch.nn.Linear(2, 2), mla_ext.MLAConfig(**LOSSLESS))


def test_partial_rotary_factor_is_rejected():
    model = tiny_model()
    model.config.rope_parameters = {**model.config.rope_parameters, "partial_rotary_factor": 0.5}
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        mla_ext.convert_to_mla(model, mla_ext.MLAConfig(**LOSSLESS))


def test_two_norm_conversion_with_calibration():
    model = tiny_model()

    class Tok:
        eos_token_id = 0

        def __call__(self, text, **kwargs):
            return {"input_ids": [1 + (ord(ch) % (VOCAB - 1)) for ch in text]}

    calib = mla_ext.calibrate(model, Tok(), ["some calibration text " * 20], max_length=64,
                              collect_rope_fit=True, progress=False)
    mla = mla_ext.convert_to_mla(copy.deepcopy(model), mla_ext.MLAConfig(
        rope_strategy="2-norm", rope_pairs=2, d_kv=6, svd="activation"), calibration=calib,
        progress=False)
    ids = torch.randint(0, VOCAB, (1, 10))
    assert torch.isfinite(mla(ids).logits).all()


def _mixed_rope_model(model):
    """A converted model whose layers keep different numbers of RoPE pairs (1, 3, 2) and
    latent widths, as a per-layer cache budget makes them."""
    sizes = [dict(rope_pairs=1, d_kv=8), dict(rope_pairs=3, d_kv=4), dict(rope_pairs=2, d_kv=6)]
    parts = [converted(model, rope_strategy="uniform", **s) for s in sizes]
    mixed = parts[0]
    for i, part in enumerate(parts):
        mixed.model.layers[i].self_attn = part.model.layers[i].self_attn
    mixed.config.mla_ext["layers"] = [
        {"rope_pairs": s["rope_pairs"], "latent_dim": s["d_kv"] * model.config.num_key_value_heads}
        for s in sizes]
    return mixed


def test_layers_with_different_rope_dims_decode_both_ways(tmp_path):
    mla = _mixed_rope_model(tiny_model(layers=3, heads=4, kv_heads=2, head_dim=16))
    dims = [layer.self_attn.rope_dim for layer in mla.model.layers]
    assert dims == [2, 6, 4]
    prompt = torch.randint(0, VOCAB, (2, 11))
    steps = [torch.randint(0, VOCAB, (2, n)) for n in (1, 2, 1)]
    absorbed, rebuilt = _decode_both_ways(mla, prompt, steps)
    torch.testing.assert_close(absorbed, rebuilt, atol=2e-5, rtol=2e-5)
    cache = mla_ext.LatentCache(mla, cache_dtype="int4")
    assert [layer.rope_dim for layer in cache.layers] == dims
    out = mla.generate(prompt, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert cache.get_seq_length() == out.shape[1] - 1
    loaded = mla_ext.load_pretrained(mla_ext.save_pretrained(mla, tmp_path / "mixed"))
    assert [layer.self_attn.rope_dim for layer in loaded.model.layers] == dims
    assert all(torch.equal(a.self_attn.rope_pairs, b.self_attn.rope_pairs)
               for a, b in zip(mla.model.layers, loaded.model.layers))
    assert mla_ext.kv_cache_bytes_per_token(loaded, "bf16") == 2 * sum(
        layer.self_attn.latent_dim + 2 * layer.self_attn.rope_dim for layer in mla.model.layers)
    torch.testing.assert_close(loaded(prompt).logits, mla(prompt).logits)
