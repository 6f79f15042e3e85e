"""The cache budget in stored bytes: formats per layer, their accounting, the search's choice,
the checkpoint and the LatentCache defaults; and the shared (mixed) RoPE key."""
import copy

import pytest
import torch

import mla_ext
from mla_ext import reference
from mla_ext.cache_format import CacheFormat, latent_bytes_per_token, search_formats
from mla_ext.convert.budget import choose_splits, measure_split_errors, split_candidates
from mla_ext.convert.rope_mixing import shared_layout, shared_rope
from test_convert_budget import _calibration, _converted_layer_error
from tiny import VOCAB, tiny_model

FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------- formats and bytes

@pytest.mark.parametrize("spec,latent,rope,expected", [
    ("bf16/bf16", 48, (2, 8), 48 * 2 + 2 * 8 * 2),
    ("int8-g16/bf16", 48, (2, 8), 48 + 3 * 2 + 32),
    ("int4-g16/fp8", 48, (2, 8), 24 + 3 * 2 * 2 + 16 + 2 * 2),
    ("fp8-g48/fp8", 48, (1, 12), 48 + 2 + 12 + 2),
    ("int4/bf16", 48, (2, 8), 24 + 1 * 2 * 2 + 32),   # default group: 48 divides, <= 64
])
def test_format_bytes_count_scales_and_zeros(spec, latent, rope, expected):
    fmt = CacheFormat.parse(spec)
    assert fmt.bytes_per_token(latent, *rope) == expected
    assert CacheFormat.parse(fmt.spec) == fmt and CacheFormat.parse(fmt.to_dict()) == fmt


def test_round_trips_are_those_of_the_reference_formats():
    x = torch.randn(5, 7, 32)
    fmt = CacheFormat.parse("int4-g16/fp8")
    torch.testing.assert_close(fmt.latent_round_trip(x), reference.dequantize_int4(
        *reference.quantize_int4(x, 16)))
    keys = torch.randn(5, 3, 8)
    q, scale = reference.quantize_k_rope(keys, FP8)
    torch.testing.assert_close(fmt.rope_round_trip(keys), reference.dequantize_k_rope(q, scale))
    assert CacheFormat().latent_round_trip(x).dtype == torch.float32
    assert torch.equal(CacheFormat().latent_round_trip(x), x.to(torch.bfloat16).float())


def test_formats_the_kernel_cannot_serve_are_named():
    assert CacheFormat.parse("int4-g16/fp8").unservable_reason(48, 6) is not None  # fp8, d_r 6
    assert CacheFormat.parse("int4-g16/fp8").unservable_reason(48, 8) is None
    assert "multiple of 8" in CacheFormat().unservable_reason(44, 8)
    assert "d_r" in CacheFormat().unservable_reason(48, 66)
    assert "CPU" in CacheFormat.parse("fp32/bf16").unservable_reason(48, 8)
    for fmt in search_formats():
        assert fmt.latent != "fp32" and fmt.rope in ("bf16", "fp8")


@pytest.mark.parametrize("bad,match", [
    ("int5/bf16", "latent format"), ("int4-g16/int8", "RoPE-key format"),
    ("bf16-g16/bf16", "group_size applies"), ("int4-g15/bf16", "even group_size"),
    ("int4-gx/bf16", "group size"), ("", "cache format"),
])
def test_bad_format_specs_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        CacheFormat.parse(bad)


def test_candidates_cost_their_bytes_and_hold_whole_groups():
    formats = [CacheFormat.parse(s) for s in ("bf16/bf16", "int4-g16/fp8", "int8-g32/bf16")]
    cands = split_candidates(num_kv_heads=2, head_dim=16, max_cost=80, max_latent=64,
                             formats=formats, sharing=("per-head", "shared"))
    assert {c.cache_format for c in cands} == set(formats)
    assert {c.rope_heads for c in cands} == {None, 1}
    for c in cands:
        heads = 2 if c.rope_heads is None else 1
        assert c.cost == c.cache_format.bytes_per_token(c.latent_dim, heads, 2 * c.rope_pairs)
        assert c.cost <= 80 and c.latent_dim % 8 == 0
        if c.cache_format.quantized:
            assert c.latent_dim % c.cache_format.group_size == 0
        if c.cache_format.rope == "fp8":
            assert c.rope_pairs % 2 == 0          # d_r a multiple of 4, as the kernel needs
    with pytest.raises(ValueError, match="sharing"):
        split_candidates(2, 16, 80, 64, sharing=("some",))


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs,match", [
    (dict(cache_bytes_per_token=0), "cache_bytes_per_token"),
    (dict(cache_bytes_per_token=1.5), "cache_bytes_per_token"),
    (dict(cache_ratio=0.2, cache_bytes_per_token=100), "two budgets"),
    (dict(cache_formats="int9"), "cache_formats"),
    (dict(cache_formats=[]), "cache_formats"),
    (dict(rope_sharing="some"), "rope_sharing"),
    (dict(rope_pairs=2, d_kv=4, rope_sharing="auto"), "rope_sharing"),
    (dict(rope_pairs=2, d_kv=4, rope_strategy="high", rope_sharing="shared"), "rope_strategy"),
    (dict(rope_pairs=2, cache_ratio=0.3, cache_formats="int4-g16/bf16"), "cache_formats"),
    (dict(rope_pairs=2, d_kv=4, cache_formats="auto"), "cache_formats"),
])
def test_bad_budget_settings_name_their_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mla_ext.MLAConfig(**kwargs)


def test_formats_default_to_the_search_under_a_searched_budget():
    assert mla_ext.MLAConfig().cache_formats == "auto"
    assert mla_ext.MLAConfig(rope_pairs=4, d_kv=16).cache_formats == "none"
    assert mla_ext.MLAConfig(rope_pairs=4, cache_ratio=0.2).format_candidates() is None
    assert mla_ext.MLAConfig().rope_sharing == "auto"
    assert mla_ext.MLAConfig(rope_pairs=4, d_kv=16).rope_sharing == "per-head"
    # a config written before the options read back: no formats, per-head keys
    old = {k: v for k, v in mla_ext.MLAConfig().to_dict().items()
           if k not in ("cache_formats", "rope_sharing")}
    assert mla_ext.MLAConfig.from_dict(old).cache_formats == "none"
    assert mla_ext.MLAConfig.from_dict(old).rope_sharing == "per-head"


def test_config_round_trips_with_the_new_fields():
    cfg = mla_ext.MLAConfig(cache_bytes_per_token=1000, cache_formats=["int4-g16/fp8"],
                            rope_sharing="auto")
    assert cfg.cache_ratio is None and cfg.has_budget
    assert mla_ext.MLAConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- search

def _budget_model():
    model = tiny_model(layers=3, heads=4, kv_heads=2, head_dim=16, hidden=64)
    return model, _calibration(model)


def test_quantization_error_is_part_of_the_score():
    model, calib = _budget_model()
    formats = [CacheFormat.parse(s) for s in ("bf16/bf16", "int4-g16/bf16", "bf16/fp8")]
    measured = measure_split_errors(model, calib, strategy="rotation", svd="activation",
                                    max_cost=120, num_sequences=1, formats=formats)
    for layer in measured:
        err = {(c.rope_pairs, c.latent_dim, c.cache_format.spec): c.error for c in layer}
        # the same sizes read back through int4 / fp8 keys score differently from bf16 (the
        # next test checks that the difference is the round trip's)
        assert err[2, 32, "int4-g16/bf16"] != err[2, 32, "bf16/bf16"]
        assert err[2, 32, "bf16/fp8"] != err[2, 32, "bf16/bf16"]


def test_search_errors_are_those_of_the_converted_layers_through_the_format():
    """A searched candidate's error is the converted layer's, its latent and RoPE keys read
    back through the candidate's format."""
    model, calib = _budget_model()
    fmt = CacheFormat.parse("int4-g16/fp8")
    for correction, rope_sharing, heads in (("none", "per-head", None), ("none", "shared", 1),
                                            ("fitted-attention", "shared", 1)):
        # the fitted correction maps a shared key's frequencies that keep no component
        measured = measure_split_errors(model, calib, strategy="rotation", svd="activation",
                                        max_cost=120, num_sequences=1, formats=[fmt],
                                        sharing=(rope_sharing,), rope_correction=correction)
        mla = mla_ext.convert_to_mla(copy.deepcopy(model), mla_ext.MLAConfig(
            rope_strategy="rotation", rope_pairs=2, d_kv=16, svd="activation",
            rope_sharing=rope_sharing, rope_correction=correction), calibration=calib,
            progress=False)
        for layer in mla.model.layers:   # the scorer's round trip, inside the converted layers
            _read_back_through(layer.self_attn, fmt)
        expected = _converted_layer_error(model, mla, calib.sequences[0])
        for layer, want in zip(measured, expected):
            got = next(c.error for c in layer if (c.rope_pairs, c.latent_dim, c.rope_heads)
                       == (2, 32, heads))
            assert got == pytest.approx(want, rel=1e-3, abs=1e-9)


def _read_back_through(attn, fmt):
    """Make a converted layer attend over its latent and RoPE keys after the format's round
    trip (reconstruct path), as the search scores it."""
    key_latent = attn.key_latent

    def rounded(hidden, cos, sin):
        k_rope, latent = key_latent(hidden, cos, sin)
        return fmt.rope_round_trip(k_rope), fmt.latent_round_trip(latent)

    attn.key_latent = rounded


def test_byte_budget_search_meets_the_budget_and_picks_formats(tmp_path):
    model, calib = _budget_model()
    original = mla_ext.kv_cache_bytes_per_token(model, "bf16")
    cfg = mla_ext.MLAConfig(rope_strategy="rotation", svd="activation", cache_ratio=0.25,
                            cache_formats="auto", rope_sharing="auto")
    mla = mla_ext.convert_to_mla(copy.deepcopy(model), cfg, calibration=calib, progress=False)
    attns = [layer.self_attn for layer in mla.model.layers]
    assert all(a.cache_format is not None for a in attns)
    got = mla_ext.kv_cache_bytes_per_token(mla)           # in the stored formats
    assert 0.25 * original - 16 < got <= 0.25 * original
    assert mla_ext.LatentCache(mla).bytes_per_token() == got
    # under the same bytes the format search does no worse on the scored error than bf16 only
    plain = mla_ext.MLAConfig(rope_strategy="rotation", svd="activation", cache_ratio=0.25,
                              cache_formats="none")
    budget = int(0.25 * original)
    searched = measure_split_errors(model, calib, strategy="rotation", svd="activation",
                                    max_cost=int(1.5 * budget / 3), formats=search_formats(),
                                    sharing=("per-head", "shared"))
    bf16_only = [[c for c in layer if c.cache_format.spec == "bf16/bf16"
                  and c.rope_heads is None] for layer in searched]
    best = sum(c.error for c in choose_splits(searched, budget))
    assert best <= sum(c.error for c in choose_splits(bf16_only, budget))
    assert plain.format_candidates() is None
    # the checkpoint keeps each layer's format; the loaded model's cache uses them
    loaded = mla_ext.load_pretrained(mla_ext.save_pretrained(mla, tmp_path / "ckpt"))
    for a, b in zip(attns, (layer.self_attn for layer in loaded.model.layers)):
        assert b.cache_format == a.cache_format
        assert (b.num_rope_heads, b.nope_dim, b.latent_dim) == (a.num_rope_heads, a.nope_dim,
                                                                 a.latent_dim)
    ids = torch.randint(0, VOCAB, (1, 9))
    torch.testing.assert_close(loaded(ids).logits, mla(ids).logits)
    cache_a, cache_b = mla_ext.LatentCache(mla), mla_ext.LatentCache(loaded)
    for la, lb in zip(cache_a.layers, cache_b.layers):
        assert (la.latent_dtype, la.rope_dtype, la.group_size) == \
            (lb.latent_dtype, lb.rope_dtype, lb.group_size)
    out_a = mla.generate(ids, past_key_values=cache_a, max_new_tokens=4, do_sample=False)
    out_b = loaded.generate(ids, past_key_values=cache_b, max_new_tokens=4, do_sample=False)
    assert torch.equal(out_a, out_b)


def test_cache_bytes_per_token_is_the_same_budget_in_bytes():
    model, calib = _budget_model()
    by_ratio = mla_ext.convert_to_mla(copy.deepcopy(model), mla_ext.MLAConfig(
        rope_strategy="rotation", svd="activation", cache_ratio=0.25, cache_formats="none"),
        calibration=calib, progress=False)
    original = mla_ext.kv_cache_bytes_per_token(model, "bf16")
    by_bytes = mla_ext.convert_to_mla(copy.deepcopy(model), mla_ext.MLAConfig(
        rope_strategy="rotation", svd="activation", cache_bytes_per_token=int(0.25 * original),
        cache_formats="none"), calibration=calib, progress=False)
    assert by_ratio.config.mla_ext["layers"] == by_bytes.config.mla_ext["layers"]
    # "none": no format searched, nothing stored, the cache is bf16
    assert all(layer.self_attn.cache_format is None for layer in by_ratio.model.layers)
    assert all(layer.latent_dtype == torch.bfloat16
               for layer in mla_ext.LatentCache(by_ratio).layers)


# ---------------------------------------------------------------- LatentCache defaults

def test_latent_cache_takes_the_stored_formats_and_explicit_ones_override():
    model = tiny_model(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64)
    mla = mla_ext.convert_to_mla(copy.deepcopy(model), mla_ext.MLAConfig(
        rope_strategy="high", rope_pairs=2, d_kv=16, svd="joint",
        cache_formats="int4-g16/fp8"), progress=False)
    layer = mla_ext.LatentCache(mla).layers[0]
    assert (layer.latent_dtype, layer.group_size, layer.rope_dtype) == (torch.uint8, 16, FP8)
    assert mla_ext.kv_cache_bytes_per_token(mla) == 2 * latent_bytes_per_token(
        32, 2, 4, torch.uint8, FP8, 16)
    over = mla_ext.LatentCache(mla, cache_dtype="int8").layers[0]
    assert (over.latent_dtype, over.rope_dtype, over.group_size) == (torch.int8, torch.float32, 32)
    keys = mla_ext.LatentCache(mla, rope_dtype="bf16").layers[0]
    assert (keys.latent_dtype, keys.rope_dtype) == (torch.uint8, torch.bfloat16)
    group = mla_ext.LatentCache(mla, group_size=8).layers[0]
    assert group.group_size == 8
    with pytest.raises(ValueError, match="rope_dtype"):
        mla_ext.LatentCache(mla, rope_dtype="int4")
    ids = torch.randint(0, VOCAB, (2, 6))
    out = mla_ext.generate(mla, ids, max_new_tokens=3)          # its stored formats
    assert out.shape == (2, 9)


# ---------------------------------------------------------------- shared RoPE key

@pytest.mark.parametrize("heads,kv_heads,bias", [(4, 2, False), (4, 4, True), (8, 2, False)])
def test_shared_key_with_every_component_reproduces_the_logits(heads, kv_heads, bias):
    model = tiny_model(layers=2, heads=heads, kv_heads=kv_heads, head_dim=16, hidden=64,
                       bias=bias)
    mla = mla_ext.convert_to_mla(copy.deepcopy(model), mla_ext.MLAConfig(
        rope_strategy="high", rope_pairs=None, d_kv=None, svd="joint", rope_sharing="shared"),
        progress=False)
    attn = mla.model.layers[0].self_attn
    assert attn.num_rope_heads == 1 and attn.rope_pairs_count == kv_heads * 8
    assert attn.nope_dim == 0
    # the mix is not the identity: each stored pair mixes several heads' pairs
    mixed = attn.kr_proj.weight.detach().double()
    original_k = model.model.layers[0].self_attn.k_proj.weight.detach().double()
    assert not any(torch.allclose(mixed[0], original_k[i]) for i in range(original_k.shape[0]))
    ids = torch.randint(0, VOCAB, (2, 24))
    torch.testing.assert_close(mla(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    # and through the latent cache, decode steps absorbed
    cache = mla_ext.LatentCache(mla, cache_dtype="fp32")
    got = mla.generate(ids[:1], past_key_values=cache, max_new_tokens=6, do_sample=False)
    want = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_the_mix_is_orthogonal_and_a_partial_key_decodes_as_it_prefills():
    model = tiny_model(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64)
    calib = _calibration(model)
    attn = model.model.layers[0].self_attn
    shared = shared_rope(calib.layers[0], attn.q_proj.weight, attn.k_proj.weight, 4, 2, 16)
    eye = torch.eye(2, dtype=torch.float64).expand(8, 2, 2)
    torch.testing.assert_close(shared.mix @ shared.mix.transpose(1, 2), eye)
    layout = shared_layout(shared, 5, 4, 2, 16)
    assert layout.rope_pairs == 5 and layout.pairs.shape == (1, 5)
    with pytest.raises(ValueError, match="components"):
        shared_layout(shared, 17, 4, 2, 16)
    mla = mla_ext.convert_to_mla(copy.deepcopy(model), mla_ext.MLAConfig(
        rope_strategy="rotation", rope_pairs=6, d_kv=12, svd="activation",
        rope_sharing="shared"), calibration=calib, progress=False)
    ids = torch.randint(0, VOCAB, (1, 20))
    full = mla(ids).logits
    cache = mla_ext.LatentCache(mla, cache_dtype="fp32")
    steps = [mla(ids[:, :14], past_key_values=cache).logits]
    for i in range(14, 20):    # one token at a time: the absorbed path over the shared key
        steps.append(mla(ids[:, i:i + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_cli_takes_the_budget_in_bytes_formats_and_sharing():
    from mla_ext.cli import _mla_config, build_parser

    args = build_parser().parse_args(["convert", "--out", "x", "--cache-bytes-per-token",
                                      "4320", "--cache-formats", "int4-g16/fp8,bf16/bf16",
                                      "--rope-sharing", "auto"])
    cfg = _mla_config(args)
    assert (cfg.cache_bytes_per_token, cfg.cache_ratio, cfg.rope_sharing) == (4320, None, "auto")
    assert [f.spec for f in cfg.format_candidates()] == ["int4-g16/fp8", "bf16/bf16"]
    args = build_parser().parse_args(["convert", "--out", "x", "--cache-formats", "auto"])
    assert len(_mla_config(args).format_candidates()) > 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--out", "x", "--rope-sharing", "some"])
