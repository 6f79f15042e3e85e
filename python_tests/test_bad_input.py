"""Bad input a user plausibly gives, at every CLI command and public function: each fails at
once with its own kind of error, naming the argument, and leaves nothing behind.

CLI: exit code 2 and one line ``mla-ext COMMAND: error: ...`` on stderr, no traceback (``mla-ext
--debug`` shows one). Python: the exception class, with the argument's name in the message.
Covered elsewhere and not repeated here: --out and --overwrite (test_cli.py,
test_checkpoint.py), --model paths (test_cli.py), interrupted saves under SIGINT and SIGTERM
(test_checkpoint.py), MLAConfig fields (test_modeling_convert.py), the ops' tensor arguments
(test_ops_*.py) and NaN/inf inputs of the ops (test_ops_nonfinite.py).
"""
from __future__ import annotations

import math

import pytest
import torch

import mla_ext
from mla_ext.cli import main
from tiny import VOCAB, converted, tiny_model

M = "{ck}"  # a tiny converted checkpoint saved without a tokenizer


# (argv, what the one error line must say); {tmp} and {ck} are filled in by the test.
CLI_CASES = [
    ([], "the following arguments are required: command"),
    (["convert"], "the following arguments are required: --out"),
    (["convert", "--out", ""], "argument --out: expected a path, got an empty string"),
    (["convert", "--out", "{tmp}/o", "--calib-sequences", "0"],
     "argument --calib-sequences: expected a positive integer, got 0"),
    (["convert", "--out", "{tmp}/o", "--calib-length", "x"], "argument --calib-length"),
    (["convert", "--out", "{tmp}/o", "--cache-ratio", "nan"], "argument --cache-ratio"),
    (["convert", "--out", "{tmp}/o", "--cache-ratio", "2"], "cache_ratio must be a number in (0, 1]"),
    (["convert", "--out", "{tmp}/o", "--rope-strategy", "best"], "argument --rope-strategy"),
    (["convert", "--out", "{tmp}/o", "--rope-pairs", "0"], "argument --rope-pairs"),
    (["convert", "--out", "{tmp}/o", "--d-kv", "16"], "d_kv=16 needs an int rope_pairs"),
    (["convert", "--out", "{tmp}/o", "--device", "tpu"], "argument --device: expected cpu, cuda"),
    (["convert", "--out", "{tmp}/o", "--calib-text", "{tmp}/missing.txt"],
     "--calib-text {tmp}/missing.txt: no such file or directory"),
    (["eval", "--model", ""], "argument --model: expected a path"),
    (["eval", "--context", "0"], "argument --context: expected a positive integer, got 0"),
    (["eval", "--stride", "-3"], "argument --stride: expected a positive integer, got -3"),
    (["eval", "--max-tokens", "0"], "argument --max-tokens"),
    (["eval", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["eval", "--text", "{tmp}/missing.txt"], "--text {tmp}/missing.txt: no such file"),
    (["eval", "--model", M], f"--model {M} is an mla_ext checkpoint saved without a tokenizer"),
    (["generate"], "the following arguments are required: --prompt"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "argument --temperature"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "argument --temperature"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "argument --top-p: expected a probability"),
    (["generate", "--prompt", "hi", "--cache-dtype", "int3"], "argument --cache-dtype"),
    (["generate", "--prompt", "hi", "--model", "{tmp}/missing"], "--model no model at {tmp}"),
    (["generate", "--prompt", "hi", "--model", M], "saved without a tokenizer"),
    (["demo", "--eval-tokens", "0"], "argument --eval-tokens"),
    (["demo", "--recovery-steps", "-1"], "argument --recovery-steps"),
    (["demo", "--device", "cuda:99"], "argument --device"),
    (["finetune"], "the following arguments are required: --out"),
    (["finetune", "--out", "{tmp}/f", "--steps", "0"], "argument --steps"),
    (["finetune", "--out", "{tmp}/f", "--warmup", "2"], "argument --warmup"),
    (["finetune", "--out", "{tmp}/f", "--model", "{tmp}/missing"], "--model"),
    (["pack", "--out", "{tmp}/p", "--seq-len", "0"], "argument --seq-len"),
    (["pack", "--out", "{tmp}/p", "--data", "{tmp}/missing"], "data {tmp}/missing does not exist"),
    (["pack", "--out", "{tmp}/p", "--data", "{tmp}/empty.txt"], "holds no text"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    mla = converted(tiny_model(), rope_pairs=2, d_kv=6, rope_strategy="high")
    return mla_ext.save_pretrained(mla, tmp_path_factory.mktemp("ck") / "ck")


def run_cli(argv, capsys):
    """(exit code, stderr) of mla-ext argv; a usage error exits through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, says", CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_bad_input_is_one_line_with_exit_code_2(argv, says, tmp_path, checkpoint, capsys):
    (tmp_path / "empty.txt").touch()
    fill = lambda s: s.replace("{tmp}", str(tmp_path)).replace(M, str(checkpoint))  # noqa
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_cli([fill(a) for a in argv], capsys)
    command = argv[0] if argv else None
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"mla-ext {command}: error: " if command else "mla-ext: error: "), err
    assert fill(says) in err, err
    # nothing was written: no --out, no staging directory, no packed data
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["ck"]


def test_cli_unexpected_error_is_one_line_naming_its_type_and_debug_shows_it(
        tmp_path, capsys, monkeypatch):
    import mla_ext.cli

    def broken(args):
        raise RuntimeError("the device went away\nsecond line")

    monkeypatch.setattr(mla_ext.cli, "_load", broken)
    code, err = run_cli(["eval"], capsys)
    assert code == 2
    assert err == ("mla-ext eval: error: RuntimeError: the device went away second line "
                   "(mla-ext --debug shows the traceback)\n")
    with pytest.raises(RuntimeError, match="the device went away"):
        main(["--debug", "eval"])


# ---------------------------------------------------------------- Python API

@pytest.fixture(scope="module")
def mla():
    return converted(tiny_model(), rope_pairs=2, d_kv=6, rope_strategy="high")


IDS = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))

# (call given the converted tiny model, exception class, words of the message)
API_CASES = [
    ("convert_to_mla model", lambda m: mla_ext.convert_to_mla("model.pt"), TypeError,
     "model must be a torch.nn.Module"),
    ("convert_to_mla config", lambda m: mla_ext.convert_to_mla(tiny_model(), "high"), TypeError,
     "config must be an MLAConfig"),
    ("convert_to_mla calibration", lambda m: mla_ext.convert_to_mla(
        tiny_model(), mla_ext.MLAConfig(), calibration={"layers": []}), TypeError,
     "calibration must be what mla_ext.calibrate returns"),
    ("convert_to_mla without calibration", lambda m: mla_ext.convert_to_mla(
        tiny_model(), mla_ext.MLAConfig()), ValueError, "need calibration statistics"),
    ("convert_to_mla twice", lambda m: mla_ext.convert_to_mla(
        m, mla_ext.MLAConfig(rope_pairs=2, d_kv=6, svd="joint")), ValueError,
     "already converted"),
    ("LatentCache model", lambda m: mla_ext.LatentCache("model"), TypeError,
     "model must be a torch.nn.Module"),
    ("LatentCache unconverted", lambda m: mla_ext.LatentCache(tiny_model()), ValueError,
     "convert it first"),
    ("LatentCache cache_dtype", lambda m: mla_ext.LatentCache(m, cache_dtype="int3"), ValueError,
     "cache_dtype must be one of"),
    ("LatentCache group_size", lambda m: mla_ext.LatentCache(m, cache_dtype="int8",
                                                             group_size=5), ValueError,
     "group_size 5 must divide"),
    ("LatentCache block_size", lambda m: mla_ext.LatentCache(m, block_size=0), ValueError,
     "block_size must be positive"),
    ("StaticKVCache model", lambda m: mla_ext.StaticKVCache(None, 1, 8), TypeError,
     "model must be a torch.nn.Module"),
    ("kv_cache_bytes_per_token model", lambda m: mla_ext.kv_cache_bytes_per_token("m"),
     TypeError, "model must be a torch.nn.Module"),
    ("kv_cache_bytes_per_token cache_dtype", lambda m: mla_ext.kv_cache_bytes_per_token(
        m, "int3"), ValueError, "cache_dtype must be one of"),
    ("save_pretrained model", lambda m: mla_ext.save_pretrained(m.state_dict(), "x"), TypeError,
     "model must be a torch.nn.Module"),
    ("save_pretrained path None", lambda m: mla_ext.save_pretrained(m, None), TypeError,
     "path must be a str or os.PathLike"),
    ("save_pretrained path empty", lambda m: mla_ext.save_pretrained(m, ""), ValueError,
     "path is empty"),
    ("load_pretrained path None", lambda m: mla_ext.load_pretrained(None), TypeError,
     "path must be a str or os.PathLike"),
    ("load_pretrained path empty", lambda m: mla_ext.load_pretrained(""), ValueError,
     "path is empty"),
    ("load_pretrained dtype", lambda m: mla_ext.load_pretrained("ck", dtype="bf16"), TypeError,
     "dtype must be a floating torch.dtype"),
    ("load_default_model dtype", lambda m: mla_ext.load_default_model(dtype="fp32"), TypeError,
     "dtype must be a floating torch.dtype"),
    ("generate max_new_tokens", lambda m: mla_ext.generate(m, IDS, max_new_tokens=0),
     ValueError, "max_new_tokens must be a positive int"),
    ("generate input_ids list", lambda m: mla_ext.generate(m, IDS.tolist(), max_new_tokens=2), ValueError,
     "input_ids must be a (batch, length) int64 tensor"),
    ("generate input_ids empty", lambda m: mla_ext.generate(m, IDS[:, :0], max_new_tokens=2), ValueError,
     "input_ids holds no prompt"),
    ("generate input_ids out of vocabulary", lambda m: mla_ext.generate(m, IDS + VOCAB, max_new_tokens=2),
     ValueError, f"input_ids holds token ids in [{int(IDS.min()) + VOCAB}"),
    ("generate cache_dtype", lambda m: mla_ext.generate(m, IDS, max_new_tokens=2, cache_dtype="int3"),
     ValueError, "cache_dtype must be one of"),
    ("generate temperature", lambda m: mla_ext.generate(m, IDS, max_new_tokens=2, temperature=math.nan),
     ValueError, "temperature must be >= 0"),
    ("generate top_p", lambda m: mla_ext.generate(m, IDS, max_new_tokens=2, temperature=1.0, top_p=0),
     ValueError, "top_p must be in (0, 1]"),
    ("perplexity context", lambda m: mla_ext.perplexity(m, None, "text", context=1), ValueError,
     "context must be at least 2"),
    ("calibrate texts", lambda m: mla_ext.calibrate(tiny_model(), None, []), ValueError,
     "calibration needs at least"),
]


@pytest.mark.parametrize("call, error, says", [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])
def test_python_bad_input_names_the_argument(call, error, says, mla, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as exc:
        call(mla)
    assert says in str(exc.value)
    assert list(tmp_path.iterdir()) == []  # nothing written where the call was made
