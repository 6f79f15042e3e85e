"""Chat data for recovery: prompts from the corpus, generation and its cache, the chat format,
mixing into the corpus, and `mla-ext finetune --chat-mix`."""
import json
import re

import numpy as np
import pytest
import torch

import mla_ext
from mla_ext.cli import main
from mla_ext.data import default_evaluation_text
from mla_ext.train import (DataError, PackedDataset, chat_data, corpus_prompts, mix_sources, pack,
                           read_log, resolve_source)
from mla_ext.train.chat import default_cache_dir, format_chat
from test_train_data import char_tokenizer
from tiny import converted, tiny_model

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
PROMPTS = ["what is a list?", "explain os.path.join", "say hi", "name a colour", "why?"]


pytestmark = pytest.mark.usefixtures("one_thread")


def chat_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_corpus_prompts_come_from_the_training_part_of_the_corpus():
    prompts = corpus_prompts(60)
    assert len(prompts) == len(set(prompts)) == 60
    assert corpus_prompts(60) == prompts and corpus_prompts(60, seed=1) != prompts
    assert corpus_prompts(10) == prompts[:10]
    # both kinds are there even in a small set: documentation topics and library functions
    assert any(p.startswith("Summarize this passage") or p.startswith("Explain the")
               for p in prompts[:4])
    assert any("`" in p for p in prompts[:4])
    # the held-out half of pydoc_data.topics never enters a question
    held_out = default_evaluation_text()
    for p in corpus_prompts(200):
        if p.startswith("Summarize this passage"):
            assert p.split("\n\n", 1)[1][:80] not in held_out
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="number of chat prompts must be a positive int"):
            corpus_prompts(bad)
    with pytest.raises(ValueError, match="10000000 chat prompts asked for; the default corpus "
                                         "yields"):
        corpus_prompts(10_000_000)


def test_chat_format_is_the_tokenizers_template():
    tok = chat_tokenizer()
    assert format_chat(tok, "hi", "hello there") == "user: hi\nassistant: hello there\n"
    with pytest.raises(ValueError, match="no chat template"):
        format_chat(char_tokenizer(), "hi", "hello")


def test_batched_answers_equal_one_at_a_time():
    model, tok = tiny_model(), chat_tokenizer()
    batched = mla_ext.chat_answers(model, tok, PROMPTS, max_new_tokens=8, batch_size=2)
    assert batched == [mla_ext.chat(model, tok, p, max_new_tokens=8) for p in PROMPTS]
    assert all(isinstance(a, str) for a in batched) and any(batched)
    mla = converted(model, rope_strategy="high", rope_pairs=2, d_kv=4)
    assert len(mla_ext.chat_answers(mla, tok, PROMPTS[:2], max_new_tokens=4,
                                    cache_dtype="int8")) == 2
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        mla_ext.chat_answers(model, tok, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        mla_ext.chat_answers(model, tok, PROMPTS, batch_size=0)
    with pytest.raises(ValueError, match="no chat template"):
        mla_ext.chat_answers(model, char_tokenizer(), PROMPTS)


def test_chat_data_is_generated_once_and_cached(tmp_path):
    model, tok, cache = tiny_model(), chat_tokenizer(), tmp_path / "cache"
    first = chat_data(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, cache_dir=cache,
                      progress=False)
    assert not first.from_cache and first.path.parent == cache
    expected = mla_ext.chat_answers(model, tok, PROMPTS, max_new_tokens=6)
    assert [r["answer"] for r in first.records] == expected
    assert [r["prompt"] for r in first.records] == PROMPTS
    assert [r["text"] for r in first.records] == [format_chat(tok, p, a)
                                                  for p, a in zip(PROMPTS, expected)]
    lines = [json.loads(x) for x in first.path.read_text().splitlines()]
    assert lines == first.records
    stamp = first.path.stat().st_mtime_ns

    again = chat_data(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, cache_dir=cache,
                      progress=False)
    assert again.from_cache and again.path == first.path and again.records == first.records
    assert first.path.stat().st_mtime_ns == stamp
    # another setting, other prompts or other weights: another entry
    other = [chat_data(model, tok, PROMPTS, max_new_tokens=7, cache_dir=cache, progress=False),
             chat_data(model, tok, PROMPTS[:4], max_new_tokens=6, cache_dir=cache,
                       progress=False),
             chat_data(tiny_model(seed=1), tok, PROMPTS, max_new_tokens=6, cache_dir=cache,
                       progress=False)]
    assert all(not o.from_cache for o in other)
    assert len({o.path for o in other} | {first.path}) == 4
    # a damaged entry is generated again, with the same result
    first.path.write_text(first.path.read_text()[:30])
    redone = chat_data(model, tok, PROMPTS, max_new_tokens=6, cache_dir=cache, progress=False)
    assert not redone.from_cache and redone.records == first.records
    # the conversations are training text
    source = redone.source()
    assert source.files == [redone.path] and "5 chat answers" in source.description


def test_chat_data_rejects_bad_input(tmp_path, monkeypatch):
    model, tok = tiny_model(), chat_tokenizer()
    with pytest.raises(ValueError, match="no chat template"):
        chat_data(model, char_tokenizer(), PROMPTS, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        chat_data(model, tok, ["ok", "  "], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        chat_data(model, tok, PROMPTS, max_new_tokens=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        chat_data(model, tok, PROMPTS, batch_size=-1, cache_dir=tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        chat_data(model, tok, PROMPTS, cache_dir=tmp_path / "file")
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]
    monkeypatch.setenv("MLA_EXT_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "chat"


def _stream(dataset):
    return np.concatenate([dataset[i] for i in range(len(dataset))])


def _text(tok, dataset) -> str:
    """The packed tokens as text, one character per token (EOS as its own string)."""
    return "".join(tok.convert_ids_to_tokens(_stream(dataset).tolist()))


def test_mixing_keeps_the_fraction_and_whole_documents(tmp_path):
    tok = char_tokenizer()
    base = tmp_path / "base.txt"
    base.write_text("the lazy dog sleeps all day long. " * 300)          # lower case
    chat = tmp_path / "chat.jsonl"
    docs = ["USER: HI\nBOT: HELLO", "USER: WHY\nBOT: BECAUSE 42"]        # upper case, digits
    chat.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for fraction in (0.25, 0.5):
        ds = pack(mix_sources(base, chat, fraction), tok, tmp_path / f"p{fraction}", 16,
                  progress=False)
        assert f"with {fraction:.0%} of the tokens from" in ds.index["source"]
        pieces = _text(tok, ds).split(tok.eos_token)
        # every piece but the cut tail is a whole document of one source: chat documents go
        # between documents, never into one
        assert all(p in docs or p == base.read_text() for p in pieces[:-1])
        assert sum(p == base.read_text() for p in pieces) == 1
        assert sum(p in docs for p in pieces) > 2
    # many short base documents: the share follows the fraction closely
    lines = tmp_path / "many.jsonl"
    lines.write_text("".join(json.dumps({"text": f"doc number {'abc'[i % 3]} is short"}) + "\n"
                             for i in range(400)))
    for fraction in (0.2, 0.6):
        ds = pack(mix_sources(lines, chat, fraction), tok, tmp_path / f"m{fraction}", 16,
                  progress=False)
        text = _text(tok, ds)
        pieces = text.split(tok.eos_token)
        chat_chars = sum(len(p) + 1 for p in pieces if p in docs)
        assert abs(chat_chars / (len(text) - len(tok.eos_token) * (len(pieces) - 1)
                                 + len(pieces) - 1) - fraction) < 0.03
    # all chat: repeats until the limit
    only = pack(mix_sources(lines, chat, 1.0), tok, tmp_path / "only", 16, max_sequences=20,
                progress=False)
    assert set(_text(tok, only).split(tok.eos_token)[:-1]) <= set(docs)
    assert len(only) == 20
    # the fingerprint (and with it a run's data signature) follows the mixture
    fps = {resolve_source(base).fingerprint(), mix_sources(base, chat, 0.25).fingerprint(),
           mix_sources(base, chat, 0.5).fingerprint()}
    assert len(fps) == 3


def test_mixing_rejects_bad_input(tmp_path):
    tok = char_tokenizer()
    base = tmp_path / "base.txt"
    base.write_text("some text " * 50)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"text": "HI"}) + "\n")
    for bad in (0, -0.1, 1.5, True, "half"):
        with pytest.raises(DataError, match="mix fraction must be a number in \\(0, 1\\]"):
            mix_sources(base, chat, bad)
    with pytest.raises(DataError, match="one of them is a mixture already"):
        mix_sources(mix_sources(base, chat, 0.5), chat, 0.5)
    with pytest.raises(DataError, match="does not exist"):
        mix_sources(base, tmp_path / "missing.jsonl", 0.5)
    with pytest.raises(DataError, match="text mixed in at fraction 1.*give a limit"):
        pack(mix_sources(base, chat, 1.0), tok, tmp_path / "p", 16, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": " "}) + "\n" + json.dumps({"text": "x"}) + "\n")
    assert len(pack(mix_sources(base, empty, 0.5), tok, tmp_path / "ok", 16,
                    progress=False)) > 0


def _save_original(tmp_path):
    """A tiny unconverted model with its chat tokenizer, as a Hugging Face directory."""
    path = tmp_path / "original"
    tiny_model().save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    return path


def test_finetune_cli_with_chat_mix(tmp_path, capsys):
    original = _save_original(tmp_path)
    model_dir = tmp_path / "mla"
    mla_ext.save_pretrained(converted(tiny_model(), rope_strategy="high", rope_pairs=2, d_kv=4),
                            model_dir, tokenizer=chat_tokenizer())
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    cache = tmp_path / "cache"
    args = ["finetune", "--model", str(model_dir), "--data", str(text), "--steps", "2",
            "--seq-len", "32", "--batch-size", "2", "--lr", "3e-3", "--no-progress",
            "--no-plot", "--chat-mix", "0.5", "--chat-prompts", "3",
            "--chat-max-new-tokens", "4", "--chat-batch-size", "2", "--chat-cache", str(cache),
            "--distill", "0.5", "--teacher", str(original)]
    assert main(args + ["--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"chat data: 3 answers of {original} (generated)" in out
    index = PackedDataset(tmp_path / "run" / "data").index
    assert "with 50% of the tokens from 3 chat answers" in index["source"]
    assert [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]
    mla_ext.load_pretrained(tmp_path / "run" / "final")
    # a second run reads the cache; --pack-only prepares the same data
    assert main(args + ["--out", str(tmp_path / "again"), "--pack-only"]) == 0
    assert f"3 answers of {original} (cached)" in capsys.readouterr().out
    assert PackedDataset(tmp_path / "again" / "data").index["source_fingerprint"] == \
        index["source_fingerprint"]
    assert len(list(cache.glob("chat-*.jsonl"))) == 1


def test_finetune_cli_rejects_bad_chat_settings(tmp_path, capsys):
    original = _save_original(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("words " * 200)
    base = ["finetune", "--model", str(original), "--data", str(text), "--seq-len", "16",
            "--no-progress", "--steps", "1"]
    pack_dir = tmp_path / "packed"
    assert main(["pack", "--tokenizer", str(original), "--data", str(text), "--seq-len", "16",
                 "--out", str(pack_dir), "--no-progress"]) == 0
    capsys.readouterr()
    cases = [(["--data", str(pack_dir), "--chat-mix", "0.5"], "--chat-mix mixes chat into text"),
             (["--chat-model", str(original)], "--chat-model needs --chat-mix"),
             (["--chat-mix", "0.5", "--chat-model", str(tmp_path / "nope")],
              "--chat-model .*nope is neither 'default' nor a directory")]
    for i, (extra, message) in enumerate(cases):
        assert main(base + extra + ["--out", str(tmp_path / f"o{i}")]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
    for flag, value in (("--chat-mix", "1.5"), ("--chat-prompts", "0"),
                        ("--chat-max-new-tokens", "-1")):
        with pytest.raises(SystemExit) as exit_info:
            main(base + [flag, value, "--out", str(tmp_path / "x")])
        assert exit_info.value.code == 2
        assert flag in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in ("o0", "o1", "o2", "x"))



def test_finetune_help_explains_the_chat_data(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--chat-mix", "--chat-model", "--chat-prompts", "--chat-max-new-tokens",
                 "--chat-cache", "answered greedily", "cached"):
        assert flag in help_text


@pytest.mark.gpu
def test_batched_answers_on_the_gpu_equal_one_at_a_time(tmp_path):
    """On a GPU the batches decode through CUDA graphs (the kernels for a converted bf16
    model); in fp32 the answers and the cached chat data are those of one prompt at a time
    (bf16 rounding may differ with the batch size, so there only their form is checked)."""
    tok = chat_tokenizer()
    original = tiny_model().to("cuda")
    batched = mla_ext.chat_answers(original, tok, PROMPTS, max_new_tokens=8, batch_size=3)
    assert batched == [mla_ext.chat(original, tok, p, max_new_tokens=8) for p in PROMPTS]
    mla = converted(tiny_model(), rope_strategy="high", rope_pairs=2, d_kv=4).to(
        "cuda", torch.bfloat16)
    answers = mla_ext.chat_answers(mla, tok, PROMPTS, max_new_tokens=8, batch_size=3,
                                   cache_dtype="int4")
    assert len(answers) == len(PROMPTS) and all(isinstance(a, str) for a in answers)
    data = chat_data(original, tok, PROMPTS, max_new_tokens=8, batch_size=4,
                     cache_dir=tmp_path, progress=False)
    assert [r["answer"] for r in data.records] == mla_ext.chat_answers(original, tok, PROMPTS,
                                                                       max_new_tokens=8)
