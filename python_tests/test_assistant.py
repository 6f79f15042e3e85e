"""The recovery check: answer normalisation, the answer match on the demo prompts and the
perplexity against the original fine-tuned on the same tokens (function and CLI)."""
import json

import pytest
import torch

import mla_ext
from mla_ext.assistant import (DEMO_PROMPTS, MIN_MATCHES, answers_match, check_recovery,
                               compare_answers, first_sentence, format_report,
                               normalise_answer)
from mla_ext.cli import main
from test_train_chat import chat_tokenizer
from tiny import converted, tiny_model

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_prompts_are_ten_fixed_questions_and_eight_must_match():
    assert len(DEMO_PROMPTS) == len(set(DEMO_PROMPTS)) == 10 and MIN_MATCHES == 8
    from mla_ext.train import corpus_prompts
    assert not set(DEMO_PROMPTS) & set(corpus_prompts(1024))


@pytest.mark.parametrize("answer, reference, same", [
    ("The capital of France is Paris.", "The capital of France is Paris.", True),
    ("  The capital of France is Paris.\n", "The capital of France is Paris.", True),
    ("the capital of France is Paris!", "The capital of France is Paris.", True),
    ("The capital of France is Paris. It is large.", "The capital of France is Paris. It has "
     "museums.", True),                                  # only the first sentence counts
    ("A week is 7 days.", "A week is 7 days long.", False),
    ("Paris.", "The capital of France is Paris.", False),
    ("The capital of France is Lyon.", "The capital of France is Paris.", False),
    ("The ocean is 149.7 million km wide. Yes.", "the ocean is 149.7 million km wide", True),
    ("2 + 3 = 5", "2 + 3 = 6", False),
    ("...", "!!!", False),                               # nothing left after normalising
    ("", "", True),
])
def test_answer_match(answer, reference, same):
    assert answers_match(answer, reference) is same
    assert answers_match(reference, answer) is same


def test_normalisation():
    assert first_sentence("Yes. No.") == "Yes"
    assert first_sentence("line one\nline two. more") == "line one"
    assert normalise_answer("The  Ｐａｒｉｓ, an old city!") == "paris old city"
    assert normalise_answer("") == ""
    with pytest.raises(TypeError, match="an answer must be a str"):
        normalise_answer(None)


def test_compare_answers_counts_and_rejects_mismatched_lists():
    ref = ["X.", "B.", "C."]
    got = compare_answers(["x", "B.", "D."], ref, ["p1", "p2", "p3"])
    assert [r["match"] for r in got["rows"]] == [True, True, False]
    assert got["matches"] == 2 and got["total"] == 3
    with pytest.raises(ValueError, match="3 prompts need as many answers"):
        compare_answers(["a"], ref, ["p1", "p2", "p3"])
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        compare_answers([], [], [])


def test_check_recovery_passes_for_the_original_and_fails_for_another_model():
    tok = chat_tokenizer()
    original = tiny_model()
    same = check_recovery(original, tok, original=original, max_new_tokens=6)
    assert same["answers"]["matches"] == 10 and same["answers_pass"] and same["passed"]
    assert same["perplexity"] is None and same["ppl_pass"] is None
    # a converted model answers through its latent cache; with answers given once
    answers = [r["reference"] for r in same["answers"]["rows"]]
    mla = converted(original, rope_strategy="high", rope_pairs=None, d_kv=None)
    lossless = check_recovery(mla, tok, original_answers=answers, max_new_tokens=6,
                              cache_dtype="fp32")
    assert lossless["answers"]["matches"] == 10 and lossless["passed"]
    # another model: its answers differ, the check must fail
    other = check_recovery(tiny_model(seed=3), tok, original=original, max_new_tokens=6)
    assert other["answers"]["matches"] < MIN_MATCHES
    assert not other["answers_pass"] and not other["passed"]
    assert "recovery check: FAILED" in format_report(other)


def test_check_recovery_compares_perplexity_with_the_baseline():
    tok = chat_tokenizer()
    original = tiny_model()
    trained = tiny_model(seed=5)
    ok = check_recovery(original, tok, original=original, baseline=original, text=TEXT,
                        max_new_tokens=4, context=64, eval_tokens=256)
    assert ok["perplexity"]["ratio"] == pytest.approx(1.0) and ok["ppl_pass"] and ok["passed"]
    expected = mla_ext.perplexity(original, tok, TEXT, context=64, stride=64, max_tokens=256,
                                  progress=False)
    assert ok["perplexity"]["model"] == pytest.approx(expected)
    # same answers, but the perplexity bound is not met: the check fails
    strict = check_recovery(original, tok, original=original, baseline=trained, text=TEXT,
                            max_new_tokens=4, context=64, eval_tokens=256,
                            max_ppl_ratio=0.5 * ok["perplexity"]["model"]
                            / mla_ext.perplexity(trained, tok, TEXT, context=64, stride=64,
                                                 max_tokens=256, progress=False))
    assert strict["answers_pass"] and strict["ppl_pass"] is False and not strict["passed"]
    assert "FAIL" in format_report(strict).splitlines()[-2]


def test_check_recovery_rejects_bad_input():
    tok, model = chat_tokenizer(), tiny_model()
    with pytest.raises(ValueError, match="exactly one of original"):
        check_recovery(model, tok)
    with pytest.raises(ValueError, match="exactly one of original"):
        check_recovery(model, tok, original=model, original_answers=["x"] * 10)
    for bad in (0, 11, True):
        with pytest.raises(ValueError, match="min_matches must be an int in 1..10"):
            check_recovery(model, tok, original=model, min_matches=bad)
    with pytest.raises(ValueError, match="max_ppl_ratio must be positive"):
        check_recovery(model, tok, original=model, max_ppl_ratio=0)
    with pytest.raises(ValueError, match="10 prompts need as many answers"):
        check_recovery(model, tok, original_answers=["x"] * 3, max_new_tokens=2)
    with pytest.raises(ValueError, match="no chat template"):
        from test_train_data import char_tokenizer
        check_recovery(model, char_tokenizer(), original=model)


def test_check_recovery_cli(tmp_path, capsys):
    tok = chat_tokenizer()
    for name, seed in (("original", 0), ("other", 3)):
        tiny_model(seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "text.txt").write_text(TEXT)
    common = ["--original", str(tmp_path / "original"), "--device", "cpu", "--no-progress",
              "--text", str(tmp_path / "text.txt"), "--eval-tokens", "256", "--context", "64"]
    assert main(["check-recovery", "--model", str(tmp_path / "original"), *common,
                 "--baseline", str(tmp_path / "original"), "--json",
                 str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "answers as the original on 10 of 10 prompts (needs 8): pass" in out
    assert "1.000x" in out and "recovery check: PASSED" in out
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    assert main(["check-recovery", "--model", str(tmp_path / "other"), *common]) == 1
    assert "recovery check: FAILED" in capsys.readouterr().out
    assert main(["check-recovery", "--model", str(tmp_path / "nope"), *common]) == 2
    assert "no model at" in capsys.readouterr().err
    assert main(["check-recovery", "--model", str(tmp_path / "other"), *common,
                 "--min-matches", "11"]) == 2
    assert "min_matches must be an int in 1..10" in capsys.readouterr().err
