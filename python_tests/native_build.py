"""Host-side checks of csrc/ headers: a program in python_tests/native/ built with the host
compiler against csrc/ and torch's headers, so that plain C++ parts of the CUDA build (the
kernel choice, the shared-memory layouts) are tested on any machine."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parent.parent
NATIVE = Path(__file__).resolve().parent / "native"


def build_native_check(name: str, out_dir: Path) -> Path:
    """native/<name>.cpp built into out_dir; the test is skipped where no C++ compiler exists."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip(f"no C++ compiler to build {name}")
    exe = out_dir / name
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{ROOT / 'csrc'}"]
    build = subprocess.run([cxx, "-std=c++17", "-O1", *includes, str(NATIVE / f"{name}.cpp"),
                            "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    return exe
