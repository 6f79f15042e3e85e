import math

import pytest
import torch

import mla_ext
from mla_ext.data import default_calibration_text, default_evaluation_text, load_texts
from mla_ext.eval import perplexity
from tiny import VOCAB, tiny_model


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": [1 + (ord(ch) % (VOCAB - 1)) for ch in text]}


def _direct_nll(model, ids):
    logits = model(ids.unsqueeze(0)).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()


def test_default_texts_are_disjoint_and_sized():
    calib, held_out = default_calibration_text(), default_evaluation_text()
    assert len(calib) > len(held_out) > 100_000
    assert held_out[:2000] not in calib


@torch.no_grad()
def test_perplexity_single_window_equals_direct_loss():
    model, tok = tiny_model(), CharTokenizer()
    text = "hello world, this is a test of the perplexity code." * 2
    ids = torch.tensor(tok(text)["input_ids"])
    expected = math.exp(_direct_nll(model, ids) / (len(ids) - 1))
    got = perplexity(model, tok, text, context=256, stride=256, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_perplexity_scores_each_token_once_with_stride():
    model, tok = tiny_model(), CharTokenizer()
    text = "abcdefghij" * 9                       # 90 tokens
    ids = torch.tensor(tok(text)["input_ids"])
    # context 40, stride 20: windows [0,40) [20,60) [40,80) [60,90) score 39 + 20 + 20 + 10 tokens
    nll = 0.0
    for begin, first in ((0, 0), (20, 19), (40, 19), (60, 19)):
        window = ids[begin:begin + 40]
        logits = model(window.unsqueeze(0)).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits[first:], window[1:][first:],
                                                 reduction="sum").item()
    got = perplexity(model, tok, text, context=40, stride=20, progress=False)
    assert got == pytest.approx(math.exp(nll / 89), rel=1e-5)


@torch.no_grad()
def test_perplexity_with_stride_equal_to_context():
    model, tok = tiny_model(), CharTokenizer()
    text = "0123456789" * 5                       # 50 tokens, windows [0,20) [20,40) [40,50)
    ids = torch.tensor(tok(text)["input_ids"])
    nll = sum(_direct_nll(model, ids[b:b + 20]) for b in (0, 20, 40))
    got = perplexity(model, tok, text, context=20, stride=20, progress=False)
    assert got == pytest.approx(math.exp(nll / (19 + 19 + 9)), rel=1e-5)


@torch.no_grad()
def test_perplexity_through_the_latent_cache():
    from tiny import converted

    mla, tok = converted(tiny_model(), rope_strategy="high", rope_pairs=2, d_kv=8), CharTokenizer()
    text = "some text that goes through the cache in chunks " * 3
    exact = perplexity(mla, tok, text, context=64, stride=64, progress=False)
    fp32 = perplexity(mla, tok, text, context=64, stride=64, progress=False, cache_dtype="fp32",
                      chunk_size=8)
    int4 = perplexity(mla, tok, text, context=64, stride=64, progress=False, cache_dtype="int4",
                      chunk_size=8)
    assert fp32 == pytest.approx(exact, rel=1e-5)
    assert int4 != pytest.approx(exact, rel=1e-6) and int4 == pytest.approx(exact, rel=0.2)
    # the RoPE keys' format is the caller's: bf16 keys round them, the fp32 latent stays exact
    bf16_keys = perplexity(mla, tok, text, context=64, stride=64, progress=False,
                           cache_dtype="fp32", rope_dtype="bf16", chunk_size=8)
    assert bf16_keys != fp32 and bf16_keys == pytest.approx(exact, rel=1e-2)
    with pytest.raises(ValueError, match="rope_dtype"):
        perplexity(mla, tok, text, context=64, stride=64, progress=False, cache_dtype="int4",
                   rope_dtype="int4")


@torch.no_grad()
def test_perplexity_batches_windows_without_changing_the_result():
    model, tok = tiny_model(), CharTokenizer()
    text = "windows of equal length go through the model together " * 4  # last one shorter
    one = perplexity(model, tok, text, context=24, stride=16, progress=False, batch_size=1)
    for b in (2, 3, 64):
        got = perplexity(model, tok, text, context=24, stride=16, progress=False, batch_size=b)
        assert got == pytest.approx(one, rel=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, tok, text, context=24, stride=16, batch_size=0)


def test_perplexity_rejects_bad_arguments():
    model, tok = tiny_model(), CharTokenizer()
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, "abc" * 10, context=8, stride=9)
    with pytest.raises(ValueError, match="exceeds"):
        perplexity(model, tok, "abc" * 10, context=10_000, stride=10)
    with pytest.raises(ValueError, match="fewer than 2"):
        perplexity(model, tok, "a", context=8, stride=8)


def test_load_texts(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second")
    assert load_texts(tmp_path) == ["first", "second"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "x"}\n\n{"text": "y"}\n')
    assert load_texts(jsonl) == ["x", "y"]
    jsonl.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="field 'text'"):
        load_texts(jsonl)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="UTF-8"):
        load_texts(bad)
    with pytest.raises(FileNotFoundError):
        load_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        load_texts(tmp_path / "empty.txt")
