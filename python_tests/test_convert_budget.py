"""A cache budget (MLAConfig.cache_ratio) instead of a fixed d_kv."""
import copy
import itertools

import pytest
import torch

import mla_ext
from mla_ext.convert.budget import (LATENT_STEP, MAX_SEARCHED_PAIRS, QUERY_STRIDE,
                                    SplitCandidate, allocate_latent_widths, choose_splits,
                                    latent_budget, measure_split_errors, split_candidates)
from test_convert_rotation import CharTokenizer
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


# ---------------------------------------------------------------- per-layer RoPE/latent split

def test_choose_splits_is_the_best_combination_in_the_budget_window():
    gen = torch.Generator().manual_seed(3)
    layers = [[SplitCandidate(r, w, 4 * r + w, float(torch.rand(1, generator=gen)))
               for r in (1, 2, 3) for w in (8, 16, 24)] for _ in range(3)]
    budget = 70
    best = None
    for combo in itertools.product(*layers):
        total = sum(c.cost for c in combo)
        if budget - 8 < total <= budget:
            err = sum(c.error for c in combo)
            if best is None or err < best[0]:
                best = (err, combo)
    picked = choose_splits(layers, budget, slack=8)
    assert sum(c.error for c in picked) == pytest.approx(best[0])
    assert budget - 8 < sum(c.cost for c in picked) <= budget
    with pytest.raises(ValueError, match="cheapest"):
        choose_splits(layers, 20)
    with pytest.raises(ValueError, match="budget"):
        choose_splits(layers, 0)


def test_split_candidates_respect_the_cost():
    # bytes: bf16 RoPE keys and latent, 2 bytes a value
    cands = split_candidates(num_kv_heads=2, head_dim=16, max_cost=80, max_latent=32)
    assert all(c.cost == 2 * (4 * c.rope_pairs + c.latent_dim) <= 80 for c in cands)
    assert {c.rope_pairs for c in cands} == set(range(1, 9))
    assert (8, 8) in {(c.rope_pairs, c.latent_dim) for c in cands}
    with pytest.raises(ValueError, match="cheapest"):
        split_candidates(num_kv_heads=2, head_dim=16, max_cost=23, max_latent=32)


def test_split_candidates_stay_within_the_decode_kernels_d_r():
    # a Llama-2-sized head (64 pairs) with room for all of them: the search stops at d_r = 64
    cands = split_candidates(num_kv_heads=1, head_dim=128, max_cost=10_000, max_latent=64)
    assert max(c.rope_pairs for c in cands) == MAX_SEARCHED_PAIRS == 32


def test_split_candidates_keep_r_a_multiple_of_the_pair_step():
    everything = split_candidates(num_kv_heads=2, head_dim=32, max_cost=160, max_latent=64)
    stepped = split_candidates(num_kv_heads=2, head_dim=32, max_cost=160, max_latent=64,
                               pair_step=4)
    assert {c.rope_pairs for c in stepped} == {4, 8, 12, 16}
    assert [(c.rope_pairs, c.latent_dim) for c in stepped] == [
        (c.rope_pairs, c.latent_dim) for c in everything if c.rope_pairs % 4 == 0]
    with pytest.raises(ValueError, match="r=4, costs 48.*rope_pair_step"):
        split_candidates(num_kv_heads=2, head_dim=16, max_cost=47, max_latent=32, pair_step=4)
    for bad in (0, 2.0, True, "4"):
        with pytest.raises(ValueError, match="rope_pair_step"):
            split_candidates(num_kv_heads=2, head_dim=16, max_cost=40, max_latent=32,
                             pair_step=bad)
        with pytest.raises(ValueError, match="rope_pair_step"):
            mla_ext.MLAConfig(rope_pairs="auto", cache_ratio=0.2, rope_pair_step=bad)
    with pytest.raises(ValueError, match="rope_pair_step=9 exceeds the 8"):
        split_candidates(num_kv_heads=2, head_dim=16, max_cost=400, max_latent=32, pair_step=9)


def _calibration(model, sequences=4):
    text = "".join(chr(32 + (i * 7919) % 90) for i in range(64 * sequences))
    return mla_ext.calibrate(model, CharTokenizer(), text, max_length=64, collect_xtx=True,
                             collect_distances=True, collect_attention_sample=True,
                             collect_rope_fit=True, progress=False)


@torch.no_grad()
def _converted_layer_error(original, mla, seq):
    """Sum over every QUERY_STRIDE-th position of the squared change of each converted layer's
    attention output on the original layer's input, over the residual stream energy there."""
    inputs, residuals = {}, {}
    hooks = []
    for i, layer in enumerate(original.model.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: residuals.__setitem__(i, a[0] if a else k["hidden_states"]),
            with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(
            lambda m, a, k, out, i=i: inputs.__setitem__(i, (a[0] if a else k["hidden_states"],
                                                             k["position_embeddings"], out[0])),
            with_kwargs=True))
    original(torch.tensor([seq]))
    for h in hooks:
        h.remove()
    errors = []
    queries = torch.arange(QUERY_STRIDE - 1, len(seq), QUERY_STRIDE)
    for i, layer in enumerate(mla.model.layers):
        x, pe, ref = inputs[i]
        out = layer.self_attn(x, position_embeddings=pe, attention_mask=None)[0]
        err = (out - ref)[:, queries].double().pow(2).sum()
        errors.append(float(err / residuals[i][:, queries].double().pow(2).sum()))
    return errors


@pytest.mark.parametrize("svd,strategy", [("activation", "rotation"), ("joint", "rotation"),
                                          ("activation", "greedy")])
def test_split_errors_are_those_of_the_converted_layers(svd, strategy):
    model = tiny_model(layers=2, heads=4, kv_heads=2, head_dim=16, hidden=64, bias=True)
    calib = _calibration(model)
    for correction in ("none", "fitted-attention"):   # the search scores the fitted queries too
        measured = measure_split_errors(model, calib, strategy=strategy, svd=svd, max_cost=80,
                                        num_sequences=1, rope_correction=correction)
        for r, width in ((1, 8), (3, 16), (2, 32)):
            mla = mla_ext.convert_to_mla(copy.deepcopy(model), mla_ext.MLAConfig(
                rope_strategy=strategy, rope_pairs=r, d_kv=width // 2, svd=svd,
                rope_correction=correction), calibration=calib, progress=False)
            expected = _converted_layer_error(model, mla, calib.sequences[0])
            for layer, want in zip(measured, expected):
                got = next(c.error for c in layer if (c.rope_pairs, c.latent_dim) == (r, width))
                assert got == pytest.approx(want, rel=1e-3, abs=1e-9)


def _auto_converted(model, ratio, calib, rope_pair_step=1):
    cfg = mla_ext.MLAConfig(rope_strategy="rotation", rope_pairs="auto", svd="activation",
                            cache_ratio=ratio, rope_pair_step=rope_pair_step,
                            cache_formats="none")
    return mla_ext.convert_to_mla(copy.deepcopy(model), cfg, calibration=calib, progress=False)


@pytest.mark.parametrize("ratio", [0.3, 0.45])
def test_per_layer_split_meets_the_budget_and_survives_save_load(ratio, tmp_path):
    model = tiny_model(layers=3, heads=4, kv_heads=2, head_dim=16, hidden=64)
    calib = _calibration(model)
    mla = _auto_converted(model, ratio, calib)
    attns = [layer.self_attn for layer in mla.model.layers]
    plan = mla.config.mla_ext["layers"]
    assert [(a.rope_pairs_count, a.latent_dim) for a in attns] == [
        (p["rope_pairs"], p["latent_dim"]) for p in plan]
    assert all(a.latent_dim % LATENT_STEP == 0 for a in attns)
    original = mla_ext.kv_cache_bytes_per_token(model, "bf16")
    got = mla_ext.kv_cache_bytes_per_token(mla, "bf16")
    # bf16: 2 bytes a value; the whole model is within one latent group of the budget
    assert ratio * original - 2 * LATENT_STEP < got <= ratio * original
    loaded = mla_ext.load_pretrained(mla_ext.save_pretrained(mla, tmp_path / "ckpt"))
    for a, b in zip(attns, (layer.self_attn for layer in loaded.model.layers)):
        assert (b.rope_pairs_count, b.latent_dim) == (a.rope_pairs_count, a.latent_dim)
        assert torch.equal(b.rope_pairs, a.rope_pairs)
    ids = torch.randint(0, VOCAB, (1, 9))
    torch.testing.assert_close(loaded(ids).logits, mla(ids).logits)


def test_the_default_is_the_per_layer_split_at_minus_81_percent():
    default = mla_ext.MLAConfig()
    assert (default.rope_pairs, default.cache_ratio, default.rope_pair_step, default.d_kv,
            default.cache_formats, default.rope_sharing) == \
        ("auto", 0.1875, 1, None, "auto", "auto")
    assert mla_ext.MLAConfig(rope_pairs="auto", cache_ratio=0.3).cache_ratio == 0.3
    # fixed settings stay fixed: no budget unless asked for
    paper = mla_ext.MLAConfig(rope_strategy="2-norm", rope_pairs=4, d_kv=16, svd="joint")
    assert paper.cache_ratio is None and paper.d_kv == 16 and paper.format_candidates() is None
    assert mla_ext.MLAConfig.from_dict(default.to_dict()) == default
    with pytest.raises(ValueError, match="d_kv=16 needs an int rope_pairs"):
        mla_ext.MLAConfig(d_kv=16)


def test_per_layer_split_keeps_d_r_a_multiple_of_8_with_step_4():
    model = tiny_model(layers=3, heads=4, kv_heads=2, head_dim=32, hidden=64)
    calib = _calibration(model)
    mla = _auto_converted(model, 0.3, calib, rope_pair_step=4)
    pairs = [layer.self_attn.rope_pairs_count for layer in mla.model.layers]
    assert all(r % 4 == 0 for r in pairs)
    original = mla_ext.kv_cache_bytes_per_token(model, "bf16")
    assert 0.3 * original - 2 * LATENT_STEP < mla_ext.kv_cache_bytes_per_token(mla, "bf16") \
        <= 0.3 * original
    # the stepped search picks the best of its own candidates: those of the full search with
    # r a multiple of 4, scored the same
    every = measure_split_errors(model, calib, strategy="rotation", svd="activation",
                                 max_cost=80, num_sequences=1)
    stepped = measure_split_errors(model, calib, strategy="rotation", svd="activation",
                                   max_cost=80, num_sequences=1, rope_pair_step=4)
    for full, some in zip(every, stepped):
        errors = {(c.rope_pairs, c.latent_dim): c.error for c in full}
        assert some and all(c.rope_pairs % 4 == 0 for c in some)
        for c in some:
            assert c.error == pytest.approx(errors[(c.rope_pairs, c.latent_dim)], rel=1e-9)
    with pytest.raises(ValueError, match="rope_pair_step"):
        measure_split_errors(model, calib, strategy="rotation", svd="activation", max_cost=40,
                             rope_pair_step=0)


def test_auto_split_needs_token_sequences_and_a_joint_svd():
    model = tiny_model(layers=2)
    calib = _calibration(model)
    calib.sequences = None
    with pytest.raises(ValueError, match="token sequences"):
        _auto_converted(model, 0.4, calib)
    with pytest.raises(ValueError, match="svd"):
        mla_ext.MLAConfig(rope_pairs="auto", cache_ratio=0.4, svd="activation-split")
    with pytest.raises(ValueError, match="rope_pairs"):
        mla_ext.MLAConfig(rope_pairs="some")
    with pytest.raises(ValueError, match="num_sequences"):
        measure_split_errors(model, _calibration(model), strategy="high", svd="joint",
                             max_cost=40, num_sequences=0)


def test_cli_takes_rope_pairs_auto():
    from mla_ext.cli import _mla_config, build_parser

    args = build_parser().parse_args(["convert", "--out", "x", "--rope-pairs", "auto",
                                      "--cache-ratio", "0.1875"])
    cfg = _mla_config(args)
    assert cfg.rope_pairs == "auto" and cfg.cache_ratio == 0.1875 and cfg.needs_calibration
    assert cfg.rope_pair_step == 1
    # the CLI's defaults are MLAConfig's
    assert _mla_config(build_parser().parse_args(["convert", "--out", "x"])) == mla_ext.MLAConfig()
    args = build_parser().parse_args(["convert", "--out", "x", "--rope-pairs", "auto",
                                      "--cache-ratio", "0.3", "--rope-pair-step", "4"])
    assert (_mla_config(args).rope_pair_step, _mla_config(args).cache_ratio) == (4, 0.3)
    for bad in ("0", "all", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["convert", "--out", "x", "--rope-pair-step", bad])
    paper = _mla_config(build_parser().parse_args(["convert", "--out", "x", "--rope-strategy",
                                                   "2-norm", "--rope-pairs", "4", "--d-kv",
                                                   "16", "--svd", "joint"]))
    assert (paper.rope_pairs, paper.d_kv, paper.cache_ratio) == (4, 16, None)
    with pytest.raises(ValueError, match="d_kv=16 needs an int rope_pairs"):
        _mla_config(build_parser().parse_args(["convert", "--out", "x", "--d-kv", "16"]))


def test_split_study_measures_both_per_layer_searches_and_takes_a_subset():
    from mla_ext.demo import _pick_splits, split_configs

    configs = split_configs()
    assert [c.rope_pair_step for c in configs if c.rope_pairs == "auto"] == [4, 1]
    assert all(2 * c.rope_pairs + c.d_kv == 24 for c in configs if c.cache_ratio is None)
    assert _pick_splits([4, 1]) == [configs[4], configs[1]]
    assert _pick_splits(None) == configs
    for bad in ([], [len(configs)], [-1]):
        with pytest.raises(ValueError, match="only must list indices"):
            _pick_splits(bad)
