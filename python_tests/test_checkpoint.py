import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mla_ext
from mla_ext.modeling import CheckpointError
from tiny import VOCAB, converted, tiny_model


@pytest.fixture
def mla():
    return converted(tiny_model(bias=True), rope_strategy="uniform", rope_pairs=2, d_kv=6,
                     svd="split")


def hidden(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_roundtrip_is_exact(mla, tmp_path):
    path = mla_ext.save_pretrained(mla, tmp_path / "ckpt")
    loaded = mla_ext.load_pretrained(path)
    ref, got = mla.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(mla(ids).logits, loaded(ids).logits)
    assert loaded.config.mla_ext["layers"] == mla.config.mla_ext["layers"]
    cache = mla_ext.LatentCache(loaded, cache_dtype="int4")
    loaded.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp left


def test_refuses_to_overwrite_and_replaces_atomically(mla, tmp_path):
    path = mla_ext.save_pretrained(mla, tmp_path / "ckpt")
    with pytest.raises(FileExistsError):
        mla_ext.save_pretrained(mla, path)
    mla_ext.save_pretrained(mla, path, overwrite=True)
    assert mla_ext.load_pretrained(path) is not None


def test_failed_save_leaves_nothing(mla, tmp_path, monkeypatch):
    import mla_ext.modeling.checkpoint as ckpt

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        mla_ext.save_pretrained(mla, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_unconverted_model_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="MLAAttention"):
        mla_ext.save_pretrained(tiny_model(), tmp_path / "x")


def test_bad_directories(mla, tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        mla_ext.load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        mla_ext.load_pretrained(tmp_path / "empty")
    foreign = tmp_path / "foreign"
    tiny_model().save_pretrained(foreign)
    with pytest.raises(CheckpointError, match="not an mla_ext checkpoint"):
        mla_ext.load_pretrained(foreign)
    path = mla_ext.save_pretrained(mla, tmp_path / "ckpt")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        mla_ext.load_pretrained(path)


def test_corrupt_or_mismatched_weights(mla, tmp_path):
    path = mla_ext.save_pretrained(mla, tmp_path / "ckpt")
    (path / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        mla_ext.load_pretrained(path)
    path = mla_ext.save_pretrained(mla, tmp_path / "ckpt2")
    config = json.loads((path / "config.json").read_text())
    config["mla_ext"]["layers"][0]["latent_dim"] = 8
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError):
        mla_ext.load_pretrained(path)


def test_tied_embeddings_roundtrip(tmp_path):
    mla = converted(tiny_model(tie_word_embeddings=True), rope_strategy="high", rope_pairs=2,
                    d_kv=6)
    assert mla.lm_head.weight is mla.model.embed_tokens.weight
    loaded = mla_ext.load_pretrained(mla_ext.save_pretrained(mla, tmp_path / "ckpt"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, mla.lm_head.weight)
    ids = torch.randint(0, VOCAB, (2, 9))
    assert torch.equal(mla(ids).logits, loaded(ids).logits)


@pytest.mark.slow
def test_default_model_roundtrip(tmp_path):
    """The default model ties its embeddings: a weight-only conversion saves and loads back."""
    try:
        model, tok = mla_ext.load_default_model(dtype=torch.float32)
    except FileNotFoundError as exc:  # pragma: no cover - make test installs it
        pytest.skip(str(exc))
    assert model.config.tie_word_embeddings
    mla_ext.convert_to_mla(model, mla_ext.MLAConfig(rope_strategy="high", rope_pairs=8, d_kv=16,
                                                    svd="joint", rope_correction="none"),
                           progress=False)
    path = mla_ext.save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    loaded, loaded_tok = mla_ext.load_pretrained(path, return_tokenizer=True)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.equal(loaded_tok("The capital of France is", return_tensors="pt")["input_ids"],
                       ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    expected = model.generate(ids, past_key_values=mla_ext.LatentCache(model, cache_dtype="fp32"),
                              max_new_tokens=8, do_sample=False)
    got = loaded.generate(ids, past_key_values=mla_ext.LatentCache(loaded, cache_dtype="fp32"),
                          max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)


def test_overwrite_replaces_only_a_checkpoint_or_an_empty_directory(mla, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an mla_ext checkpoint"):
        mla_ext.save_pretrained(mla, other, overwrite=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    file = tmp_path / "file"
    file.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a directory"):
        mla_ext.save_pretrained(mla, file, overwrite=True)
    assert file.read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        mla_ext.save_pretrained(mla, tmp_path / "empty")
    assert mla_ext.load_pretrained(mla_ext.save_pretrained(mla, tmp_path / "empty",
                                                           overwrite=True)) is not None
    assert hidden(tmp_path) == []


def read_only(directory, monkeypatch):
    """Make ``directory`` refuse new entries, for root too (whom its mode does not stop)."""
    directory.chmod(0o555)
    mkdir = os.mkdir

    def refusing(path, *args, **kwargs):
        if Path(path).parent == directory:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refusing)


def test_unwritable_parent_is_named_not_the_staging_directory(mla, tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(parent, monkeypatch)
    try:
        with pytest.raises(PermissionError) as exc:
            mla_ext.save_pretrained(mla, parent / "ckpt")
    finally:
        parent.chmod(0o755)
    assert str(parent / "ckpt") in str(exc.value)
    assert ".ckpt." not in str(exc.value)
    assert list(parent.iterdir()) == []


def test_checkpoint_directory_follows_the_umask(mla, tmp_path):
    old = os.umask(0o022)
    try:
        path = mla_ext.save_pretrained(mla, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


SLOW_SAVE = """
import signal, sys, time
import mla_ext
# Ctrl-C as a user's foreground process gets it: a process started in the background (as CI's
# make may be) inherits an ignored SIGINT, and Python then installs no KeyboardInterrupt handler
signal.signal(signal.SIGINT, signal.default_int_handler)
import mla_ext.modeling.checkpoint as ckpt
from tiny import converted, tiny_model

def slow_writer(model, filename, metadata=None):
    open(filename, "wb").write(b"half a file")
    print("writing", flush=True)
    time.sleep(120)

ckpt.save_model = slow_writer
mla = converted(tiny_model(), rope_strategy="high", rope_pairs=2, d_kv=6)
mla_ext.save_pretrained(mla, sys.argv[1], overwrite=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_save_leaves_the_old_checkpoint_and_no_leftovers(mla, tmp_path, sig):
    path = mla_ext.save_pretrained(mla, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path)], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        assert hidden(tmp_path)  # the save is under way beside the checkpoint
        child.send_signal(sig)
        assert child.wait(timeout=60) != 0
    finally:
        child.kill()
        child.stdout.close()
    assert hidden(tmp_path) == []
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
