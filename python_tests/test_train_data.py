import json
import os

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import mla_ext
from mla_ext.train import DataError, GlobalOrder, PackedDataset, pack, resolve_source
from mla_ext.train import data as train_data

REPEAT = "the quick brown fox jumps over the lazy dog. " * 40


def char_tokenizer():
    """One token per printable ASCII character (98 ids, fits the tiny models' vocabulary of
    101), so expected token streams can be written down by hand."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_corpus(root):
    (root / "sub").mkdir(parents=True)
    docs = {"a.txt": "first file\nwith two lines\n", "b.md": "# second\n\ncaf\u00e9 text\n",
            "sub/c.py": "def f(x):\n    return x * 2\n"}
    for name, text in docs.items():
        (root / name).write_text(text, encoding="utf-8")
    records = ["one record", "", "two records here"]
    (root / "d.jsonl").write_text("\n".join(json.dumps({"text": r, "id": i})
                                            for i, r in enumerate(records)) + "\n")
    (root / "ignored.bin").write_bytes(b"\xff\xfe not text")
    # file order of the packing: sorted paths; JSONL records are documents of their own
    return [docs["a.txt"], docs["b.md"], "one record", "two records here", docs["sub/c.py"]]


def test_pack_round_trip_in_several_shards(tmp_path):
    tok = char_tokenizer()
    docs = write_corpus(tmp_path / "corpus")
    stream = [t for d in docs for t in ids(tok, d) + [tok.eos_token_id]]
    ds = pack(tmp_path / "corpus", tok, tmp_path / "packed", seq_len=16, shard_tokens=48,
              progress=False)
    n = len(stream) // 16
    assert len(ds) == n and ds.index["dropped_tokens"] == len(stream) - 16 * n
    assert len(ds.index["shards"]) == -(-n // 3)
    got = np.concatenate([ds[i] for i in range(len(ds))])
    assert got.tolist() == stream[:16 * n]
    assert ds.dtype == np.uint16
    assert os.path.getsize(tmp_path / "packed" / "shard_00000.bin") == 3 * 16 * 2
    # a second reader sees the same data through the index alone
    again = PackedDataset(tmp_path / "packed")
    assert again.batch([n - 1, 0]).tolist() == [stream[16 * (n - 1):16 * n], stream[:16]]


def test_reading_maps_only_the_shard_it_needs(tmp_path):
    tok = char_tokenizer()
    (tmp_path / "t.txt").write_text(REPEAT)
    ds = pack(tmp_path / "t.txt", tok, tmp_path / "p", seq_len=10, shard_tokens=50,
              progress=False)
    assert len(ds.index["shards"]) > 3
    row = ds[17]                                   # shard 3 of 5-sequence shards
    assert set(ds._maps) == {3}
    assert isinstance(ds._maps[3], np.memmap)
    assert np.shares_memory(row, ds._maps[3])      # a view of the map, not a copy
    assert row.tolist() == ids(tok, REPEAT)[170:180]


def test_large_file_is_tokenized_in_blocks_with_the_same_result(tmp_path, monkeypatch):
    tok = char_tokenizer()
    text = "".join(f"line {i} of a long file\n" for i in range(200))
    (tmp_path / "big.txt").write_text(text)
    monkeypatch.setattr(train_data, "BLOCK_CHARS", 100)
    pieces = list(train_data.iter_documents(resolve_source(tmp_path / "big.txt")))
    assert len(pieces) > 10 and [end for _, end in pieces].count(True) == 1
    ds = pack(tmp_path / "big.txt", tok, tmp_path / "p", seq_len=32, progress=False)
    stream = ids(tok, text) + [tok.eos_token_id]
    assert np.concatenate([ds[i] for i in range(len(ds))]).tolist() == stream[:32 * len(ds)]


def test_max_sequences_and_token_width(tmp_path):
    (tmp_path / "t.txt").write_text(REPEAT)
    ds = pack(tmp_path / "t.txt", char_tokenizer(), tmp_path / "p", seq_len=8, max_sequences=5,
              progress=False)
    assert len(ds) == 5
    assert train_data.token_dtype(65536) == np.uint16
    assert train_data.token_dtype(65537) == np.uint32


def test_default_corpus_excludes_the_held_out_text():
    source = resolve_source("default")
    names = {f.name for f in source.files}
    assert "os.py" in names and all(f.parent == source.files[0].parent for f in source.files)
    assert not any("pydoc_data" in str(f) for f in source.files)
    assert source.texts == [mla_ext.default_calibration_text()]
    held_out = mla_ext.default_evaluation_text()
    probe = held_out[len(held_out) // 2:len(held_out) // 2 + 200]
    assert probe not in source.texts[0]


def test_global_order_is_a_permutation_per_epoch_and_splits_by_rank():
    order = GlobalOrder(10, seed=3)
    first = [order[p] for p in range(10)]
    second = [order[p] for p in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    # the step's global batch is the same however it is cut into micro-batches
    one = order.micro_batch(2, 0, 3, 2) + order.micro_batch(2, 1, 3, 2)
    assert one == [order[p] for p in range(12, 18)]
    assert GlobalOrder(10, seed=3).micro_batch(2, 1, 3, 2) == one[3:]


def test_bad_inputs_are_named(tmp_path):
    tok = char_tokenizer()
    with pytest.raises(DataError, match="does not exist"):
        resolve_source(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty.txt.*no text|holds no text"):
        resolve_source(tmp_path / "empty.txt")
    (tmp_path / "nodocs").mkdir()
    (tmp_path / "nodocs" / "x.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match="no files ending in"):
        resolve_source(tmp_path / "nodocs")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ok".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(byte 3"):
        resolve_source(tmp_path / "latin1.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="bad.jsonl:2 is not valid JSON"):
        resolve_source(tmp_path / "bad.jsonl")
    (tmp_path / "field.jsonl").write_text('{"content": "no text field"}\n')
    with pytest.raises(DataError, match="field.jsonl:1 has no string field 'text'"):
        resolve_source(tmp_path / "field.jsonl")
    with pytest.raises(DataError, match="pip install datasets"):
        resolve_source("hf:some-org/some-corpus")
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(DataError, match="fewer than one sequence"):
        pack(tmp_path / "short.txt", tok, tmp_path / "p", seq_len=64, progress=False)
    assert not (tmp_path / "p").exists()


def test_damaged_packed_data_is_detected(tmp_path):
    (tmp_path / "t.txt").write_text(REPEAT)
    pack(tmp_path / "t.txt", char_tokenizer(), tmp_path / "p", seq_len=8, progress=False)
    with pytest.raises(FileExistsError, match="exists"):
        pack(tmp_path / "t.txt", char_tokenizer(), tmp_path / "p", seq_len=8, progress=False)
    shard = tmp_path / "p" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(DataError, match="shard_00000.bin is corrupt or incomplete"):
        PackedDataset(tmp_path / "p")
    (tmp_path / "p" / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="index.json is not valid JSON"):
        PackedDataset(tmp_path / "p")
