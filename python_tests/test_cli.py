import subprocess
import sys

import pytest

from mla_ext.cli import build_parser, main

COMMANDS = ["convert", "eval", "generate", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mla-ext " + command in out and "--" in out


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "mla_ext.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in COMMANDS:
        assert command in out


def test_bad_arguments_are_reported(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--out", "x", "--d-kv", "zero"])
    assert "positive integer" in capsys.readouterr().err
    assert main(["eval", "--model", "/nonexistent/model"]) == 2
    assert "no model at" in capsys.readouterr().err


def test_bad_model_paths_are_one_line_errors(tmp_path, capsys):
    import mla_ext
    from tiny import converted, tiny_model

    empty = tmp_path / "empty"
    empty.touch()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a model")
    ckpt = mla_ext.save_pretrained(converted(tiny_model(), rope_pairs=2, d_kv=6,
                                             rope_strategy="high"), tmp_path / "ckpt")
    (ckpt / "config.json").unlink()
    cases = [("eval", empty, "is a file, not a model directory"),
             ("generate", other, "has no config.json"),
             ("convert", ckpt, "has no config.json")]
    for command, path, reason in cases:
        args = [command, "--model", str(path)] + {"eval": [], "generate": ["--prompt", "Hi"],
                                                  "convert": ["--out", str(tmp_path / "o")]}[command]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mla-ext {command}: error: --model {path} {reason}")
        assert err.count("\n") == 1


@pytest.mark.slow
def test_convert_eval_generate_on_a_tiny_model(tmp_path, capsys):
    """The three commands end to end on a tiny random Llama that uses the default tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    from mla_ext.models import default_model_file
    from tiny import tiny_config
    from transformers import AutoTokenizer

    file = default_model_file()
    tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(tiny_config(vocab_size=len(tok))).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "--model", str(model_dir), "--out", str(ckpt), "--rope-strategy",
                 "2-norm", "--rope-pairs", "2", "--d-kv", "4", "--svd", "activation",
                 "--calib-sequences", "2", "--calib-length", "64"]) == 0
    assert "smaller" in capsys.readouterr().out
    assert main(["convert", "--model", str(model_dir), "--out", str(ckpt)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["eval", "--model", str(ckpt), "--max-tokens", "200", "--context", "64",
                 "--stride", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["generate", "--model", str(ckpt), "--prompt", "Hello", "--max-new-tokens", "3",
                 "--cache-dtype", "int4"]) == 0
    assert "tokens/s" in capsys.readouterr().err
    assert main(["generate", "--model", str(ckpt), "--prompt", "", "--raw"]) == 2
    assert "no prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "Hi", "--raw",
                 "--max-new-tokens", "2", "--temperature", "0.7", "--seed", "1"]) == 0
    assert "K/V cache" in capsys.readouterr().err


@pytest.fixture
def no_loading(monkeypatch):
    """convert must check --out before it loads (and converts) anything."""
    import mla_ext.models

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(mla_ext.models, "load_model", load_model)


def test_convert_checks_out_before_any_work(tmp_path, capsys, no_loading, monkeypatch):
    import mla_ext
    from test_checkpoint import read_only
    from tiny import converted, tiny_model

    ckpt = mla_ext.save_pretrained(converted(tiny_model(), rope_pairs=2, d_kv=6,
                                             rope_strategy="high"), tmp_path / "ckpt")
    convert = ["convert", "--rope-strategy", "high", "--rope-pairs", "2", "--d-kv", "4",
               "--svd", "joint", "--out"]
    assert main(convert + [str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"mla-ext convert: error: --out {ckpt} exists" in err and "--overwrite" in err
    assert "overwrite=True" not in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    file = tmp_path / "file"
    file.write_text("keep me")
    for out in (other, file):
        assert main(convert + [str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"error: --out {out} " in err and "not replacing it" in err
    assert (other / "notes.txt").read_text() == file.read_text() == "keep me"
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(parent, monkeypatch)
    try:
        assert main(convert + [str(parent / "new" / "ckpt")]) == 2
    finally:
        parent.chmod(0o755)
    err = capsys.readouterr().err
    assert f"error: --out {parent / 'new' / 'ckpt'}: cannot write in {parent}" in err
    assert err.count("\n") == 1  # one line, no traceback
