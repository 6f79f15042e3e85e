"""The decode kernels' instantiation files, kernel table, dispatch header and the block of
csrc/sources.txt naming them are what csrc/cuda/mla_decode/generate_kernels.py makes from its
one list: config, build and dispatch cannot drift apart."""
import subprocess
import sys
from pathlib import Path

GENERATOR = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "mla_decode" / "generate_kernels.py"


def test_committed_files_equal_the_generators_output():
    run = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, (
        f"{run.stdout}{run.stderr}\nrun python {GENERATOR} and commit what it writes")
