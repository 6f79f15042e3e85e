"""The rotation-aware RoPE selection and the attention-distance statistic behind it."""
import copy
import math

import pytest
import torch

import mla_ext
from mla_ext.convert import LayerStats, select_rope_pairs
from mla_ext.convert.rope_selection import rotation_scores
from tiny import VOCAB, tiny_model


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, **kwargs):
        return {"input_ids": [1 + (ord(ch) % (VOCAB - 1)) for ch in text]}


def _stats(mass, inv_freq, heads=2, kv_heads=1):
    pairs = inv_freq.numel()
    return LayerStats(q_pair_norm=torch.ones(heads, pairs, dtype=torch.float64),
                      k_pair_norm=torch.ones(kv_heads, pairs, dtype=torch.float64),
                      xtx=None, num_tokens=1, distance_mass=mass, inv_freq=inv_freq)


def test_pairs_that_do_not_turn_over_attended_distances_are_dropped():
    # Half the attention at distance 0, half at 4: E = (1 + exp(4 i theta)) / 2, |E| = |cos 2 theta|.
    inv_freq = torch.tensor([math.pi / 2, math.pi / 4, math.pi / 8, math.pi / 2],
                            dtype=torch.float64)
    mass = torch.zeros(2, 8, dtype=torch.float64)
    mass[:, 0] = mass[:, 4] = 0.5
    scores = rotation_scores(_stats(mass, inv_freq), 2, 1)[0]
    two_norm = 2.0                                   # two query heads of norm 1 times key norm 1
    expected = [two_norm * (1 - abs(math.cos(2 * t))) for t in inv_freq.tolist()]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))
    assert scores[0] == pytest.approx(0, abs=1e-12) and scores[1] == pytest.approx(two_norm)
    pairs = select_rope_pairs("rotation", 2, head_dim=8, num_heads=2, num_kv_heads=1,
                              stats=_stats(mass, inv_freq))
    assert pairs.tolist() == [[1, 2]]


def test_rotation_needs_distances():
    stats = _stats(None, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="collect_distances"):
        select_rope_pairs("rotation", 2, head_dim=8, num_heads=2, num_kv_heads=1, stats=stats)


@torch.no_grad()
def test_streaming_distance_mass_equals_direct_attention_probabilities():
    model = tiny_model(heads=4, kv_heads=2)
    model.config._attn_implementation = "eager"
    text = "the distance statistic is computed in one streaming pass " * 4
    calib = mla_ext.calibrate(model, CharTokenizer(), text, max_length=64, batch_size=2,
                              collect_xtx=False, collect_distances=True, progress=False)
    ids = torch.tensor(CharTokenizer()(text)["input_ids"])
    seqs = [ids[s:s + 64] for s in range(0, ids.numel(), 64)]
    seqs = [s for s in seqs if s.numel() >= 16]
    for layer_idx, stats in enumerate(calib.layers):
        expected = torch.zeros(4, 64, dtype=torch.float64)
        queries = 0
        for seq in seqs:
            attn = model(seq[None], output_attentions=True).attentions[layer_idx][0]  # (H, T, T)
            t = seq.numel()
            for i in range(t):
                for j in range(i + 1):
                    expected[:, i - j] += attn[:, i, j].double()
            queries += t
        torch.testing.assert_close(stats.distance_mass, expected / queries, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(stats.distance_mass.sum(-1), torch.ones(4, dtype=torch.float64))
        torch.testing.assert_close(stats.inv_freq, model.model.rotary_emb.inv_freq.double())


def test_rotation_conversion_end_to_end():
    model = tiny_model()
    cfg = mla_ext.MLAConfig(rope_strategy="rotation", rope_pairs=2, d_kv=6, svd="activation")
    calib = mla_ext.calibrate(model, CharTokenizer(), "some text to calibrate with " * 10,
                              max_length=64, progress=False, **cfg.calibration_options())
    mla = mla_ext.convert_to_mla(model, cfg, calibration=calib, progress=False)
    assert torch.isfinite(mla(torch.randint(0, VOCAB, (1, 9))).logits).all()


@torch.no_grad()
def test_attention_sample_holds_the_layers_inputs_and_greedy_is_deterministic():
    model = tiny_model(heads=4, kv_heads=2)
    text = "the greedy selection measures attention outputs on a small sample " * 6
    opts = dict(max_length=64, batch_size=2, collect_xtx=False, collect_attention_sample=True,
                sample_sequences=3, progress=False)
    calib = mla_ext.calibrate(model, CharTokenizer(), text, **opts)
    ids = torch.tensor(CharTokenizer()(text)["input_ids"])
    seqs = [ids[s:s + 64] for s in range(0, ids.numel(), 64)][:3]
    from mla_ext.convert.calibration import SAMPLE_QUERY_STRIDE
    for layer_idx, stats in enumerate(calib.layers):
        sample = stats.attention_sample
        assert len(sample.q) == 3
        attn = model.model.layers[layer_idx].self_attn
        for s, seq in enumerate(seqs):
            hidden = model(seq[None], output_hidden_states=True).hidden_states[layer_idx]
            x = model.model.layers[layer_idx].input_layernorm(hidden)[0]
            pos = torch.arange(SAMPLE_QUERY_STRIDE - 1, seq.numel(), SAMPLE_QUERY_STRIDE)
            assert torch.equal(sample.query_pos[s], pos)
            torch.testing.assert_close(sample.q[s], attn.q_proj(x).view(-1, 4, 16)[pos]
                                       .transpose(0, 1))
            torch.testing.assert_close(sample.k[s], attn.k_proj(x).view(-1, 2, 16).transpose(0, 1))
            torch.testing.assert_close(sample.v[s], attn.v_proj(x).view(-1, 2, 16).transpose(0, 1))
        w_o = attn.o_proj.weight.double()
        torch.testing.assert_close(sample.out_gram[1], w_o[:, 16:32].T @ w_o[:, 16:32])
    cfg = mla_ext.MLAConfig(rope_strategy="greedy", rope_pairs=3, d_kv=None, svd="joint",
                            rope_correction="none")
    assert cfg.calibration_options()["collect_attention_sample"]
    again = mla_ext.calibrate(model, CharTokenizer(), text, **opts)
    first = mla_ext.convert_to_mla(copy.deepcopy(model), cfg, calibration=calib, progress=False)
    second = mla_ext.convert_to_mla(copy.deepcopy(model), cfg, calibration=again, progress=False)
    for a, b in zip(first.model.layers, second.model.layers):
        assert torch.equal(a.self_attn.rope_pairs, b.self_attn.rope_pairs)
    x = torch.randint(0, VOCAB, (1, 9))
    torch.testing.assert_close(first(x).logits, second(x).logits)
    with pytest.raises(ValueError, match="sample_sequences"):
        mla_ext.calibrate(model, CharTokenizer(), text, **{**opts, "sample_sequences": 0})
    with pytest.raises(ValueError, match="collect_attention_sample=True"):
        plain = mla_ext.calibrate(model, CharTokenizer(), text, max_length=64, progress=False)
        mla_ext.convert_to_mla(copy.deepcopy(model), cfg, calibration=plain, progress=False)
