"""Every supported model family through the whole path: conversion, the latent cache, greedy
generation, checkpoints (loaded in a fresh process), the command line; and the refusals."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import mla_ext
from mla_ext import families
from mla_ext.modeling import MLAAttention
from tiny import LOSSLESS, VOCAB

LOSSY = dict(rope_strategy="high", rope_pairs=2, d_kv=4, svd="joint")
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
# family: (config class, causal LM class, config arguments beyond COMMON)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=16, attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=16, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),           # q/k/v biases, no o bias
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=256)),  # tied, scaled embeddings
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict()),               # fused qkv_proj
}


def family_config(name, **overrides):
    config_cls, _, extra = FAMILIES[name]
    return getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})


def family_model(name, seed=0, **overrides):
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[name][1])(family_config(name, **overrides)).eval()
    # as tiny.py does: larger q/k make attention (and RoPE) matter; biases made non-zero
    with torch.no_grad():
        for layer in model.model.layers:
            proj = families.projections(layer.self_attn)
            proj.q[0].mul_(4)
            proj.k[0].mul_(4)
            for _, bias in (proj.q, proj.k, proj.v):
                if bias is not None:
                    bias.normal_(0, 0.5)
    return model


def convert(model, **cfg):
    return mla_ext.convert_to_mla(copy.deepcopy(model), mla_ext.MLAConfig(**cfg), progress=False)


def test_adapters_match_the_transformers_modules():
    """Each adapter reads the projections its family's attention really has."""
    expected = {"llama": dict(q=True, k=True, v=True, o=True),
                "mistral": dict(q=False, k=False, v=False, o=False),
                "qwen2": dict(q=True, k=True, v=True, o=False),
                "gemma": dict(q=False, k=False, v=False, o=False),
                "phi3": dict(q=False, k=False, v=False, o=False)}
    for name in FAMILIES:
        model = family_model(name)
        attn = model.model.layers[0].self_attn
        fam = families.family_of(attn)
        assert fam is not None and fam.name == name
        assert families.family_for_config(model.config) is fam
        proj = fam.projections(attn)
        assert {p: getattr(proj, p)[1] is not None for p in families.PROJECTIONS} == expected[name]
        assert fam.biases(model.config) == expected[name]
        assert proj.q[0].shape == (4 * attn.head_dim, 64)
        assert proj.k[0].shape == proj.v[0].shape == (2 * attn.head_dim, 64)


@pytest.mark.parametrize("name", FAMILIES)
def test_full_rope_full_rank_reproduces_logits(name):
    model = family_model(name)
    ids = torch.randint(0, VOCAB, (2, 40))
    ref = model(ids).logits
    mla = convert(model, **LOSSLESS)
    assert type(mla) is type(model)
    assert all(isinstance(layer.self_attn, MLAAttention) for layer in mla.model.layers)
    out = mla(ids).logits
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
])
def test_llama_rope_types_reproduce_logits(rope):
    model = family_model("llama", rope_parameters={"rope_theta": 10000.0, **rope})
    ids = torch.randint(0, VOCAB, (2, 100))
    ref = model(ids).logits
    out = convert(model, **LOSSLESS)(ids).logits
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("name", FAMILIES)
def test_lossless_greedy_generate_through_latent_cache(name):
    model = family_model(name)
    mla = convert(model, **LOSSLESS)
    prompt = torch.randint(3, VOCAB, (2, 9))
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                              min_new_tokens=12, do_sample=False)
    cache = mla_ext.LatentCache(mla, cache_dtype="fp32")
    got = mla.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                       max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert got.shape == (2, 9 + 12)
    assert torch.equal(got, expected)


CHILD = r"""
import json, sys, torch, mla_ext
path, out = sys.argv[1], sys.argv[2]
model = mla_ext.load_pretrained(path)
ids = torch.load(out + ".ids")
logits = model(ids).logits
cache = mla_ext.LatentCache(model, cache_dtype="fp32")
gen = model.generate(ids[:, :7], attention_mask=torch.ones_like(ids[:, :7]), past_key_values=cache,
                     max_new_tokens=5, min_new_tokens=5, do_sample=False)
tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
torch.save({"logits": logits, "generated": gen, "class": type(model).__name__, "tied": tied}, out)
"""


@pytest.mark.parametrize("name", FAMILIES)
def test_lossy_conversion_saves_and_loads_in_a_fresh_process(name, tmp_path):
    model = family_model(name)
    mla = convert(model, **LOSSY)
    attn = mla.model.layers[0].self_attn
    assert attn.rope_dim == 4 and attn.latent_dim == 8
    ids = torch.randint(3, VOCAB, (2, 11))
    logits = mla(ids).logits
    generated = mla.generate(ids[:, :7], attention_mask=torch.ones_like(ids[:, :7]),
                             past_key_values=mla_ext.LatentCache(mla, cache_dtype="fp32"),
                             max_new_tokens=5, min_new_tokens=5, do_sample=False)
    path = mla_ext.save_pretrained(mla, tmp_path / "ckpt")
    assert json.loads((path / "config.json").read_text())["model_type"] == name
    out = tmp_path / "child.pt"
    torch.save(ids, str(out) + ".ids")
    env = {**os.environ, "PYTHONPATH": str(Path(mla_ext.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", CHILD, str(path), str(out)], check=True, env=env)
    child = torch.load(out)
    assert child["class"] == type(model).__name__
    assert torch.equal(child["logits"], logits)
    assert torch.equal(child["generated"], generated)
    assert child["tied"] == bool(model.config.tie_word_embeddings)
    # and in this process: the same module shapes, biases included
    loaded = mla_ext.load_pretrained(path)
    ref, got = mla.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_mistral_window_wider_than_its_context_converts():
    model = family_model("mistral", sliding_window=256)   # = max_position_embeddings
    ids = torch.randint(0, VOCAB, (1, 30))
    ref = model(ids).logits
    out = convert(model, **LOSSLESS)(ids).logits
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def _tiny(config_cls, model_cls, **kwargs):
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, "head_dim": 16, **kwargs})
    return getattr(transformers, model_cls)(config).eval()


REFUSALS = {
    "qwen3 qk-norm": (lambda: _tiny("Qwen3Config", "Qwen3ForCausalLM"), "QK-norm"),
    "olmo2 qk-norm": (lambda: _tiny("Olmo2Config", "Olmo2ForCausalLM"), "QK-norm"),
    "gemma2 soft-capping": (lambda: _tiny("Gemma2Config", "Gemma2ForCausalLM"),
                            "soft-capping"),
    "phi3 partial rotary": (lambda: family_model("phi3", partial_rotary_factor=0.5),
                            "partial_rotary_factor"),
    "mistral sliding window": (lambda: family_model("mistral", sliding_window=64),
                               "sliding_window=64"),
    "mistral default window": (lambda: family_model("mistral", sliding_window=4096,
                                                    max_position_embeddings=32768),
                               "sliding_window=4096"),
    "qwen2 sliding window": (lambda: family_model("qwen2", use_sliding_window=True,
                                                  sliding_window=64, max_window_layers=0),
                             "sliding_window=64"),
    "mllama cross-attention": (
        lambda: _tiny("MllamaTextConfig", "MllamaForCausalLM", cross_attention_layers=[1]),
        "cross-attention"),
    "gemma bidirectional": (lambda: family_model("gemma", use_bidirectional_attention=True),
                            "bidirectional"),
    "other attention class": (lambda: _tiny("GraniteConfig", "GraniteForCausalLM"),
                              "GraniteAttention, not one of LlamaAttention"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_reason_and_leave_the_model_unchanged(case):
    build, match = REFUSALS[case]
    model = build()
    before = copy.deepcopy(model.state_dict())
    config_before = model.config.to_dict()
    with pytest.raises(ValueError, match=match):
        mla_ext.convert_to_mla(model, mla_ext.MLAConfig(**LOSSLESS), progress=False)
    assert not any(isinstance(m, MLAAttention) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in after)
    assert model.config.to_dict() == config_before


def _word_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>",
                                                unk_token="<pad>")


@pytest.mark.parametrize("name", ["gemma", "phi3"])
def test_cli_converts_a_local_model_directory(name, tmp_path, capsys):
    """`mla-ext convert --model DIR` with the default method (calibration through the family's
    projections, fused ones included; rotation-aware RoPE, activation-aware SVD, per-layer
    budget), then `generate` from the checkpoint. (The word-level test tokenizer loads as
    itself for these two; AutoTokenizer would give a Qwen2 or Llama directory its family's.)"""
    from mla_ext.cli import main

    model_dir, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    family_model(name, **({"head_dim": 32} if name == "gemma" else {})).save_pretrained(model_dir)
    _word_tokenizer(tmp_path).save_pretrained(model_dir)
    gen = torch.Generator().manual_seed(0)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i}" for i in torch.randint(0, VOCAB - 3, (600,), generator=gen)
                             .tolist()))
    assert main(["convert", "--model", str(model_dir), "--out", str(ckpt), "--device", "cpu",
                 "--calib-text", str(text), "--calib-sequences", "4", "--calib-length", "64"]) == 0
    assert "smaller" in capsys.readouterr().out
    loaded = mla_ext.load_pretrained(ckpt)
    assert type(loaded).__name__ == FAMILIES[name][1]
    assert main(["generate", "--model", str(ckpt), "--device", "cpu", "--prompt", "w1 w2 w3",
                 "--raw", "--max-new-tokens", "4", "--cache-dtype", "int8"]) == 0
    assert "tokens/s" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_recovery_finetune_trains_and_saves_each_family(name, tmp_path):
    from mla_ext.train import TrainConfig, finetune
    from test_train_data import REPEAT, char_tokenizer

    text = tmp_path / "text.txt"
    text.write_text(REPEAT)
    mla = convert(family_model(name), **LOSSY)
    before = {k: v.clone() for k, v in mla.state_dict().items()}
    history = finetune(mla, char_tokenizer(), text,
                       TrainConfig(steps=6, seq_len=16, batch_size=2, lr=3e-3,
                                                 progress=False, plot=False), tmp_path / "run")
    assert len(history) == 6 and all(r["loss"] > 0 for r in history)
    assert any(not torch.equal(before[k], v) for k, v in mla.state_dict().items())
    loaded = mla_ext.load_pretrained(tmp_path / "run" / "final")
    assert type(loaded) is type(mla)
    ids = torch.randint(3, VOCAB, (1, 6))
    torch.testing.assert_close(loaded(ids).logits, mla(ids).logits)
