"""bench/bench_mla_decode.py's selection arguments (--formats, --shapes): parsed values and the
errors for bad ones (the benchmark itself runs on the H200 only)."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.bench_mla_decode import parse_formats, parse_shapes  # noqa: E402


def test_formats_parse_to_latent_rope_pairs():
    assert parse_formats("bf16/bf16,int4/fp8") == {("bf16", "bf16"), ("int4", "fp8")}


@pytest.mark.parametrize("text", ["int8", "int3/bf16", "bf16/int8", "bf16/bf16,"])
def test_bad_formats_are_rejected(text):
    with pytest.raises(argparse.ArgumentTypeError, match="LATENT/ROPE"):
        parse_formats(text)


def test_shapes_parse_in_order():
    assert parse_shapes("32x16384,1X4096") == [(32, 16384), (1, 4096)]


@pytest.mark.parametrize("text,msg", [("32", "BxS"), ("axb", "BxS"), ("0x4096", "at least 1")])
def test_bad_shapes_are_rejected(text, msg):
    with pytest.raises(argparse.ArgumentTypeError, match=msg):
        parse_shapes(text)


def test_bad_shapes_end_the_command_with_an_argument_error():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_mla_decode.py"),
                             "--shapes", "1x0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--shapes" in result.stderr and "at least 1" in result.stderr
