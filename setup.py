"""Build of the mla_ext._C extension from the one source list in csrc/sources.txt.

Environment:
  MLA_EXT_CPU_ONLY=1       build the CPU kernels only (fast local loops), even where nvcc exists.
  TORCH_CUDA_ARCH_LIST     CUDA archs (default "8.0;9.0a").
  MAX_JOBS                 parallel compile jobs for ninja (default: cores, at most 4 GB RAM each).
  NVCC_THREADS             nvcc --threads (default 2).
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "8.0;9.0a"


def read_sources():
    sections, current = {"common": [], "cuda": []}, None
    for line in (CSRC / "sources.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        sections[current].append(str(Path("csrc") / line))
    return sections


def locate_cuda_home():
    """Torch guesses CUDA_HOME from the nvcc on PATH, which fails for a wrapper script in
    /usr/local/bin; pick the toolkit directory whose include/ really holds the runtime."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").exists() and (home / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


def extra_cuda_includes():
    """Headers of CUDA libraries (cuSPARSE, cuBLAS, ...) that torch's ATen/cuda includes need.
    A minimal toolkit lacks them; the nvidia-* wheels that torch installs carry them."""
    from torch.utils.cpp_extension import CUDA_HOME

    if (Path(CUDA_HOME) / "include" / "cusparse.h").exists():
        return []
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in nvidia.__path__:
        dirs += sorted(str(p.parent) for p in Path(root).glob("*/include/cusparse.h"))
        dirs += sorted(str(p.parent) for p in Path(root).glob("*/include/cublas_v2.h"))
    return sorted(set(dirs))


def cuda_wanted():
    if os.environ.get("MLA_EXT_CPU_ONLY", "0") not in ("", "0"):
        return False, "MLA_EXT_CPU_ONLY is set"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or shutil.which("nvcc", path=str(Path(CUDA_HOME) / "bin")) is None:
        return False, "no nvcc found (set CUDA_HOME)"
    import torch

    if torch.version.cuda is None:
        return False, "this torch has no CUDA support"
    return True, f"nvcc in {CUDA_HOME}"


def default_max_jobs():
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return max(1, min(os.cpu_count() or 1, int(mem_gb // 4)))


def warn_on_cxx_runtime_mismatch():
    """A compiler newer than the C++ runtime this Python loads builds an extension whose C++
    error messages can crash the process (seen on a GPU image whose CXX pointed at a newer GCC
    than the system's libstdc++). Say so before building, with the fix."""
    import subprocess

    import torch  # noqa: F401  (maps the C++ runtime the process will use)

    cxx = os.environ.get("CXX", "c++")
    try:
        built = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True,
                               text=True, timeout=30).stdout.strip()
        with open("/proc/self/maps") as f:
            loaded = {line.split()[-1] for line in f if "libstdc++.so" in line}
    except (OSError, subprocess.SubprocessError):
        return
    built = os.path.realpath(built) if os.path.isabs(built) else ""
    loaded = {os.path.realpath(p) for p in loaded}
    if built and loaded and built not in loaded:
        newer = max(loaded, key=len)
        print(f"mla_ext: WARNING: {cxx} links against {built}, but Python loads {newer}; if "
              f"{cxx} is the newer GCC, C++ error messages of the extension may crash. Build "
              "with the compiler of the loaded runtime, e.g. CC=/usr/bin/gcc CXX=/usr/bin/g++.",
              file=sys.stderr)


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    warn_on_cxx_runtime_mismatch()
    sources = read_sources()
    with_cuda, why = cuda_wanted()
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    cxx = ["-O3"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        print(f"mla_ext: building CPU + CUDA kernels ({why}); archs "
              f"{os.environ['TORCH_CUDA_ARCH_LIST']}; MAX_JOBS={os.environ['MAX_JOBS']}",
              file=sys.stderr)
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                f"--threads={os.environ.get('NVCC_THREADS', '2')}",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                "-Xptxas=--warn-on-spills", "-DMLA_EXT_WITH_CUDA"]
        return [CUDAExtension(
            "mla_ext._C", sources["common"] + sources["cuda"],
            include_dirs=[str(CSRC)] + extra_cuda_includes(),
            extra_compile_args={"cxx": cxx + ["-DMLA_EXT_WITH_CUDA"], "nvcc": nvcc})]
    print(f"mla_ext: building CPU kernels only ({why}); MAX_JOBS={os.environ['MAX_JOBS']}",
          file=sys.stderr)
    return [CppExtension("mla_ext._C", sources["common"], include_dirs=[str(CSRC)],
                         extra_compile_args={"cxx": cxx})]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


locate_cuda_home()  # before torch.utils.cpp_extension is imported: it reads CUDA_HOME once
setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext_class()})
