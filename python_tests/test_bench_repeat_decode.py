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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the ws decode kernel needs a compute capability 9.0 GPU")
def test_ws_kernel_is_repeatable_over_long_sequences():
    """The Llama-3 shape (D_c = 256, bf16) gets three ring slots: a slot's previous tile belongs
    to the other consumer warpgroup, and its copy may land after a later tile's. 30 calls over
    2 x 131,072 tokens (16-32 tiles a split, the L2 flushed before each) give identical outputs."""
    result = run("--kernel", "ws", "--model", "llama3", "--B", "2", "--S", "131072",
                 "--calls", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every output equals the first" in result.stdout
