"""bench/repeat_decode.py's command line: argument errors and the message without a GPU (its
calls themselves run on the H200 only)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "repeat_decode.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300)


def test_bad_counts_are_argument_errors():
    result = run("--calls", "0")
    assert result.returncode == 2
    assert "--calls, --B and --S must be at least 1" in result.stderr


def test_unknown_model_is_an_argument_error():
    result = run("--model", "llama9")
    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message")
def test_without_a_gpu_says_so():
    result = run()
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr
